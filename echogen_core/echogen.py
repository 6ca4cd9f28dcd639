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
    tokens: it runs once per (subject, prompt) and its per-block keys/values are reused at every scale.
  * image queries read the content keys/values through a second softmax; that read goes through the
    zero-initialised `sa.control_attn` and is added before the frozen output projection.

Names and shapes follow the released `echogen_2b.pth` (specs/echogen.md section 7). The official code is
the reference where it and the paper differ (two softmaxes for the content read, AdaLN sum).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
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
        self.control_scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
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
        return self.control_proj(out.transpose(1, 2).reshape(B, L, C)), (k, v)

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


@dataclass
class ContentMemory:
    """The content stream's per-block keys/values, kept once per distinct (subject, prompt) row.

    A batch of B images of one subject and prompt under three-row guidance has 3B rows but only three
    distinct content streams; storing 3 instead of 3B keeps the 2B model's content K/V at ~1 GB per row
    instead of ~1 GB per image and row."""

    kv: list                          # per block (k, v), each (U, H, Lc, hd)
    group: Optional[list] = None      # group of every row; None when all rows are distinct and in order

    @property
    def num_rows(self) -> int:
        return len(self.group) if self.group is not None else self.kv[0][0].shape[0]

    def rows(self, layer: int):
        """(k, v) expanded to one per row (materialised: for inspection and tests)."""
        k, v = self.kv[layer]
        if self.group is None:
            return k, v
        idx = torch.tensor(self.group, device=k.device)
        return k[idx], v[idx]

    def read(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Image queries q (R, H, L, hd) attend to their row's content tokens -> (R, H, L, hd).
        Rows sharing a content stream are stacked along the sequence axis of one attention call
        (the read has no mask and no causality, so this is exact) instead of copying K/V per row."""
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

    def make_block(self, cfg):
        return EchoGenBlock(cfg)

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
            ctx.content = ContentMemory(self.run_content_stream(content, ctx))
        else:
            idx = torch.tensor(reps, device=dev)
            sub = EchoGenContext(cond=base.cond[idx], ada=ada[idx], tokens=base.tokens[idx],
                                 key_mask=base.key_mask[idx], content_ada=content_ada[idx])
            ctx.content = ContentMemory(self.run_content_stream(content[idx], sub), group)
        return ctx

    def run_content_stream(self, content: torch.Tensor, ctx: EchoGenContext) -> list:
        """content (B, Lc, Dc) reference latent tokens -> per block (k, v) for the image tokens' read."""
        y = self.control_proj_for_ca_refer(content).float()
        kvs = []
        for i, block in enumerate(self.blocks):
            y, kv = block.content_stream(y, ctx, i)
            kvs.append(kv)
        return kvs

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
