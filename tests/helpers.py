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


def forward_batches(model, monkeypatch) -> list:
    """Records the batch size of every transformer forward of the sampler's scale loop."""
    sizes = []
    original = type(model).forward_scale

    def recording(self, x, *args, **kwargs):
        sizes.append(x.shape[0])
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward_scale", recording)
    return sizes


def micro_vae(codebook_dim: int = 8, patch_size: int = 16, seed: int = 1):
    """The real VAE classes at the smallest useful width: decoding 256 px stays well under a second."""
    from echogen_core.bsq_vae import BSQVAE, BSQVAEConfig

    levels = (1,) * (len(bin(patch_size)) - 2)
    cfg = BSQVAEConfig(codebook_dim=codebook_dim, patch_size=patch_size, base_ch=8, ch_mult=levels,
                       num_res_blocks=1, norm_groups=4)
    return randomize_(BSQVAE(cfg), seed=seed, std=0.1).eval()


def stand_in_bundle(folder, t5_dir, text_channels: int = 64):
    """The bundled layout with tiny random weights (the real files may not be built in this checkout)."""
    from safetensors.torch import save_file

    from echogen_core.checkpoint import save_adapter, vae_metadata
    from echogen_core.dinov2 import Dinov2, Dinov2Config
    from echogen_core.echogen import EchoGen, EchoGenConfig
    from echogen_core.flux_vae import FluxVAEConfig, FluxVAEEncoder

    folder.mkdir()
    cfg = EchoGenConfig.tiny(text_channels=text_channels, semantic_dim=128, semantic_len=17, content_dim=16, content_len=16)
    model = randomize_(EchoGen(cfg), seed=5)
    flat = lambda m: {k: v.contiguous().clone() for k, v in m.state_dict().items()}  # noqa: E731
    save_file({k: v for k, v in flat(model).items() if "control" not in k}, folder / "infinity.safetensors")
    save_adapter(model, folder / "adapter.safetensors")
    vae = micro_vae()
    save_file(flat(vae), folder / "vae.safetensors", metadata=vae_metadata(vae.config))
    save_file(flat(randomize_(Dinov2(Dinov2Config.tiny()), seed=1)), folder / "dinov2.safetensors")
    save_file(flat(randomize_(FluxVAEEncoder(FluxVAEConfig.tiny()), seed=2)), folder / "flux_vae.safetensors")
    (folder / "text_encoder").symlink_to(t5_dir, target_is_directory=True)
