"""The model-backed parts of subject segmentation: GroundingDINO boxes, SAM masks, Qwen2.5-VL naming.

EchoGen's data pipeline (spec section 2): Qwen2.5-VL names the subject -> the name is GroundingDINO's caption
-> a box -> everything outside the subject is painted white. This module wraps the three Hugging Face models;
``segmentation.py`` composes them. Every model loads from a LOCAL folder in Hugging Face layout
(``from_pretrained(folder, local_files_only=True)``), never from the hub.

Where we deliberately differ from the released code (spec section 0, known defects 2 and 3):
  * the caption is the user's words, lower-cased, with a trailing '.', not one character of the prompt;
  * all boxes above the threshold are returned sorted by score, best first, instead of the first unsorted box.

``transformers`` is imported lazily, only inside the functions that need it; a missing or too old package
raises MissingDependencyError with the pip command. Tested against transformers 5.x; the calls used exist in
recent 4.x too (post-processing threshold argument names and the from_pretrained dtype argument are resolved
at run time).
"""
from __future__ import annotations

import inspect
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .errors import CheckpointError, InputError, MissingDependencyError
from .text_encoder import read_hf_folder_config

__all__ = [
    "Detection",
    "GroundingDetector",
    "SamRefiner",
    "SubjectNamer",
    "format_caption",
    "downscale_to_max_side",
    "box_pixel_mask",
    "clean_subject_name",
    "NAMER_PROMPT",
    "GROUNDING_DINO_HINT",
    "SAM_HINT",
    "QWEN_VL_HINT",
]

GROUNDING_DINO_HINT = ("Download a Hugging Face GroundingDINO repository into one folder: "
                       "IDEA-Research/grounding-dino-tiny (transformers' conversion of groundingdino_swint_ogc.pth, "
                       "the checkpoint EchoGen's pipeline uses; that .pth file itself is not read) or "
                       "IDEA-Research/grounding-dino-base, with config.json, model.safetensors, "
                       "preprocessor_config.json, tokenizer.json / vocab.txt and tokenizer_config.json.")
SAM_HINT = ("Download a Hugging Face SAM repository (facebook/sam-vit-base, -large or -huge) into one folder: "
            "config.json, model.safetensors (or pytorch_model.bin) and preprocessor_config.json.")
QWEN_VL_HINT = ("Download a Hugging Face Qwen2.5-VL Instruct repository (e.g. Qwen/Qwen2.5-VL-3B-Instruct) into one "
                "folder: config.json, the model*.safetensors shards with model.safetensors.index.json, "
                "preprocessor_config.json, tokenizer.json (or vocab.json + merges.txt), tokenizer_config.json and "
                "chat_template.json.")

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
# transformers 4.x writes preprocessor_config.json, 5.x writes processor_config.json; either holds the settings.
_IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
_MIN_TRANSFORMERS = "4.44"


# --------------------------------------------------------------------------------------------------------------
# transformers, imported lazily


def _import_transformers(feature: str):
    try:
        import transformers
    except ImportError as e:
        raise MissingDependencyError(
            f"{feature} needs the 'transformers' package; install it with "
            f"`pip install \"transformers>={_MIN_TRANSFORMERS}\" safetensors`.") from e
    return transformers


def _transformers_class(name: str, feature: str, minimum: str):
    """A class from transformers, or MissingDependencyError saying which version has it."""
    transformers = _import_transformers(feature)
    try:
        return getattr(transformers, name)
    except (AttributeError, ImportError, RuntimeError) as e:   # lazy modules wrap import failures
        raise MissingDependencyError(
            f"{feature} needs transformers.{name}, which this transformers {transformers.__version__} does not "
            f"provide ({type(e).__name__}: {e}); upgrade with `pip install -U \"transformers>={minimum}\"`.") from e


def _version_tuple(version: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _dtype_kwargs(dtype: torch.dtype) -> dict:
    # from_pretrained's `torch_dtype` became `dtype` in transformers 4.56; 5.x warns on the old name.
    import transformers

    key = "dtype" if _version_tuple(transformers.__version__) >= (4, 56) else "torch_dtype"
    return {key: dtype}


def _check_dtype(dtype) -> torch.dtype:
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise InputError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}.")
    return dtype


# --------------------------------------------------------------------------------------------------------------
# Folder checks shared by the three loaders


def _check_model_type(folder: Path, config: dict, expected: Sequence[str], what: str, hint: str,
                      advice: Optional[dict] = None) -> str:
    model_type = config.get("model_type")
    if model_type in expected:
        return model_type
    archs = config.get("architectures")
    extra = (advice or {}).get(model_type, "")
    raise CheckpointError(
        f"{folder} is not a {what} folder: its config.json has model_type={model_type!r} "
        f"(architectures={archs!r}); a {what} folder has model_type {' or '.join(map(repr, expected))}. "
        f"{extra}{hint}")


def _check_files(folder: Path, what: str, hint: str, groups: Sequence[tuple[str, Sequence[str]]]) -> None:
    """Each group: (description, names); at least one of the names must be a file in the folder."""
    for description, names in groups:
        if not any((folder / n).is_file() for n in names):
            present = sorted(p.name for p in folder.iterdir())[:20]
            raise CheckpointError(
                f"{what} folder {folder} has no {description}: expected {' or '.join(names)}; found {present}. "
                f"{hint}")


def _load_model(cls, folder: Path, dtype: torch.dtype, what: str, hint: str):
    try:
        model, info = cls.from_pretrained(str(folder), local_files_only=True, output_loading_info=True,
                                          **_dtype_kwargs(dtype))
    except Exception as e:  # noqa: BLE001 - re-raised with the folder named
        raise CheckpointError(f"Cannot load the {what} weights from {folder} ({type(e).__name__}: {e}). "
                              f"{hint}") from e
    # from_pretrained fills absent weights with random values and only logs it: refuse instead.
    missing = sorted(info.get("missing_keys", ()))
    if missing:
        raise CheckpointError(
            f"The {what} weights in {folder} lack {len(missing)} tensor(s), e.g. {missing[:5]}: the download is "
            f"incomplete or the weights belong to another model. {hint}")
    return model.eval().requires_grad_(False)


def _check_image(image, who: str):
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise InputError(f"{who} expects a PIL image, got {type(image).__name__}.")
    if image.width < 1 or image.height < 1:
        raise InputError(f"{who} got an empty image ({image.width}x{image.height}).")
    return image.convert("RGB")


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _to_model(batch: dict, model) -> dict:
    """Inputs on the model's device; floating tensors in the model's dtype, integer ones untouched."""
    device, dtype = _model_device(model), model.dtype
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
        out[k] = v
    return out


# --------------------------------------------------------------------------------------------------------------
# Geometry helpers (also used by segmentation.py)


def format_caption(words: str) -> str:
    """GroundingDINO's caption convention: lower-case, stripped, ending with '.' ('Red Backpack' -> 'red backpack.')."""
    if not isinstance(words, str):
        raise InputError(f"The subject words must be a string, got {type(words).__name__}.")
    caption = " ".join(words.split()).lower()
    if not caption.strip(" ."):
        raise InputError("The subject words are empty: give the subject's name, e.g. 'dog' or 'red backpack'.")
    return caption if caption.endswith(".") else caption + "."


def downscale_to_max_side(image, max_side: int):
    """The image shrunk (Lanczos) so that its longer side is at most max_side; returned unchanged if it fits."""
    from PIL import Image

    if int(max_side) < 1:
        raise InputError(f"max_side must be a positive number of pixels, got {max_side}.")
    w, h = image.size
    if max(w, h) <= max_side:
        return image
    scale = max_side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return image.resize(size, Image.LANCZOS)


def _check_box(box, width: int, height: int) -> tuple[float, float, float, float]:
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise InputError(f"A box is four numbers (x0, y0, x1, y1) in pixels, got {box!r}.") from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise InputError(f"The box {box!r} has a non-finite coordinate.")
    cx0, cy0 = min(max(x0, 0.0), width), min(max(y0, 0.0), height)
    cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
    if cx1 <= cx0 or cy1 <= cy0:
        raise InputError(f"The box {(x0, y0, x1, y1)} is empty inside the {width}x{height} image "
                         "(it needs x1 > x0 and y1 > y0 and must overlap the image).")
    return cx0, cy0, cx1, cy1


def box_pixel_mask(box, width: int, height: int) -> np.ndarray:
    """bool (height, width): True on every pixel the box touches. Pixel (row i, column j) covers
    [j, j+1) x [i, i+1), so columns floor(x0) .. ceil(x1) - 1 and rows floor(y0) .. ceil(y1) - 1 are inside."""
    x0, y0, x1, y1 = _check_box(box, width, height)
    mask = np.zeros((height, width), dtype=bool)
    mask[int(math.floor(y0)):int(math.ceil(y1)), int(math.floor(x0)):int(math.ceil(x1))] = True
    return mask


# --------------------------------------------------------------------------------------------------------------
# GroundingDINO


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]   # x0, y0, x1, y1 in pixels of the image passed to detect()
    score: float
    label: str


def _post_process_detection(processor, outputs, input_ids, box_threshold: float, text_threshold: float,
                            target_size: tuple[int, int]) -> dict:
    """transformers' own GroundingDINO post-processing, whichever name its box threshold has: `box_threshold`
    up to 4.50, `threshold` from 4.51 (the old name is gone in 5.x)."""
    fn = processor.post_process_grounded_object_detection
    params = inspect.signature(fn).parameters
    if "threshold" in params:
        kw = {"threshold": box_threshold}
    elif "box_threshold" in params:
        kw = {"box_threshold": box_threshold}
    else:  # pragma: no cover - an unknown future signature
        raise MissingDependencyError(
            "This transformers' GroundingDinoProcessor.post_process_grounded_object_detection takes neither "
            f"`threshold` nor `box_threshold` (parameters: {list(params)}); install a supported version with "
            f"`pip install \"transformers>={_MIN_TRANSFORMERS}\"`.")
    return fn(outputs, input_ids=input_ids, text_threshold=text_threshold, target_sizes=[target_size], **kw)[0]


class GroundingDetector:
    """GroundingDINO (Hugging Face GroundingDinoForObjectDetection + GroundingDinoProcessor) from a local folder."""

    def __init__(self, model, processor, folder: Optional[Path] = None):
        self.model = model
        self.processor = processor
        self.folder = folder

    @classmethod
    def from_folder(cls, path, device="cpu", dtype=torch.float32) -> "GroundingDetector":
        what, hint = "GroundingDINO", GROUNDING_DINO_HINT
        folder, config = read_hf_folder_config(path, what, hint)
        _check_model_type(folder, config, ("grounding-dino",), what, hint, advice={
            "mm-grounding-dino": "MM-GroundingDINO is a different model; EchoGen's pipeline uses GroundingDINO. ",
            "owlv2": "OWLv2 is a different detector; EchoGen's pipeline uses GroundingDINO. "})
        _check_files(folder, what, hint, [("weights", _WEIGHT_FILES),
                                          ("image processor settings", _IMAGE_PROCESSOR_FILES),
                                          ("tokenizer (GroundingDINO's text encoder is BERT)",
                                           ("tokenizer.json", "vocab.txt"))])
        dtype = _check_dtype(dtype)
        feature = "GroundingDINO detection"
        model_cls = _transformers_class("GroundingDinoForObjectDetection", feature, "4.44")
        processor_cls = _transformers_class("GroundingDinoProcessor", feature, "4.44")
        try:
            processor = processor_cls.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"Cannot load the GroundingDINO processor (image processor + BERT tokenizer) "
                                  f"from {folder} ({type(e).__name__}: {e}). {hint}") from e
        model = _load_model(model_cls, folder, dtype, what, hint).to(device)
        return cls(model, processor, folder)

    @torch.no_grad()
    def detect(self, image, words: str, box_threshold: float = 0.35, text_threshold: float = 0.25,
               max_side: int = 1333) -> list[Detection]:
        """All boxes above the thresholds, sorted by score, best first (the official code takes the first
        unsorted box and passes one character of the prompt as caption: we use the user's words, lower-cased,
        with a trailing '.', as GroundingDINO expects). Images larger than max_side on the longer side are
        downscaled for detection only; boxes are returned in the ORIGINAL image's pixel coordinates, clipped."""
        image = _check_image(image, "GroundingDetector.detect")
        caption = format_caption(words)
        width, height = image.size
        small = downscale_to_max_side(image, max_side)
        batch = self.processor(images=small, text=caption, return_tensors="pt")
        outputs = self.model(**_to_model(dict(batch), self.model))
        # Post-process in fp32: bf16 boxes times a 1333-px size would be off by up to 4 px.
        outputs.logits, outputs.pred_boxes = outputs.logits.float(), outputs.pred_boxes.float()
        # pred_boxes are relative to the image, so scaling them by the ORIGINAL size undoes the downscale.
        result = _post_process_detection(self.processor, outputs, batch["input_ids"].to(outputs.logits.device),
                                         float(box_threshold), float(text_threshold), (height, width))
        labels = result["text_labels"] if "text_labels" in result else result["labels"]
        special = set(getattr(self.processor.tokenizer, "all_special_tokens", ()))
        found = []
        for box, score, label in zip(result["boxes"].float().cpu().tolist(),
                                     result["scores"].float().cpu().tolist(), labels):
            x0, x1 = (min(max(v, 0.0), float(width)) for v in (box[0], box[2]))
            y0, y1 = (min(max(v, 0.0), float(height)) for v in (box[1], box[3]))
            if x1 <= x0 or y1 <= y0:      # nothing left inside the image
                continue
            # The post-processing decodes [SEP] and '.' when they pass text_threshold; keep only words.
            words_only = " ".join(t for t in str(label).split() if t not in special).strip(" .")
            found.append(Detection((x0, y0, x1, y1), float(score), words_only))
        found.sort(key=lambda d: d.score, reverse=True)   # stable: equal scores keep the model's order
        return found


# --------------------------------------------------------------------------------------------------------------
# SAM


class SamRefiner:
    """SAM (Hugging Face SamModel + SamProcessor) from a local folder, prompted with one box."""

    def __init__(self, model, processor, folder: Optional[Path] = None):
        self.model = model
        self.processor = processor
        self.folder = folder

    @classmethod
    def from_folder(cls, path, device="cpu", dtype=torch.float32) -> "SamRefiner":
        what, hint = "SAM", SAM_HINT
        folder, config = read_hf_folder_config(path, what, hint)
        _check_model_type(folder, config, ("sam",), what, hint, advice={
            "sam2": "SAM 2 folders are not supported; use the original SAM. ",
            "sam_hq": "SAM-HQ folders are not supported; use the original SAM. "})
        _check_files(folder, what, hint, [("weights", _WEIGHT_FILES),
                                          ("image processor settings", _IMAGE_PROCESSOR_FILES)])
        dtype = _check_dtype(dtype)
        feature = "SAM mask refinement"
        model_cls = _transformers_class("SamModel", feature, "4.44")
        processor_cls = _transformers_class("SamProcessor", feature, "4.44")
        try:
            processor = processor_cls.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"Cannot load the SAM processor from {folder} ({type(e).__name__}: {e}). "
                                  f"{hint}") from e
        model = _load_model(model_cls, folder, dtype, what, hint).to(device)
        return cls(model, processor, folder)

    @torch.no_grad()
    def refine(self, image, box) -> np.ndarray:
        """Mask of the subject inside the box (SAM prompted with the box, best of the multimask outputs by
        predicted IoU); pixels outside the box are always False. bool (H, W) at the image's size."""
        image = _check_image(image, "SamRefiner.refine")
        width, height = image.size
        inside = box_pixel_mask(box, width, height)
        x0, y0, x1, y1 = _check_box(box, width, height)
        batch = self.processor(images=image, input_boxes=[[[x0, y0, x1, y1]]], return_tensors="pt")
        inputs = _to_model({"pixel_values": batch["pixel_values"], "input_boxes": batch["input_boxes"]}, self.model)
        outputs = self.model(**inputs, multimask_output=True)
        # pred_masks (1, 1, 3, h, w) low-res logits, iou_scores (1, 1, 3): keep the best before upsampling,
        # so only one mask is brought to full resolution.
        best = int(outputs.iou_scores[0, 0].float().argmax())
        low_res = outputs.pred_masks[:, :, best:best + 1].float().cpu()
        full = self.processor.image_processor.post_process_masks(
            low_res, batch["original_sizes"].cpu(), batch["reshaped_input_sizes"].cpu())[0]
        mask = full[0, 0].numpy().astype(bool)
        if mask.shape != (height, width):  # pragma: no cover - transformers contract
            raise RuntimeError(f"SAM post-processing returned a {mask.shape} mask for a {width}x{height} image.")
        return mask & inside


# --------------------------------------------------------------------------------------------------------------
# Qwen2.5-VL


NAMER_PROMPT = ("What is the main subject of this image? Answer with its category only, as a short noun phrase "
                "of one to three words such as 'dog', 'cat' or 'red backpack'. Do not write a sentence.")

# The Qwen2.5-VL Instruct chat format, used when a folder ships no chat template (the released template
# renders exactly this for one user turn holding an image and a text).
_QWEN_FALLBACK_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

_ARTICLES = {"a", "an", "the"}
# Lead-ins a VLM puts before the noun ("The subject is a dog", "It's a cat", "Answer: dog"), applied repeatedly.
_LEAD_IN = re.compile(
    r"^(?:(?:final\s+)?(?:answer|subject|category|main subject|object|noun)\s*[:\-]\s*"
    r"|(?:the\s+)?(?:main\s+)?(?:subject|object|category)(?:\s+(?:of|in)\s+(?:this|the)\s+(?:image|photo|picture))?"
    r"\s+(?:is|are)\s+"
    r"|(?:it|this|that)\s*(?:is|'s)\s+"
    r"|(?:this|the)\s+(?:image|photo|picture)\s+(?:shows|contains|depicts|features)\s+"
    r"|(?:an?|the)\s+(?:photo|picture|image|close-up)\s+of\s+)")
# Context after the noun phrase ("dog sitting on grass" -> "dog"); 'of' stays ("cup of coffee").
_TAIL = re.compile(r"\s(?:with|on|in|at|near|next|against|beside|sitting|standing|lying|holding|wearing|that|"
                   r"which|who|from|under|over|by)\b.*$")
MAX_NAME_WORDS = 4


def clean_subject_name(text: str) -> str:
    """A VLM's answer -> a short lower-case noun phrase: first line, lead-ins such as 'The subject is'
    dropped, first clause only, trailing context ('sitting on ...') cut, punctuation and articles removed,
    at most the last MAX_NAME_WORDS words. 'A red backpack.' -> 'red backpack'; 'The subject is a dog' -> 'dog'."""
    if not isinstance(text, str):
        return ""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    s = lines[0].lower() if lines else ""
    s = s.replace("\u2019", "'")
    s = re.sub(r"[*_`\"\u201c\u201d]", " ", s)        # markdown emphasis and quotes
    s = " ".join(s.split())
    while True:
        stripped = _LEAD_IN.sub("", s, count=1).strip()
        if stripped == s:
            break
        s = stripped
    s = re.split(r"[,;:.!?()\[\]]", s, maxsplit=1)[0]    # first clause
    s = _TAIL.sub("", " " + s).strip()
    s = re.sub(r"[^a-z0-9\-' ]+", " ", s)              # any other punctuation
    words = [w.strip("-'") for w in s.split()]
    words = [w for w in words if w and w not in _ARTICLES]
    return " ".join(words[-MAX_NAME_WORDS:])     # English noun phrases end with their head noun


def _chat_template_of(folder: Path, tokenizer) -> tuple[str, str]:
    """(template, where it came from): the folder's processor template, then the tokenizer's, then ours."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8"), str(jinja)
    js = folder / "chat_template.json"
    if js.is_file():
        try:
            tmpl = json.loads(js.read_text(encoding="utf-8")).get("chat_template")
        except (OSError, ValueError, AttributeError) as e:
            raise CheckpointError(f"Cannot read {js} as a JSON object with a 'chat_template' string ({e}). "
                                  f"{QWEN_VL_HINT}") from None
        if isinstance(tmpl, str) and tmpl:
            return tmpl, str(js)
    tmpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tmpl, str) and tmpl:
        return tmpl, "tokenizer_config.json"
    return _QWEN_FALLBACK_TEMPLATE, "built-in Qwen2.5-VL chat format"


class SubjectNamer:
    """Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration) asked for the subject's category noun.

    The inputs are built from the image processor, the tokenizer and the chat template directly, as
    Qwen2_5_VLProcessor does, because transformers 5.x cannot build that processor without its video
    processor, which needs torchvision (not installed everywhere, e.g. in this project's CI).
    """

    image_token = "<|image_pad|>"

    def __init__(self, model, tokenizer, image_processor, chat_template: str, folder: Optional[Path] = None,
                 max_pixels: int = 512 * 28 * 28, max_new_tokens: int = 24):
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template
        self.folder = folder
        self.max_pixels = int(max_pixels)       # naming needs no detail: cap the visual tokens (~512)
        self.max_new_tokens = int(max_new_tokens)
        self.last_answer: Optional[str] = None   # the raw answer of the latest name() call, for messages
        self._check_tokens()

    def _check_tokens(self) -> None:
        cfg = self.model.config
        image_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        if image_id != cfg.image_token_id:
            raise CheckpointError(
                f"The tokenizer in {self.folder} maps {self.image_token} to {image_id} but the model expects "
                f"{cfg.image_token_id}: the tokenizer files and the weights do not belong together. {QWEN_VL_HINT}")
        merge = getattr(self.image_processor, "merge_size", None)
        model_merge = getattr(getattr(cfg, "vision_config", None), "spatial_merge_size", merge)
        if merge is None or merge != model_merge:
            raise CheckpointError(
                f"The image processor in {self.folder} merges {merge}x{merge} patches but the vision tower "
                f"merges {model_merge}x{model_merge}; they do not belong together. {QWEN_VL_HINT}")

    @classmethod
    def from_folder(cls, path, device="cpu", dtype=torch.float32) -> "SubjectNamer":
        what, hint = "Qwen2.5-VL", QWEN_VL_HINT
        folder, config = read_hf_folder_config(path, what, hint)
        _check_model_type(folder, config, ("qwen2_5_vl",), what, hint, advice={
            "qwen2_vl": "This is Qwen2-VL (the previous generation); use a Qwen2.5-VL folder. ",
            "qwen3_vl": "Qwen3-VL is not supported yet; use a Qwen2.5-VL folder. "})
        _check_files(folder, what, hint, [("weights", _WEIGHT_FILES),
                                          ("image processor settings", _IMAGE_PROCESSOR_FILES),
                                          ("tokenizer", ("tokenizer.json", "vocab.json")),
                                          ("tokenizer settings", ("tokenizer_config.json",))])
        if not (folder / "tokenizer.json").is_file() and not (folder / "merges.txt").is_file():
            raise CheckpointError(f"Qwen2.5-VL folder {folder} has vocab.json but no merges.txt (or tokenizer.json). "
                                  f"{hint}")
        dtype = _check_dtype(dtype)
        feature = "Naming the subject with Qwen2.5-VL"
        model_cls = _transformers_class("Qwen2_5_VLForConditionalGeneration", feature, "4.49")
        auto_tokenizer = _transformers_class("AutoTokenizer", feature, "4.49")
        auto_image = _transformers_class("AutoImageProcessor", feature, "4.49")
        try:
            tokenizer = auto_tokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"Cannot load the Qwen2.5-VL tokenizer from {folder} ({type(e).__name__}: {e}). "
                                  f"{hint}") from e
        try:
            image_processor = auto_image.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"Cannot load the Qwen2.5-VL image processor from {folder} "
                                  f"({type(e).__name__}: {e}). {hint}") from e
        template, _ = _chat_template_of(folder, tokenizer)
        model = _load_model(model_cls, folder, dtype, what, hint).to(device)
        return cls(model, tokenizer, image_processor, template, folder)

    # ---- prompt -----------------------------------------------------------------------------------

    @staticmethod
    def messages(prompt: str = NAMER_PROMPT) -> list[dict]:
        """One user turn: the image, then the question."""
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]

    def chat_text(self, prompt: str = NAMER_PROMPT) -> str:
        """The rendered conversation with one image placeholder and the assistant turn opened."""
        text = self.tokenizer.apply_chat_template(self.messages(prompt), chat_template=self.chat_template,
                                                  tokenize=False, add_generation_prompt=True)
        if not isinstance(text, str) or text.count(self.image_token) != 1:
            raise CheckpointError(f"The chat template of {self.folder} does not place exactly one "
                                  f"{self.image_token} for an image; it is not a Qwen2.5-VL template. {QWEN_VL_HINT}")
        return text

    def build_inputs(self, image, prompt: str = NAMER_PROMPT) -> dict:
        """Model inputs as Qwen2_5_VLProcessor makes them: the image placeholder expanded to one token per
        merged patch group (grid t*h*w / merge^2), and, where the model takes them (transformers 5.x),
        mm_token_type_ids marking those tokens (1) so that the 3-D rotary positions are computed."""
        image = _check_image(image, "SubjectNamer")
        w, h = image.size
        if w * h > self.max_pixels:
            from PIL import Image

            scale = math.sqrt(self.max_pixels / (w * h))
            image = image.resize((max(28, round(w * scale)), max(28, round(h * scale))), Image.LANCZOS)
        vision = self.image_processor(images=[image], return_tensors="pt")
        grid = vision["image_grid_thw"]
        n_tokens = int(grid[0].prod()) // (self.image_processor.merge_size ** 2)
        text = self.chat_text(prompt).replace(self.image_token, self.image_token * n_tokens)
        enc = self.tokenizer(text, return_tensors="pt")
        inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                  "pixel_values": vision["pixel_values"], "image_grid_thw": grid}
        if "mm_token_type_ids" in inspect.signature(self.model.forward).parameters:
            inputs["mm_token_type_ids"] = (enc["input_ids"] == self.model.config.image_token_id).to(torch.int32)
        return inputs

    def _generation_config(self):
        from transformers import GenerationConfig

        # Greedy, whatever the folder's sampling defaults are: the same photo always gets the same name.
        base = getattr(self.model, "generation_config", None)
        eos = getattr(base, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        pad = getattr(base, "pad_token_id", None)
        if pad is None:
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
            pad = pad[0] if isinstance(pad, (list, tuple)) else pad
        # Sampling knobs at their neutral values: transformers 5.x fills unset (None) ones from the folder's
        # config and then warns that they are ignored by greedy decoding. The repetition penalty is kept.
        return GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1,
                                temperature=1.0, top_p=1.0, top_k=50,
                                repetition_penalty=getattr(base, "repetition_penalty", None) or 1.0,
                                eos_token_id=eos, pad_token_id=pad)

    @torch.no_grad()
    def answer(self, image, prompt: str = NAMER_PROMPT) -> str:
        """The model's raw answer (special tokens removed)."""
        inputs = _to_model(self.build_inputs(image, prompt), self.model)
        out = self.model.generate(**inputs, generation_config=self._generation_config())
        new = out[:, inputs["input_ids"].shape[1]:]
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)[0]

    def name(self, image) -> str:
        """Qwen2.5-VL asked for the main subject's short category noun (e.g. 'dog', 'red backpack');
        the answer cleaned to a short lower-case noun phrase (at most ~4 words, no punctuation/articles);
        raises InputError if the answer is empty after cleaning."""
        raw = self.answer(image)
        self.last_answer = raw
        name = clean_subject_name(raw)
        if not name:
            raise InputError(f"Qwen2.5-VL gave no usable subject name (its answer was {raw!r}); type the "
                             "subject's name yourself, e.g. 'dog' or 'red backpack'.")
        return name
