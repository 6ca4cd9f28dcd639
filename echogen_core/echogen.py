"""EchoGen (arXiv 2509.26127): subject-driven generation on a frozen Infinity backbone.

Two injections, both trained ("control" in every new parameter name), everything else frozen Infinity:

Semantic path (identity), from DINOv2 ViT-B/14 tokens:
  * patch tokens -> semantic MLP -> per-block K/V appended after the text K/V of the cross-attention
    (one softmax over prompt + subject keys);
  * the CLS token -> a global token prepended before SOS (same level embedding and RoPE position), and
    the same projected CLS -> `control_shared_ada_lin`, added to Infinity's shared AdaLN output.

Content path (detail), from the FLUX.1 VAE latent of the reference (16 x 64 x 64 -> 4096 tokens):
  * a parallel stream per block with its own weights (AdaLN, cosine self-attention, text cross-attention,
    FFN). Content tokens attend only to content tokens, so the whole stream is independent of the image
    tokens: it runs once per (subject, prompt) and its per-block keys/values are reused at every scale, and
    across generations (ContentCache: a new seed for the same subject and prompt runs no stream at all).
  * image queries read the content keys/values through a second softmax; that read goes through the
    zero-initialised `sa.control_attn` and is added before the frozen output projection.

Names and shapes follow the released `echogen_2b.pth` (specs/echogen.md section 7). The official code is
the reference where it and the paper differ (two softmaxes for the content read, AdaLN sum).
"""
from __future__ import annotations

import hashlib
import itertools
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .infinity import (FFN, Block, CrossAttention, Infinity, InfinityConfig, SelfAttention, TextContext,
                       layer_norm_fp32)
from .errors import InputError
from .text_encoder import TextConditioning


@dataclass(frozen=True)
class EchoGenConfig(InfinityConfig):
    semantic_dim: int = 768     # DINOv2 ViT-B/14 width
    semantic_len: int = 1025    # CLS + 32x32 patches (448 px); 257 for the 256-px model
    content_dim: int = 16       # FLUX.1 VAE latent channels
    content_len: int = 4096     # 64x64 latent of the 512 px reference; 1024 for the 256-px model

    @classmethod
    def from_backbone(cls, backbone: InfinityConfig, **extra) -> "EchoGenConfig":
        return cls(**{f.name: getattr(backbone, f.name) for f in fields(InfinityConfig)}, **extra)

    @property
    def backbone(self) -> InfinityConfig:
        return InfinityConfig(**{f.name: getattr(self, f.name) for f in fields(InfinityConfig)})

    @classmethod
    def echogen_2b(cls) -> "EchoGenConfig":
        return cls.from_backbone(InfinityConfig.infinity_2b())

    @classmethod
    def echogen_small(cls) -> "EchoGenConfig":
        """EchoGen-0.1B: the 125M (layer12) backbone at 256 px."""
        return cls.from_backbone(InfinityConfig.infinity_125m(), semantic_len=257, content_len=1024)

    @classmethod
    def tiny(cls, **overrides) -> "EchoGenConfig":
        extra = {k: overrides.pop(k) for k in ("semantic_dim", "semantic_len", "content_dim", "content_len")
                 if k in overrides}
        extra = {"semantic_dim": 32, "semantic_len": 17, "content_dim": 4, "content_len": 16, **extra}
        return cls.from_backbone(InfinityConfig.tiny(**overrides), **extra)

    def preset_name(self) -> Optional[str]:
        name = self.backbone.preset_name()
        return None if name is None else name.replace("Infinity", "EchoGen")


@dataclass
class SubjectFeatures:
    """What the encoders produce for a batch of references (or the learned nulls)."""

    semantic: torch.Tensor   # (B, Ls, Ds): DINOv2 final-norm CLS + patch tokens
    content: torch.Tensor    # (B, Lc, Dc): FLUX.1 VAE posterior mean, flattened row-major

    def select(self, idx):
        return SubjectFeatures(self.semantic[idx], self.content[idx])

    def to(self, device) -> "SubjectFeatures":
        return SubjectFeatures(self.semantic.to(device, torch.float32), self.content.to(device, torch.float32))

    def concat(self, other: "SubjectFeatures") -> "SubjectFeatures":
        return SubjectFeatures(torch.cat([self.semantic, other.semantic]), torch.cat([self.content, other.content]))


# --------------------------------------------------------------------------------------------------------------
# Per-block modules


class EchoGenSelfAttention(SelfAttention):
    """Infinity's self-attention plus the content stream's own attention and the gated content read."""

    def __init__(self, width: int, num_heads: int):
        super().__init__(width, num_heads)
        self.control_mat_q = nn.Linear(width, width, bias=False)
        self.control_q_bias = nn.Parameter(torch.zeros(width))
        self.control_mat_kv = nn.Linear(width, 2 * width, bias=False)
        self.control_v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("control_zero_k_bias", torch.zeros(width))
        self.control_scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
        self.control_proj = nn.Linear(width, width)
        self.control_attn = nn.Linear(width, width, bias=False)  # zero-initialised gate

    def content_qkv(self, y: torch.Tensor):
        """Content tokens y (B, Lc, C) -> cosine-normalised q (scaled), k, and v, each (B, H, Lc, hd).
        No positional encoding: content tokens are an unordered set."""
        B, L, C = y.shape
        q = F.linear(y, self.control_mat_q.weight, self.control_q_bias)
        kv = F.linear(y, self.control_mat_kv.weight, torch.cat((self.control_zero_k_bias, self.control_v_bias)))
        q = q.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = kv.view(B, L, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        temperature = self.control_scale_mul_1H11.float().clamp_max(self.max_scale_mul).exp()
        q = F.normalize(q.float(), dim=-1, eps=1e-12) * temperature
        k = F.normalize(k.float(), dim=-1, eps=1e-12)
        return q.to(v.dtype), k.to(v.dtype), v

    def content_self_attention(self, y: torch.Tensor):
        """The content stream's attention: content queries see content keys only.
        Returns (output (B, Lc, C), (k, v) for the image tokens' read)."""
        B, L, C = y.shape
        q, k, v = self.content_qkv(y)
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        # v is a view into the fused k|v projection; a dense copy lets that buffer (raw keys included) go.
        return self.control_proj(out.transpose(1, 2).reshape(B, L, C)), (k, v.contiguous())

    def forward(self, x, rope, attn_mask=None, cache=None, layer: int = 0, content: "ContentMemory" = None):
        B, L, C = x.shape
        q, k, v = self.qkv(x, rope)
        q, k = q.to(v.dtype), k.to(v.dtype)
        if cache is not None:
            k, v = cache.write(layer, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=1.0).transpose(1, 2).reshape(B, L, C)
        if content is not None:  # second softmax over the reference's content tokens
            read = content.read(layer, q).transpose(1, 2).reshape(B, L, C)
            out = out + self.control_attn(read)
        return self.proj(out)


class EchoGenCrossAttention(CrossAttention):
    """Text cross-attention whose key set is extended by the subject's semantic tokens."""

    def __init__(self, width: int, kv_width: int, num_heads: int):
        super().__init__(width, kv_width, num_heads)
        self.control_mat_kv = nn.Linear(width, 2 * width, bias=False)
        self.control_v_bias = nn.Parameter(torch.zeros(width))

    def project_semantic_kv(self, tokens: torch.Tensor):
        B, Ls, _ = tokens.shape
        w = self.control_mat_kv.weight
        bias = torch.cat((torch.zeros_like(self.control_v_bias), self.control_v_bias)).to(w.dtype)
        kv = F.linear(tokens.to(w.dtype), w, bias)
        k, v = kv.view(B, Ls, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return k, v


class EchoGenBlock(Block):
    def __init__(self, cfg: InfinityConfig):
        super().__init__(cfg)
        C = cfg.width
        self.sa = EchoGenSelfAttention(C, cfg.num_heads)
        self.ca = EchoGenCrossAttention(C, C, cfg.num_heads)
        self.control_ada_gss = nn.Parameter(torch.zeros(1, 1, 6, C))
        self.control_ca = CrossAttention(C, C, cfg.num_heads)
        self.control_ca_norm = nn.LayerNorm(C, eps=cfg.norm_eps)
        self.control_ffn = FFN(C, cfg.mlp_hidden)

    def cross_kv(self, ctx: "EchoGenContext"):
        k, v = self.ca.project_kv(ctx.tokens)
        ks, vs = self.ca.project_semantic_kv(ctx.semantic_tokens)
        mask = torch.cat([ctx.key_mask, ctx.key_mask.new_ones(ctx.semantic_tokens.shape[:2])], dim=1)
        return torch.cat([k, ks], dim=2), torch.cat([v, vs], dim=2), mask

    def self_attention(self, h, ctx: "EchoGenContext", rope, attn_mask, cache, layer):
        return self.sa(h, rope, attn_mask, cache, layer, content=ctx.content)

    def content_stream(self, y, ctx: "EchoGenContext", layer: int):
        """One block of the content stream. y (B, Lc, C) fp32 -> (new y, (k, v) for the image read)."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.control_ada_gss.float() + ctx.content_ada).unbind(2)
        dt = self.dtype
        h = layer_norm_fp32(y, self.eps) * (1 + scale1) + shift1
        out, kv = self.sa.content_self_attention(h.to(dt))
        y = y + out.float() * gamma1
        k, v = self.control_ca.project_kv(ctx.tokens)
        h = layer_norm_fp32(y, self.eps, self.control_ca_norm.weight, self.control_ca_norm.bias)
        y = y + self.control_ca(h.to(dt), k, v, ctx.key_mask).float()
        h = layer_norm_fp32(y, self.eps) * (1 + scale2) + shift2
        y = y + self.control_ffn(h.to(dt)).float() * gamma2
        return y, kv


# --------------------------------------------------------------------------------------------------------------
# The model


def distinct_rows(*tensors: torch.Tensor) -> tuple[list[int], list[int]]:
    """Rows that are equal in every tensor share a representative.
    Returns (representative row of each distinct group, group of every row)."""
    reps, group = [], []
    for i in range(tensors[0].shape[0]):
        for g, r in enumerate(reps):
            if all(torch.equal(t[i], t[r]) for t in tensors):
                group.append(g)
                break
        else:
            group.append(len(reps))
            reps.append(i)
    return reps, group


def row_keys(rows: list, *tensors: torch.Tensor) -> list:
    """A digest of the bytes (and shape and dtype) of each given row across `tensors`: what identifies a row's
    inputs for the ContentCache. One host copy per tensor, so one synchronisation per generation, before the
    scale loop."""
    host = [t.detach().to("cpu").contiguous() for t in tensors]
    keys = []
    for r in rows:
        digest = hashlib.blake2b(digest_size=20)
        for t in host:
            row = t[r]
            digest.update(f"{row.dtype}{tuple(row.shape)}".encode())
            digest.update(row.reshape(-1).view(torch.uint8).numpy())
        keys.append(digest.digest())
    return keys


@dataclass
class ContentMemory:
    """The content stream's per-block keys/values, kept once per distinct (subject, prompt) row.

    A batch of B images of one subject and prompt under three-row guidance has 3B rows but only three
    distinct content streams; storing 3 instead of 3B keeps the 2B model's content K/V at ~1 GB per row
    instead of ~1 GB per image and row.

    Per block, the U distinct streams are either stacked, (k, v) each (U, H, Lc, hd), when they were computed
    together (training, or the cache off), or kept apart, a list of U pairs (k, v) each (1, H, Lc, hd), when
    they come from the cross-generation ContentCache (where each row lives and is evicted on its own) or from
    `select`. Streams kept apart are read with one attention call each rather than copied into a stack."""

    kv: list                          # per block: stacked (k, v), or a list of one (k, v) per stream
    group: Optional[list] = None      # stream of every row; None when all rows are distinct and in order
    _readers: Optional[list] = field(default=None, init=False, repr=False)  # see _stream_readers

    @property
    def num_streams(self) -> int:
        kv = self.kv[0]
        return len(kv) if isinstance(kv, list) else kv[0].shape[0]

    @property
    def num_rows(self) -> int:
        return len(self.group) if self.group is not None else self.num_streams

    def stream(self, layer: int, u: int):
        """(k, v) of stream u at one block, each (1, H, Lc, hd) (a view)."""
        kv = self.kv[layer]
        if isinstance(kv, list):
            return kv[u]
        k, v = kv
        return k[u:u + 1], v[u:u + 1]

    def rows(self, layer: int):
        """(k, v) expanded to one per row (materialised: for inspection and tests)."""
        k, v = (torch.cat(t) for t in zip(*[self.stream(layer, u) for u in range(self.num_streams)]))
        if self.group is None:
            return k, v
        idx = torch.tensor(self.group, device=k.device)
        return k[idx], v[idx]

    def select(self, rows) -> "ContentMemory":
        """The memory of some rows (a slice or indices; one guidance group): only the streams those rows
        read, kept apart as views."""
        group = self.group if self.group is not None else list(range(self.num_streams))
        picked = [group[r] for r in (range(len(group))[rows] if isinstance(rows, slice) else map(int, rows))]
        used = list(dict.fromkeys(picked))  # in order of first use
        kv = [[self.stream(layer, u) for u in used] for layer in range(len(self.kv))]
        renumbered = [used.index(u) for u in picked]
        return ContentMemory(kv, None if renumbered == list(range(len(used))) else renumbered)

    def read(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Image queries q (R, H, L, hd) attend to their row's content tokens -> (R, H, L, hd).
        Rows sharing a content stream are stacked along the sequence axis of one attention call
        (the read has no mask and no causality, so this is exact) instead of copying K/V per row."""
        if isinstance(self.kv[layer], list):
            return self._read_apart(self.kv[layer], q)
        k, v = self.kv[layer]
        if self.group is None:
            return F.scaled_dot_product_attention(q, k, v, scale=1.0)
        R, H, L, hd = q.shape
        U = k.shape[0]
        out = torch.empty_like(q)
        sizes = [self.group.count(g) for g in range(U)]
        if len(set(sizes)) == 1:  # the usual case: equal groups, one call
            order = sorted(range(R), key=lambda r: self.group[r])
            n = sizes[0]
            idx = torch.tensor(order, device=q.device)
            grouped = q[idx].view(U, n, H, L, hd).transpose(1, 2).reshape(U, H, n * L, hd)
            read = F.scaled_dot_product_attention(grouped, k, v, scale=1.0)
            out[idx] = read.view(U, H, n, L, hd).transpose(1, 2).reshape(R, H, L, hd)
            return out
        for g in range(U):
            rows = torch.tensor([r for r in range(R) if self.group[r] == g], device=q.device)
            out[rows] = F.scaled_dot_product_attention(q[rows].transpose(0, 1).reshape(1, H, -1, hd),
                                                       k[g:g + 1], v[g:g + 1], scale=1.0
                                                       ).view(H, len(rows), L, hd).transpose(0, 1)
        return out

    def _read_apart(self, streams: list, q: torch.Tensor) -> torch.Tensor:
        """The read with the streams kept apart: one attention call per stream, over the queries of its rows."""
        R, H, L, hd = q.shape
        out = torch.empty_like(q)
        for (k, v), (rows, n) in zip(streams, self._stream_readers(q.device)):
            read = F.scaled_dot_product_attention(q[rows].transpose(0, 1).reshape(1, H, n * L, hd), k, v, scale=1.0)
            out[rows] = read.view(H, n, L, hd).transpose(0, 1)
        return out

    def _stream_readers(self, device) -> list:
        """Per stream, (the rows that read it, how many): a slice when they are consecutive (a view), else an
        index tensor. Worked out once, not at every block and scale."""
        if self._readers is None:
            group = self.group if self.group is not None else list(range(self.num_rows))
            self._readers = []
            for u in range(self.num_streams):
                rows = [r for r, g in enumerate(group) if g == u]
                consecutive = rows == list(range(rows[0], rows[0] + len(rows)))
                pick = slice(rows[0], rows[0] + len(rows)) if consecutive else torch.tensor(rows, device=device)
                self._readers.append((pick, len(rows)))
        return self._readers


class ContentCache:
    """Content-stream K/V of recent rows, kept across generations: least recently used out, at most
    `capacity` rows (0 turns it off).

    The stream depends only on a row's inputs (reference latent, DINOv2 CLS, prompt features and mask) and on
    the weights, never on the image tokens or the seed. Re-queueing one subject and prompt with new seeds
    finds all three rows here, and the unconditional row (learned empty prompt + null subject) recurs in
    every generation whose prompt has the same number of tokens.

    Memory: a row holds every block's content keys and values, depth x 2 x content_len x width values in the
    blocks' dtype, and stays allocated between generations: about 1 GB per row for EchoGen-2B at 1024 px
    (32 x 2 x 4096 x 2048 x 2 bytes, bf16), 75 MB for EchoGen-small on the CPU (fp32). The default, 3 rows,
    is one three-row guidance generation of one image.

    Rows are valid only for the weights they were computed with: the cache keeps a fingerprint of every
    parameter and buffer (storage address, version counter, dtype, device, shape) and empties itself when it
    changes. In-place updates (optimizer steps, load_state_dict, copy_) bump the version counter; `.to()`,
    `.half()` and replaced parameters change the address. Writes through `.data`, and in-place writes to
    tensors made under torch.inference_mode, bypass the version counter: call `EchoGen.clear_content_cache()`
    after them."""

    def __init__(self, capacity: int = 3):
        self.capacity = capacity
        self.rows: "OrderedDict[bytes, list]" = OrderedDict()  # row key -> per block (k, v), each (1, H, Lc, hd)
        self.weights: Optional[tuple] = None                   # fingerprint the rows were computed with
        self.hits = 0    # rows served from the cache (counters for tests and benchmarks)
        self.misses = 0  # rows computed

    def __len__(self) -> int:
        return len(self.rows)

    def clear(self) -> None:
        self.rows.clear()
        self.weights = None

    def check_weights(self, fingerprint: tuple) -> None:
        if fingerprint != self.weights:
            self.clear()
            self.weights = fingerprint

    def get(self, key: bytes) -> Optional[list]:
        kv = self.rows.get(key)
        if kv is not None:
            self.rows.move_to_end(key)
        return kv

    def make_room(self, n: int, keep=()) -> None:
        """Evict least recently used rows, other than `keep`, until n more fit. Called before the new rows are
        computed, so that evicted rows are freed before the new ones are allocated."""
        for key in list(self.rows):
            if len(self.rows) + n <= self.capacity:
                break
            if key not in keep:
                del self.rows[key]

    def put(self, key: bytes, kv: list) -> None:
        if self.capacity <= 0:
            return
        self.rows[key] = kv
        self.rows.move_to_end(key)
        while len(self.rows) > self.capacity:
            self.rows.popitem(last=False)


def _own_row(t: torch.Tensor, i: int) -> torch.Tensor:
    """Row i of a batch as a tensor with its own storage, so that a cached row frees on its own eviction."""
    return t if t.shape[0] == 1 else t[i:i + 1].clone()


@dataclass
class EchoGenContext(TextContext):
    global_token: Optional[torch.Tensor] = None     # (B, C) projected DINO CLS
    semantic_tokens: Optional[torch.Tensor] = None  # (B, Ls - 1, C) patch tokens after the semantic MLP
    content_ada: Optional[torch.Tensor] = None      # (B, 1, 6, C) content-stream AdaLN
    content: Optional[ContentMemory] = None         # the content stream's K/V, once per distinct row


class EchoGen(Infinity):
    num_prefix = 1  # the global subject token before SOS

    def __init__(self, cfg: EchoGenConfig):
        super().__init__(cfg)
        C = cfg.width
        self.control_features_uncond = nn.Parameter(torch.zeros(cfg.semantic_len, cfg.semantic_dim))
        self.control_features_refer_uncond = nn.Parameter(torch.zeros(cfg.content_len, cfg.content_dim))
        self.control_pos_start = nn.Parameter(torch.zeros(1, 1, C))
        self.control_proj_for_ca = nn.Sequential(nn.Linear(cfg.semantic_dim, C), nn.GELU(approximate="tanh"), nn.Linear(C, C))
        self.control_proj_for_ca_refer = nn.Sequential(nn.Linear(cfg.content_dim, C), nn.GELU(approximate="tanh"), nn.Linear(C, C))
        self.control_proj_for_sos = nn.Linear(cfg.semantic_dim, C)
        self.control_shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.control_shared_ada_lin_refer = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.control_shared_ada_lin_refer_dino = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.content_cache = ContentCache()  # content-stream K/V of recent rows, across generations

    def make_block(self, cfg):
        return EchoGenBlock(cfg)

    # -- the cross-generation content cache ---------------------------------------------------------------------
    def clear_content_cache(self) -> None:
        self.content_cache.clear()

    def uses_content_cache(self) -> bool:
        """Inference only: training changes the weights at every step and needs the stream's graph."""
        return self.content_cache.capacity > 0 and not self.training and not torch.is_grad_enabled()

    def weights_fingerprint(self) -> tuple:
        """Identifies the current weights without reading them (see ContentCache)."""
        return tuple((t.data_ptr(), -1 if t.is_inference() else t._version, t.dtype, t.device, tuple(t.shape))
                     for t in itertools.chain(self.parameters(), self.buffers()))

    def _apply(self, fn, *args, **kwargs):
        # .to(), .half(), ComfyUI unloading the model: cached K/V of the old weights must not keep memory alive.
        self.content_cache.clear()
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self.content_cache.clear()
        return super()._load_from_state_dict(*args, **kwargs)

    def train(self, mode: bool = True):
        if mode:  # training needs the memory, and its steps make every cached row stale
            self.content_cache.clear()
        return super().train(mode)

    def null_subject(self, batch: int) -> SubjectFeatures:
        """The learned 'no subject' features (used for guidance and condition dropout)."""
        return SubjectFeatures(self.control_features_uncond.float().unsqueeze(0).expand(batch, -1, -1),
                               self.control_features_refer_uncond.float().unsqueeze(0).expand(batch, -1, -1))

    def check_subject(self, subject: SubjectFeatures):
        c = self.cfg
        want = {"semantic": (c.semantic_len, c.semantic_dim), "content": (c.content_len, c.content_dim)}
        for name, shape in want.items():
            got = tuple(getattr(subject, name).shape[1:])
            if got != shape:
                raise InputError(
                    f"The subject's {name} features have shape {got} but this model expects {shape} "
                    f"({'DINOv2 tokens' if name == 'semantic' else 'FLUX VAE latent tokens'}); was the subject "
                    "encoded for a different model size (1024-px models use a 512 crop, 256-px models a 256 crop)?")

    def encode_conditions(self, text: TextConditioning, subject: SubjectFeatures) -> EchoGenContext:
        """Everything that does not depend on the image tokens, computed once per generation:
        prompt context, subject tokens, the AdaLN sums, and the whole content stream."""
        self.check_subject(subject)
        base = self.encode_text(text)
        dev = self.device
        semantic = subject.semantic.to(dev, torch.float32)
        content = subject.content.to(dev, torch.float32)
        g = self.control_proj_for_sos(semantic[:, 0])                                  # (B, C)
        ada = base.ada + self.control_shared_ada_lin(g).float().view_as(base.ada)
        content_ada = (self.control_shared_ada_lin_refer(base.cond.float())
                       + self.control_shared_ada_lin_refer_dino(g)).float().view_as(base.ada)
        ctx = EchoGenContext(cond=base.cond, ada=ada, tokens=base.tokens, key_mask=base.key_mask,
                             global_token=g, semantic_tokens=self.control_proj_for_ca(semantic[:, 1:]),
                             content_ada=content_ada)
        # The stream depends only on (content, global token, prompt): run it once per distinct row.
        reps, group = distinct_rows(content, semantic[:, 0], base.tokens, base.key_mask)
        if len(reps) == len(group):
            rows_content, rows_ctx, group = content, ctx, None
        else:
            idx = torch.tensor(reps, device=dev)
            rows_content, rows_ctx = content[idx], ctx.select(idx)
        if self.uses_content_cache():  # and across generations: rows seen before with these weights are free
            keys = row_keys(reps, content, semantic[:, 0], text.features.float(), text.mask)
            kv = self.cached_content_stream(rows_content, rows_ctx, keys)
        else:
            kv = self.run_content_stream(rows_content, rows_ctx)
        ctx.content = ContentMemory(kv, group)
        return ctx

    def run_content_stream(self, content: torch.Tensor, ctx: EchoGenContext) -> list:
        """content (B, Lc, Dc) reference latent tokens -> per block (k, v) for the image tokens' read."""
        y = self.control_proj_for_ca_refer(content).float()
        kvs = []
        for i, block in enumerate(self.blocks):
            y, kv = block.content_stream(y, ctx, i)
            kvs.append(kv)
        return kvs

    def cached_content_stream(self, content: torch.Tensor, ctx: EchoGenContext, keys: list) -> list:
        """run_content_stream for distinct rows through the ContentCache (`keys`: the rows' row_keys): rows seen
        before are taken from it, the others run in one batch and are stored.
        Returns per block a list of one (k, v) per row, each (1, H, Lc, hd)."""
        cache = self.content_cache
        cache.check_weights(self.weights_fingerprint())
        found = [cache.get(key) for key in keys]
        missing = [i for i, kv in enumerate(found) if kv is None]
        cache.hits += len(keys) - len(missing)
        cache.misses += len(missing)
        if missing:
            cache.make_room(len(missing), keep=set(keys))
            if len(missing) < len(keys):
                idx = torch.tensor(missing, device=content.device)
                content, ctx = content[idx], ctx.select(idx)
            fresh = self.run_content_stream(content, ctx)
            per_row = [[] for _ in missing]
            for layer in range(len(fresh)):
                (k, v), fresh[layer] = fresh[layer], None  # block by block: a block is never held twice over
                for j, kv in enumerate(per_row):
                    kv.append((_own_row(k, j), _own_row(v, j)))
            for i, kv in zip(missing, per_row):
                found[i] = kv
                cache.put(keys[i], kv)
        return [list(layer) for layer in zip(*found)]

    def first_tokens(self, ctx: EchoGenContext) -> torch.Tensor:
        subject = (ctx.global_token.float() + self.control_pos_start.float()[0]).unsqueeze(1)
        return torch.cat([subject, self.sos_tokens(ctx)], dim=1)  # (B, 2, C)

    def forward(self, text, next_scale_inputs, schedule, subject: Optional[SubjectFeatures] = None):
        ctx = text if isinstance(text, TextContext) else self.encode_conditions(
            text, subject if subject is not None else self.null_subject(text.features.shape[0]))
        return super().forward(ctx, next_scale_inputs, schedule)

    # -- which parameters EchoGen trains ------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict:
        """Only the injection ('control') weights: what fine-tuning changes and an adapter file holds."""
        return {k: v for k, v in self.state_dict().items() if "control" in k}

    @torch.no_grad()
    def init_control_from_backbone(self, seed: int = 0):
        """The initialisation when starting from Infinity: the content K/V, the semantic K/V and the CLS
        projection start at zero (so the backbone's output is unchanged except for the extra attention keys),
        and the AdaLN linears are copies of Infinity's shared AdaLN with zero bias.

        Two deliberate differences from the official code, both keeping the output unchanged at step 0:
        - the content gate `sa.control_attn` keeps its random init: with the content values and the gate both
          zero, every gradient of the content read is exactly zero and that path never learns;
        - only the value half of `sa.control_mat_kv` is zeroed: zero content keys are then cosine-normalised,
          and the normalisation's gradient at a zero vector is ~1/eps (1e12), which blows up the first steps."""
        g = torch.Generator().manual_seed(seed)
        C = self.cfg.width
        std = (1 / (3 * C)) ** 0.5
        for name, p in self.named_parameters():
            if "control" in name and p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "control" in name:
                p.zero_()
        for b in self.blocks:
            b.sa.control_mat_kv.weight[C:].zero_()  # content values; keys stay random (see below)
            b.ca.control_mat_kv.weight.zero_()
            b.sa.control_scale_mul_1H11.fill_(torch.tensor(4.0).log().item())
            b.control_ca_norm.weight.fill_(1.0)
            b.control_ca.load_state_dict(b.ca.state_dict(), strict=False)
        self.control_proj_for_sos.weight.zero_()
        for lin in (self.control_shared_ada_lin, self.control_shared_ada_lin_refer, self.control_shared_ada_lin_refer_dino):
            lin[1].weight.copy_(self.shared_ada_lin[1].weight)
            lin[1].bias.zero_()
        return self
