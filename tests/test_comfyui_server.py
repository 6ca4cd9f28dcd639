"""End to end against a real ComfyUI server, when COMFYUI_DIR points to a ComfyUI checkout.

    COMFYUI_DIR=/path/to/ComfyUI [COMFYUI_PYTHON=/path/to/its/python] python -m pytest tests/test_comfyui_server.py

The pack is linked into a temporary custom_nodes folder (--base-directory keeps custom_nodes, input, output,
temp and user data out of the checkout), the tiny random-weight models are written to a temporary models
folder mapped by an extra_model_paths.yaml (as users map their own folders), and the server runs
`main.py --cpu --listen 127.0.0.1 --port <free> --disable-auto-launch` in its own session. The tests check
that every node of the pack is listed by /object_info with the model files in its dropdowns, that the JS
extension and the /echogen/schedule route are served, then queue each template (converted to API form with
the server's own node definitions) through POST /prompt, poll /history and read the images back via /view:
each SaveImage image has the size its sampler announced. The samplers ask for 256x256 (or 330x250 for
text-to-image) instead of the templates' 1024x1024, set in the API prompt only, to keep CPU time short.

With a Chromium on PATH (or CHROMIUM=...), a headless browser also opens the server's own frontend, where a
test-only extension (written next to the pack in the temporary custom_nodes) loads every template with
app.loadGraphData: no missing nodes, no page errors, js/echogen.js registered and labelling the sampler's
width/height, re-saving gives the same sockets, links and widget values, and app.graphToPrompt gives the
same API prompt as tests/workflow_runner.ui_to_api.

Ran here on ComfyUI v0.3.64 (frontend 1.27.10), Python 3.11 venv with torch 2.13.0 CPU (pinned by a
constraints file), `requests`, no torchaudio, and the torchvision op-schema shim of specs/comfyui.md 8.1.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from io import BytesIO
from pathlib import Path

import pytest
from PIL import Image

from workflow_runner import load_workflow, set_inputs, ui_to_api, write_tiny_models

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
TEMPLATES = ["infinity_text_to_image", "echogen_subject_driven", "echogen_subject_upscale", "echogen_guidance_sweep"]
ALL_TEMPLATES = TEMPLATES + ["echogen_bundled_world"]  # queued below: the four that run on tiny official-layout files
SIZE = {"infinity_text_to_image": (330, 250)}
DEFAULT_SIZE = (256, 256)
PACK_FOLDER = "ComfyUI-EchoGen"
DOG = ROOT.parent / "shared" / "dreambench" / "dataset" / "dog" / "00.jpg"
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
PYTHON = os.environ.get("COMFYUI_PYTHON") or sys.executable
START_TIMEOUT = float(os.environ.get("COMFYUI_START_TIMEOUT", 180))
PROMPT_TIMEOUT = float(os.environ.get("COMFYUI_PROMPT_TIMEOUT", 300))

pytestmark = pytest.mark.skipif(
    not COMFYUI_DIR or not (Path(COMFYUI_DIR) / "main.py").is_file(),
    reason="end-to-end ComfyUI test: set COMFYUI_DIR to a ComfyUI checkout (and COMFYUI_PYTHON to its Python "
           "if that is not this one)")


PROBE_FOLDER = "echogen_frontend_probe"
PROBE_PY = '''"""Test-only pack: serves the templates to a browser and collects what the real frontend makes of them."""
import json
import pathlib

from aiohttp import web
from server import PromptServer

NODE_CLASS_MAPPINGS = {}
WEB_DIRECTORY = "./js"
RESULTS = []
WORKFLOWS = pathlib.Path(__file__).with_name("workflows.json")


@PromptServer.instance.routes.get("/echogen_probe/workflows")
async def workflows(request):
    return web.json_response(json.loads(WORKFLOWS.read_text()))


@PromptServer.instance.routes.post("/echogen_probe/result")
async def result(request):
    RESULTS.append(await request.json())
    return web.json_response({})


@PromptServer.instance.routes.get("/echogen_probe/results")
async def results(request):
    return web.json_response(RESULTS)
'''
PROBE_JS = """
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const errors = [];
window.addEventListener("error", (e) => errors.push(String(e.message)));
window.addEventListener("unhandledrejection", (e) => errors.push(String(e.reason)));

async function run() {
  await sleep(1500);
  const workflows = await (await api.fetchApi("/echogen_probe/workflows")).json();
  for (const [name, wf] of Object.entries(workflows)) {
    const result = { name };
    try {
      await app.loadGraphData(structuredClone(wf), true, true, name);
      await sleep(1500);  // the EchoGen extension's debounce + fetch
      const nodes = app.graph.nodes ?? app.graph._nodes;
      result.nodes = nodes.map((n) => ({ id: n.id, type: n.type, errors: !!n.has_errors,
        widgets: (n.widgets ?? []).map((w) => [w.name, w.value, w.label ?? null]) }));
      const p = await app.graphToPrompt();
      result.output = p.output;
      result.saved = { links: p.workflow.links, widgets: Object.fromEntries(p.workflow.nodes.map((n) => [n.id, n.widgets_values ?? []])),
                       inputs: Object.fromEntries(p.workflow.nodes.map((n) => [n.id, n.inputs ?? []])),
                       outputs: Object.fromEntries(p.workflow.nodes.map((n) => [n.id, n.outputs ?? []])) };
    } catch (e) {
      result.error = String(e?.stack ?? e);
    }
    result.extensions = (app.extensions ?? []).map((e) => e.name);
    result.errors = errors.slice();
    await api.fetchApi("/echogen_probe/result", { method: "POST", body: JSON.stringify(result) });
  }
}

app.registerExtension({ name: "EchoGen.TestProbe", async setup() { run(); } });
"""


def write_probe_pack(folder: Path) -> None:
    (folder / "js").mkdir(parents=True)
    (folder / "__init__.py").write_text(PROBE_PY)
    (folder / "js" / "probe.js").write_text(PROBE_JS)
    (folder / "workflows.json").write_text(json.dumps({n: load_workflow(WORKFLOWS / f"{n}.json") for n in ALL_TEMPLATES}))


def browser() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium-headless-shell", "chromium", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path, base: Path):
        self.url, self.proc, self.log, self.base = url, proc, log, base

    def get(self, path: str, raw: bool = False, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            data = r.read()
        return data if raw else json.loads(data)

    def post(self, path: str, body: dict, timeout: float = 30):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_t5_dir):
    if not DOG.is_file():
        pytest.skip(f"DreamBench photo {DOG} is absent")
    tmp = tmp_path_factory.mktemp("comfyui")
    base = tmp / "base"
    for d in ("custom_nodes", "input", "output", "temp", "user", "models"):
        (base / d).mkdir(parents=True)
    (base / "custom_nodes" / PACK_FOLDER).symlink_to(ROOT, target_is_directory=True)
    write_probe_pack(base / "custom_nodes" / PROBE_FOLDER)
    Image.open(DOG).convert("RGB").save(base / "input" / "echogen_reference.png")
    shipped = WORKFLOWS / "echogen_world_reference.png"   # the bundled template's photo
    (base / "input" / shipped.name).write_bytes(shipped.read_bytes())
    models = write_tiny_models(tmp / "models", tiny_t5_dir)
    config = tmp / "extra_model_paths.yaml"
    config.write_text(f"echogen_test:\n    base_path: {models}\n    echogen: echogen\n"
                      "    text_encoders: text_encoders\n    vae: vae\n")
    port = free_port()
    log = tmp / "server.log"
    env = {k: v for k, v in os.environ.items() if k not in ("ECHOGEN_MODELS_DIR", "ECHOGEN_DEVICE")}
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
           "--base-directory", str(base), "--input-directory", str(base / "input"),
           "--output-directory", str(base / "output"), "--temp-directory", str(base / "temp"),
           "--extra-model-paths-config", str(config)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=COMFYUI_DIR, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    srv = Server(f"http://127.0.0.1:{port}", proc, log, base)
    try:
        deadline = time.time() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited with {proc.returncode} while starting:\n{srv.log_tail()}")
            try:
                srv.get("/object_info", timeout=10)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                if time.time() > deadline:
                    pytest.fail(f"ComfyUI did not answer /object_info within {START_TIMEOUT:.0f} s:\n{srv.log_tail()}")
                time.sleep(0.5)
        yield srv
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info", timeout=60)


def test_every_node_is_listed_with_the_model_files(server, object_info):
    import nodes

    missing = set(nodes.NODE_CLASS_MAPPINGS) - set(object_info)
    assert not missing, f"not registered: {sorted(missing)}\n{server.log_tail()}"
    failed = [l for l in server.log.read_text(errors="replace").splitlines() if "IMPORT FAILED" in l]
    assert not [l for l in failed if PACK_FOLDER in l], failed  # core audio nodes may fail without torchaudio
    for name in nodes.NODE_CLASS_MAPPINGS:
        info = object_info[name]
        assert info["category"].startswith("EchoGen/")
        assert info["python_module"].startswith("custom_nodes.")
        assert info["display_name"] == nodes.NODE_DISPLAY_NAME_MAPPINGS[name]

    def choices(node, section, key):
        spec = object_info[node]["input"][section][key]
        return spec[0] if isinstance(spec[0], list) else spec[1].get("options", [])

    files = set(choices("EchoGenModelLoader", "required", "model_name"))
    assert {"infinity_2b_reg.pth", "echogen_2b.pth", "infinity_vae_d32reg.pth"} <= files
    assert "dinov2_vitb14_pretrain.pth" in choices("EchoGenSemanticEncoderLoader", "required", "dinov2_name")
    assert choices("EchoGenTextEncoderLoader", "required", "folder") == ["flan-t5-xl", "bundled: echogen-world-tiny"]
    assert "ae.safetensors" in choices("EchoGenContentEncoderLoader", "required", "vae_name")
    for core in ("LoadImage", "SaveImage", "PreviewImage", "ImageScaleBy"):
        assert core in object_info


def test_frontend_extension_and_route_are_served(server):
    from nodes._core import schedule_info

    scripts = server.get("/extensions")
    assert f"/extensions/{PACK_FOLDER}/echogen.js" in scripts
    assert b"registerExtension" in server.get(f"/extensions/{PACK_FOLDER}/echogen.js", raw=True)
    for width, height in ((1000, 600), (1024, 1024)):
        assert server.get(f"/echogen/schedule?width={width}&height={height}") == schedule_info(width, height)
    with pytest.raises(urllib.error.HTTPError) as e:
        server.get("/echogen/schedule?width=abc&height=1")
    assert e.value.code == 400
    # the template browser lists the workflows under the pack folder's name
    assert sorted(server.get("/api/workflow_templates")[PACK_FOLDER]) == sorted(ALL_TEMPLATES)
    served = server.get(f"/api/workflow_templates/{PACK_FOLDER}/{TEMPLATES[0]}.json")
    assert served == load_workflow(WORKFLOWS / f"{TEMPLATES[0]}.json")


def _wait_history(server: Server, prompt_id: str) -> dict:
    deadline = time.time() + PROMPT_TIMEOUT
    while time.time() < deadline:
        history = server.get(f"/history/{prompt_id}")
        if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
            entry = history[prompt_id]
            if entry["status"].get("status_str") in ("success", "error"):
                return entry
        if server.proc.poll() is not None:
            pytest.fail(f"ComfyUI died:\n{server.log_tail()}")
        time.sleep(0.5)
    pytest.fail(f"prompt {prompt_id} did not finish in {PROMPT_TIMEOUT:.0f} s:\n{server.log_tail()}")


def _announced(prompt: dict, outputs: dict, nid: str) -> tuple[int, int]:
    """Size an image reaching node nid must have: the upstream sampler's ui size, times any ImageScaleBy."""
    src, scale = prompt[nid]["inputs"]["images"][0], 1.0
    while prompt[src]["class_type"] == "ImageScaleBy":
        scale *= prompt[src]["inputs"]["scale_by"]
        src = prompt[src]["inputs"]["image"][0]
    assert prompt[src]["class_type"] == "EchoGenDecode"
    sampler = prompt[src]["inputs"]["latent"][0]
    size, _tokens = outputs[sampler]["echogen_size"]
    w, h = (int(v) for v in size.split("x"))
    return round(w * scale), round(h * scale)


def _needs_real_bundle(name):
    from echogen_core.bundled import bundled_available

    if name not in TEMPLATES and not bundled_available():
        pytest.skip("the bundled model's files are not in this checkout")


@pytest.mark.parametrize("name", ALL_TEMPLATES)
def test_workflow_runs_on_the_server(server, object_info, name):
    from nodes._core import schedule_info

    _needs_real_bundle(name)
    workflow = load_workflow(WORKFLOWS / f"{name}.json")
    prompt = ui_to_api(workflow, object_info)  # the server's own node definitions
    if name in TEMPLATES:
        width, height = SIZE.get(name, DEFAULT_SIZE)
        prompt = set_inputs(prompt, "EchoGenSampler", width=width, height=height)
    status, reply = server.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex,
                                            "extra_data": {"extra_pnginfo": {"workflow": workflow}}})
    assert status == 200 and not reply.get("node_errors"), (reply, server.log_tail())
    entry = _wait_history(server, reply["prompt_id"])
    errors = [m[1] for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
    assert entry["status"]["status_str"] == "success", "\n".join(
        f"{e.get('node_type')}: {e.get('exception_type')}: {e.get('exception_message')}\n"
        + "".join(e.get("traceback", [])) for e in errors) or server.log_tail()
    outputs = entry["outputs"]
    # the bundled model samples at the one size it was trained at (64 x 64, 3 scales, 21 tokens)
    want = schedule_info(width, height) if name in TEMPLATES else {"width": 64, "height": 64, "tokens": 21}
    samplers = [nid for nid, n in prompt.items() if n["class_type"] == "EchoGenSampler"]
    for nid in samplers:
        assert outputs[nid]["echogen_size"] == [f"{want['width']}x{want['height']}", want["tokens"]]
    saves = [nid for nid, n in prompt.items() if n["class_type"] == "SaveImage"]
    assert saves and len(saves) == (3 if name == "echogen_guidance_sweep" else 1)
    for nid in saves:
        images = outputs[nid]["images"]
        assert len(images) == (1 if name in TEMPLATES else 4)
        image = images[0]
        query = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image["subfolder"],
                                        "type": image["type"]})
        png = Image.open(BytesIO(server.get(f"/view?{query}", raw=True)))
        assert png.size == _announced(prompt, outputs, nid), (name, nid)
        assert png.mode == "RGB"
        assert image["filename"].startswith(Path(prompt[nid]["inputs"]["filename_prefix"]).name)
        assert "workflow" in png.info and "prompt" in png.info  # SaveImage embeds both
    if name == "echogen_subject_upscale":
        (nid,) = saves
        assert _announced(prompt, outputs, nid) == (2 * want["width"], 2 * want["height"])
    for nid, n in prompt.items():
        if n["class_type"] == "EchoGenSubjectSegmenter":
            words = "dog" if name in TEMPLATES else "star"
            assert outputs[nid]["text"][0].startswith(f"{words} (")  # e.g. "dog (salient)": what ran


def test_templates_load_in_the_real_frontend(server, object_info, tmp_path):
    """Headless Chromium opens the server's own frontend; a test-only extension loads each template with
    app.loadGraphData, reads the nodes and widgets back, and converts it with app.graphToPrompt."""
    exe = browser()
    if exe is None:
        pytest.skip("no Chromium (set CHROMIUM or install chromium-headless-shell)")
    proc = subprocess.Popen([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1600,1000", server.url + "/"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 180
        results = []
        while len(results) < len(ALL_TEMPLATES) and time.time() < deadline:
            time.sleep(1)
            results = server.get("/echogen_probe/results")
    finally:
        _stop(proc)
    assert len(results) == len(ALL_TEMPLATES), f"the frontend reported {len(results)} of {len(ALL_TEMPLATES)} templates"
    for r in results:
        name = r["name"]
        assert "error" not in r, r.get("error")
        assert "EchoGen.SamplerSize" in r["extensions"], "js/echogen.js did not register"
        assert not r["errors"], r["errors"]
        workflow = load_workflow(WORKFLOWS / f"{name}.json")
        assert sorted(n["id"] for n in r["nodes"]) == sorted(n["id"] for n in workflow["nodes"])
        assert not [n for n in r["nodes"] if n["errors"]], name
        # the frontend and our converter agree on the API prompt
        ours = ui_to_api(workflow, object_info)
        theirs = r["output"]
        assert {k: (v["class_type"], v["inputs"]) for k, v in theirs.items()} == \
            {k: (v["class_type"], v["inputs"]) for k, v in ours.items()}, name
        # saving it again gives back the same widget values and links
        assert r["saved"]["widgets"] == {str(n["id"]): n["widgets_values"] for n in workflow["nodes"]}, name
        assert sorted(map(tuple, r["saved"]["links"])) == sorted(map(tuple, workflow["links"])), name
        for n in workflow["nodes"]:  # and the same sockets (slot order, types, optional shape, links)
            assert r["saved"]["inputs"][str(n["id"])] == n["inputs"], (name, n["type"])
            assert [{k: o[k] for k in ("name", "type", "links")} for o in r["saved"]["outputs"][str(n["id"])]] == \
                [{k: o[k] for k in ("name", "type", "links")} for o in n["outputs"]], (name, n["type"])
        from nodes._core import schedule_info

        for node in r["nodes"]:
            if node["type"] == "EchoGenSampler":
                labels = {w[0]: w[2] for w in node["widgets"]}
                # the label shows the official schedules' snapping (the bundled template asks for 64 -> 256)
                want = schedule_info(1024, 1024) if name in TEMPLATES else schedule_info(64, 64)
                assert labels["width"] == f"width → {want['width']}", labels
                assert labels["height"] == f"height → {want['height']} · {want['tokens']} tokens", labels
