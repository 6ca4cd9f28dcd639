"""DreamBench evaluation: the parser on the real dataset, metric averaging against a direct computation, the
stand-ins saying what they are, the DINO / CLIP paths on tiny random-weight transformers folders built offline,
and an end-to-end `eval` run (2 subjects x 2 prompts x 1 image, tiny official-layout models) with resumption."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from echogen_core import evaluate as ev
from echogen_core.errors import InputError

ROOT = Path(__file__).resolve().parent.parent
DREAMBENCH = ROOT.parent / "shared" / "dreambench"
needs_dreambench = pytest.mark.skipif(not (DREAMBENCH / "dataset" / "prompts_and_classes.txt").is_file(),
                                      reason="DreamBench is not in ../shared/dreambench")

LIVE = {"cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"}


# ---------------------------------------------------------------------------------------------------- parser
@needs_dreambench
def test_dreambench_parser_on_the_real_folder():
    bench = ev.load_dreambench(DREAMBENCH)
    assert len(bench.subjects) == 30 and [s.name for s in bench.subjects] == sorted(s.name for s in bench.subjects)
    assert len(bench.object_prompts) == 25 and len(bench.live_prompts) == 25
    assert all(len(bench.prompts(s)) == 25 for s in bench.subjects)
    assert {s.name for s in bench.subjects if s.live} == LIVE
    classes = {s.name: s.class_name for s in bench.subjects}
    assert classes["bear_plushie"] == "stuffed animal" and classes["pink_sunglasses"] == "glasses"
    assert classes["red_cartoon"] == "cartoon" and classes["duck_toy"] == "toy" and classes["backpack_dog"] == "backpack"
    assert len({s.class_name for s in bench.subjects}) == 15
    assert sum(len(s.images) for s in bench.subjects) == 158
    assert [p.name for p in bench.subject("duck_toy").images] == ["00.jpg", "01.jpg", "02.jpg", "03.jpg"]

    dog, plush = bench.subject("dog"), bench.subject("bear_plushie")
    assert bench.prompt(dog, 0) == "a dog in the jungle" and bench.prompt(plush, 0) == "a stuffed animal in the jungle"
    assert bench.prompt(dog, 11) == "a dog wearing a santa hat"            # live list
    assert bench.prompt(plush, 16) == "a stuffed animal on top of a mirror"  # object list
    assert bench.prompt(plush, 24) == "a cube shaped stuffed animal"
    assert bench.prompt(dog, 1, unique_token="sks") == "a sks dog in the snow"
    # The dataset/ folder itself is accepted too.
    assert [s.name for s in ev.load_dreambench(DREAMBENCH / "dataset").subjects] == [s.name for s in bench.subjects]

    # Selections, and seeds: unique over the whole benchmark, consecutive along one subject's prompts.
    assert [s.name for s in ev.select_subjects(bench, "2")] == ["backpack", "backpack_dog"]
    assert [s.name for s in ev.select_subjects(bench, "dog,backpack")] == ["backpack", "dog"]
    assert ev.select_prompts("3", 25) == [0, 1, 2] and ev.select_prompts("0,7-9,3", 25) == [0, 3, 7, 8, 9]
    for bad in ("26", "0-25", "x"):
        with pytest.raises(InputError):
            ev.select_prompts(bad, 25)
    with pytest.raises(InputError, match="dog4"):
        ev.select_subjects(bench, "dog4")
    seeds = [ev.image_seed(7, s.index, p, k, 30, 25) for s in bench.subjects for p in range(25) for k in range(4)]
    assert len(set(seeds)) == 3000 and min(seeds) == 7
    assert ev.image_seed(0, dog.index, 4, 1, 30, 25) + 1 == ev.image_seed(0, dog.index, 5, 1, 30, 25)


def test_parser_errors_are_actionable(tmp_path):
    with pytest.raises(InputError, match="prompt line"):
        ev.parse_prompts_and_classes("Classes\nsubject_name,class\ndog,dog\nObject Prompts\n'a {0} {1}'.format(x)\n")
    with pytest.raises(InputError, match="no live subject prompts"):
        ev.parse_prompts_and_classes("Classes\ndog,dog\nObject Prompts\n'a {0} {1}'.format(unique_token, class_token),")
    with pytest.raises(InputError, match="--dreambench"):
        ev.load_dreambench(tmp_path)


def test_batches_follow_consecutive_seeds_and_prompts_fit_the_model():
    from helpers import random_text

    assert ev._runs_of_consecutive([0, 1, 2, 5, 6, 9], 2) == [[0, 1], [2], [5, 6], [9]]
    assert ev._runs_of_consecutive([3, 4, 5], 8) == [[3, 4, 5]]
    text = random_text([20, 7], channels=8)
    cut, was_cut = ev.fit_text(text, 16)
    assert was_cut and cut.features.shape == (2, 16, 8) and cut.lengths.tolist() == [16, 7]
    assert torch.equal(cut.features, text.features[:, :16])
    assert ev.fit_text(text, 20) == (text, False)


# ---------------------------------------------------------------------------------------------------- metrics
class FakeEmbedder(ev.ImageEmbedder):
    """Maps an image to (r, g, b, 1) of its top-left pixel, so every similarity is known in closed form."""

    def __init__(self, offset=0.0):
        self.offset = offset
        self.info = ev.BackboneInfo(name="fake", comparable=True)

    def _embed(self, images):
        return torch.tensor([[*np.asarray(im)[0, 0, :3].astype(float) / 255.0, 1.0 + self.offset] for im in images])

    def embed_texts(self, texts, batch=64):
        return ev._normalize(torch.tensor([[len(t) % 5, t.count("a"), 1.0, t.count(" ")] for t in texts]))


def _solid(path, rgb):
    Image.new("RGB", (40, 30), tuple(rgb)).save(path)
    return str(path)


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_metric_averaging_matches_a_direct_computation(tmp_path):
    rng = np.random.default_rng(0)
    colours = {name: rng.integers(0, 256, (n, 3)) for name, n in (("real_a", 3), ("real_b", 2), ("gen", 5))}
    real = {"a": [_solid(tmp_path / f"ra{i}.png", c) for i, c in enumerate(colours["real_a"])],
            "b": [_solid(tmp_path / f"rb{i}.png", c) for i, c in enumerate(colours["real_b"])]}
    items = [{"subject": "a" if i < 3 else "b", "kind": "object" if i < 3 else "live", "prompt": f"a thing {'x' * i}",
              "path": _solid(tmp_path / f"g{i}.png", c), "k": i} for i, c in enumerate(colours["gen"])]
    dino, clip = FakeEmbedder(0.0), FakeEmbedder(0.5)
    suite = ev.MetricSuite(dino=dino, clip_i=clip, clip_t=clip, clip_t_info=clip.info)
    scored = ev.score_images(suite, items, real, batch=2)
    assert [it["k"] for it in scored] == [0, 1, 2, 3, 4]

    vec = lambda c, off: [*(np.asarray(c) / 255.0), 1.0 + off]  # noqa: E731
    expect = []
    for i, it in enumerate(items):
        reals = colours["real_a"] if it["subject"] == "a" else colours["real_b"]
        g = colours["gen"][i]
        text = FakeEmbedder().embed_texts([it["prompt"]])[0].tolist()
        expect.append({"dino": sum(_cos(vec(g, 0), vec(r, 0)) for r in reals) / len(reals),
                       "clip_i": sum(_cos(vec(g, .5), vec(r, .5)) for r in reals) / len(reals),
                       "clip_t": _cos(vec(g, .5), text)})
    for got, want in zip(scored, expect):
        for m in ("dino", "clip_i", "clip_t"):
            assert got[m] == pytest.approx(want[m], abs=1e-6)
    overall = ev.summarize(scored)
    per_subject = ev.aggregate(scored, "subject")
    for m in ("dino", "clip_i", "clip_t"):
        assert overall[m] == pytest.approx(sum(e[m] for e in expect) / 5, abs=1e-6)
        assert per_subject["a"][m] == pytest.approx(sum(e[m] for e in expect[:3]) / 3, abs=1e-6)
        assert per_subject["b"][m] == pytest.approx(sum(e[m] for e in expect[3:]) / 2, abs=1e-6)
    assert per_subject["a"]["images"] == 3 and ev.aggregate(scored, "kind")["live"]["images"] == 2


def test_stand_ins_say_what_they_are(tmp_path):
    from echogen_core.dinov2 import Dinov2, Dinov2Config
    from helpers import randomize_

    suite = ev.build_metric_suite()
    assert suite.dino.info.name == "colour-texture histogram" and suite.dino.info.standin
    assert suite.clip_t is None and suite.clip_t_info.name == "unavailable" and "--clip" in suite.clip_t_info.note
    assert not suite.comparable

    dinov2 = randomize_(Dinov2(Dinov2Config.tiny()), seed=1).eval()
    suite = ev.build_metric_suite(dinov2=dinov2, dinov2_source="dinov2.pth")
    assert "DINOv2 CLS" in suite.dino.info.name and suite.dino.info.standin and not suite.dino.info.comparable
    assert "--dino" in suite.dino.info.note
    assert isinstance(suite.clip_i, ev.HistogramEmbedder) and not suite.clip_i.info.comparable

    # The histogram descriptor: deterministic, 1 for the same image, lower for a different colour.
    a, b = _solid(tmp_path / "a.png", (200, 30, 30)), _solid(tmp_path / "b.png", (30, 30, 200))
    e = suite.clip_i.embed([a, a, b])
    assert torch.allclose(e[0], e[1]) and float(e[0] @ e[1]) == pytest.approx(1.0, abs=1e-6)
    assert float(e[0] @ e[2]) < 0.9
    d = suite.dino.embed([a, b])
    assert d.shape == (2, 128) and torch.allclose(d.norm(dim=1), torch.ones(2))

    # The table flags every stand-in figure and prints CLIP-T as unavailable.
    results = _fake_results(suite)
    table = ev.format_table(results)
    assert "| Method" in table and "EchoGen-2B (paper" in table and "0.755" in table
    assert "0.500 *" in table and "n/a" in table and "NOT comparable" in table and "[stand-in]" in table


def _fake_results(suite):
    return {"label": "tiny", "backbones": suite.backbones(), "comparable_with_paper": suite.comparable,
            "metrics": {"dino": 0.5, "clip_i": 0.25, "clip_t": None}, "settings": {}, "resolution": "256x256",
            "selection": {"subjects": ["dog"], "prompt_indices": [0], "n": 1}, "images_scored": 1, "missing": 0,
            "latency": {}, "machine": {"device_name": "cpu"}}


# ---------------------------------------------------------------------------------------------------- transformers
def _bytes_to_unicode():
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = keep[:], 0
    for b in range(256):
        if b not in keep:
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def build_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A random-weight CLIPModel with a byte-level BPE tokenizer written offline (every byte, with and without
    the end-of-word mark, a few merges, the two CLIP special tokens)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    merges = ["i n", "t h", "th e</w>", "d o", "do g</w>"]
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    tok.save_pretrained(str(folder))
    eos = vocab["<|endoftext|>"]
    cfg = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=40, bos_token_id=eos - 1,
                                      eos_token_id=eos, pad_token_id=eos),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                        image_size=32, patch_size=16), projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(cfg).eval().save_pretrained(str(folder))
    return folder


def build_tiny_dino(folder: Path, seed: int = 0) -> Path:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
                    patch_size=16)
    ViTModel(cfg, add_pooling_layer=False).eval().save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def tiny_metric_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("metric_backbones")
    return build_tiny_dino(root / "dino"), build_tiny_clip(root / "clip")


def test_dino_and_clip_from_tiny_transformers_folders(tmp_path, tiny_metric_folders):
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    dino_dir, clip_dir = tiny_metric_folders
    rng = np.random.default_rng(1)
    paths = []
    for i, (w, h) in enumerate(((50, 40), (36, 64))):
        paths.append(tmp_path / f"im{i}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    images = [Image.open(p).convert("RGB") for p in paths]

    suite = ev.build_metric_suite(dino=dino_dir, clip=clip_dir)
    assert suite.dino.info.name.startswith("DINO ViT (width 32") and not suite.dino.info.comparable
    assert suite.clip_t is suite.clip_i and suite.clip_t_info.name.startswith("CLIP (vision width 32")
    assert "not comparable" in suite.clip_i.info.note and not suite.comparable

    # DINO: the CLS token of transformers' own ViTModel on the documented crop (shorter side 256/224 x, centre).
    vit = ViTModel.from_pretrained(str(dino_dir), add_pooling_layer=False).eval()
    crops = [ev.resize_center_crop(im, 37, 32) for im in images]
    x = ev._to_tensor(crops, ev.IMAGENET_MEAN, ev.IMAGENET_STD)
    with torch.no_grad():
        cls = torch.nn.functional.normalize(vit(pixel_values=x).last_hidden_state[:, 0], dim=-1)
    assert torch.allclose(suite.dino.embed(paths), cls, atol=1e-5)

    # CLIP-T: CLIPModel's forward gives logit_scale * cosine(text, image); ours must be that cosine.
    clip = CLIPModel.from_pretrained(str(clip_dir)).eval()
    prompts = ["a dog in the snow", "a red backpack on the beach"]
    tok = suite.clip_t.tokenizer(prompts, padding=True, return_tensors="pt")
    px = ev._to_tensor([ev.resize_center_crop(im, 32, 32) for im in images], ev.CLIP_MEAN, ev.CLIP_STD)
    with torch.no_grad():
        out = clip(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=px)
    cosines = out.logits_per_image / clip.logit_scale.exp()
    ours = suite.clip_i.embed(paths) @ suite.clip_t.embed_texts(prompts).T
    assert torch.allclose(ours, cosines, atol=1e-5)

    # The paper's geometry is recognised from the configs alone.
    assert ev.dino_is_reference(ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                          intermediate_size=1536, patch_size=16, image_size=224))
    assert not ev.dino_is_reference(ViTConfig())  # ViT-B/16
    b32 = CLIPConfig(text_config=dict(hidden_size=512, num_hidden_layers=12),
                     vision_config=dict(hidden_size=768, num_hidden_layers=12, patch_size=32, image_size=224),
                     projection_dim=512)
    assert ev.clip_is_reference(b32) and not ev.clip_is_reference(CLIPModel(clip.config).config)

    # Wrong folders fail with what to do.
    with pytest.raises(InputError, match="huggingface-cli download facebook/dino-vits16"):
        ev.build_metric_suite(dino=tmp_path / "absent")
    with pytest.raises(InputError, match="model_type is 'clip', expected 'vit'"):
        ev.build_metric_suite(dino=clip_dir)


# ---------------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_echogen_files(tmp_path_factory):
    from safetensors.torch import save_file

    from echogen_core.dinov2 import Dinov2, Dinov2Config
    from echogen_core.echogen import EchoGen, EchoGenConfig
    from echogen_core.flux_vae import FluxVAEConfig, FluxVAEEncoder
    from helpers import micro_vae, randomize_

    d = tmp_path_factory.mktemp("tiny_echogen")
    cfg = EchoGenConfig.tiny(text_channels=64, semantic_dim=128, semantic_len=17, content_dim=16, content_len=16)
    torch.save({"trainer": {"gpt_fsdp": randomize_(EchoGen(cfg), seed=3).state_dict()}}, d / "echogen_tiny.pth")
    torch.save({"vae": micro_vae().state_dict()}, d / "vae.pth")
    torch.save(randomize_(Dinov2(Dinov2Config.tiny()), seed=1).state_dict(), d / "dinov2.pth")
    flux = randomize_(FluxVAEEncoder(FluxVAEConfig.tiny()), seed=2)
    save_file({k: v.contiguous() for k, v in flux.state_dict().items()}, d / "ae.safetensors")
    return d


def _eval(capsys, *args):
    from echogen_core.cli import main

    rc = main(["eval", *map(str, args)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@needs_dreambench
def test_eval_end_to_end_resumes_and_prints_the_table(tmp_path, tiny_t5_dir, tiny_echogen_files, tiny_metric_folders,
                                                     capsys):
    d = tiny_echogen_files
    out = tmp_path / "run"
    args = ["--dreambench", DREAMBENCH, "--out", out, "--subjects", "dog,backpack", "--prompts", "2", "--n", 1,
            "--size", "0.06M", "--seed", 3, "--batch", 2, "--model", d / "echogen_tiny.pth", "--vae", d / "vae.pth",
            "--text-encoder", tiny_t5_dir, "--dinov2", d / "dinov2.pth", "--content-vae", d / "ae.safetensors"]
    rc, stdout, stderr = _eval(capsys, *args)
    assert rc == 0, stderr
    files = sorted(str(p.relative_to(out)) for p in (out / "images").rglob("*.png"))
    assert files == ["images/backpack/00_0.png", "images/backpack/01_0.png", "images/dog/00_0.png", "images/dog/01_0.png"]
    assert all(np.asarray(Image.open(out / f)).shape == (256, 256, 3) for f in files)
    assert np.asarray(Image.open(out / "references" / "dog.png")).shape == (32, 32, 3)  # the tiny model's crop
    assert not list(out.rglob("*.partial"))

    index = json.loads((out / "index.json").read_text())
    assert index["settings"]["size"] == "0.06M" and index["settings"]["seed"] == 3
    dog = index["images"]["images/dog/01_0.png"]
    assert dog["prompt"] == "a dog in the snow" and dog["seed"] == 3 + 10 * 25 + 1 and dog["batch"] == 2
    assert index["subjects"]["dog"]["reference"] == "dog/00.jpg"
    assert index["subjects"]["dog"]["segmentation"] in ("salient", "none")
    assert len(index["subjects"]["backpack"]["real_images"]) == 6

    results = json.loads((out / "results.json").read_text())
    assert results["images_scored"] == 4 and set(results["per_subject"]) == {"dog", "backpack"}
    assert results["per_subject"]["dog"]["kind"] == "live" and results["by_kind"]["object"]["images"] == 2
    assert results["backbones"]["dino"]["standin"] and "DINOv2 CLS" in results["backbones"]["dino"]["name"]
    assert results["backbones"]["clip_t"]["name"] == "unavailable" and results["metrics"]["clip_t"] is None
    assert results["metrics"]["dino"] == pytest.approx(
        sum(r["dino"] for r in results["per_image"]) / 4) and -1 <= results["metrics"]["dino"] <= 1
    assert results["latency"]["images_timed"] == 4 and results["latency"]["generation_s_per_image"] > 0
    assert results["latency"]["end_to_end_s_per_image"] >= results["latency"]["generation_s_per_image"]
    assert "| Method" in stdout and "| DINO" in stdout and "(this run)" in stdout and "NOT comparable" in stdout
    assert "latency per image: generation" in stdout and "measured on cpu" in stdout

    # Resuming generates nothing and leaves the images alone.
    mtimes = {f: (out / f).stat().st_mtime_ns for f in files}
    rc, stdout, stderr = _eval(capsys, *args)
    assert rc == 0 and "generated 0 images, skipped 4" in stderr
    assert {f: (out / f).stat().st_mtime_ns for f in files} == mtimes

    # A lost image is regenerated alone (batch 1 now, batch 2 before) and comes back identical; scored with the
    # tiny CLIP and DINO folders this time, so every metric has a figure.
    before = np.asarray(Image.open(out / "images/dog/01_0.png"))
    (out / "images/dog/01_0.png").unlink()
    dino_dir, clip_dir = tiny_metric_folders
    rc, stdout, stderr = _eval(capsys, *args, "--dino", dino_dir, "--clip", clip_dir)
    assert rc == 0 and "generated 1 images, skipped 3" in stderr, stderr
    assert np.array_equal(np.asarray(Image.open(out / "images/dog/01_0.png")), before)
    results = json.loads((out / "results.json").read_text())
    assert all(results["metrics"][m] is not None for m in ("dino", "clip_i", "clip_t"))
    assert results["backbones"]["clip_t"]["name"].startswith("CLIP") and "n/a" not in stdout.split("(this run)")[1]

    # Other settings in the same folder are refused with what to do; --score-only needs no model.
    rc, _, stderr = _eval(capsys, *[a if a != 3 else 4 for a in args])
    assert rc == 2 and "seed: 3 -> 4" in stderr and "--overwrite" in stderr
    rc, stdout, stderr = _eval(capsys, "--dreambench", DREAMBENCH, "--out", out, "--subjects", "dog", "--prompts", 2,
                               "--n", 1, "--score-only")
    assert rc == 0, stderr
    assert json.loads((out / "results.json").read_text())["images_scored"] == 2 and "histogram" in stdout


@needs_dreambench
def test_eval_runs_the_bundled_layout(tmp_path, tiny_t5_dir, capsys, monkeypatch):
    """--bundled takes every file from the bundle folder (here a tiny random stand-in in the bundled layout),
    the bundled 64 px 3-scale schedule and the bundled sampling defaults."""
    from echogen_core import bundled
    from helpers import stand_in_bundle

    bundle = tmp_path / "bundle"
    stand_in_bundle(bundle, tiny_t5_dir)
    monkeypatch.setattr(bundled, "BUNDLE_DIR", bundle)

    out = tmp_path / "run"
    rc, stdout, stderr = _eval(capsys, "--bundled", "--dreambench", DREAMBENCH, "--out", out, "--subjects", "cat",
                               "--prompts", 1, "--n", 1, "--segment", "none")
    assert rc == 0, stderr
    assert np.asarray(Image.open(out / "images/cat/00_0.png")).shape == (64, 64, 3)
    settings = json.loads((out / "index.json").read_text())["settings"]
    assert settings["size"] == "world" and settings["cfg"] == bundled.SAMPLING["cfg"]
    assert settings["tau"] == bundled.SAMPLING["tau"] and settings["files"]["adapter"]["name"] == "adapter.safetensors"
    assert "bundled EchoGen (CPU) (this run)" in stdout and "at 64x64" in stdout
