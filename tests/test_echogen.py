import pytest
import torch
from safetensors.torch import load_file

import echogen_core.sampler as sampler_mod
from echogen_core import checkpoint as ck
from echogen_core.echogen import EchoGen, EchoGenBlock, EchoGenConfig, SubjectFeatures
from echogen_core.errors import CheckpointError, InputError
from echogen_core.infinity import Infinity
from echogen_core.sampler import SamplerSettings, generate, next_scale_inputs
from echogen_core.schedules import get_schedule
from helpers import forward_batches, micro_vae, randomize_, random_bits, random_text

SCHEDULE = get_schedule(1.0, "0.06M")


def tiny_echogen(seed=0, **kw):
    return randomize_(EchoGen(EchoGenConfig.tiny(**kw)), seed=seed).eval()


def random_subject(cfg, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return SubjectFeatures(torch.randn(batch, cfg.semantic_len, cfg.semantic_dim, generator=g),
                           torch.randn(batch, cfg.content_len, cfg.content_dim, generator=g))


def probe_inputs(batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, SCHEDULE.total_tokens - 1, 8, generator=g)


def logits(model, subject, text=None, inputs=None):
    text = text or random_text([5], channels=128, seed=1)
    with torch.no_grad():
        return model(text, probe_inputs() if inputs is None else inputs, SCHEDULE, subject=subject)


def test_official_names_and_counts():
    with torch.device("meta"):
        tiny = EchoGen(EchoGenConfig.tiny()).state_dict()
        big = EchoGen(EchoGenConfig.echogen_2b()).state_dict()
    assert len(tiny) == 41 + 2 * 46 == 133
    assert len(big) == 41 + 32 * 46
    top = [k for k in tiny if not k.startswith("block_chunks.")]
    assert len(top) == 41 and sum("control" in k for k in top) == 19
    C, Ds = 2048, 768
    expect = {
        "control_features_uncond": (1025, Ds), "control_features_refer_uncond": (4096, 16),
        "control_pos_start": (1, 1, C), "control_proj_for_ca.0.weight": (C, Ds), "control_proj_for_ca.2.weight": (C, C),
        "control_proj_for_ca_refer.0.weight": (C, 16), "control_proj_for_sos.weight": (C, Ds),
        "control_shared_ada_lin.1.weight": (6 * C, C), "control_shared_ada_lin_refer.1.bias": (6 * C,),
        "control_shared_ada_lin_refer_dino.1.weight": (6 * C, C),
    }
    per_block = {
        "control_ada_gss": (1, 1, 6, C), "sa.control_mat_q.weight": (C, C), "sa.control_q_bias": (C,),
        "sa.control_mat_kv.weight": (2 * C, C), "sa.control_v_bias": (C,), "sa.control_zero_k_bias": (C,),
        "sa.control_scale_mul_1H11": (1, 16, 1, 1), "sa.control_proj.weight": (C, C), "sa.control_proj.bias": (C,),
        "sa.control_attn.weight": (C, C), "ca.control_mat_kv.weight": (2 * C, C), "ca.control_v_bias": (C,),
        "control_ca.mat_q.weight": (C, C), "control_ca.mat_q.bias": (C,), "control_ca.mat_kv.weight": (2 * C, C),
        "control_ca.v_bias": (C,), "control_ca.zero_k_bias": (C,), "control_ca.proj.weight": (C, C),
        "control_ca_norm.weight": (C,), "control_ffn.fc1.weight": (4 * C, C), "control_ffn.fc2.weight": (C, 4 * C),
    }
    for k, shape in expect.items():
        assert tuple(big[k].shape) == shape, k
    for k, shape in per_block.items():
        assert tuple(big["block_chunks.5.module.2." + k].shape) == shape, k
    assert "sa.control_attn.bias" not in [k.split("module.2.", 1)[-1] for k in big]
    with torch.device("meta"):
        small = EchoGen(EchoGenConfig.echogen_small()).state_dict()
    assert tuple(small["control_features_uncond"].shape) == (257, 768)
    assert tuple(small["control_features_refer_uncond"].shape) == (1024, 16)


def test_zero_content_gate_removes_the_content_path():
    model = tiny_echogen(seed=1)
    subject = random_subject(model.cfg)
    other = SubjectFeatures(subject.semantic, subject.content + 3 * torch.randn_like(subject.content))
    assert (logits(model, subject) - logits(model, other)).abs().max() > 1e-4  # content matters when open
    with torch.no_grad():
        for b in model.blocks:
            b.sa.control_attn.weight.zero_()
    torch.testing.assert_close(logits(model, subject), logits(model, other), rtol=0, atol=0)


def test_zero_global_projection_leaves_adaln_equal_to_infinity():
    model = tiny_echogen(seed=2)
    with torch.no_grad():
        model.control_proj_for_sos.weight.zero_()
        model.control_proj_for_sos.bias.zero_()
        model.control_shared_ada_lin[1].bias.zero_()
    text = random_text([6], channels=128)
    subject = random_subject(model.cfg)
    with torch.no_grad():
        ctx = model.encode_conditions(text, subject)
        torch.testing.assert_close(ctx.ada, model.encode_text(text).ada, rtol=0, atol=0)
        model.control_proj_for_sos.bias.normal_()
        assert (model.encode_conditions(text, subject).ada - ctx.ada).abs().max() > 1e-4


def test_semantic_tokens_act_only_through_documented_paths():
    base = tiny_echogen(seed=3)
    subject = random_subject(base.cfg)
    changed = SubjectFeatures(subject.semantic + torch.randn_like(subject.semantic), subject.content)

    def closed(open_path=None):
        m = tiny_echogen(seed=3)
        with torch.no_grad():
            if open_path != "cross-attention keys":
                for b in m.blocks:
                    b.ca.control_mat_kv.weight.zero_()
                    b.ca.control_v_bias.zero_()
            if open_path != "global token":
                m.control_proj_for_sos.weight.zero_()
        return m

    m = closed()
    torch.testing.assert_close(logits(m, subject), logits(m, changed), rtol=0, atol=0)
    for path in ("cross-attention keys", "global token"):
        m = closed(path)
        assert (logits(m, subject) - logits(m, changed)).abs().max() > 1e-4, path


def test_kv_cached_equals_full_sequence_with_subject():
    model = tiny_echogen(seed=4)
    vae = micro_vae(codebook_dim=8)
    subject = random_subject(model.cfg, batch=2, seed=5)
    text = random_text([5, 8], channels=128, seed=6)
    bits = random_bits(SCHEDULE.grids, 2, 8, seed=7)
    inputs = next_scale_inputs(vae, bits, SCHEDULE, patchify=False)
    with torch.no_grad():
        full = model(text, inputs, SCHEDULE, subject=subject)
        ctx = model.encode_conditions(text, subject)
        cache = model.new_cache(2, SCHEDULE)
        x, out = model.first_tokens(ctx), []
        assert x.shape[1] == 2  # global subject token + SOS
        for s, start in enumerate(SCHEDULE.offsets):
            out.append(model.forward_scale(x, ctx, SCHEDULE, s, cache))
            if s + 1 < SCHEDULE.num_scales:
                a = start + SCHEDULE.tokens_per_scale[s] - 1
                x = model.embed_bits(inputs[:, a:a + SCHEDULE.tokens_per_scale[s + 1]])
    assert full.shape == (2, SCHEDULE.total_tokens, 16)
    torch.testing.assert_close(torch.cat(out, 1), full, atol=2e-5, rtol=1e-5)


def test_content_stream_never_reads_image_tokens():
    model = tiny_echogen(seed=8)
    text, subject = random_text([5], channels=128), random_subject(model.cfg)
    def content_kv(ctx):
        return [t.clone() for layer in range(model.cfg.depth) for t in ctx.content.rows(layer)]

    with torch.no_grad():
        kv_before = content_kv(model.encode_conditions(text, subject))
        ctx = model.encode_conditions(text, subject)
        model(ctx, probe_inputs(seed=1), SCHEDULE)
        model(ctx, probe_inputs(seed=2), SCHEDULE)
    for a, b in zip(kv_before, content_kv(ctx)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("rows", [[0, 0, 1, 1, 2, 2], [0, 1, 0, 2, 1, 2], [0, 0, 1]])
def test_content_stream_runs_once_per_distinct_row(rows, monkeypatch):
    """Identical (subject, prompt) rows share one content stream; the read equals per-row K/V."""
    from echogen_core.echogen import ContentMemory

    model = tiny_echogen(seed=10)
    texts = random_text([5, 7, 3], channels=128, seed=11)
    subjects = random_subject(model.cfg, batch=3, seed=12)
    text, subject = texts.select(rows), subjects.select(rows)
    inputs = probe_inputs(seed=3, batch=len(rows))
    calls = []
    original = EchoGenBlock.content_stream

    def counting(self, y, ctx, layer):
        calls.append(y.shape[0])
        return original(self, y, ctx, layer)

    monkeypatch.setattr(EchoGenBlock, "content_stream", counting)
    with torch.no_grad():
        ctx = model.encode_conditions(text, subject)
    monkeypatch.undo()
    assert set(calls) == {len(set(rows))}
    assert ctx.content.num_rows == len(rows)
    with torch.no_grad():
        shared = model(ctx, inputs, SCHEDULE)
        per_row = [ctx.content.rows(i) for i in range(len(model.blocks))]
        ctx.content = ContentMemory(per_row)
        ctx.block_kv = []
        separate = model(ctx, inputs, SCHEDULE)
    torch.testing.assert_close(shared, separate, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # and each row equals that row computed on its own
        alone = model(texts.select([rows[1]]), inputs[1:2], SCHEDULE, subject=subjects.select([rows[1]]))
    torch.testing.assert_close(shared[1:2], alone, atol=1e-5, rtol=1e-5)


def test_three_row_guidance_formula(monkeypatch):
    model, vae = tiny_echogen(seed=9), micro_vae(codebook_dim=8)
    text, subject = random_text([5], channels=128, seed=3), random_subject(model.cfg, seed=4)
    seen = []
    real = sampler_mod.sample_bits
    monkeypatch.setattr(sampler_mod, "sample_bits", lambda l, *a: (seen.append(l.clone()), real(l, *a))[1])
    gt, gi, tau = [2.5, 1.5] + [2.5] * 5, [3.0, 0.5] + [2.5] * 5, 2.0
    generate(model, vae, text, SCHEDULE, SamplerSettings(cfg=gt, subject_cfg=gi, tau=tau), seed=1, subject=subject, decode=False)
    rows = [(text, subject), (text, model.null_subject(1)), (model.empty_prompt(text.lengths), model.null_subject(1))]
    with torch.no_grad():
        l = []
        for t, subj in rows:
            ctx = model.encode_conditions(t, subj)
            l.append(model.forward_scale(model.first_tokens(ctx), ctx, SCHEDULE, 0, model.new_cache(1, SCHEDULE)) / tau)
    ti, t_, uu = l
    expected = uu + gt[0] * (t_ - uu) + gi[0] * (ti - t_)
    torch.testing.assert_close(seen[0], expected.reshape(-1, 2), atol=1e-5, rtol=1e-5)


def test_subject_generation_is_deterministic_and_subject_dependent():
    model, vae = tiny_echogen(seed=10), micro_vae(codebook_dim=8)
    text = random_text([5, 7], channels=128, seed=3)
    s1, s2 = random_subject(model.cfg, seed=1), random_subject(model.cfg, seed=2)
    a = generate(model, vae, text, SCHEDULE, seed=3, subject=s1, decode=False)
    b = generate(model, vae, text, SCHEDULE, seed=3, subject=s1, decode=False)
    c = generate(model, vae, text, SCHEDULE, seed=3, subject=s2, decode=False)
    assert torch.equal(a.summed_codes, b.summed_codes) and not torch.equal(a.summed_codes, c.summed_codes)
    plain = generate(model, vae, text, SCHEDULE, seed=3, decode=False)  # no subject: two-row text CFG
    assert plain.summed_codes.shape == a.summed_codes.shape
    with pytest.raises(InputError, match="subjects for 2 prompts"):
        generate(model, vae, text, SCHEDULE, subject=random_subject(model.cfg, batch=3), decode=False)
    wrong = SubjectFeatures(torch.zeros(1, 5, 32), torch.zeros(1, 16, 4))
    with pytest.raises(ValueError, match="different model size"):
        generate(model, vae, text, SCHEDULE, subject=wrong, decode=False)
    infinity = randomize_(Infinity(EchoGenConfig.tiny().backbone))
    with pytest.raises(InputError, match="plain Infinity"):
        generate(infinity, vae, text, SCHEDULE, subject=s1, decode=False)


def test_official_layout_files_load_strictly(tmp_path):
    model = tiny_echogen(seed=11)
    subject = random_subject(model.cfg)
    ref = logits(model, subject)
    sd = model.state_dict()
    torch.save({"trainer": {"gpt_fsdp": dict(sd)}, "epoch": 1}, tmp_path / "echogen_tiny.pth")
    loaded = ck.load_echogen(tmp_path / "echogen_tiny.pth")
    assert loaded.cfg == model.cfg
    torch.testing.assert_close(logits(loaded, subject), ref, rtol=0, atol=0)
    # control weights in one file, the frozen Infinity part in another
    torch.save({k: v for k, v in sd.items() if "control" in k}, tmp_path / "control_only.pth")
    torch.save({k: v for k, v in sd.items() if "control" not in k}, tmp_path / "infinity.pth")
    with pytest.raises(CheckpointError, match="only the EchoGen adapter"):
        ck.load_echogen(tmp_path / "control_only.pth")
    merged = ck.load_echogen(tmp_path / "control_only.pth", backbone=tmp_path / "infinity.pth")
    torch.testing.assert_close(logits(merged, subject), ref, rtol=0, atol=0)
    # adapter-only safetensors over an Infinity checkpoint
    ck.save_adapter(model, tmp_path / "adapter.safetensors")
    assert all("control" in k for k in load_file(tmp_path / "adapter.safetensors"))
    over = ck.load_echogen(tmp_path / "infinity.pth", adapter=tmp_path / "adapter.safetensors")
    torch.testing.assert_close(logits(over, subject), ref, rtol=0, atol=0)
    # a plain Infinity loader refuses an EchoGen file and says why
    with pytest.raises(CheckpointError, match="EchoGen loader"):
        ck.load_infinity(tmp_path / "echogen_tiny.pth")
    broken = dict(sd)
    del broken["block_chunks.1.module.0.sa.control_attn.weight"]
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"missing: block_chunks\.1\.module\.0\.sa\.control_attn\.weight"):
        ck.load_echogen(tmp_path / "broken.pth")


def test_init_from_backbone_keeps_gates_closed():
    model = tiny_echogen(seed=12).init_control_from_backbone()
    subject = random_subject(model.cfg)
    other = random_subject(model.cfg, seed=9)
    # at initialisation the content read is closed and the subject's semantic keys carry zero values,
    # but the prepended token and the extra keys do change attention: outputs differ from Infinity's
    for b in model.blocks:
        C = model.cfg.width
        assert b.sa.control_mat_kv.weight[C:].abs().sum() == 0 and b.ca.control_mat_kv.weight.abs().sum() == 0
        assert b.sa.control_mat_kv.weight[:C].abs().min() > 0  # content keys: never normalise a zero vector
        assert b.sa.control_attn.weight.abs().sum() > 0  # the gate stays open to gradients
    torch.testing.assert_close(logits(model, subject), logits(model, other), rtol=0, atol=0)


def test_every_injection_path_learns_from_initialisation():
    """The official init zeroes both the content values and the content gate, so no gradient ever reaches
    the content read; ours keeps the gate, so one step brings every content-stream weight to life."""
    text, subject = random_text([5], channels=128, seed=1), random_subject(EchoGenConfig.tiny(), seed=2)

    def grads(model):
        model.zero_grad(set_to_none=True)
        model(text, probe_inputs(seed=4), SCHEDULE, subject=subject).square().mean().backward()
        return {k: (p.grad.abs().sum().item() if p.grad is not None else 0.0) for k, p in model.named_parameters()}

    official = tiny_echogen(seed=13).init_control_from_backbone().requires_grad_(True)
    for b in official.blocks:
        b.sa.control_attn.weight.data.zero_()
    g = grads(official)
    assert all(v == 0 for k, v in g.items() if "sa.control_mat_kv" in k or "sa.control_attn" in k)

    model = tiny_echogen(seed=13).init_control_from_backbone().requires_grad_(True)
    g = grads(model)
    for key in ("sa.control_mat_kv.weight", "ca.control_mat_kv.weight"):
        assert all(v > 0 for k, v in g.items() if k.endswith(key)), key
    assert g["control_proj_for_sos.weight"] > 0
    with torch.no_grad():  # one plain gradient step on the injection weights
        for k, p in model.named_parameters():
            if "control" in k and p.grad is not None:
                p -= 0.5 * p.grad
    g = grads(model)
    assert max(g.values()) < 1e4  # zero content keys would give ~5e11 here (cosine-normalising a zero vector)
    last = f"block_chunks.{len(model.block_chunks) - 1}."
    for key in ("sa.control_attn.weight", "control_ffn.fc1.weight", "control_ca.mat_q.weight"):
        live = [v for k, v in g.items() if k.endswith(key) and not (key.startswith("control_") and k.startswith(last))]
        assert live and all(v > 0 for v in live), key


# -- the content stream kept across generations (ContentCache) ----------------------------------------------------


def count_content_streams(monkeypatch):
    """Batch sizes of every content-stream run."""
    calls = []
    original = EchoGen.run_content_stream

    def counting(self, content, ctx):
        calls.append(content.shape[0])
        return original(self, content, ctx)

    monkeypatch.setattr(EchoGen, "run_content_stream", counting)
    return calls


def same_result(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.bits, b.bits)) and torch.equal(a.summed_codes, b.summed_codes) \
        and (a.images is None or torch.equal(a.images, b.images))


def cached_and_uncached(seed):
    """The same weights twice: with the default cache, and with the cache off."""
    model, reference = tiny_echogen(seed=seed), tiny_echogen(seed=seed)
    reference.content_cache.capacity = 0
    return model, reference


def test_reseeding_runs_no_content_stream_and_draws_the_same_image(monkeypatch):
    model, reference = cached_and_uncached(20)
    vae = micro_vae(codebook_dim=8)
    text, subject = random_text([6], channels=128, seed=21), random_subject(model.cfg, seed=22)
    calls = count_content_streams(monkeypatch)
    first = generate(model, vae, text, SCHEDULE, seed=1, subject=subject)
    assert calls == [3] and len(model.content_cache) == 3  # (text, subject), (text, none), (empty, none)
    second = generate(model, vae, text, SCHEDULE, seed=2, subject=subject)
    assert calls == [3] and model.content_cache.hits == 3  # the new seed ran no content stream
    assert same_result(first, generate(reference, vae, text, SCHEDULE, seed=1, subject=subject))
    assert same_result(second, generate(reference, vae, text, SCHEDULE, seed=2, subject=subject))
    assert calls == [3, 3, 3] and len(reference.content_cache) == 0
    assert not torch.equal(first.summed_codes, second.summed_codes)

    # a new prompt of the same length, same subject: only the unconditional row is reused
    other = random_text([6], channels=128, seed=23)
    calls.clear()
    new_prompt = generate(model, vae, other, SCHEDULE, seed=2, subject=subject, decode=False)
    assert calls == [2] and model.content_cache.hits == 4 and len(model.content_cache) == 3
    assert same_result(new_prompt, generate(reference, vae, other, SCHEDULE, seed=2, subject=subject, decode=False))


def test_changed_weights_invalidate_the_content_cache(monkeypatch):
    model, reference = cached_and_uncached(24)
    vae = micro_vae(codebook_dim=8)
    text, subject = random_text([5], channels=128, seed=25), random_subject(model.cfg, seed=26)
    calls = count_content_streams(monkeypatch)
    generate(model, vae, text, SCHEDULE, seed=0, subject=subject, decode=False)
    with torch.no_grad():  # an in-place update, as an optimizer step or load_state_dict makes
        for m in (model, reference):
            m.blocks[1].control_ffn.fc1.weight.mul_(1.5)
    calls.clear()
    after = generate(model, vae, text, SCHEDULE, seed=0, subject=subject, decode=False)
    assert calls == [3]
    assert same_result(after, generate(reference, vae, text, SCHEDULE, seed=0, subject=subject, decode=False))

    model.float()  # any .to(): the K/V of the old tensors are let go
    assert len(model.content_cache) == 0
    generate(model, vae, text, SCHEDULE, seed=0, subject=subject, decode=False)
    model.load_state_dict(reference.state_dict())
    assert len(model.content_cache) == 0
    generate(model, vae, text, SCHEDULE, seed=0, subject=subject, decode=False)
    assert len(model.content_cache) == 3
    with torch.no_grad():  # a replaced tensor (new storage) is seen without any call
        model.blocks[0].sa.control_mat_q.weight.data = model.blocks[0].sa.control_mat_q.weight.data * 1.1
    calls.clear()
    generate(model, vae, text, SCHEDULE, seed=0, subject=subject, decode=False)
    assert calls == [3]


def test_content_cache_stays_within_its_capacity(monkeypatch):
    model, reference = cached_and_uncached(27)
    vae = micro_vae(codebook_dim=8)
    texts, subject = random_text([5, 7], channels=128, seed=28), random_subject(model.cfg, seed=29)
    calls = count_content_streams(monkeypatch)
    # two prompts: six distinct rows (their empty prompts differ in length), three kept
    out = generate(model, vae, texts, SCHEDULE, seed=0, subject=subject, decode=False)
    assert calls == [6] and len(model.content_cache) == 3
    assert same_result(out, generate(reference, vae, texts, SCHEDULE, seed=0, subject=subject, decode=False))
    again = generate(model, vae, texts, SCHEDULE, seed=0, subject=subject, decode=False)
    assert calls[2:] == [3] and len(model.content_cache) == 3 and same_result(out, again)
    model.content_cache.capacity = 1
    generate(model, vae, texts.select([0]), SCHEDULE, seed=0, subject=subject, decode=False)
    assert len(model.content_cache) == 1
    model.clear_content_cache()
    assert len(model.content_cache) == 0


def test_content_cache_with_weights_made_under_inference_mode(monkeypatch):
    """ComfyUI runs its nodes, loaders included, under torch.inference_mode: such weights have no version
    counter, and the cache still works (keyed by their storage)."""
    with torch.inference_mode():
        model = tiny_echogen(seed=36)
    assert model.blocks[0].sa.control_mat_q.weight.is_inference()
    vae = micro_vae(codebook_dim=8)
    text, subject = random_text([5], channels=128, seed=37), random_subject(model.cfg, seed=38)
    calls = count_content_streams(monkeypatch)
    with torch.inference_mode():
        a = generate(model, vae, text, SCHEDULE, seed=0, subject=subject, decode=False)
        b = generate(model, vae, text, SCHEDULE, seed=0, subject=subject, decode=False)
    assert calls == [3] and same_result(a, b)


def test_training_and_gradients_bypass_the_content_cache(monkeypatch):
    model = tiny_echogen(seed=30)
    text, subject = random_text([5], channels=128, seed=31), random_subject(model.cfg, seed=32)
    calls = count_content_streams(monkeypatch)
    with torch.no_grad():
        model(text, probe_inputs(), SCHEDULE, subject=subject)
    assert calls == [1] and len(model.content_cache) == 1
    model(text, probe_inputs(), SCHEDULE, subject=subject).sum().backward()  # eval mode, gradients on
    assert calls == [1, 1] and model.content_cache.hits == 0
    model.train()
    assert len(model.content_cache) == 0
    with torch.no_grad():
        model(text, probe_inputs(), SCHEDULE, subject=subject)
    assert calls == [1, 1, 1] and len(model.content_cache) == 0


# -- low-memory mode: guidance rows one group at a time ----------------------------------------------------------


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_sequential_rows_draw_the_same_subject_images(ratio, monkeypatch):
    """Three row groups run one after the other (each with its own KV cache and content streams): same bits,
    same images as stacked, with the content streams cached across generations or not."""
    schedule = get_schedule(ratio, "0.06M")
    model, uncached = cached_and_uncached(33)
    vae = micro_vae(codebook_dim=8)
    text = random_text([5, 7], channels=128, seed=34)
    subject = random_subject(model.cfg, seed=35)
    low_memory = SamplerSettings(sequential_rows=True)
    sizes = forward_batches(model, monkeypatch)
    for m in (model, uncached):
        stacked = generate(m, vae, text, schedule, seed=4, subject=subject)
        assert sizes == [6] * schedule.num_scales
        sizes.clear()
        sequential = generate(m, vae, text, schedule, low_memory, seed=4, subject=subject)
        assert sizes == [2] * (3 * schedule.num_scales)
        sizes.clear()
        assert same_result(stacked, sequential)
        # no subject: the two rows (text, empty) with the learned null subject
        assert same_result(generate(m, vae, text, schedule, seed=4, decode=False),
                           generate(m, vae, text, schedule, low_memory, seed=4, decode=False))
        sizes.clear()
