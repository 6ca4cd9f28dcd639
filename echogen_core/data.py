"""Training data for Infinity / EchoGen: readers, a Dataset at a scale schedule, and offline preparation.

Every reader is a *sample source*: ``len(source)``, ``source[i]`` (random access, images decoded on
demand) and ``iter(source)`` (a lazy stream), each giving :class:`TrainingSample` objects
(reference PIL image, target PIL image, caption, h/w of the target, id, and the subject's words when the
data names them). Sources:

* :class:`Subjects200KParquet` - the hub's parquet shards of ``Yuanshi/Subjects200K`` (read lazily with
  pyarrow, an optional dependency). Each row is a two-view composite; the quality filter keeps rows whose
  three GPT-4o scores are all >= ``min_quality`` (5, the dataset card's recommendation), the official crop
  boxes cut the two 512 x 512 views out of the padded composite, and each pair gives two samples (either
  view as the target, the other as the reference, the target's own description as caption).
* :class:`OfficialJSONL` - EchoGen's training layout: JSONL lines with ``output_image``, ``cond_image``,
  ``h_div_w`` and ``long_caption`` (a file, or a folder of per-aspect files such as
  ``1.000_000001000.jsonl``); relative image paths are resolved against the JSONL's folder first, then
  the working directory (the official scripts run from the repository root). Captions follow the official
  dynamic-length rule, seeded (see :func:`official_caption`).
* :class:`TripletFolder` - a plain folder, one training pair per name::

      NAME.ref.png       the reference (subject) image; .png .jpg .jpeg .webp .bmp all work
      NAME.target.png    the image to generate
      NAME.txt           its caption (UTF-8)
      NAME.json          optional: {"h_div_w": 1.0, "words": "dog", "long_caption": "..."}

  ``prepare-data`` writes this layout.
* :class:`SamplePairs` - the three real Subjects200K pairs in ``shared/subjects200k_sample`` (already cut
  out of their composites: 1024 x 512, left and right 512 x 512 view, ``samples.json`` with the repository
  loader's field names).

:class:`PairDataset` turns a source into tensors at a scale schedule (the target resized to cover the
schedule's size and centre-cropped, as Infinity's data pipeline does; the reference through
``subject.center_crop_reference`` at the model's crop size), :class:`BucketBatchSampler` groups samples by
aspect template, deterministically per (seed, step) so training resumes exactly, and :func:`collate`
stacks a batch. ``prepare-data`` (:func:`run_prepare`) segments references ahead of time with
``echogen_core.segmentation.prepare_subject`` and writes a triplet folder plus an official-layout JSONL.
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from .checkpoint import atomic_write
from .errors import InputError, MissingDependencyError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
QUALITY_KEYS = ("compositeStructure", "objectConsistency", "imageQuality")
SUBJECTS200K_PADDING = 8       # the official crop boxes (OminiControl's loader, padding=8)
SUBJECTS200K_VIEW = 512        # each view of collection_1 / collection_2 composites
SHORT_CAPTION_PROB = 0.5       # EchoGen's train.sh: --short_cap_prob 0.5


# --------------------------------------------------------------------------------------------------------------
# Samples and captions


@dataclass
class TrainingSample:
    id: str
    reference: "object"        # PIL image of the subject (condition)
    target: "object"           # PIL image to generate
    caption: str
    h_div_w: float             # height / width of the target
    words: str = ""            # what the subject is ("Hedgehog"), for segmentation; "" when unknown

    def __repr__(self) -> str:
        return (f"TrainingSample(id={self.id!r}, reference={_size(self.reference)}, target={_size(self.target)}, "
                f"h_div_w={self.h_div_w:.3f}, words={self.words!r}, caption={self.caption[:40]!r}...)")


def _size(im) -> str:
    return "x".join(map(str, getattr(im, "size", ("?",))))


def official_caption(long_caption: str, rng: random.Random, short_prob: float = SHORT_CAPTION_PROB) -> str:
    """EchoGen's caption rule (dynamic-length prompts): split the long caption at '.', the "short" caption is
    its first sentence when that has 15 words or more, else its first two sentences. With probability
    ``short_prob`` use the short caption; otherwise, when there are more sentences than that, a prefix of
    a uniformly drawn length from (short + 1) sentences to all of them, else the whole caption. Finally
    anything after '--' is cut (as the official ``process_short_text``). Sentences are re-joined with '.'
    exactly as the official code does (so a prefix has no final period)."""
    sentences = [s for s in long_caption.split(".") if s]
    first_words = [w for w in sentences[0].split(" ") if w] if sentences else []
    n_short = 1 if len(first_words) >= 15 else 2
    short = ".".join(sentences[:n_short])
    if rng.random() < short_prob:
        text = short
    elif len(sentences) <= n_short:
        text = long_caption
    else:
        text = ".".join(sentences[: rng.randint(n_short + 1, len(sentences))])
    if "--" in text and text.split("--")[0]:
        text = text.split("--")[0]
    return text


class CaptionPolicy:
    """How a source turns its stored caption into the training caption.

    mode "full": the caption as stored. mode "official": :func:`official_caption`, drawn from a generator
    seeded by (seed, epoch, sample index), so a caption is reproducible and changes from epoch to epoch."""

    def __init__(self, mode: str = "official", short_prob: float = SHORT_CAPTION_PROB, seed: int = 0):
        if mode not in ("official", "full"):
            raise InputError(f"caption mode must be 'official' or 'full', got {mode!r}")
        self.mode, self.short_prob, self.seed = mode, float(short_prob), int(seed)

    def __call__(self, caption: str, index: int, epoch: int = 0) -> str:
        if self.mode == "full":
            return caption
        return official_caption(caption, random.Random(f"{self.seed}/{epoch}/{index}"), self.short_prob)


def _open_image(data_or_path, what: str):
    from PIL import Image

    try:
        if isinstance(data_or_path, (bytes, bytearray)):
            im = Image.open(io.BytesIO(data_or_path))
        else:
            im = Image.open(data_or_path)
        im.load()
    except (OSError, ValueError) as e:
        raise InputError(f"Cannot read the image {what}: {e}") from None
    return im.convert("RGB")


# --------------------------------------------------------------------------------------------------------------
# Sources


class SampleSource:
    """Base: random access, lazy iteration, and cheap per-sample aspect ratios (for bucketing)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> TrainingSample:
        raise NotImplementedError

    def get(self, index: int, epoch: int = 0) -> TrainingSample:
        """Sample `index` with the captions of `epoch` (sources with a fixed caption ignore it)."""
        return self[index]

    def h_div_w(self, index: int) -> float:
        return self[index].h_div_w

    def __iter__(self) -> Iterator[TrainingSample]:
        for i in range(len(self)):
            yield self[i]

    def _check(self, index: int) -> int:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"sample {index} out of range for {n} samples")
        return index % n


def split_composite(image, padding: int = SUBJECTS200K_PADDING, view: Optional[int] = None):
    """The two views of a Subjects200K composite, with the official crop boxes
    (padding, padding, S + padding, S + padding) and (S + 2 padding, padding, 2 S + 2 padding, S + padding),
    S = the view size (512; read off the height when not given). A 1056 x 528 composite gives two 512 views."""
    W, H = image.size
    S = int(view) if view else H - 2 * padding
    if S <= 0 or 2 * S + 2 * padding > W or S + padding > H:
        raise InputError(f"A Subjects200K composite of {W}x{H} cannot hold two {S}x{S} views with {padding} px "
                         "padding; expected e.g. 1056x528 for 512-px views.")
    left = image.crop((padding, padding, S + padding, S + padding))
    right = image.crop((S + 2 * padding, padding, 2 * S + 2 * padding, S + padding))
    return left, right


def compose_pair(left, right, padding: int = SUBJECTS200K_PADDING, fill=(255, 255, 255)):
    """Inverse of split_composite: paste two S x S views onto a (2 S + 4 padding) x (S + 2 padding) canvas
    (left at (padding, padding), right at (S + 2 padding, padding)), the hub's composite geometry."""
    from PIL import Image

    S = left.size[0]
    if left.size != (S, S) or right.size != (S, S):
        raise InputError(f"compose_pair needs two square views of one size, got {left.size} and {right.size}")
    canvas = Image.new("RGB", (2 * S + 4 * padding, S + 2 * padding), fill)
    canvas.paste(left.convert("RGB"), (padding, padding))
    canvas.paste(right.convert("RGB"), (S + 2 * padding, padding))
    return canvas


def passes_quality(qa, min_quality: float) -> bool:
    """The dataset card's filter: a quality_assessment whose three scores are all >= min_quality."""
    if min_quality is None or min_quality <= 0:
        return True
    if not isinstance(qa, dict):
        return False
    try:
        return all(qa.get(k) is not None and float(qa[k]) >= min_quality for k in QUALITY_KEYS)
    except (TypeError, ValueError):
        return False


def _import_pyarrow():
    try:
        import pyarrow.parquet as pq  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            "Reading Subjects200K parquet shards needs pyarrow, which is not installed: `pip install pyarrow`. "
            "Or convert the data once elsewhere with `python -m echogen_core prepare-data` and train on the folder."
        ) from None
    return pq


def _expand_paths(paths, suffix: str, what: str) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Path] = []
    for p in paths:
        p = Path(p).expanduser()
        if p.is_dir():
            found = sorted(p.rglob(f"*{suffix}"))
            if not found:
                raise InputError(f"No {suffix} files in {p} ({what}).")
            out += found
        elif p.is_file():
            out.append(p)
        elif any(ch in str(p) for ch in "*?["):
            found = sorted(Path(f) for f in glob.glob(str(p), recursive=True))
            if not found:
                raise InputError(f"No files match {p} ({what}).")
            out += found
        else:
            raise InputError(f"{what}: {p} does not exist.")
    return out


@dataclass
class _ParquetRecord:
    file: int
    row_group: int
    row: int            # row within the row group
    direction: int      # 0: left view is the target, 1: right view is the target
    caption: str
    words: str
    id: str


class Subjects200KParquet(SampleSource):
    """Subjects200K parquet shards (`image`, `collection`, `quality_assessment`, `description`).

    Only the small metadata columns are read to build the index (lazily, on first use); images are decoded
    when a sample is accessed, one row group cached at a time. Iteration streams the shards in order
    (each composite decoded once, giving both directions), which is the cheap way to convert a shard."""

    META_COLUMNS = ("collection", "quality_assessment", "description")

    def __init__(self, paths, min_quality: float = 5.0, padding: int = SUBJECTS200K_PADDING,
                 both_directions: bool = True, collections: Optional[Sequence[str]] = None,
                 captions: Optional[CaptionPolicy] = None):
        self.pq = _import_pyarrow()
        self.files = _expand_paths(paths, ".parquet", "Subjects200K shards")
        self.min_quality = min_quality
        self.padding = int(padding)
        self.directions = (0, 1) if both_directions else (0,)
        self.collections = set(collections) if collections else None
        self.captions = captions or CaptionPolicy("full")
        self._records: Optional[list[_ParquetRecord]] = None
        self._cache: tuple = (None, None)
        self.kept_rows = self.total_rows = 0

    # -- index ----------------------------------------------------------------------------------------------------
    def _parquet(self, i: int):
        try:
            return self.pq.ParquetFile(str(self.files[i]))
        except Exception as e:  # pyarrow raises several types for damaged files
            raise InputError(f"Cannot read the parquet file {self.files[i]}: {e}") from None

    def _row_ok(self, meta: dict) -> bool:
        if self.collections is not None and meta.get("collection") not in self.collections:
            return False
        return passes_quality(meta.get("quality_assessment"), self.min_quality)

    def _captions_of(self, meta: dict) -> tuple[list[str], str]:
        d = meta.get("description") or {}
        if not isinstance(d, dict):
            d = {}
        return [str(d.get("description_0") or ""), str(d.get("description_1") or "")], str(d.get("item") or "")

    @property
    def records(self) -> list[_ParquetRecord]:
        if self._records is None:
            records, total = [], 0
            for fi, path in enumerate(self.files):
                pf = self._parquet(fi)
                names = set(pf.schema_arrow.names)
                if "image" not in names:
                    raise InputError(f"{path} has no 'image' column (columns: {sorted(names)}); "
                                     "is it a Subjects200K shard?")
                cols = [c for c in self.META_COLUMNS if c in names]
                if self.min_quality and "quality_assessment" not in names:
                    raise InputError(f"{path} has no 'quality_assessment' column, so the quality filter cannot "
                                     "run; pass min_quality=0 (--min-quality 0) to keep every row.")
                for rg in range(pf.num_row_groups):
                    rows = pf.read_row_group(rg, columns=cols).to_pylist() if cols else \
                        [{}] * pf.metadata.row_group(rg).num_rows
                    for r, meta in enumerate(rows):
                        global_row = total + r
                        if not self._row_ok(meta):
                            continue
                        caps, words = self._captions_of(meta)
                        for direction in self.directions:
                            side = "left" if direction == 0 else "right"
                            records.append(_ParquetRecord(fi, rg, r, direction, caps[direction], words,
                                                          f"{path.stem}:{global_row}:{side}"))
                    total += len(rows)
            self._records = records
            self.total_rows = total
            self.kept_rows = len({(r.file, r.row_group, r.row) for r in records})
        return self._records

    def __len__(self) -> int:
        return len(self.records)

    def h_div_w(self, index: int) -> float:
        return 1.0  # square views

    # -- access ---------------------------------------------------------------------------------------------------
    def _images_of_group(self, fi: int, rg: int) -> list:
        if self._cache[0] != (fi, rg):
            col = self._parquet(fi).read_row_group(rg, columns=["image"]).column("image").to_pylist()
            self._cache = ((fi, rg), col)
        return self._cache[1]

    def _composite(self, value, where: str):
        if isinstance(value, dict):  # the datasets library's Image feature: {"bytes": ..., "path": ...}
            data = value.get("bytes")
            if data is None and value.get("path"):
                data = Path(value["path"]).read_bytes()
            value = data
        if not isinstance(value, (bytes, bytearray)):
            raise InputError(f"{where}: the image cell holds {type(value).__name__}, not encoded image bytes.")
        return _open_image(value, where)

    def _sample(self, rec: _ParquetRecord, composite, index: int, epoch: int) -> TrainingSample:
        left, right = split_composite(composite, self.padding)
        target, reference = (left, right) if rec.direction == 0 else (right, left)
        return TrainingSample(id=rec.id, reference=reference, target=target,
                              caption=self.captions(rec.caption, index, epoch), h_div_w=target.size[1] / target.size[0],
                              words=rec.words)

    def get(self, index: int, epoch: int = 0) -> TrainingSample:
        index = self._check(index)
        rec = self.records[index]
        value = self._images_of_group(rec.file, rec.row_group)[rec.row]
        return self._sample(rec, self._composite(value, rec.id), index, epoch)

    def __getitem__(self, index: int) -> TrainingSample:
        return self.get(index)

    def __iter__(self) -> Iterator[TrainingSample]:
        """Stream the shards row group by row group; one decode per kept composite."""
        by_group: dict = {}
        for i, rec in enumerate(self.records):
            by_group.setdefault((rec.file, rec.row_group), []).append((i, rec))
        for (fi, rg), items in by_group.items():
            images = self._parquet(fi).read_row_group(rg, columns=["image"]).column("image").to_pylist()
            decoded: dict = {}
            for i, rec in items:
                if rec.row not in decoded:
                    decoded = {rec.row: self._composite(images[rec.row], rec.id)}
                yield self._sample(rec, decoded[rec.row], i, 0)


@dataclass
class _JsonRecord:
    target: str
    reference: str
    h_div_w: float
    caption: str
    words: str
    id: str
    base: Path


class OfficialJSONL(SampleSource):
    """EchoGen's JSONL layout: one object per line with output_image (target), cond_image (reference,
    normally pre-segmented), h_div_w and long_caption. `path` is a .jsonl file or a folder of them."""

    REQUIRED = ("output_image", "cond_image", "h_div_w", "long_caption")

    def __init__(self, path, captions: Optional[CaptionPolicy] = None, seed: int = 0,
                 short_caption_prob: float = SHORT_CAPTION_PROB):
        self.files = _expand_paths(path, ".jsonl", "EchoGen JSONL")
        self.captions = captions or CaptionPolicy("official", short_caption_prob, seed)
        self.records: list[_JsonRecord] = []
        for f in self.files:
            with open(f, encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        item = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise InputError(f"{f}:{n} is not valid JSON: {e}") from None
                    missing = [k for k in self.REQUIRED if k not in item]
                    if missing:
                        raise InputError(f"{f}:{n} lacks {missing}; each line needs {list(self.REQUIRED)}.")
                    try:
                        h_div_w = float(item["h_div_w"])
                    except (TypeError, ValueError):
                        raise InputError(f"{f}:{n}: h_div_w must be a number, got {item['h_div_w']!r}") from None
                    self.records.append(_JsonRecord(str(item["output_image"]), str(item["cond_image"]), h_div_w,
                                                     str(item["long_caption"]), str(item.get("words", "")),
                                                     f"{f.stem}:{n}", f.parent))

    def __len__(self) -> int:
        return len(self.records)

    def h_div_w(self, index: int) -> float:
        return self.records[self._check(index)].h_div_w

    @staticmethod
    def resolve(path: str, base: Path) -> Path:
        p = Path(path).expanduser()
        if p.is_absolute():
            return p
        for candidate in (base / p, Path.cwd() / p):
            if candidate.exists():
                return candidate
        raise InputError(f"Image {path} not found next to the JSONL ({base / p}) nor in the working directory "
                         f"({Path.cwd() / p}).")

    def get(self, index: int, epoch: int = 0) -> TrainingSample:
        index = self._check(index)
        r = self.records[index]
        target = _open_image(self.resolve(r.target, r.base), f"{r.id} output_image")
        reference = _open_image(self.resolve(r.reference, r.base), f"{r.id} cond_image")
        return TrainingSample(id=r.id, reference=reference, target=target,
                              caption=self.captions(r.caption, index, epoch), h_div_w=r.h_div_w, words=r.words)

    def __getitem__(self, index: int) -> TrainingSample:
        return self.get(index)


class TripletFolder(SampleSource):
    """NAME.ref.<ext> + NAME.target.<ext> + NAME.txt (+ optional NAME.json), see the module docstring."""

    def __init__(self, folder, captions: Optional[CaptionPolicy] = None):
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise InputError(f"{self.folder} is not a folder.")
        self.captions = captions or CaptionPolicy("full")
        refs = {}
        for p in sorted(self.folder.iterdir()):
            m = re.fullmatch(r"(.+)\.ref(\.[A-Za-z]+)", p.name)
            if m and m.group(2).lower() in IMAGE_EXTENSIONS:
                refs[m.group(1)] = p
        if not refs:
            raise InputError(f"No NAME.ref.png (or .jpg/.webp/...) files in {self.folder}; a triplet folder holds "
                             "NAME.ref.<ext>, NAME.target.<ext> and NAME.txt for each training pair.")
        self.items = []
        problems = []
        for name, ref in refs.items():
            targets = [self.folder / f"{name}.target{e}" for e in IMAGE_EXTENSIONS + tuple(x.upper() for x in IMAGE_EXTENSIONS)]
            target = next((t for t in targets if t.is_file()), None)
            caption = self.folder / f"{name}.txt"
            if target is None or not caption.is_file():
                problems.append(f"{name} (missing {'NAME.target.<ext>' if target is None else 'NAME.txt'})")
                continue
            meta_path = self.folder / f"{name}.json"
            meta = {}
            if meta_path.is_file():
                try:
                    meta = json.loads(meta_path.read_text(encoding="utf-8"))
                except json.JSONDecodeError as e:
                    raise InputError(f"{meta_path} is not valid JSON: {e}") from None
            self.items.append((name, ref, target, caption, meta))
        if problems:
            raise InputError(f"Incomplete triplets in {self.folder}: {', '.join(problems[:10])}"
                             + (f" and {len(problems) - 10} more" if len(problems) > 10 else ""))

    def __len__(self) -> int:
        return len(self.items)

    def h_div_w(self, index: int) -> float:
        from PIL import Image

        name, _, target, _, meta = self.items[self._check(index)]
        if "h_div_w" in meta:
            return float(meta["h_div_w"])
        with Image.open(target) as im:  # reads the header only
            return im.size[1] / im.size[0]

    def get(self, index: int, epoch: int = 0) -> TrainingSample:
        index = self._check(index)
        name, ref, target, caption, meta = self.items[index]
        tgt = _open_image(target, str(target))
        text = caption.read_text(encoding="utf-8").strip()
        return TrainingSample(id=name, reference=_open_image(ref, str(ref)), target=tgt,
                              caption=self.captions(text, index, epoch),
                              h_div_w=float(meta.get("h_div_w", tgt.size[1] / tgt.size[0])),
                              words=str(meta.get("words", "")))

    def __getitem__(self, index: int) -> TrainingSample:
        return self.get(index)


class SamplePairs(SampleSource):
    """shared/subjects200k_sample: pair_NN.jpg (left and right 512 x 512 views side by side, no padding) and
    samples.json (instance, description1 for the left view, description2 for the right one)."""

    def __init__(self, folder, both_directions: bool = True, captions: Optional[CaptionPolicy] = None):
        self.folder = Path(folder).expanduser()
        meta = self.folder / "samples.json"
        if not meta.is_file():
            raise InputError(f"{self.folder} has no samples.json; expected the Subjects200K sample folder.")
        try:
            rows = json.loads(meta.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise InputError(f"{meta} is not valid JSON: {e}") from None
        self.captions = captions or CaptionPolicy("full")
        self.items = []
        for row in rows:
            for direction in ((0, 1) if both_directions else (0,)):
                self.items.append((row, direction))

    def __len__(self) -> int:
        return len(self.items)

    def h_div_w(self, index: int) -> float:
        return 1.0

    def get(self, index: int, epoch: int = 0) -> TrainingSample:
        index = self._check(index)
        row, direction = self.items[index]
        pair = _open_image(self.folder / row["image_pair"], row["image_pair"])
        W, H = pair.size
        left, right = pair.crop((0, 0, W // 2, H)), pair.crop((W // 2, 0, W, H))
        target, reference = (left, right) if direction == 0 else (right, left)
        caption = row["description1"] if direction == 0 else row["description2"]
        stem = Path(row["image_pair"]).stem
        return TrainingSample(id=f"{stem}:{'left' if direction == 0 else 'right'}", reference=reference,
                              target=target, caption=self.captions(caption, index, epoch),
                              h_div_w=target.size[1] / target.size[0], words=str(row.get("instance", "")))

    def __getitem__(self, index: int) -> TrainingSample:
        return self.get(index)


SOURCE_KINDS = ("auto", "subjects200k", "jsonl", "triplets", "sample")


def detect_kind(path) -> str:
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix == ".parquet":
            return "subjects200k"
        if p.suffix == ".jsonl":
            return "jsonl"
        raise InputError(f"{p}: cannot tell the data format from the file name (.parquet or .jsonl expected).")
    if not p.is_dir():
        raise InputError(f"Training data {p} does not exist.")
    if (p / "samples.json").is_file():
        return "sample"
    if any(p.glob("*.ref.*")):
        return "triplets"
    if any(p.rglob("*.parquet")):
        return "subjects200k"
    if any(p.rglob("*.jsonl")):
        return "jsonl"
    raise InputError(f"{p}: no parquet shards, JSONL files, NAME.ref.* triplets or samples.json found.")


def open_source(path, kind: str = "auto", min_quality: float = 5.0, caption_mode: Optional[str] = None,
                short_caption_prob: float = SHORT_CAPTION_PROB, seed: int = 0) -> SampleSource:
    """Open training data of any supported layout. caption_mode None = the layout's default
    ('official' for JSONL, 'full' for the others)."""
    kind = detect_kind(path) if kind == "auto" else kind
    default = "official" if kind == "jsonl" else "full"
    captions = CaptionPolicy(caption_mode or default, short_caption_prob, seed)
    if kind == "subjects200k":
        return Subjects200KParquet(path, min_quality=min_quality, captions=captions)
    if kind == "jsonl":
        return OfficialJSONL(path, captions=captions)
    if kind == "triplets":
        return TripletFolder(path, captions=captions)
    if kind == "sample":
        return SamplePairs(path, captions=captions)
    raise InputError(f"Unknown data kind {kind!r}; choose one of {', '.join(SOURCE_KINDS)}.")


# --------------------------------------------------------------------------------------------------------------
# Tensors at a schedule


def cover_crop(image, height: int, width: int) -> torch.Tensor:
    """PIL -> (3, height, width) in [-1, 1]: resized (Lanczos) so it covers the target, then centre-cropped,
    as Infinity's and EchoGen's training transform does (the other side truncated to an integer)."""
    from PIL import Image

    w, h = image.size
    if w / h <= width / height:
        nw, nh = width, max(height, int(width / (w / h)))
    else:
        nw, nh = max(width, int(w / h * height)), height
    image = image.convert("RGB").resize((nw, nh), Image.LANCZOS)
    arr = np.asarray(image, dtype=np.float32)
    top, left = (nh - height) // 2, (nw - width) // 2
    arr = arr[top:top + height, left:left + width]
    return torch.from_numpy(arr / 255.0).permute(2, 0, 1).contiguous() * 2 - 1


def training_schedule(h_div_w: float, size: str = "0.06M", num_scales: Optional[int] = None):
    """The schedule a sample trains at: its nearest aspect template at `size`, optionally only the first
    `num_scales` scales (a smaller image: 16 px per token of the last kept grid)."""
    from dataclasses import replace

    from .schedules import get_schedule, nearest_template

    schedule = get_schedule(nearest_template(h_div_w), size)
    if num_scales is not None:
        if not 1 <= num_scales <= schedule.num_scales:
            raise InputError(f"num_scales must be between 1 and {schedule.num_scales} for size {size}, got {num_scales}")
        schedule = replace(schedule, grids=schedule.grids[:num_scales])
    return schedule


@dataclass
class Batch:
    target: torch.Tensor                   # (B, 3, H, W) in [-1, 1]
    captions: list
    ids: list
    schedule: object                       # ScaleSchedule shared by the batch
    reference: Optional[torch.Tensor] = None  # (B, 3, S, S) in [0, 1]

    def __len__(self) -> int:
        return self.target.shape[0]


class PairDataset(torch.utils.data.Dataset):
    """Map-style dataset of tensors: item `i` (or `(i, epoch)`, which re-draws epoch-dependent captions) ->
    dict(target, reference, caption, id, schedule). `reference_size` None skips the reference (tokenizer
    and text-to-image stages). `ratio` fixes every sample to one aspect template (else each sample uses the
    template nearest its h/w; pair with BucketBatchSampler so a batch shares one)."""

    def __init__(self, source: SampleSource, size: str = "0.06M", num_scales: Optional[int] = None,
                 reference_size: Optional[int] = None, ratio: Optional[float] = None):
        self.source, self.size, self.num_scales = source, size, num_scales
        self.reference_size, self.ratio = reference_size, ratio
        self._schedules: dict = {}
        training_schedule(1.0, size, num_scales)  # validate early

    def __len__(self) -> int:
        return len(self.source)

    def bucket(self, index: int) -> float:
        """The aspect template sample `index` trains at (no image decode for most sources)."""
        from .schedules import nearest_template

        return nearest_template(self.ratio if self.ratio is not None else self.source.h_div_w(index))

    def schedule(self, index: int):
        key = self.bucket(index)
        if key not in self._schedules:
            self._schedules[key] = training_schedule(key, self.size, self.num_scales)
        return self._schedules[key]

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        sample = self.source.get(index, epoch)
        schedule = self.schedule(index)
        item = {"target": cover_crop(sample.target, schedule.height, schedule.width), "caption": sample.caption,
                "id": sample.id, "schedule": schedule, "reference": None}
        if self.reference_size:
            from .subject import center_crop_reference

            item["reference"] = center_crop_reference(sample.reference, self.reference_size)[0]
        return item


def collate(items: Sequence[dict]) -> Batch:
    schedules = {it["schedule"] for it in items}
    if len(schedules) != 1:
        raise InputError(f"A batch mixes {len(schedules)} scale schedules; use BucketBatchSampler (one aspect "
                         "template per batch) or a fixed ratio.")
    refs = [it["reference"] for it in items]
    return Batch(target=torch.stack([it["target"] for it in items]), captions=[it["caption"] for it in items],
                 ids=[it["id"] for it in items], schedule=items[0]["schedule"],
                 reference=None if any(r is None for r in refs) else torch.stack(refs))


class BucketBatchSampler(torch.utils.data.Sampler):
    """Endless, deterministic batches of (index, epoch) pairs, one aspect template per batch.

    Global batch k (size batch_size x world_size) is a pure function of (seed, k): each epoch shuffles the
    samples (torch generator seeded seed + epoch), groups them by template, cuts each group into global
    batches (the last one of a group topped up from the group's start, so small data sets still fill a
    batch) and shuffles the batch order. Rank r takes its slice of every global batch. `start_step` skips
    that many global batches: resuming at step k continues with exactly the batches an uninterrupted run
    would have seen."""

    def __init__(self, dataset: PairDataset, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 start_step: int = 0):
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}")
        if len(dataset) == 0:
            raise InputError("The training data holds no samples (after filtering).")
        self.dataset, self.batch_size = dataset, int(batch_size)
        self.seed, self.rank, self.world_size, self.start_step = int(seed), int(rank), int(world_size), int(start_step)
        self.buckets = [dataset.bucket(i) for i in range(len(dataset))]
        self._epoch_cache: dict = {}

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def epoch_batches(self, epoch: int) -> list:
        if epoch not in self._epoch_cache:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(len(self.buckets), generator=g).tolist()
            groups: dict = {}
            for i in order:
                groups.setdefault(self.buckets[i], []).append(i)
            batches = []
            for key in sorted(groups):
                members = groups[key]
                for start in range(0, len(members), self.global_batch):
                    chunk = members[start:start + self.global_batch]
                    while len(chunk) < self.global_batch:
                        chunk = chunk + members[: self.global_batch - len(chunk)]
                    batches.append(chunk)
            perm = torch.randperm(len(batches), generator=g).tolist()
            self._epoch_cache = {epoch: [batches[j] for j in perm]}
        return self._epoch_cache[epoch]

    def global_batch_at(self, step: int) -> tuple[list, int]:
        """(indices of global batch `step`, its epoch)."""
        epoch, n = 0, len(self.epoch_batches(0))
        while step >= n:  # epochs have the same number of batches, but stay general
            step -= n
            epoch += 1
            n = len(self.epoch_batches(epoch))
        return self.epoch_batches(epoch)[step], epoch

    def batch_at(self, step: int) -> list:
        indices, epoch = self.global_batch_at(step)
        mine = indices[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return [(i, epoch) for i in mine]

    def __iter__(self):
        step = self.start_step
        while True:
            yield self.batch_at(step)
            step += 1

    def __len__(self) -> int:
        return len(self.epoch_batches(0))


# --------------------------------------------------------------------------------------------------------------
# Offline preparation (prepare-data)


def _default_prepare():
    try:
        from .segmentation import prepare_subject
    except ImportError as e:
        raise MissingDependencyError(f"Subject segmentation is not available ({e}); run with --no-segment to "
                                     "copy references unchanged.") from None
    return prepare_subject


def _to_pil(image):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.ndim == 4:
            t = t[0]
        if t.min() < 0:
            t = (t + 1) / 2
        arr = (t.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        return Image.fromarray(arr)
    if isinstance(image, np.ndarray):
        return Image.fromarray(image.astype(np.uint8)).convert("RGB")
    raise InputError(f"prepare_subject returned an image of type {type(image).__name__}")


def _safe_name(sample_id: str, used: set) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", sample_id).strip("._") or "sample"
    base, n = name, 1
    while name in used:
        n += 1
        name = f"{base}_{n}"
    used.add(name)
    return name


def prepare_dataset(source: SampleSource, out_dir, segment: bool = True, method: str = "auto",
                    size: int = 512, words: Optional[str] = None, limit: Optional[int] = None,
                    prepare_fn: Optional[Callable] = None, log: Callable[[str], None] = print,
                    crop: str = "official", **prepare_kwargs) -> dict:
    """Write `source` as a triplet folder in `out_dir` (NAME.ref.png, NAME.target.jpg, NAME.txt, NAME.json)
    plus `splits/<h_div_w>_<count>.jsonl` files in the official layout (paths relative to the JSONL).

    With `segment`, each reference goes through `prepare_fn` (default: echogen_core.segmentation
    .prepare_subject, imported only now) with the sample's subject words (or `words`), `method`,
    `crop` ("official") and `size`, plus `prepare_kwargs` (detector=, refiner=, namer=, salient=, margin=...);
    the written reference is its `.image` and the JSON records `.method`, `.label` and `.message`. The caption written is the sample's full stored caption (dynamic captions are
    drawn again at training time). Existing complete triplets are kept (the run can be resumed)."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / "splits").mkdir(exist_ok=True)
    if segment and prepare_fn is None:
        prepare_fn = _default_prepare()
    # Captions as stored: the policy is re-applied when training reads the prepared data.
    if hasattr(source, "captions"):
        source.captions = CaptionPolicy("full")
    used: set = set()
    buckets: dict = {}
    counts = {"written": 0, "kept": 0, "segmented": 0}
    n = len(source) if limit is None else min(limit, len(source))
    for i in range(n):
        sample = source.get(i)
        name = _safe_name(sample.id, used)
        ref_path, tgt_path = out / f"{name}.ref.png", out / f"{name}.target.jpg"
        txt_path, meta_path = out / f"{name}.txt", out / f"{name}.json"
        if all(p.is_file() for p in (ref_path, tgt_path, txt_path, meta_path)):
            counts["kept"] += 1
        else:
            meta = {"id": sample.id, "h_div_w": sample.h_div_w, "words": sample.words}
            reference = sample.reference
            if segment:
                prepared = prepare_fn(sample.reference, words=words or sample.words or None, method=method,
                                      crop=crop, size=size, **prepare_kwargs)
                reference = _to_pil(prepared.image)
                meta.update({k: getattr(prepared, k) for k in ("method", "label", "message")
                             if isinstance(getattr(prepared, k, None), (str, int, float, bool, type(None)))})
                counts["segmented"] += 1
            atomic_write(ref_path, lambda t, im=reference: im.save(t, format="PNG"))
            atomic_write(tgt_path, lambda t, im=sample.target: im.convert("RGB").save(t, format="JPEG", quality=95))
            atomic_write(txt_path, lambda t, c=sample.caption: Path(t).write_text(c, encoding="utf-8"))
            atomic_write(meta_path, lambda t, m=meta: Path(t).write_text(json.dumps(m, indent=1), encoding="utf-8"))
            counts["written"] += 1
        from .schedules import nearest_template

        buckets.setdefault(nearest_template(sample.h_div_w), []).append(
            {"output_image": f"../{tgt_path.name}", "cond_image": f"../{ref_path.name}", "h_div_w": sample.h_div_w,
             "long_caption": sample.caption, "long_caption_type": "caption_llm", "words": sample.words})
        if (i + 1) % 100 == 0:
            log(f"prepared {i + 1}/{n}")
    for old in (out / "splits").glob("*.jsonl"):
        old.unlink()
    for ratio, rows in sorted(buckets.items()):
        path = out / "splits" / f"{ratio:.3f}_{len(rows):09d}.jsonl"
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        atomic_write(path, lambda t, s=text: Path(t).write_text(s, encoding="utf-8"))
    counts["samples"] = n
    return counts


def add_prepare_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("data", help="Subjects200K parquet file/folder, EchoGen JSONL file/folder, triplet folder, "
                                "or the subjects200k_sample folder")
    p.add_argument("--out", required=True, help="output folder: NAME.ref.png / NAME.target.jpg / NAME.txt / NAME.json "
                                                "triplets and splits/*.jsonl in the official layout")
    p.add_argument("--kind", default="auto", choices=SOURCE_KINDS, help="data layout (auto: detect)")
    p.add_argument("--min-quality", type=float, default=5.0,
                   help="Subjects200K: keep rows whose three quality scores are all >= this (0: keep all)")
    p.add_argument("--no-segment", action="store_true", help="copy references unchanged (no segmentation)")
    p.add_argument("--method", default="auto", help="segmentation method: auto, grounding, salient, mask, none")
    p.add_argument("--crop", default="official", choices=("official", "subject"),
                   help="official: EchoGen's whiten + centre crop; subject: a square around the subject")
    p.add_argument("--grounding-dino", default=None, help="GroundingDINO folder (Hugging Face layout)")
    p.add_argument("--sam", default=None, help="SAM folder: refine GroundingDINO's box into a mask")
    p.add_argument("--namer", default=None, help="Qwen2.5-VL folder: name the subject when the data has no words")
    p.add_argument("--no-salient", action="store_true", help="never fall back to the U2-Net-p saliency model")
    p.add_argument("--device", default="auto", help="device of the segmentation models")
    p.add_argument("--size", type=int, default=512, help="reference crop size (512 for 1024-px models, 256 for 256-px)")
    p.add_argument("--words", default=None, help="subject words for every sample (default: the data's own, e.g. "
                                                  "Subjects200K description.item)")
    p.add_argument("--limit", type=int, default=None, help="prepare only the first N samples")
    return p


def _segmentation_models(args) -> dict:
    """The optional segmentation models named on the command line, loaded now (lazy imports)."""
    kwargs: dict = {}
    if args.no_salient:
        kwargs["salient"] = False
    if not (args.grounding_dino or args.sam or args.namer):
        return kwargs
    from .detectors import GroundingDetector, SamRefiner, SubjectNamer

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.grounding_dino:
        kwargs["detector"] = GroundingDetector.from_folder(args.grounding_dino, device=device)
    if args.sam:
        kwargs["refiner"] = SamRefiner.from_folder(args.sam, device=device)
    if args.namer:
        kwargs["namer"] = SubjectNamer.from_folder(args.namer, device=device)
    return kwargs


def run_prepare(args) -> int:
    source = open_source(args.data, args.kind, min_quality=args.min_quality, caption_mode="full")
    print(f"{type(source).__name__}: {len(source)} samples from {args.data}", file=sys.stderr)
    models = {} if args.no_segment else _segmentation_models(args)
    counts = prepare_dataset(source, args.out, segment=not args.no_segment, method=args.method, size=args.size,
                             words=args.words, limit=args.limit, log=lambda m: print(m, file=sys.stderr),
                             crop=args.crop, **models)
    print(f"wrote {counts['written']} triplets ({counts['segmented']} segmented), kept {counts['kept']} existing, "
          f"in {args.out}")
    return 0
