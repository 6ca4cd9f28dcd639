import ast
import importlib
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_core_never_imports_comfyui():
    for path in (ROOT / "echogen_core").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in {"comfy", "folder_paths", "nodes", "comfy_extras", "server"}, (path, name)


def test_pack_imports_without_comfyui():
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('echogen_pack', "
            f"r'{ROOT / '__init__.py'}', submodule_search_locations=[r'{ROOT}']); m = importlib.util.module_from_spec(spec); "
            "sys.modules['echogen_pack'] = m; spec.loader.exec_module(m); "
            "assert isinstance(m.NODE_CLASS_MAPPINGS, dict); assert m.WEB_DIRECTORY == './js'; "
            "assert not any(k.startswith('comfy') for k in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_requirements_never_pin_torch():
    lines = [l.strip().lower() for l in (ROOT / "requirements.txt").read_text().splitlines()]
    assert not any(l.startswith(("torch", "torchvision", "torchaudio")) for l in lines)


def test_pyproject_passes_the_registry_rules():
    import re
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project, comfy = data["project"], data["tool"]["comfy"]
    assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,99}", project["name"]) and "comfyui" not in project["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["urls"]["Repository"].startswith("https://")
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert all(comfy.get(k, "x") for k in ("Icon", "requires-comfyui"))  # present ones are non-empty
    requirements = {l.split(">")[0].split("=")[0].strip().lower() for l in (ROOT / "requirements.txt").read_text().splitlines()
                    if l.strip() and not l.startswith("#")}
    declared = {re.split(r"[<>=~!\[]", d)[0].strip().lower() for d in project["dependencies"]}
    assert declared == requirements  # the registry installs from pyproject, the Manager from requirements.txt
    assert not declared & {"torch", "torchvision", "torchaudio"}


def test_no_eval_or_exec_in_shipped_code():
    """The registry's scanner rejects eval/exec (ruff S102/S307)."""
    for path in list((ROOT / "echogen_core").rglob("*.py")) + list((ROOT / "nodes").rglob("*.py")):
        tree = ast.parse(path.read_text())
        calls = [n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
        assert not {"eval", "exec"} & set(calls), path
