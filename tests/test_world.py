"""The synthetic world, its triplet writer, the bundled model's files and the demo command."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from echogen_core import world
from echogen_core.bundled import bundled_available, bundled_paths

ROOT = Path(__file__).resolve().parent.parent


def test_world_is_deterministic():
    a_train, a_held = world.split_subjects(0, 600, 40)
    b_train, b_held = world.split_subjects(0, 600, 40)
    assert a_train == b_train and a_held == b_held
    assert not set(a_train) & set(a_held)
    assert world.split_subjects(1, 600, 40)[1] != a_held
    # held-out subjects are new combinations of parts that all occur in training
    for s in a_held[:10]:
        assert any(t.shape == s.shape for t in a_train) and any(t.primary == s.primary for t in a_train)
    ex = world.examples(a_held[:2], 3, seed=0, salt="heldout")
    assert ex == world.examples(a_held[:2], 3, seed=0, salt="heldout")
    for e in ex:
        t1, t2 = world.render_target(e.subject, e.scene), world.render_target(e.subject, e.scene)
        assert t1.image.shape == (64, 64, 3) and t1.image.dtype == np.uint8
        assert np.array_equal(t1.image, t2.image) and np.array_equal(t1.subject_mask, t2.subject_mask)
        r1, r2 = world.render_reference(e.subject, 5), world.render_reference(e.subject, 5)
        assert np.array_equal(r1.image, r2.image)
        assert not np.array_equal(r1.image, world.render_reference(e.subject, 6).image)
        assert r1.subject_mask.max() > 0.99
        # the prompt names the shape, never the subject's pattern
        assert e.subject.shape in e.prompt and e.subject.pattern not in e.prompt


def test_target_depends_on_every_prompt_part():
    s = world.Subject("star", "red", "blue", "stripes")
    base = world.Scene("grass", "left", "small", None)
    img = world.render_target(s, base).image
    for other in (world.Scene("snow", "left", "small", None), world.Scene("grass", "right", "small", None),
                  world.Scene("grass", "left", "large", None), world.Scene("grass", "left", "small", ("blue", "cube"))):
        assert not np.array_equal(img, world.render_target(s, other).image)
    assert not np.array_equal(img, world.render_target(world.Subject("star", "green", "blue", "stripes"), base).image)
    assert world.prompt_of(s, base) == "a small star on the left on grass"


def test_triplets_read_back(tmp_path):
    from echogen_core.data import PairDataset, TripletFolder, collate

    train, _ = world.split_subjects(0, 600, 40)
    items = world.examples(train[:2], 2, seed=0)
    info = world.write_triplets(tmp_path, items, seed=0)
    assert info["written"] == 4
    src = TripletFolder(tmp_path)
    assert len(src) == 4
    by_id = {src[i].id: src[i] for i in range(len(src))}
    for e in items:
        s = by_id[e.name]
        assert s.caption == e.prompt and s.words == e.subject.shape and s.h_div_w == 1.0
        assert s.target.size == (64, 64) and s.reference.size == (64, 64)
        assert np.array_equal(np.asarray(s.target), world.render_target(e.subject, e.scene).image)
        meta = json.loads((tmp_path / f"{e.name}.json").read_text())
        assert meta["subject"]["pattern"] == e.subject.pattern
    ds = PairDataset(src, size="0.06M", num_scales=world.NUM_SCALES, reference_size=world.REFERENCE_SIZE, ratio=1.0)
    batch = collate([ds[i] for i in range(2)])
    assert batch.target.shape == (2, 3, 64, 64) and batch.reference.shape == (2, 3, 64, 64)


def test_identity_metrics_on_exact_and_wrong_targets():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import identity
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    _, held = world.split_subjects(0, 600, 40)
    e = world.examples(held[:1], 1, seed=0, salt="heldout")[0]
    exact = identity.score(world.render_target(e.subject, e.scene).image, e.subject, e.scene)
    assert exact["identity_colour"] == 1.0 and exact["background"] == 1.0 and exact["position"] == 1.0
    other = world.Subject(e.subject.shape, "black" if e.subject.primary != "black" else "white",
                          "cyan" if e.subject.secondary != "cyan" else "pink", e.subject.pattern)
    wrong = identity.score(world.render_target(other, e.scene).image, e.subject, e.scene)
    assert wrong["identity_colour"] < 0.5
    bare = identity.score(world.render_target(e.subject, e.scene).background, e.subject, e.scene)
    assert bare["identity_colour"] < 0.5 and bare["shape_iou"] < 0.1


needs_bundle = pytest.mark.skipif(not bundled_available(), reason="the bundled model has not been built")


@needs_bundle
def test_bundled_files_load_strictly():
    import torch

    from echogen_core.bundled import MANIFEST, BUNDLE_DIR, load_bundled
    from echogen_core.echogen import EchoGen
    from echogen_core.sampler import patchify_factor
    from echogen_core.subject import reference_geometry

    parts = load_bundled("cpu")
    model = parts["model"]
    assert isinstance(model, EchoGen)
    assert reference_geometry(model.cfg) == (world.REFERENCE_SIZE, 56)
    assert patchify_factor(model, parts["vae"]) is True
    assert parts["text_encoder"].channels == model.cfg.text_channels
    assert parts["dinov2"].cfg.embed_dim == model.cfg.semantic_dim
    total = sum(p.stat().st_size for p in BUNDLE_DIR.rglob("*") if p.is_file())
    assert total < 20e6
    manifest = json.loads((BUNDLE_DIR / MANIFEST).read_text())
    for name, meta in manifest["files"].items():
        assert (BUNDLE_DIR / name).stat().st_size == meta["bytes"], name
    assert set(bundled_paths()) == {"vae", "backbone", "adapter", "text_encoder", "dinov2", "content_vae"}
    with torch.no_grad():
        text = parts["text_encoder"].encode(["a small star on the left on grass"])
        assert text.features.shape[-1] == model.cfg.text_channels


@needs_bundle
def test_demo_end_to_end(tmp_path, capsys):
    from PIL import Image

    from echogen_core.cli import main

    assert main(["demo", "--out", str(tmp_path), "--segment", "mask"]) == 0
    out = capsys.readouterr().out
    assert "known mask" in out and "contact sheet" in out
    info = json.loads((tmp_path / "demo.json").read_text())
    assert len(info["images"]) == 6
    for p in info["images"]:
        assert Image.open(p).size == (64, 64)
    assert Image.open(tmp_path / "contact_sheet.png").size[0] > 4 * 64
    assert (tmp_path / "reference_prepared.png").is_file() and (tmp_path / "reference_photo.png").is_file()


@needs_bundle
def test_bundled_model_keeps_the_subject_it_is_shown():
    """The committed weights through the whole path (reference photo -> encoders -> injection -> sampler -> VAE)
    on held-out subjects: the subject's colours come back far more often with the reference than without it.
    Breaks if the injection, the guidance rows or the loaders stop carrying the subject."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import identity

    result = identity.run(n_subjects=10, n_scenes=2, seed=0, threads=1, log=lambda m: None)["summary"]
    with_subject, without = result["echogen"]["identity"], result["no_subject"]["identity"]
    assert with_subject > 1.5 * without and with_subject > result["backbone"]["identity"] + 0.04, result
    assert result["echogen"]["background"] > 0.9  # the prompt still sets the scene
