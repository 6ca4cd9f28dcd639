"""Subject nodes: isolate the subject, then encode it along EchoGen's two paths."""
from __future__ import annotations

import numpy as np
import torch

from . import comfy_bridge as bridge
from .comfy_bridge import log
from . import handles as H
from ._core import InputError, core_module, subject as core_subject

SEGMENT_METHODS = ["auto", "grounding", "salient", "mask", "none"]
CROP_MODES = ["official", "subject"]


def image_to_pils(image: torch.Tensor) -> list:
    """ComfyUI IMAGE (B, H, W, C) in [0, 1] -> PIL RGB images."""
    from PIL import Image

    if not isinstance(image, torch.Tensor) or image.dim() not in (3, 4):
        raise InputError(f"Expected an IMAGE (batch, height, width, channels), got "
                         f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}.")
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.shape[-1] not in (1, 3, 4):
        raise InputError(f"Expected 1, 3 or 4 channels in the last dimension, got shape {tuple(image.shape)}.")
    arrays = (image[..., :3].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    if arrays.shape[-1] == 1:
        arrays = np.repeat(arrays, 3, axis=-1)
    return [Image.fromarray(a) for a in arrays]


def pils_to_image(images) -> torch.Tensor:
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
    return torch.from_numpy(np.stack(arrays)).to(bridge.intermediate_device())


def masks_to_tensor(masks) -> torch.Tensor:
    arrays = [np.asarray(m.convert("L"), dtype=np.float32) / 255.0 for m in masks]
    return torch.from_numpy(np.stack(arrays)).to(bridge.intermediate_device())


def mask_to_pils(mask: torch.Tensor, count: int) -> list:
    """ComfyUI MASK (B, H, W) or (H, W), 1 = subject -> one PIL 'L' per image (a single mask is shared)."""
    from PIL import Image

    m = mask.reshape(-1, *mask.shape[-2:]).clamp(0, 1)
    if m.shape[0] not in (1, count):
        raise InputError(f"Got {m.shape[0]} masks for {count} images; give one mask or one per image.")
    pils = [Image.fromarray((x * 255).round().to(torch.uint8).cpu().numpy(), mode="L") for x in m]
    return pils * count if len(pils) == 1 else pils


class EchoGenSubjectSegmenter:
    DESCRIPTION = ("Isolates the subject of a reference photo on pure white and crops it the way EchoGen expects. "
                   "Uses your mask if given, else GroundingDINO (+SAM) from the segmenter, else a small salient-object "
                   "model, and says which ran.")
    CATEGORY = "EchoGen/subject"
    RETURN_TYPES = ("IMAGE", "MASK", "STRING")
    RETURN_NAMES = ("prepared_image", "mask", "label")
    OUTPUT_TOOLTIPS = ("The subject on white, square, at `size` pixels.", "The subject mask of the prepared image.",
                       "The subject's name as used (your words or the namer's), then the method that ran.")
    FUNCTION = "segment"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "Reference photo(s) of the subject; a batch is prepared image by image."}),
                "method": (SEGMENT_METHODS, {
                    "default": "auto",
                    "tooltip": "auto: your mask, else grounding (needs the segmenter and words or a namer), else "
                               "salient, else the image's alpha. none: keep the photo as it is."}),
                "subject_words": ("STRING", {"default": "", "tooltip": "What the subject is, e.g. 'dog' or 'red "
                                                                       "backpack' (the detector's query)."}),
                "crop": (CROP_MODES, {
                    "default": "official",
                    "tooltip": "official: whiten outside the subject, then centre crop (as EchoGen was trained). "
                               "subject: a square around the subject with a margin that never cuts it off."}),
                "size": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 8,
                                 "tooltip": "Side of the prepared square (512 for EchoGen-2B, 256 for the 256-px model)."}),
            },
            "optional": {
                "segmenter": (H.SEGMENTER, {"tooltip": "GroundingDINO / SAM / Qwen2.5-VL from the segmenter loader."}),
                "mask": ("MASK", {"tooltip": "Your own subject mask (1 = subject); always wins over detection."}),
                "box_threshold": ("FLOAT", {"default": 0.35, "min": 0.0, "max": 1.0, "step": 0.01,
                                            "tooltip": "GroundingDINO: minimum box score."}),
                "text_threshold": ("FLOAT", {"default": 0.25, "min": 0.0, "max": 1.0, "step": 0.01,
                                             "tooltip": "GroundingDINO: minimum score of the words matched to a box."}),
            },
        }

    def segment(self, image, method="auto", subject_words="", crop="official", size=512, segmenter=None, mask=None,
                box_threshold=0.35, text_threshold=0.25):
        segmentation = core_module("segmentation")
        pils = image_to_pils(image)
        masks = mask_to_pils(mask, len(pils)) if mask is not None else [None] * len(pils)
        seg = segmenter or H.SegmenterHandle()
        parts = {k: (getattr(seg, k).get() if getattr(seg, k) is not None else None)
                 for k in ("detector", "refiner", "namer")}
        words = subject_words.strip() or None
        results = []
        for i, (pil, m) in enumerate(zip(pils, masks)):
            bridge.check_interrupt()
            results.append(segmentation.prepare_subject(
                pil, words=words, method="mask" if m is not None and method == "auto" else method, mask=m, crop=crop,
                size=size, box_threshold=box_threshold, text_threshold=text_threshold, **parts))
        for part in (seg.detector, seg.refiner, seg.namer):
            if part is not None:
                part.offload()
        label = "; ".join(f"{r.label} ({r.method})" for r in results)
        for r in results:
            log.info(f"EchoGen subject: {r.message}")
        return {"ui": {"text": [label]},
                "result": (pils_to_image([r.image for r in results]), masks_to_tensor([r.mask for r in results]), label)}


class EchoGenSemanticEncode:
    DESCRIPTION = ("EchoGen's semantic (identity) path: DINOv2 tokens of the prepared reference, at the geometry the "
                   "model was trained with (512 crop seen at 448 px for EchoGen-2B).")
    CATEGORY = "EchoGen/subject"
    RETURN_TYPES = (H.SUBJECT,)
    RETURN_NAMES = ("subject",)
    OUTPUT_TOOLTIPS = ("Subject features (semantic part); add the content part with EchoGen Content Encode.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (H.MODEL, {"tooltip": "The EchoGen model the subject is for (sets the reference geometry)."}),
            "semantic_encoder": (H.SEMANTIC_ENCODER, {"tooltip": "DINOv2 ViT-B/14 from the semantic encoder loader."}),
            "image": ("IMAGE", {"tooltip": "The prepared reference (subject on white), one per image or one for all."}),
        }}

    def encode(self, model, semantic_encoder, image):
        if not model.is_echogen:
            raise InputError(f"{model.name} is a plain Infinity model; subject features need an EchoGen model.")
        cfg = model.cfg
        crop, dino_size = core_subject.reference_geometry(cfg)
        refs = _crop_references(image, crop)
        dinov2 = semantic_encoder.get()
        with torch.no_grad():
            semantic = dinov2.encode(refs.to(dinov2.device), size=dino_size).float().cpu()
        semantic_encoder.offload()
        want = (cfg.semantic_len, cfg.semantic_dim)
        if tuple(semantic.shape[1:]) != want:
            raise InputError(f"The semantic encoder gives features {tuple(semantic.shape[1:])} but {model.name} expects "
                             f"{want}: load DINOv2 ViT-B/14 (no registers), the encoder EchoGen was trained with.")
        return (H.SubjectHandle(crop=crop, semantic=semantic, expects=_expects(cfg)),)


class EchoGenContentEncode:
    DESCRIPTION = ("EchoGen's content (detail) path: the FLUX.1 VAE latent of the same reference, as tokens. Takes our "
                   "content encoder or ComfyUI's own Load VAE output (a FLUX.1 ae.safetensors).")
    CATEGORY = "EchoGen/subject"
    RETURN_TYPES = (H.SUBJECT,)
    RETURN_NAMES = ("subject",)
    OUTPUT_TOOLTIPS = ("Complete subject features, ready for the sampler.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "subject": (H.SUBJECT, {"tooltip": "From EchoGen Semantic Encode (fixes the crop and the model)."}),
                "image": ("IMAGE", {"tooltip": "The same prepared reference given to the semantic encoder."}),
            },
            "optional": {
                "content_encoder": (H.CONTENT_ENCODER, {"tooltip": "From the EchoGen content encoder loader."}),
                "vae": ("VAE", {"tooltip": "Or ComfyUI's Load VAE with the FLUX.1 ae.safetensors."}),
            },
        }

    def encode(self, subject, image, content_encoder=None, vae=None):
        if (content_encoder is None) == (vae is None):
            raise InputError("Connect exactly one of content_encoder (EchoGen loader) or vae (ComfyUI Load VAE with "
                             "the FLUX.1 ae.safetensors).")
        refs = _crop_references(image, subject.crop)
        if subject.semantic is not None and subject.semantic.shape[0] != refs.shape[0]:
            raise InputError(f"The semantic features hold {subject.semantic.shape[0]} references but this image batch "
                             f"has {refs.shape[0]}; encode the same images on both paths.")
        if content_encoder is not None:
            encoder = content_encoder.get()
            with torch.no_grad():
                content = encoder.content_tokens(refs.to(encoder.device)).float().cpu()
            content_encoder.offload()
        else:  # ComfyUI's VAE: IMAGE in, raw posterior mean out (no scale/shift), as EchoGen reads it
            latent = vae.encode(refs.permute(0, 2, 3, 1))
            content = core_module("flux_vae").latent_to_content_tokens(latent.float().cpu())
        want = subject.expects[2:]
        if want and tuple(content.shape[1:]) != tuple(want):
            raise InputError(f"The content encoder gives tokens {tuple(content.shape[1:])} but the model expects "
                             f"{tuple(want)}: it must be the 16-channel FLUX.1 VAE.")
        return (H.SubjectHandle(crop=subject.crop, semantic=subject.semantic, content=content, expects=subject.expects),)


def _expects(cfg) -> tuple:
    return (cfg.semantic_len, cfg.semantic_dim, cfg.content_len, cfg.content_dim)


def _crop_references(image, crop: int) -> torch.Tensor:
    """IMAGE -> (B, 3, crop, crop) in [0, 1], via the core's shared reference crop."""
    return torch.cat([core_subject.center_crop_reference(p, crop) for p in image_to_pils(image)])
