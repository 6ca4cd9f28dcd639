"""Training: the BSQ tokenizer, the Infinity backbone (text-to-image) and EchoGen's injection, one code path.

Stages (``--stage``):
  tokenizer  the BSQ VAE: L1 + L2 reconstruction through the multi-scale quantiser, plus BSQ's commitment
             and entropy terms (computed here; bsq_vae.py's inference numerics are untouched).
  backbone   Infinity text-to-image, every weight trained.
  echogen    frozen Infinity + injection: only parameters with "control" in their name train, as the
             official recipe freezes everything else.

The transformer stages follow the official trainers (specs/infinity.md section 11, specs/echogen.md 1.7-1.9):
teacher forcing over the whole sequence in one forward pass with the block-causal mask; bitwise
self-correction (:func:`flip_requant`: per scale a flip probability drawn from {0, 0.01, ..., strength},
the flipped bits re-quantised and carried into the later scales' inputs and residuals, the labels kept
clean); a 2-class cross-entropy per bit, averaged over bits, tokens weighted by sqrt(area_last / area_s)
normalised over the sequence; the text, semantic and content conditions each dropped with p = 0.1
independently per sample (text -> the learned empty prompt ``cfg_uncond``, subject -> the learned null
features); AdamW betas (0.9, 0.97), weight decay 0.005 on matrices only (not biases, 1-D parameters or
the official no-decay keys), the multimodal-attention weights (``sa`` in the name) at 0.1x the learning
rate in the echogen stage, gradient clipping at 5, lr = base_lr x global_batch / 256 held constant; bf16
autocast and activation checkpointing on CUDA.

Distributed: launched by torchrun (``WORLD_SIZE`` in the environment) the trainer uses DDP (gloo on CPU,
nccl on CUDA), or FSDP (``--fsdp``, CUDA). Only rank 0 logs and writes files. Checkpoints hold the
trainable weights, the optimiser, the step and every random state, written atomically; resuming gives
exactly the run that was not interrupted. At the end the result is exported: an adapter safetensors
(echogen), an official-layout Infinity file (backbone) or a ``{"vae": ...}`` file (tokenizer).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .bsq_vae import BSQVAE, BSQVAEConfig, _resize
from .checkpoint import atomic_write, vae_metadata
from .echogen import EchoGen, EchoGenConfig, SubjectFeatures
from .errors import CheckpointError, InputError
from .infinity import Infinity, InfinityConfig
from .sampler import patchify_factor, resize_codes, vae_to_token_layout
from .schedules import ScaleSchedule
from .text_encoder import TextConditioning

STAGES = ("tokenizer", "backbone", "echogen")
CHECKPOINT_FORMAT = "echogen-train/1"
# Keys the official optimiser never decays (besides biases and 1-D parameters).
NO_DECAY_KEYS = ("cfg_uncond", "pos_start", "lvl_embed", "ada_gss", "scale_mul", "gamma", "beta",
                 "text_proj_for_sos.ca.mat_q")


# --------------------------------------------------------------------------------------------------------------
# Bitwise self-correction (teacher forcing with flipped bits)


@dataclass
class TeacherForcing:
    inputs: torch.Tensor      # (B, L - 1, d) next-scale inputs of scales 1.. (scale 0 is the SOS token)
    labels: torch.Tensor      # (B, L, d) int64 clean bits of every token (token layout)
    bits: list                # per scale (B, h, w, d_vae) uint8 clean bits, VAE layout
    used_bits: list           # per scale the bits the inputs were built from (flipped), VAE layout
    flip_probs: list          # per scale, the flip probability that was drawn


def _draw_flip_probability(strength: float, generator: torch.Generator) -> float:
    """Uniform over {0, 0.01, ..., strength} (the official np.random.randint(0, 100 * strength + 1) * 0.01)."""
    levels = int(round(100 * strength))
    return int(torch.randint(0, levels + 1, (1,), generator=generator)) * 0.01


@torch.no_grad()
def flip_requant(vae: BSQVAE, latent: torch.Tensor, schedule: ScaleSchedule, strength: float = 0.3,
                 apply_layers: int = 13, generator: Optional[torch.Generator] = None,
                 patchify: bool = False) -> TeacherForcing:
    """Bitwise self-correction (Infinity's ``flip_requant``), fp32.

    latent: the raw encoder output (B, d_vae, H, W) at the schedule's last VAE grid. For each scale s:
    residual = latent - cum (area-resized to the scale's grid except at the last scale) -> BSQ -> the clean
    bits are the label; for s < apply_layers a flip probability p is drawn and each bit flipped with
    probability p, and the code is re-quantised from the (flipped) bits; cum += bilinear-upsampled code;
    the next scale's input is cum bilinearly resized to the next grid. With p = 0 (or strength 0) the
    inputs are exactly the clean teacher-forcing inputs of ``sampler.next_scale_inputs`` for these bits.
    Random numbers come from `generator` (CPU), so runs are reproducible on any device."""
    grids = schedule.vae_grids(patchify)
    full = tuple(grids[-1])
    if tuple(latent.shape[-2:]) != full:
        raise InputError(f"The latent grid {tuple(latent.shape[-2:])} does not match the schedule's last grid {full} "
                         f"({schedule.describe()}); resize the image to {schedule.width}x{schedule.height}.")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    latent = latent.float()
    cum = 0
    bits_all, used_all, inputs, probs = [], [], [], []
    last = len(grids) - 1
    for s, grid in enumerate(grids):
        residual = latent - cum
        if s != last:
            residual = _resize(residual, tuple(grid), "area")
        q, bits = vae.quantizer.lfq(residual)
        bits_all.append(bits)
        p, used = 0.0, bits
        if s < apply_layers:
            p = _draw_flip_probability(strength, g) if strength > 0 else 0.0
            if p > 0:
                flip = (torch.rand(bits.shape, generator=g) < p).to(bits.device)
                used = bits ^ flip.to(torch.uint8)
            q = vae.bits_to_codes(used)
        probs.append(p)
        used_all.append(used)
        cum = cum + resize_codes(q, full)
        if s < last:
            inputs.append(vae_to_token_layout(resize_codes(cum, tuple(grids[s + 1])), patchify))
    labels = torch.cat([vae_to_token_layout(b.permute(0, 3, 1, 2).float(), patchify) for b in bits_all], dim=1)
    B = latent.shape[0]
    empty = latent.new_zeros(B, 0, labels.shape[-1])
    return TeacherForcing(inputs=torch.cat(inputs, dim=1) if inputs else empty, labels=labels.long(),
                          bits=bits_all, used_bits=used_all, flip_probs=probs)


# --------------------------------------------------------------------------------------------------------------
# Loss


def scale_weights(schedule: ScaleSchedule, reweight: bool = True) -> torch.Tensor:
    """(L,) token weights summing to 1: sqrt(area_last) / sqrt(area_s) per token of scale s (the official
    reweight_loss_by_scale), or uniform 1/L."""
    areas = torch.tensor([h * w for h, w in schedule.grids], dtype=torch.float64)
    per_scale = areas[-1].sqrt() / areas.sqrt() if reweight else torch.ones_like(areas)
    w = torch.repeat_interleave(per_scale, torch.tensor(schedule.tokens_per_scale))
    return (w / w.sum()).float()


def bitwise_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                 label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """logits (B, L, 2d) ([bit j is 0, bit j is 1] pairs), labels (B, L, d) in {0, 1}, weights (L,).
    Per-bit 2-class cross-entropy, mean over bits, weighted sum over tokens, mean over the batch."""
    B, L, two_d = logits.shape
    pair = logits.float().view(B, L, two_d // 2, 2)
    ce = F.cross_entropy(pair.permute(0, 3, 1, 2), labels, reduction="none", label_smoothing=label_smoothing)
    per_token = ce.mean(-1)                                                   # (B, L)
    loss = (per_token * weights.to(per_token.device)).sum(-1).mean()
    with torch.no_grad():
        correct = pair.argmax(-1) == labels
        stats = {"loss_mean": per_token.mean().item(), "bit_acc": correct.float().mean().item(),
                 "token_acc": correct.all(-1).float().mean().item()}
    return loss, stats


# --------------------------------------------------------------------------------------------------------------
# Condition dropout


@dataclass
class ConditionDrops:
    text: torch.Tensor       # (B,) bool: use the learned empty prompt
    semantic: torch.Tensor   # (B,) bool: use the learned null semantic tokens (CLS + patches)
    content: torch.Tensor    # (B,) bool: use the learned null content tokens


def draw_condition_drops(batch: int, generator: torch.Generator, text: float = 0.1, semantic: float = 0.1,
                         content: float = 0.1) -> ConditionDrops:
    """Independent per-sample Bernoulli draws, text first, then semantic, then content."""
    return ConditionDrops(torch.rand(batch, generator=generator) < text,
                          torch.rand(batch, generator=generator) < semantic,
                          torch.rand(batch, generator=generator) < content)


def apply_condition_drops(model: Infinity, text: TextConditioning, subject: Optional[SubjectFeatures],
                          drops: ConditionDrops):
    """Replace dropped rows (differentiably: the learned nulls receive gradients when trainable).
    Text: a dropped prompt becomes the first len_i rows of cfg_uncond (Infinity's cfg_uncond, as the
    official model.forward does). Subject: model.null_subject rows."""
    dev = text.features.device
    empty = model.empty_prompt(text.lengths).pad_to(text.max_len)
    feats = torch.where(drops.text.to(dev)[:, None, None], empty.features.to(dev), text.features)
    text = TextConditioning(feats, text.lengths)
    if subject is not None:
        null = model.null_subject(subject.semantic.shape[0])
        sem = torch.where(drops.semantic.to(dev)[:, None, None], null.semantic.to(dev), subject.semantic.to(dev))
        con = torch.where(drops.content.to(dev)[:, None, None], null.content.to(dev), subject.content.to(dev))
        subject = SubjectFeatures(sem, con)
    return text, subject


# --------------------------------------------------------------------------------------------------------------
# Forward modules (what DDP / FSDP wrap: every parameter is used inside their forward)


class TransformerForward(nn.Module):
    """Condition dropout, conditioning, then Infinity/EchoGen's full-sequence forward with the block-causal
    mask. The cross-attention keys of every block are computed before the blocks run, so a checkpointed
    block recomputes exactly what it computed the first time."""

    def __init__(self, model: Infinity):
        super().__init__()
        self.model = model

    def forward(self, text: TextConditioning, inputs: torch.Tensor, schedule: ScaleSchedule,
                drops: ConditionDrops, subject: Optional[SubjectFeatures] = None) -> torch.Tensor:
        m = self.model
        text, subject = apply_condition_drops(m, text, subject, drops)
        ctx = m.encode_conditions(text, subject) if isinstance(m, EchoGen) else m.encode_text(text)
        for i, block in enumerate(m.blocks):
            ctx.kv(i, block)
        return m(ctx, inputs, schedule)


def _binary_entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return -(p * p.log() + (1 - p) * (1 - p).log())


class TokenizerForward(nn.Module):
    """BSQ VAE training loss. The multi-scale quantisation runs exactly as MultiScaleBSQ.forward does
    (area-downsampled residual, BSQ with a straight-through estimator, bilinear upsampling, residual minus
    the detached code), so the decoder sees the inference-time code sum; alongside, per scale:
      commitment  ||u - sign code||^2 of the unit-normalised latent u (BSQ's commitment loss),
      entropy     mean per-position bit entropy minus the entropy of the batch-mean bit distribution
                  (BSQ's factorised entropy penalty: confident codes, all codes used), soft bit
                  probabilities sigmoid(2 tau u_i / sqrt(d)) with inverse temperature tau.
    Reconstruction: L1 + L2 on [-1, 1] pixels. (The released tokenizers also used perceptual and GAN losses,
    whose networks are not part of this pack.)"""

    def __init__(self, vae: BSQVAE, commit_weight: float = 0.25, entropy_weight: float = 0.1,
                 inv_temperature: float = 100.0):
        super().__init__()
        self.vae = vae
        self.commit_weight, self.entropy_weight, self.inv_temperature = commit_weight, entropy_weight, inv_temperature

    def quantize(self, h: torch.Tensor, grids) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h (B, d, H, W) -> (summed codes, commitment, entropy), the sum as MultiScaleBSQ.forward makes it."""
        full = tuple(h.shape[-2:])
        lfq = self.vae.quantizer.lfq
        residual, summed = h, 0
        commit, entropy = h.new_zeros(()), h.new_zeros(())
        for size in grids:
            size = tuple(size)
            r = residual if size == full else _resize(residual, size, "area")
            q, _ = lfq(r)
            u = F.normalize(r.permute(0, 2, 3, 1), dim=-1)                     # (B, h, w, d)
            commit = commit + (u - q.detach().permute(0, 2, 3, 1)).pow(2).sum(-1).mean()
            p = torch.sigmoid(2 * self.inv_temperature * lfq.scale * u)
            d = u.shape[-1]
            entropy = entropy + (_binary_entropy(p).sum(-1).mean() - _binary_entropy(p.mean((0, 1, 2))).sum()) / d
            q = q if size == full else _resize(q, full, "bilinear")
            residual = residual - q.detach()
            summed = summed + q
        n = len(grids)
        return summed, commit / n, entropy / n

    def forward(self, images: torch.Tensor, grids) -> tuple[torch.Tensor, dict]:
        h = self.vae.encoder(images).float()
        summed, commit, entropy = self.quantize(h, grids)
        rec = self.vae.decoder(summed)
        l1 = (rec - images).abs().mean()
        l2 = (rec - images).pow(2).mean()
        loss = l1 + l2 + self.commit_weight * commit + self.entropy_weight * entropy
        return loss, {"l1": l1.detach(), "l2": l2.detach(), "commit": commit.detach(), "entropy": entropy.detach()}


def tokenizer_grids(vae: BSQVAE, schedule: ScaleSchedule) -> list:
    """The schedule's grids on the VAE's latent (16 px per token: a stride-8 VAE quantises 2x finer grids)."""
    factor = 16 // vae.config.patch_size
    if factor < 1 or 16 % vae.config.patch_size:
        raise InputError(f"A VAE of stride {vae.config.patch_size} does not fit the 16-px-per-token schedules.")
    return [(h * factor, w * factor) for h, w in schedule.grids]


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each transformer block (and each EchoGen content-stream block) in the backward pass
    instead of storing its activations (the official 'full-block' checkpointing). Returns how many."""
    from torch.utils.checkpoint import checkpoint

    count = 0
    for block in getattr(model, "blocks", []):
        for name in ("forward", "content_stream"):
            fn = getattr(block, name, None)
            if fn is None or getattr(fn, "_echogen_checkpointed", False):
                continue

            def wrapped(*args, _fn=fn, **kwargs):
                if not torch.is_grad_enabled():
                    return _fn(*args, **kwargs)
                return checkpoint(_fn, *args, use_reentrant=False, **kwargs)

            wrapped._echogen_checkpointed = True
            setattr(block, name, wrapped)
            count += 1
    return count


# --------------------------------------------------------------------------------------------------------------
# Optimiser


def trainable_filter(stage: str) -> Callable[[str], bool]:
    if stage not in STAGES:
        raise InputError(f"Unknown stage {stage!r}; choose one of {', '.join(STAGES)}.")
    return (lambda name: "control" in name) if stage == "echogen" else (lambda name: True)


def set_trainable(model: nn.Module, stage: str) -> list[str]:
    """requires_grad on exactly the stage's trainable parameters; returns their names."""
    keep = trainable_filter(stage)
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(keep(name))
        if keep(name):
            names.append(name)
    if not names:
        raise InputError(f"Nothing to train in stage {stage}: the model has no "
                         f"{'control (EchoGen injection) ' if stage == 'echogen' else ''}parameters.")
    return names


def _clean_name(name: str) -> str:
    for prefix in ("_fsdp_wrapped_module.", "module.", "model.", "vae."):
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def is_multimodal_attention(name: str) -> bool:
    """The official 0.1x group: parameter names with an 'sa' component (the self-attention module that
    holds EchoGen's content-stream attention and the content read)."""
    return "sa" in name.split(".")


def build_param_groups(named_params, stage: str, lr: float, weight_decay: float = 0.005,
                       sa_lr_mult: float = 0.1, ndims: Optional[dict] = None) -> list[dict]:
    """Param groups of the trainable parameters: weight decay on matrices (ndim >= 2) except biases and the
    official no-decay keys; in the echogen stage the 'sa' weights at sa_lr_mult x lr. Each group records
    its 'lr_mult' (the schedule multiplies the current lr by it) and the parameter 'names'. `ndims` gives
    each parameter's true rank when the tensors seen here are flattened shards (FSDP)."""
    groups: dict = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        name = _clean_name(name)
        ndim = ndims.get(name, p.ndim) if ndims else p.ndim
        decay = ndim >= 2 and not name.endswith("bias") and not any(k in name for k in NO_DECAY_KEYS)
        mult = sa_lr_mult if stage == "echogen" and is_multimodal_attention(name) else 1.0
        g = groups.setdefault((decay, mult), {"params": [], "names": [], "lr": lr * mult, "lr_mult": mult,
                                              "weight_decay": weight_decay if decay else 0.0})
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups, key=lambda k: (not k[0], -k[1]))]


# --------------------------------------------------------------------------------------------------------------
# Distributed


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self):
        if self.distributed:
            torch.distributed.barrier()

    def close(self):
        if self.initialized_here and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def init_distributed(device: str = "auto") -> DistContext:
    """Read torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK); start the process group when more than
    one process runs (nccl on CUDA, gloo on CPU). Single process: nothing to start."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise InputError("--device cuda was given but CUDA is not available.")
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device(device if device not in ("auto",) else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    here = False
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
        here = True
    return DistContext(rank, world, local, dev, here)


# --------------------------------------------------------------------------------------------------------------
# The trainer


@dataclass
class TrainSettings:
    stage: str = "echogen"
    base_lr: float = 6e-5            # tblr: lr = base_lr x global batch / 256 (6e-5 in EchoGen's train.sh)
    batch_size: int = 4              # per process
    grad_accum: int = 1
    weight_decay: float = 0.005
    betas: tuple = (0.9, 0.97)
    grad_clip: float = 5.0
    sa_lr_mult: float = 0.1
    warmup_steps: int = 0
    bsc_strength: float = 0.3        # bitwise self-correction: flip probability up to this
    bsc_layers: int = 13             # ... on the first this-many scales
    text_drop: float = 0.1
    semantic_drop: float = 0.1
    content_drop: float = 0.1
    label_smoothing: float = 0.0
    reweight_by_scale: bool = True
    commit_weight: float = 0.25      # tokenizer stage
    entropy_weight: float = 0.1
    entropy_inv_temperature: float = 100.0
    seed: int = 0
    amp: str = "auto"                # auto (bf16 on CUDA) | bf16 | off
    checkpointing: str = "auto"      # auto (on with CUDA) | on | off
    fsdp: bool = False
    cache_features: bool = False     # keep VAE latents, text and subject features per sample (frozen encoders)

    def __post_init__(self):
        if self.stage not in STAGES:
            raise InputError(f"Unknown stage {self.stage!r}; choose one of {', '.join(STAGES)}.")
        self.betas = tuple(float(b) for b in self.betas)
        for name in ("text_drop", "semantic_drop", "content_drop", "bsc_strength"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise InputError(f"{name} must be in [0, 1], got {v}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise InputError("batch size and gradient accumulation must be at least 1")
        if self.amp not in ("auto", "bf16", "off"):
            raise InputError(f"amp must be auto, bf16 or off, got {self.amp!r}")
        if self.checkpointing not in ("auto", "on", "off"):
            raise InputError(f"checkpointing must be auto, on or off, got {self.checkpointing!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


def _rng_state(generator: torch.Generator) -> dict:
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(generator: torch.Generator, state: dict):
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def frozen_fingerprint(model: nn.Module, trainable: Callable[[str], bool]) -> str:
    """A cheap identity of the frozen weights (names, shapes, a few values of each): a resumed echogen run
    checks it is continuing on the same backbone."""
    h = hashlib.sha1()
    for name, t in model.state_dict().items():
        if trainable(name):
            continue
        flat = t.detach().reshape(-1)
        sample = torch.cat([flat[:16], flat[-16:]]).float().cpu() if flat.numel() else flat.float().cpu()
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def atomic_save(obj, path) -> None:
    """torch.save to a temporary file in the same folder, then rename: never a half-written checkpoint."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def model_config_dict(model: nn.Module) -> dict:
    if isinstance(model, BSQVAE):
        return {"kind": "bsq_vae", **asdict(model.config)}
    cfg = model.cfg
    return {"kind": "echogen" if isinstance(model, EchoGen) else "infinity", **cfg.to_dict()}


def model_from_config_dict(d: dict) -> nn.Module:
    d = dict(d)
    kind = d.pop("kind")
    if kind == "bsq_vae":
        return BSQVAE(BSQVAEConfig(**d))
    if kind == "echogen":
        return EchoGen(EchoGenConfig(**d))
    return Infinity(InfinityConfig(**d))


class Trainer:
    """One optimiser step = `grad_accum` micro-batches (Batch objects from data.collate).

    model: BSQVAE (tokenizer stage), Infinity (backbone) or EchoGen (echogen). vae: the frozen tokenizer
    (transformer stages). text_encoder: T5TextEncoder or any callable list[str] -> TextConditioning.
    subject_encoder: callable (B, 3, S, S) references in [0, 1] -> SubjectFeatures (echogen stage), e.g.
    make_subject_encoder(cfg, dinov2, content_encoder)."""

    def __init__(self, model: nn.Module, settings: TrainSettings, vae: Optional[BSQVAE] = None,
                 text_encoder=None, subject_encoder: Optional[Callable] = None,
                 dist: Optional[DistContext] = None, resume: Optional[dict] = None):
        self.settings = s = settings
        self.dist = dist or DistContext()
        self.device = self.dist.device
        self.stage = s.stage
        self._check_model(model, vae, text_encoder, subject_encoder)
        cuda = self.device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if (s.amp == "bf16" or (s.amp == "auto" and cuda)) else None
        self.trainable = trainable_filter(s.stage)
        model = model.float().to(self.device)
        set_trainable(model, s.stage)
        self.model = model.train()
        # The frozen weights never change: fingerprint them now (under FSDP they are sharded later).
        self.fingerprint = frozen_fingerprint(model, self.trainable) if s.stage == "echogen" else ""
        if resume is not None:
            self._load_model_state(resume)
        if s.checkpointing == "on" or (s.checkpointing == "auto" and cuda):
            enable_activation_checkpointing(model)
        self.vae = vae.float().to(self.device).eval().requires_grad_(False) if vae is not None else None
        self.patchify = patchify_factor(model, self.vae) if self.vae is not None and s.stage != "tokenizer" else False
        self.encode_text = getattr(text_encoder, "encode", text_encoder)
        self.subject_encoder = subject_encoder
        if s.stage == "tokenizer":
            forward = TokenizerForward(model, s.commit_weight, s.entropy_weight, s.entropy_inv_temperature)
        else:
            forward = TransformerForward(model)
        ndims = {_clean_name(n): p.ndim for n, p in forward.named_parameters()}  # before FSDP flattens them
        self.forward_module = self._wrap(forward)
        self.global_batch = s.batch_size * self.dist.world_size * s.grad_accum
        self.peak_lr = s.base_lr * self.global_batch / 256
        self.optimizer = torch.optim.AdamW(
            build_param_groups(self.forward_module.named_parameters(), s.stage, self.peak_lr, s.weight_decay,
                               s.sa_lr_mult, ndims),
            lr=self.peak_lr, betas=s.betas, **({"fused": True} if cuda else {"foreach": True}))
        self.generator = torch.Generator().manual_seed(s.seed + 1_000_003 * self.dist.rank)
        self.step = 0
        self._weights_cache: dict = {}
        self._features: dict = {"latent": {}, "text": {}, "subject": {}}
        if resume is not None:
            self._load_training_state(resume)

    # -- setup ------------------------------------------------------------------------------------------------
    def _check_model(self, model, vae, text_encoder, subject_encoder):
        stage = self.stage
        if stage == "tokenizer":
            if not isinstance(model, BSQVAE):
                raise InputError(f"The tokenizer stage trains a BSQVAE, got {type(model).__name__}.")
            return
        if not isinstance(model, Infinity):
            raise InputError(f"The {stage} stage trains an Infinity/EchoGen transformer, got {type(model).__name__}.")
        if stage == "echogen" and not isinstance(model, EchoGen):
            raise InputError("The echogen stage needs an EchoGen model (build one from the backbone with "
                             "echogen_from_backbone, or load echogen_2b.pth).")
        if stage == "backbone" and isinstance(model, EchoGen):
            raise InputError("The backbone stage trains plain Infinity; train EchoGen with --stage echogen.")
        if vae is None or text_encoder is None:
            raise InputError(f"The {stage} stage needs the frozen tokenizer (vae) and a text encoder.")
        if stage == "echogen" and subject_encoder is None:
            raise InputError("The echogen stage needs a subject encoder (DINOv2 + FLUX.1 VAE encoder).")

    def _wrap(self, module: nn.Module) -> nn.Module:
        if not self.dist.distributed:
            return module
        if self.settings.fsdp:
            if self.device.type != "cuda":
                raise InputError("--fsdp needs CUDA; on CPU the trainer uses DDP (gloo).")
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
            from torch.distributed.fsdp import ShardingStrategy

            # The root is the unit: Infinity runs its blocks from its own loop (and EchoGen runs the content
            # stream outside the blocks' forward), so only a root wrap gathers every weight a forward uses.
            return FSDP(module, device_id=self.device, sharding_strategy=ShardingStrategy.FULL_SHARD,
                        use_orig_params=True, sync_module_states=True, limit_all_gathers=True)
        from torch.nn.parallel import DistributedDataParallel as DDP

        # EchoGen's last content-stream block feeds nothing (only its keys/values are read): unused weights.
        return DDP(module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                   find_unused_parameters=self.stage == "echogen")

    @property
    def is_fsdp(self) -> bool:
        return type(self.forward_module).__name__ == "FullyShardedDataParallel"

    def lr_at(self, step: int) -> float:
        w = self.settings.warmup_steps
        return self.peak_lr * (min(1.0, (step + 1) / w) if w > 0 else 1.0)

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _weights(self, schedule: ScaleSchedule) -> torch.Tensor:
        key = (schedule, self.settings.reweight_by_scale)
        if key not in self._weights_cache:
            self._weights_cache[key] = scale_weights(schedule, self.settings.reweight_by_scale).to(self.device)
        return self._weights_cache[key]

    # -- one step -----------------------------------------------------------------------------------------------
    def micro_step(self, batch, scale: float) -> dict:
        """Forward + backward of one micro-batch (loss multiplied by `scale`); returns its statistics."""
        s = self.settings
        images = batch.target.to(self.device, torch.float32)
        if self.stage == "tokenizer":
            with self._autocast():
                loss, stats = self.forward_module(images, tokenizer_grids(self.model, batch.schedule))
            (loss * scale).backward()
            return {"loss": loss.item(), **{k: float(v) for k, v in stats.items()}}
        B = images.shape[0]
        drops = draw_condition_drops(B, self.generator, s.text_drop, s.semantic_drop, s.content_drop)
        with torch.no_grad():
            latent, text, subject = self.conditions(batch, images)
            tf = flip_requant(self.vae, latent, batch.schedule, s.bsc_strength, s.bsc_layers, self.generator,
                              self.patchify)
        with self._autocast():
            logits = self.forward_module(text, tf.inputs, batch.schedule, drops, subject)
        loss, stats = bitwise_loss(logits.float(), tf.labels.to(self.device), self._weights(batch.schedule),
                                   s.label_smoothing)
        (loss * scale).backward()
        stats.update(loss=loss.item(), flip_p=sum(tf.flip_probs) / len(tf.flip_probs),
                     text_dropped=float(drops.text.float().mean()))
        return stats

    @torch.no_grad()
    def conditions(self, batch, images: torch.Tensor):
        """(VAE latent, text conditioning, subject features or None) of a batch. With cache_features each
        sample is encoded alone and kept (so its features never depend on the rest of its batch)."""
        need_subject = self.stage == "echogen"
        if need_subject and batch.reference is None:
            raise InputError("The echogen stage needs reference images in the batch (reference_size).")
        if not self.settings.cache_features:
            latent = self.vae.encode_latent(images)
            text = self.encode_text(list(batch.captions))
            subject = self.subject_encoder(batch.reference.to(self.device)) if need_subject else None
        else:
            cache = self._features
            lat, texts, subs = [], [], []
            for i, (sid, caption) in enumerate(zip(batch.ids, batch.captions)):
                key = (sid, batch.schedule)
                if key not in cache["latent"]:
                    cache["latent"][key] = self.vae.encode_latent(images[i:i + 1]).cpu()
                lat.append(cache["latent"][key])
                if caption not in cache["text"]:
                    cache["text"][caption] = self.encode_text([caption]).to("cpu")
                texts.append(cache["text"][caption])
                if need_subject:
                    if sid not in cache["subject"]:
                        cache["subject"][sid] = self.subject_encoder(batch.reference[i:i + 1].to(self.device)).to("cpu")
                    subs.append(cache["subject"][sid])
            latent = torch.cat(lat).to(self.device)
            text = texts[0]
            for t in texts[1:]:
                text = text.concat(t)
            subject = None
            if need_subject:
                subject = SubjectFeatures(torch.cat([x.semantic for x in subs]), torch.cat([x.content for x in subs]))
        text = text.to(self.device).clipped(self.model.cfg.text_maxlen)
        return latent, text, (subject.to(self.device) if subject is not None else None)

    def train_step(self, batches: Sequence) -> dict:
        """One optimiser step over len(batches) == grad_accum micro-batches."""
        s = self.settings
        if len(batches) != s.grad_accum:
            raise InputError(f"train_step got {len(batches)} micro-batches, expected grad_accum={s.grad_accum}")
        t0 = time.time()
        lr = self.lr_at(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        stats_all = []
        for i, batch in enumerate(batches):
            sync = i == len(batches) - 1 or not hasattr(self.forward_module, "no_sync")
            with (nullcontext() if sync else self.forward_module.no_sync()):
                stats_all.append(self.micro_step(batch, 1.0 / len(batches)))
        if self.is_fsdp:
            grad_norm = self.forward_module.clip_grad_norm_(s.grad_clip)
        else:
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, s.grad_clip if s.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        stats = {k: sum(d[k] for d in stats_all) / len(stats_all) for k in stats_all[0]}
        stats.update(step=self.step, lr=lr, grad_norm=float(grad_norm), sec=time.time() - t0)
        return stats

    # -- state ----------------------------------------------------------------------------------------------------
    def model_state(self) -> dict:
        """The trainable weights (echogen: only 'control'; otherwise the whole state dict), on CPU.
        Under FSDP every rank must call this (it gathers); only rank 0 gets the tensors."""
        if self.is_fsdp:
            from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel as FSDP, StateDictType

            with FSDP.state_dict_type(self.forward_module, StateDictType.FULL_STATE_DICT,
                                      FullStateDictConfig(offload_to_cpu=True, rank0_only=True)):
                sd = {_clean_name(k): v for k, v in self.forward_module.state_dict().items()}
        else:
            sd = self.model.state_dict()
        return {k: v.detach().cpu().clone() for k, v in sd.items() if self.stage != "echogen" or self.trainable(k)}

    def optimizer_state(self) -> dict:
        if self.is_fsdp:
            from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, StateDictType

            with FSDP.state_dict_type(self.forward_module, StateDictType.FULL_STATE_DICT,
                                      FullStateDictConfig(offload_to_cpu=True, rank0_only=True),
                                      FullOptimStateDictConfig(offload_to_cpu=True, rank0_only=True)):
                return FSDP.optim_state_dict(self.forward_module, self.optimizer)
        return self.optimizer.state_dict()

    def state_dict(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, "stage": self.stage, "step": self.step,
                "settings": self.settings.to_dict(), "model_config": model_config_dict(self.model),
                "model": self.model_state(), "optimizer": self.optimizer_state(),
                "rng": self._all_rng_states(), "world_size": self.dist.world_size,
                "frozen_fingerprint": self.fingerprint}

    def _all_rng_states(self) -> list:
        """Every rank's random states (each rank draws its own dropout and flips), indexed by rank."""
        mine = _rng_state(self.generator)
        if not self.dist.distributed:
            return [mine]
        states = [None] * self.dist.world_size
        torch.distributed.all_gather_object(states, mine)
        return states

    def _load_model_state(self, state: dict):
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"Not a training checkpoint of this pack (format {state.get('format')!r}).")
        if state["stage"] != self.stage:
            raise CheckpointError(f"The checkpoint is from the {state['stage']} stage, not {self.stage}.")
        if state["model_config"] != model_config_dict(self.model):
            raise CheckpointError(f"The checkpoint's model {state['model_config']} differs from the model being "
                                  f"trained {model_config_dict(self.model)}.")
        if self.stage == "echogen" and state.get("frozen_fingerprint") not in ("", None, self.fingerprint):
            raise CheckpointError("The checkpoint was trained on a different frozen backbone than the one loaded now; "
                                  "give the same --backbone / --init as the interrupted run.")
        expected = [k for k in self.model.state_dict() if self.stage != "echogen" or self.trainable(k)]
        missing = [k for k in expected if k not in state["model"]]
        if missing:
            raise CheckpointError(f"The checkpoint lacks {len(missing)} weights, e.g. {missing[:5]}.")
        result = self.model.load_state_dict(state["model"], strict=False)
        if result.unexpected_keys:
            raise CheckpointError(f"The checkpoint has unknown weights {result.unexpected_keys[:5]}.")

    def _load_training_state(self, state: dict):
        if state.get("world_size", 1) != self.dist.world_size:
            print(f"warning: resuming a {state.get('world_size')}-process run on {self.dist.world_size} processes; "
                  "data order and random draws will differ from the uninterrupted run.", file=sys.stderr)
        osd = state["optimizer"]
        if self.is_fsdp:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            osd = FSDP.optim_state_dict_to_load(self.forward_module, self.optimizer, osd)
        self.optimizer.load_state_dict(osd)
        self.step = int(state["step"])
        states = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        if self.dist.rank < len(states):
            _set_rng_state(self.generator, states[self.dist.rank])
        else:  # more processes than the run that saved: new ranks get fresh, distinct streams
            self.generator.manual_seed(self.settings.seed + 1_000_003 * self.dist.rank + self.step)

    def save_checkpoint(self, path) -> None:
        """Every rank calls this (FSDP gathers); rank 0 writes atomically."""
        state = self.state_dict()
        if self.dist.is_main:
            atomic_save(state, path)
        self.dist.barrier()

    def export(self, path) -> dict:
        """Rank 0: the trained result in a loadable file (every rank must call it under FSDP)."""
        sd = self.model_state() if self.is_fsdp else None
        if not self.dist.is_main:
            return {}
        return export_model(self.model, path, self.stage, state=sd)


def load_checkpoint(path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise CheckpointError(f"Cannot read the training checkpoint {path}: {e}") from None


_PTH_VAE_GROUPS = ("{path}: this VAE uses norm_groups={groups}, which a .pth file cannot record (the loader reads the "
                   "group count off the tensor shapes). Export it as .safetensors, which carries it in its metadata.")


def export_model(model: nn.Module, path, stage: str, state: Optional[dict] = None) -> dict:
    """echogen: adapter safetensors (checkpoint.save_adapter), loadable with load_echogen(..., adapter=);
    backbone: the official flat Infinity state dict (.pth, or .safetensors), loadable with load_infinity;
    tokenizer: {"vae": state dict} (.pth) or a flat safetensors, loadable with load_vae."""
    from .checkpoint import save_adapter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if stage == "echogen":
        if state is not None:  # gathered weights (FSDP): write them without touching the sharded model
            view = type("AdapterView", (), {"cfg": model.cfg, "adapter_state_dict":
                                            lambda self: {k: v for k, v in state.items() if "control" in k}})()
            return {"kind": "adapter", **save_adapter(view, path)}
        return {"kind": "adapter", **save_adapter(model, path)}
    sd = state if state is not None else model.state_dict()
    sd = {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        meta = {"format": "pt", "echogen.family": "bsq_vae" if stage == "tokenizer" else "infinity"}
        if stage == "tokenizer":
            meta.update(vae_metadata(model.config))
        atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta))
    else:
        if stage == "tokenizer" and vae_metadata(model.config):
            raise InputError(_PTH_VAE_GROUPS.format(path=path, groups=model.config.norm_groups))
        atomic_save({"vae": sd} if stage == "tokenizer" else sd, path)
    return {"kind": stage, "tensors": len(sd), "bytes": path.stat().st_size}


# --------------------------------------------------------------------------------------------------------------
# Building models


def echogen_geometry(reference_size: int) -> dict:
    """Token counts of a reference crop: FLUX latent (S/8)^2 content tokens; DINOv2 at 7/8 S (448 for 512)
    with patch 14 -> (S/16)^2 + 1 semantic tokens."""
    if reference_size % 16:
        raise InputError(f"The reference size must be a multiple of 16 (512 or 256 for the real models), got {reference_size}")
    return {"content_len": (reference_size // 8) ** 2, "semantic_len": (reference_size // 16) ** 2 + 1}


@torch.no_grad()
def echogen_from_backbone(backbone, reference_size: int, semantic_dim: int = 768, content_dim: int = 16,
                          seed: int = 0) -> EchoGen:
    """A new EchoGen on an Infinity backbone (a model, a state dict or a file), with the official
    initialisation of the injection: EchoGen.init_control_from_backbone, and the learned null subject
    features as trunc_normal(std 1.2, generator seed 0) / sqrt(width) like the official model."""
    from .checkpoint import infer_infinity_config, infinity_state_dict

    if isinstance(backbone, Infinity):
        sd, cfg = backbone.state_dict(), backbone.cfg
    elif isinstance(backbone, dict):
        sd = backbone
        cfg = infer_infinity_config(sd)
    else:
        sd, _ = infinity_state_dict(backbone)
        cfg = infer_infinity_config(sd)
    if any("control" in k for k in sd):
        raise CheckpointError("The backbone already holds EchoGen weights; continue from it with --init instead.")
    ecfg = EchoGenConfig.from_backbone(cfg.backbone if isinstance(cfg, EchoGenConfig) else cfg,
                                       semantic_dim=semantic_dim, content_dim=content_dim,
                                       **echogen_geometry(reference_size))
    model = EchoGen(ecfg)
    result = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    bad = [k for k in result.missing_keys if "control" not in k and not k.endswith("zero_k_bias")]
    if bad or result.unexpected_keys:
        raise CheckpointError(f"The backbone does not fit EchoGen: missing {bad[:5]}, unexpected {result.unexpected_keys[:5]}")
    model.init_control_from_backbone(seed)
    for p in (model.control_features_uncond, model.control_features_refer_uncond):
        g = torch.Generator().manual_seed(0)
        p.copy_(torch.nn.init.trunc_normal_(torch.empty(p.shape), std=1.2, generator=g) / math.sqrt(p.shape[-1]))
    return model


def make_subject_encoder(cfg: EchoGenConfig, dinov2, content_encoder) -> Callable:
    """references (B, 3, S, S) in [0, 1] -> SubjectFeatures through subject.encode_subject."""
    from .subject import encode_subject

    def encode(reference01: torch.Tensor) -> SubjectFeatures:
        return encode_subject(reference01, cfg, dinov2, content_encoder)

    return encode


def _config_arg(text: Optional[str], presets: dict, cls, what: str, **defaults):
    if text is None:
        return None
    if text in presets:
        return presets[text]()
    try:
        data = json.loads(Path(text).read_text() if Path(text).is_file() else text)
    except (json.JSONDecodeError, OSError) as e:
        raise InputError(f"--config {text!r}: not a preset ({', '.join(presets)}) nor JSON: {e}") from None
    data = {**defaults, **data}
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InputError(f"--config: unknown {what} fields {unknown}; known: {sorted(names)}")
    try:
        return cls(**data)
    except (TypeError, ValueError) as e:
        raise InputError(f"--config: invalid {what}: {e}") from None


VAE_PRESETS = {"d32": BSQVAEConfig.d32, "d14_patchify": BSQVAEConfig.d14_patchify, "tiny": BSQVAEConfig.tiny}
INFINITY_PRESETS = {"2b": InfinityConfig.infinity_2b, "8b": InfinityConfig.infinity_8b,
                    "125m": InfinityConfig.infinity_125m, "tiny": InfinityConfig.tiny}


# --------------------------------------------------------------------------------------------------------------
# Command line


def add_train_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--stage", required=True, choices=STAGES,
                   help="tokenizer: the BSQ VAE; backbone: Infinity text-to-image; echogen: frozen backbone + injection")
    p.add_argument("--data", required=True, help="Subjects200K parquet file/folder, EchoGen JSONL file/folder, "
                                                 "triplet folder (NAME.ref.png/NAME.target.png/NAME.txt) or the sample folder")
    p.add_argument("--out", required=True, help="run folder: checkpoint-last.pt, metrics.jsonl and the export")
    g = p.add_argument_group("models")
    g.add_argument("--init", default=None, help="weights to start from: a BSQ VAE (tokenizer), an Infinity file "
                                                "(backbone) or an EchoGen file (echogen, with --backbone if split)")
    g.add_argument("--config", default=None, help="train from scratch: preset (tokenizer: d32, d14_patchify, tiny; "
                                                  "backbone: 2b, 8b, 125m, tiny) or JSON of config fields")
    g.add_argument("--backbone", default=None, help="echogen: the Infinity file to build EchoGen on (or the frozen "
                                                    "part of a split --init)")
    g.add_argument("--adapter", default=None, help="echogen: adapter safetensors to continue from (with --backbone)")
    g.add_argument("--vae", default=None, help="frozen BSQ VAE for the transformer stages")
    g.add_argument("--text-encoder", default=None, help="flan-t5 folder (Hugging Face layout)")
    g.add_argument("--dinov2", default=None, help="echogen: DINOv2 ViT-B/14 file or folder")
    g.add_argument("--content-vae", default=None, help="echogen: FLUX.1 VAE ae.safetensors or diffusers vae/ folder")
    g.add_argument("--reference-size", type=int, default=None,
                   help="echogen: reference crop (default: the model's; 512 for --size 1M, else 256, when new)")
    d = p.add_argument_group("data")
    d.add_argument("--kind", default="auto", choices=("auto", "subjects200k", "jsonl", "triplets", "sample"))
    d.add_argument("--min-quality", type=float, default=5.0, help="Subjects200K quality filter (0: keep all)")
    d.add_argument("--caption-mode", default=None, choices=("official", "full"),
                   help="official: EchoGen's dynamic-length captions (default for JSONL); full: as stored")
    d.add_argument("--short-caption-prob", type=float, default=0.5)
    d.add_argument("--size", default="1M", choices=("0.06M", "0.25M", "0.60M", "1M"), help="schedule size")
    d.add_argument("--num-scales", type=int, default=None, help="train on only the first N scales (smaller images)")
    d.add_argument("--ratio", type=float, default=None, help="one aspect template (h/w) for every sample "
                                                              "(default: each sample's nearest, batches bucketed)")
    d.add_argument("--workers", type=int, default=2, help="data loader processes")
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, required=True, help="optimiser steps in total (a resumed run continues to it)")
    o.add_argument("--batch-size", type=int, default=4, help="per process")
    o.add_argument("--grad-accum", type=int, default=1)
    o.add_argument("--lr", type=float, default=None, help="base lr (tblr), scaled by global batch / 256 "
                                                          "(default 6e-5 echogen, 6e-3 backbone, 1e-2 tokenizer)")
    o.add_argument("--weight-decay", type=float, default=0.005)
    o.add_argument("--betas", default="0.9,0.97")
    o.add_argument("--grad-clip", type=float, default=5.0)
    o.add_argument("--warmup-steps", type=int, default=0)
    o.add_argument("--sa-lr-mult", type=float, default=0.1, help="echogen: lr multiplier of the 'sa' weights")
    o.add_argument("--bsc-strength", type=float, default=0.3, help="bitwise self-correction: max flip probability")
    o.add_argument("--bsc-layers", type=int, default=13, help="bitwise self-correction on the first N scales")
    o.add_argument("--text-drop", type=float, default=0.1)
    o.add_argument("--semantic-drop", type=float, default=0.1)
    o.add_argument("--content-drop", type=float, default=0.1)
    o.add_argument("--label-smoothing", type=float, default=0.0)
    o.add_argument("--no-scale-reweight", action="store_true", help="uniform token weights instead of sqrt-area")
    o.add_argument("--commit-weight", type=float, default=0.25, help="tokenizer: BSQ commitment loss weight")
    o.add_argument("--entropy-weight", type=float, default=0.1, help="tokenizer: BSQ entropy loss weight")
    o.add_argument("--seed", type=int, default=0)
    r = p.add_argument_group("run")
    r.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    r.add_argument("--amp", default="auto", choices=("auto", "bf16", "off"), help="bf16 autocast (auto: on CUDA)")
    r.add_argument("--checkpointing", default="auto", choices=("auto", "on", "off"),
                   help="activation checkpointing per block (auto: on CUDA)")
    r.add_argument("--fsdp", action="store_true", help="shard with FSDP under torchrun (CUDA; large models)")
    r.add_argument("--cache-features", action="store_true",
                   help="keep each sample's VAE latent, text and subject features in memory (small data sets)")
    r.add_argument("--log-every", type=int, default=10)
    r.add_argument("--save-every", type=int, default=500, help="write checkpoint-last.pt every N steps (and at the end)")
    r.add_argument("--resume", default="auto", help="auto: continue from OUT/checkpoint-last.pt if present; never; or a file")
    r.add_argument("--export", default=None, help="result file (default OUT/adapter.safetensors, OUT/infinity.pth "
                                                  "or OUT/vae.pth)")
    return p


DEFAULT_LR = {"echogen": 6e-5, "backbone": 6e-3, "tokenizer": 1e-2}
DEFAULT_EXPORT = {"echogen": "adapter.safetensors", "backbone": "infinity.pth", "tokenizer": "vae.pth"}


def settings_from_args(args) -> TrainSettings:
    try:
        betas = tuple(float(b) for b in str(args.betas).split(","))
    except ValueError:
        raise InputError(f"--betas must be two numbers like 0.9,0.97, got {args.betas!r}") from None
    if len(betas) != 2:
        raise InputError(f"--betas must be two numbers like 0.9,0.97, got {args.betas!r}")
    return TrainSettings(
        stage=args.stage, base_lr=args.lr if args.lr is not None else DEFAULT_LR[args.stage],
        batch_size=args.batch_size, grad_accum=args.grad_accum, weight_decay=args.weight_decay, betas=betas,
        grad_clip=args.grad_clip, sa_lr_mult=args.sa_lr_mult, warmup_steps=args.warmup_steps,
        bsc_strength=args.bsc_strength, bsc_layers=args.bsc_layers, text_drop=args.text_drop,
        semantic_drop=args.semantic_drop, content_drop=args.content_drop, label_smoothing=args.label_smoothing,
        reweight_by_scale=not args.no_scale_reweight, commit_weight=args.commit_weight,
        entropy_weight=args.entropy_weight, seed=args.seed, amp=args.amp, checkpointing=args.checkpointing,
        fsdp=args.fsdp, cache_features=args.cache_features)


def _resume_state(args) -> Optional[dict]:
    if args.resume == "never":
        return None
    path = Path(args.out) / "checkpoint-last.pt" if args.resume == "auto" else Path(args.resume)
    if not path.is_file():
        if args.resume != "auto":
            raise InputError(f"--resume {path}: no such checkpoint.")
        return None
    return load_checkpoint(path)


def build_models(args, resume: Optional[dict], device) -> dict:
    """Everything the stage needs, from the command-line arguments (models on CPU, fp32)."""
    from .checkpoint import load_echogen, load_infinity, load_vae

    stage, out = args.stage, {}
    if stage == "tokenizer":
        if resume is not None:
            out["model"] = model_from_config_dict(resume["model_config"])
        elif args.init:
            out["model"] = load_vae(args.init, dtype=torch.float32)
        else:
            cfg = _config_arg(args.config, VAE_PRESETS, BSQVAEConfig, "BSQ VAE")
            if cfg is None:
                raise InputError("The tokenizer stage needs --init VAE_FILE or --config (d32, d14_patchify, tiny or JSON).")
            with torch.random.fork_rng(devices=[]):    # a VAE from scratch starts from the run's seed
                torch.manual_seed(args.seed)
                out["model"] = BSQVAE(cfg)
        return out
    if not args.vae or not args.text_encoder:
        raise InputError(f"The {stage} stage needs --vae (the frozen tokenizer) and --text-encoder (flan-t5 folder).")
    from .text_encoder import T5TextEncoder

    out["vae"] = load_vae(args.vae, dtype=torch.float32)
    out["text_encoder"] = T5TextEncoder.from_folder(args.text_encoder, device=device)  # fp16 on CUDA, as officially
    channels = out["text_encoder"].channels
    if stage == "backbone":
        if resume is not None:
            model = model_from_config_dict(resume["model_config"])
        elif args.init:
            model = load_infinity(args.init, dtype=torch.float32)
        else:
            cfg = _config_arg(args.config, INFINITY_PRESETS, InfinityConfig, "Infinity", text_channels=channels)
            if cfg is None:
                raise InputError("The backbone stage needs --init INFINITY_FILE or --config (2b, 8b, 125m, tiny or JSON).")
            if args.config in INFINITY_PRESETS:
                from dataclasses import replace

                cfg = replace(cfg, text_channels=channels)
            model = Infinity(cfg).init_weights(seed=args.seed)
        out["model"] = model
    else:
        if not args.dinov2 or not args.content_vae:
            raise InputError("The echogen stage needs --dinov2 and --content-vae (the subject encoders).")
        from .dinov2 import load_dinov2
        from .flux_vae import load_flux_vae_encoder

        dinov2 = load_dinov2(args.dinov2, device=device)
        content = load_flux_vae_encoder(args.content_vae, device=device)
        if args.init:
            model = load_echogen(args.init, backbone=args.backbone, adapter=args.adapter, dtype=torch.float32)
        elif args.backbone:
            if args.adapter:
                model = load_echogen(args.backbone, adapter=args.adapter, dtype=torch.float32)
            else:
                size = args.reference_size or (512 if args.size == "1M" else 256)
                model = echogen_from_backbone(args.backbone, size, semantic_dim=dinov2.cfg.embed_dim,
                                              content_dim=16, seed=args.seed)
        else:
            raise InputError("The echogen stage needs --backbone INFINITY_FILE (new injection) or --init ECHOGEN_FILE.")
        out["model"] = model
        out["subject_encoder"] = make_subject_encoder(model.cfg, dinov2, content)
    if out["model"].cfg.text_channels != channels:
        raise InputError(f"The text encoder gives {channels}-wide features but the model takes "
                         f"{out['model'].cfg.text_channels}.")
    patchify_factor(out["model"], out["vae"])  # raises if the tokenizer and the transformer do not pair
    return out


def run_train(args) -> int:
    from .data import BucketBatchSampler, PairDataset, collate, open_source

    dist = init_distributed(args.device)
    try:
        settings = settings_from_args(args)
        out_dir = Path(args.out)
        if dist.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
        resume = _resume_state(args)
        parts = build_models(args, resume, dist.device)
        model = parts.pop("model")
        export = Path(args.export) if args.export else out_dir / DEFAULT_EXPORT[args.stage]
        if args.stage == "tokenizer" and export.suffix != ".safetensors" and vae_metadata(model.config):
            if args.export:  # asked for .pth explicitly: refuse now rather than after hours of training
                raise InputError(_PTH_VAE_GROUPS.format(path=export, groups=model.config.norm_groups))
            export = export.with_suffix(".safetensors")
            if dist.is_main:
                print(f"norm_groups={model.config.norm_groups} needs the file's metadata: exporting {export}",
                      file=sys.stderr)
        reference_size = None
        if args.stage == "echogen":
            from .subject import reference_geometry

            reference_size = reference_geometry(model.cfg)[0]
            if args.reference_size and args.reference_size != reference_size:
                raise InputError(f"--reference-size {args.reference_size} but the model takes a {reference_size} crop.")
        trainer = Trainer(model, settings, dist=dist, resume=resume, **parts)
        source = open_source(args.data, args.kind, min_quality=args.min_quality, caption_mode=args.caption_mode,
                             short_caption_prob=args.short_caption_prob, seed=args.seed)
        dataset = PairDataset(source, size=args.size, num_scales=args.num_scales, reference_size=reference_size,
                              ratio=args.ratio)
        sampler = BucketBatchSampler(dataset, settings.batch_size, seed=args.seed, rank=dist.rank,
                                     world_size=dist.world_size, start_step=trainer.step * settings.grad_accum)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                             num_workers=args.workers, persistent_workers=args.workers > 0)
        log = (lambda m: print(m, file=sys.stderr, flush=True)) if dist.is_main else (lambda m: None)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log(f"stage {args.stage}: {len(dataset)} samples ({type(source).__name__}), {n_train / 1e6:.2f}M trainable "
            f"parameters, {dist.world_size} process(es) on {dist.device}, global batch {trainer.global_batch}, "
            f"lr {trainer.peak_lr:.3g}, amp {trainer.amp_dtype or 'off'}"
            + (f"; resuming at step {trainer.step}" if resume is not None else ""))
        if trainer.step >= args.steps:
            log(f"already at step {trainer.step} >= --steps {args.steps}; exporting only")
        metrics = open(out_dir / "metrics.jsonl", "a", encoding="utf-8") if dist.is_main else None
        batches = iter(loader)
        try:
            while trainer.step < args.steps:
                stats = trainer.train_step([next(batches) for _ in range(settings.grad_accum)])
                if metrics is not None:
                    metrics.write(json.dumps(stats) + "\n")
                    metrics.flush()
                if trainer.step % args.log_every == 0 or trainer.step == args.steps:
                    extra = "".join(f" {k} {stats[k]:.4f}" for k in ("bit_acc", "token_acc", "l1", "commit") if k in stats)
                    log(f"step {trainer.step}/{args.steps} loss {stats['loss']:.4f}{extra} grad {stats['grad_norm']:.3f} "
                        f"lr {stats['lr']:.3g} {stats['sec']:.2f}s")
                if trainer.step % args.save_every == 0 and trainer.step < args.steps:
                    trainer.save_checkpoint(out_dir / "checkpoint-last.pt")
        finally:
            if metrics is not None:
                metrics.close()
        trainer.save_checkpoint(out_dir / "checkpoint-last.pt")
        info = trainer.export(export)
        if dist.is_main:
            print(f"step {trainer.step}: wrote {out_dir / 'checkpoint-last.pt'} and {export} "
                  f"({info.get('tensors')} tensors, {info.get('bytes', 0) / 1e6:.2f} MB)")
        dist.barrier()
        return 0
    finally:
        dist.close()
