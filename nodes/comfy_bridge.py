"""Everything the nodes need from ComfyUI, in one place, imported lazily.

Inside ComfyUI: model folders come from `folder_paths`, devices and memory from `comfy.model_management`,
every model is wrapped in a `ModelPatcher` (so "Unload models" and memory pressure reach it), progress and
previews go through `comfy.utils.ProgressBar`, and cancel raises ComfyUI's interrupt exception.

Without ComfyUI (tests, scripts): folders are read under $ECHOGEN_MODELS_DIR (default: <pack>/models), the
device is CUDA when available else CPU, models stay where they are loaded, and progress is silent.
"""
from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from ._core import InputError

log = logging.getLogger("echogen")

PACK_DIR = Path(__file__).resolve().parents[1]
MODEL_FOLDER = "echogen"  # models/echogen: Infinity/EchoGen transformers, BSQ VAEs, adapters, DINOv2
WEIGHT_EXTENSIONS = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".sft")


@lru_cache(maxsize=1)
def in_comfyui() -> bool:
    try:
        # folder_paths first: it exists only in a ComfyUI process, so outside one nothing else is imported (a
        # stray `comfy` folder on sys.path would otherwise be imported as a namespace package)
        import folder_paths  # noqa: F401
        import comfy.model_management  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------------------------
# Model folders


def register_model_folders() -> None:
    """Register models/echogen, keeping any folders a user mapped in extra_model_paths.yaml (which ComfyUI
    reads before custom nodes load)."""
    if not in_comfyui():
        return
    import folder_paths

    default = os.path.join(folder_paths.models_dir, MODEL_FOLDER)
    known = folder_paths.folder_names_and_paths.get(MODEL_FOLDER)
    dirs = list(known[0]) if known else []
    if default not in dirs:
        dirs.append(default)
    folder_paths.folder_names_and_paths[MODEL_FOLDER] = (dirs, set(folder_paths.supported_pt_extensions))


def folder_dirs(kind: str) -> list[Path]:
    """The directories searched for a model kind ('echogen', 'text_encoders', 'vae', ...)."""
    if in_comfyui():
        import folder_paths

        try:
            return [Path(d) for d in folder_paths.get_folder_paths(kind)]
        except KeyError:
            return []
    root = Path(os.environ.get("ECHOGEN_MODELS_DIR", PACK_DIR / "models"))
    return [root / kind]


def list_files(kind: str) -> list[str]:
    """Weight files under the kind's folders, as relative paths (sorted, recursive)."""
    if in_comfyui():
        import folder_paths

        try:
            return list(folder_paths.get_filename_list(kind))
        except KeyError:
            return []
    names = set()
    for d in folder_dirs(kind):
        for here, _, files in os.walk(d, followlinks=True):
            for f in files:
                if Path(f).suffix.lower() in WEIGHT_EXTENSIONS:
                    names.add((Path(here) / f).relative_to(d).as_posix())
    return sorted(names)


def list_folders(kind: str, marker: str = "config.json", depth: int = 2) -> list[str]:
    """Hugging Face style model folders (holding `marker`) under the kind's folders."""
    names = set()
    for d in folder_dirs(kind):
        if not d.is_dir():
            continue
        for here, subdirs, files in os.walk(d, followlinks=True):  # model folders are often symlinked
            rel = Path(here).relative_to(d)
            if len(rel.parts) >= depth:
                subdirs.clear()
            if marker in files and 0 < len(rel.parts) <= depth:
                names.add(rel.as_posix())
    return sorted(names)


def resolve(kind: str, name: str) -> Path:
    """Full path of a dropdown entry, or an error naming the folders that were searched."""
    if not name or name == "none":
        raise InputError(f"No {kind} model selected.")
    for d in folder_dirs(kind):
        path = d / name
        if path.exists():
            return path
    searched = ", ".join(str(d) for d in folder_dirs(kind)) or "(no folder registered)"
    raise InputError(f"'{name}' was not found in the {kind} model folder(s): {searched}. Put the file there (or map "
                     f"the folder in extra_model_paths.yaml) and refresh the node list.")


# --------------------------------------------------------------------------------------------------------------
# Devices and memory


def load_device() -> torch.device:
    if in_comfyui():
        import comfy.model_management as mm

        return mm.get_torch_device()
    return torch.device(os.environ.get("ECHOGEN_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))


def offload_device(role: str = "model") -> torch.device:
    if in_comfyui():
        import comfy.model_management as mm

        return {"model": mm.unet_offload_device, "text_encoder": mm.text_encoder_offload_device,
                "vae": mm.vae_offload_device}.get(role, mm.unet_offload_device)()
    return load_device()


def intermediate_device() -> torch.device:
    if in_comfyui():
        import comfy.model_management as mm

        return mm.intermediate_device()
    return torch.device("cpu")


class _Holder(torch.nn.Module):
    """ModelPatcher writes bookkeeping attributes (device, loaded memory, ...) onto the module it manages;
    our modules expose `device` as a read-only property, so the patcher manages this holder instead."""

    def __init__(self, inner: torch.nn.Module, device: torch.device):
        super().__init__()
        self.inner = inner
        self.device = device


class Managed:
    """A model ComfyUI's memory management can see. `get()` returns the core object on its load device."""

    def __init__(self, obj, module: torch.nn.Module, role: str = "model", name: str = ""):
        self.obj = obj            # what the core API takes (Infinity, BSQVAE, T5TextEncoder, ...)
        self.module = module      # the nn.Module holding its weights
        self.role = role
        self.name = name
        self.patcher = None
        if module is not None and in_comfyui():
            from comfy.model_patcher import ModelPatcher

            here = next(module.parameters()).device
            self.patcher = ModelPatcher(_Holder(module, here), load_device=load_device(),
                                        offload_device=offload_device(role))
            if hasattr(obj, "clear_content_cache"):
                self._release_content_cache_with_the_weights(obj)

    def _release_content_cache_with_the_weights(self, model) -> None:
        """EchoGen keeps the content stream's K/V of recent rows on the model's device between runs (~1 GB a row
        for the 2B model at 1024 px). A full unload moves the whole model (`.to()`, which empties that cache);
        a partial unload under memory pressure moves single layers, so the cache is emptied here too: ComfyUI
        does not count it and would otherwise free less than it asked for."""
        partially_unload = self.patcher.partially_unload

        def releasing(*args, **kwargs):
            model.clear_content_cache()
            return partially_unload(*args, **kwargs)

        self.patcher.partially_unload = releasing

    def get(self):
        if self.patcher is not None:
            import comfy.model_management as mm

            # full load: our modules do not use comfy.ops weight casting, so partial (lowvram) loading
            # would not apply to them anyway; the full .to() also moves buffers of parameter-less modules.
            mm.load_models_gpu([self.patcher], force_full_load=True)
        return self.obj

    def offload(self) -> None:
        """Give the memory back now that this model's outputs exist (encoders between runs)."""
        if self.patcher is None:
            return
        import comfy.model_management as mm

        try:
            for i, loaded in enumerate(list(mm.current_loaded_models)):
                if loaded.model is self.patcher:
                    if loaded.model_unload():
                        mm.current_loaded_models.remove(loaded)
                    break
            mm.soft_empty_cache()
        except AttributeError as e:  # model management internals changed: let ComfyUI decide instead
            log.debug("EchoGen: could not offload %s (%s)", self.name, e)


# --------------------------------------------------------------------------------------------------------------
# Progress, previews, cancel


def check_interrupt() -> None:
    if in_comfyui():
        import comfy.model_management as mm

        mm.throw_exception_if_processing_interrupted()


def previews_enabled() -> bool:
    if not in_comfyui():
        return False
    try:
        from comfy.cli_args import LatentPreviewMethod, args

        return args.preview_method != LatentPreviewMethod.NoPreviews
    except (ImportError, AttributeError):
        return True


class Progress:
    """A progress bar on the node (with an optional preview image); silent outside ComfyUI."""

    def __init__(self, total: int, node_id: Optional[str] = None):
        self.bar = None
        if in_comfyui():
            import comfy.utils

            self.bar = comfy.utils.ProgressBar(total, node_id=node_id)
        self.total = total

    def update(self, value: int, preview=None) -> None:
        """preview: a PIL image or None."""
        if self.bar is not None:
            self.bar.update_absolute(value, self.total, ("JPEG", preview, 512) if preview is not None else None)


def register_routes() -> None:
    """GET /echogen/schedule?width=&height=: the size a request snaps to (used by the frontend extension)."""
    if not in_comfyui():
        return
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:
        return
    from ._core import schedule_info

    @PromptServer.instance.routes.get("/echogen/schedule")
    async def _schedule(request):  # noqa: ANN001
        try:
            info = schedule_info(int(request.query.get("width", 1024)), int(request.query.get("height", 1024)))
        except (ValueError, InputError) as e:
            return web.json_response({"error": str(e)}, status=400)
        return web.json_response(info)
