"""From a reference photo to the features EchoGen injects: the shared crop, then both encoders."""
from __future__ import annotations

import math

import numpy as np
import torch

from .echogen import EchoGenConfig, SubjectFeatures
from .errors import InputError

MIN_REFERENCE_SIDE = 32


def reference_geometry(cfg: EchoGenConfig) -> tuple[int, int]:
    """(crop size for both encoders, DINOv2 input size) a model was trained with: 512/448 for the
    1024-px models, 256/224 for the 256-px ones. Read off the token counts, so tiny models work too."""
    latent = math.isqrt(cfg.content_len)
    patches = math.isqrt(cfg.semantic_len - 1)
    if latent * latent != cfg.content_len or patches * patches != cfg.semantic_len - 1:
        raise InputError(f"Model expects {cfg.content_len} content and {cfg.semantic_len} semantic tokens; "
                         "these are not square grids, so the reference geometry is unknown.")
    return latent * 8, patches * 14


def center_crop_reference(image, size: int) -> torch.Tensor:
    """PIL image -> (1, 3, size, size) in [0, 1]: shorter side resized to `size` with Lanczos, then a
    centre crop, as EchoGen's training and inference data pipeline does."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise InputError(f"Expected a PIL image, got {type(image).__name__}.")
    if min(image.size) < MIN_REFERENCE_SIDE:
        raise InputError(f"The reference is {image.size[0]}x{image.size[1]} pixels; at least "
                         f"{MIN_REFERENCE_SIDE} px on the shorter side is needed.")
    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.LANCZOS)
    left, top = (nw - size) // 2, (nh - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0)


@torch.no_grad()
def encode_subject(reference01: torch.Tensor, cfg: EchoGenConfig, dinov2, content_encoder) -> SubjectFeatures:
    """reference01: (B, 3, S, S) in [0, 1], already cropped to the model's reference size.
    Semantic: DINOv2 CLS + patch tokens; content: FLUX.1 VAE posterior mean as tokens."""
    crop, dino_size = reference_geometry(cfg)
    if tuple(reference01.shape[-2:]) != (crop, crop):
        raise InputError(f"The reference is {tuple(reference01.shape[-2:])} but this model takes a {crop}x{crop} crop.")
    semantic = dinov2.encode(reference01.to(dinov2.device), size=dino_size).float().cpu()
    content = content_encoder.content_tokens(reference01.to(content_encoder.device)).float().cpu()
    subject = SubjectFeatures(semantic, content)
    for name, got, want in (("DINOv2", semantic.shape[1:], (cfg.semantic_len, cfg.semantic_dim)),
                            ("content VAE", content.shape[1:], (cfg.content_len, cfg.content_dim))):
        if tuple(got) != want:
            raise InputError(f"The {name} encoder gives features {tuple(got)} but the model expects {want}: "
                             "it is not the encoder this EchoGen model was trained with.")
    return subject
