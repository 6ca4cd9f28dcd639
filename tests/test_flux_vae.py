"""FLUX.1 VAE encoder (EchoGen's content encoder): architecture facts, both key layouts, tokens, strict errors.

The diffusers comparison runs only where `diffusers` is installed; the fact checks below it (BFL key names and
shapes, downsample padding, attention formula, quant_conv) run everywhere.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from echogen_core.errors import CheckpointError, InputError
from echogen_core.flux_vae import (
    FluxVAEConfig,
    FluxVAEEncoder,
    encoder_state_dict_to_diffusers,
    encoder_state_dict_to_ldm,
    latent_to_content_tokens,
    load_flux_vae_encoder,
)

try:
    import diffusers  # noqa: F401
    HAVE_DIFFUSERS = True
except ImportError:  # CI installs only requirements.txt + pytest
    HAVE_DIFFUSERS = False

needs_diffusers = pytest.mark.skipif(not HAVE_DIFFUSERS, reason="diffusers is not installed")


# --------------------------------------------------------------------------------------------------------------
# helpers


def _perturb_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Default conv init plus noise on every parameter, so GroupNorm affines and biases all matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module.eval()


def _random_encoder(seed=0, **overrides) -> FluxVAEEncoder:
    torch.manual_seed(seed)
    return _perturb_(FluxVAEEncoder(FluxVAEConfig.tiny(**overrides)), seed)


def _images(b=2, h=48, w=64, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _ldm_names_from_diffusers(sd: dict) -> dict:
    """Written independently of flux_vae's tables: the diffusers -> BFL rename as diffusers' own converter does it."""
    out = {}
    for k, v in sd.items():
        n = k
        if n.startswith("encoder."):
            n = n.replace("conv_norm_out", "norm_out").replace("mid_block.resnets.0", "mid.block_1")
            n = n.replace("mid_block.resnets.1", "mid.block_2").replace("mid_block.attentions.0", "mid.attn_1")
            n = n.replace("attn_1.group_norm", "attn_1.norm").replace("attn_1.to_q", "attn_1.q")
            n = n.replace("attn_1.to_k", "attn_1.k").replace("attn_1.to_v", "attn_1.v")
            n = n.replace("attn_1.to_out.0", "attn_1.proj_out").replace("down_blocks", "down")
            n = n.replace("resnets", "block").replace("downsamplers.0", "downsample")
            n = n.replace("conv_shortcut", "nin_shortcut")
            if n.startswith("encoder.mid.attn_1.") and n.endswith("weight") and v.dim() == 2:
                v = v[:, :, None, None]
        out[n] = v
    return out


def _fake_decoder(seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"decoder.conv_in.weight": torch.randn(32, 16, 3, 3, generator=g),
            "decoder.conv_in.bias": torch.randn(32, generator=g),
            "decoder.up.0.block.0.conv1.weight": torch.randn(32, 32, 3, 3, generator=g),
            "decoder.conv_out.weight": torch.randn(3, 32, 3, 3, generator=g)}


def _save_ldm(tmp_path, sd: dict, name="ae.safetensors"):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def _tiny_diffusers_vae(seed=0, **kw):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    args = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 64, 128, 128), layers_per_block=2,
                latent_channels=16, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
                scaling_factor=0.3611, shift_factor=0.1159)
    args.update(kw)
    return _perturb_(AutoencoderKL(**args), seed)


# --------------------------------------------------------------------------------------------------------------
# (1) reference: diffusers AutoencoderKL, and the BFL layout


@needs_diffusers
def test_matches_diffusers_in_both_layouts(tmp_path):
    vae = _tiny_diffusers_vae(seed=1)
    vae.save_pretrained(tmp_path / "snapshot" / "vae")
    x = _images()
    with torch.no_grad():
        ref = vae.encode(x).latent_dist.mean
    assert ref.shape == (2, 16, 6, 8)

    for src in (tmp_path / "snapshot" / "vae", tmp_path / "snapshot",
                tmp_path / "snapshot" / "vae" / "diffusion_pytorch_model.safetensors"):
        enc = load_flux_vae_encoder(src)
        with torch.no_grad():
            torch.testing.assert_close(enc(x), ref, atol=1e-5, rtol=1e-5)
        assert any("ignored" in n and "decoder" in n for n in enc.load_notes), enc.load_notes
        assert enc.cfg == FluxVAEConfig.tiny()

    # Same weights under BFL's single-file names (renamed by the test itself), plus decoder tensors.
    ldm = _ldm_names_from_diffusers(vae.state_dict())
    assert "encoder.mid.attn_1.proj_out.weight" in ldm and "encoder.down.1.block.0.nin_shortcut.bias" in ldm
    enc = load_flux_vae_encoder(_save_ldm(tmp_path, ldm))
    with torch.no_grad():
        torch.testing.assert_close(enc(x), ref, atol=1e-5, rtol=1e-5)
        # encode() takes [0, 1] images and returns float32
        torch.testing.assert_close(enc.encode((x + 1) / 2), ref, atol=1e-5, rtol=1e-5)
    assert enc.encode((x + 1) / 2).dtype == torch.float32


@needs_diffusers
def test_quant_conv_is_applied_like_diffusers(tmp_path):
    vae = _tiny_diffusers_vae(seed=2, use_quant_conv=True, use_post_quant_conv=True)
    vae.save_pretrained(tmp_path / "vae")
    x = _images(b=1, h=32, w=40)
    enc = load_flux_vae_encoder(tmp_path / "vae")
    assert enc.quant_conv is not None and any("quant_conv" in n for n in enc.load_notes)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), vae.encode(x).latent_dist.mean, atol=1e-5, rtol=1e-5)


@needs_diffusers
def test_conversion_helpers_match_diffusers_names():
    vae = _tiny_diffusers_vae(seed=3)
    dsd = {k: v for k, v in vae.state_dict().items() if k.startswith("encoder.")}
    ours = FluxVAEEncoder(FluxVAEConfig.tiny()).state_dict()
    ldm = encoder_state_dict_to_ldm(dsd)
    assert {k: tuple(v.shape) for k, v in ldm.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    back = encoder_state_dict_to_diffusers(ldm)
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in dsd.items()}


# --------------------------------------------------------------------------------------------------------------
# facts that hold without diffusers


def _bfl_encoder_shapes(ch=128, mult=(1, 2, 4, 4), blocks=2, z=16) -> dict:
    """BFL's `ae.safetensors` encoder names and shapes, enumerated from the published layout."""
    s = {"encoder.conv_in.weight": (ch, 3, 3, 3), "encoder.conv_in.bias": (ch,)}

    def resnet(p, a, b):
        s.update({f"{p}.norm1.weight": (a,), f"{p}.norm1.bias": (a,), f"{p}.conv1.weight": (b, a, 3, 3),
                  f"{p}.conv1.bias": (b,), f"{p}.norm2.weight": (b,), f"{p}.norm2.bias": (b,),
                  f"{p}.conv2.weight": (b, b, 3, 3), f"{p}.conv2.bias": (b,)})
        if a != b:
            s.update({f"{p}.nin_shortcut.weight": (b, a, 1, 1), f"{p}.nin_shortcut.bias": (b,)})

    c = ch
    for i, m in enumerate(mult):
        for j in range(blocks):
            resnet(f"encoder.down.{i}.block.{j}", c, ch * m)
            c = ch * m
        if i < len(mult) - 1:
            s.update({f"encoder.down.{i}.downsample.conv.weight": (c, c, 3, 3),
                      f"encoder.down.{i}.downsample.conv.bias": (c,)})
    resnet("encoder.mid.block_1", c, c)
    resnet("encoder.mid.block_2", c, c)
    s.update({"encoder.mid.attn_1.norm.weight": (c,), "encoder.mid.attn_1.norm.bias": (c,)})
    for n in ("q", "k", "v", "proj_out"):
        s.update({f"encoder.mid.attn_1.{n}.weight": (c, c, 1, 1), f"encoder.mid.attn_1.{n}.bias": (c,)})
    s.update({"encoder.norm_out.weight": (c,), "encoder.norm_out.bias": (c,),
              "encoder.conv_out.weight": (2 * z, c, 3, 3), "encoder.conv_out.bias": (2 * z,)})
    return s


def test_flux_preset_has_bfl_names_and_shapes():
    with torch.device("meta"):
        model = FluxVAEEncoder(FluxVAEConfig.flux())
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == _bfl_encoder_shapes()
    assert sum(v.numel() for v in model.state_dict().values()) == 34_274_208
    assert FluxVAEConfig.flux().downsample_factor == 8
    with torch.device("meta"):
        tiny = FluxVAEEncoder(FluxVAEConfig.tiny())
    assert {k: tuple(v.shape) for k, v in tiny.state_dict().items()} == _bfl_encoder_shapes(ch=32)


def test_downsample_pads_right_and_bottom_only():
    enc = _random_encoder()
    down = enc.encoder.down[0].downsample
    x = torch.randn(1, 32, 10, 14)
    with torch.no_grad():
        y = down(x)
        want = F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2)
        symmetric = F.conv2d(x, down.conv.weight, down.conv.bias, stride=2, padding=1)
    assert y.shape == (1, 32, 5, 7)
    torch.testing.assert_close(y, want)
    assert (y - symmetric).abs().max() > 1e-3


def test_mid_attention_is_single_head_over_positions():
    enc = _random_encoder()
    attn = enc.encoder.mid.attn_1
    x = torch.randn(2, 128, 3, 5)
    with torch.no_grad():
        h = F.group_norm(x, 32, attn.norm.weight, attn.norm.bias, eps=1e-6)
        q, k, v = (F.conv2d(h, m.weight, m.bias).flatten(2) for m in (attn.q, attn.k, attn.v))   # (B, C, N)
        w = torch.softmax(torch.einsum("bcn,bcm->bnm", q, k) / 128 ** 0.5, dim=-1)
        o = torch.einsum("bnm,bcm->bcn", w, v).reshape(2, 128, 3, 5)
        want = x + F.conv2d(o, attn.proj_out.weight, attn.proj_out.bias)
        torch.testing.assert_close(attn(x), want, atol=1e-5, rtol=1e-5)


def test_ldm_and_diffusers_files_round_trip_without_diffusers(tmp_path):
    enc = _random_encoder(seed=4)
    x = _images(seed=1)
    with torch.no_grad():
        ref = enc(x)

    loaded = load_flux_vae_encoder(_save_ldm(tmp_path, {**enc.state_dict(), **_fake_decoder()}))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref, atol=1e-6, rtol=1e-6)
    assert any("4 tensors" in n and "decoder" in n for n in loaded.load_notes), loaded.load_notes

    folder = tmp_path / "vae"
    folder.mkdir()
    dsd = encoder_state_dict_to_diffusers(enc.state_dict())
    assert dsd["encoder.mid_block.attentions.0.to_out.0.weight"].shape == (128, 128)
    assert "encoder.down_blocks.2.resnets.0.conv_shortcut.weight" in dsd
    assert "encoder.down_blocks.0.downsamplers.0.conv.bias" in dsd and "encoder.conv_norm_out.weight" in dsd
    save_file({k: v.contiguous() for k, v in dsd.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "latent_channels": 16,
                                                    "norm_num_groups": 32, "scaling_factor": 0.3611,
                                                    "shift_factor": 0.1159, "use_quant_conv": False}))
    loaded = load_flux_vae_encoder(tmp_path, dtype=torch.float64)
    assert loaded.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).float(), ref, atol=1e-5, rtol=1e-5)
        assert loaded.encode((x + 1) / 2).dtype == torch.float32


def test_quant_conv_in_ldm_file_is_applied(tmp_path):
    enc = _random_encoder(seed=5)
    g = torch.Generator().manual_seed(9)
    qw, qb = torch.randn(32, 32, 1, 1, generator=g) * 0.2, torch.randn(32, generator=g)
    sd = {**enc.state_dict(), "quant_conv.weight": qw, "quant_conv.bias": qb}
    loaded = load_flux_vae_encoder(_save_ldm(tmp_path, sd))
    x = _images(b=1, seed=2)
    with torch.no_grad():
        want = F.conv2d(enc.encoder(x), qw, qb)[:, :16]
        torch.testing.assert_close(loaded(x), want, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# (2) content tokens


def test_content_tokens_of_a_512_reference():
    torch.manual_seed(0)
    enc = _perturb_(FluxVAEEncoder(FluxVAEConfig.tiny(ch=8, norm_groups=8)), seed=0)   # narrowest: 512 px is slow
    img = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mean = enc(img * 2 - 1)
    tokens = enc.content_tokens(img)
    assert mean.shape == (1, 16, 64, 64)
    assert tokens.shape == (1, 64 * 64, 16) and tokens.dtype == torch.float32
    for r, c in [(0, 0), (0, 1), (1, 0), (5, 17), (63, 62), (63, 63)]:
        torch.testing.assert_close(tokens[:, r * 64 + c], mean[:, :, r, c], atol=1e-6, rtol=1e-6)


def test_latent_to_content_tokens_is_row_major():
    latent = torch.randn(2, 16, 3, 5)
    tokens = latent_to_content_tokens(latent)
    assert tokens.shape == (2, 15, 16)
    for r in range(3):
        for c in range(5):
            assert torch.equal(tokens[:, r * 5 + c], latent[:, :, r, c])
    with pytest.raises(InputError, match="16-channel FLUX.1"):
        latent_to_content_tokens(torch.randn(1, 4, 8, 8))
    with pytest.raises(InputError, match=r"\(batch, 16, h, w\)"):
        latent_to_content_tokens(torch.randn(16, 8, 8))


# --------------------------------------------------------------------------------------------------------------
# (3) strict errors


@pytest.fixture(scope="module")
def tiny_sd():
    return {**_random_encoder(seed=6).state_dict(), **_fake_decoder()}


def test_missing_encoder_key(tmp_path, tiny_sd):
    sd = dict(tiny_sd)
    del sd["encoder.down.1.block.1.conv2.bias"]
    with pytest.raises(CheckpointError, match=r"1 missing: encoder\.down\.1\.block\.1\.conv2\.bias"):
        load_flux_vae_encoder(_save_ldm(tmp_path, sd))
    sd = dict(tiny_sd)
    del sd["encoder.down.2.block.0.conv1.weight"]
    with pytest.raises(CheckpointError, match=r"encoder\.down\.2\.block\.0\.conv1\.weight` is missing"):
        load_flux_vae_encoder(_save_ldm(tmp_path, sd))


def test_wrong_shape_and_unexpected_encoder_keys(tmp_path, tiny_sd):
    sd = dict(tiny_sd)
    sd["encoder.mid.attn_1.q.weight"] = torch.zeros(128, 128)            # a Linear weight under a conv name
    with pytest.raises(CheckpointError, match=r"1 wrong shape: encoder\.mid\.attn_1\.q\.weight: file \(128, 128\) "
                                              r"vs model \(128, 128, 1, 1\)"):
        load_flux_vae_encoder(_save_ldm(tmp_path, sd))
    sd = dict(tiny_sd)
    sd["encoder.down.0.attn.0.q.weight"] = torch.zeros(32, 32, 1, 1)
    with pytest.raises(CheckpointError, match=r"1 unexpected: encoder\.down\.0\.attn\.0\.q\.weight"):
        load_flux_vae_encoder(_save_ldm(tmp_path, sd))
    dsd = encoder_state_dict_to_diffusers(tiny_sd)
    dsd["encoder.mid_block.attentions.0.to_k.weight"] = torch.zeros(128, 64)
    with pytest.raises(CheckpointError, match=r"wrong shape: encoder\.mid\.attn_1\.k\.weight"):
        load_flux_vae_encoder(_save_ldm(tmp_path, dsd, "diffusion_pytorch_model.safetensors"))


def test_sd_style_four_channel_vae_is_refused(tmp_path):
    sd4 = {**_random_encoder(seed=7, z_channels=4, use_quant_conv=True).state_dict(), **_fake_decoder()}
    assert sd4["quant_conv.weight"].shape == (8, 8, 1, 1)
    with pytest.raises(CheckpointError, match=r"4 latent channels \(SD1.x / SD2 / SDXL VAEs have 4\)\. EchoGen's "
                                              r"content encoder needs the 16-channel FLUX\.1 VAE"):
        load_flux_vae_encoder(_save_ldm(tmp_path, sd4))
    with pytest.raises(CheckpointError, match="16-channel FLUX.1 VAE"):
        load_flux_vae_encoder(_save_ldm(tmp_path, encoder_state_dict_to_diffusers(sd4), "x.safetensors"))


def test_not_a_vae_and_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not a VAE"):
        load_flux_vae_encoder(_save_ldm(tmp_path, {"word_embed.weight": torch.zeros(4, 4)}))
    with pytest.raises(CheckpointError, match="not found"):
        load_flux_vae_encoder(tmp_path / "nope.safetensors")


def test_input_checks():
    enc = _random_encoder()
    with pytest.raises(InputError, match=r"516x512 \(HxW\); the FLUX VAE needs height and width that are "
                                         r"multiples of 8"):
        enc.encode(torch.rand(1, 3, 516, 512))
    with pytest.raises(InputError, match="multiples of 8"):
        enc(torch.rand(1, 3, 64, 60))
    with pytest.raises(InputError, match="channels-last"):
        enc.encode(torch.rand(1, 64, 64, 3))
    with pytest.raises(InputError, match=r"expects images in \[0, 1\]"):
        enc.encode(torch.rand(1, 3, 64, 64) * 2 - 1)
