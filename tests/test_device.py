"""The device side: a build exported on a workstation (--export-only) is built, checked against its
stored reference outputs and profiled by `python -m vitfold.device`, with torch, timm and
onnx-graphsurgeon unimportable, as on a Jetson."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, deploy

#: Runs the device command with the workstation-only packages blocked at import.
BLOCKED_RUNNER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "timm", "onnx_graphsurgeon", "torchvision"):
            raise ImportError(f"{name} is blocked: the device side must not import it")
sys.meta_path.insert(0, Block())
from vitfold.device import main
code = main(sys.argv[1:])
assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "timm", "onnx_graphsurgeon")]
sys.exit(code)
"""


def device(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKED_RUNNER, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=900)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_export_on_the_workstation_build_on_the_device(backend, tmp_path):
    out = tmp_path / "exported"
    result = deploy("build", "--model", "vit_tiny_patch16_224", "--img-size", "64", "--r", "1", "--backend", backend,
                    "--export-only", "--out", str(out), "--min-runs", "3", "--min-seconds", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "python -m vitfold.device build" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "exported" and "backend" not in manifest["files"]
    assert not (out / "report.json").exists() and (out / "reference.npy").is_file()
    not_built = device("profile", str(out))
    assert not_built.returncode == 2 and "python -m vitfold.device build" in not_built.stderr

    result = device("build", str(out))
    assert result.returncode == 0, result.stderr + result.stdout
    for where in (out, out / "dense"):
        built = json.loads((where / "manifest.json").read_text())
        assert built["stage"] == "built on the device" and "backend" in built["files"]
        assert built["checks"]["backend_vs_torch"]["max_abs"] <= built["checks"]["tolerance"]["max_abs"]
    report = json.loads((out / "report.json").read_text())
    assert report["speedup"] > 0 and report["flop_ratio"] > 1
    assert "speedup" in result.stdout

    again = device("profile", str(out))
    assert again.returncode == 0, again.stderr


def test_a_tampered_export_is_refused_on_the_device(tmp_path):
    out = tmp_path / "exported"
    result = deploy("build", "--model", "vit_tiny_patch16_224", "--img-size", "64", "--r", "1", "--backend", "onnxruntime",
                    "--export-only", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    (out / "model.opt.onnx").write_bytes((out / "model.opt.onnx").read_bytes()[:-10])
    result = device("build", str(out))
    assert result.returncode == 2 and "sha256" in result.stderr and not (out / "model.ort.onnx").exists()


def _python_3_8():
    """A working Python 3.8 interpreter (JetPack 5's), from $VITFOLD_PYTHON38, pyenv or PATH; None if none."""
    import glob
    import os
    import shutil

    candidates = [os.environ.get("VITFOLD_PYTHON38"), *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.8*/bin/python"))),
                  shutil.which("python3.8")]
    for candidate in filter(None, candidates):
        probe = subprocess.run([candidate, "-c", "import sys; assert sys.version_info[:2] == (3, 8)"], capture_output=True)
        if probe.returncode == 0:
            return candidate
    return None


@pytest.mark.slow
@pytest.mark.skipif(_python_3_8() is None, reason="no Python 3.8 here (set VITFOLD_PYTHON38 to one)")
def test_python_3_8_installs_the_runtime_side_and_builds_on_the_device(tmp_path):
    """JetPack 5's Python: `pip install .[onnxruntime]` brings numpy, Pillow and ONNX Runtime only (no
    torch, onnx or click), the device command builds, checks and profiles an exported build, and the
    export command says to export on a workstation. Needs the package index (ONNX Runtime for 3.8)."""
    import shutil

    source = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    venv = tmp_path / "py38"
    subprocess.run([_python_3_8(), "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", f"{source}[onnxruntime]"], capture_output=True,
                             text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-3000:]
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True).stdout
    installed = {line.split("==")[0].lower() for line in listed.split()}
    assert {"numpy", "pillow", "onnxruntime", "vitfold"} <= installed
    assert not installed & {"torch", "timm", "onnx", "click", "rich", "matplotlib"}, installed

    out = tmp_path / "exported"
    result = deploy("build", "--model", "vit_tiny_patch16_224", "--img-size", "64", "--r", "1", "--backend", "onnxruntime",
                    "--export-only", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    result = subprocess.run([str(python), "-m", "vitfold.device", "build", str(out)], capture_output=True, text=True,
                            cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr + result.stdout
    built = json.loads((out / "manifest.json").read_text())
    device_ort = subprocess.run([str(python), "-c", "import onnxruntime; print(onnxruntime.__version__)"],
                                capture_output=True, text=True).stdout.strip()
    assert built["stage"] == "built on the device" and built["versions"]["onnxruntime"] == device_ort
    report = json.loads((out / "report.json").read_text())
    assert report["graph_gmacs"] == {"dense": None, "reduced": None} and report["flop_ratio"] > 1
    per_layer = subprocess.run([str(python), "-m", "vitfold.device", "profile", str(out), "--per-layer"],
                               capture_output=True, text=True, cwd=tmp_path)
    assert per_layer.returncode == 2 and "pip install onnx" in per_layer.stderr

    cli = subprocess.run([str(venv / "bin" / "vitfold"), "build"], capture_output=True, text=True, cwd=tmp_path)
    assert cli.returncode == 2 and "Python >= 3.10" in cli.stderr and "vitfold.device build" in cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1
