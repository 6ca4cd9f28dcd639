"""Tiny real models with random weights, for tests. Random but not degenerate: every path carries signal."""
from __future__ import annotations

import torch

from echogen_core.infinity import Infinity, InfinityConfig
from echogen_core.text_encoder import TextConditioning


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Fill every parameter with N(0, std) (norm weights around 1), so gates and AdaLN are not ~0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            if name.endswith("norm.weight") or name.endswith("ca_norm.weight") or name == "text_norm.weight":
                p.copy_(1 + noise)
            elif "scale_mul" in name:
                p.copy_(torch.log(torch.tensor(4.0)) + noise)
            elif "ada_gss" in name:
                p.copy_(noise * 4)
            else:
                p.copy_(noise)
    return model


def tiny_infinity(seed: int = 0, **overrides) -> Infinity:
    model = Infinity(InfinityConfig.tiny(**overrides))
    return randomize_(model, seed).eval()


def random_text(lengths, channels: int = 128, seed: int = 0) -> TextConditioning:
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    feats = torch.zeros(len(lengths), L, channels)
    for i, n in enumerate(lengths):
        feats[i, :n] = torch.randn(n, channels, generator=g)
    return TextConditioning(features=feats, lengths=torch.tensor(lengths, dtype=torch.int64))


def random_bits(schedule_grids, batch: int, bits: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 2, (batch, h, w, bits), generator=g, dtype=torch.uint8) for h, w in schedule_grids]


def micro_vae(codebook_dim: int = 8, patch_size: int = 16, seed: int = 1):
    """The real VAE classes at the smallest useful width: decoding 256 px stays well under a second."""
    from echogen_core.bsq_vae import BSQVAE, BSQVAEConfig

    levels = (1,) * (len(bin(patch_size)) - 2)
    cfg = BSQVAEConfig(codebook_dim=codebook_dim, patch_size=patch_size, base_ch=8, ch_mult=levels,
                       num_res_blocks=1, norm_groups=4)
    return randomize_(BSQVAE(cfg), seed=seed, std=0.1).eval()
