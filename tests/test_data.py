"""Training-data readers on the real Subjects200K sample pairs (shared/subjects200k_sample), rebuilt as a hub
parquet shard and an EchoGen JSONL in a temporary folder; the Dataset, collate, bucketed sampling and the
offline preparation hook."""
import io
import json
import os
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from echogen_core import data as D
from echogen_core.cli import main as cli_main
from echogen_core.errors import InputError, MissingDependencyError
from echogen_core.subject import center_crop_reference

SAMPLE = Path(os.environ.get("ECHOGEN_SUBJECTS200K_SAMPLE",
                             Path(__file__).resolve().parents[2] / "shared" / "subjects200k_sample"))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def sample_dir():
    if not (SAMPLE / "samples.json").is_file():
        pytest.skip(f"Subjects200K sample folder not found at {SAMPLE}")
    return SAMPLE


@pytest.fixture(scope="module")
def rows(sample_dir):
    """The sample rows with their two views (PIL, exactly as cut from pair_NN.jpg)."""
    out = []
    for row in json.loads((sample_dir / "samples.json").read_text()):
        pair = Image.open(sample_dir / row["image_pair"]).convert("RGB")
        out.append({**row, "left": pair.crop((0, 0, 512, 512)), "right": pair.crop((512, 0, 1024, 512))})
    return out


def arr(im):
    return np.asarray(im.convert("RGB"))


def png_bytes(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def hub_row(row, quality=(5, 5, 5), collection="collection_2"):
    qa = None if quality is None else dict(zip(D.QUALITY_KEYS, quality))
    return {"image": {"bytes": png_bytes(D.compose_pair(row["left"], row["right"])), "path": None},
            "collection": collection, "quality_assessment": qa,
            "description": {"item": row["instance"], "category": "thing", "description_0": row["description1"],
                            "description_1": row["description2"]}}


@pytest.fixture(scope="module")
def parquet_file(rows, tmp_path_factory):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table_rows = [hub_row(r) for r in rows]
    table_rows.insert(1, hub_row(rows[1], quality=(5, 4, 5)))   # one score below 5: filtered out
    table_rows.append(hub_row(rows[0], quality=None))           # no assessment: filtered out
    path = tmp_path_factory.mktemp("s200k") / "train-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(table_rows), path, row_group_size=2)
    return path


# ----------------------------------------------------------------------------------------------------------
# Sample pairs and the composite geometry


def test_sample_pairs_give_both_directions_of_each_real_pair(sample_dir, rows):
    src = D.SamplePairs(sample_dir)
    assert len(src) == 2 * len(rows) == 6
    for k, row in enumerate(rows):
        fwd, back = src[2 * k], src[2 * k + 1]
        stem = Path(row["image_pair"]).stem
        assert (fwd.id, back.id) == (f"{stem}:left", f"{stem}:right")
        assert fwd.target.size == fwd.reference.size == (512, 512)
        assert np.array_equal(arr(fwd.target), arr(row["left"])) and np.array_equal(arr(fwd.reference), arr(row["right"]))
        assert np.array_equal(arr(back.target), arr(row["right"])) and np.array_equal(arr(back.reference), arr(row["left"]))
        # the caption describes the target view
        assert fwd.caption == row["description1"] and back.caption == row["description2"]
        assert fwd.words == back.words == row["instance"] and fwd.h_div_w == 1.0
    assert [s.id for s in src] == [src[i].id for i in range(len(src))]


def test_official_crop_boxes_recover_both_views_of_a_hub_composite(rows):
    left, right = rows[1]["left"], rows[1]["right"]
    composite = D.compose_pair(left, right)
    assert composite.size == (1056, 528)  # 512-px views, 8 px around each, as on the hub
    # the official boxes (OminiControl's loader, padding 8)
    assert np.array_equal(arr(composite.crop((8, 8, 520, 520))), arr(left))
    assert np.array_equal(arr(composite.crop((528, 8, 1040, 520))), arr(right))
    a, b = D.split_composite(composite)
    assert a.size == b.size == (512, 512)
    assert np.array_equal(arr(a), arr(left)) and np.array_equal(arr(b), arr(right))
    with pytest.raises(InputError, match="cannot hold"):
        D.split_composite(Image.new("RGB", (600, 528)))


# ----------------------------------------------------------------------------------------------------------
# Subjects200K parquet


def test_parquet_reader_filters_quality_and_matches_the_real_views(parquet_file, rows):
    src = D.Subjects200KParquet(parquet_file)
    assert len(src) == 6 and src.total_rows == 5 and src.kept_rows == 3
    assert all("Hedgehog" != s.words or s.id.split(":")[1] == "2" for s in src)  # the low-score copy (row 1) is gone
    for k, row in enumerate(rows):
        for direction, (tgt, ref, cap) in enumerate(((row["left"], row["right"], row["description1"]),
                                                     (row["right"], row["left"], row["description2"]))):
            s = src[2 * k + direction]
            assert s.target.size == s.reference.size == (512, 512)
            assert np.array_equal(arr(s.target), arr(tgt)) and np.array_equal(arr(s.reference), arr(ref))
            assert s.caption == cap and s.words == row["instance"] and s.h_div_w == 1.0
    streamed = list(src)  # lazy stream, one decode per composite
    assert [s.id for s in streamed] == [src[i].id for i in range(6)]
    assert all(np.array_equal(arr(a.target), arr(src[i].target)) for i, a in enumerate(streamed))
    assert len(D.Subjects200KParquet(parquet_file, min_quality=0)) == 10
    assert len(D.Subjects200KParquet(parquet_file, both_directions=False)) == 3
    assert len(D.Subjects200KParquet(parquet_file, collections=["collection_1"])) == 0
    assert D.detect_kind(parquet_file) == "subjects200k" and len(D.open_source(parquet_file.parent)) == 6


def test_quality_filter_rule():
    assert D.passes_quality(dict(zip(D.QUALITY_KEYS, (5, 5, 5))), 5)
    assert not D.passes_quality(dict(zip(D.QUALITY_KEYS, (5, 4.9, 5))), 5)
    assert not D.passes_quality({"imageQuality": 5}, 5) and not D.passes_quality(None, 5)
    assert D.passes_quality(None, 0)


def test_parquet_without_pyarrow_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(MissingDependencyError, match="pip install pyarrow"):
        D.Subjects200KParquet(tmp_path / "x.parquet")


# ----------------------------------------------------------------------------------------------------------
# EchoGen JSONL and captions


LONG = ("A small red fox sits on a rock. Snow falls around it. The light is golden. "
        "Pine trees stand behind. A river runs far away.")


def test_official_caption_rule_short_or_prefix():
    sentences = [s for s in LONG.split(".") if s]
    short = ".".join(sentences[:2])  # first sentence has < 15 words: two sentences
    seen_short, lengths = 0, set()
    for seed in range(400):
        cap = D.official_caption(LONG, random.Random(seed))
        if cap == short:
            seen_short += 1
        else:
            k = len([s for s in cap.split(".") if s])
            assert cap == ".".join(sentences[:k]) and 3 <= k <= len(sentences)
            lengths.add(k)
    assert 0.4 < seen_short / 400 < 0.65  # 50 % short (+ the draws that pick... none: prefixes are >= 3)
    assert lengths == {3, 4, 5}
    long_first = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen. Next one."
    assert D.official_caption(long_first, random.Random(0), short_prob=1.0) == long_first.split(".")[0]
    assert D.official_caption("Just one sentence.", random.Random(0), short_prob=0.0) == "Just one sentence."
    assert D.official_caption("a cat -- b", random.Random(0), short_prob=1.0) == "a cat "


def write_jsonl_set(rows, root: Path, name="1.000_000000006.jsonl", prefix="../img/"):
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "splits").mkdir(exist_ok=True)
    lines = []
    for k, row in enumerate(rows):
        for side, other, cap in (("left", "right", row["description1"]), ("right", "left", row["description2"])):
            row[side].save(root / "img" / f"p{k}_{side}.png")
            lines.append({"output_image": f"{prefix}p{k}_{side}.png", "cond_image": f"{prefix}p{k}_{other}.png",
                          "h_div_w": 1.0, "long_caption": cap, "long_caption_type": "caption_llm"})
    (root / "splits" / name).write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root / "splits" / name


def test_jsonl_reader_resolves_paths_and_draws_seeded_captions(rows, tmp_path, monkeypatch):
    path = write_jsonl_set(rows, tmp_path)
    src = D.OfficialJSONL(path.parent, seed=3)
    assert len(src) == 6 and D.detect_kind(path) == "jsonl"
    s = src.get(2, epoch=0)
    assert np.array_equal(arr(s.target), arr(rows[1]["left"])) and np.array_equal(arr(s.reference), arr(rows[1]["right"]))
    full = rows[1]["description1"]
    # deterministic per (seed, epoch, index); a short caption or a sentence prefix of the long one
    assert src.get(2, epoch=0).caption == s.caption == D.OfficialJSONL(path, seed=3).get(2, epoch=0).caption
    captions = {src.get(2, epoch=e).caption for e in range(10)}
    assert len(captions) > 1 and all(full.startswith(c) for c in captions)
    assert D.OfficialJSONL(path, captions=D.CaptionPolicy("full")).get(2).caption == full
    # paths relative to the working directory (the official scripts' convention) also resolve
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "x.jsonl").write_text(json.dumps({"output_image": "img/p0_left.png", "cond_image": "img/p0_right.png",
                                               "h_div_w": 1.0, "long_caption": "A. B."}) + "\n")
    monkeypatch.chdir(tmp_path)
    assert D.OfficialJSONL(other / "x.jsonl")[0].target.size == (512, 512)
    (other / "bad.jsonl").write_text(json.dumps({"output_image": "a.png"}) + "\n")
    with pytest.raises(InputError, match="lacks"):
        D.OfficialJSONL(other / "bad.jsonl")


# ----------------------------------------------------------------------------------------------------------
# Triplet folders


def write_triplets(folder: Path, n=4, sizes=None, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = (sizes or [(48, 48)])[i % len(sizes or [(48, 48)])]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"s{i}.target.png")
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"s{i}.ref.jpg")
        (folder / f"s{i}.txt").write_text(f"caption {i}. A second sentence.\n")
    (folder / "s0.json").write_text(json.dumps({"words": "noise", "h_div_w": 1.0}))
    return folder


def test_triplet_folder_reader(tmp_path):
    folder = write_triplets(tmp_path / "t", n=3, sizes=[(48, 48), (40, 80)])
    src = D.TripletFolder(folder)
    assert len(src) == 3 and D.detect_kind(folder) == "triplets"
    assert src[0].words == "noise" and src[0].caption == "caption 0. A second sentence."
    assert src[1].h_div_w == 2.0 == src.h_div_w(1) and src[1].target.size == (40, 80)
    (folder / "s1.txt").unlink()
    with pytest.raises(InputError, match="s1"):
        D.TripletFolder(folder)


# ----------------------------------------------------------------------------------------------------------
# Dataset, collate, sampler


def test_pair_dataset_tensors_at_the_schedule(sample_dir):
    src = D.SamplePairs(sample_dir)
    ds = D.PairDataset(src, size="0.06M", num_scales=3, reference_size=32)
    item = ds[1]
    sched = item["schedule"]
    assert sched.grids == ((1, 1), (2, 2), (4, 4)) and (sched.height, sched.width) == (64, 64)
    assert item["target"].shape == (3, 64, 64) and -1 <= item["target"].min() and item["target"].max() <= 1
    assert torch.equal(item["reference"], center_crop_reference(src[1].reference, 32)[0])
    batch = D.collate([ds[0], ds[(1, 4)]])
    assert batch.target.shape == (2, 3, 64, 64) and batch.reference.shape == (2, 3, 32, 32)
    assert batch.captions == [src[0].caption, src[1].caption] and batch.ids == [src[0].id, src[1].id]
    no_ref = D.PairDataset(src, size="0.06M", num_scales=2)[0]
    assert no_ref["reference"] is None and no_ref["target"].shape == (3, 32, 32)


def test_cover_crop_keeps_the_centre():
    im = np.zeros((50, 100, 3), dtype=np.uint8)
    im[:, 25:75] = 255  # a white centre band, 50 wide
    out = D.cover_crop(Image.fromarray(im), 32, 32)
    assert out.shape == (3, 32, 32)
    assert out[:, :, 4:28].min() > 0.9  # the middle is the white band
    tall = D.cover_crop(Image.fromarray(im), 64, 32)
    assert tall.shape == (3, 64, 32)


def test_bucketed_batches_are_deterministic_and_split_across_ranks(tmp_path):
    folder = write_triplets(tmp_path / "t", n=7, sizes=[(48, 48), (48, 48), (32, 64)])
    ds = D.PairDataset(D.TripletFolder(folder), size="0.06M", num_scales=3)
    assert sorted({ds.bucket(i) for i in range(len(ds))}) == [1.0, 2.0]
    a, b = D.BucketBatchSampler(ds, 2, seed=5, world_size=2), D.BucketBatchSampler(ds, 2, seed=5, world_size=2)
    rank1 = D.BucketBatchSampler(ds, 2, seed=5, rank=1, world_size=2)
    seen = set()
    for step in range(8):
        glob, epoch = a.global_batch_at(step)
        assert a.batch_at(step) == b.batch_at(step) and len(glob) == 4
        assert [i for i, _ in a.batch_at(step) + rank1.batch_at(step)] == glob
        assert len({ds.bucket(i) for i in glob}) == 1  # one aspect template per batch
        if epoch == 0:
            seen |= set(glob)
        batch = D.collate([ds[k] for k in a.batch_at(step)])
        assert batch.target.shape[0] == 2
    assert seen == set(range(7))  # every sample in every epoch
    resumed = iter(D.BucketBatchSampler(ds, 2, seed=5, world_size=2, start_step=3))
    assert next(resumed) == a.batch_at(3)
    assert D.BucketBatchSampler(ds, 2, seed=6).batch_at(0) != D.BucketBatchSampler(ds, 2, seed=5).batch_at(0) or \
        D.BucketBatchSampler(ds, 2, seed=6).batch_at(1) != D.BucketBatchSampler(ds, 2, seed=5).batch_at(1)
    with pytest.raises(InputError, match="mixes"):
        D.collate([ds[0], ds[2]])


# ----------------------------------------------------------------------------------------------------------
# Offline preparation


def test_prepare_hook_segments_references_with_a_stand_in(sample_dir, tmp_path):
    calls = []

    def fake_prepare(image, words=None, method="auto", mask=None, crop="official", size=512, **kw):
        calls.append((image.size, words, method, crop, size))
        return SimpleNamespace(image=Image.new("RGB", (size, size), (255, 255, 255)), mask=None, label=words,
                               method="fake", message="stand-in")

    out = tmp_path / "prepared"
    counts = D.prepare_dataset(D.SamplePairs(sample_dir), out, prepare_fn=fake_prepare, method="box", size=64,
                               log=lambda m: None)
    assert counts == {"written": 6, "kept": 0, "segmented": 6, "samples": 6}
    assert calls[2] == ((512, 512), "Hedgehog", "box", "official", 64)
    tri = D.TripletFolder(out)
    assert len(tri) == 6 and tri[2].reference.size == (64, 64) and tri[2].words == "Hedgehog"
    assert json.loads((out / "pair_02_left.json").read_text())["method"] == "fake"
    jl = D.OfficialJSONL(out / "splits", captions=D.CaptionPolicy("full"))
    assert len(jl) == 6 and jl[2].caption == tri[2].caption and jl[2].target.size == (512, 512)
    again = D.prepare_dataset(D.SamplePairs(sample_dir), out, prepare_fn=fake_prepare, log=lambda m: None)
    assert again["kept"] == 6 and again["written"] == 0  # resumable


def test_prepare_command_without_segmentation(sample_dir, tmp_path, capsys):
    import argparse

    args = D.add_prepare_arguments(argparse.ArgumentParser()).parse_args(
        [str(sample_dir), "--out", str(tmp_path / "o"), "--no-segment", "--limit", "2"])
    assert D.run_prepare(args) == 0
    assert "wrote 2 triplets" in capsys.readouterr().out
    src = D.TripletFolder(tmp_path / "o")
    assert np.array_equal(arr(src[0].reference), arr(D.SamplePairs(sample_dir)[0].reference))


def test_default_hook_is_imported_lazily(monkeypatch):
    monkeypatch.setitem(sys.modules, "echogen_core.segmentation", None)
    with pytest.raises(MissingDependencyError, match="--no-segment"):
        D._default_prepare()


def test_prepare_command_with_the_real_segmentation_module(sample_dir, tmp_path):
    """The default hook imports echogen_core.segmentation.prepare_subject only now; method 'none' needs no
    model (the whole image, EchoGen's official whiten-and-centre-crop)."""
    pytest.importorskip("echogen_core.segmentation")
    from echogen_core.subject import center_crop_image

    assert cli_main(["prepare-data", str(sample_dir), "--out", str(tmp_path / "o"), "--method", "none", "--size", "64",
                   "--limit", "2", "--no-salient"]) == 0
    meta = json.loads((tmp_path / "o" / "pair_01_right.json").read_text())
    assert meta["method"] == "none" and meta["words"].startswith("Painting")
    ref = Image.open(tmp_path / "o" / "pair_01_right.ref.png")
    want = center_crop_image(D.SamplePairs(sample_dir)[1].reference, 64)
    assert ref.size == (64, 64) and np.abs(arr(ref).astype(int) - arr(want).astype(int)).max() <= 1
