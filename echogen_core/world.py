"""A small procedurally generated world for training and testing the bundled CPU model.

Everything is a pure function of integers, so the world is identical on every machine:

* **Subjects** - a shape (star, heart, ring, ...) filled with a primary colour and a pattern (stripes, dots,
  checks) in a secondary colour. ``subjects(seed)`` lists every combination in a fixed shuffled order and
  :func:`split_subjects` cuts it into training and held-out subjects (held-out subjects are *new
  combinations*: their shape, colours and pattern each occur in training, never together).
* **Scenes** - what a prompt asks for: a background ("on grass", "at the beach", "in the snow", ...), a
  position (left, right, centre, top, bottom), a size (small, large) and optionally a companion object
  ("next to a blue cube"). :func:`prompt_of` writes the prompt; the prompt names the subject's *shape*
  only (like DreamBench's class noun "a dog"), so its colours and pattern can only come from the reference.
* **Targets** - :func:`render_target` draws the exact image for every (subject, scene): the background
  texture depends only on the background word, the layout only on the scene, so the target of a prompt is
  known exactly (with its subject and companion masks, and the background alone, for the benchmarks).
* **References** - :func:`render_reference` photographs the subject on a cluttered background (random
  clutter shapes and colours, random subject position and scale), seeded per (subject, index); the known
  subject mask comes with it.

:func:`write_triplets` writes a ``TripletFolder`` (``NAME.ref.png`` - the reference segmented with its known
mask and cropped around the subject as ``segmentation.prepare_subject(crop="subject")`` does, the form
EchoGen trains on - ``NAME.target.png``, ``NAME.txt``, ``NAME.json`` with ``words`` and ``h_div_w``, plus
the raw ``NAME.photo.png`` / ``NAME.mask.png``), which ``python -m echogen_core train --data`` reads.

Sizes: targets are 64 x 64 (the first 3 scales of the 1:1 template, grids 1, 2, 4 at 16 px per token);
references are photographed at 96 x 96 and prepared at the tiny model's 64-px crop (FLUX latent 8 x 8 =
64 content tokens, DINOv2 at 56 px = 4 x 4 patches + CLS).
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path
from functools import lru_cache
from typing import Iterable, Optional, Sequence

import numpy as np

TARGET_SIZE = 64          # px: 3 scales (1, 2, 4 tokens a side) of the 1:1 template
NUM_SCALES = 3
REFERENCE_PHOTO_SIZE = 96
REFERENCE_SIZE = 64       # the tiny EchoGen's reference crop
SUPERSAMPLE = 4           # shapes are drawn at 4x and averaged down: soft, antialiased edges

SHAPES = ("star", "heart", "ring", "cross", "diamond", "moon", "triangle", "hexagon")
COLOURS = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (245, 215, 30), "green": (40, 170, 60),
    "cyan": (40, 200, 210), "blue": (40, 80, 220), "purple": (140, 50, 190), "pink": (245, 120, 190),
    "white": (250, 250, 250), "black": (25, 25, 25),
}
PATTERNS = ("stripes", "dots", "checks")
BACKGROUNDS = {            # prompt phrase -> texture (see _background)
    "grass": "on grass", "beach": "at the beach", "snow": "in the snow", "wood": "on a wooden floor",
    "night": "under the night sky", "brick": "in front of a brick wall",
}
POSITIONS = {"left": (0.28, 0.5), "right": (0.72, 0.5), "centre": (0.5, 0.5), "top": (0.5, 0.28),
             "bottom": (0.5, 0.72)}
POSITION_WORDS = {"left": "on the left", "right": "on the right", "centre": "in the centre", "top": "at the top",
                  "bottom": "at the bottom"}
SIZES = {"small": 0.18, "large": 0.28}     # subject radius / image side
COMPANIONS = ("cube", "ball", "cone")
COMPANION_COLOURS = ("blue", "red", "yellow", "green")
COMPANION_RADIUS = 0.09
# where the companion stands for each subject position (clear of the subject)
COMPANION_AT = {"left": (0.82, 0.72), "right": (0.18, 0.72), "centre": (0.85, 0.85), "top": (0.82, 0.82),
                "bottom": (0.18, 0.18)}


@dataclass(frozen=True)
class Subject:
    shape: str
    primary: str
    secondary: str
    pattern: str

    @property
    def name(self) -> str:
        return f"{self.primary}-{self.secondary}-{self.pattern}-{self.shape}"

    @property
    def words(self) -> str:
        """What a segmenter would be told it is (the prompt's noun)."""
        return self.shape

    def describe(self) -> str:
        return f"a {self.primary} {self.shape} with {self.secondary} {self.pattern}"


@dataclass(frozen=True)
class Scene:
    background: str
    position: str
    size: str
    companion: Optional[tuple] = None     # (colour, kind) or None

    @property
    def key(self) -> str:
        comp = f"-{self.companion[0]}-{self.companion[1]}" if self.companion else ""
        return f"{self.background}-{self.position}-{self.size}{comp}"


def all_subjects() -> list:
    return [Subject(s, p, q, pat) for s, p, q, pat in product(SHAPES, COLOURS, COLOURS, PATTERNS) if p != q]


def all_scenes() -> list:
    comps = [None] + [(c, k) for c, k in product(COMPANION_COLOURS, COMPANIONS)]
    return [Scene(b, p, s, c) for b, p, s, c in product(BACKGROUNDS, POSITIONS, SIZES, comps)]


def split_subjects(seed: int = 0, n_train: int = 600, n_heldout: int = 40) -> tuple:
    """(training subjects, held-out subjects): a seeded shuffle of every combination, cut in two.
    Held-out subjects never occur in training (as combinations; their parts all do)."""
    subjects = all_subjects()
    random.Random(f"world-split/{seed}").shuffle(subjects)
    if n_train + n_heldout > len(subjects):
        raise ValueError(f"only {len(subjects)} subjects exist")
    return subjects[:n_train], subjects[n_train:n_train + n_heldout]


def prompt_of(subject: Subject, scene: Scene) -> str:
    """The text of a target. Names the shape (the class noun), never the colours or the pattern."""
    text = f"a {scene.size} {subject.shape} {POSITION_WORDS[scene.position]} {BACKGROUNDS[scene.background]}"
    if scene.companion:
        text += f" next to a {scene.companion[0]} {scene.companion[1]}"
    return text


def vocabulary_corpus() -> list:
    """Every word the world's prompts use, in prompt-like lines (for the tiny T5 tokenizer)."""
    lines = []
    for shape, scene in product(SHAPES, all_scenes()[:: 7]):
        lines.append(prompt_of(Subject(shape, "red", "blue", "dots"), scene))
    lines += [" ".join(COLOURS), " ".join(SHAPES), " ".join(PATTERNS), " ".join(COMPANIONS)]
    return lines


# --------------------------------------------------------------------------------------------------------------
# Drawing


@lru_cache(maxsize=16)
def _grid(size: int, ss: int = SUPERSAMPLE):
    n = size * ss
    c = (np.arange(n, dtype=np.float32) + 0.5) / ss
    return np.meshgrid(c, c)  # x (columns), y (rows) in pixel units


def _downsample(a: np.ndarray, ss: int = SUPERSAMPLE) -> np.ndarray:
    n = a.shape[0] // ss
    return a.reshape(n, ss, n, ss, *a.shape[2:]).mean(axis=(1, 3))


def _polygon(x, y, pts) -> np.ndarray:
    """Even-odd point-in-polygon over the grid."""
    inside = np.zeros(x.shape, dtype=bool)
    n = len(pts)
    for i in range(n):
        x0, y0 = pts[i]
        x1, y1 = pts[(i + 1) % n]
        cond = (y0 > y) != (y1 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            xi = (x1 - x0) * (y - y0) / (y1 - y0 + 1e-12) + x0
        inside ^= cond & (x < xi)
    return inside


def shape_mask(shape: str, x, y, cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean mask of `shape` centred at (cx, cy) with radius r on the grid (x, y)."""
    u, v = (x - cx) / r, (y - cy) / r      # v grows downwards
    if shape == "ring":
        d = np.hypot(u, v)
        return (d <= 1.0) & (d >= 0.5)
    if shape == "cross":
        return ((np.abs(u) <= 0.33) & (np.abs(v) <= 1)) | ((np.abs(v) <= 0.33) & (np.abs(u) <= 1))
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "moon":
        return (np.hypot(u, v) <= 1.0) & (np.hypot(u - 0.45, v + 0.15) > 0.8)
    if shape == "heart":
        a, b = u * 1.15, -v * 1.15 + 0.25
        return (a * a + b * b - 1) ** 3 - a * a * b ** 3 <= 0
    if shape == "star":
        pts = [(cx + r * (1.0 if k % 2 == 0 else 0.45) * math.sin(k * math.pi / 5),
                cy - r * (1.0 if k % 2 == 0 else 0.45) * math.cos(k * math.pi / 5)) for k in range(10)]
        return _polygon(x, y, pts)
    if shape == "triangle":
        pts = [(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)]
        return _polygon(x, y, pts)
    if shape == "hexagon":
        pts = [(cx + r * math.cos(k * math.pi / 3), cy + r * math.sin(k * math.pi / 3)) for k in range(6)]
        return _polygon(x, y, pts)
    raise ValueError(f"unknown shape {shape!r}")


def pattern_mask(pattern: str, x, y, cx: float, cy: float, r: float) -> np.ndarray:
    """Where the secondary colour goes, in the subject's own frame (scales with the subject)."""
    u, v = (x - cx) / r, (y - cy) / r
    if pattern == "stripes":
        return np.floor((v + 1) * 2.5).astype(int) % 2 == 1        # 5 horizontal bands
    if pattern == "dots":
        gu, gv = (u + 1) * 2, (v + 1) * 2                          # 4 x 4 cells, a dot in each
        return np.hypot(gu - np.floor(gu) - 0.5, gv - np.floor(gv) - 0.5) < 0.3
    if pattern == "checks":
        return (np.floor((u + 1) * 2).astype(int) + np.floor((v + 1) * 2).astype(int)) % 2 == 1
    raise ValueError(f"unknown pattern {pattern!r}")


def draw_subject(canvas: np.ndarray, subject: Subject, cx: float, cy: float, r: float,
                 ss: int = SUPERSAMPLE) -> np.ndarray:
    """Paint the subject onto a float (H, W, 3) canvas in place (antialiased). Returns its soft mask (H, W)."""
    size = canvas.shape[0]
    x, y = _grid(size, ss)
    inside = shape_mask(subject.shape, x, y, cx, cy, r)
    second = pattern_mask(subject.pattern, x, y, cx, cy, r) & inside
    p, q = np.array(COLOURS[subject.primary], np.float32), np.array(COLOURS[subject.secondary], np.float32)
    colour = np.where(second[..., None], q, p) * inside[..., None]
    cov = _downsample(inside.astype(np.float32), ss)
    col = _downsample(colour, ss)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_col = np.where(cov[..., None] > 0, col / np.maximum(cov[..., None], 1e-6), 0)
    canvas[:] = canvas * (1 - cov[..., None]) + mean_col * cov[..., None]
    return cov


def draw_companion(canvas: np.ndarray, colour: str, kind: str, cx: float, cy: float, r: float) -> np.ndarray:
    size = canvas.shape[0]
    x, y = _grid(size)
    if kind == "cube":
        inside = (np.abs(x - cx) <= r * 0.85) & (np.abs(y - cy) <= r * 0.85)
        shade = np.where(y < cy - r * 0.35, 1.25, 1.0)             # a lighter top face
    elif kind == "ball":
        inside = np.hypot(x - cx, y - cy) <= r
        shade = 1.2 - 0.5 * np.clip(np.hypot(x - cx + r * 0.4, y - cy + r * 0.4) / (2 * r), 0, 1)
    elif kind == "cone":
        inside = _polygon(x, y, [(cx, cy - r), (cx + r * 0.8, cy + r), (cx - r * 0.8, cy + r)])
        shade = np.where(x < cx, 1.15, 0.9)
    else:
        raise ValueError(f"unknown companion {kind!r}")
    c = np.clip(np.array(COLOURS[colour], np.float32) * shade[..., None], 0, 255) * inside[..., None]
    cov = _downsample(inside.astype(np.float32))
    col = _downsample(c)
    mean_col = np.where(cov[..., None] > 0, col / np.maximum(cov[..., None], 1e-6), 0)
    canvas[:] = canvas * (1 - cov[..., None]) + mean_col * cov[..., None]
    return cov


def _noise(size: int, seed: int, cells: int) -> np.ndarray:
    """Smooth value noise in [0, 1] (bilinear interpolation of a cells x cells random grid)."""
    g = np.random.default_rng(seed).random((cells + 1, cells + 1)).astype(np.float32)
    t = np.linspace(0, cells, size, endpoint=False, dtype=np.float32)
    i = np.floor(t).astype(int)
    f = t - i
    a = g[i][:, i] * (1 - f)[None, :] + g[i][:, i + 1] * f[None, :]
    b = g[i + 1][:, i] * (1 - f)[None, :] + g[i + 1][:, i + 1] * f[None, :]
    return a * (1 - f)[:, None] + b * f[:, None]


def background(name: str, size: int = TARGET_SIZE) -> np.ndarray:
    """The texture of a background word: float (size, size, 3) in 0..255, the same every time."""
    return _background(name, size).copy()


@lru_cache(maxsize=32)
def _background(name: str, size: int) -> np.ndarray:
    seed = sorted(BACKGROUNDS).index(name) + 101
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    n = _noise(size, seed, 6)
    if name == "grass":
        img = np.stack([40 + 30 * n, 120 + 50 * n, 35 + 20 * n], -1)
    elif name == "beach":
        sea = yy < 0.3
        sand = np.stack([225 + 20 * n, 195 + 20 * n, 140 + 15 * n], -1)
        water = np.stack([50 + 20 * n, 130 + 30 * n, 200 + 30 * n], -1)
        img = np.where(sea[..., None], water, sand)
        img = np.where(((yy >= 0.3) & (yy < 0.34))[..., None], np.array([245, 245, 240], np.float32), img)
    elif name == "snow":
        img = np.stack([232 + 15 * n, 238 + 12 * n, 248 + 7 * n], -1)
    elif name == "wood":
        plank = (np.floor(yy * 6) % 2)[..., None]
        img = np.stack([150 + 30 * n, 95 + 20 * n, 55 + 10 * n], -1) * (0.85 + 0.15 * plank)
        img = np.where((yy * 6 % 1 < 0.08)[..., None], img * 0.55, img)
    elif name == "night":
        img = np.stack([15 + 15 * n, 20 + 15 * n, 55 + 30 * n], -1)
    elif name == "brick":
        row = np.floor(yy * 8)
        off = (row % 2) * 0.5
        mortar = (yy * 8 % 1 < 0.15) | (((xx * 4 + off / 1) % 1) < 0.06)
        img = np.stack([170 + 40 * n, 70 + 20 * n, 50 + 15 * n], -1)
        img = np.where(mortar[..., None], np.array([200, 195, 185], np.float32), img)
    else:
        raise ValueError(f"unknown background {name!r}")
    return np.clip(img, 0, 255).astype(np.float32)


@dataclass
class Rendered:
    image: np.ndarray            # uint8 (H, W, 3)
    subject_mask: np.ndarray     # float (H, W) in [0, 1]
    companion_mask: np.ndarray   # float (H, W) (zeros without a companion)
    background: np.ndarray       # uint8 (H, W, 3): the background alone

    def pil(self):
        from PIL import Image

        return Image.fromarray(self.image)


def layout(scene: Scene, size: int = TARGET_SIZE) -> dict:
    fx, fy = POSITIONS[scene.position]
    out = {"subject": (fx * size, fy * size, SIZES[scene.size] * size)}
    if scene.companion:
        gx, gy = COMPANION_AT[scene.position]
        out["companion"] = (gx * size, gy * size, COMPANION_RADIUS * size)
    return out


def render_target(subject: Subject, scene: Scene, size: int = TARGET_SIZE) -> Rendered:
    """The exact image a prompt asks for (deterministic: no randomness beyond the background word)."""
    bg = background(scene.background, size)
    canvas = bg.copy()
    lay = layout(scene, size)
    comp = np.zeros((size, size), np.float32)
    if scene.companion:
        comp = draw_companion(canvas, *scene.companion, *lay["companion"])
    mask = draw_subject(canvas, subject, *lay["subject"])
    comp = comp * (1 - mask)
    return Rendered(np.clip(canvas + 0.5, 0, 255).astype(np.uint8), mask, comp, np.clip(bg + 0.5, 0, 255).astype(np.uint8))


def render_reference(subject: Subject, index: int = 0, seed: int = 0, size: int = REFERENCE_PHOTO_SIZE) -> Rendered:
    """The subject photographed on a cluttered background: random base colour and noise, 6-12 random clutter
    shapes (never the subject's own shape), the subject at a random position and scale on top. Seeded per
    (seed, subject, index)."""
    rng = np.random.default_rng(abs(hash_str(f"ref/{seed}/{subject.name}/{index}")) % (2 ** 63))
    base = rng.uniform(60, 200, 3).astype(np.float32)
    n = _noise(size, int(rng.integers(1 << 30)), int(rng.integers(3, 8)))
    canvas = np.clip(base[None, None] * (0.75 + 0.5 * n[..., None]), 0, 255).astype(np.float32)
    x, y = _grid(size, 1)
    others = ("square", "circle", "bar")
    for _ in range(int(rng.integers(6, 13))):
        kind = others[int(rng.integers(len(others)))]
        col = rng.uniform(0, 255, 3).astype(np.float32)
        cx, cy = rng.uniform(0, size, 2)
        r = rng.uniform(0.05, 0.18) * size
        if kind == "square":
            inside = (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r * rng.uniform(0.4, 1.0))
        elif kind == "circle":
            inside = np.hypot(x - cx, y - cy) <= r
        else:
            inside = (np.abs(x - cx) <= r * 1.5) & (np.abs(y - cy) <= r * 0.2)
        cov = inside.astype(np.float32)
        canvas = canvas * (1 - cov[..., None]) + col * cov[..., None]
    r = rng.uniform(0.2, 0.36) * size
    cx, cy = rng.uniform(r + 2, size - r - 2, 2)
    mask = draw_subject(canvas, subject, cx, cy, r, ss=2)
    return Rendered(np.clip(canvas + 0.5, 0, 255).astype(np.uint8), mask, np.zeros_like(mask),
                    np.zeros((size, size, 3), np.uint8))


def hash_str(text: str) -> int:
    """A stable 63-bit hash (Python's hash() is salted per process)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def prepare_reference(photo: Rendered, size: int = REFERENCE_SIZE, margin: float = 0.1):
    """The reference as EchoGen sees it: the known mask, whitened, square crop around the subject, through
    the pack's own segmentation.prepare_subject (what the demo and the trainer's data use)."""
    from PIL import Image

    from .segmentation import prepare_subject

    mask = Image.fromarray(np.clip(photo.subject_mask * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    return prepare_subject(photo.pil(), words=None, method="mask", mask=mask, crop="subject", size=size,
                           margin=margin, salient=False)


# --------------------------------------------------------------------------------------------------------------
# Data sets


@dataclass(frozen=True)
class Example:
    subject: Subject
    scene: Scene
    ref_index: int

    @property
    def name(self) -> str:
        return f"{self.subject.name}__{self.scene.key}__r{self.ref_index}"

    @property
    def prompt(self) -> str:
        return prompt_of(self.subject, self.scene)


def examples(subjects: Sequence[Subject], per_subject: int, seed: int = 0, salt: str = "train") -> list:
    """`per_subject` scenes for each subject, drawn (seeded) from every scene; each with its own reference
    photo (ref_index)."""
    scenes = all_scenes()
    out = []
    for s in subjects:
        rng = random.Random(f"{salt}/{seed}/{s.name}")
        for k, scene in enumerate(rng.sample(scenes, per_subject)):
            out.append(Example(s, scene, k))
    return out


def write_triplets(out_dir, items: Iterable[Example], seed: int = 0, photos: bool = True) -> dict:
    """Write a TripletFolder: NAME.ref.png (prepared reference, 64 px), NAME.target.png (64 px),
    NAME.txt (the prompt), NAME.json ({words, h_div_w, subject, scene, prompt}); with `photos`, also the
    raw reference NAME.photo.png and its NAME.mask.png. Returns counts."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for ex in items:
        photo = render_reference(ex.subject, ex.ref_index, seed)
        prepared = prepare_reference(photo)
        target = render_target(ex.subject, ex.scene)
        prepared.image.save(out / f"{ex.name}.ref.png")
        target.pil().save(out / f"{ex.name}.target.png")
        (out / f"{ex.name}.txt").write_text(ex.prompt, encoding="utf-8")
        meta = {"words": ex.subject.words, "h_div_w": 1.0, "prompt": ex.prompt, "subject": asdict(ex.subject),
                "scene": {**asdict(ex.scene), "companion": list(ex.scene.companion) if ex.scene.companion else None},
                "ref_index": ex.ref_index, "seed": seed}
        (out / f"{ex.name}.json").write_text(json.dumps(meta), encoding="utf-8")
        if photos:
            from PIL import Image

            photo.pil().save(out / f"{ex.name}.photo.png")
            Image.fromarray(np.clip(photo.subject_mask * 255 + 0.5, 0, 255).astype(np.uint8), "L").save(
                out / f"{ex.name}.mask.png")
        n += 1
    return {"written": n, "folder": str(out)}


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m echogen_core.world", description="Write the synthetic world as triplets.")
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="train", choices=("train", "heldout"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=600)
    p.add_argument("--n-heldout", type=int, default=40)
    p.add_argument("--per-subject", type=int, default=6)
    p.add_argument("--no-photos", action="store_true")
    args = p.parse_args(argv)
    train, held = split_subjects(args.seed, args.n_train, args.n_heldout)
    subs = train if args.split == "train" else held
    info = write_triplets(args.out, examples(subs, args.per_subject, args.seed, args.split), args.seed,
                          photos=not args.no_photos)
    print(f"wrote {info['written']} triplets to {info['folder']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
