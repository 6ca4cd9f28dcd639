"""The bundled default model: tiny versions of every component, trained on the synthetic world (world.py)
with the pack's own training pipeline, small enough to ship in the repository and run on any CPU.

Files (``echogen_core/bundled_model/``, all safetensors in the official layouts, read by the normal loaders):

  vae.safetensors            BSQ VAE (stride 8, 8 bits, 2x2 patchify like Infinity-8B's tokenizer;   load_vae
                             GroupNorm with 4 groups, recorded in the file's metadata)
  infinity.safetensors       Infinity transformer (text-to-image)                                    load_infinity
  adapter.safetensors        EchoGen injection ('control' weights) over infinity.safetensors         load_echogen(adapter=)
  text_encoder/              flan-t5-style encoder + T5 tokenizer (Hugging Face folder)              T5TextEncoder.from_folder
  dinov2.safetensors         DINOv2-style ViT/14 (torch-hub names)                                   load_dinov2
  flux_vae.safetensors       FLUX.1-style VAE encoder (BFL ae.safetensors names, encoder only)       load_flux_vae_encoder
  MANIFEST.json              the recipe, seeds, timings and sha256 of every file

Every component is trained from scratch on the world's training folder, in the real recipe's order:

  * stage encoders (``python -m echogen_core pretrain-encoders``): the three frozen encoders EchoGen
    borrows -- the T5 text encoder by span corruption on the prompts (its tokenizer is a unigram vocabulary
    built on the world's prompts plus an English corpus), the FLUX-layout encoder as a variational
    autoencoder on the reference crops, and the DINOv2-layout ViT by naming each reference's shape, colours
    and pattern (supervised, unlike DINOv2; see encoder_pretraining.py);
  * stage tokenizer (``python -m echogen_core train --stage tokenizer``): the BSQ VAE, side by side with the
    encoders (both need only the world; one core each);
  * stage backbone: the Infinity transformer, text-to-image on the world's target scenes;
  * stage echogen: EchoGen's injection ('control' weights) over the frozen backbone.

The bundled model only knows this world.

Reproduce (two CPU cores, under an hour; MANIFEST.json has the measured time of every stage)::

    python -m echogen_core.bundled build --work /tmp/echogen_bundle --cores 2

``--cores N`` is what the build may use: the world is written by N processes, the encoders and the
tokenizer train side by side with N/2 threads each, and the backbone and the injection get all N threads
(1.1-1.6x faster with a second thread in our builds). Never more threads than cores: with the other core busy a
second thread made the tokenizer ~7x slower (threads waiting at barriers).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

BUNDLE_DIR = Path(__file__).resolve().parent / "bundled_model"
FILES = {
    "vae": "vae.safetensors",
    "backbone": "infinity.safetensors",
    "adapter": "adapter.safetensors",
    "text_encoder": "text_encoder",
    "dinov2": "dinov2.safetensors",
    "content_vae": "flux_vae.safetensors",
}
MANIFEST = "MANIFEST.json"

SEED = 0
# The recipe. Everything the command does is a function of these values.
RECIPE = {
    "world": {"seed": SEED, "n_train_subjects": 600, "n_heldout_subjects": 40, "scenes_per_subject": 6},
    # The three encoders, pretrained from scratch on the world's training folder (encoder_pretraining.py).
    "text_encoder": {"d_model": 64, "vocab_size": 512, "seed": SEED,
                     "pretrain": {"steps": 1500, "batch_size": 64, "lr": 0.003}},
    "dinov2": {"model": {"embed_dim": 128, "depth": 2, "num_heads": 2, "img_size": 56}, "seed": SEED,
               "pretrain": {"steps": 800, "batch_size": 64, "lr": 0.001}},
    "content_vae": {"model": {"ch": 32, "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1}, "seed": SEED,
                    "pretrain": {"steps": 800, "batch_size": 16, "lr": 0.002, "kl_weight": 0.0001}},
    "tokenizer": {"config": {"codebook_dim": 8, "patch_size": 8, "base_ch": 16, "ch_mult": [1, 1, 2, 2],
                             "num_res_blocks": 1, "norm_groups": 4},
                  "args": ["--steps", "4000", "--batch-size", "16", "--lr", "0.032"]},
    "backbone": {"config": {"depth": 4, "width": 128, "num_heads": 2, "mlp_hidden": 512, "bits": 32,
                            "text_maxlen": 32, "pool_heads": 1, "block_chunks": 4},
                 "args": ["--steps", "2500", "--batch-size", "32", "--lr", "0.01"]},
    "echogen": {"reference_size": 64,
                "args": ["--steps", "1600", "--batch-size", "32", "--lr", "0.01", "--sa-lr-mult", "1.0"]},
    "common": ["--size", "0.06M", "--num-scales", "3", "--ratio", "1.0", "--workers", "0", "--cache-features",
               "--log-every", "50", "--save-every", "500", "--seed", str(SEED), "--device", "cpu"],
}


# Sampling settings of the bundled model (demo and benchmark).
SAMPLING = {"cfg": 3.0, "subject_cfg": 3.0, "tau": 1.0, "top_k": 0, "top_p": 0.97}


# --------------------------------------------------------------------------------------------------------------
# Where the bundled files are


def bundled_paths(folder=None) -> dict:
    """{component: path} of the bundled model (whether or not the files exist yet): vae, backbone, adapter,
    text_encoder (a folder), dinov2, content_vae."""
    base = Path(folder) if folder is not None else BUNDLE_DIR
    return {k: str(base / v) for k, v in FILES.items()}


def bundled_available(folder=None) -> bool:
    """True when every bundled file is present (the text encoder folder with its weights and tokenizer)."""
    paths = bundled_paths(folder)
    for key, p in paths.items():
        p = Path(p)
        if key == "text_encoder":
            if not ((p / "config.json").is_file() and any((p / n).is_file() for n in ("model.safetensors", "pytorch_model.bin"))):
                return False
        elif not p.is_file():
            return False
    return True


def load_bundled(device="cpu", folder=None) -> dict:
    """Every bundled component through the normal loaders: model (EchoGen = backbone + adapter), backbone
    (plain Infinity), vae, text_encoder, dinov2, content_encoder."""
    from .checkpoint import load_echogen, load_infinity, load_vae
    from .dinov2 import load_dinov2
    from .errors import CheckpointError
    from .flux_vae import load_flux_vae_encoder
    from .text_encoder import T5TextEncoder

    if not bundled_available(folder):
        raise CheckpointError(f"The bundled model is not in {folder or BUNDLE_DIR}; build it with "
                              "`python -m echogen_core.bundled build`.")
    p = bundled_paths(folder)
    return {
        "model": load_echogen(p["backbone"], adapter=p["adapter"], device=device, dtype=None),
        "backbone": load_infinity(p["backbone"], device=device),
        "vae": load_vae(p["vae"], device=device),
        "text_encoder": T5TextEncoder.from_folder(p["text_encoder"], device=device, dtype="float32"),
        "dinov2": load_dinov2(p["dinov2"], device=device),
        "content_encoder": load_flux_vae_encoder(p["content_vae"], device=device),
    }


def world_schedule():
    """The bundled model's schedule: 64 x 64, the first 3 scales of the 1:1 template."""
    from .data import training_schedule
    from .world import NUM_SCALES

    return training_schedule(1.0, "0.06M", NUM_SCALES)


def generate_world(parts: dict, prompts, subject=None, seed: int = 0, sampling: Optional[dict] = None,
                   model: str = "model") -> list:
    """PIL images for `prompts` with the bundled model: EchoGen with `subject` (SubjectFeatures, one for all
    prompts or one each), EchoGen without a subject (subject None), or the plain backbone (model="backbone").
    Image i uses seed + i."""
    from PIL import Image

    from .sampler import SamplerSettings, generate, to_uint8

    settings = SamplerSettings(**{**SAMPLING, **(sampling or {})})
    text = parts["text_encoder"].encode(list(prompts))
    result = generate(parts[model], parts["vae"], text, world_schedule(), settings, seed=seed, subject=subject)
    return [Image.fromarray(a) for a in to_uint8(result.images).cpu().numpy()]


# --------------------------------------------------------------------------------------------------------------
# The encoders


def build_text_encoder(folder, recipe: dict = RECIPE) -> Path:
    """The text encoder's folder before pretraining: the T5 tokenizer (a unigram vocabulary built on the
    world's prompts plus an English corpus) and the model's config (its initial weights are replaced by
    encoder_pretraining)."""
    from . import world
    from .text_encoder import build_tiny_t5

    r = recipe["text_encoder"]
    return build_tiny_t5(folder, d_model=r["d_model"], vocab_corpus=world.vocabulary_corpus(), seed=r["seed"],
                         vocab_size=r["vocab_size"])


def encoders_command(data, work: Path, recipe: dict = RECIPE) -> list:
    """The exact `python -m echogen_core pretrain-encoders` command line that trains the three encoders."""
    enc = work / "encoders"
    conf = {"text": recipe["text_encoder"]["pretrain"],
            "semantic": {**recipe["dinov2"]["pretrain"], "model": recipe["dinov2"]["model"]},
            "content": {**recipe["content_vae"]["pretrain"], "model": recipe["content_vae"]["model"]}}
    return [sys.executable, "-m", "echogen_core", "pretrain-encoders", "--data", str(data),
            "--text-encoder", str(enc / FILES["text_encoder"]), "--dinov2", str(enc / FILES["dinov2"]),
            "--content-vae", str(enc / FILES["content_vae"]), "--config", json.dumps(conf),
            "--seed", str(recipe["world"]["seed"]), "--report", str(enc / "report.json")]


# --------------------------------------------------------------------------------------------------------------
# The recipe


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_hashes(folder) -> dict:
    folder = Path(folder)
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out[str(p.relative_to(folder))] = {"sha256": _sha256(p), "bytes": p.stat().st_size}
    return out


class StageTimer:
    """Wall and CPU seconds (this process + finished children) of each stage."""

    def __init__(self):
        self.stages: dict = {}

    @staticmethod
    def _cpu() -> float:
        s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

    def run(self, name: str, fn, *args, **kwargs):
        t0, c0 = time.time(), self._cpu()
        print(f"== {name}", flush=True)
        result = fn(*args, **kwargs)
        self.stages[name] = {"wall_s": round(time.time() - t0, 1), "cpu_s": round(self._cpu() - c0, 1)}
        print(f"== {name}: {self.stages[name]['wall_s']} s wall, {self.stages[name]['cpu_s']} s CPU", flush=True)
        return result

    def total(self) -> dict:
        return {"wall_s": round(sum(v["wall_s"] for v in self.stages.values()), 1),
                "cpu_s": round(sum(v["cpu_s"] for v in self.stages.values()), 1)}


def total_time(stages: dict) -> dict:
    """{wall_s, cpu_s} of a build from its stages' times: stages that ran alongside each other count once,
    for the longest of them."""
    wall, seen = 0.0, set()
    for name, t in stages.items():
        group = frozenset([name, *t.get("alongside", [])])
        if group in seen:
            continue
        seen.add(group)
        wall += max(stages[g]["wall_s"] for g in group if g in stages)
    return {"wall_s": round(wall, 1), "cpu_s": round(sum(t["cpu_s"] for t in stages.values()), 1)}


def train_command(stage: str, data, out, work: Path, recipe: dict = RECIPE) -> list:
    """The exact `python -m echogen_core train` command line of a stage."""
    enc = work / "encoders"
    cmd = [sys.executable, "-m", "echogen_core", "train", "--stage", stage, "--data", str(data), "--out", str(out)]
    if stage == "tokenizer":
        cmd += ["--config", json.dumps(recipe["tokenizer"]["config"]),
                "--export", str(Path(out) / FILES["vae"])]
    elif stage == "backbone":
        cmd += ["--config", json.dumps(recipe["backbone"]["config"]), "--vae", str(work / "tokenizer" / FILES["vae"]),
                "--text-encoder", str(enc / FILES["text_encoder"]), "--export", str(Path(out) / FILES["backbone"])]
    else:
        cmd += ["--backbone", str(work / "backbone" / FILES["backbone"]), "--vae", str(work / "tokenizer" / FILES["vae"]),
                "--text-encoder", str(enc / FILES["text_encoder"]), "--dinov2", str(enc / FILES["dinov2"]),
                "--content-vae", str(enc / FILES["content_vae"]),
                "--reference-size", str(recipe["echogen"]["reference_size"]),
                "--export", str(Path(out) / FILES["adapter"])]
    return cmd + list(recipe[stage]["args"]) + list(recipe["common"])


def _stage_env(threads: int) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                PYTHONPATH=str(Path(__file__).resolve().parent.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def run_stages(commands: dict, threads: int, work: Path) -> dict:
    """Run {stage: command} side by side (one process each, `threads` threads each, output in WORK/STAGE.log);
    return {stage: {wall_s, cpu_s}} measured per process. Stops the others and exits if one fails."""
    running = {}
    t0 = time.time()
    for stage, cmd in commands.items():
        print("$ " + " ".join(cmd[1:]), flush=True)
        log = open(work / f"{stage}.log", "a", encoding="utf-8")
        proc = subprocess.Popen(cmd, env=_stage_env(threads), stdout=log, stderr=subprocess.STDOUT)
        running[proc.pid] = (stage, proc, log)
    times, failed = {}, None
    try:
        while running:
            pid, status, usage = os.wait4(-1, 0)
            if pid not in running:
                continue
            stage, proc, log = running.pop(pid)
            proc.returncode = os.waitstatus_to_exitcode(status)
            log.close()
            times[stage] = {"wall_s": round(time.time() - t0, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1)}
            if len(commands) > 1:
                times[stage]["alongside"] = sorted(set(commands) - {stage})
            print(f"== {stage}: {times[stage]['wall_s']} s wall, {times[stage]['cpu_s']} s CPU", flush=True)
            if proc.returncode != 0:
                failed = (stage, proc.returncode)
                break
    finally:
        for stage, proc, log in running.values():      # a failure or an interrupt stops the rest
            proc.terminate()
            proc.wait()
            log.close()
    if failed:
        raise SystemExit(f"stage {failed[0]} failed (exit {failed[1]}); see {work / (failed[0] + '.log')}")
    return times


def _write_examples(args) -> int:
    from . import world

    data, items, seed = args
    return world.write_triplets(data, items, seed, photos=False)["written"]


def write_world(work: Path, recipe: dict = RECIPE, processes: int = 1) -> Path:
    """The world's training folder, written by `processes` processes (every example is a pure function of
    its subject, scene and seed, so the files do not depend on the split)."""
    from . import world

    r = recipe["world"]
    data = work / "world_train"
    done = data / ".complete"
    if done.is_file():
        return data
    train, _ = world.split_subjects(r["seed"], r["n_train_subjects"], r["n_heldout_subjects"])
    items = world.examples(train, r["scenes_per_subject"], r["seed"], "train")
    data.mkdir(parents=True, exist_ok=True)
    parts = [(data, items[i::processes], r["seed"]) for i in range(processes)]
    if processes > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            written = sum(pool.map(_write_examples, parts))
    else:
        written = _write_examples(parts[0])
    if written != len(items):
        raise RuntimeError(f"wrote {written} of {len(items)} world examples")
    done.write_text("ok")
    return data


def build(work, cores: int = 2, out=None, stages=("world", "encoders", "tokenizer", "backbone", "echogen"),
          recipe: dict = RECIPE) -> dict:
    """Run the whole recipe in `work` on `cores` cores, then copy the results into `out` (default: the
    bundled folder)."""
    import torch

    torch.set_num_threads(cores)
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(out) if out is not None else BUNDLE_DIR
    timer = StageTimer()
    data = work / "world_train"
    enc = work / "encoders"
    if "world" in stages:
        data = timer.run("world", write_world, work, recipe, cores)
    # The encoders and the tokenizer need only the world: they train side by side, one core each.
    first = {}
    if "encoders" in stages:
        timer.run("text tokenizer", build_text_encoder, enc / FILES["text_encoder"], recipe)
        first["encoders"] = encoders_command(data, work, recipe)
    if "tokenizer" in stages:
        first["tokenizer"] = train_command("tokenizer", data, work / "tokenizer", work, recipe)
    timer.stages.update(run_stages(first, max(1, cores // len(first)), work) if first else {})
    if "encoders" in timer.stages:
        tok = timer.stages.pop("text tokenizer")
        timer.stages["encoders"].update({k: round(timer.stages["encoders"][k] + tok[k], 1) for k in tok})
    for stage in ("backbone", "echogen"):
        if stage in stages:
            timer.stages.update(run_stages({stage: train_command(stage, data, work / stage, work, recipe)}, cores, work))
    out.mkdir(parents=True, exist_ok=True)
    copies = {"vae": work / "tokenizer" / FILES["vae"], "backbone": work / "backbone" / FILES["backbone"],
              "adapter": work / "echogen" / FILES["adapter"], "dinov2": enc / FILES["dinov2"],
              "content_vae": enc / FILES["content_vae"]}
    from .checkpoint import convert

    for key, src in copies.items():
        if not src.is_file():
            continue
        if key in ("backbone", "adapter"):
            # transformer block weights in fp16 (the rest fp32), as `python -m echogen_core convert --dtype fp16`
            convert(src, out / FILES[key], dtype=torch.float16)
        else:
            shutil.copy2(src, out / FILES[key])
    if (enc / FILES["text_encoder"]).is_dir():
        shutil.rmtree(out / FILES["text_encoder"], ignore_errors=True)
        shutil.copytree(enc / FILES["text_encoder"], out / FILES["text_encoder"])
    # Timings of every stage ever run in this work folder (a resumed or partial build keeps the earlier ones).
    timings_file = work / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    timings.update(timer.stages)
    timings_file.write_text(json.dumps(timings, indent=1))
    total = total_time(timings)
    manifest = {
        "reproduce": f"python -m echogen_core.bundled build --work WORKDIR --cores {cores}",
        "recipe": recipe,
        "commands": {
            "encoders": " ".join(["python"] + encoders_command("WORKDIR/world_train", Path("WORKDIR"), recipe)[1:]),
            **{s: " ".join(["python"] + train_command(s, "WORKDIR/world_train", f"WORKDIR/{s}", Path("WORKDIR"),
                                                      recipe)[1:]) for s in ("tokenizer", "backbone", "echogen")}},
        "storage": "infinity and adapter: transformer blocks fp16, everything else fp32 (checkpoint.convert)",
        "trained": {
            "text_encoder": "T5 span corruption on the world's prompts (encoders stage; tokenizer: unigram "
                            "vocabulary built on the world's prompts plus an English corpus)",
            "dinov2": "names the subject of a reference crop: shape, colours, pattern, and each patch's colour "
                      "(encoders stage; supervised, unlike DINOv2)",
            "flux_vae": "encoder of a variational autoencoder on the reference crops (encoders stage)",
            "vae": "BSQ tokenizer (tokenizer stage)", "infinity": "text-to-image on the world (backbone stage)",
            "adapter": "EchoGen injection over the frozen backbone (echogen stage)"},
        "encoder_pretraining": (json.loads((enc / "report.json").read_text())
                                if (enc / "report.json").is_file() else None),
        "timings": {"cores": cores, "stages": timings, "total": total,
                    "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}"},
        "files": file_hashes(out),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    print(json.dumps(manifest["timings"], indent=1))
    return manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m echogen_core.bundled", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="reproduce the bundled model (world data, encoders, three training stages)")
    b.add_argument("--work", required=True, help="scratch folder (data, checkpoints, logs); runs resume from it")
    b.add_argument("--cores", type=int, default=2, help="cores the build may use (the committed build: 2); "
                   "stages that run side by side share them")
    b.add_argument("--out", default=None, help=f"where the files go (default {BUNDLE_DIR})")
    b.add_argument("--stages", default="world,encoders,tokenizer,backbone,echogen")
    h = sub.add_parser("hashes", help="check the bundled files against MANIFEST.json")
    h.add_argument("--folder", default=None)
    args = p.parse_args(argv)
    if args.cmd == "build":
        build(args.work, args.cores, args.out, tuple(args.stages.split(",")))
        return 0
    folder = Path(args.folder) if args.folder else BUNDLE_DIR
    manifest = json.loads((folder / MANIFEST).read_text())
    bad = [k for k, v in manifest["files"].items() if _sha256(folder / k) != v["sha256"]]
    print("all files match" if not bad else f"mismatch: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
