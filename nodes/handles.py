"""What flows along the pack's custom socket types. Outputs are cached by ComfyUI and may feed several nodes,
so nothing here is ever modified after a node returns it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .comfy_bridge import Managed

# Socket type names: saved workflows refer to them, keep them stable.
MODEL = "ECHOGEN_MODEL"
VAE = "ECHOGEN_VAE"
TEXT_ENCODER = "ECHOGEN_TEXT_ENCODER"
SEMANTIC_ENCODER = "ECHOGEN_SEMANTIC_ENCODER"
CONTENT_ENCODER = "ECHOGEN_CONTENT_ENCODER"
SEGMENTER = "ECHOGEN_SEGMENTER"
TEXT = "ECHOGEN_TEXT"
SUBJECT = "ECHOGEN_SUBJECT"
GUIDANCE = "ECHOGEN_GUIDANCE"
LATENT = "ECHOGEN_LATENT"


@dataclass(frozen=True)
class ModelHandle:
    managed: Managed
    name: str
    fixed_schedule: Optional[object] = None   # a model trained at one size only (the bundled 64 px model)

    @property
    def cfg(self):
        return self.managed.obj.cfg

    @property
    def is_echogen(self) -> bool:
        return hasattr(self.managed.obj, "encode_conditions")


@dataclass(frozen=True)
class TextHandle:
    positive: object                 # TextConditioning (B prompts), on the CPU
    negative: Optional[object]       # TextConditioning or None (= the model's learned empty prompt)
    prompts: tuple
    channels: int


@dataclass(frozen=True)
class SubjectHandle:
    """Encoded references for one model geometry. Either part may be missing until both encoders ran."""

    crop: int                              # reference crop the features were computed at
    semantic: Optional[torch.Tensor] = None   # (B, Ls, Ds) DINOv2 tokens
    content: Optional[torch.Tensor] = None    # (B, Lc, Dc) FLUX VAE tokens
    expects: tuple = ()                    # (semantic_len, semantic_dim, content_len, content_dim) of the model


@dataclass(frozen=True)
class LatentHandle:
    """The sampler's result before decoding: summed BSQ codes at the final scale."""

    codes: torch.Tensor                    # (B, d, h, w) float, CPU
    width: int
    height: int
    vae_bits: int
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SegmenterHandle:
    detector: Optional[Managed] = None
    refiner: Optional[Managed] = None
    namer: Optional[Managed] = None
