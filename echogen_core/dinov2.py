"""DINOv2 ViT (no registers): EchoGen's frozen semantic encoder.

EchoGen feeds the prepared reference image to DINOv2 ViT-B/14 *without registers* (torch-hub
``dinov2_vitb14``, file ``dinov2_vitb14_pretrain.pth``; Hugging Face ``facebook/dinov2-base``) and keeps the
final-LayerNorm'd CLS token and patch tokens:

    512x512 reference in [0, 1] --ImageNet mean/std--> bicubic 448x448 --ViT-B/14--> (B, 1 + 32*32, 768)
    256x256 reference (0.1B model)                 --> bicubic 224x224 -->         (B, 1 + 16*16, 768)

Architecture (pre-norm ViT, as in the DINOv2 paper and the hub code):

    x   = PatchEmbed(pixels)                        conv k=p, s=p:   (B, 3, H, W) -> (B, N, D), N = (H/p)(W/p)
    x   = [cls ; x] + pos(H, W)                     (B, 1+N, D); pos is trained on a 37x37 grid (518 px)
    x   = x + ls1 * Attn(LN1(x))                    LayerScale ls1/ls2: per-channel gammas
    x   = x + ls2 * MLP(LN2(x))                     MLP: D -> 4D (exact GELU) -> D
    out = LN(x)                                     LayerNorm eps 1e-6 everywhere

Parameter names are exactly the torch-hub names (``cls_token``, ``pos_embed``, ``mask_token``,
``patch_embed.proj.*``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}.*``,
``norm.*``), so a hub file loads without renaming; Hugging Face files are converted (q/k/v concatenated into
``qkv``). ViT-B/14 has 175 tensors: 5 embedding tensors + 12 blocks x 14 + 2 final-norm tensors.

Position embeddings follow the *hub* interpolation, not the Hugging Face one (see ``interpolate_pos_embed``);
EchoGen's semantic features were computed with the hub model.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, InputError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Dinov2Config",
    "Dinov2",
    "interpolate_pos_embed",
    "convert_hf_state_dict",
    "infer_dinov2_config",
    "dinov2_state_dict",
    "load_dinov2",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DINOV2_SOURCE_HINT = ("EchoGen was trained on DINOv2 ViT-B/14 without registers: use the torch-hub file "
                      "dinov2_vitb14_pretrain.pth (https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/"
                      "dinov2_vitb14_pretrain.pth) or the Hugging Face repository facebook/dinov2-base.")


# --------------------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class Dinov2Config:
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 14
    img_size: int = 518                 # training resolution: pos_embed holds (img_size/patch)^2 + 1 rows
    in_chans: int = 3
    ln_eps: float = 1e-6
    # Hub settings for the models without registers (the "-reg" models use offset 0.0 and antialias True).
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False

    def __post_init__(self):
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def pos_grid(self) -> int:
        """Side of the trained position-embedding grid (37 for the released models)."""
        return self.img_size // self.patch_size

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @classmethod
    def vit_b14(cls, **overrides) -> "Dinov2Config":
        """torch-hub dinov2_vitb14: 768 wide, 12 blocks, 12 heads, MLP x4, 518 px (37x37 positions)."""
        return replace(cls(), **overrides)

    @classmethod
    def tiny(cls, **overrides) -> "Dinov2Config":
        """Test size: 128 wide (head dim 64 like every DINOv2), 2 blocks, patch 14, 4x4 positions (56 px)."""
        return replace(cls(embed_dim=128, depth=2, num_heads=2, img_size=56), **overrides)


# --------------------------------------------------------------------------------------------------------------
# Layers


class PatchEmbed(nn.Module):
    def __init__(self, cfg: Dinov2Config):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # (B, C, H, W) -> (B, H/p * W/p, D), row-major
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)              # rows: [q; k; v], heads contiguous inside each
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)              # each (B, H, T, D/H)
        x = F.scaled_dot_product_attention(q, k, v)       # softmax(q k^T / sqrt(D/H)) v
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()                              # exact (erf) GELU, as in the hub and HF models
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float = 1.0):     # hub models are built with init_values=1.0
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, cfg: Dinov2Config):
        super().__init__()
        D = cfg.embed_dim
        self.norm1 = nn.LayerNorm(D, eps=cfg.ln_eps)
        self.attn = Attention(D, cfg.num_heads)
        self.ls1 = LayerScale(D)
        self.norm2 = nn.LayerNorm(D, eps=cfg.ln_eps)
        self.mlp = Mlp(D, cfg.mlp_hidden)
        self.ls2 = LayerScale(D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D)
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


# --------------------------------------------------------------------------------------------------------------
# Position embeddings


def interpolate_pos_embed(pos_embed: torch.Tensor, height: int, width: int, patch_size: int,
                          offset: float = 0.1, antialias: bool = False) -> torch.Tensor:
    """Position embeddings for an input of height x width pixels, exactly as the torch-hub DINOv2 does it.

    pos_embed: (1, 1 + M*M, D) trained on an M x M grid -> (1, 1 + h0*w0, D) with h0 = height // p,
    w0 = width // p, in pos_embed's dtype (the resampling itself runs in fp32).

    Hub math (DinoVisionTransformer.interpolate_pos_encoding, unchanged in substance since 2023):
      * if the input has as many patches as the grid AND height == width (pixels): the table as is;
      * else the M x M patch table is resampled with F.interpolate(mode="bicubic", antialias=False,
        align_corners=False) given ``scale_factor = ((h0 + 0.1) / M, (w0 + 0.1) / M)`` (not ``size``):
        the output is floor(M * scale) = (h0, w0), but the kernel samples source pixels at
        (i + 0.5) * M / (h0 + 0.1) - 0.5, a slightly different grid than ``size=(h0, w0)`` would give.
      * the CLS row is never resampled.
    Hugging Face's Dinov2Embeddings.interpolate_pos_encoding instead passes ``size=(h0, w0)`` (no 0.1 offset,
    bicubic, align_corners=False, no antialias): for 37 -> 32 the two differ by ~1e-2 on unit-scale tables,
    so HF's Dinov2Model does NOT reproduce the hub features at 448 px. EchoGen used the hub model, so this
    function follows the hub. With offset 0 (the register models) the hub also passes ``size``.
    """
    N = pos_embed.shape[1] - 1
    M = math.isqrt(N)
    if M * M != N:
        raise ValueError(f"pos_embed has {N} patch rows, not a square grid")
    h0, w0 = height // patch_size, width // patch_size
    if h0 * w0 == N and height == width:
        return pos_embed
    D = pos_embed.shape[-1]
    table = pos_embed.float()
    grid = table[:, 1:].reshape(1, M, M, D).permute(0, 3, 1, 2)          # (1, D, M, M)
    if offset:
        kwargs = dict(scale_factor=((h0 + offset) / M, (w0 + offset) / M))
    else:
        kwargs = dict(size=(h0, w0))
    grid = F.interpolate(grid, mode="bicubic", antialias=antialias, align_corners=False, **kwargs)
    if tuple(grid.shape[-2:]) != (h0, w0):
        raise RuntimeError(f"position interpolation produced {tuple(grid.shape[-2:])}, expected {(h0, w0)}")
    grid = grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, D)                # (1, h0*w0, D), row-major
    return torch.cat([table[:, :1], grid], dim=1).to(pos_embed.dtype)


# --------------------------------------------------------------------------------------------------------------
# Model


class Dinov2(nn.Module):
    """DINOv2 ViT without registers; returns the final-LayerNorm'd CLS + patch tokens."""

    def __init__(self, cfg: Dinov2Config):
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.pos_grid ** 2, D))
        self.mask_token = nn.Parameter(torch.zeros(1, D))   # used only for masked training; kept for strict loads
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(D, eps=cfg.ln_eps)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embed.proj.weight.device

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: (B, 3, H, W), already ImageNet-normalised, H and W multiples of the patch size.

        Returns (B, 1 + (H/p)(W/p), D): row 0 is the CLS token, then the patch tokens row-major; all after
        the final LayerNorm, in the model's dtype."""
        if pixels.ndim != 4 or pixels.shape[1] != self.cfg.in_chans:
            raise InputError(f"DINOv2 expects (B, {self.cfg.in_chans}, H, W) pixels, got {tuple(pixels.shape)}")
        B, _, H, W = pixels.shape
        p = self.cfg.patch_size
        if H % p or W % p:
            raise InputError(f"DINOv2 input {H}x{W} is not a multiple of the patch size {p}")
        x = self.patch_embed(pixels.to(self.dtype))                            # (B, N, D)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)            # (B, 1+N, D)
        x = x + interpolate_pos_embed(self.pos_embed, H, W, p, self.cfg.interpolate_offset,
                                      self.cfg.interpolate_antialias).to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    @torch.no_grad()
    def encode(self, images01: torch.Tensor, size: int = 448, antialias: Optional[bool] = None) -> torch.Tensor:
        """EchoGen's semantic features of images in [0, 1].

        images01: (B, 3, H, W) in [0, 1], any size (EchoGen prepares 512x512, or 256x256 for the 0.1B model).
        size: side DINOv2 sees, 448 (2B model) or 224 (0.1B model); a multiple of the patch size.
        Returns (B, 1 + (size/p)^2, D) float32: 1025 x 768 at 448, 257 x 768 at 224.

        Steps: ImageNet normalisation, then bicubic resize to size x size (align_corners=False). Both are
        linear per channel, so their order does not change the result. Antialiasing: EchoGen's code is
        not available; its description ("ImageNet-normalized and bicubic-resized to 448") matches the usual
        torchvision transforms pipeline, and torchvision's Resize on tensors antialiases by default
        (antialias=True since torchvision 0.17) -- which only acts when shrinking. So the default
        (antialias=None) antialiases when the image is larger than ``size`` (512 -> 448) and not when
        enlarging, where plain bicubic is what both conventions give. Pass True/False to force it.
        """
        return self(self.preprocess(images01, size, antialias)).float()

    def preprocess(self, images01: torch.Tensor, size: int = 448, antialias: Optional[bool] = None) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] -> the (B, 3, size, size) float32 input of forward() (see encode);
        differentiable, so training sees exactly what inference does."""
        if images01.ndim != 4 or images01.shape[1] != 3:
            raise InputError(f"expected images (B, 3, H, W) in [0, 1], got {tuple(images01.shape)}")
        p = self.cfg.patch_size
        if size <= 0 or size % p:
            raise InputError(f"DINOv2 input size {size} must be a positive multiple of the patch size {p}")
        x = images01.to(self.device, torch.float32)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
        H, W = x.shape[-2:]
        if (H, W) != (size, size):
            if antialias is None:
                antialias = H > size or W > size
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=antialias)
        return x


# --------------------------------------------------------------------------------------------------------------
# Loading


_HF_BLOCK = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_CHUNKED_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.")
_HF_RENAMES = {
    "norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
}
_HF_LAYER_SCALE = {"layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma"}
_HF_QKV = {"attention.attention.query": "q", "attention.attention.key": "k", "attention.attention.value": "v",
           "attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v"}
_HF_TOP = {
    "embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
}


def _is_hf(sd: dict) -> bool:
    return any(k.startswith(("embeddings.", "encoder.layer.")) for k in sd)


def convert_hf_state_dict(sd: dict, path: str = "state dict") -> dict:
    """Hugging Face Dinov2Model names (saved layout ``attention.attention.query`` or in-memory ``q_proj``)
    -> hub names. Separate q/k/v are concatenated into ``qkv`` ([q; k; v] rows). Unknown names are kept
    as they are, so the strict check reports them."""
    out, parts = {}, {}
    for name, t in sd.items():
        if name in _HF_TOP:
            out[_HF_TOP[name]] = t
            continue
        m = _HF_BLOCK.match(name)
        if m is None:
            out[name] = t
            continue
        i, rest = m.group(1), m.group(2)
        if rest in _HF_LAYER_SCALE:
            out[f"blocks.{i}.{_HF_LAYER_SCALE[rest]}"] = t
            continue
        module, _, leaf = rest.rpartition(".")
        if module in _HF_QKV:
            parts.setdefault((i, leaf), {})[_HF_QKV[module]] = (name, t)
        elif module in _HF_RENAMES:
            out[f"blocks.{i}.{_HF_RENAMES[module]}.{leaf}"] = t
        else:
            out[name] = t
    for (i, leaf), got in sorted(parts.items()):
        if set(got) != {"q", "k", "v"}:
            lacking = [f"encoder.layer.{i}.attention.attention.{n}.{leaf}"
                       for n, s in (("query", "q"), ("key", "k"), ("value", "v")) if s not in got]
            raise CheckpointError(f"{path} has only part of the attention projections of layer {i}: "
                                  f"missing {', '.join(lacking)}. The file is incomplete.")
        out[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat([got[s][1] for s in ("q", "k", "v")], dim=0)
    return out


def _strip_prefixes(sd: dict, notes: list) -> dict:
    for prefix in ("dinov2.", "backbone."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
            notes.append(f"stripped the '{prefix}' prefix")
    if any(_CHUNKED_BLOCK.match(k) for k in sd):      # training checkpoints built with block_chunks > 0
        sd = {_CHUNKED_BLOCK.sub(lambda m: f"blocks.{m.group(2)}.", k): v for k, v in sd.items()}
        notes.append("renamed blocks.{chunk}.{i} to blocks.{i}")
    return sd


def _refuse_unsupported(sd: dict, path: str, hf_config: dict) -> None:
    reg = [k for k in sd if k.endswith("register_tokens")]
    n_reg = hf_config.get("num_register_tokens") or (sd[reg[0]].shape[1] if reg and sd[reg[0]].ndim == 3 else 0)
    if reg or hf_config.get("model_type") == "dinov2_with_registers":
        raise CheckpointError(
            f"{path} is a DINOv2 model WITH registers ({n_reg} register tokens, key "
            f"'{reg[0] if reg else 'register_tokens'}'). EchoGen was trained with DINOv2 ViT-B/14 without "
            f"registers, whose features differ. {DINOV2_SOURCE_HINT}")
    if any(".mlp.w12." in k or ".mlp.weights_in." in k or ".mlp.gate_proj." in k for k in sd) \
            or hf_config.get("use_swiglu_ffn"):
        raise CheckpointError(f"{path} is a DINOv2 with a SwiGLU MLP (ViT-g/14), which is not supported. "
                              + DINOV2_SOURCE_HINT)
    act = hf_config.get("hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(f"{path}: config.json has hidden_act={act!r}; DINOv2 uses exact 'gelu'.")


def infer_dinov2_config(sd: dict, path: str = "state dict", num_heads: Optional[int] = None,
                        ln_eps: float = 1e-6) -> Dinov2Config:
    """Config from hub-named tensors: width from cls_token, patch from the patch-embed kernel, grid from the
    pos_embed length, depth from the block indices, MLP ratio from fc1; heads = width / 64 (true for every
    released DINOv2) unless given."""
    needed = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")
    absent = [k for k in needed if k not in sd]
    if absent:
        shown = ", ".join(sorted(sd)[:8])
        raise CheckpointError(f"{path} does not look like a DINOv2 ViT: it lacks {', '.join(absent)} (its first "
                              f"keys: {shown}). {DINOV2_SOURCE_HINT}")
    D = sd["cls_token"].shape[-1]
    kernel = sd["patch_embed.proj.weight"].shape          # (D, C, p, p)
    if len(kernel) != 4 or kernel[2] != kernel[3]:
        raise CheckpointError(f"{path}: patch_embed.proj.weight has shape {tuple(kernel)}; expected (D, 3, p, p).")
    p, C = kernel[-1], kernel[1]
    rows = sd["pos_embed"].shape[1] - 1 if sd["pos_embed"].ndim == 3 else -1
    M = math.isqrt(max(rows, 0))
    if rows <= 0 or M * M != rows:
        raise CheckpointError(f"{path}: pos_embed has shape {tuple(sd['pos_embed'].shape)}; expected "
                              "(1, 1 + M*M, D) for a square M x M position grid.")
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"^blocks\.(\d+)\.", k)))
    hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    if num_heads is None:
        if D % 64:
            raise CheckpointError(f"{path}: width {D} is not a multiple of 64, so the head count cannot be "
                                  "inferred; pass num_heads.")
        num_heads = D // 64
    try:
        return Dinov2Config(embed_dim=D, depth=depth, num_heads=num_heads, mlp_ratio=hidden / D, patch_size=p,
                            img_size=M * p, in_chans=C, ln_eps=ln_eps)
    except ValueError as e:
        raise CheckpointError(f"{path}: inconsistent DINOv2 shapes: {e}") from None


def _resolve(path: Path) -> tuple[Path, dict]:
    """A weights file, or a Hugging Face folder -> (weights path, parsed config.json or {})."""
    if not path.is_dir():
        return path, {}
    config = {}
    if (path / "config.json").is_file():
        try:
            config = json.loads((path / "config.json").read_text())
        except ValueError as e:
            raise CheckpointError(f"{path / 'config.json'} is not valid JSON: {e}") from None
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        if (path / name).is_file():
            return (path if name.endswith(".index.json") else path / name), config
    singles = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.pth"))
    if len(singles) == 1:
        return singles[0], config
    raise CheckpointError(f"{path} is a folder without model.safetensors, a safetensors index or "
                          f"pytorch_model.bin (it has {len(singles)} other weights files). {DINOV2_SOURCE_HINT}")


def dinov2_state_dict(path, num_heads: Optional[int] = None) -> tuple[dict, Dinov2Config, list]:
    """Read a DINOv2 file or HF folder -> (hub-named state dict, inferred config, notes). Not yet checked."""
    from .checkpoint import read_file, unwrap_state_dict

    weights, hf_config = _resolve(Path(path).expanduser())
    loaded = read_file(weights)
    notes = loaded.notes
    sd = _strip_prefixes(unwrap_state_dict(loaded.tensors, loaded.path, notes), notes)
    _refuse_unsupported(sd, loaded.path, hf_config)
    if _is_hf(sd):
        sd = convert_hf_state_dict(sd, loaded.path)
        notes.append("converted Hugging Face names to hub names")
    if num_heads is None and hf_config.get("num_attention_heads"):
        num_heads = int(hf_config["num_attention_heads"])
    cfg = infer_dinov2_config(sd, loaded.path, num_heads, float(hf_config.get("layer_norm_eps", 1e-6)))
    return sd, cfg, notes


def load_dinov2(path_or_folder, device="cpu", dtype: torch.dtype = torch.float32,
                num_heads: Optional[int] = None) -> Dinov2:
    """Load DINOv2 (no registers) strictly from a torch-hub ``.pth`` / safetensors file with hub names, or
    a Hugging Face Dinov2Model folder (config.json + model.safetensors / pytorch_model.bin) or file.

    Every parameter must be present with the inferred shape and nothing else may be in the file, except
    ``mask_token``, which may be absent (only masked training uses it; it is filled with zeros).
    Raises CheckpointError naming the missing / unexpected / mis-shaped keys, and for register or SwiGLU
    models. The model is returned in eval mode without gradients; ``model.load_notes`` lists what was done."""
    from .checkpoint import build_from_state_dict

    sd, cfg, notes = dinov2_state_dict(path_or_folder, num_heads)
    if "mask_token" not in sd:
        sd = {**sd, "mask_token": torch.zeros(1, cfg.embed_dim)}
        notes.append("mask_token absent: filled with zeros (unused at inference)")
    model = build_from_state_dict(Dinov2, cfg, sd, str(path_or_folder), "DINOv2 ViT", notes)
    model = model.to(device=device, dtype=dtype)
    model.load_notes = notes
    return model
