import pytest
import torch

import echogen_core.sampler as sampler_mod
from echogen_core.bsq_vae import BSQVAE, BSQVAEConfig
from echogen_core.errors import CheckpointError, InputError
from echogen_core.sampler import SamplerSettings, generate, sample_bits, to_uint8
from echogen_core.schedules import TEMPLATES, get_schedule
from helpers import forward_batches, micro_vae, random_text, tiny_infinity

SCHEDULE = get_schedule(1.0, "0.06M")


@pytest.fixture(scope="module")
def pair():
    return tiny_infinity(seed=7), micro_vae(codebook_dim=8)


def run(pair, text, seed, **kw):
    model, vae = pair
    settings = kw.pop("settings", SamplerSettings(cfg=3.0, tau=1.0))
    return generate(model, vae, text, kw.pop("schedule", SCHEDULE), settings, seed=seed, **kw)


def test_same_seed_same_image_other_seed_other_image(pair):
    text = random_text([6], channels=128)
    a, b, c = run(pair, text, 3), run(pair, text, 3), run(pair, text, 4, decode=False)
    assert all(torch.equal(x, y) for x, y in zip(a.bits, b.bits))
    assert torch.equal(a.images, b.images)
    assert not all(torch.equal(x, y) for x, y in zip(a.bits, c.bits))


def test_batch_items_do_not_depend_on_each_other(pair):
    both = random_text([6, 3], channels=128, seed=5)
    batch = run(pair, both, 10)
    first = run(pair, both.select([0]), 10, decode=False)
    second = run(pair, both.select([1]), 11)
    for s in range(SCHEDULE.num_scales):
        assert torch.equal(batch.bits[s][0], first.bits[s][0])
        assert torch.equal(batch.bits[s][1], second.bits[s][0])
    assert torch.equal(batch.images[1:], second.images)


@pytest.mark.parametrize("ratio", list(TEMPLATES))
def test_every_template_produces_the_announced_size(pair, ratio):
    schedule = get_schedule(ratio, "0.06M")
    out = run(pair, random_text([4], channels=128), 0, schedule=schedule)
    assert out.images.shape == (1, 3, schedule.height, schedule.width)
    assert [tuple(b.shape[1:3]) for b in out.bits] == list(schedule.grids)
    assert out.images.min() >= -1 and out.images.max() <= 1


def test_guidance_is_applied_to_tempered_logits(pair, monkeypatch):
    model, vae = pair
    text = random_text([5], channels=128, seed=9)
    seen = []
    real = sampler_mod.sample_bits
    monkeypatch.setattr(sampler_mod, "sample_bits", lambda logits, *a: (seen.append(logits.clone()), real(logits, *a))[1])
    cfg, tau = [4.0, 1.0, 2.5, 2.5, 2.5, 2.5, 2.5], 0.7
    out = run(pair, text, 2, settings=SamplerSettings(cfg=cfg, tau=tau), decode=False)
    # replay the first two scales by hand: conditional and learned-empty-prompt rows, separately
    with torch.no_grad():
        rows = [text, model.empty_prompt(text.lengths)]
        per_row = []
        for t in rows:
            ctx = model.encode_text(t)
            cache = model.new_cache(1, SCHEDULE)
            l0 = model.forward_scale(model.first_tokens(ctx), ctx, SCHEDULE, 0, cache)
            nxt = vae.bits_to_codes(out.bits[0])
            nxt = torch.nn.functional.interpolate(nxt, size=SCHEDULE.grids[-1], mode="bilinear", align_corners=False)
            nxt = torch.nn.functional.interpolate(nxt, size=SCHEDULE.grids[1], mode="bilinear", align_corners=False)
            l1 = model.forward_scale(model.embed_bits(nxt.flatten(2).transpose(1, 2)), ctx, SCHEDULE, 1, cache)
            per_row.append((l0 / tau, l1 / tau))
    (c0, c1), (u0, u1) = per_row
    torch.testing.assert_close(seen[0], (cfg[0] * c0 + (1 - cfg[0]) * u0).reshape(-1, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seen[1], c1.reshape(-1, 2), atol=1e-5, rtol=1e-5)  # cfg 1: conditional only


def test_negative_prompt_replaces_empty_prompt(pair):
    text = random_text([5, 5], channels=128, seed=1)
    negative = random_text([7], channels=128, seed=2)
    plain = run(pair, text, 1, decode=False)
    neg = run(pair, text, 1, negative=negative, decode=False)
    assert not torch.equal(plain.summed_codes, neg.summed_codes)
    neg_twice = run(pair, text, 1, negative=negative.select([0, 0]), decode=False)
    assert torch.equal(neg.summed_codes, neg_twice.summed_codes)
    with pytest.raises(InputError, match="negative prompts"):
        run(pair, text, 1, negative=random_text([3, 3, 3], channels=128))


def test_sample_bits_filters():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 5.0], [5.0, 0.0], [0.0, 0.1]]).repeat(2000, 1)
    out = sample_bits(logits.clone(), top_k=0, top_p=0.97, generator=g).view(2000, 3)
    # p(minority) = sigmoid(-5) = 0.0067 <= 0.03: always the majority; the near-tie stays random
    assert (out[:, 0] == 1).all() and (out[:, 1] == 0).all()
    assert 0.3 < out[:, 2].float().mean() < 0.7
    free = sample_bits(logits.clone(), top_k=0, top_p=0.0, generator=g).view(2000, 3)
    assert (free[:, 0] == 0).any()
    greedy = sample_bits(logits.clone(), top_k=1, top_p=0.0, generator=g).view(2000, 3)
    assert (greedy == torch.tensor([1, 0, 1])).all()


def test_bad_settings_and_pairs(pair):
    model, _ = pair
    text = random_text([4], channels=128)
    with pytest.raises(InputError, match="empty"):
        run(pair, text, 0, settings=SamplerSettings(cfg=[]))
    with pytest.raises(InputError, match="positive"):
        run(pair, text, 0, settings=SamplerSettings(tau=0.0))
    wrong_vae = BSQVAE(BSQVAEConfig.tiny(codebook_dim=6))
    with pytest.raises(CheckpointError, match="not a pair"):
        generate(model, wrong_vae, text, SCHEDULE)


def test_short_per_scale_lists_repeat_their_last_value():
    from echogen_core.sampler import expand_per_scale

    assert expand_per_scale([3, 2], 4, "cfg") == [3.0, 2.0, 2.0, 2.0]
    assert expand_per_scale([1, 2, 3, 4, 5], 3, "cfg") == [1.0, 2.0, 3.0]
    assert expand_per_scale(2.5, 2, "cfg") == [2.5, 2.5]


def test_to_uint8_rounds():
    img = torch.tensor([-1.0, 1.0, 0.0, 2.0]).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    assert to_uint8(img)[0, 0, :, 0].tolist() == [0, 255, 128, 255]


def test_prompts_longer_than_the_learned_empty_prompt_are_cut(pair):
    """Tiny custom models learn fewer than T5's 512 empty-prompt rows; longer prompts are cut, as in training."""
    model, _ = pair
    n = model.cfg.text_maxlen
    long, cut = random_text([n + 5], channels=128, seed=3), random_text([n + 5], channels=128, seed=3)
    cut = cut.clipped(n)
    assert cut.features.shape[1] == n and int(cut.lengths[0]) == n
    torch.testing.assert_close(run(pair, long, 2).summed_codes, run(pair, cut, 2).summed_codes)


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_sequential_rows_draw_the_same_image_one_row_group_at_a_time(pair, ratio, monkeypatch):
    """Low-memory mode: the guidance rows run one after the other, with the same bits and images."""
    schedule = get_schedule(ratio, "0.06M")
    text = random_text([6, 3], channels=128, seed=12)
    negative = random_text([4], channels=128, seed=13)
    sizes = forward_batches(pair[0], monkeypatch)
    for kw in ({}, {"negative": negative}):
        stacked = run(pair, text, 5, schedule=schedule, **kw)
        assert sizes == [4] * schedule.num_scales  # 2 prompts x (text, empty)
        sizes.clear()
        sequential = run(pair, text, 5, schedule=schedule, settings=SamplerSettings(cfg=3.0, tau=1.0,
                                                                                    sequential_rows=True), **kw)
        assert sizes == [2] * (2 * schedule.num_scales)
        sizes.clear()
        assert all(torch.equal(a, b) for a, b in zip(stacked.bits, sequential.bits))
        assert torch.equal(stacked.images, sequential.images)
    # without guidance there is one row: nothing to split
    run(pair, text, 5, settings=SamplerSettings(cfg=1.0, sequential_rows=True), decode=False)
    assert sizes == [2] * SCHEDULE.num_scales
