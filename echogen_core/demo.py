"""`python -m echogen_core demo --out DIR`: the bundled CPU model doing EchoGen's job end to end, in seconds.

A held-out subject of the synthetic world (a combination of shape, colours and pattern never seen in
training) is photographed on a cluttered background; the photo is segmented (the U2-Net-p salient model
when onnxruntime and its model are installed, else the world's known mask - the output says which), put
on white and cropped around the subject; DINOv2 and the FLUX VAE encoder turn it into subject features;
EchoGen generates several prompts with it (and, for comparison, without it). Written to DIR: the photo,
the prepared reference, one PNG per prompt, ``contact_sheet.png`` (reference | generated | without the
subject | exact target, one row per prompt) and ``demo.json``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

DEFAULT_SCENES = (
    ("grass", "centre", "large", None),
    ("beach", "left", "small", ("red", "ball")),
    ("snow", "right", "large", None),
    ("night", "top", "small", ("yellow", "cube")),
    ("wood", "bottom", "large", ("blue", "cone")),
    ("brick", "centre", "small", None),
)
CELL = 192  # px of each contact-sheet cell (the 64-px images are shown 3x, nearest neighbour)


def add_demo_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--subject", type=int, default=0, help="which held-out subject of the world (0-39)")
    p.add_argument("--photo-index", type=int, default=1000, help="which reference photo of it (clutter seed)")
    p.add_argument("--prompt", action="append", default=None,
                   help="a prompt (repeatable); default: six scenes of the world naming the subject's shape")
    p.add_argument("--segment", default="auto", choices=("auto", "mask"),
                   help="auto: the salient model when installed, else the world's known mask; mask: the known mask")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bundle", default=None, help="folder of the bundled model (default: echogen_core/bundled_model)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return p


def _segment(photo, crop: int, method: str):
    """(PreparedSubject, what ran). The salient model when asked and installed, else the known mask."""
    from PIL import Image

    from .segmentation import prepare_subject

    if method == "auto":
        try:
            from .salient import default_detector

            detector = default_detector()
        except Exception:  # noqa: BLE001 - an optional dependency; any failure means "not available"
            detector = None
        if detector is not None:
            prepared = prepare_subject(photo.pil(), method="salient", crop="subject", size=crop, salient=detector)
            if prepared.method == "salient":
                return prepared, "salient object model (U2-Net-p)"
    mask = Image.fromarray(np.clip(photo.subject_mask * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    prepared = prepare_subject(photo.pil(), method="mask", mask=mask, crop="subject", size=crop, salient=False)
    why = "the world's known mask" + (" (onnxruntime / the salient model is not installed)" if method == "auto" else "")
    return prepared, why


def contact_sheet(rows, header=("reference", "generated", "no subject", "exact target")):
    """rows: [(prompt, [PIL images])] -> one PIL image, a labelled grid."""
    from PIL import Image, ImageDraw

    n_cols = max(len(r[1]) for r in rows)
    label_h, pad = 14, 4
    W = n_cols * (CELL + pad) + pad
    H = label_h + len(rows) * (CELL + label_h + pad) + pad
    sheet = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(header[:n_cols]):
        draw.text((pad + c * (CELL + pad), 1), name, fill=(0, 0, 0))
    y = label_h
    for prompt, images in rows:
        draw.text((pad, y + 1), prompt[:110], fill=(40, 40, 40))
        y += label_h
        for c, im in enumerate(images):
            sheet.paste(im.convert("RGB").resize((CELL, CELL), Image.NEAREST), (pad + c * (CELL + pad), y))
        y += CELL + pad
    return sheet


def run_demo(args) -> int:
    import torch

    from . import world
    from .bundled import SAMPLING, bundled_available, generate_world, load_bundled
    from .cli import save_png
    from .errors import CheckpointError
    from .subject import encode_subject, pil_to_reference, reference_geometry

    if args.threads:
        torch.set_num_threads(args.threads)
    if not bundled_available(args.bundle):
        raise CheckpointError("The bundled model is not installed (echogen_core/bundled_model/ is incomplete); "
                              "rebuild it with `python -m echogen_core.bundled build --work /tmp/echogen_bundle`.")
    t0 = time.time()
    parts = load_bundled("cpu", args.bundle)
    model = parts["model"]
    t_load = time.time() - t0
    _, held = world.split_subjects(**_split_args())
    if not 0 <= args.subject < len(held):
        raise CheckpointError(f"--subject must be 0-{len(held) - 1}")
    subject = held[args.subject]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t1 = time.time()
    photo = world.render_reference(subject, args.photo_index, seed=world_seed())
    crop, dino = reference_geometry(model.cfg)
    prepared, how = _segment(photo, crop, args.segment)
    features = encode_subject(pil_to_reference(prepared.image), model.cfg, parts["dinov2"], parts["content_encoder"])
    save_png(photo.pil(), out / "reference_photo.png")
    save_png(prepared.image, out / "reference_prepared.png")
    t_subject = time.time() - t1

    if args.prompt:
        prompts, scenes = list(args.prompt), [None] * len(args.prompt)
    else:
        scenes = [world.Scene(*s) for s in DEFAULT_SCENES]
        prompts = [world.prompt_of(subject, s) for s in scenes]
    t2 = time.time()
    with_subject = generate_world(parts, prompts, features, seed=args.seed)
    t_gen = time.time() - t2
    without = generate_world(parts, prompts, None, seed=args.seed)
    rows, files = [], []
    for i, (prompt, scene) in enumerate(zip(prompts, scenes)):
        path = save_png(with_subject[i], out / f"prompt_{i}.png")
        files.append(path)
        save_png(without[i], out / f"prompt_{i}_no_subject.png")
        cells = [prepared.image, with_subject[i], without[i]]
        if scene is not None:
            cells.append(world.render_target(subject, scene).pil())
        rows.append((prompt, cells))
    sheet_path = save_png(contact_sheet(rows), out / "contact_sheet.png")
    info = {"subject": subject.describe(), "subject_name": subject.name, "segmentation": how,
            "prepared": prepared.message, "prompts": prompts, "images": files, "contact_sheet": sheet_path,
            "sampling": SAMPLING, "seed": args.seed,
            "seconds": {"load": round(t_load, 2), "segment_and_encode": round(t_subject, 2),
                        "generate": round(t_gen, 2), "total": round(time.time() - t0, 2)}}
    (out / "demo.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    print(f"subject: {subject.describe()} (held out: never seen in training), photographed on clutter "
          f"-> {out / 'reference_photo.png'}")
    print(f"segmentation: {how}; subject on white, {crop}px crop around it -> {out / 'reference_prepared.png'}")
    print(f"encoded: DINOv2 at {dino}px ({model.cfg.semantic_len} tokens), FLUX VAE encoder ({model.cfg.content_len} tokens)")
    for p, f in zip(prompts, files):
        print(f"  {p!r} -> {f}")
    print(f"contact sheet (reference | generated | no subject | exact target): {sheet_path}")
    print(f"generated {len(prompts)} images of 64x64 in {t_gen:.2f} s (models loaded in {t_load:.2f} s); "
          f"total {time.time() - t0:.2f} s on CPU")
    return 0


def world_seed() -> int:
    from .bundled import RECIPE

    return RECIPE["world"]["seed"]


def _split_args() -> dict:
    from .bundled import RECIPE

    r = RECIPE["world"]
    return {"seed": r["seed"], "n_train": r["n_train_subjects"], "n_heldout": r["n_heldout_subjects"]}
