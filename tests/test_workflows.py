"""The workflow templates in workflows/: well-formed, up to date with workflows/build.py, and each one executes
in-process (API form, node classes called along the links) with tiny random-weight models, giving images of
the size its sampler announced. Plus the contract between every node's INPUT_TYPES and its function.

Speed: the templates ask for 1024x1024 (13 scales, 10521 tokens). With the tiny models that takes ~20 s per
sampler on 2 CPU cores (~14.5 s sampling + ~5.5 s decoding, measured), so the executed prompts ask for a
smaller size instead, changed ONLY in the converted API prompt (`SIZE_OVERRIDE`); the templates' own
1024x1024 is checked to snap to 1024x1024 without running it.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from workflow_runner import (core_nodes, definitions_from_classes, execute, expected_size, load_workflow,
                             set_inputs, ui_to_api, write_tiny_models)

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
OFFICIAL_TEMPLATES = ["infinity_text_to_image", "echogen_subject_driven", "echogen_subject_upscale",
                      "echogen_guidance_sweep"]
SUBJECT_TEMPLATES = OFFICIAL_TEMPLATES[1:]
TEMPLATES = OFFICIAL_TEMPLATES + ["echogen_bundled_world"]   # the last runs on the bundled model
DOG = ROOT.parent / "shared" / "dreambench" / "dataset" / "dog" / "00.jpg"
# Requested sizes for the executed prompts: t2i also exercises snapping (330x250 -> 320x240 at 0.06M).
SIZE_OVERRIDE = {"infinity_text_to_image": (330, 250)}
DEFAULT_OVERRIDE = (256, 256)
UNUSED_NODES = {"EchoGenSegmenterLoader"}  # optional GroundingDINO/SAM/Qwen loader: no template needs it


def segmentation_method() -> tuple[str, str]:
    """The segmenter method the subject workflows run with here, and why (it goes into the test ids). The
    templates say "auto"; it runs as "auto" when the salient-object model can be used, else as "none"
    (the photo as it is)."""
    try:
        importlib.import_module("echogen_core.segmentation")
    except ImportError:
        return "none", "no_segmentation_module"
    try:
        import onnxruntime  # noqa: F401

        from echogen_core.salient import find_u2netp

        find_u2netp()
    except Exception:  # noqa: BLE001 - any reason the salient model is unusable
        return "none", "no_salient_model"
    return "auto", "salient_model"


SEG_METHOD, SEG_REASON = segmentation_method()
RUNS = [pytest.param(TEMPLATES[0], None, id=TEMPLATES[0])] + [
    pytest.param(name, SEG_METHOD, id=f"{name}-segment_{SEG_METHOD}-{SEG_REASON}") for name in SUBJECT_TEMPLATES]


@pytest.fixture(scope="module")
def pack():
    import nodes

    return nodes


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_t5_dir, pack):
    """Tiny models under $ECHOGEN_MODELS_DIR, the DreamBench dog as input/echogen_reference.png, and the
    node classes (ours + core stand-ins)."""
    if not DOG.is_file():
        pytest.skip(f"DreamBench photo {DOG} is absent")
    root = tmp_path_factory.mktemp("comfy")
    models = write_tiny_models(root / "models", tiny_t5_dir)
    for d in ("input", "output", "temp"):
        (root / d).mkdir()
    Image.open(DOG).convert("RGB").save(root / "input" / "echogen_reference.png")
    mp = pytest.MonkeyPatch()
    mp.setenv("ECHOGEN_MODELS_DIR", str(models))
    mp.setenv("ECHOGEN_DEVICE", "cpu")
    classes = {**pack.NODE_CLASS_MAPPINGS, **core_nodes(root / "input", root / "output", root / "temp")}
    yield {"root": root, "classes": classes}
    mp.undo()


def api_prompt(name: str, classes: dict) -> dict:
    return ui_to_api(load_workflow(WORKFLOWS / f"{name}.json"), definitions_from_classes(classes))


# ------------------------------------------------------------------------------------------------------------
# Templates: form


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_is_editor_format(name):
    wf = load_workflow(WORKFLOWS / f"{name}.json")
    assert wf["version"] == 0.4 and {"last_node_id", "last_link_id", "nodes", "links", "groups", "config",
                                     "extra"} <= set(wf)
    ids = [n["id"] for n in wf["nodes"]]
    assert len(set(ids)) == len(ids) and wf["last_node_id"] == max(ids)
    assert wf["last_link_id"] == max(l[0] for l in wf["links"])
    nodes = {n["id"]: n for n in wf["nodes"]}
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert link_id in out["links"] and inp["link"] == link_id
        assert out["type"] == inp["type"] == kind
    for n in wf["nodes"]:
        assert {"id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties",
                "widgets_values"} <= set(n)
        for slot, out in enumerate(n["outputs"]):
            assert out["slot_index"] == slot
            assert all(wf["links"][l - 1][1:3] == [n["id"], slot] for l in out["links"])
        if n["type"] != "Note":
            assert n["properties"]["Node name for S&R"] == n["type"]
    assert sorted(n["order"] for n in wf["nodes"]) == list(range(len(wf["nodes"])))


def test_templates_are_up_to_date_with_the_generator():
    spec = importlib.util.spec_from_file_location("echogen_workflow_build", WORKFLOWS / "build.py")
    build = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = build  # its dataclasses look their module up
    spec.loader.exec_module(build)
    built = build.build_all()
    assert sorted(built) == sorted(TEMPLATES)
    for name, wf in built.items():
        assert (WORKFLOWS / f"{name}.json").read_text() == build.dumps(wf), f"run python workflows/build.py ({name})"


def test_templates_use_the_official_files_and_settings(env):
    wanted = {"infinity_text_to_image": {"infinity_2b_reg.pth", "infinity_vae_d32reg.pth", "flan-t5-xl"},
              "echogen_subject_driven": {"echogen_2b.pth", "infinity_vae_d32reg.pth", "flan-t5-xl",
                                         "dinov2_vitb14_pretrain.pth", "ae.safetensors", "echogen_reference.png"}}
    wanted["echogen_subject_upscale"] = wanted["echogen_guidance_sweep"] = wanted["echogen_subject_driven"]
    for name in OFFICIAL_TEMPLATES:
        prompt = api_prompt(name, env["classes"])
        values = {v for n in prompt.values() for v in n["inputs"].values() if isinstance(v, str)}
        assert wanted[name] <= values, name
        for node in prompt.values():
            if node["class_type"] == "EchoGenSubjectSegmenter":
                assert node["inputs"]["method"] == "auto"
            if node["class_type"] == "EchoGenSampler":
                assert (node["inputs"]["width"], node["inputs"]["height"]) == (1024, 1024)
                assert node["inputs"]["seed"] == 42  # "fixed" (control_after_generate) was skipped
    sweep = api_prompt("echogen_guidance_sweep", env["classes"])
    gammas = sorted(n["inputs"]["subject_cfg"] for n in sweep.values() if n["class_type"] == "EchoGenGuidance")
    assert gammas == [1.5, 2.5, 3.5]
    prefixes = [n["inputs"]["filename_prefix"] for n in sweep.values() if n["class_type"] == "SaveImage"]
    assert len(set(prefixes)) == 3


def test_node_ids_used_by_the_templates(pack):
    used = set()
    for name in TEMPLATES:
        used |= {n["type"] for n in load_workflow(WORKFLOWS / f"{name}.json")["nodes"]}
    ours = used & set(pack.NODE_CLASS_MAPPINGS)
    assert used - ours == {"LoadImage", "SaveImage", "PreviewImage", "ImageScaleBy", "Note"}
    assert set(pack.NODE_CLASS_MAPPINGS) == ours | UNUSED_NODES


def test_template_sizes_snap_to_themselves(pack):
    from nodes._core import schedule_info

    info = schedule_info(1024, 1024)
    assert (info["width"], info["height"], info["tokens"]) == (1024, 1024, 10521)


# ------------------------------------------------------------------------------------------------------------
# Templates: executed


@pytest.mark.parametrize("name, method", RUNS)
def test_workflow_executes_in_process(name, method, env):
    classes = env["classes"]
    prompt = api_prompt(name, classes)
    width, height = SIZE_OVERRIDE.get(name, DEFAULT_OVERRIDE)
    prompt = set_inputs(prompt, "EchoGenSampler", width=width, height=height)
    if method is not None:
        prompt = set_inputs(prompt, "EchoGenSubjectSegmenter", method=method)
    run = execute(prompt, classes)

    from nodes._core import schedule_info

    want = schedule_info(width, height)
    samplers = [nid for nid, n in prompt.items() if n["class_type"] == "EchoGenSampler"]
    for nid in samplers:
        _, w, h = run.outputs[nid]
        assert (w, h) == (want["width"], want["height"])
        assert run.ui[nid]["echogen_size"] == [f"{w}x{h}", want["tokens"]]
    saves = [nid for nid, n in prompt.items() if n["class_type"] == "SaveImage"]
    assert saves
    images = {}
    for nid in saves:
        ew, eh, sampler = expected_size(run, classes, nid)
        files = run.ui[nid]["images"]
        assert len(files) == prompt[sampler]["inputs"]["batch_size"] == 1
        f = files[0]
        path = env["root"] / "output" / f["subfolder"] / f["filename"]
        img = np.asarray(Image.open(path))
        assert img.shape == (eh, ew, 3), (name, nid)
        assert f["filename"].startswith(Path(prompt[nid]["inputs"]["filename_prefix"]).name)
        images[nid] = img
    if name == "infinity_text_to_image":
        assert (want["width"], want["height"]) == (320, 240)
    if name == "echogen_subject_upscale":
        (only,) = images.values()
        assert only.shape[:2] == (2 * want["height"], 2 * want["width"])
    if name == "echogen_guidance_sweep":
        assert len(images) == 3
        arrays = list(images.values())
        assert not any(np.array_equal(a, b) for i, a in enumerate(arrays) for b in arrays[i + 1:]), \
            "gamma_I had no effect on the output"
    if method is not None:
        (seg,) = [nid for nid, n in prompt.items() if n["class_type"] == "EchoGenSubjectSegmenter"]
        prepared, mask, label = run.outputs[seg]
        size = prompt[seg]["inputs"]["size"]
        assert prepared.shape == (1, size, size, 3) and mask.shape == (1, size, size)
        ran = "salient" if method == "auto" else "none"
        assert f"({ran})" in label, label
        if ran == "salient":  # the dog was found: the background was painted white
            assert 0.02 < mask.mean() < 0.98 and (prepared[0][mask[0] < 0.01] > 0.99).all()


def test_bundled_world_workflow_executes(env, tiny_t5_dir, tmp_path, monkeypatch):
    """The no-download template: every loader on the bundled entry, the shipped world photo, 4 images of the
    bundled model's 64x64 (the real bundle when it is built, else tiny random weights in its layout)."""
    from echogen_core import bundled
    from helpers import stand_in_bundle
    from nodes.loaders import BUNDLED

    real = bundled.bundled_available()
    if not real:
        stand_in_bundle(tmp_path / "bundle", tiny_t5_dir)
        monkeypatch.setattr(bundled, "BUNDLE_DIR", tmp_path / "bundle")
    shipped = WORKFLOWS / "echogen_world_reference.png"
    (env["root"] / "input" / shipped.name).write_bytes(shipped.read_bytes())
    classes = env["classes"]
    prompt = api_prompt("echogen_bundled_world", classes)
    loaders = [n for n in prompt.values() if n["class_type"].endswith("Loader")]
    assert len(loaders) == 5 and all(BUNDLED in n["inputs"].values() for n in loaders)
    run = execute(prompt, classes)
    (sampler,) = [nid for nid, n in prompt.items() if n["class_type"] == "EchoGenSampler"]
    assert run.outputs[sampler][1:] == (64, 64)
    (save,) = [nid for nid, n in prompt.items() if n["class_type"] == "SaveImage"]
    files = run.ui[save]["images"]
    assert len(files) == prompt[sampler]["inputs"]["batch_size"] == 4
    images = [np.asarray(Image.open(env["root"] / "output" / f["subfolder"] / f["filename"])) for f in files]
    assert all(im.shape == (64, 64, 3) for im in images)
    assert not np.array_equal(images[0], images[1]), "image i uses seed + i"


def test_converter_skips_ui_only_widget_values(env):
    prompt = api_prompt("echogen_subject_driven", env["classes"])
    (sampler,) = [n for n in prompt.values() if n["class_type"] == "EchoGenSampler"]
    assert sampler["inputs"]["batch_size"] == 1 and "fixed" not in sampler["inputs"].values()
    (photo,) = [n for n in prompt.values() if n["class_type"] == "LoadImage"]
    assert photo["inputs"] == {"image": "echogen_reference.png"}
    assert not [n for n in prompt.values() if n["class_type"] == "Note"]
    # the JSON round trip is what POST /prompt receives
    assert json.loads(json.dumps(prompt)) == prompt


# ------------------------------------------------------------------------------------------------------------
# Node contracts


def _node_classes(pack):
    return sorted(pack.NODE_CLASS_MAPPINGS.items())


def test_input_types_match_function_signatures(pack):
    for name, cls in _node_classes(pack):
        types = cls.INPUT_TYPES()
        assert set(types) <= {"required", "optional", "hidden"}, name
        params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
        params = {k: p for k, p in params.items() if k != "self"}
        declared = {k: section for section in types for k in types[section]}
        assert set(params) == set(declared), (name, set(params) ^ set(declared))
        for key, section in declared.items():
            p = params[key]
            if section == "required":
                # ComfyUI always passes required inputs. A Python default is allowed only as a convenience for
                # direct calls and must then equal the widget's own default.
                if p.default is not inspect.Parameter.empty:
                    spec = types[section][key]
                    opts = spec[1] if len(spec) > 1 else {}
                    assert "default" in opts and opts["default"] == p.default, (name, key, p.default)
            else:
                assert p.default is not inspect.Parameter.empty, (name, key, "optional/hidden input needs a default")
                spec = types[section][key]
                opts = spec[1] if isinstance(spec, tuple) and len(spec) > 1 else {}
                if "default" in opts:
                    assert opts["default"] == p.default, (name, key)


def test_outputs_and_metadata(pack):
    for name, cls in _node_classes(pack):
        n = len(cls.RETURN_TYPES)
        assert isinstance(cls.RETURN_TYPES, tuple) and n, name
        for attr in ("RETURN_NAMES", "OUTPUT_TOOLTIPS"):
            if hasattr(cls, attr):
                assert len(getattr(cls, attr)) == n, (name, attr)
        assert cls.CATEGORY.startswith("EchoGen/"), name
        assert isinstance(getattr(cls, "DESCRIPTION", None), str) and cls.DESCRIPTION, name
        assert callable(getattr(cls, cls.FUNCTION)), name
        assert name in pack.NODE_DISPLAY_NAME_MAPPINGS, name


def test_every_input_has_a_tooltip(pack):
    for name, cls in _node_classes(pack):
        types = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for key, spec in (types.get(section) or {}).items():
                opts = spec[1] if len(spec) > 1 else {}
                assert opts.get("tooltip"), (name, key)


def test_seed_has_control_after_generate(pack):
    seed = pack.NODE_CLASS_MAPPINGS["EchoGenSampler"].INPUT_TYPES()["required"]["seed"]
    assert seed[0] == "INT" and seed[1]["control_after_generate"] is True


def test_image_outputs_are_comfyui_images(env):
    """The segmenter takes and gives ComfyUI IMAGE/MASK; one image arriving without a batch dim still works."""
    seg = env["classes"]["EchoGenSubjectSegmenter"]()
    image = torch.rand(1, 48, 40, 3)
    out = seg.segment(image, method="none", subject_words="", crop="official", size=64)
    prepared, mask, label = out["result"]
    assert prepared.dtype == torch.float32 and prepared.shape == (1, 64, 64, 3)
    assert mask.dtype == torch.float32 and mask.shape == (1, 64, 64) and "none" in label
    assert out["ui"]["text"] == [label]
