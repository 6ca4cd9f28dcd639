"""Tests for echogen_core.bsq_vae (Infinity's BSQ VAE). CPU only, small models, a few seconds."""

import math

import pytest
import torch
import torch.nn.functional as F

from echogen_core.bsq_vae import BSQVAE, BSQVAEConfig, infer_vae_config, normalize_vae_state_dict
from echogen_core.errors import CheckpointError, InputError

# (config, image (H, W), VAE scale schedule ending at the latent grid); both latents are 8x12
TINY_CASES = {
    "stride16": (BSQVAEConfig.tiny(codebook_dim=8, patch_size=16), (128, 192),
                 [(1, 1), (2, 3), (3, 5), (4, 6), (8, 12)]),
    "stride8": (BSQVAEConfig.tiny(codebook_dim=6, patch_size=8), (64, 96),
                [(1, 1), (2, 2), (4, 6), (5, 7), (8, 12)]),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny convolutions: with several threads (and a busy machine) sync costs more than it saves."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _randomise_norms(model: BSQVAE, seed: int) -> None:
    """Give the GroupNorm affines non-trivial values, so wiring mistakes show up in outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".norm." in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module", params=list(TINY_CASES))
def tiny(request):
    cfg, img_hw, schedule = TINY_CASES[request.param]
    torch.manual_seed(0)
    model = BSQVAE(cfg).eval()
    _randomise_norms(model, 1)
    img = torch.rand(2, 3, *img_hw, generator=torch.Generator().manual_seed(2)) * 2 - 1
    return model, img, schedule


@pytest.fixture(scope="module")
def encoded(tiny):
    """One encode + multi-scale quantisation per tiny model, shared by the tests below."""
    model, img, schedule = tiny
    with torch.no_grad():
        h = model.encode_latent(img)
        summed, bits = model.quantize_multiscale(h, schedule)
    return h, summed, bits


# --------------------------------------------------------------------------------------------
# State-dict layout of the released models (built on the meta device: no memory, no weights)

D32_SHAPES = {
    "encoder.conv_in.conv.weight": (128, 3, 3, 3),
    "encoder.conv_in.conv.bias": (128,),
    "encoder.down.0.block.0.norm1.norm.weight": (128,),
    "encoder.down.0.block.1.conv2.conv.weight": (128, 128, 3, 3),
    "encoder.down.1.block.0.conv1.conv.weight": (256, 128, 3, 3),
    "encoder.down.1.block.0.nin_shortcut.conv.weight": (256, 128, 1, 1),
    "encoder.down.2.block.0.nin_shortcut.conv.weight": (512, 256, 1, 1),
    "encoder.down.0.downsample.conv.conv.weight": (128, 128, 3, 3),
    "encoder.down.1.downsample.conv.conv.weight": (256, 256, 3, 3),
    "encoder.down.3.downsample.conv.conv.bias": (512,),
    "encoder.mid.block_1.norm1.norm.weight": (512,),
    "encoder.mid.block_2.conv2.conv.weight": (512, 512, 3, 3),
    "encoder.norm_out.norm.bias": (512,),
    "encoder.conv_out.conv.weight": (32, 512, 3, 3),
    "encoder.conv_out.conv.bias": (32,),
    "decoder.conv_in.conv.weight": (512, 32, 3, 3),
    "decoder.mid.block_2.norm2.norm.bias": (512,),
    "decoder.up.4.block.2.conv2.conv.weight": (512, 512, 3, 3),
    "decoder.up.1.block.0.conv1.conv.weight": (256, 512, 3, 3),
    "decoder.up.1.block.0.nin_shortcut.conv.weight": (256, 512, 1, 1),
    "decoder.up.0.block.0.nin_shortcut.conv.weight": (128, 256, 1, 1),
    "decoder.up.1.upsample.conv.conv.weight": (256, 256, 3, 3),
    "decoder.up.4.upsample.conv.conv.weight": (512, 512, 3, 3),
    "decoder.norm_out.norm.weight": (128,),
    "decoder.conv_out.conv.weight": (3, 128, 3, 3),
    "decoder.conv_out.conv.bias": (3,),
    "quantizer.lfq.mask": (32,),
    "quantize.lfq.mask": (32,),
}
D14_SHAPES = {
    "encoder.conv_in.conv.weight": (128, 3, 3, 3),
    "encoder.down.2.block.0.nin_shortcut.conv.weight": (512, 256, 1, 1),
    "encoder.down.2.downsample.conv.conv.weight": (512, 512, 3, 3),
    "encoder.down.3.block.1.conv1.conv.weight": (512, 512, 3, 3),
    "encoder.conv_out.conv.weight": (14, 512, 3, 3),
    "decoder.conv_in.conv.weight": (512, 14, 3, 3),
    "decoder.up.3.upsample.conv.conv.weight": (512, 512, 3, 3),
    "decoder.up.1.upsample.conv.conv.bias": (256,),
    "decoder.up.0.block.0.nin_shortcut.conv.weight": (128, 256, 1, 1),
    "decoder.conv_out.conv.weight": (3, 128, 3, 3),
    "quantizer.lfq.mask": (14,),
    "quantize.lfq.mask": (14,),
}
PRESETS = {
    # n_keys, params (spec 8.1), shapes, downsample levels, upsample levels, nin_shortcut blocks
    "d32": (BSQVAEConfig.d32(), 270, 110.12e6, D32_SHAPES, [0, 1, 2, 3], [1, 2, 3, 4],
            ["encoder.down.1.block.0", "encoder.down.2.block.0",
             "decoder.up.0.block.0", "decoder.up.1.block.0"]),
    "d14": (BSQVAEConfig.d14_patchify(), 226, 81.62e6, D14_SHAPES, [0, 1, 2], [1, 2, 3],
            ["encoder.down.1.block.0", "encoder.down.2.block.0",
             "decoder.up.0.block.0", "decoder.up.1.block.0"]),
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_released_layouts_on_meta(name):
    cfg, n_keys, n_params, shapes, downs, ups, nins = PRESETS[name]
    with torch.device("meta"):
        model = BSQVAE(cfg)
    sd = model.state_dict()
    assert len(sd) == n_keys
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert sorted(int(k.split(".")[2]) for k in sd if "downsample" in k and k.endswith("weight")) == downs
    assert sorted(int(k.split(".")[2]) for k in sd if "upsample" in k and k.endswith("weight")) == ups
    assert sorted({k.rsplit(".nin_shortcut", 1)[0] for k in sd if "nin_shortcut" in k}) == sorted(nins)
    assert not any("attn" in k or ".q." in k for k in sd)  # no attention anywhere
    assert sum(v.numel() for k, v in sd.items() if "mask" not in k) == pytest.approx(n_params, rel=1e-4)
    assert sd["quantizer.lfq.mask"].dtype == torch.int64
    assert model.bits == cfg.codebook_dim and model.downsample == cfg.patch_size
    assert infer_vae_config(sd) == cfg  # meta tensors carry shapes: inference needs no weights


def test_mask_values():
    sd = BSQVAE(BSQVAEConfig.tiny(codebook_dim=5)).state_dict()
    for key in ("quantizer.lfq.mask", "quantize.lfq.mask"):
        assert sd[key].tolist() == [16, 8, 4, 2, 1] and sd[key].dtype == torch.int64


def test_config_validation():
    with pytest.raises(ValueError):
        BSQVAEConfig(codebook_dim=8, patch_size=12)
    with pytest.raises(ValueError):  # 4 downsamples need 5 levels
        BSQVAEConfig(codebook_dim=8, patch_size=16, ch_mult=(1, 2, 4, 4))
    with pytest.raises(ValueError):
        BSQVAEConfig(codebook_dim=8, base_ch=48, norm_groups=32)


# --------------------------------------------------------------------------------------------
# Forward passes


def test_encode_quantize_decode_shapes(tiny, encoded):
    model, img, schedule = tiny
    h, summed, bits = encoded
    cfg = model.config
    H, W = img.shape[-2] // cfg.patch_size, img.shape[-1] // cfg.patch_size
    assert h.shape == (2, cfg.codebook_dim, H, W) and h.dtype == torch.float32
    assert summed.shape == h.shape and summed.dtype == torch.float32
    assert [tuple(b.shape) for b in bits] == [(2, hs, ws, cfg.codebook_dim) for hs, ws in schedule]
    assert all(b.dtype == torch.uint8 and set(b.unique().tolist()) <= {0, 1} for b in bits)
    with torch.no_grad():
        out = model.decode(summed)
        assert out.shape == img.shape and out.dtype == torch.float32
        assert out.min() >= -1 and out.max() <= 1
        # summed holds straight-through values (z + (q - z)), equal to the codes up to rounding
        torch.testing.assert_close(model.decode_bits(bits), out, rtol=0, atol=1e-4)


def test_encode_bits_matches_pipeline(tiny, encoded):
    model, img, schedule = tiny
    # batch rows are independent: encoding one image alone gives the same bits
    with torch.no_grad():
        bits = model.encode_bits(img[1:], schedule)
    assert all(torch.equal(a, b[1:]) for a, b in zip(bits, encoded[2]))


def _reference_forward(model: BSQVAE, x: torch.Tensor, part: str) -> torch.Tensor:
    """Encoder or decoder written as plain functional ops over the state dict (spec 8.2/8.3)."""
    sd, cfg = model.state_dict(), model.config
    n_down, n = int(math.log2(cfg.patch_size)), len(cfg.ch_mult)

    def conv(t, name, stride=1, pad=1):
        return F.conv2d(t, sd[f"{name}.conv.weight"], sd[f"{name}.conv.bias"], stride, pad)

    def gn_swish(t, name):
        t = F.group_norm(t, cfg.norm_groups, sd[f"{name}.norm.weight"], sd[f"{name}.norm.bias"], 1e-6)
        return t * torch.sigmoid(t)

    def resblock(t, name):
        r = conv(gn_swish(conv(gn_swish(t, f"{name}.norm1"), f"{name}.conv1"), f"{name}.norm2"),
                 f"{name}.conv2")
        if f"{name}.nin_shortcut.conv.weight" in sd:
            t = conv(t, f"{name}.nin_shortcut", pad=0)
        return t + r

    if part == "encoder":
        t = conv(x, "encoder.conv_in")
        for i in range(n):
            for j in range(cfg.num_res_blocks):
                t = resblock(t, f"encoder.down.{i}.block.{j}")
            if i < n_down:  # zero-pad right/bottom only, then stride-2 conv without padding
                t = conv(F.pad(t, (0, 1, 0, 1)), f"encoder.down.{i}.downsample.conv", 2, 0)
        t = resblock(resblock(t, "encoder.mid.block_1"), "encoder.mid.block_2")
        return conv(gn_swish(t, "encoder.norm_out"), "encoder.conv_out")
    t = conv(x, "decoder.conv_in")
    t = resblock(resblock(t, "decoder.mid.block_1"), "decoder.mid.block_2")
    for i in reversed(range(n)):
        for j in range(cfg.num_res_blocks + 1):
            t = resblock(t, f"decoder.up.{i}.block.{j}")
        if 1 <= i <= n_down:
            t = conv(F.interpolate(t, scale_factor=2, mode="nearest"), f"decoder.up.{i}.upsample.conv")
    return conv(gn_swish(t, "decoder.norm_out"), "decoder.conv_out")


def test_matches_functional_reference(tiny):
    model, img, _ = tiny
    img = img[:, :, : 2 * model.downsample, : 3 * model.downsample]  # small: 2x3 latent
    with torch.no_grad():
        h = model.encode_latent(img)
        torch.testing.assert_close(h, _reference_forward(model, img, "encoder"), rtol=1e-5, atol=1e-5)
        z = torch.randn_like(h)
        ref = _reference_forward(model, z, "decoder")
        torch.testing.assert_close(model.decoder(z), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.decode(z), ref.clamp(-1, 1), rtol=1e-5, atol=1e-5)


def test_decode_clamps():
    model = BSQVAE(BSQVAEConfig.tiny(codebook_dim=4, patch_size=8))
    with torch.no_grad():
        model.decoder.conv_out.conv.weight.mul_(1e3)
        raw = model.decoder(torch.randn(1, 4, 2, 2))
        out = model.decode(torch.randn(1, 4, 2, 2))
    assert raw.abs().max() > 1  # the clamp has something to do
    assert out.min() == -1 and out.max() == 1


def test_encode_latent_rejects_bad_sizes():
    model = BSQVAE(BSQVAEConfig.tiny(codebook_dim=4, patch_size=8))
    with pytest.raises(InputError, match="multiple of 8"):
        model.encode_latent(torch.zeros(1, 3, 20, 16))
    with pytest.raises(InputError):
        model.encode_latent(torch.zeros(1, 4, 16, 16))


# --------------------------------------------------------------------------------------------
# Quantiser


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int64, torch.float32])
@pytest.mark.parametrize("d", [14, 32])
def test_bits_codes_roundtrip(dtype, d):
    model = BSQVAE(BSQVAEConfig.tiny(codebook_dim=d, patch_size=8))
    bits = torch.randint(0, 2, (2, 3, 5, d), generator=torch.Generator().manual_seed(d))
    codes = model.bits_to_codes(bits.to(dtype))
    assert codes.shape == (2, d, 3, 5) and codes.dtype == torch.float32
    s = 1 / math.sqrt(d)
    expected = (bits.permute(0, 3, 1, 2).float() * 2 - 1) * s
    torch.testing.assert_close(codes, expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(codes.norm(dim=1), torch.ones(2, 3, 5))  # on the unit sphere
    back = model.codes_to_bits(codes)
    assert back.shape == bits.shape and torch.equal(back.long(), bits)


def _reference_multiscale(h, schedule):
    """Residual BSQ written the official way: 5-D tensors, 'area' down, 'trilinear' up (spec 8.5)."""
    x = h.unsqueeze(2)  # (B, d, 1, H, W)
    full = tuple(x.shape[2:])
    d = h.shape[1]
    residual, total, bits = x, 0, []
    for hs, ws in schedule:
        r = residual if (1, hs, ws) == full else F.interpolate(residual, size=(1, hs, ws), mode="area")
        z = F.normalize(r, dim=1)
        b = z > 0
        q = torch.where(b, 1.0, -1.0) / math.sqrt(d)
        if (1, hs, ws) != full:
            q = F.interpolate(q, size=full, mode="trilinear")
        residual = residual - q
        total = total + q
        bits.append(b[:, :, 0].permute(0, 2, 3, 1))
    return total[:, :, 0], bits


def test_quantize_multiscale_matches_reference(tiny, encoded):
    model, _, schedule = tiny
    h, summed, bits = encoded
    ref_summed, ref_bits = _reference_multiscale(h, schedule)
    for b, rb in zip(bits, ref_bits):
        assert torch.equal(b.bool(), rb)
    torch.testing.assert_close(summed, ref_summed, rtol=0, atol=1e-6)
    # decoding from the bits alone gives back the same code sum
    torch.testing.assert_close(model.codes_sum_from_bits(bits), summed, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.codes_sum_from_bits(bits, full_size=h.shape[-2:]), summed,
                               rtol=0, atol=1e-6)
    # coarse scales are not a trivial copy of the finest one
    assert not torch.equal(F.interpolate(bits[-1].permute(0, 3, 1, 2).float(), size=schedule[1],
                                         mode="nearest"),
                           bits[1].permute(0, 3, 1, 2).float())


def test_quantize_multiscale_single_scale_is_sign():
    model = BSQVAE(BSQVAEConfig.tiny(codebook_dim=8, patch_size=8))
    h = torch.randn(2, 8, 4, 6)
    summed, (bits,) = model.quantize_multiscale(h, [(1, 4, 6)])  # (t, h, w) spelling accepted
    assert torch.equal(bits.bool(), (h > 0).permute(0, 2, 3, 1))
    torch.testing.assert_close(summed, torch.sign(h) / math.sqrt(8))


def test_quantize_multiscale_checks_schedule():
    model = BSQVAE(BSQVAEConfig.tiny(codebook_dim=8, patch_size=8))
    h = torch.randn(1, 8, 4, 6)
    with pytest.raises(InputError, match="must end at the latent grid"):
        model.quantize_multiscale(h, [(1, 1), (4, 4)])
    with pytest.raises(InputError):
        model.quantize_multiscale(h, [(2, 4, 6)])  # video time axis


@pytest.mark.parametrize("src,dst", [((5, 7), (8, 12)), ((8, 12), (3, 5)), ((8, 12), (8, 12)),
                                     ((1, 1), (4, 6)), ((16, 24), (13, 9))])
def test_2d_resizes_equal_official_5d(src, dst):
    x = torch.randn(2, 14, *src, generator=torch.Generator().manual_seed(0))
    x5 = x.unsqueeze(2)  # the official (B, C, T=1, H, W)
    tri = F.interpolate(x5, size=(1, *dst), mode="trilinear", align_corners=False)[:, :, 0]
    bil = F.interpolate(x, size=dst, mode="bilinear", align_corners=False, antialias=False)
    # same maths; the two kernels may round differently in the last bit
    torch.testing.assert_close(bil, tri, rtol=1e-6, atol=1e-6)
    area5 = F.interpolate(x5, size=(1, *dst), mode="area")[:, :, 0]
    torch.testing.assert_close(F.interpolate(x, size=dst, mode="area"), area5, rtol=1e-6, atol=1e-6)
    # our next-scale resize is bit-identical to the official 5-D trilinear call
    assert torch.equal(BSQVAE.next_scale_input(x, dst), tri)
    assert torch.equal(BSQVAE.next_scale_input(x, (1, *dst)), tri)


def test_next_scale_input_is_bilinear_not_area():
    summed = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(3))
    out = BSQVAE.next_scale_input(summed, (6, 9))
    assert out.shape == (1, 4, 6, 9)
    assert not torch.allclose(out, F.interpolate(summed, size=(6, 9), mode="area"), atol=1e-3)
    assert not torch.allclose(
        out, F.interpolate(summed, size=(6, 9), mode="bilinear", antialias=True), atol=1e-3)


def test_sampler_style_accumulation_matches_codes_sum(tiny):
    """Accumulate like the sampler (spec 6.2 steps 5-6) and compare with codes_sum_from_bits."""
    model, _, schedule = tiny
    g = torch.Generator().manual_seed(4)
    bits = [torch.randint(0, 2, (2, hs, ws, model.bits), generator=g) for hs, ws in schedule]
    full = schedule[-1]
    summed = 0
    for si, b in enumerate(bits):
        codes = model.bits_to_codes(b)
        if si < len(bits) - 1:
            summed = summed + F.interpolate(codes.unsqueeze(2), size=(1, *full), mode="trilinear")[:, :, 0]
            nxt = model.next_scale_input(summed, schedule[si + 1])
            assert nxt.shape == (2, model.bits, *schedule[si + 1])
        else:
            summed = summed + codes
    torch.testing.assert_close(model.codes_sum_from_bits(bits), summed, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Loading


def _strip_wrappers(sd):
    """The checkpoint spelling without the wrapper level: `conv_in.conv.weight` -> `conv_in.weight`."""
    out = {}
    for k, v in sd.items():
        for w in (".conv.weight", ".conv.bias", ".norm.weight", ".norm.bias"):
            if k.endswith(w):
                k = k[: -len(w)] + "." + w.rsplit(".", 1)[1]
                break
        out[k] = v
    return out


def _clone(sd):
    return {k: v.clone() for k, v in sd.items()}


def test_normalize_accepts_unwrapped_spelling(tiny):
    model, img, schedule = tiny
    sd = model.state_dict()
    flat = _strip_wrappers(sd)
    assert "encoder.conv_in.weight" in flat and "encoder.down.0.downsample.conv.weight" in flat
    assert "decoder.up.1.upsample.conv.weight" in flat and "encoder.norm_out.weight" in flat
    del flat["quantize.lfq.mask"], flat["quantizer.lfq.mask"]  # derivable from codebook_dim
    norm = normalize_vae_state_dict(flat)
    assert sorted(norm) == sorted(sd)
    assert all(torch.equal(norm[k], sd[k]) for k in sd)
    assert normalize_vae_state_dict(sd).keys() == sd.keys()  # the wrapped spelling is kept

    loaded = BSQVAE.from_state_dict(_clone(flat))
    z = torch.randn(1, model.bits, 2, 3, generator=torch.Generator().manual_seed(5))
    x = img[:1, :, : 2 * model.downsample, : 3 * model.downsample]
    with torch.no_grad():
        assert torch.equal(loaded.decode(z), model.decode(z))
        assert torch.equal(loaded.encode_latent(x), model.encode_latent(x))


def test_normalize_fills_mask_alias():
    sd = BSQVAE(BSQVAEConfig.tiny(codebook_dim=6, patch_size=8)).state_dict()
    del sd["quantize.lfq.mask"]
    assert normalize_vae_state_dict(sd)["quantize.lfq.mask"].tolist() == [32, 16, 8, 4, 2, 1]


def test_normalize_rejects_both_spellings():
    sd = BSQVAE(BSQVAEConfig.tiny(codebook_dim=6, patch_size=8)).state_dict()
    sd["encoder.conv_in.weight"] = sd["encoder.conv_in.conv.weight"]
    with pytest.raises(CheckpointError, match="encoder.conv_in.conv.weight"):
        normalize_vae_state_dict(sd)


@pytest.mark.parametrize("case", list(TINY_CASES))
def test_from_state_dict_with_inferred_config(case):
    cfg = TINY_CASES[case][0]
    torch.manual_seed(7)
    model = BSQVAE(cfg).eval()
    _randomise_norms(model, 8)
    sd = _clone(model.state_dict())
    assert infer_vae_config(sd) == cfg
    loaded = BSQVAE.from_state_dict(sd)
    assert loaded.config == cfg and not loaded.training
    assert all(t.device.type == "cpu" for t in loaded.state_dict().values())
    # the tensors are assigned, not copied into fresh random weights
    assert loaded.decoder.conv_in.conv.weight.data_ptr() == sd["decoder.conv_in.conv.weight"].data_ptr()
    z = torch.randn(1, cfg.codebook_dim, 3, 4)
    with torch.no_grad():
        assert torch.equal(loaded.decode(z), model.decode(z))


def test_from_state_dict_dtype_cast():
    model = BSQVAE(BSQVAEConfig.tiny(codebook_dim=4, patch_size=8))
    loaded = BSQVAE.from_state_dict(_clone(model.state_dict()), dtype=torch.bfloat16)
    assert loaded.encoder.conv_in.conv.weight.dtype == torch.bfloat16
    assert loaded.quantizer.lfq.mask.dtype == torch.int64
    with torch.no_grad():
        h = loaded.encode_latent(torch.zeros(1, 3, 8, 8))
        out = loaded.decode(h)
    assert h.dtype == torch.float32 and out.dtype == torch.float32


@pytest.fixture
def tiny_sd():
    return BSQVAE(BSQVAEConfig.tiny(codebook_dim=6, patch_size=8)).state_dict()


def test_strict_load_missing_key(tiny_sd):
    del tiny_sd["decoder.up.2.block.1.conv1.conv.weight"]
    with pytest.raises(CheckpointError, match=r"1 missing key: decoder\.up\.2\.block\.1\.conv1\.conv\.weight"):
        BSQVAE.from_state_dict(tiny_sd)
    with pytest.raises(CheckpointError, match="missing"):  # never left as random/meta weights
        BSQVAE.from_state_dict(tiny_sd, strict=False)


def test_strict_load_unexpected_key(tiny_sd):
    tiny_sd["encoder.mid.attn_1.q.conv.weight"] = torch.zeros(32, 32, 1, 1)
    with pytest.raises(CheckpointError, match=r"unexpected key: encoder\.mid\.attn_1\.q\.conv\.weight"):
        BSQVAE.from_state_dict(tiny_sd)
    model = BSQVAE.from_state_dict(tiny_sd, strict=False)  # non-strict: extra keys ignored
    assert "encoder.mid.attn_1.q.conv.weight" not in model.state_dict()


def test_strict_load_shape_mismatch(tiny_sd):
    cfg = infer_vae_config(tiny_sd)
    tiny_sd["decoder.mid.block_1.conv2.conv.weight"] = torch.zeros(32, 32, 1, 1)
    with pytest.raises(CheckpointError, match=r"decoder\.mid\.block_1\.conv2\.conv\.weight \(checkpoint"):
        BSQVAE.from_state_dict(tiny_sd, config=cfg)
    # a config that does not match the weights is reported the same way
    with pytest.raises(CheckpointError, match=r"encoder\.conv_out\.conv\.weight"):
        BSQVAE.from_state_dict(tiny_sd, config=BSQVAEConfig.tiny(codebook_dim=7, patch_size=8))


def test_strict_load_caps_listing(tiny_sd):
    missing = [k for k in tiny_sd if k.startswith("decoder.")]
    for k in missing:
        del tiny_sd[k]
    with pytest.raises(CheckpointError) as err:
        BSQVAE.from_state_dict(tiny_sd)
    msg = str(err.value)
    assert f"{len(missing)} missing keys" in msg and f"and {len(missing) - 20} more" in msg
    assert sum(k in msg for k in missing) == 20


def test_wrong_mask_rejected(tiny_sd):
    tiny_sd["quantizer.lfq.mask"] = tiny_sd["quantizer.lfq.mask"].flip(0)
    tiny_sd["quantize.lfq.mask"] = tiny_sd["quantizer.lfq.mask"]
    with pytest.raises(CheckpointError, match="quantizer.lfq.mask"):
        BSQVAE.from_state_dict(tiny_sd)


def test_infer_config_errors():
    with pytest.raises(CheckpointError, match="encoder.conv_out.conv.weight"):
        infer_vae_config({"model.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="not a tensor"):
        normalize_vae_state_dict({"vae": {"a": torch.zeros(1)}})
