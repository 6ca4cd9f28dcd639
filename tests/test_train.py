"""Training: bitwise self-correction, the loss, condition dropout, optimiser groups, overfitting each stage,
frozen backbone, bit-identical resume, exports, the command line (and a 2-process gloo DDP run)."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from echogen_core import checkpoint as ck
from echogen_core import train as T
from echogen_core.cli import main as cli_main
from echogen_core.data import BucketBatchSampler, PairDataset, TripletFolder, collate, training_schedule
from echogen_core.echogen import SubjectFeatures
from echogen_core.errors import InputError
from echogen_core.infinity import Infinity, InfinityConfig
from echogen_core.sampler import next_scale_inputs
from helpers import micro_vae, randomize_, random_text

SCHED3 = training_schedule(1.0, "0.06M", num_scales=3)   # (1,1) (2,2) (4,4): 64 px, 21 tokens
CLEAN = dict(bsc_strength=0.0, text_drop=0.0, semantic_drop=0.0, content_drop=0.0, cache_features=True)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only add overhead on a shared 2-core machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def vae():
    return micro_vae(codebook_dim=8)


def images(batch=2, size=64, seed=0):
    """Smooth random images (a few blobs): structured enough for a VAE to fit."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, 3, 4, 4, generator=g) * 2 - 1
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def make_batch(schedule=SCHED3, batch=2, seed=0, ref=16):
    from echogen_core.data import Batch

    g = torch.Generator().manual_seed(seed + 100)
    return Batch(target=images(batch, schedule.height, seed), captions=[f"caption {seed} {i}" for i in range(batch)],
                 ids=[f"s{seed}_{i}" for i in range(batch)], schedule=schedule,
                 reference=torch.rand(batch, 3, ref, ref, generator=g))


def text_encoder(captions):
    """A stand-in for T5: a fixed random embedding per caption (deterministic)."""
    out = None
    for c in captions:
        t = random_text([4 + len(c) % 3], channels=128, seed=sum(map(ord, c)))
        out = t if out is None else out.concat(t)
    return out


def subject_encoder(reference):
    """A stand-in for DINOv2 + FLUX VAE that depends on the reference pixels (tiny EchoGen geometry)."""
    B = reference.shape[0]
    pooled = F.adaptive_avg_pool2d(reference, 4).flatten(1)          # (B, 48)
    g = torch.Generator().manual_seed(7)
    proj_s, proj_c = torch.randn(48, 5 * 32, generator=g), torch.randn(48, 16 * 4, generator=g)
    return SubjectFeatures((pooled @ proj_s).view(B, 5, 32), (pooled @ proj_c).view(B, 16, 4))


def tiny_echogen(seed=0):
    backbone = randomize_(Infinity(InfinityConfig.tiny()), seed=seed)
    return T.echogen_from_backbone(backbone, reference_size=32, semantic_dim=32, content_dim=4, seed=seed), backbone


def trainer(stage, vae, model=None, lr=3e-3, batch_size=2, **kw):
    settings = T.TrainSettings(stage=stage, base_lr=lr * 256 / batch_size, batch_size=batch_size, **kw)
    if stage == "tokenizer":
        return T.Trainer(model or micro_vae(codebook_dim=8, seed=3), settings)
    if stage == "backbone":
        return T.Trainer(model or Infinity(InfinityConfig.tiny()).init_weights(0), settings, vae=vae,
                         text_encoder=text_encoder)
    return T.Trainer(model or tiny_echogen()[0], settings, vae=vae, text_encoder=text_encoder,
                     subject_encoder=subject_encoder)


# ----------------------------------------------------------------------------------------------------------
# Bitwise self-correction


def test_flip_requant_without_flips_is_clean_teacher_forcing(vae):
    x = images(2)
    latent = vae.encode_latent(x)
    tf = T.flip_requant(vae, latent, SCHED3, strength=0.0)
    assert tf.flip_probs == [0.0] * 3
    assert all(torch.equal(a, b) for a, b in zip(tf.bits, vae.encode_bits(x, SCHED3.grids)))  # clean labels
    assert torch.equal(tf.inputs, next_scale_inputs(vae, tf.bits, SCHED3, False))  # exactly the sampler's inputs
    assert tf.inputs.shape == (2, 20, 8) and tf.labels.shape == (2, 21, 8)
    assert torch.equal(tf.labels[:, 5:21].view(2, 4, 4, 8).to(torch.uint8), tf.bits[2])
    # 2x2 patchify (Infinity-8B layout): stride-8 VAE, tokens carry 4 x d bits
    v8 = micro_vae(codebook_dim=2, patch_size=8)
    tf8 = T.flip_requant(v8, v8.encode_latent(x), SCHED3, strength=0.0, patchify=True)
    assert torch.equal(tf8.inputs, next_scale_inputs(v8, tf8.bits, SCHED3, True))
    assert tf8.labels.shape == (2, 21, 8)


def test_flip_requant_flips_about_p_of_the_bits_and_keeps_clean_labels():
    sched = training_schedule(1.0, "0.06M")               # 7 scales up to 16 x 16
    lfq_vae = micro_vae(codebook_dim=8)
    latent = torch.randn(4, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    drawn = []
    for _ in range(6):
        tf = T.flip_requant(lfq_vae, latent, sched, strength=0.3, generator=g)
        for s, p in enumerate(tf.flip_probs):
            assert 0 <= p <= 0.3 + 1e-9 and abs(p * 100 - round(p * 100)) < 1e-6  # {0, 0.01, ..., 0.3}
            n = tf.bits[s].numel()
            frac = (tf.bits[s] != tf.used_bits[s]).float().mean().item()
            assert abs(frac - p) <= 4 * (p * (1 - p) / n) ** 0.5 + 1e-9, (s, p, frac)
            drawn.append(p)
        # the first scale's label is the clean quantisation of the latent itself
        clean0 = T.flip_requant(lfq_vae, latent, sched, strength=0.0)
        assert torch.equal(tf.bits[0], clean0.bits[0])
    assert len(set(drawn)) > 10  # a new probability per scale and step
    # flipped bits change the later inputs (the error is carried on)
    assert not torch.equal(tf.inputs, clean0.inputs)
    assert torch.equal(tf.inputs, next_scale_inputs(lfq_vae, tf.used_bits, sched, False))
    with pytest.raises(InputError, match="latent grid"):
        T.flip_requant(lfq_vae, latent[..., :8, :8], sched)


# ----------------------------------------------------------------------------------------------------------
# Loss and dropout


def test_scale_weights_and_bitwise_loss():
    w = T.scale_weights(SCHED3)
    assert w.shape == (21,) and abs(w.sum().item() - 1) < 1e-6
    assert w[0].item() == pytest.approx(4 * w[5].item()) and w[1].item() == pytest.approx(2 * w[5].item())
    assert torch.allclose(T.scale_weights(SCHED3, reweight=False), torch.full((21,), 1 / 21))
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 21, 16, generator=g)
    labels = torch.randint(0, 2, (3, 21, 8), generator=g)
    loss, stats = T.bitwise_loss(logits, labels, w)
    pair = logits.view(3, 21, 8, 2)
    bce = F.binary_cross_entropy_with_logits(pair[..., 1] - pair[..., 0], labels.float(), reduction="none")
    assert loss.item() == pytest.approx((bce.mean(-1) * w).sum(-1).mean().item(), rel=1e-5)
    assert stats["bit_acc"] == pytest.approx(((pair[..., 1] > pair[..., 0]).long() == labels).float().mean().item())


def test_condition_dropout_rates_and_replacements():
    g = torch.Generator().manual_seed(0)
    d = T.draw_condition_drops(40000, g, 0.1, 0.1, 0.1)
    t, s, c = d.text.float(), d.semantic.float(), d.content.float()
    for m in (t, s, c):
        assert abs(m.mean().item() - 0.1) < 0.006
    for a, b in ((t, s), (t, c), (s, c)):  # independent draws per sample
        assert abs((a * b).mean().item() - 0.01) < 0.003
    assert not torch.equal(d.text, d.semantic)
    model, _ = tiny_echogen()
    text = random_text([3, 5, 4], channels=128, seed=1).pad_to(7)
    subject = subject_encoder(torch.rand(3, 3, 16, 16))
    drops = T.ConditionDrops(torch.tensor([True, False, False]), torch.tensor([False, True, False]),
                             torch.tensor([False, True, True]))
    with torch.no_grad():
        t2, s2 = T.apply_condition_drops(model, text, subject, drops)
        empty = model.empty_prompt(text.lengths).pad_to(7)
        null = model.null_subject(3)
    assert torch.equal(t2.features[0], empty.features[0]) and torch.equal(t2.features[1:], text.features[1:])
    assert torch.equal(t2.lengths, text.lengths)
    assert torch.equal(s2.semantic[1], null.semantic[1]) and torch.equal(s2.semantic[[0, 2]], subject.semantic[[0, 2]])
    assert torch.equal(s2.content[1:], null.content[1:]) and torch.equal(s2.content[0], subject.content[0])


# ----------------------------------------------------------------------------------------------------------
# Optimiser


def test_param_groups_lr_multipliers_and_weight_decay():
    model, _ = tiny_echogen()
    names = T.set_trainable(model, "echogen")
    assert names and all("control" in n for n in names)
    groups = T.build_param_groups(model.named_parameters(), "echogen", lr=1.0, weight_decay=0.005)
    grouped = [n for g in groups for n in g["names"]]
    assert sorted(grouped) == sorted(names) and len(grouped) == len(set(grouped))
    shapes = dict(model.named_parameters())
    for g in groups:
        for n in g["names"]:
            sa = ".sa." in n
            assert g["lr_mult"] == (0.1 if sa else 1.0) and g["lr"] == pytest.approx(g["lr_mult"])
            decays = shapes[n].ndim >= 2 and not n.endswith("bias") and not any(k in n for k in T.NO_DECAY_KEYS)
            assert g["weight_decay"] == (0.005 if decays else 0.0), n
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["block_chunks.0.module.0.sa.control_attn.weight"]["lr_mult"] == 0.1
    assert by_name["block_chunks.0.module.0.sa.control_v_bias"]["weight_decay"] == 0.0
    assert by_name["control_pos_start"]["weight_decay"] == 0.0
    assert by_name["block_chunks.1.module.0.control_ffn.fc1.weight"]["weight_decay"] == 0.005
    assert by_name["block_chunks.0.module.0.control_ada_gss"]["weight_decay"] == 0.0
    # the backbone stage trains everything at one lr; no decay on cfg_uncond / lvl_embed / 1-D
    inf = Infinity(InfinityConfig.tiny())
    T.set_trainable(inf, "backbone")
    bgroups = T.build_param_groups(inf.named_parameters(), "backbone", lr=1.0)
    assert {g["lr_mult"] for g in bgroups} == {1.0}
    assert sum(len(g["names"]) for g in bgroups) == len(list(inf.parameters()))
    nodecay = {n for g in bgroups if g["weight_decay"] == 0 for n in g["names"]}
    assert {"cfg_uncond", "lvl_embed.weight", "text_norm.weight", "head.bias"} <= nodecay
    assert "head.weight" not in nodecay and "word_embed.weight" not in nodecay
    tr = trainer("echogen", micro_vae(codebook_dim=8), model=model, lr=1e-3, batch_size=4)
    assert tr.peak_lr == pytest.approx(1e-3) and tr.optimizer.defaults["betas"] == (0.9, 0.97)
    assert tr.settings.grad_clip == 5.0


# ----------------------------------------------------------------------------------------------------------
# Overfitting one batch, per stage


def losses(tr, batch, steps):
    return [tr.train_step([batch])["loss"] for _ in range(steps)]


def test_tokenizer_stage_overfits_and_quantises_like_inference():
    vae = micro_vae(codebook_dim=8, seed=3)
    fwd = T.TokenizerForward(vae)
    h = vae.encoder(images(2, 32)).float()
    grids = T.tokenizer_grids(vae, training_schedule(1.0, "0.06M", num_scales=2))
    summed, commit, entropy = fwd.quantize(h, grids)
    assert torch.equal(summed, vae.quantize_multiscale(h, grids)[0])  # the decoder sees the inference sum
    assert commit > 0 and torch.isfinite(entropy)
    tr = trainer("tokenizer", None, model=vae, lr=1e-3)
    batch = make_batch(training_schedule(1.0, "0.06M", num_scales=2))
    ls = losses(tr, batch, 20)
    assert np.mean(ls[-3:]) < 0.7 * ls[0], ls


def test_backbone_stage_overfits(vae):
    tr = trainer("backbone", vae, **CLEAN)
    ls = losses(tr, make_batch(), 20)
    assert np.mean(ls[-3:]) < 0.75 * ls[0], ls
    assert all(p.requires_grad for p in tr.model.parameters())


def test_echogen_stage_overfits_and_trains_only_the_injection(vae):
    model, backbone = tiny_echogen()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tr = trainer("echogen", vae, model=model, **CLEAN)
    ls = losses(tr, make_batch(), 20)
    assert np.mean(ls[-3:]) < 0.8 * ls[0], ls
    after = model.state_dict()
    frozen = [k for k in after if "control" not in k]
    assert frozen and all(torch.equal(after[k], before[k]) for k in frozen)  # bit-identical backbone
    assert all(torch.equal(after[k], backbone.state_dict()[k]) for k in backbone.state_dict())
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all("control" in k for k in changed)
    # every injection path learns, including the content read (its K/V start at zero)
    for part in ("sa.control_mat_kv", "sa.control_attn", "ca.control_mat_kv", "control_proj_for_sos",
                 "control_proj_for_ca_refer"):
        assert any(part in k for k in changed), part


def test_activation_checkpointing_gives_the_same_gradients(vae):
    batch = make_batch()
    grads = []
    for ckpt in ("off", "on"):
        model, _ = tiny_echogen()
        tr = trainer("echogen", vae, model=model, checkpointing=ckpt, seed=4)
        latent, text, subject = tr.conditions(batch, batch.target)
        tf = T.flip_requant(vae, latent, SCHED3, 0.3, 13, torch.Generator().manual_seed(0))
        drops = T.draw_condition_drops(2, torch.Generator().manual_seed(3), 0.5, 0.5, 0.5)
        loss, _ = T.bitwise_loss(tr.forward_module(text, tf.inputs, SCHED3, drops, subject), tf.labels, tr._weights(SCHED3))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------
# Resume and export


def synthetic_triplets(folder: Path, n=5, size=48, ref=40):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        low = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(low).resize((size, size), Image.BILINEAR).save(folder / f"t{i}.target.png")
        Image.fromarray(rng.integers(0, 255, (ref, ref, 3), dtype=np.uint8)).save(folder / f"t{i}.ref.png")
        (folder / f"t{i}.txt").write_text(f"a thing number {i}. It sits on a table. The light is soft.")
    return folder


def test_resume_is_bit_identical_to_an_uninterrupted_run(vae, tmp_path):
    """Official noise on (self-correction flips, all three dropouts), new data every step: 5 steps straight
    vs 2 steps, checkpoint file, a fresh trainer on a fresh model, 3 more steps."""
    ds = PairDataset(TripletFolder(synthetic_triplets(tmp_path / "d")), size="0.06M", num_scales=3,
                     reference_size=32)

    def run(tr, start, stop):
        sampler = BucketBatchSampler(ds, 2, seed=0, start_step=start)
        it = iter(sampler)
        for _ in range(start, stop):
            tr.train_step([collate([ds[k] for k in next(it)])])

    def fresh(resume=None):
        model, _ = tiny_echogen()
        settings = T.TrainSettings(stage="echogen", base_lr=0.3, batch_size=2, text_drop=0.3, semantic_drop=0.3,
                                   content_drop=0.3)
        return T.Trainer(model, settings, vae=vae, text_encoder=text_encoder, subject_encoder=subject_encoder,
                         resume=resume)

    straight = fresh()
    run(straight, 0, 5)
    first = fresh()
    run(first, 0, 2)
    first.save_checkpoint(tmp_path / "ck" / "checkpoint-last.pt")
    assert not list((tmp_path / "ck").glob("*.partial"))
    state = T.load_checkpoint(tmp_path / "ck" / "checkpoint-last.pt")
    assert state["step"] == 2 and all("control" in k for k in state["model"])
    resumed = fresh(resume=state)
    assert resumed.step == 2
    run(resumed, 2, 5)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert torch.equal(straight.generator.get_state(), resumed.generator.get_state())
    # a checkpoint on another backbone is refused
    other = T.echogen_from_backbone(randomize_(Infinity(InfinityConfig.tiny()), seed=9), 32, 32, 4)
    with pytest.raises(ck.CheckpointError, match="different frozen backbone"):
        T.Trainer(other, straight.settings, vae=vae, text_encoder=text_encoder, subject_encoder=subject_encoder,
                  resume=state)


def test_exports_load_with_the_official_loaders(vae, tmp_path):
    model, backbone = tiny_echogen()
    tr = trainer("echogen", vae, model=model, **CLEAN)
    losses(tr, make_batch(), 2)
    info = tr.export(tmp_path / "adapter.safetensors")
    torch.save(backbone.state_dict(), tmp_path / "backbone.pth")
    assert info["kind"] == "adapter" and info["bytes"] < (tmp_path / "backbone.pth").stat().st_size * 4
    loaded = ck.load_echogen(tmp_path / "backbone.pth", adapter=tmp_path / "adapter.safetensors")
    want = model.state_dict()
    assert loaded.state_dict().keys() == want.keys()
    assert all(torch.equal(loaded.state_dict()[k], want[k]) for k in want)
    # backbone stage -> official flat Infinity file; tokenizer stage -> {"vae": ...}
    inf = Infinity(InfinityConfig.tiny()).init_weights(1)
    for name in ("infinity.pth", "infinity.safetensors"):
        T.export_model(inf, tmp_path / name, "backbone")
        back = ck.load_infinity(tmp_path / name, dtype=torch.float32)
        assert all(torch.equal(back.state_dict()[k], v) for k, v in inf.state_dict().items())
    # (micro_vae's group count is not the one the loader infers: only safetensors can carry it, see below)
    T.export_model(vae, tmp_path / "vae.safetensors", "tokenizer")
    back = ck.load_vae(tmp_path / "vae.safetensors")
    assert all(torch.equal(back.state_dict()[k], v) for k, v in vae.state_dict().items())
    with torch.no_grad():
        assert torch.equal(back.decode(back.encode_latent(images(1))), vae.decode(vae.encode_latent(images(1))))


def test_vae_with_an_uninferable_group_count_round_trips_through_its_metadata(tmp_path):
    """GroupNorm's group count leaves no trace in the shapes: a trained VAE with another count than the loader's
    rule must carry it, or it loads without error and decodes garbage."""
    from echogen_core.bsq_vae import BSQVAE, BSQVAEConfig

    cfg = BSQVAEConfig(codebook_dim=8, patch_size=8, base_ch=16, ch_mult=(1, 1, 2, 2), num_res_blocks=1, norm_groups=4)
    vae = randomize_(BSQVAE(cfg), seed=5, std=0.1).eval()
    x = images(batch=1)
    T.export_model(vae, tmp_path / "vae.safetensors", "tokenizer")
    back = ck.load_vae(tmp_path / "vae.safetensors")
    assert back.config.norm_groups == 4
    with torch.no_grad():
        assert torch.equal(back.decode(back.encode_latent(x)), vae.decode(vae.encode_latent(x)))
    ck.convert(tmp_path / "vae.safetensors", tmp_path / "vae_fp16.safetensors", dtype=torch.float16)
    assert ck.load_vae(tmp_path / "vae_fp16.safetensors").config.norm_groups == 4
    with pytest.raises(InputError, match="norm_groups=4.*safetensors"):
        T.export_model(vae, tmp_path / "vae.pth", "tokenizer")


# ----------------------------------------------------------------------------------------------------------
# Command line (and DDP)


@pytest.fixture(scope="module")
def cli_files(tiny_t5_dir, tmp_path_factory):
    from safetensors.torch import save_file

    from echogen_core.dinov2 import Dinov2, Dinov2Config
    from echogen_core.flux_vae import FluxVAEConfig, FluxVAEEncoder

    root = tmp_path_factory.mktemp("train_cli")
    torch.save({"vae": micro_vae(codebook_dim=8).state_dict()}, root / "vae.pth")
    backbone = randomize_(Infinity(InfinityConfig.tiny(text_channels=64)), seed=2)
    torch.save(backbone.state_dict(), root / "infinity.pth")
    torch.save(randomize_(Dinov2(Dinov2Config.tiny()), seed=3, std=0.02).state_dict(), root / "dinov2.pth")
    save_file(randomize_(FluxVAEEncoder(FluxVAEConfig.tiny()), seed=4, std=0.02).state_dict(), str(root / "ae.safetensors"))
    synthetic_triplets(root / "data", n=4, size=40, ref=36)
    return root, tiny_t5_dir


def cli_args(root, t5, out, steps, *extra):
    return ["--stage", "echogen", "--data", str(root / "data"), "--out", str(out), "--vae", str(root / "vae.pth"),
            "--text-encoder", str(t5), "--backbone", str(root / "infinity.pth"), "--dinov2", str(root / "dinov2.pth"),
            "--content-vae", str(root / "ae.safetensors"), "--reference-size", "32", "--size", "0.06M",
            "--num-scales", "2", "--batch-size", "2", "--steps", str(steps), "--workers", "0", "--lr", "0.1",
            "--save-every", "1", "--log-every", "1", *extra]


def test_train_command_resumes_exactly_and_exports_an_adapter(cli_files, tmp_path, capsys):
    root, t5 = cli_files
    assert cli_main(["train", *cli_args(root, t5, tmp_path / "a", 3)]) == 0
    assert cli_main(["train", *cli_args(root, t5, tmp_path / "b", 2)]) == 0
    assert cli_main(["train", *cli_args(root, t5, tmp_path / "b", 3)]) == 0   # picks up checkpoint-last.pt at step 2
    err = capsys.readouterr().err
    assert "resuming at step 2" in err and "stage echogen: 4 samples" in err
    a = ck.load_echogen(root / "infinity.pth", adapter=tmp_path / "a" / "adapter.safetensors")
    b = ck.load_echogen(root / "infinity.pth", adapter=tmp_path / "b" / "adapter.safetensors")
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert T.load_checkpoint(tmp_path / "b" / "checkpoint-last.pt")["step"] == 3
    assert cli_main(["train", *cli_args(root, t5, tmp_path / "c", 1, "--stage", "tokenizer")]) == 2  # needs --init/--config


def _ddp_worker(rank: int, port: int, out: str):
    """One rank, started like torchrun starts it (RANK / WORLD_SIZE / MASTER_* in the environment)."""
    import hashlib

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist = T.init_distributed("cpu")
    model, _ = tiny_echogen()
    settings = T.TrainSettings(stage="echogen", base_lr=0.2, batch_size=2)
    tr = T.Trainer(model, settings, vae=micro_vae(codebook_dim=8), text_encoder=text_encoder,
                   subject_encoder=subject_encoder, dist=dist)
    for step in range(2):
        tr.train_step([make_batch(seed=10 * step + dist.rank)])  # each rank its own data
    tr.save_checkpoint(Path(out) / "checkpoint-last.pt")
    digest = hashlib.sha1(b"".join(v.numpy().tobytes() for _, v in sorted(model.state_dict().items()))).hexdigest()
    (Path(out) / f"rank{dist.rank}.json").write_text(json.dumps({"digest": digest, "world": dist.world_size,
                                                                 "lr": tr.peak_lr}))
    dist.close()


def test_two_process_ddp_on_cpu_keeps_ranks_in_sync(tmp_path):
    """Two gloo ranks (forked, so torch is not imported twice): DDP averages the gradients, so both ranks hold
    the same weights after each step although each trained on its own batch; only rank 0 writes."""
    import multiprocessing as mp
    import socket

    if "fork" not in mp.get_all_start_methods():
        pytest.skip("needs the fork start method")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import torch._dynamo  # noqa: F401 - DDP's constructor imports it: once here, not once per forked rank

    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_ddp_worker, args=(r, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=45)
    if any(p.is_alive() for p in procs):
        for p in procs:
            p.kill()
        pytest.skip("the 2-process gloo run did not finish in time on this machine")
    assert [p.exitcode for p in procs] == [0, 0]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["digest"] == r1["digest"]
    assert r0["lr"] == pytest.approx(0.2 * 4 / 256)  # global batch = 2 per rank x 2 ranks
    state = T.load_checkpoint(tmp_path / "checkpoint-last.pt")
    assert state["world_size"] == 2 and len(state["rng"]) == 2  # each rank's own random stream is kept
    assert not torch.equal(state["rng"][0]["generator"], state["rng"][1]["generator"])
    assert sorted(x.name for x in tmp_path.iterdir()) == ["checkpoint-last.pt", "rank0.json", "rank1.json"]


def test_train_command_chains_the_stages_tokenizer_then_backbone(cli_files, tmp_path, capsys):
    """The real recipe's order on tiny configs: a tokenizer from scratch, then a text-to-image backbone on it
    (every weight trained), each exported in the official layout the loaders read."""
    root, t5 = cli_files
    vae_cfg = json.dumps({"codebook_dim": 8, "patch_size": 16, "base_ch": 8, "ch_mult": [1, 1, 1, 1, 1],
                          "num_res_blocks": 1, "norm_groups": 4})
    common = ["--data", str(root / "data"), "--size", "0.06M", "--num-scales", "2", "--batch-size", "2",
              "--steps", "2", "--workers", "0", "--lr", "0.1", "--log-every", "1"]
    assert cli_main(["train", "--stage", "tokenizer", "--out", str(tmp_path / "tok"), "--config", vae_cfg, *common]) == 0
    # 4 groups is not what the loader reads off the shapes: the default export becomes safetensors (metadata)
    assert not (tmp_path / "tok" / "vae.pth").exists()
    vae = ck.load_vae(tmp_path / "tok" / "vae.safetensors")
    assert vae.config.base_ch == 8 and vae.config.norm_groups == 4
    # a tokenizer from scratch is a function of --seed: a second run gives the same weights, another seed others
    assert cli_main(["train", "--stage", "tokenizer", "--out", str(tmp_path / "tok_again"), "--config", vae_cfg,
                     *common]) == 0
    again = ck.load_vae(tmp_path / "tok_again" / "vae.safetensors").state_dict()
    assert all(torch.equal(v, again[k]) for k, v in vae.state_dict().items())
    assert cli_main(["train", "--stage", "tokenizer", "--out", str(tmp_path / "tok_seed1"), "--config", vae_cfg,
                     "--seed", "1", *common]) == 0
    other = ck.load_vae(tmp_path / "tok_seed1" / "vae.safetensors").state_dict()
    assert not all(torch.equal(v, other[k]) for k, v in vae.state_dict().items())
    assert cli_main(["train", "--stage", "tokenizer", "--out", str(tmp_path / "tok2"), "--config", vae_cfg,
                     "--export", str(tmp_path / "tok2" / "vae.pth"), *common]) == 2
    assert "norm_groups=4" in capsys.readouterr().err
    assert not (tmp_path / "tok2" / "checkpoint-last.pt").exists()  # refused before training
    assert cli_main(["train", "--stage", "backbone", "--out", str(tmp_path / "t2i"), "--config", "tiny", "--vae",
                   str(tmp_path / "tok" / "vae.safetensors"), "--text-encoder", str(t5), *common]) == 0
    model = ck.load_infinity(tmp_path / "t2i" / "infinity.pth", dtype=torch.float32)
    assert model.cfg == InfinityConfig.tiny(text_channels=64)
    init = Infinity(model.cfg).init_weights(0).state_dict()
    assert not torch.equal(model.state_dict()["head.weight"], init["head.weight"])  # trained
