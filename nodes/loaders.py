"""Loader nodes: every model file the pack uses, from ComfyUI's model folders, strictly checked."""
from __future__ import annotations

import torch

from . import comfy_bridge as bridge
from . import handles as H
from ._core import InputError, checkpoint, core_module

PRECISIONS = ["auto", "bf16", "fp16", "fp32"]
# The small model shipped inside the pack (trained on a procedural world; runs in seconds on a CPU). Always
# offered, so a workflow using it loads on every install; the only entry when no other file is installed.
BUNDLED = "bundled: echogen-world-tiny"
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NONE = "none"


def _dtype(precision: str, default=None):
    if precision not in PRECISIONS:
        raise InputError(f"Unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}.")
    return _DTYPES.get(precision, default)


def _choices(names: list[str]) -> list[str]:
    return list(names) + [BUNDLED]


def _path(kind: str, name: str, component: str):
    """Full path of a dropdown entry; the bundled entry maps to the pack's own file for `component`."""
    if name != BUNDLED:
        return bridge.resolve(kind, name)
    bundled = core_module("bundled")
    if not bundled.bundled_available():
        raise InputError("The bundled model's files are missing from this install (echogen_core/bundled_model); "
                         "reinstall the pack, or rebuild them with `python -m echogen_core.bundled build`.")
    from pathlib import Path

    return Path(bundled.bundled_paths()[component])


def _module_of(obj) -> torch.nn.Module | None:
    if isinstance(obj, torch.nn.Module):
        return obj
    inner = getattr(obj, "model", None)
    return inner if isinstance(inner, torch.nn.Module) else None


def manage(obj, role: str, name: str) -> bridge.Managed:
    return bridge.Managed(obj, _module_of(obj), role=role, name=name)


class EchoGenModelLoader:
    DESCRIPTION = ("Loads an Infinity text-to-image transformer or an EchoGen subject-driven model (echogen_2b.pth), "
                   "optionally assembled from an Infinity backbone plus an EchoGen adapter file.")
    CATEGORY = "EchoGen/loaders"
    RETURN_TYPES = (H.MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The transformer, managed by ComfyUI's model management.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        files = bridge.list_files(bridge.MODEL_FOLDER)
        return {
            "required": {
                "model_name": (_choices(files), {
                    "tooltip": "Transformer weights in models/echogen: infinity_2b_reg.pth, infinity_125M_256x256.pth, "
                               "the 8B shards' index, echogen_2b.pth, or a file converted by `python -m echogen_core "
                               "convert`. 'bundled: echogen-world-tiny' is the small CPU model shipped with the pack."}),
                "precision": (PRECISIONS, {
                    "default": "auto",
                    "tooltip": "Compute dtype of the transformer blocks (embeddings, AdaLN and head stay fp32). "
                               "auto: bf16 on CUDA, fp32 on CPU."}),
            },
            "optional": {
                "backbone_name": ([NONE] + files, {
                    "default": NONE,
                    "tooltip": "The Infinity checkpoint providing the frozen weights when model_name holds only the "
                               "EchoGen part (e.g. infinity_2b_reg.pth for echogen_2b)."}),
                "adapter_name": ([NONE] + files, {
                    "default": NONE,
                    "tooltip": "An EchoGen adapter (only the trained 'control' weights, e.g. from `echogen_core "
                               "train`) applied over the Infinity model in model_name."}),
            },
        }

    def load(self, model_name, precision="auto", backbone_name=NONE, adapter_name=NONE):
        backbone = bridge.resolve(bridge.MODEL_FOLDER, backbone_name) if backbone_name not in (None, NONE) else None
        adapter = bridge.resolve(bridge.MODEL_FOLDER, adapter_name) if adapter_name not in (None, NONE) else None
        if model_name == BUNDLED:  # the bundled EchoGen: its Infinity backbone plus its adapter
            path, adapter = _path(bridge.MODEL_FOLDER, model_name, "backbone"), _path(bridge.MODEL_FOLDER, model_name, "adapter")
        else:
            path = bridge.resolve(bridge.MODEL_FOLDER, model_name)
        device = bridge.load_device()
        dtype = _dtype(precision, checkpoint.default_dtype(device))
        model = checkpoint.load_transformer(path, backbone=backbone, adapter=adapter,
                                            device=bridge.offload_device("model"), dtype=dtype)
        label = " + ".join(p.name for p in (path, backbone, adapter) if p is not None)
        fixed = core_module("bundled").world_schedule() if model_name == BUNDLED else None
        return (H.ModelHandle(manage(model, "model", label), label, fixed_schedule=fixed),)


class EchoGenVAELoader:
    DESCRIPTION = "Loads Infinity's BSQ VAE (the bitwise tokenizer that turns generated bits into pixels)."
    CATEGORY = "EchoGen/loaders"
    RETURN_TYPES = (H.VAE,)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The BSQ VAE; it must match the transformer (d32 for 2B/125M, the d56 patchify VAE for 8B).",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae_name": (_choices(bridge.list_files(bridge.MODEL_FOLDER)), {
            "tooltip": "infinity_vae_d32reg.pth (2B, 125M, EchoGen) or infinity_vae_d56_f8_14_patchify.pth (8B), "
                       "in models/echogen."})}}

    def load(self, vae_name):
        path = _path(bridge.MODEL_FOLDER, vae_name, "vae")
        vae = checkpoint.load_vae(path, device=bridge.offload_device("vae"))
        return (manage(vae, "vae", path.name),)


class EchoGenTextEncoderLoader:
    DESCRIPTION = "Loads the Flan-T5 text encoder (Hugging Face folder) that Infinity and EchoGen condition on."
    CATEGORY = "EchoGen/loaders"
    RETURN_TYPES = (H.TEXT_ENCODER,)
    RETURN_NAMES = ("text_encoder",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "folder": (_choices(bridge.list_folders("text_encoders")), {
                "tooltip": "A google/flan-t5-xl folder (config.json, tokenizer, weights) under models/text_encoders."}),
            "precision": (PRECISIONS, {
                "default": "auto",
                "tooltip": "auto: fp16 on CUDA (as the official code), fp32 on CPU. Choose bf16 if you see a "
                           "non-finite-features error."}),
        }}

    def load(self, folder, precision="auto"):
        from_folder = core_module("text_encoder").T5TextEncoder.from_folder
        path = _path("text_encoders", folder, "text_encoder")
        device = bridge.load_device()
        dtype = _dtype(precision, torch.float16 if device.type == "cuda" else torch.float32)
        encoder = from_folder(path, device=bridge.offload_device("text_encoder"), dtype=dtype)
        return (manage(encoder, "text_encoder", path.name),)


class EchoGenSemanticEncoderLoader:
    DESCRIPTION = "Loads DINOv2 ViT-B/14, EchoGen's semantic (identity) encoder."
    CATEGORY = "EchoGen/loaders"
    RETURN_TYPES = (H.SEMANTIC_ENCODER,)
    RETURN_NAMES = ("semantic_encoder",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        names = bridge.list_files(bridge.MODEL_FOLDER) + bridge.list_folders(bridge.MODEL_FOLDER)
        return {"required": {
            "dinov2_name": (_choices(names), {
                "tooltip": "dinov2_vitb14_pretrain.pth (torch hub) or a facebook/dinov2-base folder, in "
                           "models/echogen. Not the registers variant."}),
            "precision": (PRECISIONS, {"default": "auto", "tooltip": "auto: fp32 (DINOv2 is small; fp32 keeps "
                                                                     "the subject features exact)."}),
        }}

    def load(self, dinov2_name, precision="auto"):
        load_dinov2 = core_module("dinov2").load_dinov2
        path = _path(bridge.MODEL_FOLDER, dinov2_name, "dinov2")
        model = load_dinov2(path, device=bridge.offload_device("text_encoder"), dtype=_dtype(precision, torch.float32))
        return (manage(model, "text_encoder", path.name),)


class EchoGenContentEncoderLoader:
    DESCRIPTION = ("Loads the encoder half of the FLUX.1 VAE, EchoGen's content (detail) encoder. ComfyUI's own "
                   "Load VAE output works in the content encode node too.")
    CATEGORY = "EchoGen/loaders"
    RETURN_TYPES = (H.CONTENT_ENCODER,)
    RETURN_NAMES = ("content_encoder",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        names = bridge.list_files("vae") + bridge.list_folders("vae")
        return {"required": {
            "vae_name": (_choices(names), {
                "tooltip": "FLUX.1 ae.safetensors (BFL) or a diffusers vae/ folder, in models/vae."}),
            "precision": (PRECISIONS, {"default": "auto", "tooltip": "auto: fp32 (the latents EchoGen reads are "
                                                                     "the posterior mean, kept exact)."}),
        }}

    def load(self, vae_name, precision="auto"):
        load_encoder = core_module("flux_vae").load_flux_vae_encoder
        path = _path("vae", vae_name, "content_vae")
        encoder = load_encoder(path, device=bridge.offload_device("vae"), dtype=_dtype(precision, torch.float32))
        return (manage(encoder, "vae", path.name),)


class EchoGenSegmenterLoader:
    DESCRIPTION = ("Loads the optional subject segmentation models: GroundingDINO (find the subject from its name), "
                   "SAM (cut it out exactly) and Qwen2.5-VL (name it when you give no words). Each is a Hugging Face "
                   "folder in models/echogen; leave any at 'none'.")
    CATEGORY = "EchoGen/loaders"
    RETURN_TYPES = (H.SEGMENTER,)
    RETURN_NAMES = ("segmenter",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        folders = [NONE] + bridge.list_folders(bridge.MODEL_FOLDER)
        return {"required": {
            "grounding_dino": (folders, {"default": NONE, "tooltip": "IDEA-Research/grounding-dino-tiny or -base "
                                                                    "folder (transformers layout)."}),
            "sam": (folders, {"default": NONE, "tooltip": "facebook/sam-vit-base (or larger) folder; refines the "
                                                          "detected box into a mask."}),
            "namer": (folders, {"default": NONE, "tooltip": "Qwen/Qwen2.5-VL-3B-Instruct (or larger) folder; names "
                                                            "the subject when no subject words are given."}),
        }}

    def load(self, grounding_dino=NONE, sam=NONE, namer=NONE):
        detectors = core_module("detectors")
        device = bridge.offload_device("text_encoder")
        parts = {}
        for key, name, cls in (("detector", grounding_dino, detectors.GroundingDetector),
                               ("refiner", sam, detectors.SamRefiner),
                               ("namer", namer, detectors.SubjectNamer)):
            if name not in (None, NONE):
                obj = cls.from_folder(bridge.resolve(bridge.MODEL_FOLDER, name), device=device)
                parts[key] = manage(obj, "text_encoder", name)
        return (H.SegmenterHandle(**parts),)
