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
