"""How much of a held-out subject's identity the bundled semantic encoder (DINOv2 layout) exposes.

A linear probe (ridge regression on one-hot labels) is fitted on the features of the world's training
references -- CLS token and mean patch token -- and asked to name the shape, colours and pattern of 40
held-out subjects (new combinations) from new photos of them. The same probe on an untrained encoder of the
same layout (seeded random init) is the baseline. Prints a table and writes JSON.

    python benchmarks/semantic_probe.py [--dinov2 FILE] [--refs-per-subject 3]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from echogen_core import world  # noqa: E402
from echogen_core.encoder_pretraining import ATTRIBUTES, attribute_labels  # noqa: E402


def references(subjects, per_subject: int, first_index: int, seed: int = 0):
    """(uint8 (N, S, S, 3) prepared references, subject dicts): `per_subject` photos of each subject."""
    images, labels = [], []
    for s in subjects:
        for k in range(per_subject):
            prepared = world.prepare_reference(world.render_reference(s, first_index + k, seed))
            images.append(np.asarray(prepared.image.convert("RGB")))
            labels.append({"shape": s.shape, "primary": s.primary, "secondary": s.secondary, "pattern": s.pattern})
    return np.stack(images), labels


@torch.no_grad()
def features(model, images: np.ndarray, size: int) -> torch.Tensor:
    out = []
    for i in range(0, len(images), 256):
        x = torch.from_numpy(images[i:i + 256]).permute(0, 3, 1, 2).float() / 255
        f = model.encode(x, size=size)
        out.append(torch.cat([f[:, 0], f[:, 1:].mean(1)], 1))
    return torch.cat(out)


def probe(train_x, train_labels, test_x, test_labels, ridge: float = 1.0) -> dict:
    """Held-out accuracy per attribute of a ridge-regression probe on standardised features."""
    vocab, y = attribute_labels(train_labels)
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    a = torch.cat([(train_x - mu) / sd, torch.ones(len(train_x), 1)], 1)
    b = torch.cat([(test_x - mu) / sd, torch.ones(len(test_x), 1)], 1)
    out = {}
    for i, attr in enumerate(ATTRIBUTES):
        target = torch.nn.functional.one_hot(y[:, i], len(vocab[attr])).float()
        w = torch.linalg.solve(a.T @ a + ridge * torch.eye(a.shape[1]), a.T @ target)
        truth = torch.tensor([vocab[attr].index(t[attr]) for t in test_labels])
        out[attr] = round(float(((b @ w).argmax(1) == truth).float().mean()), 3)
    return out


def run(dinov2_path=None, refs_per_subject: int = 3, seed: int = 0) -> dict:
    from echogen_core.bundled import RECIPE, bundled_paths
    from echogen_core.dinov2 import Dinov2, Dinov2Config, load_dinov2

    trained = load_dinov2(dinov2_path or bundled_paths()["dinov2"])
    torch.manual_seed(seed)
    untrained = Dinov2(trained.cfg).eval()
    torch.nn.init.trunc_normal_(untrained.pos_embed, std=0.02)
    size = trained.cfg.img_size
    r = RECIPE["world"]
    train, held = world.split_subjects(r["seed"], r["n_train_subjects"], r["n_heldout_subjects"])
    train_images, train_labels = references(train, 3, 0, r["seed"])
    test_images, test_labels = references(held, refs_per_subject, 100, r["seed"])
    result = {}
    for name, model in (("trained", trained), ("untrained (random init)", untrained)):
        result[name] = probe(features(model, train_images, size), train_labels,
                             features(model, test_images, size), test_labels)
    return {"held_out": len(test_labels), "train": len(train_labels), "accuracy": result,
            "chance": {a: round(1 / len({t[a] for t in train_labels}), 3) for a in ATTRIBUTES}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dinov2", default=None, help="semantic encoder file (default: the bundled one)")
    p.add_argument("--refs-per-subject", type=int, default=3)
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "semantic_probe.json"))
    args = p.parse_args(argv)
    t0 = time.time()
    res = run(args.dinov2, args.refs_per_subject)
    print("| semantic encoder | " + " | ".join(ATTRIBUTES) + " |")
    print("|---" * (len(ATTRIBUTES) + 1) + "|")
    for name, acc in res["accuracy"].items():
        print(f"| {name} | " + " | ".join(f"{acc[a]:.3f}" for a in ATTRIBUTES) + " |")
    print(f"| chance | " + " | ".join(f"{res['chance'][a]:.3f}" for a in ATTRIBUTES) + " |")
    print(f"linear probe fitted on {res['train']} training references, tested on {res['held_out']} photos of "
          f"held-out subjects; {time.time() - t0:.0f} s")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=1), encoding="utf-8")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
