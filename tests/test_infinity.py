import pytest
import torch

from echogen_core.bsq_vae import BSQVAE, BSQVAEConfig
from echogen_core.infinity import Infinity, InfinityConfig
from echogen_core.sampler import next_scale_inputs
from echogen_core.schedules import get_schedule
from helpers import random_bits, random_text, tiny_infinity


def meta_state(cfg):
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Infinity(cfg).state_dict().items()}


def test_2b_layout_matches_release():
    sd = meta_state(InfinityConfig.infinity_2b())
    assert len(sd) == 694
    expect = {
        "cfg_uncond": (512, 2048), "pos_start": (1, 1, 2048), "text_norm.weight": (2048,),
        "text_proj_for_sos.ca.mat_q": (1, 16, 128), "text_proj_for_sos.ca.mat_kv.weight": (4096, 2048),
        "text_proj_for_sos.ca.v_bias": (2048,), "text_proj_for_sos.ca.zero_k_bias": (2048,),
        "text_proj_for_sos.ca.proj.weight": (2048, 2048), "text_proj_for_ca.0.weight": (2048, 2048),
        "text_proj_for_ca.2.bias": (2048,), "lvl_embed.weight": (15, 2048), "word_embed.weight": (2048, 32),
        "shared_ada_lin.1.weight": (12288, 2048), "shared_ada_lin.1.bias": (12288,),
        "head_nm.ada_lin.1.weight": (4096, 2048), "head.weight": (64, 2048), "head.bias": (64,),
        "block_chunks.7.module.3.ada_gss": (1, 1, 6, 2048),
        "block_chunks.7.module.3.sa.mat_qkv.weight": (6144, 2048),
        "block_chunks.0.module.0.sa.q_bias": (2048,), "block_chunks.0.module.0.sa.zero_k_bias": (2048,),
        "block_chunks.0.module.0.sa.scale_mul_1H11": (1, 16, 1, 1),
        "block_chunks.0.module.0.sa.proj.weight": (2048, 2048), "block_chunks.0.module.0.ca.mat_q.bias": (2048,),
        "block_chunks.0.module.0.ca.mat_kv.weight": (4096, 2048), "block_chunks.0.module.0.ca.zero_k_bias": (2048,),
        "block_chunks.0.module.0.ca_norm.weight": (2048,), "block_chunks.0.module.0.ffn.fc1.weight": (8192, 2048),
        "block_chunks.0.module.0.ffn.fc2.weight": (2048, 8192),
    }
    for k, shape in expect.items():
        assert sd[k] == shape, k
    assert not any(k.startswith("blocks.") for k in sd)
    assert sum(k.startswith("block_chunks.") for k in sd) == 32 * 21


def test_8b_layout_matches_release():
    sd = meta_state(InfinityConfig.infinity_8b())
    assert len(sd) == 862
    expect = {
        "cfg_uncond": (512, 2048), "text_proj_for_sos.ca.mat_q": (1, 16, 224),
        "text_proj_for_sos.ca.mat_kv.weight": (7168, 2048), "text_proj_for_ca.0.weight": (3584, 2048),
        "word_embed.weight": (3584, 56), "shared_ada_lin.1.weight": (21504, 3584), "head.weight": (112, 3584),
        "block_chunks.7.module.4.sa.scale_mul_1H11": (1, 28, 1, 1),
        "block_chunks.7.module.4.ffn.fc1.weight": (14336, 3584),
        "block_chunks.3.module.2.ca.mat_kv.weight": (7168, 3584),
    }
    for k, shape in expect.items():
        assert sd[k] == shape, k
    assert "block_chunks.7.module.5.ada_gss" not in sd


def test_125m_layout_and_parameter_count():
    cfg = InfinityConfig.infinity_125m()
    with torch.device("meta"):
        model = Infinity(cfg)
    sd = model.state_dict()
    assert len(sd) == 22 + 12 * 21
    assert tuple(sd["text_proj_for_sos.ca.mat_q"].shape) == (1, 16, 48)
    assert "block_chunks.3.module.2.ffn.fc2.weight" in sd
    assert sum(p.numel() for p in model.parameters()) == 125_185_696
    with torch.device("meta"):
        assert sum(p.numel() for p in Infinity(InfinityConfig.infinity_2b()).parameters()) == 2_204_564_032


def teacher_logits_both_ways(model, vae, schedule, patchify, batch=2):
    text = random_text([5, 9][:batch], channels=model.cfg.text_channels, seed=3)
    bits = random_bits(schedule.vae_grids(patchify), batch, vae.bits, seed=4)
    inputs = next_scale_inputs(vae, bits, schedule, patchify)
    assert inputs.shape == (batch, schedule.total_tokens - 1, model.cfg.bits)
    full = model(text, inputs, schedule)

    ctx = model.encode_text(text)
    cache = model.new_cache(batch, schedule)
    x = model.first_tokens(ctx)
    cached = []
    for s, start in enumerate(schedule.offsets):
        cached.append(model.forward_scale(x, ctx, schedule, s, cache))
        if s + 1 < schedule.num_scales:
            a = start + schedule.tokens_per_scale[s] - 1  # inputs exclude the SOS token
            x = model.embed_bits(inputs[:, a:a + schedule.tokens_per_scale[s + 1]])
    return full, torch.cat(cached, dim=1)


@pytest.mark.parametrize("ratio", [1.0, 0.75, 2.5])
def test_kv_cached_logits_equal_full_sequence(ratio):
    model = tiny_infinity(seed=1)
    vae = BSQVAE(BSQVAEConfig.tiny(codebook_dim=8))
    schedule = get_schedule(ratio, "0.06M")
    with torch.no_grad():
        full, cached = teacher_logits_both_ways(model, vae, schedule, patchify=False)
    assert full.shape == (2, schedule.total_tokens, 16)
    torch.testing.assert_close(cached, full, atol=2e-5, rtol=1e-5)
    # the comparison is sensitive: a wrong RoPE offset in the cached path would show up
    assert full.std() > 0.1


def test_kv_cached_logits_equal_full_sequence_patchify():
    model = tiny_infinity(seed=2, bits=16)
    vae = BSQVAE(BSQVAEConfig.tiny(codebook_dim=4, patch_size=8))
    schedule = get_schedule(1.333, "0.06M")
    with torch.no_grad():
        full, cached = teacher_logits_both_ways(model, vae, schedule, patchify=True)
    torch.testing.assert_close(cached, full, atol=2e-5, rtol=1e-5)


def test_block_causal_mask_is_respected():
    """Changing the last scale's input must not change any earlier scale's logits."""
    model = tiny_infinity(seed=5)
    schedule = get_schedule(1.0, "0.06M")
    text = random_text([4], channels=128)
    inputs = torch.randn(1, schedule.total_tokens - 1, 8)
    changed = inputs.clone()
    last = schedule.tokens_per_scale[-1]
    changed[:, -last:] += 1.0
    with torch.no_grad():
        a, b = model(text, inputs, schedule), model(text, changed, schedule)
    torch.testing.assert_close(a[:, :-last], b[:, :-last])
    assert (a[:, -last:] - b[:, -last:]).abs().max() > 1e-3


def test_prompt_padding_does_not_leak():
    model = tiny_infinity(seed=6)
    schedule = get_schedule(1.0, "0.06M")
    both = random_text([3, 9], channels=128, seed=1)
    alone = both.select([0])
    inputs = torch.randn(2, schedule.total_tokens - 1, 8)
    with torch.no_grad():
        batched = model(both, inputs, schedule)
        single = model(alone, inputs[:1], schedule)
    torch.testing.assert_close(batched[:1], single, atol=1e-5, rtol=1e-5)


def test_bf16_split_keeps_fp32_parts():
    model = tiny_infinity().set_precision(torch.bfloat16)
    assert model.blocks[0].sa.mat_qkv.weight.dtype == torch.bfloat16
    assert model.blocks[1].ca_norm.weight.dtype == torch.bfloat16
    for name in ("cfg_uncond", "pos_start", "word_embed.weight", "head.weight", "shared_ada_lin.1.weight",
                 "text_proj_for_sos.ca.mat_q", "lvl_embed.weight"):
        assert dict(model.named_parameters())[name].dtype == torch.float32, name
    schedule = get_schedule(1.0, "0.06M")
    text = random_text([4], channels=128)
    inputs = torch.randn(1, schedule.total_tokens - 1, 8)
    with torch.no_grad():
        low = model(text, inputs, schedule)
        ref = tiny_infinity().set_precision(torch.float32)(text, inputs, schedule)
    assert low.dtype == torch.float32
    assert (low - ref).abs().max() < 0.1 * ref.abs().max()


def test_config_validation_messages():
    with pytest.raises(ValueError, match="divisible"):
        InfinityConfig.tiny(num_heads=3)
    with pytest.raises(ValueError, match="block_chunks"):
        InfinityConfig.tiny(depth=3)
