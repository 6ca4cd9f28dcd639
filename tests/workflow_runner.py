"""Run the pack's UI-format workflows without ComfyUI, the way ComfyUI would.

- `ui_to_api`: editor JSON -> the API prompt POST /prompt takes, from node definitions (our classes'
  INPUT_TYPES, or /object_info of a real server): widget values are read positionally (required, then
  optional), skipping the UI-only entries (control_after_generate's "fixed", image_upload's "image");
  links become [source id, output index]; editor-only nodes (Note) are dropped.
- `validate` + `execute`: ComfyUI's executor in miniature: required inputs, COMBO membership, INT/FLOAT
  bounds and link types are checked first; then only the nodes an output node needs run, each once, in
  topological order, with hidden inputs filled; a node may return a tuple or a dict with "result"/"ui";
  every IMAGE/MASK/INT/STRING output must follow ComfyUI's data conventions.
- Stand-ins for the core nodes the templates use (LoadImage, SaveImage, PreviewImage, ImageScaleBy), with
  ComfyUI's INPUT_TYPES (nodes.py, v0.3.64) and data conventions: IMAGE float32 (B, H, W, 3) in 0..1 on the
  CPU, MASK float32 (B, H, W) with 1 = masked (LoadImage: 1 - alpha, or a 64x64 zero mask without alpha).
- `write_tiny_models`: random-weight models in the official file layouts under the templates' file names.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

FRONTEND_ONLY = {"Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


class WorkflowError(Exception):
    pass


# ------------------------------------------------------------------------------------------------------------
# Node definitions and UI -> API conversion


def definitions_from_classes(classes: dict) -> dict:
    """The parts of /object_info the converter needs, from node classes."""
    return {name: {"input": cls.INPUT_TYPES(), "output": list(cls.RETURN_TYPES),
                   "output_node": bool(getattr(cls, "OUTPUT_NODE", False))} for name, cls in classes.items()}


def _spec(spec) -> tuple:
    spec = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return kind, opts


def is_widget(spec) -> bool:
    kind, opts = _spec(spec)
    return (isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES) and not opts.get("forceInput")


def combo_options(spec):
    kind, opts = _spec(spec)
    if isinstance(kind, (list, tuple)):
        return list(kind)
    if kind == "COMBO":  # newer /object_info form
        return list(opts.get("options", []))
    return None


def visible_inputs(definition: dict):
    for section in ("required", "optional"):
        for name, spec in (definition["input"].get(section) or {}).items():
            yield section, name, spec


def ui_to_api(workflow: dict, defs: dict) -> dict:
    """Editor-format workflow -> API prompt {id: {"class_type", "inputs", "_meta"}}."""
    links = {l[0]: l for l in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind in FRONTEND_ONLY:
            continue
        if node.get("mode", 0) != 0:
            raise WorkflowError(f"node {node['id']} ({kind}) is muted or bypassed; the templates use neither")
        if kind not in defs:
            raise WorkflowError(f"node {node['id']}: unknown node type {kind!r}")
        values = list(node.get("widgets_values") or [])
        linked = {i["name"]: i.get("link") for i in node.get("inputs", []) if i.get("link") is not None}
        inputs = {}
        for _, name, spec in visible_inputs(defs[kind]):
            if is_widget(spec):
                if not values:
                    raise WorkflowError(f"node {node['id']} ({kind}): no widget value left for {name!r}")
                inputs[name] = values.pop(0)
                _, opts = _spec(spec)
                if opts.get("control_after_generate"):
                    values.pop(0)  # "fixed" / "randomize": the editor's, not the server's
                if opts.get("image_upload"):
                    values.pop(0)  # the upload button's entry
            if name in linked:  # a linked (converted) widget takes the link
                _, src, slot, dst, _, _ = links[linked[name]]
                if dst != node["id"]:
                    raise WorkflowError(f"link {linked[name]} does not end at node {node['id']}")
                inputs[name] = [str(src), slot]
        if values:
            raise WorkflowError(f"node {node['id']} ({kind}): {len(values)} widget value(s) left over: {values}")
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs,
                                   "_meta": {"title": node.get("title") or kind}}
    return prompt


def set_inputs(prompt: dict, class_type: str, **values) -> dict:
    """A copy of the prompt with widget inputs of every node of one type replaced."""
    out = json.loads(json.dumps(prompt))
    for node in out.values():
        if node["class_type"] == class_type:
            node["inputs"].update(values)
    return out


# ------------------------------------------------------------------------------------------------------------
# Validation and execution


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def validate(prompt: dict, classes: dict) -> None:
    for nid, node in prompt.items():
        cls = classes.get(node["class_type"])
        if cls is None:
            raise WorkflowError(f"node {nid}: unknown class {node['class_type']!r}")
        types = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, spec in (types.get(section) or {}).items():
                kind, opts = _spec(spec)
                if name not in node["inputs"]:
                    if section == "required":
                        raise WorkflowError(f"node {nid} ({node['class_type']}): required input {name!r} missing")
                    continue
                value = node["inputs"][name]
                if _is_link(value):
                    src = prompt.get(value[0])
                    if src is None:
                        raise WorkflowError(f"node {nid}.{name}: links to missing node {value[0]}")
                    outs = classes[src["class_type"]].RETURN_TYPES
                    if not 0 <= value[1] < len(outs):
                        raise WorkflowError(f"node {nid}.{name}: node {value[0]} has no output {value[1]}")
                    want = "COMBO" if isinstance(kind, (list, tuple)) else kind
                    if outs[value[1]] != want and "*" not in (outs[value[1]], want):
                        raise WorkflowError(f"node {nid}.{name}: {outs[value[1]]} cannot feed {want}")
                    continue
                options = combo_options(spec)
                if options is not None and value not in options:
                    raise WorkflowError(f"node {nid}.{name}: {value!r} not in {options}")
                if kind in ("INT", "FLOAT"):
                    if isinstance(value, bool) or not isinstance(value, (int, float)):
                        raise WorkflowError(f"node {nid}.{name}: {value!r} is not a number")
                    if ("min" in opts and value < opts["min"]) or ("max" in opts and value > opts["max"]):
                        raise WorkflowError(f"node {nid}.{name}: {value} outside [{opts.get('min')}, {opts.get('max')}]")
                if kind == "STRING" and not isinstance(value, str):
                    raise WorkflowError(f"node {nid}.{name}: {value!r} is not a string")
                if kind == "BOOLEAN" and not isinstance(value, bool):
                    raise WorkflowError(f"node {nid}.{name}: {value!r} is not a boolean")
    if not any(getattr(classes[n["class_type"]], "OUTPUT_NODE", False) for n in prompt.values()):
        raise WorkflowError("the prompt has no output node")


def check_conventions(kind: str, value, where: str) -> None:
    """ComfyUI's data conventions for the core types."""
    if kind == "IMAGE":
        ok = (isinstance(value, torch.Tensor) and value.dtype == torch.float32 and value.dim() == 4
              and value.shape[-1] == 3 and value.device.type == "cpu")
        if not ok:
            raise WorkflowError(f"{where}: IMAGE must be float32 (B, H, W, 3) on the CPU, got "
                                f"{getattr(value, 'dtype', type(value))} {tuple(getattr(value, 'shape', ()))}")
        if value.numel() and (value.min() < 0 or value.max() > 1):
            raise WorkflowError(f"{where}: IMAGE values outside 0..1")
    elif kind == "MASK":
        if not (isinstance(value, torch.Tensor) and value.dtype == torch.float32 and value.dim() == 3
                and value.device.type == "cpu"):
            raise WorkflowError(f"{where}: MASK must be float32 (B, H, W) on the CPU")
        if value.numel() and (value.min() < 0 or value.max() > 1):
            raise WorkflowError(f"{where}: MASK values outside 0..1")
    elif kind == "INT" and not (isinstance(value, int) and not isinstance(value, bool)):
        raise WorkflowError(f"{where}: INT output is {type(value).__name__}")
    elif kind == "STRING" and not isinstance(value, str):
        raise WorkflowError(f"{where}: STRING output is {type(value).__name__}")


@dataclass
class Run:
    prompt: dict
    outputs: dict = field(default_factory=dict)   # node id -> result tuple
    ui: dict = field(default_factory=dict)        # node id -> ui dict
    order: list = field(default_factory=list)     # node ids in execution order


def execute(prompt: dict, classes: dict, extra_pnginfo: dict | None = None) -> Run:
    validate(prompt, classes)
    deps = {nid: {v[0] for v in node["inputs"].values() if _is_link(v)} for nid, node in prompt.items()}
    wanted, stack = set(), [nid for nid, n in prompt.items() if getattr(classes[n["class_type"]], "OUTPUT_NODE", False)]
    while stack:
        nid = stack.pop()
        if nid not in wanted:
            wanted.add(nid)
            stack.extend(deps[nid])
    run = Run(prompt)
    done: set = set()
    while len(done) < len(wanted):
        ready = sorted((n for n in wanted - done if deps[n] <= done), key=int)
        if not ready:
            raise WorkflowError("the prompt has a cycle")
        for nid in ready:
            _run_node(run, nid, classes, extra_pnginfo)
            done.add(nid)
    return run


def _run_node(run: Run, nid: str, classes: dict, extra_pnginfo) -> None:
    node = run.prompt[nid]
    cls = classes[node["class_type"]]
    kwargs = {}
    for name, value in node["inputs"].items():
        kwargs[name] = run.outputs[value[0]][value[1]] if _is_link(value) else value
    for name, what in (cls.INPUT_TYPES().get("hidden") or {}).items():
        kwargs[name] = {"UNIQUE_ID": nid, "PROMPT": run.prompt, "EXTRA_PNGINFO": extra_pnginfo or {}}.get(what)
    out = getattr(cls(), cls.FUNCTION)(**kwargs)
    if isinstance(out, dict):
        if "expand" in out:
            raise WorkflowError(f"node {nid}: node expansion is not supported here")
        run.ui[nid] = out.get("ui")
        result = tuple(out.get("result", ()))
    else:
        result = tuple(out)
    if len(result) != len(cls.RETURN_TYPES):
        raise WorkflowError(f"node {nid} ({node['class_type']}) returned {len(result)} values for "
                            f"{len(cls.RETURN_TYPES)} outputs")
    for i, (kind, value) in enumerate(zip(cls.RETURN_TYPES, result)):
        check_conventions(kind, value, f"node {nid} ({node['class_type']}) output {i}")
    run.outputs[nid] = result
    run.order.append(nid)


# ------------------------------------------------------------------------------------------------------------
# Stand-ins for the core nodes (ComfyUI nodes.py, v0.3.64)


def core_nodes(input_dir: Path, output_dir: Path, temp_dir: Path) -> dict:
    from PIL import Image, ImageOps

    class LoadImage:
        CATEGORY = "image"
        RETURN_TYPES = ("IMAGE", "MASK")
        FUNCTION = "load_image"

        @classmethod
        def INPUT_TYPES(cls):
            files = sorted(f.name for f in Path(input_dir).iterdir() if f.is_file())
            return {"required": {"image": (files, {"image_upload": True})}}

        def load_image(self, image):
            im = ImageOps.exif_transpose(Image.open(Path(input_dir) / image))
            rgb = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)[None]
            if "A" in im.getbands():
                mask = 1.0 - torch.from_numpy(np.asarray(im.getchannel("A"), dtype=np.float32) / 255.0)
            else:
                mask = torch.zeros((64, 64), dtype=torch.float32)
            return (rgb, mask.unsqueeze(0))

    class SaveImage:
        CATEGORY = "image"
        RETURN_TYPES = ()
        FUNCTION = "save_images"
        OUTPUT_NODE = True
        directory, kind = Path(output_dir), "output"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"images": ("IMAGE", {"tooltip": "The images to save."}),
                                 "filename_prefix": ("STRING", {"default": "ComfyUI"})},
                    "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

        def save_images(self, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
            sub = Path(filename_prefix)
            folder = self.directory / sub.parent
            folder.mkdir(parents=True, exist_ok=True)
            counter = 1 + len(list(folder.glob(f"{sub.name}_*_.png")))
            results = []
            for image in images:
                name = f"{sub.name}_{counter:05}_.png"
                Image.fromarray((image.numpy() * 255).clip(0, 255).astype(np.uint8)).save(folder / name)
                results.append({"filename": name, "subfolder": sub.parent.as_posix().strip("."), "type": self.kind})
                counter += 1
            return {"ui": {"images": results}}

    class PreviewImage(SaveImage):
        directory, kind = Path(temp_dir), "temp"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"images": ("IMAGE",)},
                    "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

        def save_images(self, images, filename_prefix="ComfyUI_temp_preview", prompt=None, extra_pnginfo=None):
            return super().save_images(images, filename_prefix, prompt, extra_pnginfo)

    class ImageScaleBy:
        upscale_methods = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
        CATEGORY = "image/upscaling"
        RETURN_TYPES = ("IMAGE",)
        FUNCTION = "upscale"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"image": ("IMAGE",), "upscale_method": (cls.upscale_methods,),
                                 "scale_by": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 8.0, "step": 0.01})}}

        def upscale(self, image, upscale_method, scale_by):
            height, width = round(image.shape[1] * scale_by), round(image.shape[2] * scale_by)
            if upscale_method == "lanczos":  # ComfyUI: PIL per image
                out = [torch.from_numpy(np.asarray(Image.fromarray((im.numpy() * 255).round().astype(np.uint8))
                                                   .resize((width, height), Image.LANCZOS), dtype=np.float32) / 255.0)
                       for im in image]
                return (torch.stack(out),)
            mode = {"nearest-exact": "nearest-exact", "bilinear": "bilinear", "area": "area", "bicubic": "bicubic"}
            s = torch.nn.functional.interpolate(image.movedim(-1, 1), size=(height, width), mode=mode[upscale_method])
            return (s.movedim(1, -1).clamp(0, 1),)

    return {"LoadImage": LoadImage, "SaveImage": SaveImage, "PreviewImage": PreviewImage,
            "ImageScaleBy": ImageScaleBy}


# ------------------------------------------------------------------------------------------------------------
# Tiny models under the official file names


T5_WIDTH = 64      # the tiny_t5_dir fixture's d_model
TEXT_MAXLEN = 128  # InfinityConfig.tiny learns 16 empty-prompt rows; the templates' prompts are longer


def write_tiny_models(root: Path, t5_dir: Path) -> Path:
    """models/{echogen,text_encoders,vae} with random-weight models in the released layouts:
    infinity_2b_reg.pth (plain state dict), echogen_2b.pth (trainer/gpt_fsdp), infinity_vae_d32reg.pth
    ({"vae": ...}), dinov2_vitb14_pretrain.pth (torch-hub names), vae/ae.safetensors (BFL names),
    text_encoders/flan-t5-xl/ (Hugging Face folder)."""
    from safetensors.torch import save_file

    from echogen_core.dinov2 import Dinov2, Dinov2Config
    from echogen_core.echogen import EchoGen, EchoGenConfig
    from echogen_core.flux_vae import FluxVAEConfig, FluxVAEEncoder
    from helpers import micro_vae, randomize_, tiny_infinity

    root = Path(root)
    for kind in ("echogen", "text_encoders", "vae"):
        (root / kind).mkdir(parents=True, exist_ok=True)
    shutil.copytree(t5_dir, root / "text_encoders" / "flan-t5-xl")
    torch.save(tiny_infinity(seed=4, text_channels=T5_WIDTH, text_maxlen=TEXT_MAXLEN).state_dict(), root / "echogen" / "infinity_2b_reg.pth")
    # Tiny DINOv2 (4x4 patches at 56 px) and FLUX VAE (16 channels, 4x4 latent from a 32 px crop).
    cfg = EchoGenConfig.tiny(text_channels=T5_WIDTH, text_maxlen=TEXT_MAXLEN, semantic_dim=128, semantic_len=17, content_dim=16,
                             content_len=16)
    torch.save({"trainer": {"gpt_fsdp": randomize_(EchoGen(cfg), seed=3).state_dict()}},
               root / "echogen" / "echogen_2b.pth")
    torch.save({"vae": micro_vae().state_dict()}, root / "echogen" / "infinity_vae_d32reg.pth")
    torch.save(randomize_(Dinov2(Dinov2Config.tiny()), seed=1).state_dict(),
               root / "echogen" / "dinov2_vitb14_pretrain.pth")
    flux = randomize_(FluxVAEEncoder(FluxVAEConfig.tiny()), seed=2)
    save_file({k: v.contiguous() for k, v in flux.state_dict().items()}, root / "vae" / "ae.safetensors")
    return root


def expected_size(run: Run, classes: dict, nid: str) -> tuple[int, int, str]:
    """(width, height, sampler id) an image input of node `nid` must have: the announced size of the sampler
    upstream, times any ImageScaleBy on the way."""
    node = run.prompt[nid]
    src = node["inputs"]["images" if "images" in node["inputs"] else "image"][0]
    scale = 1.0
    while True:
        kind = run.prompt[src]["class_type"]
        if kind == "ImageScaleBy":
            scale *= run.prompt[src]["inputs"]["scale_by"]
            src = run.prompt[src]["inputs"]["image"][0]
        elif kind == "EchoGenDecode":
            sampler = run.prompt[src]["inputs"]["latent"][0]
            _, w, h = run.outputs[sampler]
            return round(w * scale), round(h * scale), sampler
        else:
            raise WorkflowError(f"cannot trace node {nid}'s image back to a sampler (reached {kind})")


def load_workflow(path) -> dict:
    with open(path) as f:
        return json.load(f)
