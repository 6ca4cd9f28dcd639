"""Scale schedules: which token grids Infinity predicts, coarse to fine, for each aspect ratio and size.

Infinity generates an image as a sequence of ever finer token grids ("scales"). The grids come from fixed
per-aspect-ratio templates; a size name ("0.06M" ... "1M") says how many leading scales are used. The image
is always 16 pixels per token of the last grid (stride-16 VAE, or stride-8 VAE with 2x2 patchify).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from .errors import InputError

# Base grids (h, w) for h/w >= 1, 13 scales each. Ratios below 1 use the same lists transposed.
_BASE_GRIDS: dict[float, tuple[tuple[int, int], ...]] = {
    1.000: ((1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32), (40, 40), (48, 48), (64, 64)),
    1.250: ((1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28), (45, 36), (55, 44), (70, 56)),
    1.333: ((1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27), (48, 36), (60, 45), (72, 54)),
    1.500: ((1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26), (48, 32), (63, 42), (78, 52)),
    1.750: ((1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24), (56, 32), (70, 40), (84, 48)),
    2.000: ((1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23), (60, 30), (74, 37), (90, 45)),
    2.500: ((1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20), (65, 26), (80, 32), (100, 40)),
    3.000: ((1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18), (72, 24), (90, 30), (111, 37)),
}


def _build_templates() -> dict[float, tuple[tuple[int, int], ...]]:
    # Same order as the official `h_div_w_templates`: 1.0, 1.25, 0.8, 1.333, 0.75, ...
    out: dict[float, tuple[tuple[int, int], ...]] = {}
    for ratio, grids in _BASE_GRIDS.items():
        out[ratio] = grids
        if ratio != 1.0:
            out[int(1 / ratio * 1000) / 1000] = tuple((w, h) for h, w in grids)
    return out


#: All 15 aspect-ratio templates, keyed by height/width (0.333 ... 3.0).
TEMPLATES: dict[float, tuple[tuple[int, int], ...]] = _build_templates()

#: Size names and how many leading scales each uses.
SIZES: dict[str, int] = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}

PIXELS_PER_TOKEN = 16  # last grid x 16 = image size, for every released model


@dataclass(frozen=True)
class ScaleSchedule:
    """The token grids of one generation: an aspect template and a size."""

    ratio: float                      # template key, height / width
    size: str                         # "0.06M" | "0.25M" | "0.60M" | "1M"
    grids: tuple[tuple[int, int], ...]  # transformer token grids (h, w), coarse to fine

    @property
    def num_scales(self) -> int:
        return len(self.grids)

    @property
    def height(self) -> int:
        return self.grids[-1][0] * PIXELS_PER_TOKEN

    @property
    def width(self) -> int:
        return self.grids[-1][1] * PIXELS_PER_TOKEN

    @property
    def tokens_per_scale(self) -> tuple[int, ...]:
        return tuple(h * w for h, w in self.grids)

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens_per_scale)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start of each scale in the flattened token sequence (SOS is scale 0)."""
        out, acc = [], 0
        for n in self.tokens_per_scale:
            out.append(acc)
            acc += n
        return tuple(out)

    @property
    def rope_grid(self) -> tuple[int, int]:
        """The grid RoPE positions are normalised to: the last grid of this template's 1M schedule."""
        return TEMPLATES[self.ratio][-1]

    def vae_grids(self, patchify: bool) -> tuple[tuple[int, int], ...]:
        """Latent grids on the VAE side: with 2x2 patchify each token covers 2x2 latent positions."""
        if not patchify:
            return self.grids
        return tuple((2 * h, 2 * w) for h, w in self.grids)

    def scale_index(self) -> torch.Tensor:
        """(L,) scale number of every token, used for the block-causal mask and level embeddings."""
        return torch.repeat_interleave(torch.arange(self.num_scales), torch.tensor(self.tokens_per_scale))

    def describe(self) -> str:
        return (f"{self.width}x{self.height} (aspect template h/w={self.ratio}, size {self.size}, "
                f"{self.num_scales} scales, {self.total_tokens} tokens)")


def get_schedule(ratio: float = 1.0, size: str = "1M") -> ScaleSchedule:
    """The schedule of an exact template key and size name."""
    if size not in SIZES:
        raise InputError(f"Unknown size {size!r}; choose one of {', '.join(SIZES)}.")
    key = _template_key(ratio)
    if key is None:
        raise InputError(f"No aspect template h/w={ratio}; templates are {', '.join(str(k) for k in TEMPLATES)}. "
                         "Use nearest_schedule(width, height) to snap an arbitrary size.")
    return ScaleSchedule(ratio=key, size=size, grids=TEMPLATES[key][: SIZES[size]])


def _template_key(ratio: float) -> float | None:
    for key in TEMPLATES:
        if abs(key - ratio) < 1e-6:
            return key
    return None


def nearest_template(height_div_width: float) -> float:
    """The template with the smallest |h/w - template| (the official rule)."""
    return min(TEMPLATES, key=lambda key: abs(height_div_width - key))


def nearest_schedule(width: int, height: int, sizes: tuple[str, ...] | None = None) -> ScaleSchedule:
    """Snap a requested width x height to the nearest template, then to the size whose pixel count is
    closest in log space. `sizes` restricts the choice (e.g. a 256-px model supports only "0.06M")."""
    if width <= 0 or height <= 0:
        raise InputError(f"Width and height must be positive, got {width}x{height}.")
    sizes = tuple(sizes) if sizes else tuple(SIZES)
    for s in sizes:
        if s not in SIZES:
            raise InputError(f"Unknown size {s!r}; choose from {', '.join(SIZES)}.")
    ratio = nearest_template(height / width)
    candidates = [get_schedule(ratio, s) for s in sizes]
    want = math.log(width * height)
    return min(candidates, key=lambda sc: abs(math.log(sc.width * sc.height) - want))


@lru_cache(maxsize=64)
def rope_positions(schedule: ScaleSchedule) -> torch.Tensor:
    """(L, 2) integer (row, col) RoPE positions of every token, on the template's 1M grid.

    A token (i, j) of an h x w scale sits at round(i * H_f / h), round(j * W_f / w), computed in fp32 and
    rounded half-to-even exactly as the released models were trained (e.g. 3.5 -> 4, 10.5 -> 10)."""
    big_h, big_w = schedule.rope_grid
    parts = []
    for h, w in schedule.grids:
        rows = (torch.arange(h) * (big_h / h)).round().long()
        cols = (torch.arange(w) * (big_w / w)).round().long()
        parts.append(torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(h * w, 2))
    return torch.cat(parts, dim=0)
