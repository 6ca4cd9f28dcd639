"""js/echogen.js and the server side it talks to.

- It imports only ComfyUI's supported surface (scripts/app.js, scripts/api.js) by paths that resolve from
  the URL the server gives it (/extensions/<pack folder>/echogen.js, WEB_DIRECTORY = ./js).
- Run under Node with stand-ins for app/api: it labels the sampler's width/height with the size the route
  payload announces, debounced, and stays silent (no exception, labels untouched) when the route is missing.
- The route's payload (`nodes._core.schedule_info`) is the size the sampler really produces.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import textwrap
from pathlib import Path
from urllib.parse import urljoin

import pytest

ROOT = Path(__file__).resolve().parents[1]
JS = ROOT / "js" / "echogen.js"
NODE = shutil.which("node")


def js_imports(source: str) -> set[str]:
    static = re.findall(r"""^\s*import\s[^;]*?from\s+["']([^"']+)["']""", source, flags=re.M)
    bare = re.findall(r"""^\s*import\s+["']([^"']+)["']""", source, flags=re.M)
    dynamic = re.findall(r"""\bimport\s*\(\s*["'`]([^"'`]+)""", source)
    return set(static) | set(bare) | set(dynamic)


def test_imports_only_app_and_api_from_the_served_location():
    import importlib.util

    spec = importlib.util.spec_from_file_location("echogen_pack_entry", ROOT / "__init__.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    web_dir = (ROOT / entry.WEB_DIRECTORY).resolve()
    assert JS.parent == web_dir
    files = sorted(p.relative_to(web_dir).as_posix() for p in web_dir.rglob("*.js"))
    assert files == ["echogen.js"]
    imports = js_imports(JS.read_text())
    assert imports == {"../../scripts/app.js", "../../scripts/api.js"}
    served = "http://127.0.0.1:8188/extensions/ComfyUI-EchoGen/echogen.js"
    assert {urljoin(served, i) for i in imports} == {"http://127.0.0.1:8188/scripts/app.js",
                                                     "http://127.0.0.1:8188/scripts/api.js"}


DRIVER = textwrap.dedent("""
    import { extensions, state } from "./scripts/app.js";
    await import("./extensions/ComfyUI-EchoGen/echogen.js");
    const payloads = JSON.parse(process.argv[2]);
    const mode = process.argv[3];
    state.fetch = async (url) => {
      state.calls.push(url);
      if (mode === "throws") throw new Error("network down");
      if (mode === "missing") return { ok: false, status: 404, json: async () => ({}) };
      const q = new URL(url, "http://x").searchParams;
      const body = payloads[`${q.get("width")}x${q.get("height")}`];
      return { ok: true, json: async () => body };
    };
    const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
    class Node { constructor() {
      this.widgets = ["model", "width", "height", "seed"].map((name) => ({ name, value: 1024, callback: null }));
      this.widgets[1].label = "width";  // a localized label must survive as the prefix
    } setDirtyCanvas() {} }
    const [ext] = extensions;
    const other = function () {};
    await ext.beforeRegisterNodeDef(other, { name: "KSampler" });
    await ext.beforeRegisterNodeDef(Node, { name: "EchoGenSampler" });
    const node = new Node();
    node.onNodeCreated();
    const [w, h] = [node.widgets[1], node.widgets[2]];
    // user edits: three quick changes, one request for the last
    w.value = 300; w.callback(300); w.value = 400; w.callback(400); h.value = 250; h.callback(250);
    await sleep(600);
    const result = { calls: state.calls, width: w.label ?? null, height: h.label ?? null,
                     otherTouched: other.prototype.onNodeCreated !== undefined };
    node.onExecuted({ echogen_size: ["1024x1024", 10521] });
    result.executed = [w.label ?? null, h.label ?? null];
    console.log(JSON.stringify(result));
""")


def run_js(tmp_path: Path, payloads: dict, mode: str) -> dict:
    (tmp_path / "scripts").mkdir(exist_ok=True)
    (tmp_path / "extensions" / "ComfyUI-EchoGen").mkdir(parents=True, exist_ok=True)
    (tmp_path / "package.json").write_text('{"type": "module"}')
    (tmp_path / "scripts" / "app.js").write_text(
        "export const extensions = []; export const state = { calls: [], fetch: null };\n"
        "export const app = { registerExtension: (e) => extensions.push(e) };\n")
    (tmp_path / "scripts" / "api.js").write_text(
        'import { state } from "./app.js";\nexport const api = { fetchApi: (url) => state.fetch(url) };\n')
    shutil.copy(JS, tmp_path / "extensions" / "ComfyUI-EchoGen" / "echogen.js")
    (tmp_path / "driver.js").write_text(DRIVER)
    res = subprocess.run([NODE, "driver.js", json.dumps(payloads), mode], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(NODE is None, reason="Node.js is not installed")
def test_js_labels_width_and_height_with_the_real_size(tmp_path):
    from nodes._core import schedule_info

    info = schedule_info(400, 250)
    out = run_js(tmp_path, {"400x250": info}, "ok")
    assert out["calls"] == ["/echogen/schedule?width=400&height=250"]  # debounced: one request
    assert out["width"] == f"width → {info['width']}"
    assert out["height"] == f"height → {info['height']} · {info['tokens']} tokens"
    assert out["executed"] == ["width → 1024", "height → 1024 · 10521 tokens"]
    assert not out["otherTouched"]


@pytest.mark.skipif(NODE is None, reason="Node.js is not installed")
@pytest.mark.parametrize("mode", ["missing", "throws"])
def test_js_is_silent_without_the_route(tmp_path, mode):
    out = run_js(tmp_path, {}, mode)
    assert len(out["calls"]) == 1
    assert out["width"] == "width" and out["height"] is None  # untouched


# ------------------------------------------------------------------------------------------------------------
# The route's payload is what the sampler really does


@pytest.fixture(scope="module")
def sampler_inputs(tmp_path_factory, tiny_t5_dir):
    from workflow_runner import write_tiny_models

    models = write_tiny_models(tmp_path_factory.mktemp("models"), tiny_t5_dir)
    mp = pytest.MonkeyPatch()
    mp.setenv("ECHOGEN_MODELS_DIR", str(models))
    mp.setenv("ECHOGEN_DEVICE", "cpu")
    import nodes

    m = nodes.NODE_CLASS_MAPPINGS
    (model,) = m["EchoGenModelLoader"]().load("infinity_2b_reg.pth", "auto")
    (vae,) = m["EchoGenVAELoader"]().load("infinity_vae_d32reg.pth")
    (t5,) = m["EchoGenTextEncoderLoader"]().load("flan-t5-xl", "auto")
    (text,) = m["EchoGenTextEncode"]().encode(t5, "a red cube on a table")
    yield m, model, vae, text
    mp.undo()


@pytest.mark.parametrize("width, height", [(330, 250), (200, 380), (256, 256)])
def test_schedule_info_is_the_sampler_size(sampler_inputs, width, height):
    from nodes._core import schedule_info

    m, model, vae, text = sampler_inputs
    out = m["EchoGenSampler"]().sample(model, vae, text, width, height, 0, 1)
    latent, w, h = out["result"]
    info = schedule_info(width, height)
    assert (w, h) == (info["width"], info["height"])
    assert out["ui"]["echogen_size"] == [f"{w}x{h}", info["tokens"]]
    (image,) = m["EchoGenDecode"]().decode(vae, latent)
    assert tuple(image.shape) == (1, h, w, 3)
    assert info["tokens"] == sum(a * b for a, b in _grids(info))


def _grids(info):
    from echogen_core.schedules import nearest_schedule

    return nearest_schedule(info["width"], info["height"]).grids


def test_schedule_info_for_large_requests():
    from nodes._core import schedule_info

    assert {k: schedule_info(1024, 1024)[k] for k in ("width", "height", "scales", "tokens")} == \
        {"width": 1024, "height": 1024, "scales": 13, "tokens": 10521}
    for width, height in [(1920, 1080), (768, 1344), (4096, 64)]:
        info = schedule_info(width, height)
        assert info["width"] * info["height"] <= 1024 * 1024 * 1.05
        assert (info["width"] >= info["height"]) == (width >= height)
        assert json.loads(json.dumps(info)) == info  # what the route sends
