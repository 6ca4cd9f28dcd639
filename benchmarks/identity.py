"""Identity and text adherence of the bundled model on held-out subjects of the synthetic world.

For every held-out subject (a shape x colours x pattern combination never seen in training) and a few
scenes, the prompt names only the subject's shape; the exact target image is known. Each prompt is
generated three ways with the same seed:

  echogen      EchoGen with the subject (a new reference photo on clutter, segmented with the known mask)
  no_subject   the same EchoGen model without a subject (its learned null subject)
  backbone     the plain Infinity backbone (text-to-image)

and, as a ceiling, the exact target passed through the bundled VAE (``vae_ceiling``).

Measures against the exact target (64 x 64):
  identity_colour  fraction of the target's subject pixels (mask >= 0.9) whose generated colour has the same
                   nearest palette colour (the world's 10 subject colours) as the target pixel
  identity_l1      mean |generated - target| over those pixels, in [0, 1] (lower is better)
  shape_iou        IoU of the generated foreground (pixels that differ from the bare background by more than
                   40/255 on average over RGB) with the target's subject + companion masks
  background       the background texture nearest to the generated image outside the (dilated) objects
                   is the prompt's
  position         the centroid of the generated foreground outside the companion is nearest to the
                   prompt's position
  size             the generated foreground area (outside the companion) is nearer to the prompt's size
                   than to the other size

`identity` = identity_colour, `text` = mean of background, position, size.

    python benchmarks/identity.py [--subjects 40] [--scenes 4] [--json benchmarks/results/identity.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FG_THRESHOLD = 40.0
METRICS = ("identity_colour", "identity_l1", "shape_iou", "background", "position", "size")


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= np.roll(np.roll(mask, dy, 0), dx, 1)
    return out


def _palette():
    from echogen_core.world import COLOURS

    return np.array(list(COLOURS.values()), dtype=np.float32)


def _nearest_palette(pixels: np.ndarray) -> np.ndarray:
    pal = _palette()
    return np.argmin(((pixels[:, None, :] - pal[None]) ** 2).sum(-1), axis=1)


def _expected_area(shape: str, size: str) -> float:
    from echogen_core import world

    canvas = np.zeros((world.TARGET_SIZE, world.TARGET_SIZE, 3), np.float32)
    r = world.SIZES[size] * world.TARGET_SIZE
    return float(world.draw_subject(canvas, world.Subject(shape, "red", "blue", "dots"), 32, 32, r).sum())


def score(generated: np.ndarray, subject, scene) -> dict:
    """Metrics of one generated image (uint8 (64, 64, 3)) against the exact target of (subject, scene)."""
    from echogen_core import world

    target = world.render_target(subject, scene)
    gen = generated.astype(np.float32)
    tgt = target.image.astype(np.float32)
    inside = target.subject_mask >= 0.9
    out = {}
    g, t = gen[inside], tgt[inside]
    out["identity_colour"] = float((_nearest_palette(g) == _nearest_palette(t)).mean())
    out["identity_l1"] = float(np.abs(g - t).mean() / 255)
    bare = target.background.astype(np.float32)
    fg = np.abs(gen - bare).mean(-1) > FG_THRESHOLD
    want = (target.subject_mask >= 0.5) | (target.companion_mask >= 0.5)
    out["shape_iou"] = float((fg & want).sum() / max(1, (fg | want).sum()))
    objects = _dilate((target.subject_mask > 0.05) | (target.companion_mask > 0.05), 2)
    free = ~objects
    errs = {b: np.abs(gen[free] - world.background(b)[free]).mean() for b in world.BACKGROUNDS}
    out["background"] = float(min(errs, key=errs.get) == scene.background)
    comp = _dilate(target.companion_mask > 0.05, 3)
    fg_s = fg & ~comp
    if fg_s.sum() == 0:
        out["position"] = 0.0
        out["size"] = 0.0
    else:
        ys, xs = np.nonzero(fg_s)
        cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
        n = world.TARGET_SIZE
        pos = min(world.POSITIONS, key=lambda p: (world.POSITIONS[p][0] * n - cx) ** 2 + (world.POSITIONS[p][1] * n - cy) ** 2)
        out["position"] = float(pos == scene.position)
        area = float(fg_s.sum())
        areas = {s: _expected_area(subject.shape, s) for s in world.SIZES}
        size = min(areas, key=lambda s: abs(np.log(area) - np.log(areas[s])))
        out["size"] = float(size == scene.size)
    return out


def run(n_subjects: int = 40, n_scenes: int = 4, seed: int = 0, bundle=None, sampling=None, threads=None,
        log=print) -> dict:
    import torch

    from echogen_core import world
    from echogen_core.bundled import RECIPE, SAMPLING, generate_world, load_bundled
    from echogen_core.subject import encode_subject, pil_to_reference, reference_geometry

    if threads:
        torch.set_num_threads(threads)
    t0 = time.time()
    parts = load_bundled("cpu", bundle)
    model, vae = parts["model"], parts["vae"]
    crop, _ = reference_geometry(model.cfg)
    r = RECIPE["world"]
    _, held = world.split_subjects(r["seed"], r["n_train_subjects"], r["n_heldout_subjects"])
    held = held[:n_subjects]
    items = world.examples(held, n_scenes, seed, salt="heldout")
    conds = ("echogen", "no_subject", "backbone", "vae_ceiling")
    per = {c: [] for c in conds}
    gen_seconds, n_images = 0.0, 0
    for si, subject in enumerate(held):
        exs = [e for e in items if e.subject == subject]
        photo = world.render_reference(subject, 1000 + si, seed=r["seed"])   # photos never used in training
        prepared = world.prepare_reference(photo, crop)
        feats = encode_subject(pil_to_reference(prepared.image), model.cfg, parts["dinov2"], parts["content_encoder"])
        prompts = [e.prompt for e in exs]
        t1 = time.time()
        images = {"echogen": generate_world(parts, prompts, feats, seed=seed, sampling=sampling)}
        gen_seconds += time.time() - t1
        n_images += len(prompts)
        images["no_subject"] = generate_world(parts, prompts, None, seed=seed, sampling=sampling)
        images["backbone"] = generate_world(parts, prompts, None, seed=seed, sampling=sampling, model="backbone")
        targets = torch.stack([torch.from_numpy(world.render_target(e.subject, e.scene).image).permute(2, 0, 1)
                               for e in exs]).float() / 127.5 - 1
        with torch.no_grad():
            recon = vae.decode(_reconstruct(vae, targets))
        from echogen_core.sampler import to_uint8

        images["vae_ceiling"] = list(to_uint8(recon).numpy())
        for c in conds:
            for e, im in zip(exs, images[c]):
                per[c].append({"subject": subject.name, "prompt": e.prompt, **score(np.asarray(im), subject, e.scene)})
        if (si + 1) % 10 == 0:
            log(f"  {si + 1}/{len(held)} subjects")
    summary = {c: {m: float(np.mean([x[m] for x in per[c]])) for m in METRICS} for c in conds}
    for c in conds:
        summary[c]["identity"] = summary[c]["identity_colour"]
        summary[c]["text"] = float(np.mean([summary[c][m] for m in ("background", "position", "size")]))
    return {"summary": summary, "per_image": per, "n_subjects": len(held), "n_scenes": n_scenes, "seed": seed,
            "sampling": {**SAMPLING, **(sampling or {})}, "seconds_per_image": gen_seconds / max(1, n_images),
            "seconds_total": time.time() - t0, "threads": torch.get_num_threads()}


def _reconstruct(vae, images):
    """The exact target through the VAE's 3-scale quantiser: the best the bundled model could draw."""
    from echogen_core.bundled import world_schedule
    from echogen_core.train import tokenizer_grids

    h = vae.encode_latent(images)
    grids = tokenizer_grids(vae, world_schedule())
    summed, _ = vae.quantize_multiscale(h, grids)
    return summed


def table(summary: dict) -> str:
    cols = ("identity", "identity_l1", "shape_iou", "background", "position", "size", "text")
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    names = {"echogen": "EchoGen (with subject)", "no_subject": "EchoGen, no subject", "backbone": "backbone (t2i)",
             "vae_ceiling": "exact target through the VAE"}
    for c, s in summary.items():
        lines.append(f"| {names.get(c, c)} | " + " | ".join(f"{s[k]:.3f}" for k in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--subjects", type=int, default=40)
    p.add_argument("--scenes", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bundle", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cfg", type=float, default=None)
    p.add_argument("--subject-cfg", type=float, default=None)
    p.add_argument("--tau", type=float, default=None)
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "identity.json"))
    args = p.parse_args(argv)
    sampling = {k: v for k, v in (("cfg", args.cfg), ("subject_cfg", args.subject_cfg), ("tau", args.tau)) if v is not None}
    result = run(args.subjects, args.scenes, args.seed, args.bundle, sampling, args.threads,
                 log=lambda m: print(m, file=sys.stderr))
    print(table(result["summary"]))
    print(f"{result['n_subjects']} held-out subjects x {result['n_scenes']} scenes, seed {result['seed']}, "
          f"sampling {result['sampling']}; {result['seconds_per_image'] * 1000:.0f} ms per EchoGen image "
          f"({result['threads']} threads), {result['seconds_total']:.0f} s in all")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
