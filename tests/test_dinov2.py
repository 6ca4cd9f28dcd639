"""DINOv2 (no registers): parity with transformers, hub position interpolation, loading, strict errors, encode.

Reference facts used below (torch-hub facebookresearch/dinov2, dinov2_vitb14): pre-norm ViT, LayerScale,
LayerNorm eps 1e-6, exact GELU, qkv bias, 518 px / patch 14 (37x37 positions), position interpolation by
bicubic ``scale_factor=((h0 + 0.1)/37, (w0 + 0.1)/37)`` with antialias off. Hugging Face's Dinov2Model
interpolates with ``size=(h0, w0)`` instead (no offset): it does NOT match the hub at other resolutions
(checked in test_hf_interpolation_differs_from_hub).
"""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from echogen_core.dinov2 import Dinov2, Dinov2Config, load_dinov2
from echogen_core.errors import CheckpointError, InputError

transformers = pytest.importorskip("transformers")

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _randomize(module, seed, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            is_norm_weight = name.endswith("weight") and p.ndim == 1 and "norm" in name
            p.copy_(1 + noise if is_norm_weight or "lambda1" in name or "gamma" in name else noise)
    return module


def _hf_config(**kw):
    base = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14,
                mlp_ratio=4, layer_norm_eps=1e-6, hidden_act="gelu", layerscale_value=1.0)
    base.update(kw)
    return transformers.Dinov2Config(**base)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny random Dinov2Model saved by transformers (HF layout: config.json + model.safetensors)."""
    model = _randomize(transformers.Dinov2Model(_hf_config()), seed=1).eval()
    folder = tmp_path_factory.mktemp("hf_dinov2")
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def ours(hf_folder):
    return load_dinov2(hf_folder[0])


def _pixels(h, w, seed=0, b=2):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _hub_pos(pos_embed, h, w, patch=14, offset=0.1):
    """Independent re-statement of the hub's DinoVisionTransformer.interpolate_pos_encoding (no-register models)."""
    n = pos_embed.shape[1] - 1
    m = int(math.sqrt(n))
    h0, w0 = h // patch, w // patch
    if n == h0 * w0 and h == w:
        return pos_embed
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((h0 + offset) / m, (w0 + offset) / m), mode="bicubic",
                         antialias=False)
    assert grid.shape[-2:] == (h0, w0)
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def _hf_with_hub_interpolation(hf_model):
    """The HF model with its position interpolation replaced by the hub math above."""
    emb = hf_model.embeddings

    def hub_interp(embeddings, height, width):
        return _hub_pos(emb.position_embeddings, height, width, emb.patch_size)

    emb.interpolate_pos_encoding = hub_interp
    return hf_model


# ------------------------------------------------------------------------------------------------------------
# (1) parity with transformers at the native resolution


def test_matches_transformers_at_native_resolution(hf_folder, ours):
    _, hf = hf_folder
    assert ours.cfg == Dinov2Config.tiny()
    x = _pixels(56, 56)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state
        got = ours(x)
    assert got.shape == ref.shape == (2, 1 + 16, 128)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert ref.abs().max() > 0.1       # not degenerate


# ------------------------------------------------------------------------------------------------------------
# (2) other resolutions: hub interpolation math, written out here independently


@pytest.mark.parametrize("hw", [(112, 112), (28, 28), (70, 98), (56, 84)])
def test_interpolated_positions_follow_hub_math(hf_folder, ours, hw):
    # A copy of the HF model with the hub interpolation patched in is the reference.
    hf = _hf_with_hub_interpolation(copy.deepcopy(hf_folder[1]))
    x = _pixels(*hw, seed=3)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state
        got = ours(x)
    assert got.shape == (2, 1 + (hw[0] // 14) * (hw[1] // 14), 128)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_hf_interpolation_differs_from_hub(hf_folder, ours):
    """Report: HF (size=..., no 0.1 offset) != hub (scale_factor with offset). Ours follows the hub."""
    _, hf = hf_folder
    pos = hf.embeddings.position_embeddings.detach()
    for side in (8, 2):                      # 4x4 grid -> 8x8 and 2x2
        hub = _hub_pos(pos, side * 14, side * 14)
        hf_pos = hf.embeddings.interpolate_pos_encoding(torch.zeros(1, 1 + side * side, 128), side * 14, side * 14)
        assert hub.shape == hf_pos.shape
        assert (hub - hf_pos).abs().max() > 1e-3
    # Same statement at the EchoGen case, 37x37 -> 32x32 (448 px).
    table = torch.randn(1, 1 + 37 * 37, 8, generator=torch.Generator().manual_seed(0))
    hub = _hub_pos(table, 448, 448)
    hf32 = F.interpolate(table[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2), size=(32, 32), mode="bicubic",
                         align_corners=False).permute(0, 2, 3, 1).reshape(1, -1, 8)
    assert (hub[:, 1:] - hf32).abs().max() > 1e-2
    # And end to end: the unpatched HF model gives different tokens from ours at 112 px.
    x = _pixels(112, 112, seed=4)
    with torch.no_grad():
        assert (hf(pixel_values=x).last_hidden_state - ours(x)).abs().max() > 1e-3


def test_native_resolution_non_square_still_interpolates():
    """Hub quirk kept: the table is used as is only when H == W in pixels (here 56 x 60 -> 4x4 patches)."""
    m = _randomize(Dinov2(Dinov2Config.tiny()), seed=5).eval()
    from echogen_core.dinov2 import interpolate_pos_embed

    same = interpolate_pos_embed(m.pos_embed, 56, 56, 14)
    assert same is m.pos_embed
    skewed = interpolate_pos_embed(m.pos_embed, 56, 60, 14)
    torch.testing.assert_close(skewed, _hub_pos(m.pos_embed.detach(), 56, 60))
    assert (skewed - m.pos_embed).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------------------------
# (3) hub-layout files


def test_hub_file_round_trip(tmp_path, ours):
    x = _pixels(84, 84, seed=6)
    sd = {k: v.clone() for k, v in ours.state_dict().items()}     # our names are the hub names
    torch.save(sd, tmp_path / "dinov2_tiny_pretrain.pth")
    save_file(sd, str(tmp_path / "dinov2_tiny.safetensors"))
    with torch.no_grad():
        ref = ours(x)
        for name in ("dinov2_tiny_pretrain.pth", "dinov2_tiny.safetensors"):
            loaded = load_dinov2(tmp_path / name)
            assert loaded.cfg == ours.cfg
            torch.testing.assert_close(loaded(x), ref, atol=0, rtol=0)


def test_vit_b14_hub_key_set():
    with torch.device("meta"):
        m = Dinov2(Dinov2Config.vit_b14())
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert len(shapes) == 175                       # 5 + 12 * 14 + 2
    assert shapes["cls_token"] == (1, 1, 768)
    assert shapes["pos_embed"] == (1, 1370, 768)
    assert shapes["mask_token"] == (1, 768)
    assert shapes["patch_embed.proj.weight"] == (768, 3, 14, 14)
    assert shapes["blocks.11.attn.qkv.weight"] == (2304, 768)
    assert shapes["blocks.11.attn.qkv.bias"] == (2304,)
    assert shapes["blocks.11.attn.proj.weight"] == (768, 768)
    assert shapes["blocks.0.ls1.gamma"] == shapes["blocks.0.ls2.gamma"] == (768,)
    assert shapes["blocks.0.mlp.fc1.weight"] == (3072, 768)
    assert shapes["blocks.0.mlp.fc2.weight"] == (768, 3072)
    assert shapes["norm.weight"] == (768,)
    per_block = {k.split(".", 2)[2] for k in shapes if k.startswith("blocks.3.")}
    assert per_block == {"norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                         "attn.proj.bias", "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight",
                         "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "ls2.gamma"}


def test_infers_vit_b14_config_from_hub_shapes(tmp_path):
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Dinov2(Dinov2Config.vit_b14()).state_dict().items()}
    from echogen_core.dinov2 import infer_dinov2_config

    fake = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    assert infer_dinov2_config(fake) == Dinov2Config.vit_b14()


def test_hf_prefix_and_missing_mask_token(tmp_path, hf_folder, ours):
    from safetensors.torch import load_file

    sd = load_file(str(hf_folder[0] / "model.safetensors"))
    sd = {"dinov2." + k: v for k, v in sd.items() if k != "embeddings.mask_token"}
    save_file(sd, str(tmp_path / "prefixed.safetensors"))
    m = load_dinov2(tmp_path / "prefixed.safetensors")       # no config.json: heads = 128 / 64
    assert torch.equal(m.mask_token, torch.zeros(1, 128))
    assert any("mask_token" in n for n in m.load_notes)
    x = _pixels(56, 56, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ours(x), atol=0, rtol=0)


def test_dtype_and_fp32_encode(hf_folder):
    m = load_dinov2(hf_folder[0], dtype=torch.bfloat16)
    assert m.pos_embed.dtype == torch.bfloat16
    out = m.encode(torch.rand(1, 3, 64, 64), size=56)
    assert out.dtype == torch.float32 and out.shape == (1, 17, 128)


# ------------------------------------------------------------------------------------------------------------
# (4) strict errors


@pytest.fixture()
def hub_sd(ours):
    return {k: v.clone() for k, v in ours.state_dict().items()}


def _load_error(tmp_path, sd):
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as e:
        load_dinov2(path)
    return str(e.value)


def test_error_missing_key(tmp_path, hub_sd):
    del hub_sd["blocks.1.ls2.gamma"]
    msg = _load_error(tmp_path, hub_sd)
    assert "missing" in msg and "blocks.1.ls2.gamma" in msg


def test_error_unexpected_key(tmp_path, hub_sd):
    hub_sd["blocks.0.attn.rope.freqs"] = torch.zeros(4)
    msg = _load_error(tmp_path, hub_sd)
    assert "unexpected" in msg and "blocks.0.attn.rope.freqs" in msg


def test_error_wrong_shape(tmp_path, hub_sd):
    hub_sd["norm.weight"] = torch.ones(127)
    msg = _load_error(tmp_path, hub_sd)
    assert "wrong shape" in msg and "norm.weight" in msg and "(127,)" in msg


def test_error_registers_model(tmp_path, hub_sd):
    hub_sd["register_tokens"] = torch.zeros(1, 4, 128)
    msg = _load_error(tmp_path, hub_sd)
    assert "register_tokens" in msg and "without registers" in msg and "ViT-B/14" in msg


def test_error_hf_registers_model(tmp_path, hf_folder):
    """HF facebook/dinov2-with-registers-* layout: embeddings.register_tokens + model_type in config.json."""
    from safetensors.torch import load_file

    sd = load_file(str(hf_folder[0] / "model.safetensors"))
    sd["embeddings.register_tokens"] = torch.zeros(1, 4, 128)
    save_file(sd, str(tmp_path / "model.safetensors"))
    config = json.loads((hf_folder[0] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "dinov2_with_registers",
                                                      "num_register_tokens": 4}))
    with pytest.raises(CheckpointError, match="without registers") as e:
        load_dinov2(tmp_path)
    assert "embeddings.register_tokens" in str(e.value) and "4 register tokens" in str(e.value)


def test_error_partial_hf_attention(tmp_path, hf_folder):
    from safetensors.torch import load_file

    sd = load_file(str(hf_folder[0] / "model.safetensors"))
    del sd["encoder.layer.1.attention.attention.key.weight"]
    save_file(sd, str(tmp_path / "partial.safetensors"))
    with pytest.raises(CheckpointError, match=r"encoder\.layer\.1\.attention\.attention\.key\.weight"):
        load_dinov2(tmp_path / "partial.safetensors")


def test_error_not_dinov2(tmp_path):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="does not look like a DINOv2"):
        load_dinov2(tmp_path / "other.pth")


# ------------------------------------------------------------------------------------------------------------
# (5) encode: shapes and preprocessing


@pytest.mark.parametrize("size", [56, 112])
def test_encode_shapes(ours, size):
    out = ours.encode(torch.rand(2, 3, 512, 512), size=size)
    assert out.shape == (2, 1 + (size // 14) ** 2, 128) and out.dtype == torch.float32


def test_encode_vit_b14_shape_on_meta():
    with torch.device("meta"):
        m = Dinov2(Dinov2Config.vit_b14())
        out448 = m.encode(torch.rand(1, 3, 512, 512), size=448)
        out224 = m.encode(torch.rand(1, 3, 256, 256), size=224)
    assert out448.shape == (1, 1025, 768)
    assert out224.shape == (1, 257, 768)


def test_encode_is_normalise_then_bicubic(ours):
    img = torch.rand(2, 3, 150, 150, generator=torch.Generator().manual_seed(8))
    norm = (img - MEAN) / STD
    with torch.no_grad():
        # Shrinking (150 -> 112): antialiased bicubic, as torchvision's Resize does on tensors.
        ref = ours(F.interpolate(norm, size=(112, 112), mode="bicubic", align_corners=False, antialias=True))
        torch.testing.assert_close(ours.encode(img, size=112), ref, atol=1e-5, rtol=1e-5)
        # Enlarging (150 -> 168): plain bicubic.
        ref_up = ours(F.interpolate(norm, size=(168, 168), mode="bicubic", align_corners=False))
        torch.testing.assert_close(ours.encode(img, size=168), ref_up, atol=1e-5, rtol=1e-5)
        # Forcing antialias off when shrinking changes the result; without normalisation it is different too.
        plain = ours(F.interpolate(norm, size=(112, 112), mode="bicubic", align_corners=False))
        torch.testing.assert_close(ours.encode(img, size=112, antialias=False), plain, atol=1e-5, rtol=1e-5)
        assert (plain - ref).abs().max() > 1e-4
        raw = ours(F.interpolate(img, size=(112, 112), mode="bicubic", align_corners=False, antialias=True))
        assert (raw - ref).abs().max() > 1e-2
        # Same size: no resampling at all.
        torch.testing.assert_close(ours.encode(img[..., :56, :56], size=56), ours(norm[..., :56, :56]),
                                   atol=1e-5, rtol=1e-5)


def test_input_errors(ours):
    with pytest.raises(InputError):
        ours.encode(torch.rand(1, 3, 64, 64), size=50)
    with pytest.raises(InputError):
        ours.encode(torch.rand(1, 4, 64, 64), size=56)
    with pytest.raises(InputError):
        ours(torch.rand(1, 3, 57, 56))
