"""FLUX.1 VAE encoder: EchoGen's content encoder (spec sections 1.3 and 0, defect 4).

EchoGen encodes the prepared subject reference (512x512 for the 2B model, 256x256 for the small one) with the
encoder half of the FLUX.1 AutoencoderKL and keeps the posterior MEAN: no sampling, no 0.3611 scale, no 0.1159
shift.  The latent (B, 16, H/8, W/8) is flattened row-major into (B, H/8 * W/8, 16) content tokens, which the
content MLP projects to the transformer width.  The official inference script samples instead (`.sample()`),
while training used `.mode()`; the mean is what the model was trained on, so the mean is what we use.

Architecture (FLUX.1 `ae`, identical in BFL's `flux` repo and diffusers' `AutoencoderKL`)::

    x (B, 3, H, W) in [-1, 1]
    conv_in 3x3                         -> (B, 128, H,   W)
    level 0: 2 x ResnetBlock(128->128)  -> Downsample -> (B, 128, H/2, W/2)
    level 1: 2 x ResnetBlock(128->256)  -> Downsample -> (B, 256, H/4, W/4)
    level 2: 2 x ResnetBlock(256->512)  -> Downsample -> (B, 512, H/8, W/8)
    level 3: 2 x ResnetBlock(512->512)               -> (B, 512, H/8, W/8)
    mid: ResnetBlock, single-head spatial self-attention, ResnetBlock
    GroupNorm, swish, conv_out 3x3      -> (B, 32, H/8, W/8) = [mean (16) | logvar (16)]

ResnetBlock: GroupNorm(32, eps 1e-6) -> swish -> conv3x3 -> GroupNorm -> swish -> conv3x3, plus the input (through a
1x1 `nin_shortcut` when the channel count changes).  Downsample: zero pad right and bottom by one pixel, then a 3x3
stride-2 convolution without padding.  Attention: GroupNorm, q/k/v as 1x1 convolutions, softmax(q k^T / sqrt(C)) v
over the H*W positions with one head of width C, 1x1 `proj_out`, residual add.  SD-style VAEs add a 1x1
`quant_conv` on the 2z moments; FLUX.1 has none, but a file that carries one gets it applied.

Parameter names follow BFL's single-file `ae.safetensors` (the "ldm" layout).  The diffusers layout
(`vae/diffusion_pytorch_model.safetensors`) is converted on load; decoder weights are ignored on purpose.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import build_from_state_dict, read_file, unwrap_state_dict
from .errors import CheckpointError, InputError

__all__ = [
    "FLUX_LATENT_CHANNELS",
    "FLUX_VAE_SOURCE_HINT",
    "FluxVAEConfig",
    "FluxVAEEncoder",
    "latent_to_content_tokens",
    "load_flux_vae_encoder",
    "encoder_state_dict_to_ldm",
    "encoder_state_dict_to_diffusers",
    "infer_flux_vae_config",
]

FLUX_LATENT_CHANNELS = 16
NORM_EPS = 1e-6
# Scale and shift that FLUX's diffusion model applies; EchoGen does NOT apply them (kept for messages only).
FLUX_SCALING_FACTOR, FLUX_SHIFT_FACTOR = 0.3611, 0.1159
FLUX_VAE_SOURCE_HINT = (
    "Use the 16-channel FLUX.1 VAE: `ae.safetensors` from black-forest-labs/FLUX.1-schnell (Apache-2.0) or "
    "FLUX.1-dev, or the `vae/` folder of black-forest-labs/FLUX.1-dev (config.json + "
    "diffusion_pytorch_model.safetensors)"
)


# --------------------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class FluxVAEConfig:
    in_channels: int = 3
    ch: int = 128                       # width of conv_in / level 0
    ch_mult: tuple = (1, 2, 4, 4)       # level i has ch * ch_mult[i] channels; a Downsample after all but the last
    num_res_blocks: int = 2             # ResnetBlocks per level
    z_channels: int = 16                # latent channels; conv_out emits 2 * z_channels (mean, logvar)
    norm_groups: int = 32               # GroupNorm groups everywhere (FLUX hard-codes 32)
    use_quant_conv: bool = False        # SD-style 1x1 conv on the moments; FLUX.1 has none

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        bad = [c for c in self.level_channels if c % self.norm_groups]
        if bad:
            raise ValueError(f"FluxVAEConfig: norm_groups={self.norm_groups} does not divide channels {bad}.")

    @classmethod
    def flux(cls, **overrides) -> "FluxVAEConfig":
        """The FLUX.1 `ae` encoder (dev, schnell, Krea, Kontext all share it): 34.3 M parameters."""
        return replace(cls(), **overrides)

    @classmethod
    def tiny(cls, **overrides) -> "FluxVAEConfig":
        """Same layout and key names as flux(), a quarter of the width: for tests."""
        return replace(cls(ch=32), **overrides)

    @property
    def level_channels(self) -> tuple:
        return tuple(self.ch * m for m in self.ch_mult)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


# --------------------------------------------------------------------------------------------------------------
# Layers


def _norm(cfg: FluxVAEConfig, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.norm_groups, channels, eps=NORM_EPS, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cfg: FluxVAEConfig, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = _norm(cfg, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(cfg, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x):                                           # (B, c_in, h, w) -> (B, c_out, h, w)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    """Halve H and W: zero pad (left 0, right 1, top 0, bottom 1), then a 3x3 stride-2 conv with no padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):                                           # (B, C, h, w) -> (B, C, h/2, w/2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, channels as the head width, residual."""

    def __init__(self, cfg: FluxVAEConfig, channels: int):
        super().__init__()
        self.norm = _norm(cfg, channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):                                           # (B, C, h, w) -> (B, C, h, w)
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (conv(y).flatten(2).transpose(1, 2).unsqueeze(1) for conv in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)                 # (B, 1, h*w, C), scale 1/sqrt(C)
        y = y.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(y)


class _Level(nn.Module):
    def __init__(self, cfg: FluxVAEConfig, c_in: int, c_out: int, downsample: bool):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cfg, c_in if j == 0 else c_out, c_out)
                                   for j in range(cfg.num_res_blocks))
        self.downsample = Downsample(c_out) if downsample else None


class _Mid(nn.Module):
    def __init__(self, cfg: FluxVAEConfig, c: int):
        super().__init__()
        self.block_1 = ResnetBlock(cfg, c, c)
        self.attn_1 = AttnBlock(cfg, c)
        self.block_2 = ResnetBlock(cfg, c, c)


class _Encoder(nn.Module):
    """Parameter names exactly as under `encoder.` in BFL's ae.safetensors."""

    def __init__(self, cfg: FluxVAEConfig):
        super().__init__()
        chans = cfg.level_channels
        n = len(chans)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList(_Level(cfg, cfg.ch if i == 0 else chans[i - 1], chans[i], downsample=i < n - 1)
                                  for i in range(n))
        self.mid = _Mid(cfg, chans[-1])
        self.norm_out = _norm(cfg, chans[-1])
        self.conv_out = nn.Conv2d(chans[-1], 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x):                                           # (B, 3, H, W) -> (B, 2z, H/f, W/f)
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if level.downsample is not None:
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


# --------------------------------------------------------------------------------------------------------------
# The encoder


class FluxVAEEncoder(nn.Module):
    """FLUX.1 VAE encoder returning the posterior mean.  State-dict keys: `encoder.*` (+ `quant_conv.*`)."""

    def __init__(self, cfg: Optional[FluxVAEConfig] = None):
        super().__init__()
        self.cfg = cfg = cfg or FluxVAEConfig.flux()
        self.encoder = _Encoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1) if cfg.use_quant_conv else None
        self.load_notes: list = []

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.conv_in.weight.device

    def _check_images(self, x, what: str):
        if not isinstance(x, torch.Tensor):
            raise InputError(f"{what} must be a torch.Tensor, got {type(x).__name__}.")
        c = self.cfg.in_channels
        if x.dim() != 4 or x.shape[1] != c:
            hint = (" It looks channels-last (ComfyUI IMAGE layout); use images.permute(0, 3, 1, 2)."
                    if x.dim() == 4 and x.shape[-1] == c else "")
            raise InputError(f"{what} must have shape (batch, {c}, height, width), got {tuple(x.shape)}.{hint}")
        f = self.cfg.downsample_factor
        h, w = x.shape[-2:]
        if h % f or w % f:
            raise InputError(
                f"{what} is {h}x{w} (HxW); the FLUX VAE needs height and width that are multiples of {f}. "
                f"Resize or center-crop it, e.g. to {h - h % f or f}x{w - w % f or f} "
                "(EchoGen uses 512x512, or 256x256 for the small model).")
        if not x.is_floating_point():
            raise InputError(f"{what} must be a floating-point tensor, got {x.dtype}.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) in [-1, 1] -> posterior mean (B, z, H/8, W/8) in the module's dtype."""
        self._check_images(x, "The VAE input")
        moments = self.encoder(x.to(device=self.device, dtype=self.dtype))    # (B, 2z, H/8, W/8)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, _logvar = moments.chunk(2, dim=1)
        return mean

    @torch.no_grad()
    def encode(self, images01: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] -> mean latent (B, 16, H/8, W/8), float32, raw (no scale, no shift)."""
        self._check_images(images01, "The reference image")
        lo, hi = images01.amin().item(), images01.amax().item()
        if not (lo >= -1e-3 and hi <= 1 + 1e-3):
            raise InputError(f"encode() expects images in [0, 1]; got values in [{lo:.3g}, {hi:.3g}]. "
                             "If they are already in [-1, 1], call the module directly (forward).")
        return self(images01 * 2 - 1).float()

    def content_tokens(self, images01: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] -> EchoGen content tokens (B, (H/8)*(W/8), 16), float32."""
        return latent_to_content_tokens(self.encode(images01))


def latent_to_content_tokens(latent: torch.Tensor) -> torch.Tensor:
    """(B, 16, h, w) raw FLUX latent mean -> (B, h*w, 16); token r*w + c is latent[:, :, r, c] (row-major)."""
    if not isinstance(latent, torch.Tensor) or latent.dim() != 4:
        shape = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
        raise InputError(f"A FLUX latent must have shape (batch, 16, h, w), got {shape}.")
    if latent.shape[1] != FLUX_LATENT_CHANNELS:
        raise InputError(f"EchoGen's content tokens come from the 16-channel FLUX.1 VAE latent; this latent has "
                         f"{latent.shape[1]} channels (shape {tuple(latent.shape)}). {FLUX_VAE_SOURCE_HINT}.")
    return latent.flatten(2).transpose(1, 2).contiguous()


# --------------------------------------------------------------------------------------------------------------
# Key layouts.  ldm (BFL ae.safetensors) is canonical; diffusers names are mapped onto it.

# (diffusers pattern, ldm replacement), applied to keys under "encoder."; first match wins.
_DIFFUSERS_TO_LDM = [
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.conv_shortcut\.", r"encoder.down.\1.block.\2.nin_shortcut."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r"encoder.down.\1.downsample.conv."),
    (r"^encoder\.mid_block\.resnets\.0\.", r"encoder.mid.block_1."),
    (r"^encoder\.mid_block\.resnets\.1\.", r"encoder.mid.block_2."),
    (r"^encoder\.mid_block\.attentions\.0\.group_norm\.", r"encoder.mid.attn_1.norm."),
    (r"^encoder\.mid_block\.attentions\.0\.(?:to_q|query)\.", r"encoder.mid.attn_1.q."),
    (r"^encoder\.mid_block\.attentions\.0\.(?:to_k|key)\.", r"encoder.mid.attn_1.k."),
    (r"^encoder\.mid_block\.attentions\.0\.(?:to_v|value)\.", r"encoder.mid.attn_1.v."),
    (r"^encoder\.mid_block\.attentions\.0\.(?:to_out\.0|proj_attn)\.", r"encoder.mid.attn_1.proj_out."),
    (r"^encoder\.conv_norm_out\.", r"encoder.norm_out."),
]
_LDM_TO_DIFFUSERS = [
    (r"^encoder\.down\.(\d+)\.block\.(\d+)\.nin_shortcut\.", r"encoder.down_blocks.\1.resnets.\2.conv_shortcut."),
    (r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
    (r"^encoder\.down\.(\d+)\.downsample\.conv\.", r"encoder.down_blocks.\1.downsamplers.0.conv."),
    (r"^encoder\.mid\.block_1\.", r"encoder.mid_block.resnets.0."),
    (r"^encoder\.mid\.block_2\.", r"encoder.mid_block.resnets.1."),
    (r"^encoder\.mid\.attn_1\.norm\.", r"encoder.mid_block.attentions.0.group_norm."),
    (r"^encoder\.mid\.attn_1\.q\.", r"encoder.mid_block.attentions.0.to_q."),
    (r"^encoder\.mid\.attn_1\.k\.", r"encoder.mid_block.attentions.0.to_k."),
    (r"^encoder\.mid\.attn_1\.v\.", r"encoder.mid_block.attentions.0.to_v."),
    (r"^encoder\.mid\.attn_1\.proj_out\.", r"encoder.mid_block.attentions.0.to_out.0."),
    (r"^encoder\.norm_out\.", r"encoder.conv_norm_out."),
]
_LDM_ATTN_PROJ = re.compile(r"^encoder\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")
_DIFFUSERS_ATTN_PROJ = re.compile(r"^encoder\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def _rename(key: str, table) -> str:
    for pattern, repl in table:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def encoder_state_dict_to_ldm(sd: dict) -> dict:
    """Rename diffusers encoder keys to BFL/ldm names (attention Linear (C, C) -> 1x1 conv (C, C, 1, 1)).

    Keys that are already ldm-style, decoder keys and `quant_conv.*` pass through unchanged."""
    out = {}
    for key, t in sd.items():
        new = _rename(key, _DIFFUSERS_TO_LDM) if key.startswith("encoder.") else key
        if _LDM_ATTN_PROJ.match(new) and t.dim() in (2, 3):
            t = t.reshape(*t.shape[:2], 1, 1)
        out[new] = t
    return out


def encoder_state_dict_to_diffusers(sd: dict) -> dict:
    """Inverse of `encoder_state_dict_to_ldm`: BFL/ldm encoder names -> diffusers names (1x1 conv -> Linear)."""
    out = {}
    for key, t in sd.items():
        new = _rename(key, _LDM_TO_DIFFUSERS) if key.startswith("encoder.") else key
        if _DIFFUSERS_ATTN_PROJ.match(new) and t.dim() == 4:
            t = t.reshape(t.shape[0], t.shape[1])
        out[new] = t
    return out


def _layout(sd: dict) -> str:
    diffusers = any(k.startswith(("encoder.down_blocks.", "encoder.mid_block.", "encoder.conv_norm_out."))
                    for k in sd)
    ldm = any(k.startswith(("encoder.down.", "encoder.mid.", "encoder.norm_out.")) for k in sd)
    if diffusers and ldm:
        return "mixed"
    return "diffusers" if diffusers else "ldm"


# --------------------------------------------------------------------------------------------------------------
# Loading


def _need(sd: dict, key: str, path: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"{path} does not hold a complete FLUX.1 VAE encoder: `{key}` is missing. "
                              f"{FLUX_VAE_SOURCE_HINT}.")
    return sd[key]


def infer_flux_vae_config(sd: dict, path: str = "state dict", norm_groups: int = 32) -> FluxVAEConfig:
    """Read widths, depth and latent channels off an ldm-layout encoder state dict."""
    w_in = _need(sd, "encoder.conv_in.weight", path)
    w_out = _need(sd, "encoder.conv_out.weight", path)
    if w_in.dim() != 4 or w_out.dim() != 4 or w_out.shape[0] % 2:
        raise CheckpointError(f"{path}: encoder.conv_in / conv_out have shapes {tuple(w_in.shape)} / "
                              f"{tuple(w_out.shape)}, not those of a KL autoencoder.")
    z = w_out.shape[0] // 2
    if z != FLUX_LATENT_CHANNELS:
        family = {4: " (SD1.x / SD2 / SDXL VAEs have 4)", 32: " (the FLUX.2 VAE has 32)"}.get(z, "")
        raise CheckpointError(f"{path} is a VAE with {z} latent channels{family}. EchoGen's content encoder needs "
                              f"the 16-channel FLUX.1 VAE. {FLUX_VAE_SOURCE_HINT}.")
    ch, c_img = w_in.shape[0], w_in.shape[1]
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"^encoder\.down\.(\d+)\.", k))})
    if not levels:
        raise CheckpointError(f"{path} has no `encoder.down.*` weights; it is not a FLUX.1 VAE encoder.")
    mult, depth = [], 0
    for i in range(levels[-1] + 1):
        w = _need(sd, f"encoder.down.{i}.block.0.conv1.weight", path)
        if w.shape[0] % ch:
            raise CheckpointError(f"{path}: encoder.down.{i}.block.0.conv1 has {w.shape[0]} output channels, not a "
                                  f"multiple of conv_in's {ch}.")
        mult.append(w.shape[0] // ch)
        blocks = {int(m.group(1)) for k in sd if (m := re.match(rf"^encoder\.down\.{i}\.block\.(\d+)\.", k))}
        depth = max(depth, max(blocks) + 1)
    try:
        cfg = FluxVAEConfig(in_channels=int(c_img), ch=int(ch), ch_mult=tuple(mult), num_res_blocks=depth,
                            z_channels=int(z), norm_groups=norm_groups,
                            use_quant_conv=any(k.startswith("quant_conv.") for k in sd))
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if cfg.downsample_factor != 8:
        raise CheckpointError(f"{path} is a VAE with {len(mult)} levels ({cfg.downsample_factor}x downsampling); "
                              f"EchoGen needs the 8x FLUX.1 VAE. {FLUX_VAE_SOURCE_HINT}.")
    return cfg


_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                      "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.bin")


def _resolve(path: Path) -> tuple[Path, Optional[dict], list]:
    """Pick the weights file for `path`; return it with the diffusers config.json (if any) and notes."""
    notes = []
    if path.is_dir():
        if (path / "vae").is_dir():
            notes.append(f"used the vae/ folder of {path}")
            return _resolve(path / "vae")
        if (path / "ae.safetensors").is_file():
            notes.append(f"used {path / 'ae.safetensors'}")
            return path / "ae.safetensors", None, notes
        weights = next((path / n for n in _DIFFUSERS_WEIGHTS if (path / n).is_file()), path)
    else:
        weights = path
    folder = path if path.is_dir() else path.parent
    config = None
    cfg_file = folder / "config.json"
    if cfg_file.is_file() and (path.is_dir() or path.name.startswith("diffusion_pytorch_model")):
        try:
            config = json.loads(cfg_file.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{cfg_file} is not valid JSON ({e}); download it again.") from None
    if weights.name.endswith(".index.json"):
        weights = weights.parent
    return weights, config, notes


def _select_vae(sd: dict, path: str, notes: list) -> dict:
    """Keep the VAE's own tensors when the file nests it under a prefix (e.g. `first_stage_model.`, `vae.`)."""
    hits = [k[: -len("encoder.conv_in.weight")] for k in sd if k.endswith("encoder.conv_in.weight")]
    if not hits:
        raise CheckpointError(f"{path} holds no `encoder.conv_in.weight`: it is not a VAE. {FLUX_VAE_SOURCE_HINT}.")
    if len(hits) > 1:
        raise CheckpointError(f"{path} holds several VAE encoders (under prefixes {hits}); extract one first.")
    prefix = hits[0]
    if not prefix:
        return sd
    picked = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    notes.append(f"used the VAE under '{prefix}' and ignored the file's other {len(sd) - len(picked)} tensors")
    return picked


def load_flux_vae_encoder(path, device="cpu", dtype: torch.dtype = torch.float32,
                          config: Optional[FluxVAEConfig] = None) -> FluxVAEEncoder:
    """Load the FLUX.1 VAE encoder strictly from

    - BFL's single-file `ae.safetensors` (ldm keys), or any file/checkpoint with those keys;
    - a diffusers `vae/` folder (config.json + diffusion_pytorch_model.safetensors), that weights file itself,
      or a parent folder holding `vae/` (e.g. a FLUX.1-dev snapshot).

    Every encoder tensor must be present with the right shape and no unknown `encoder.*` tensor may appear
    (CheckpointError names them).  Decoder tensors are ignored on purpose; `quant_conv.*`, if present, is applied.
    `config` overrides the architecture read off the file (it is still checked strictly against it).
    Returns the module in eval mode without gradients; `.load_notes` lists what was adapted or ignored.
    """
    src = Path(path).expanduser()
    if not src.exists():
        raise CheckpointError(f"FLUX VAE not found: {src}. {FLUX_VAE_SOURCE_HINT}.")
    weights, hf_config, notes = _resolve(src)
    loaded = read_file(weights)
    notes = loaded.notes + notes
    sd = unwrap_state_dict(loaded.tensors, loaded.path, notes)
    sd = _select_vae(sd, loaded.path, notes)

    layout = _layout(sd)
    if layout == "mixed":
        raise CheckpointError(f"{loaded.path} mixes diffusers (`encoder.down_blocks.*`) and ldm (`encoder.down.*`) "
                              "encoder names; it is not a file any tool writes. Download the VAE again.")
    if layout == "diffusers":
        sd = encoder_state_dict_to_ldm(sd)
        notes.append("converted diffusers encoder names to the BFL/ldm layout")

    ignored = sorted({k.split(".", 1)[0] for k in sd if not k.startswith(("encoder.", "quant_conv."))})
    n_ignored = sum(1 for k in sd if not k.startswith(("encoder.", "quant_conv.")))
    if n_ignored:
        notes.append(f"ignored {n_ignored} tensors under {ignored} (only the encoder is needed)")
    sd = {k: v for k, v in sd.items() if k.startswith(("encoder.", "quant_conv."))}

    norm_groups = int((hf_config or {}).get("norm_num_groups", 32))
    if config is None:
        config = infer_flux_vae_config(sd, loaded.path, norm_groups=norm_groups)
    elif "encoder.conv_out.weight" in sd and sd["encoder.conv_out.weight"].shape[0] // 2 != FLUX_LATENT_CHANNELS:
        infer_flux_vae_config(sd, loaded.path)      # raises the latent-channel error
    if hf_config:
        if hf_config.get("use_quant_conv") is False and config.use_quant_conv:
            raise CheckpointError(f"{weights} has quant_conv weights but its config.json says use_quant_conv=false; "
                                  "the two disagree, so the VAE cannot be trusted. Download the folder again.")
        if hf_config.get("use_quant_conv", False) and not config.use_quant_conv:
            config = replace(config, use_quant_conv=True)   # -> reported as missing quant_conv.* below
        sf, sh = hf_config.get("scaling_factor"), hf_config.get("shift_factor")
        if sf is not None and (abs(sf - FLUX_SCALING_FACTOR) > 1e-4 or abs((sh or 0) - FLUX_SHIFT_FACTOR) > 1e-4):
            notes.append(f"WARNING: config.json has scaling_factor={sf}, shift_factor={sh}, not FLUX.1's "
                         f"{FLUX_SCALING_FACTOR}/{FLUX_SHIFT_FACTOR}: this looks like another 16-channel VAE "
                         "(e.g. SD3's); EchoGen was trained on FLUX.1 latents")
    ref = FluxVAEConfig.flux()
    differs = [f.name for f in fields(ref) if getattr(ref, f.name) != getattr(config, f.name)]
    if differs:
        notes.append(f"architecture differs from FLUX.1's in {differs}: {config}")
    if config.use_quant_conv:
        notes.append("applied the file's quant_conv to the moments (FLUX.1 itself has none)")

    model = build_from_state_dict(FluxVAEEncoder, config, sd, loaded.path, "FLUX.1 VAE encoder", notes)
    model.load_notes = notes
    return model.to(device=device, dtype=dtype)
