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


def center_crop_geometry(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """(resized width, resized height, left, top) of the reference crop: the shorter side goes to `size`,
    then a centred size x size window. Shared by the image, its mask and the segmentation crop."""
    scale = size / min(width, height)
    nw, nh = max(size, round(width * scale)), max(size, round(height * scale))
    return nw, nh, (nw - size) // 2, (nh - size) // 2


def center_crop_image(image, size: int, resample=None):
    """PIL image -> PIL size x size: shorter side resized with Lanczos (or `resample`), then a centre crop,
    as EchoGen's training and inference data pipeline does. Keeps the mode, so masks ('L', 'F') crop alike."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise InputError(f"Expected a PIL image, got {type(image).__name__}.")
    if min(image.size) < MIN_REFERENCE_SIDE:
        raise InputError(f"The reference is {image.size[0]}x{image.size[1]} pixels; at least "
                         f"{MIN_REFERENCE_SIDE} px on the shorter side is needed.")
    nw, nh, left, top = center_crop_geometry(*image.size, size)
    image = image.resize((nw, nh), Image.LANCZOS if resample is None else resample)
    return image.crop((left, top, left + size, top + size))


def center_crop_reference(image, size: int) -> torch.Tensor:
    """PIL image -> (1, 3, size, size) in [0, 1] through center_crop_image (the encoders' shared input)."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise InputError(f"Expected a PIL image, got {type(image).__name__}.")
    return pil_to_reference(center_crop_image(image.convert("RGB"), size))


def pil_to_reference(image) -> torch.Tensor:
    """PIL RGB -> (1, 3, H, W) float in [0, 1], the range both encoders take (each applies its own
    normalisation: ImageNet mean/std in dinov2.encode, [-1, 1] in flux_vae.encode)."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0)


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
