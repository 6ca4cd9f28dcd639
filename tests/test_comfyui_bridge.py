"""The bridge against real ComfyUI model management (skipped unless COMFYUI_DIR points to a ComfyUI checkout;
COMFYUI_PYTHON names the Python it runs with). Checks that our models are visible to ComfyUI: loading registers
them in model management, the encoders' offload hands them back, and "Unload models" frees them (EchoGen's
content cache included)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run")

SCRIPT = textwrap.dedent('''
    import importlib.util, sys
    sys.argv = ["main.py", "--cpu"]
    sys.path.insert(0, {comfy!r})
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.model_management as mm
    import folder_paths
    spec = importlib.util.spec_from_file_location("echogen_pack", {init!r}, submodule_search_locations=[{root!r}])
    pack = importlib.util.module_from_spec(spec); sys.modules["echogen_pack"] = pack; spec.loader.exec_module(pack)
    bridge = sys.modules["echogen_pack.nodes.comfy_bridge"]
    core = sys.modules["echogen_pack.echogen_core.infinity"]
    assert bridge.in_comfyui()
    model = core.Infinity(core.InfinityConfig.tiny())
    m = bridge.Managed(model, model, name="tiny")
    listed = lambda: any(l.model is m.patcher for l in mm.current_loaded_models)
    assert m.get() is model and listed(), "not registered with model management"
    assert m.patcher.model.inner is model and m.patcher.model_size() > 0
    m.offload()
    assert not listed(), "offload did not hand the model back"
    m.get(); mm.unload_all_models()
    assert not listed(), "Unload models did not free it"
    assert any(p.endswith("echogen") for p in folder_paths.get_folder_paths("echogen"))
    # EchoGen's content cache (K/V kept between runs) goes with the weights: full and partial unloads
    import torch
    echogen = sys.modules["echogen_pack.echogen_core.echogen"]
    text_encoder = sys.modules["echogen_pack.echogen_core.text_encoder"]
    model = echogen.EchoGen(echogen.EchoGenConfig.tiny()).eval()
    m = bridge.Managed(model, model, name="tiny echogen")
    text = text_encoder.TextConditioning(torch.randn(1, 4, 128), torch.tensor([4]))

    def fill():
        with torch.no_grad():
            m.get().encode_conditions(text, model.null_subject(1))
        assert len(model.content_cache) == 1

    fill(); mm.unload_all_models()
    assert len(model.content_cache) == 0, "a full unload kept the content cache"
    fill(); m.patcher.partially_unload(m.patcher.offload_device, 1)
    assert len(model.content_cache) == 0, "a partial unload kept the content cache"
    print("ok")
''')


def test_models_are_managed_by_comfyui():
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    code = SCRIPT.format(comfy=COMFYUI_DIR, init=str(ROOT / "__init__.py"), root=str(ROOT))
    res = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300, cwd=COMFYUI_DIR)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
