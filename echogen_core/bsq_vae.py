"""Infinity's BSQ VAE (binary spherical quantisation tokenizer), written from scratch.

The VAE turns an image in [-1, 1] into a raw latent h (B, d, H/p, W/p), quantises it residually over
a schedule of coarse-to-fine grids (one d-bit code per grid cell and scale), and decodes the sum of
the upsampled codes back to an image. Infinity's transformer predicts exactly these bits.

Conventions used throughout:
  B batch, d codebook_dim (= bits per latent position, "d_vae"), p patch_size (16 or 8),
  (H, W) full latent grid, (h, w) the grid of one scale.
  Codes are channels-first (B, d, h, w); bits are channels-last (B, h, w, d) with values {0, 1}.

The official model is video-capable and works on 5-D (B, C, T, H, W) tensors with T = 1; we work in
4-D. For T = 1 their 'trilinear' resize is a 'bilinear' one and their 3-D 'area' is a 2-D 'area'
(align_corners=False, no antialias); see `_resize` for why we still call the 3-D kernels.

state_dict() names are the official ones (e.g. ``encoder.conv_in.conv.weight``): the official code
wraps every Conv2d / GroupNorm in a small module, and we keep that extra level so released weights
load unchanged. ``normalize_vae_state_dict`` also accepts the spelling without that level.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import CheckpointError, InputError

__all__ = [
    "BSQVAEConfig",
    "BSQVAE",
    "normalize_vae_state_dict",
    "infer_vae_config",
]

_GROUP_CHOICES = (32, 16, 8, 4, 2, 1)


def _mask(d: int) -> torch.Tensor:
    """[2^(d-1), ..., 2, 1] as int64: the quantiser's bit weights, most significant bit first."""
    return 2 ** torch.arange(d - 1, -1, -1)


def _largest_group_count(channels: Sequence[int]) -> int:
    """The largest of 32, 16, ..., 1 that divides every channel count (32 for the real models)."""
    for g in _GROUP_CHOICES:
        if all(c % g == 0 for c in channels):
            return g
    return 1


# -------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class BSQVAEConfig:
    codebook_dim: int  # d: bits per latent position = channels of the latent
    patch_size: int = 16  # spatial stride; number of down/upsamplings = log2(patch_size)
    base_ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4)  # channels of level i = base_ch * ch_mult[i]
    num_res_blocks: int = 2  # per encoder level; the decoder uses one more
    norm_groups: int = 32
    in_channels: int = 3

    def __post_init__(self):
        # accept a list for ch_mult but store a tuple, so the config stays hashable
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        p = self.patch_size
        if p < 1 or p & (p - 1):
            raise ValueError(f"patch_size must be a power of two, got {p}")
        if not 0 <= self.num_down <= len(self.ch_mult) - 1:
            # the decoder upsamples at levels 1..log2(p), so it needs log2(p) < len(ch_mult)
            raise ValueError(f"patch_size {p} needs at least {self.num_down + 1} ch_mult levels, "
                             f"got {self.ch_mult}")
        if self.codebook_dim < 1 or self.num_res_blocks < 1 or self.base_ch < 1:
            raise ValueError(f"invalid BSQVAEConfig: {self}")
        bad = [c for c in self.channels if c % self.norm_groups]
        if bad:
            raise ValueError(f"norm_groups={self.norm_groups} does not divide channel counts {bad}")

    @property
    def num_down(self) -> int:
        return int(math.log2(self.patch_size))

    @property
    def channels(self) -> tuple[int, ...]:
        """Output channels of each level (encoder order)."""
        return tuple(self.base_ch * m for m in self.ch_mult)

    @classmethod
    def d32(cls) -> "BSQVAEConfig":
        """Infinity 2B tokenizer, infinity_vae_d32reg.pth: stride 16, 32 bits."""
        return cls(codebook_dim=32, patch_size=16, ch_mult=(1, 2, 4, 4, 4))

    @classmethod
    def d14_patchify(cls) -> "BSQVAEConfig":
        """Infinity 8B tokenizer, infinity_vae_d56_f8_14_patchify.pth: stride 8, 14 bits."""
        return cls(codebook_dim=14, patch_size=8, ch_mult=(1, 2, 4, 4))

    @classmethod
    def tiny(cls, codebook_dim: int = 8, patch_size: int = 16) -> "BSQVAEConfig":
        """A small model with the real layout (same key pattern, nin_shortcuts, levels) for tests.

        norm_groups follows the same rule as ``infer_vae_config`` so a tiny state dict round-trips
        through inference to an identical config.
        """
        n_down = int(math.log2(patch_size))
        ch_mult = (1,) + (2,) * n_down  # channels 16, 32, 32, ...: exercises nin_shortcut
        base_ch = 16
        groups = _largest_group_count([base_ch * m for m in ch_mult])
        return cls(codebook_dim=codebook_dim, patch_size=patch_size, base_ch=base_ch,
                   ch_mult=ch_mult, num_res_blocks=2, norm_groups=groups)


# -------------------------------------------------------------------------------------------------
# Building blocks. Conv / Norm exist only to reproduce the official `.conv.` / `.norm.` key level.


def swish(x: torch.Tensor) -> torch.Tensor:
    # written out rather than F.silu: same maths, and the same low bits as the official model
    return x * torch.sigmoid(x)


class Conv(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding)

    def forward(self, x):
        return self.conv(x)


class Norm(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6, affine=True)

    def forward(self, x):
        return self.norm(x)


class ResnetBlock(nn.Module):
    """GN -> swish -> conv3x3 -> GN -> swish -> conv3x3, plus a 1x1 shortcut if channels change."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = Norm(c_in, groups)
        self.conv1 = Conv(c_in, c_out, 3, padding=1)
        self.norm2 = Norm(c_out, groups)
        self.conv2 = Conv(c_out, c_out, 3, padding=1)
        self.nin_shortcut = Conv(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x):  # (B, c_in, H, W) -> (B, c_out, H, W)
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    """Halve H and W: zero-pad right/bottom by one, then a 3x3 stride-2 conv without padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):  # (B, C, H, W) -> (B, C, H/2, W/2)
        # asymmetric padding: torch convs only pad symmetrically, so pad by hand
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv(channels, channels, 3, padding=1)

    def forward(self, x):  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Mid(nn.Module):
    """Two ResnetBlocks at the bottleneck (the official attention block is off: cnn_attention='no')."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x):
        return self.block_2(self.block_1(x))


class Level(nn.Module):
    """One resolution level: a list of ResnetBlocks and optionally a down- or upsampler."""

    def __init__(self, c_in: int, c_out: int, n_blocks: int, groups: int, resample: str | None):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(c_in if j == 0 else c_out, c_out, groups) for j in range(n_blocks))
        self.downsample = Downsample(c_out) if resample == "down" else None
        self.upsample = Upsample(c_out) if resample == "up" else None

    def forward(self, x):
        for blk in self.block:
            x = blk(x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class Encoder(nn.Module):
    """(B, 3, H*p, W*p) image -> (B, d, H, W) raw latent (not normalised)."""

    def __init__(self, cfg: BSQVAEConfig):
        super().__init__()
        chs, g = cfg.channels, cfg.norm_groups
        self.conv_in = Conv(cfg.in_channels, cfg.base_ch, 3, padding=1)
        c_ins = (cfg.base_ch,) + chs[:-1]
        self.down = nn.ModuleList(
            Level(c_ins[i], chs[i], cfg.num_res_blocks, g, "down" if i < cfg.num_down else None)
            for i in range(len(chs)))
        self.mid = Mid(chs[-1], g)
        self.norm_out = Norm(chs[-1], g)
        self.conv_out = Conv(chs[-1], cfg.codebook_dim, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)  # (B, base_ch, H*p, W*p)
        for level in self.down:
            h = level(h)  # each of the first log2(p) levels halves H and W
        h = self.mid(h)  # (B, C_top, H, W)
        return self.conv_out(swish(self.norm_out(h)))  # (B, d, H, W)


class Decoder(nn.Module):
    """(B, d, H, W) summed codes -> (B, 3, H*p, W*p) image (unclamped)."""

    def __init__(self, cfg: BSQVAEConfig):
        super().__init__()
        chs, g, n = cfg.channels, cfg.norm_groups, len(cfg.channels)
        self.conv_in = Conv(cfg.codebook_dim, chs[-1], 3, padding=1)
        self.mid = Mid(chs[-1], g)
        # level i takes the channels of level i+1 (the top level its own) and upsamples when
        # 1 <= i <= log2(p); `up` is indexed by level but runs from the top (i = n-1) down to 0
        c_ins = chs[1:] + (chs[-1],)
        self.up = nn.ModuleList(
            Level(c_ins[i], chs[i], cfg.num_res_blocks + 1, g,
                  "up" if 1 <= i <= cfg.num_down else None)
            for i in range(n))
        self.norm_out = Norm(chs[0], g)
        self.conv_out = Conv(chs[0], cfg.in_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))  # (B, C_top, H, W)
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(swish(self.norm_out(h)))  # (B, 3, H*p, W*p)


# -------------------------------------------------------------------------------------------------
# Quantiser


class BSQ(nn.Module):
    """Binary spherical quantisation of one scale: a d-vector -> its sign pattern on the unit sphere.

    Every code is a d-vector with entries +-1/sqrt(d), so all codes have unit norm.
    """

    def __init__(self, codebook_dim: int):
        super().__init__()
        self.dim = codebook_dim
        self.scale = 1.0 / math.sqrt(codebook_dim)  # s
        # bit weights, MSB first: converts between bit vectors and integer ids (unused for bit
        # labels, but part of the official state dict)
        self.register_buffer("mask", _mask(codebook_dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, d, h, w) -> quantised q (B, d, h, w) with entries +-s, bits (B, h, w, d) uint8."""
        # channels-last *storage*, as in the official code: q keeps it, and the CPU resize kernels
        # round differently for channels-last inputs (see _resize)
        z = F.normalize(_dense(x.permute(0, 2, 3, 1).contiguous()), dim=-1)  # (B, h, w, d)
        bits = z > 0
        zhat = torch.where(bits, self.scale, -self.scale).to(z.dtype)
        q = z + (zhat - z).detach()  # straight-through estimator: value zhat, gradient of z
        return q.permute(0, 3, 1, 2), bits.to(torch.uint8)

    def bits_to_codes(self, bits: torch.Tensor) -> torch.Tensor:
        """bits (B, h, w, d) in {0, 1} (any dtype) -> codes (B, d, h, w) float32."""
        s = self.scale
        codes = _dense(bits).float() * s * 2 - s  # (B, h, w, d), entries +-s
        # The official code re-normalises here. It is a no-op mathematically, but in float32 it
        # moves some entries by one ulp for d = 14 and d = 32; keep it for bit-exact sampling.
        codes = F.normalize(codes, dim=-1)
        return codes.permute(0, 3, 1, 2)

    @staticmethod
    def codes_to_bits(codes: torch.Tensor) -> torch.Tensor:
        """codes (B, d, h, w) -> bits (B, h, w, d) uint8, bit = code > 0."""
        return (codes > 0).permute(0, 2, 3, 1).to(torch.uint8)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """t made contiguous with the standard strides, also on size-1 dims.

    torch ignores the stride of a size-1 dim when it checks contiguity, but the resize kernels use
    it to pick their memory-format path (see _resize); this pins it to what the official code has.
    A non-contiguous t (e.g. bits permuted after pixel_shuffle) keeps its layout, as officially.
    """
    return t.reshape(-1).view(t.shape) if t.is_contiguous() else t


def _grid(size) -> tuple[int, int]:
    """Accept (h, w) or the official (t, h, w) with t = 1."""
    size = tuple(int(v) for v in size)
    if len(size) == 3:
        if size[0] != 1:
            raise InputError(f"BSQ VAE works on images: a scale's time extent must be 1, got {size}")
        size = size[1:]
    if len(size) != 2 or min(size) < 1:
        raise InputError(f"a scale must be (h, w) with h, w >= 1, got {size}")
    return size


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize (B, C, h, w) -> (B, C, *size) with 'bilinear' or 'area' (align_corners=False).

    Mathematically this is F.interpolate in 2-D. We run it through the 3-D kernel on a unit time
    axis ('bilinear' -> 'trilinear') because that is the official computation, and the bilinear and
    trilinear kernels round differently (~1 ulp). For the same reason the memory layout of x is
    left alone (codes are channels-last in storage, as officially): on CPU the channels-last and
    contiguous trilinear kernels also differ by ~1 ulp. Together this keeps bits, code sums and
    next-scale inputs bit-identical to the official tokenizer and sampler.
    """
    mode3d = {"bilinear": "trilinear", "area": "area"}[mode]
    return F.interpolate(x.unsqueeze(2), size=(1, *size), mode=mode3d).squeeze(2)


def _resize_up(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsample to the full grid; identity when already there (as the official code)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return _resize(x, size, "bilinear")


class MultiScaleBSQ(nn.Module):
    """Residual BSQ over a schedule of grids, coarse to fine, ending at the full latent grid."""

    def __init__(self, codebook_dim: int):
        super().__init__()
        self.lfq = BSQ(codebook_dim)

    def forward(self, h: torch.Tensor, scale_schedule) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """h (B, d, H, W) raw latent -> (summed codes (B, d, H, W), bits [(B, h_s, w_s, d)])."""
        full = tuple(h.shape[-2:])
        schedule = [_grid(s) for s in scale_schedule]
        if not schedule or schedule[-1] != full:
            raise InputError(f"the scale schedule must end at the latent grid {full}, "
                             f"got {schedule[-1:] or 'an empty schedule'}")
        residual, summed, bits = h, 0, []
        for size in schedule:
            # what the coarser scales have not explained yet, averaged onto this grid
            r = residual if size == full else _resize(residual, size, "area")
            q, b = self.lfq(r)  # (B, d, h_s, w_s), (B, h_s, w_s, d)
            q = _resize_up(q, full)  # (B, d, H, W)
            residual = residual - q.detach()
            summed = summed + q
            bits.append(b)
        return summed.contiguous(), bits  # contiguous like the official output


# -------------------------------------------------------------------------------------------------
# The VAE


class BSQVAE(nn.Module):
    def __init__(self, config: BSQVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantizer = MultiScaleBSQ(config.codebook_dim)
        # the official model registers the quantiser a second time under this name, so its
        # state dict carries `quantize.lfq.mask` as well; keep the alias for identical keys
        self.quantize = self.quantizer

    @property
    def bits(self) -> int:
        return self.config.codebook_dim

    @property
    def downsample(self) -> int:
        return self.config.patch_size

    # -- encoding -------------------------------------------------------------------------------

    def encode_latent(self, img: torch.Tensor) -> torch.Tensor:
        """img (B, 3, H, W) in [-1, 1] -> raw latent h (B, d, H/p, W/p) float32."""
        if img.ndim != 4 or img.shape[1] != self.config.in_channels:
            raise InputError(f"expected an image batch (B, {self.config.in_channels}, H, W), "
                             f"got shape {tuple(img.shape)}")
        p = self.config.patch_size
        if img.shape[-2] % p or img.shape[-1] % p:
            raise InputError(f"image size {tuple(img.shape[-2:])} must be a multiple of {p} "
                             f"for this VAE; resize or crop it first")
        w = self.encoder.conv_in.conv.weight
        return self.encoder(img.to(device=w.device, dtype=w.dtype)).float()

    def quantize_multiscale(self, h: torch.Tensor, scale_schedule):
        """h (B, d, H, W) -> (summed codes (B, d, H, W) float32, bits [(B, h_s, w_s, d) uint8]).

        scale_schedule: [(h_s, w_s), ...] (or (1, h_s, w_s)), coarse to fine, ending at (H, W).
        The sum carries straight-through values, so it equals codes_sum_from_bits(bits) up to
        float rounding (~1e-7) and is differentiable with respect to h.
        """
        return self.quantizer(h.float(), scale_schedule)

    def encode_bits(self, img: torch.Tensor, scale_schedule) -> list[torch.Tensor]:
        """img (B, 3, H, W) -> per-scale bits [(B, h_s, w_s, d) uint8]."""
        return self.quantize_multiscale(self.encode_latent(img), scale_schedule)[1]

    # -- codes <-> bits -------------------------------------------------------------------------

    def bits_to_codes(self, bits: torch.Tensor) -> torch.Tensor:
        """bits (B, h, w, d) in {0, 1} -> codes (B, d, h, w) float32, entries +-1/sqrt(d)."""
        return self.quantizer.lfq.bits_to_codes(bits)

    def codes_to_bits(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, d, h, w) -> bits (B, h, w, d) uint8."""
        return self.quantizer.lfq.codes_to_bits(codes)

    def codes_sum_from_bits(self, bits_list: Sequence[torch.Tensor], full_size=None) -> torch.Tensor:
        """Sum of the bilinearly upsampled codes of every scale -> (B, d, H, W) float32.

        full_size defaults to the grid of the last scale.
        """
        if not bits_list:
            raise InputError("codes_sum_from_bits needs at least one scale of bits")
        full = _grid(full_size) if full_size is not None else tuple(bits_list[-1].shape[1:3])
        summed = 0
        for b in bits_list:
            summed = summed + _resize_up(self.bits_to_codes(b), full)
        return summed

    @staticmethod
    def next_scale_input(summed_codes: torch.Tensor, size) -> torch.Tensor:
        """Resize the running code sum (B, d, H, W) to the next scale's grid (B, d, h, w).

        This is a *down*sample done with bilinear interpolation, no antialias, as in the official
        sampler and training (bitwise self-correction); area resizing here would be wrong.
        """
        return _resize(summed_codes, _grid(size), "bilinear")

    # -- decoding -------------------------------------------------------------------------------

    def decode(self, summed_codes: torch.Tensor) -> torch.Tensor:
        """summed codes (B, d, H, W) -> image (B, 3, H*p, W*p) float32 in [-1, 1]."""
        w = self.decoder.conv_in.conv.weight
        x = self.decoder(summed_codes.to(device=w.device, dtype=w.dtype))
        return x.float().clamp(-1, 1)

    def decode_bits(self, bits_list: Sequence[torch.Tensor]) -> torch.Tensor:
        """per-scale bits [(B, h_s, w_s, d)] (last = full latent grid) -> image (B, 3, H, W)."""
        return self.decode(self.codes_sum_from_bits(bits_list))

    # -- loading --------------------------------------------------------------------------------

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], strict: bool = True,
                        config: BSQVAEConfig | None = None,
                        dtype: torch.dtype | None = None) -> "BSQVAE":
        """Build a VAE around the tensors of `state_dict` (the inner "vae" dict of a checkpoint).

        Either wrapper spelling is accepted (see normalize_vae_state_dict). The config is inferred
        from the tensors unless given. The model is built on the meta device and the tensors are
        assigned, not copied. Missing keys and shape mismatches always raise CheckpointError;
        unexpected keys raise too unless strict=False. `dtype` casts floating tensors first.
        """
        sd = normalize_vae_state_dict(state_dict)
        if config is None:
            config = infer_vae_config(sd)
        with torch.device("meta"):
            model = cls(config)
        expected = model.state_dict()

        missing = [k for k in expected if k not in sd]
        unexpected = [k for k in sd if k not in expected]
        mismatched = [f"{k} (checkpoint {tuple(sd[k].shape)}, model {tuple(expected[k].shape)})"
                      for k in expected if k in sd and sd[k].shape != expected[k].shape]
        problems = []
        if missing:
            problems.append(_listing("missing key", missing))
        if unexpected and strict:
            problems.append(_listing("unexpected key", unexpected))
        if mismatched:
            problems.append(_listing("shape mismatch", mismatched, plural="shape mismatches"))
        if not problems:
            # the mask is derivable, so a different one means a different (unknown) model
            want = _mask(config.codebook_dim)
            for k in _MASK_KEYS:
                if sd[k].device.type != "meta" and not torch.equal(sd[k].cpu().long(), want):
                    problems.append(f"{k} is {sd[k].tolist()}, expected {want.tolist()}")
        if problems:
            raise CheckpointError(
                f"BSQ VAE weights do not match {config}: " + "; ".join(problems)
                + ". Check that this is an Infinity BSQ VAE checkpoint (its inner 'vae' dict) "
                  "and that it matches the selected model.")

        sd = {k: sd[k] for k in expected}
        if dtype is not None:
            sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        model.load_state_dict(sd, strict=True, assign=True)
        return model.eval()


def _listing(what: str, names: Sequence[str], plural: str | None = None, cap: int = 20) -> str:
    head = ", ".join(names[:cap])
    more = f" and {len(names) - cap} more" if len(names) > cap else ""
    return f"{len(names)} {what if len(names) == 1 else (plural or what + 's')}: {head}{more}"


# -------------------------------------------------------------------------------------------------
# State-dict helpers (pure functions, no file IO)

_CONV_LEAVES = {"conv_in", "conv_out", "conv1", "conv2", "nin_shortcut"}
_NORM_LEAVES = {"norm1", "norm2", "norm_out"}
_MASK_KEYS = ("quantizer.lfq.mask", "quantize.lfq.mask")


def _wrapped_name(key: str) -> str:
    """`...conv_in.weight` -> `...conv_in.conv.weight`, `...norm1.bias` -> `...norm1.norm.bias`.

    Names already in the wrapped spelling come back unchanged.
    """
    *path, param = key.split(".")
    if param not in ("weight", "bias") or not path:
        return key
    if path[-1] in _CONV_LEAVES or path[-2:] in (["downsample", "conv"], ["upsample", "conv"]):
        return ".".join(path + ["conv", param])
    if path[-1] in _NORM_LEAVES:
        return ".".join(path + ["norm", param])
    return key


def normalize_vae_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return the state dict in the official wrapped spelling, with both quantiser mask aliases.

    Accepts names with or without the `.conv` / `.norm` wrapper level (the official loader does the
    same). A missing mask (or alias) is filled in: it only depends on codebook_dim.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"VAE state dict entry {key!r} is a {type(value).__name__}, "
                                  f"not a tensor; pass the inner 'vae' dict of the checkpoint")
        new = _wrapped_name(key)
        if new in out:
            raise CheckpointError(f"VAE state dict holds {new!r} twice (under both spellings, "
                                  f"e.g. {key!r}); the file is ambiguous")
        out[new] = value

    present = [k for k in _MASK_KEYS if k in out]
    if present:
        for k in _MASK_KEYS:
            out.setdefault(k, out[present[0]])
    elif "encoder.conv_out.conv.weight" in out:
        mask = _mask(out["encoder.conv_out.conv.weight"].shape[0])
        for k in _MASK_KEYS:
            out[k] = mask
    return out


def infer_vae_config(state_dict: Mapping[str, torch.Tensor]) -> BSQVAEConfig:
    """Read the architecture off the tensor shapes (either spelling; meta tensors are fine)."""
    sd = normalize_vae_state_dict(state_dict)

    def need(key: str) -> torch.Tensor:
        if key not in sd:
            raise CheckpointError(f"cannot read the BSQ VAE architecture: key {key!r} is missing; "
                                  f"is this the inner 'vae' dict of an Infinity VAE checkpoint?")
        return sd[key]

    d = need("encoder.conv_out.conv.weight").shape[0]
    base_ch, in_ch = need("encoder.conv_in.conv.weight").shape[:2]
    down = re.compile(r"encoder\.down\.(\d+)\.(?:block\.(\d+)|(downsample))\.")
    levels, blocks, n_down = set(), set(), 0
    for k in sd:
        m = down.match(k)
        if m:
            levels.add(int(m[1]))
            if m[2] is not None and m[1] == "0":
                blocks.add(int(m[2]))
            if m[3] is not None and k.endswith(".weight"):
                n_down += 1
    if not levels or levels != set(range(len(levels))):
        raise CheckpointError(f"cannot read the BSQ VAE architecture: encoder levels {sorted(levels)}")
    chs = [need(f"encoder.down.{i}.block.0.conv1.conv.weight").shape[0] for i in sorted(levels)]
    if any(c % base_ch for c in chs):
        raise CheckpointError(f"encoder channels {chs} are not multiples of base_ch {base_ch}")
    try:
        return BSQVAEConfig(
            codebook_dim=int(d),
            patch_size=2 ** n_down,
            base_ch=int(base_ch),
            ch_mult=tuple(c // base_ch for c in chs),
            num_res_blocks=len(blocks),
            norm_groups=_largest_group_count(chs),
            in_channels=int(in_ch),
        )
    except ValueError as e:
        raise CheckpointError(f"the BSQ VAE weights describe an unsupported architecture: {e}") from e
