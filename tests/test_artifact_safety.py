"""A user trying to break `profile`: corrupt files, read-only builds, noise alarms, headless builds.

Two tiny builds are made once per module (OpenVINO classification, ONNX Runtime headless) and copied
into temporary directories before each test corrupts its copy.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import deploy, tiny_vit
from vitfold.artifact import sha256, write_text_atomic
from vitfold.errors import ArtifactError
from vitfold.profiles import latency as latency_module
from vitfold.profiles import report as report_module
from vitfold.profiles.latency import NOISY_COV, LatencyStats, noisy_variants
from vitfold.profiles.report import LatencyOptions, fidelity_summary, profile_build

FAST = ["--min-runs", "3", "--min-seconds", "0"]
QUICK = LatencyOptions(warmup=1, min_runs=3, min_seconds=0.0)


def tiny_build(out: Path, backend: str, num_classes: int) -> Path:
    """A real vitfold build (dense twin included) of :func:`tiny_vit`, ToMe r=2."""
    from vitfold import build as build_module
    from vitfold.build import BuildRequest
    from vitfold.runtimes import BuildConfig
    from vitfold.spec import ModelSpec, Preprocess

    pre = Preprocess(img_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    request = BuildRequest(ModelSpec("tiny_vit"), "tome", {"r": 2}, BuildConfig(backend), out=out, latency=QUICK)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(build_module, "create_model", lambda spec: (tiny_vit(num_classes=num_classes), pre))
        directory, _ = build_module.build(request, log=lambda message: None)
    return directory


@pytest.fixture(scope="module")
def openvino_build(tmp_path_factory) -> Path:
    return tiny_build(tmp_path_factory.mktemp("ov") / "tiny", "openvino", num_classes=10)


@pytest.fixture(scope="module")
def headless_build(tmp_path_factory) -> Path:
    return tiny_build(tmp_path_factory.mktemp("headless") / "tiny", "onnxruntime", num_classes=0)


@pytest.fixture
def ov_copy(openvino_build, tmp_path) -> Path:
    return Path(shutil.copytree(openvino_build, tmp_path / "copy"))


def _one_line_exit_2(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr + result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]  # OpenVINO's C++ logs aside
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


# 1. files checked against their sha256 -----------------------------------------------------------

@pytest.mark.parametrize("where, name, corrupt", [
    ("", "model.bin", lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])),
    ("", "model.xml", lambda path: path.write_text("garbage <not xml")),
    ("dense", "model.bin", lambda path: path.write_bytes(path.read_bytes()[:100])),
])
def test_profile_of_a_corrupt_build_is_one_line_naming_the_file(ov_copy, where, name, corrupt):
    corrupt(ov_copy / where / name)
    result = deploy("profile", str(ov_copy), *FAST)
    _one_line_exit_2(result, str(ov_copy / where / name), "sha256", "deploy.py build")


def test_load_verifies_by_default_and_a_device_app_can_skip_it(ov_copy):
    from vitfold import runtimes

    onnx = ov_copy / "model.onnx"  # not read by OpenVINO's load: only the hash can notice
    onnx.write_bytes(onnx.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match=r"model\.onnx does not match the sha256 .* rebuild it with `deploy.py build`"):
        runtimes.load(ov_copy)
    with runtimes.load(ov_copy, verify=False) as session:
        assert session.output_names == ["logits"]


def test_backend_refusing_files_that_match_their_hash_is_one_line(ov_copy):
    from vitfold import runtimes

    xml = ov_copy / "model.xml"
    xml.write_text("<net>not an OpenVINO model</net>")
    manifest = json.loads((ov_copy / "manifest.json").read_text())
    manifest["sha256"]["model.xml"] = sha256(xml)  # as if the build itself wrote a broken file
    (ov_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="openvino cannot load the build in .* although its files match their sha256"):
        runtimes.load(ov_copy)
    _one_line_exit_2(deploy("profile", str(ov_copy), *FAST), f"openvino cannot load the build in {ov_copy} although its files "
                     "match their sha256", "model.xml", "deploy.py build")


# 2. read-only build directories and atomic reports -----------------------------------------------

@contextlib.contextmanager
def read_only(directory: Path):
    """Make ``directory`` refuse new files, for root too (``chattr +i``) or by mode otherwise."""
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(directory)]).returncode != 0:
            pytest.skip("running as root without chattr +i: cannot make a read-only directory")
        undo = ["chattr", "-i", str(directory)]
    else:
        directory.chmod(0o555)
        undo = None
    try:
        yield
    finally:
        subprocess.run(undo) if undo else directory.chmod(0o755)


def test_read_only_build_is_refused_before_measuring(ov_copy, monkeypatch):
    for name in ("report.json", "report.md"):
        (ov_copy / name).unlink()
    measured = []
    monkeypatch.setattr(report_module, "measure_interleaved", lambda *a, **k: measured.append(1) or 1 / 0)
    with read_only(ov_copy):
        with pytest.raises(ArtifactError, match="not writable.*copy the build to a writable directory"):
            profile_build(ov_copy, options=QUICK)
        assert not measured
        _one_line_exit_2(deploy("profile", str(ov_copy), *FAST), "is not writable", "copy the build")
    assert not (ov_copy / "report.json").exists()


def test_report_write_interrupted_keeps_the_old_file(tmp_path, monkeypatch):
    import vitfold.artifact as artifact

    path = tmp_path / "report.json"
    path.write_text('{"old": true}\n')
    real_fdopen = os.fdopen

    class HalfWriter:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, text):
            self.handle.write(text[: len(text) // 2])
            raise KeyboardInterrupt

    monkeypatch.setattr(artifact.os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(path, json.dumps({"new": list(range(1000))}))
    assert path.read_text() == '{"old": true}\n' and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_profile_writes_reports_atomically(ov_copy):
    report = profile_build(ov_copy, options=QUICK)
    assert json.loads((ov_copy / "report.json").read_text())["name"] == report["name"]
    assert not [p.name for p in ov_copy.iterdir() if p.name.startswith(".")]  # no temporary files left


# 3. noise: spread is reported, only an uncertain speedup is flagged -------------------------------

def _stats(median: float, cov_outliers: int = 0, spread: float = 0.01) -> LatencyStats:
    """60 runs around ``median`` (+-spread) with ``cov_outliers`` runs at 1.6x, like an idle machine's tail."""
    rng = np.random.default_rng(0)
    samples = median * (1 + spread * rng.standard_normal(60))
    samples[:cov_outliers] = median * 1.6
    return LatencyStats.from_samples(list(samples), batch_size=1)


def test_idle_tail_is_not_an_alarm_but_overlap_and_huge_cov_are():
    dense, reduced = _stats(25.0, cov_outliers=2), _stats(15.0, cov_outliers=2)
    assert dense.cov > 0.05 and reduced.cov > 0.05  # the old 5% rule flagged this idle-looking run
    assert dense.p10_ms <= dense.median_ms <= dense.p90_ms and dense.spread == pytest.approx(dense.p90_ms / dense.median_ms)
    assert noisy_variants(dense, reduced) == []
    assert noisy_variants(_stats(25.0, spread=0.05), _stats(24.0, spread=0.05)) == ["dense", "reduced"]  # 1.04x unresolved
    busy = _stats(15.0, cov_outliers=20)
    assert busy.cov > NOISY_COV and noisy_variants(dense, busy) == ["reduced"]


def test_report_of_an_idle_run_has_no_warning(ov_copy, monkeypatch):
    fake = {"dense": _stats(25.0, cov_outliers=2), "reduced": _stats(15.0, cov_outliers=2)}
    monkeypatch.setattr(report_module, "measure_interleaved", lambda *a, **k: fake)
    report = profile_build(ov_copy, options=QUICK)
    assert report["noisy"] == [] and report["latency"]["dense"]["cov"] > 0.05
    markdown = (ov_copy / "report.md").read_text()
    assert "Warning" not in markdown and "p90/median" in markdown
    overlap = {"dense": _stats(25.0, spread=0.05), "reduced": _stats(24.0, spread=0.05)}
    monkeypatch.setattr(report_module, "measure_interleaved", lambda *a, **k: overlap)
    report = profile_build(ov_copy, options=QUICK)
    assert report["noisy"] == ["dense", "reduced"]
    assert "within the run-to-run spread" in (ov_copy / "report.md").read_text()
    assert latency_module.NOISY_COV == NOISY_COV


# 4. headless builds: embedding cosine, not top-1 ------------------------------------------------

def test_headless_build_reports_embedding_cosine(headless_build):
    manifest = json.loads((headless_build / "manifest.json").read_text())
    assert manifest["dims"]["num_classes"] == 0 and manifest["outputs"] == ["features"]
    assert np.load(headless_build / "reference.npy").ndim == 2  # an embedding [B, C]
    report = json.loads((headless_build / "report.json").read_text())
    fid = report["fidelity_vs_dense"]
    assert fid["output"] == "embedding" and fid["top1_agreement"] is None and fid["top5_overlap"] is None
    assert "kl" not in fid and report["parity_vs_torch"]["reduced"]["top1_agreement"] is None
    for check in ("onnxruntime_vs_torch", "backend_vs_torch"):  # the build's own checks, in the manifest
        assert manifest["checks"][check]["top1_agreement"] is None and manifest["checks"][check]["max_abs"] < 1e-3
    line = fidelity_summary(fid)
    assert "embedding cosine" in line and "max abs" in line and "top-1" not in line and "logit" not in line
    result = deploy("profile", str(headless_build), *FAST)
    assert result.returncode == 0, result.stderr
    assert "embedding cosine" in result.stdout and "top-1 agreement" not in result.stdout


def test_classification_fidelity_is_unchanged(openvino_build):
    fid = json.loads((openvino_build / "report.json").read_text())["fidelity_vs_dense"]
    assert "output" not in fid and fid["top1_agreement"] is not None and "kl" in fid
    assert fidelity_summary(fid).startswith("top-1 agreement") and "logit cosine" in fidelity_summary(fid)
