"""Next-scale sampling for Infinity: KV-cached scale loop, classifier-free guidance on the logits,
per-bit top-k/top-p, and the code-map bookkeeping between scales.

Random numbers are drawn as the official sampler draws them: per scale, one `torch.multinomial` over
every bit of the image (rows of 2 probabilities, after top-p). Each image of a batch has its own
generator seeded with `seed + index`, so an image never depends on what else is in the batch, and a
batch of one with seed s reproduces the official image for g_seed=s (same device, same probabilities).
"""
from __future__ import annotations

from dataclasses import dataclass, field
import logging
import math
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .bsq_vae import BSQVAE
from .errors import CheckpointError, InputError
from .infinity import Infinity
from .schedules import ScaleSchedule
from .text_encoder import TextConditioning

log = logging.getLogger("echogen")

PerScale = Union[float, Sequence[float]]


@dataclass
class SamplerSettings:
    cfg: PerScale = 3.0     # text guidance scale (gamma_t), one value or one per scale
    subject_cfg: PerScale = 2.5  # subject guidance scale (gamma_I), used when a subject is given
    tau: PerScale = 1.0     # temperature on the logits, one value or one per scale
    top_k: int = 0          # per-bit top-k (0 = off; with 2 classes only top_k=1 changes anything)
    top_p: float = 0.97     # per-bit nucleus: a bit whose minority probability is <= 1 - top_p is fixed
    # Low memory: run the guidance rows through the transformer one group after the other (each with its own
    # KV cache) instead of stacked along the batch, so a forward's activations are those of one group (a
    # third with a subject, a half without). Same bits and images; slower where a stacked batch fills the GPU.
    sequential_rows: bool = False

    def per_scale(self, name: str, n: int) -> list[float]:
        return expand_per_scale(getattr(self, name), n, name)


def expand_per_scale(value: PerScale, n: int, name: str) -> list[float]:
    """One value per scale. A list shorter than the schedule repeats its last value and a longer one is cut,
    so one list serves every size (7 scales at 256 px, 13 at 1024 px)."""
    if isinstance(value, (int, float)):
        return [float(value)] * n
    values = [float(v) for v in value]
    if not values:
        raise InputError(f"{name}: the per-scale list is empty; give one value or one per scale.")
    return (values + values[-1:] * n)[:n]


@dataclass
class GenerationResult:
    images: torch.Tensor                      # (B, 3, H, W) in [-1, 1]
    bits: list = field(default_factory=list)  # per scale (B, h, w, d_vae) uint8, VAE layout
    summed_codes: Optional[torch.Tensor] = None  # (B, d_vae, H/s, W/s)


def patchify_factor(model: Infinity, vae) -> bool:
    """Whether tokens carry 2x2 patches of VAE positions (Infinity-8B) or single positions (2B, 125M)."""
    if model.cfg.bits == vae.bits:
        return False
    if model.cfg.bits == 4 * vae.bits:
        return True
    raise CheckpointError(
        f"The transformer predicts {model.cfg.bits} bits per token but the VAE has {vae.bits}-bit codes: "
        "they are not a pair. Infinity-2B and the 125M model use infinity_vae_d32reg.pth (32 bits); "
        "Infinity-8B uses infinity_vae_d56_f8_14_patchify.pth (14 bits x 2x2 patches = 56).")


def tokens_to_vae_bits(bits: torch.Tensor, patchify: bool) -> torch.Tensor:
    """(B, h, w, d) token bits -> (B, h', w', d_vae) latent bits (pixel-shuffle order for patchify)."""
    if not patchify:
        return bits
    return F.pixel_shuffle(bits.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)


def vae_to_token_layout(x: torch.Tensor, patchify: bool) -> torch.Tensor:
    """(B, d_vae, h', w') code map -> (B, h*w, d) token features (bit j = 4c + 2dy + dx for patchify)."""
    if patchify:
        x = F.pixel_unshuffle(x, 2)
    return x.flatten(2).transpose(1, 2)


def resize_codes(codes: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize of a code map, no antialias: both the accumulation (up) and the next-scale input
    (down) use it, matching what Infinity was trained on."""
    if tuple(codes.shape[-2:]) == tuple(size):
        return codes
    return BSQVAE.next_scale_input(codes, tuple(size))  # the official kernel, bit for bit


def next_scale_inputs(vae, bits: Sequence[torch.Tensor], schedule: ScaleSchedule, patchify: bool) -> torch.Tensor:
    """Teacher-forcing inputs (B, L - 1, d) for scales 1.. from per-scale VAE-layout bits."""
    grids = schedule.vae_grids(patchify)
    full = grids[-1]
    summed = 0
    inputs = []
    for s in range(len(grids) - 1):
        summed = summed + resize_codes(vae.bits_to_codes(bits[s]), full)
        inputs.append(vae_to_token_layout(resize_codes(summed, grids[s + 1]), patchify))
    return torch.cat(inputs, dim=1)


def sample_bits(logits: torch.Tensor, top_k: int, top_p: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """logits (N, V) -> (N,) samples; the official filter order: top-k, then top-p, then one multinomial."""
    V = logits.shape[-1]
    if top_k > 0:
        kth = logits.topk(min(top_k, V), dim=-1).values.amin(dim=-1, keepdim=True)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p > 0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        drop_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        drop_sorted[..., -1:] = False  # the most likely class always survives
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, replacement=True, generator=generator)[:, 0]


ScaleCallback = Callable[[int, int, torch.Tensor], None]  # (scale index, number of scales, summed codes)


@torch.no_grad()
def generate(model: Infinity, vae, text: TextConditioning, schedule: ScaleSchedule,
             settings: SamplerSettings = SamplerSettings(), seed: int = 0,
             negative: Optional[TextConditioning] = None, on_scale: Optional[ScaleCallback] = None,
             decode: bool = True, subject=None) -> GenerationResult:
    """Text-to-image with Infinity, or subject-driven generation with EchoGen when `subject`
    (SubjectFeatures for each prompt, or one for all) is given.

    `text` holds B prompts; image i uses the generator seeded `seed + i`. Guidance, all rows in one batch
    (or one row group after the other with `settings.sequential_rows`):
      without a subject: (text), (empty)                       logits = l_u + g_t (l_t - l_u)
      with a subject:    (text, subject), (text, none), (empty, none)
                         logits = l_uu + g_t (l_t - l_uu) + g_I (l_ti - l_t)
    """
    patchify = patchify_factor(model, vae)
    n_scales = schedule.num_scales
    if n_scales > model.cfg.num_levels:
        raise InputError(f"The schedule has {n_scales} scales but the model knows only {model.cfg.num_levels}.")
    cfg_list = settings.per_scale("cfg", n_scales)
    subject_cfg_list = settings.per_scale("subject_cfg", n_scales)
    tau_list = settings.per_scale("tau", n_scales)
    if any(t <= 0 for t in tau_list):
        raise InputError(f"Temperatures must be positive, got {tau_list}.")
    B = text.features.shape[0]
    is_echogen = hasattr(model, "encode_conditions")
    if subject is not None and not is_echogen:
        raise InputError("A subject was given but the model is plain Infinity; load an EchoGen checkpoint.")

    if int(text.lengths.max()) > model.cfg.text_maxlen:  # as in training: only tiny custom models hit this
        log.warning("prompts cut to the model's %d text tokens", model.cfg.text_maxlen)
    text = text.to(model.device).clipped(model.cfg.text_maxlen)
    if negative is not None:
        negative = negative.to(model.device).clipped(model.cfg.text_maxlen)
    if subject is not None:
        model.check_subject(subject)
        subject = _broadcast_subject(subject.to(model.device), B)
        uncond = _unconditional_rows(model, text, negative)
        null = model.null_subject(B)
        rows_text = text.concat(text).concat(uncond)
        rows_subject = subject.concat(null).concat(null)
        guided, n_rows = True, 3
    else:
        guided = any(c != 1 for c in cfg_list)
        rows_text = text.concat(_unconditional_rows(model, text, negative)) if guided else text
        n_rows = 2 if guided else 1
        rows_subject = model.null_subject(n_rows * B) if is_echogen else None
    ctx = model.encode_conditions(rows_text, rows_subject) if is_echogen else model.encode_text(rows_text)
    # The transformer runs over row groups: all rows stacked (one group), or each guidance row's B images on
    # their own (low memory). Guidance combines the groups' logits before any random number is drawn.
    if settings.sequential_rows and n_rows > 1:
        for i, block in enumerate(model.blocks):  # the cross-attention K/V once for all rows, as when stacked
            ctx.kv(i, block)
        groups = [ctx.select(slice(g * B, (g + 1) * B)) for g in range(n_rows)]
    else:
        groups = [ctx]
    group_rows = n_rows * B // len(groups)
    caches = [model.new_cache(group_rows, schedule) for _ in groups]

    device = model.device
    generators = [torch.Generator(device=device).manual_seed(int(seed) + i) for i in range(B)]
    vae_grids = schedule.vae_grids(patchify)
    full = vae_grids[-1]
    summed = torch.zeros(B, vae.bits, *full, device=device)
    all_bits = []
    inputs = [model.first_tokens(g) for g in groups]
    for s, (h, w) in enumerate(schedule.grids):
        logits = torch.cat([model.forward_scale(x, g, schedule, s, cache)
                            for x, g, cache in zip(inputs, groups, caches)]).mul(1 / tau_list[s])
        logits = combine_guidance(logits, n_rows, cfg_list[s], subject_cfg_list[s])
        flat = logits.reshape(B, -1, 2)
        bits = torch.stack([sample_bits(flat[i], settings.top_k, settings.top_p, generators[i]) for i in range(B)])
        bits = tokens_to_vae_bits(bits.view(B, h, w, model.cfg.bits), patchify).to(torch.uint8)
        all_bits.append(bits)
        codes = vae.bits_to_codes(bits).to(device)
        summed = summed + resize_codes(codes, full)
        if s + 1 < n_scales:
            nxt = vae_to_token_layout(resize_codes(summed, vae_grids[s + 1]), patchify)
            x = model.embed_bits(nxt)  # the same image tokens in every guidance row
            inputs = [x if group_rows == B else x.repeat(group_rows // B, 1, 1)] * len(groups)
        if on_scale is not None:
            on_scale(s, n_scales, summed)
    images = decode_codes(vae, summed) if decode else None
    return GenerationResult(images=images, bits=all_bits, summed_codes=summed)


@torch.no_grad()
def decode_codes(vae, summed: torch.Tensor) -> torch.Tensor:
    """Summed codes (B, d, h, w) -> images (B, 3, H, W) in [-1, 1]. One image at a time: bounded VAE memory
    at 1024 px, and no batch-size-dependent conv arithmetic."""
    summed = summed.to(next(vae.parameters()).device)
    return torch.cat([vae.decode(summed[i:i + 1]) for i in range(summed.shape[0])])


@torch.no_grad()
def preview(vae, summed: torch.Tensor, max_grid: int = 16) -> torch.Tensor:
    """A cheap look at image 0 while sampling: the summed codes shrunk to at most `max_grid` tokens a side,
    then decoded (1/16 of a full decode's work at 1024 px). Returns uint8 (h, w, 3)."""
    h, w = summed.shape[-2:]
    f = max(1, math.ceil(max(h, w) / max_grid))
    codes = summed[:1] if f == 1 else resize_codes(summed[:1], (math.ceil(h / f), math.ceil(w / f)))
    return to_uint8(decode_codes(vae, codes))[0]


def combine_guidance(logits: torch.Tensor, n_rows: int, cfg: float, subject_cfg: float) -> torch.Tensor:
    """Merge the guidance rows (stacked along the batch) into one set of logits per image."""
    if n_rows == 1:
        return logits
    if n_rows == 2:
        cond, uncond = logits.chunk(2)
        return cond if cfg == 1 else cfg * cond + (1 - cfg) * uncond
    with_subject, text_only, neither = logits.chunk(3)
    return neither + cfg * (text_only - neither) + subject_cfg * (with_subject - text_only)


def _broadcast_subject(subject, batch: int):
    n = subject.semantic.shape[0]
    if n == batch:
        return subject
    if n == 1:
        return subject.select([0] * batch)
    raise InputError(f"Got {n} subjects for {batch} prompts; give one subject or one per prompt.")


def _unconditional_rows(model: Infinity, text: TextConditioning, negative: Optional[TextConditioning]):
    if negative is None:
        return model.empty_prompt(text.lengths)
    B = text.features.shape[0]
    if negative.features.shape[0] == 1 and B > 1:
        negative = negative.select([0] * B)
    if negative.features.shape[0] != B:
        raise InputError(f"Got {negative.features.shape[0]} negative prompts for {B} prompts; give one or {B}.")
    if negative.features.shape[-1] != text.features.shape[-1]:
        raise InputError("The negative prompt was encoded by a different text encoder than the prompt.")
    return negative


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3). Rounds to nearest; the official code truncates, which
    darkens every pixel by half a level on average."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
