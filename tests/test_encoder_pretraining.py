"""Pretraining the text, semantic and content encoders (encoder_pretraining.py) and the bundled build's
scheduling of its stages."""
import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from echogen_core import encoder_pretraining as ep
from echogen_core import world
from echogen_core.errors import InputError


@pytest.fixture(scope="module")
def world_folder(tmp_path_factory):
    """A small triplet folder of the synthetic world: 24 subjects x 1 scene."""
    out = tmp_path_factory.mktemp("world")
    train, _ = world.split_subjects(0, 600, 40)
    world.write_triplets(out, world.examples(train[:24], 1, 0, "train"), 0, photos=False)
    return out


# --------------------------------------------------------------------------------------------------------------
# Span corruption


def test_span_corruption_hides_spans_that_the_targets_restore():
    rng = random.Random(0)
    sentinels = list(range(1000, 900, -1))
    eos = 1
    for n in (2, 3, 7, 15, 40):
        ids = list(range(10, 10 + n))
        for _ in range(20):
            inputs, targets = ep.span_corruption(ids, rng, sentinels, eos)
            assert inputs[-1] == eos and targets[-1] == eos
            # put every span back in place of its sentinel: the original prompt comes back
            spans, current = {}, None
            for t in targets[:-1]:
                if t in sentinels:
                    current = t
                    spans[current] = []
                else:
                    spans[current].append(t)
            restored = [x for t in inputs[:-1] for x in (spans[t] if t in sentinels else [t])]
            assert restored == ids
            hidden = sum(len(v) for v in spans.values())
            assert 1 <= hidden <= max(1, round(0.15 * n)) and hidden < n
            used = [t for t in inputs if t in sentinels]
            assert used == sentinels[:len(used)]            # <extra_id_0>, <extra_id_1>, ... in order


def test_span_corruption_of_a_one_token_prompt():
    inputs, targets = ep.span_corruption([5], random.Random(0), [99, 98], 1)
    assert inputs == [5, 1] and targets == [99, 1]


# --------------------------------------------------------------------------------------------------------------
# The three encoders


def test_text_encoder_learns_span_corruption_and_loads_strictly(tiny_t5_dir, tmp_path):
    from echogen_core.text_encoder import T5TextEncoder

    folder = tmp_path / "t5"
    shutil.copytree(tiny_t5_dir, folder)
    prompts = [world.prompt_of(s, sc) for s, sc in zip(world.all_subjects()[:40], world.all_scenes()[::7])]
    before = T5TextEncoder.from_folder(folder).encode(prompts[:2]).features
    report = ep.pretrain_text_encoder(folder, prompts, steps=60, batch_size=16, lr=3e-3, log_every=0)
    assert report["loss_last"] < 0.5 * report["loss_first"], report
    encoder = T5TextEncoder.from_folder(folder)               # strict: an encoder-only folder, nothing missing
    after = encoder.encode(prompts[:2]).features
    assert after.shape == before.shape and not torch.allclose(after, before)
    assert not any(p.name.startswith("decoder") for p in folder.iterdir())
    assert [p.name for p in tmp_path.iterdir()] == ["t5"]          # the staging folder is gone


def test_text_encoder_interrupted_while_saving_keeps_the_old_weights(tiny_t5_dir, tmp_path, monkeypatch):
    from transformers import T5EncoderModel

    folder = tmp_path / "t5"
    shutil.copytree(tiny_t5_dir, folder)
    before = (folder / "model.safetensors").read_bytes()

    def interrupted(self, path, *a, **k):
        (Path(path) / "model.safetensors").write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(T5EncoderModel, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ep.pretrain_text_encoder(folder, ["a small star on grass"], steps=1, batch_size=2, log_every=0)
    assert (folder / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t5"]


@pytest.mark.parametrize("config, message", [
    ("{semantic", "not valid JSON"), ("[1]", "must be a JSON object"),
    ('{"vision": {}}', "unknown objective 'vision'"), ('{"semantic": {"step": 3}}', r"unknown keys \['step'\]"),
])
def test_pretrain_config_errors_name_the_problem(config, message):
    with pytest.raises(InputError, match=message):
        ep._pretrain_config(config)


def test_pretrain_command_refuses_a_bad_model_config(world_folder, tmp_path, capsys):
    from echogen_core.cli import main

    code = main(["pretrain-encoders", "--data", str(world_folder), "--dinov2", str(tmp_path / "d.safetensors"),
                 "--config", '{"semantic": {"model": {"width": 3}}}'])
    assert code == 2 and "not a valid Dinov2Config" in capsys.readouterr().err
    assert main(["pretrain-encoders", "--data", str(world_folder)]) == 2
    assert "Nothing to pretrain" in capsys.readouterr().err


def test_read_prompts_and_references(world_folder, tmp_path):
    prompts = ep.read_prompts(world_folder)
    assert len(prompts) == len(set(prompts)) and all(p.startswith("a ") for p in prompts)
    refs, subjects = ep.read_references(world_folder)
    assert refs.shape == (24, world.REFERENCE_SIZE, world.REFERENCE_SIZE, 3) and refs.dtype == np.uint8
    assert set(subjects[0]) >= set(ep.ATTRIBUTES)
    with pytest.raises(InputError, match="no NAME.txt"):
        ep.read_prompts(tmp_path)
    with pytest.raises(InputError, match="no NAME.ref.png"):
        ep.read_references(tmp_path)


def test_content_encoder_learns_to_reconstruct_and_loads_as_a_flux_vae(world_folder, tmp_path):
    from echogen_core.flux_vae import FluxVAEConfig, load_flux_vae_encoder

    refs, _ = ep.read_references(world_folder)
    cfg = FluxVAEConfig.tiny(ch_mult=(1, 1, 2, 2), num_res_blocks=1)
    path = tmp_path / "flux_vae.safetensors"
    report = ep.pretrain_content_encoder(path, refs, cfg, steps=40, batch_size=8, lr=2e-3, log_every=0)
    assert report["reconstruction_last"] < 0.7 * report["reconstruction_first"], report
    assert 0.05 < report["latent_std"] < 20
    encoder = load_flux_vae_encoder(path)
    assert encoder.cfg.ch_mult == (1, 1, 2, 2)
    tokens = encoder.content_tokens(torch.from_numpy(refs[:2]).permute(0, 3, 1, 2).float() / 255)
    assert tokens.shape == (2, (world.REFERENCE_SIZE // 8) ** 2, 16)
    assert not list(tmp_path.glob("*.partial"))


def test_semantic_encoder_learns_the_subjects_and_loads_as_dinov2(world_folder, tmp_path):
    from echogen_core.dinov2 import Dinov2Config, load_dinov2

    refs, subjects = ep.read_references(world_folder)
    path = tmp_path / "dinov2.safetensors"
    report = ep.pretrain_semantic_encoder(path, refs, subjects, Dinov2Config.tiny(), steps=60,   # 56 px: img_size
                                          batch_size=24, lr=2e-3, log_every=0)
    assert report["loss_last"] < 0.6 * report["loss_first"], report
    vocab, _ = ep.attribute_labels(subjects)
    chance = 1.0 / len(vocab["primary"])
    assert report["train_accuracy"]["primary"] > 2 * chance, report
    model = load_dinov2(path)
    features = model.encode(torch.from_numpy(refs[:2]).permute(0, 3, 1, 2).float() / 255, size=56)
    assert features.shape == (2, 17, 128)
    with pytest.raises(InputError, match="subject"):
        ep.attribute_labels([None])


def test_dinov2_preprocess_is_the_encode_input():
    from echogen_core.dinov2 import Dinov2, Dinov2Config

    torch.manual_seed(0)
    model = Dinov2(Dinov2Config.tiny()).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.encode(x, size=56), model(model.preprocess(x, 56)).float())
    x.requires_grad_(True)
    model(model.preprocess(x, 56)).sum().backward()        # differentiable, for pretraining
    assert x.grad is not None and x.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------------------
# The bundled build runs the encoders beside the tokenizer


def test_total_time_counts_stages_run_alongside_once():
    from echogen_core.bundled import total_time

    stages = {"world": {"wall_s": 100, "cpu_s": 95},
              "encoders": {"wall_s": 600, "cpu_s": 590, "alongside": ["tokenizer"]},
              "tokenizer": {"wall_s": 1900, "cpu_s": 1850, "alongside": ["encoders"]},
              "backbone": {"wall_s": 640, "cpu_s": 630}}
    assert total_time(stages) == {"wall_s": 2640, "cpu_s": 3165}


def test_run_stages_side_by_side_and_a_failure_stops_the_others(tmp_path):
    from echogen_core.bundled import run_stages

    ok = [sys.executable, "-c", "import time; time.sleep(0.5); print('done')"]
    times = run_stages({"a": ok, "b": ok}, 1, tmp_path)
    assert set(times) == {"a", "b"} and times["a"]["alongside"] == ["b"]
    assert times["a"]["wall_s"] < 5 and (tmp_path / "a.log").read_text().strip() == "done"
    slow = [sys.executable, "-c", "import time; time.sleep(60)"]
    bad = [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]
    with pytest.raises(SystemExit, match="stage bad failed .exit 3.*bad.log"):
        run_stages({"slow": slow, "bad": bad}, 1, tmp_path)
    assert "boom" in (tmp_path / "bad.log").read_text()


def test_encoders_command_carries_the_recipe(tmp_path):
    from echogen_core.bundled import RECIPE, encoders_command

    cmd = encoders_command(tmp_path / "data", tmp_path, RECIPE)
    assert cmd[1:4] == ["-m", "echogen_core", "pretrain-encoders"]
    conf = json.loads(cmd[cmd.index("--config") + 1])
    assert conf["text"] == RECIPE["text_encoder"]["pretrain"]
    assert conf["semantic"]["model"] == RECIPE["dinov2"]["model"]
    assert conf["content"]["steps"] == RECIPE["content_vae"]["pretrain"]["steps"]


def test_the_whole_bundled_build_at_a_micro_recipe(tmp_path):
    """Every stage of `python -m echogen_core.bundled build`, a few steps each: the encoders beside the
    tokenizer, then backbone and injection; the result loads through the bundled loaders and generates."""
    import copy

    from echogen_core import bundled

    recipe = copy.deepcopy(bundled.RECIPE)
    recipe["world"].update(n_train_subjects=6, n_heldout_subjects=2, scenes_per_subject=2)
    for key in ("text_encoder", "dinov2", "content_vae"):
        recipe[key]["pretrain"].update(steps=3, batch_size=4)
    for stage in ("tokenizer", "backbone", "echogen"):
        args = list(recipe[stage]["args"])
        args[args.index("--steps") + 1], args[args.index("--batch-size") + 1] = "2", "4"
        recipe[stage]["args"] = args
    out = tmp_path / "bundle"
    manifest = bundled.build(tmp_path / "work", cores=2, out=out, recipe=recipe)
    stages = manifest["timings"]["stages"]
    assert stages["encoders"]["alongside"] == ["tokenizer"] and stages["tokenizer"]["alongside"] == ["encoders"]
    assert manifest["timings"]["total"]["wall_s"] < sum(s["wall_s"] for s in stages.values())
    assert set(manifest["encoder_pretraining"]) == {"text_encoder", "dinov2", "content_vae"}
    assert "pretrain-encoders" in manifest["commands"]["encoders"]
    assert bundled.bundled_available(out)
    parts = bundled.load_bundled("cpu", folder=out)
    images = bundled.generate_world(parts, ["a small star on the left on grass"], model="backbone")
    assert images[0].size == (world.TARGET_SIZE, world.TARGET_SIZE)
