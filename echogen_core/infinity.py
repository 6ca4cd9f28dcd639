"""Infinity: bitwise next-scale visual autoregression (Han et al., CVPR 2025), written from the paper and
the released checkpoints' layout.

The transformer reads a prompt (Flan-T5 features) and predicts, scale after scale, the bits of a BSQ code
map. Each scale's tokens see every earlier scale and their own (block-causal attention); at inference a
KV cache per block makes that one forward pass per scale.

Module and parameter names follow the released files exactly (`block_chunks.{c}.module.{j}.sa.mat_qkv...`),
so `state_dict()` *is* the official layout and loading needs no renaming.

Precision follows the official split: the residual stream, AdaLN modulation, LayerNorms, RoPE and the
head run in fp32; block linears run in the blocks' dtype (bf16/fp16 on GPU).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .schedules import ScaleSchedule, rope_positions
from .text_encoder import TextConditioning


# --------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class InfinityConfig:
    depth: int
    width: int               # C, also the condition width D
    num_heads: int
    mlp_hidden: int
    bits: int                # d: bits per token as seen by the transformer (4 x VAE bits with patchify)
    text_channels: int = 2048  # T5 width
    text_maxlen: int = 512     # rows of the learned empty prompt `cfg_uncond`
    pool_heads: int = 16       # heads of the attention pool that makes the SOS token
    block_chunks: int = 8      # only changes parameter names: block_chunks.{c}.module.{j}
    num_levels: int = 15       # rows of the scale (level) embedding
    norm_eps: float = 1e-6

    def __post_init__(self):
        checks = [
            (self.width % self.num_heads == 0, f"width {self.width} is not divisible by num_heads {self.num_heads}"),
            ((self.width // max(self.num_heads, 1)) % 4 == 0, "head dim must be a multiple of 4 for 2-D RoPE"),
            (self.width % self.pool_heads == 0, f"width {self.width} is not divisible by pool_heads {self.pool_heads}"),
            (self.depth % self.block_chunks == 0, f"depth {self.depth} is not divisible by block_chunks {self.block_chunks}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"Invalid InfinityConfig: {msg}")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def blocks_per_chunk(self) -> int:
        return self.depth // self.block_chunks

    def to_dict(self) -> dict:
        return asdict(self)

    # The released models -----------------------------------------------------------------------------------
    @classmethod
    def infinity_2b(cls) -> "InfinityConfig":
        return cls(depth=32, width=2048, num_heads=16, mlp_hidden=8192, bits=32, block_chunks=8)

    @classmethod
    def infinity_8b(cls) -> "InfinityConfig":
        # 14-bit stride-8 VAE with 2x2 spatial patchify: 56 bits per token
        return cls(depth=40, width=3584, num_heads=28, mlp_hidden=14336, bits=56, block_chunks=8)

    @classmethod
    def infinity_125m(cls) -> "InfinityConfig":
        # `infinity_125M_256x256.pth`, the layer12 scaling model
        return cls(depth=12, width=768, num_heads=8, mlp_hidden=3072, bits=32, block_chunks=4)

    @classmethod
    def tiny(cls, **overrides) -> "InfinityConfig":
        base = dict(depth=2, width=128, num_heads=2, mlp_hidden=512, bits=8, text_channels=128,
                    text_maxlen=16, pool_heads=1, block_chunks=2)
        base.update(overrides)
        return cls(**base)

    def preset_name(self) -> Optional[str]:
        for name, make in (("Infinity-2B", self.infinity_2b), ("Infinity-8B", self.infinity_8b),
                           ("Infinity-125M", self.infinity_125m)):
            ref = make()
            if replace(self, text_maxlen=ref.text_maxlen) == ref:
                return name
        return None


# --------------------------------------------------------------------------------------------------------------
# Building blocks


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def layer_norm_fp32(x: torch.Tensor, eps: float, weight=None, bias=None) -> torch.Tensor:
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps)


def rope_tables(positions: torch.Tensor, head_dim: int, base: float = 10000.0):
    """cos/sin tables (L, head_dim/2) for (row, col) positions: the first half of the rotation pairs turn
    with the row, the second half with the column."""
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))  # (half/2,)
    pos = positions.float()
    angles = torch.cat([pos[:, :1] * inv_freq, pos[:, 1:] * inv_freq], dim=-1)  # (L, half)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2p], x[2p+1]) of x (B, H, L, hd) by the angles of their position, in fp32."""
    xp = x.float().unflatten(-1, (-1, 2))
    a, b = xp[..., 0], xp[..., 1]
    return torch.stack([cos * a - sin * b, sin * a + cos * b], dim=-1).flatten(-2)


class KVCache:
    """Self-attention keys/values of every block for all scales generated so far.

    Preallocated for the whole sequence so appending a scale is a slice write, not a concatenation."""

    def __init__(self, depth: int, batch: int, heads: int, head_dim: int, max_len: int, device, dtype):
        shape = (batch, heads, max_len, head_dim)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(depth)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(depth)]
        self.length = 0  # tokens committed (all blocks have written them)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int):
        self.length += n


class SelfAttention(nn.Module):
    """Cosine attention (q, k L2-normalised, learned per-head temperature) with 2-D RoPE."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.mat_qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))  # keys have no bias; kept for the file layout
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
        self.max_scale_mul = math.log(100.0)
        self.proj = nn.Linear(width, width)

    def qkv(self, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, L, _ = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, hd)
        # The temperature lives in q, so attention itself uses softmax scale 1.
        temperature = self.scale_mul_1H11.float().clamp_max(self.max_scale_mul).exp()
        q = F.normalize(q.float(), dim=-1, eps=1e-12) * temperature
        k = F.normalize(k.float(), dim=-1, eps=1e-12)
        cos, sin = rope
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, rope, attn_mask=None, cache: Optional[KVCache] = None, layer: int = 0):
        B, L, C = x.shape
        q, k, v = self.qkv(x, rope)
        k = k.to(v.dtype)
        if cache is not None:
            k, v = cache.write(layer, k, v)
        out = F.scaled_dot_product_attention(q.to(v.dtype), k, v, attn_mask=attn_mask, scale=1.0)
        return self.attend_output(out.transpose(1, 2).reshape(B, L, C), x, q)

    def attend_output(self, out: torch.Tensor, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        # Separate so that EchoGen can add its content read before the output projection.
        return self.proj(out)


class CrossAttention(nn.Module):
    """Image tokens attend to the prompt tokens (plain scaled dot-product, per-sample key mask)."""

    def __init__(self, width: int, kv_width: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.mat_q = nn.Linear(width, width)
        self.mat_kv = nn.Linear(kv_width, 2 * width, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def project_kv(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Lt, kv_width) -> k, v each (B, H, Lt, hd). Depends only on the prompt: computed once per run."""
        B, Lt, _ = tokens.shape
        w = self.mat_kv.weight
        kv = F.linear(tokens.to(w.dtype), w, torch.cat((self.zero_k_bias, self.v_bias)).to(w.dtype))
        k, v = kv.view(B, Lt, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return k, v

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        q = self.mat_q(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class PoolAttention(nn.Module):
    """One learned query per prompt attends over its tokens: the pooled prompt vector (SOS / AdaLN condition)."""

    def __init__(self, width: int, text_channels: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.mat_q = nn.Parameter(torch.zeros(1, num_heads, self.head_dim))
        self.mat_kv = nn.Linear(text_channels, 2 * width, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def forward(self, text: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        B, Lt, _ = text.shape
        kv = F.linear(text, self.mat_kv.weight, torch.cat((self.zero_k_bias, self.v_bias)))
        k, v = kv.view(B, Lt, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q = self.mat_q.to(k.dtype).unsqueeze(2).expand(B, -1, 1, -1)  # (B, H, 1, hd)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        return self.proj(out.reshape(B, -1))


class TextAttentionPool(nn.Module):
    def __init__(self, width: int, text_channels: int, num_heads: int):
        super().__init__()
        self.ca = PoolAttention(width, text_channels, num_heads)

    def forward(self, text, key_mask):
        return self.ca(text, key_mask)


class TextNorm(nn.Module):
    """RMSNorm over raw T5 features, in fp32."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class FFN(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm block: AdaLN-modulated self-attention, text cross-attention, AdaLN-modulated FFN."""

    def __init__(self, cfg: InfinityConfig):
        super().__init__()
        C = cfg.width
        self.eps = cfg.norm_eps
        self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, C))  # per-block offset of the shared AdaLN
        self.sa = SelfAttention(C, cfg.num_heads)
        self.ca = CrossAttention(C, C, cfg.num_heads)
        self.ca_norm = nn.LayerNorm(C, eps=cfg.norm_eps)
        self.ffn = FFN(C, cfg.mlp_hidden)

    @property
    def dtype(self) -> torch.dtype:
        return self.sa.mat_qkv.weight.dtype

    def cross_kv(self, ctx: "TextContext"):
        """Keys, values and key mask of the cross-attention: the prompt tokens."""
        k, v = self.ca.project_kv(ctx.tokens)
        return k, v, ctx.key_mask

    def modulation(self, ada: torch.Tensor):
        # [gamma1, gamma2, scale1, scale2, shift1, shift2], each (B, 1, C), fp32
        return (self.ada_gss.float() + ada).unbind(2)

    def self_attention(self, h, ctx: "TextContext", rope, attn_mask, cache, layer):
        return self.sa(h, rope, attn_mask, cache, layer)

    def forward(self, x, ctx: "TextContext", rope, attn_mask=None, cache=None, layer=0):
        """x (B, L, C) fp32 residual stream; ctx holds the AdaLN output and the cross-attention keys."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.modulation(ctx.ada)
        dt = self.dtype
        h = layer_norm_fp32(x, self.eps) * (1 + scale1) + shift1
        x = x + self.self_attention(h.to(dt), ctx, rope, attn_mask, cache, layer).float() * gamma1
        k, v, key_mask = ctx.kv(layer, self)
        h = layer_norm_fp32(x, self.eps, self.ca_norm.weight, self.ca_norm.bias)
        x = x + self.ca(h.to(dt), k, v, key_mask).float()
        h = layer_norm_fp32(x, self.eps) * (1 + scale2) + shift2
        x = x + self.ffn(h.to(dt)).float() * gamma2
        return x


class BlockChunk(nn.Module):
    """Only here to reproduce the released parameter names `block_chunks.{c}.module.{j}`."""

    def __init__(self, blocks):
        super().__init__()
        self.module = nn.ModuleList(blocks)


class HeadNorm(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.eps = eps

    def forward(self, x, cond):
        scale, shift = self.ada_lin(cond.float()).view(-1, 1, 2, x.shape[-1]).unbind(2)
        return layer_norm_fp32(x, self.eps) * (1 + scale) + shift


# --------------------------------------------------------------------------------------------------------------
# The model


@dataclass
class TextContext:
    """Everything the blocks need from the prompt, computed once per generation."""

    cond: torch.Tensor        # (B, C) pooled prompt: the SOS token and the AdaLN / head condition
    ada: torch.Tensor         # (B, 1, 6, C) fp32 shared AdaLN output
    tokens: torch.Tensor      # (B, Lt, C) prompt tokens after the text MLP
    key_mask: torch.Tensor    # (B, Lt) bool, True = real token
    block_kv: list = field(default_factory=list)  # per block (k, v) of the cross-attention, filled lazily

    def kv(self, layer: int, block: Block):
        while len(self.block_kv) <= layer:
            self.block_kv.append(None)
        if self.block_kv[layer] is None:
            self.block_kv[layer] = block.cross_kv(self)
        return self.block_kv[layer]

    def select(self, rows) -> "TextContext":
        """The context of some rows: a slice (views, no copies: one guidance group of a batch) or an index
        tensor (copies)."""
        def pick(value):
            if isinstance(value, torch.Tensor):
                return value[rows]
            if isinstance(value, (list, tuple)):
                return type(value)(pick(v) for v in value)
            if hasattr(value, "select"):  # EchoGen's ContentMemory
                return value.select(rows)
            return value

        return replace(self, **{f.name: pick(getattr(self, f.name)) for f in fields(self)})


class Infinity(nn.Module):
    def __init__(self, cfg: InfinityConfig):
        super().__init__()
        self.cfg = cfg
        C, Ct5 = cfg.width, cfg.text_channels
        self.cfg_uncond = nn.Parameter(torch.zeros(cfg.text_maxlen, Ct5))  # learned "empty prompt" T5 features
        self.pos_start = nn.Parameter(torch.zeros(1, 1, C))
        self.text_norm = TextNorm(Ct5, cfg.norm_eps)
        self.text_proj_for_sos = TextAttentionPool(C, Ct5, cfg.pool_heads)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(Ct5, C), nn.GELU(approximate="tanh"), nn.Linear(C, C))
        # nn.Embedding initialises itself with normal_, which on the meta device (where the loaders build) pulls
        # in torch's compiler stack on first use: ~2 s of cold start for shapes only. Skip it there.
        on_meta = torch.empty(0).device.type == "meta"
        self.lvl_embed = nn.Embedding(cfg.num_levels, C, _weight=torch.empty(cfg.num_levels, C) if on_meta else None)
        self.word_embed = nn.Linear(cfg.bits, C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        blocks = [self.make_block(cfg) for _ in range(cfg.depth)]
        n = cfg.blocks_per_chunk
        self.block_chunks = nn.ModuleList(BlockChunk(blocks[i:i + n]) for i in range(0, cfg.depth, n))
        self.head_nm = HeadNorm(C, cfg.norm_eps)
        self.head = nn.Linear(C, 2 * cfg.bits)

    def make_block(self, cfg: InfinityConfig) -> Block:
        return Block(cfg)

    @property
    def blocks(self) -> list[Block]:
        return [b for chunk in self.block_chunks for b in chunk.module]

    @property
    def device(self) -> torch.device:
        return self.word_embed.weight.device

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.blocks[0].dtype

    # -- precision ----------------------------------------------------------------------------------------------
    def set_precision(self, dtype: torch.dtype) -> "Infinity":
        """The official split: block weights in `dtype`, everything else (embeddings, text projections,
        AdaLN, head, empty prompt) in fp32."""
        for name, child in self.named_children():
            child.to(dtype if name == "block_chunks" else torch.float32)
        for p in self.parameters(recurse=False):
            p.data = p.data.float()
        return self

    # -- conditioning -------------------------------------------------------------------------------------------
    def empty_prompt(self, lengths: torch.Tensor) -> TextConditioning:
        """The learned unconditional features: for each prompt, the first len_i rows of `cfg_uncond`."""
        L = int(lengths.max())
        if L > self.cfg.text_maxlen:
            raise ValueError(f"prompt of {L} tokens is longer than the learned empty prompt ({self.cfg.text_maxlen})")
        feats = self.cfg_uncond[:L].float().unsqueeze(0).expand(len(lengths), -1, -1).clone()
        mask = torch.arange(L, device=feats.device)[None] < lengths.to(feats.device)[:, None]
        return TextConditioning(features=feats * mask[..., None], lengths=lengths.to(feats.device).clone())

    def encode_text(self, text: TextConditioning) -> TextContext:
        feats = text.features.to(self.device, torch.float32)
        key_mask = text.mask.to(self.device)
        normed = self.text_norm(feats)
        cond = self.text_proj_for_sos(normed, key_mask)
        tokens = self.text_proj_for_ca(normed)
        ada = self.shared_ada_lin(cond.float()).float().view(-1, 1, 6, self.cfg.width)
        return TextContext(cond=cond, ada=ada, tokens=tokens, key_mask=key_mask)

    def sos_tokens(self, ctx: TextContext) -> torch.Tensor:
        """Scale 0: the pooled prompt itself is the first token."""
        return (ctx.cond.float() + self.pos_start.float()[0]).unsqueeze(1)  # (B, 1, C)

    #: tokens before SOS in scale 0 whose outputs are discarded (EchoGen prepends a subject token)
    num_prefix = 0

    def first_tokens(self, ctx: TextContext) -> torch.Tensor:
        return self.sos_tokens(ctx)

    def embed_bits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, d) next-scale input (code values, not bits) -> (B, L, C)."""
        return self.word_embed(x.float())

    # -- transformer --------------------------------------------------------------------------------------------
    def run_blocks(self, x, ctx: TextContext, rope, attn_mask=None, cache: Optional[KVCache] = None):
        for i, block in enumerate(self.blocks):
            x = block(x, ctx, rope, attn_mask, cache, i)
        return x

    def logits(self, hidden: torch.Tensor, ctx: TextContext) -> torch.Tensor:
        """(B, L, C) -> (B, L, 2d) fp32; logits[..., 2j:2j+2] = [bit j is 0, bit j is 1]."""
        return self.head(self.head_nm(hidden.float(), ctx.cond.float()))

    def forward_scale(self, x: torch.Tensor, ctx: TextContext, schedule: ScaleSchedule, scale: int,
                      cache: KVCache) -> torch.Tensor:
        """One step of generation: the tokens of `scale` (B, h*w, C) attend to the cache and themselves.
        For scale 0, x is `first_tokens(ctx)`. Returns logits (B, h*w, 2d)."""
        start = schedule.offsets[scale]
        end = start + schedule.tokens_per_scale[scale]
        x = x + self.lvl_embed.weight[scale].float()
        rope = self.rope(schedule, start, end, x.device, with_prefix=(scale == 0))
        hidden = self.run_blocks(x, ctx, rope, None, cache)
        cache.advance(x.shape[1])
        return self.logits(hidden[:, self.num_prefix:] if scale == 0 else hidden, ctx)

    def forward(self, text, next_scale_inputs: torch.Tensor, schedule: ScaleSchedule) -> torch.Tensor:
        """Teacher forcing over the whole sequence in one pass with the block-causal mask.

        text: TextConditioning or a prepared context. next_scale_inputs: (B, L - 1, d), the inputs of
        scales 1.. (scale 0 is the SOS token). Returns logits (B, L, 2d)."""
        ctx = text if isinstance(text, TextContext) else self.encode_text(text)
        x = torch.cat([self.first_tokens(ctx), self.embed_bits(next_scale_inputs)], dim=1)
        scale_of = schedule.scale_index().to(x.device)
        scale_of = torch.cat([scale_of.new_zeros(self.num_prefix), scale_of])
        x = x + self.lvl_embed(scale_of).float()
        mask = scale_of[None, :] <= scale_of[:, None]  # (L, L): token i sees j iff scale(j) <= scale(i)
        rope = self.rope(schedule, 0, schedule.total_tokens, x.device, with_prefix=True)
        return self.logits(self.run_blocks(x, ctx, rope, mask)[:, self.num_prefix:], ctx)

    def rope(self, schedule: ScaleSchedule, start: int, end: int, device, with_prefix: bool = False):
        positions = rope_positions(schedule)[start:end]
        if with_prefix and self.num_prefix:  # prefix tokens share the SOS position (0, 0)
            positions = torch.cat([positions[:1].expand(self.num_prefix, 2), positions])
        cos, sin = rope_tables(positions, self.cfg.head_dim)
        return cos.to(device), sin.to(device)

    def new_cache(self, batch: int, schedule: ScaleSchedule) -> KVCache:
        c = self.cfg
        return KVCache(c.depth, batch, c.num_heads, c.head_dim, schedule.total_tokens + self.num_prefix,
                       self.device, self.compute_dtype)

    # -- initialisation (training from scratch, tests) ------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: Optional[float] = None):
        """The official initialisation (spec 11.4): trunc-normal linears, small AdaLN and head."""
        g = torch.Generator().manual_seed(seed)
        C = self.cfg.width
        std = std or math.sqrt(1 / (3 * C))

        def tn(t, s):
            t.copy_(torch.nn.init.trunc_normal_(torch.empty(t.shape), std=s, a=-2 * s, b=2 * s, generator=g))

        for name, p in self.named_parameters():
            if p.ndim >= 2:
                tn(p, std)
            else:
                p.zero_()
        for ln in [m for m in self.modules() if isinstance(m, nn.LayerNorm)]:
            ln.weight.fill_(1.0)
        self.text_norm.weight.fill_(1.0)
        tn(self.cfg_uncond, 1.2)
        self.cfg_uncond /= math.sqrt(self.cfg.text_channels)
        for b in self.blocks:
            b.sa.scale_mul_1H11.fill_(math.log(4.0))
            tn(b.ada_gss, 1 / math.sqrt(C))
            b.ada_gss[:, :, :2] *= 5e-6
            b.ada_gss[:, :, 2:] *= 1e-3
            for lin in (b.sa.proj, b.ca.proj, b.ffn.fc2):
                lin.weight /= math.sqrt(2 * self.cfg.depth)
        self.head_nm.ada_lin[1].weight *= 1e-3
        self.head.weight *= 0.02
        return self
