"""Never destroy what is not ours: where a build may go, build names that tell requests apart, the
build-directory lock, SIGTERM cleanup, and the one-line refusals that used to be tracebacks."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from conftest import REPO, deploy
from vitfold.build import BuildRequest
from vitfold.errors import ArtifactError, SpecError
from vitfold.outdir import claim
from vitfold.runtimes import BuildConfig
from vitfold.spec import ModelSpec


def fake_build(directory: Path, key: str) -> Path:
    """A directory that looks like a vitfold build of request ``key``."""
    directory.mkdir(parents=True)
    (directory / "manifest.json").write_text(json.dumps({"request_key": key, "files": {}}))
    (directory / "model.xml").write_text("<net/>")
    return directory


def quiet(_msg):
    pass


def test_a_users_folder_is_refused_and_left_untouched(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("do not delete")
    with pytest.raises(ArtifactError, match="not a vitfold build .* never deletes it"):
        with claim(folder, "k", force=True, log=quiet):
            pass
    assert (folder / "notes.txt").read_text() == "do not delete" and sorted(os.listdir(folder)) == ["notes.txt"]


def test_the_cli_refuses_a_users_folder_and_the_current_directory(tmp_path):
    (tmp_path / "thesis.tex").write_text("years of work")
    for out, cwd in ((str(tmp_path), None), (".", tmp_path)):
        result = deploy("build", "--out", out, cwd=cwd)
        assert result.returncode == 2, result.stderr
        assert "not a vitfold build" in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert (tmp_path / "thesis.tex").read_text() == "years of work"


def test_files_links_and_unwritable_targets_are_one_line(tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ArtifactError, match="exists and is not a directory"):
        with claim(afile, "k", log=quiet):
            pass
    with pytest.raises(ArtifactError, match="cannot write a build to .*: a part of the path is a file"):
        with claim(afile / "build", "k", log=quiet):
            pass
    (tmp_path / "link").symlink_to(tmp_path)
    with pytest.raises(ArtifactError, match="symbolic link"):
        with claim(tmp_path / "link", "k", log=quiet):
            pass

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(ArtifactError, match="the file system is read-only"):
        with claim(tmp_path / "ro" / "build", "k", log=quiet):
            pass


def test_an_existing_build_is_rebuilt_only_for_the_same_request_or_with_force(tmp_path):
    target = fake_build(tmp_path / "b", "key-a")
    with claim(target, "key-a", log=quiet) as c:
        assert c.state == "rebuilt"
    with pytest.raises(ArtifactError, match="another request; pass --force"):
        with claim(target, "key-b", log=quiet):
            pass
    with claim(target, "key-b", force=True, log=quiet) as c:
        assert c.state == "replaced"
    (tmp_path / "empty").mkdir()
    with claim(tmp_path / "empty", "k", log=quiet) as c:
        assert c.state == "new"
    assert not list(tmp_path.glob(".*.lock")), "the lock file is removed on release"


def test_a_second_build_into_the_same_directory_refuses(tmp_path):
    target = tmp_path / "b"
    with claim(target, "k", log=quiet):
        with pytest.raises(ArtifactError, match=rf"another build \(pid {os.getpid()}\) is writing"):
            with claim(target, "k", log=quiet):
                pass
    with claim(target, "k", log=quiet) as c:  # released: the next build goes ahead
        assert c.state == "new"


def test_leftovers_of_a_killed_build_are_removed_and_reported(tmp_path):
    (tmp_path / ".b.x1y2_k9z.tmp" / "dense").mkdir(parents=True)  # atomic_directory's mkdtemp name
    (tmp_path / ".b.old-123").mkdir()
    (tmp_path / ".other.z9abcdef.tmp").mkdir()  # another build's: not ours to remove
    (tmp_path / ".b.x.abcdefgh.tmp").mkdir()  # build "b.x", maybe running: its name starts like ours
    said = []
    with claim(tmp_path / "b", "k", log=said.append) as c:
        assert set(c.stale) == {".b.x1y2_k9z.tmp", ".b.old-123"}
    assert not (tmp_path / ".b.x1y2_k9z.tmp").exists() and not (tmp_path / ".b.old-123").exists()
    assert (tmp_path / ".other.z9abcdef.tmp").exists() and (tmp_path / ".b.x.abcdefgh.tmp").exists()
    assert len(said) == 1 and "removed 2 leftover staging directories" in said[0]


def request(**kw) -> BuildRequest:
    spec_kw = {k: kw.pop(k) for k in ("img_size", "checkpoint", "pretrained") if k in kw}
    threads = kw.pop("threads", None)
    return BuildRequest(spec=ModelSpec("deit_small_patch16_224", **spec_kw), params=kw.pop("params", {"r": 13}),
                        build=BuildConfig(threads=threads), **kw)


def test_build_names_tell_every_request_apart(tmp_path):
    base = request()
    assert base.name() == "deit_small_patch16_224-tome-r13-openvino-f32-b1"  # the README's default name
    variants = [request(img_size=192), request(checkpoint="w.safetensors"), request(pretrained=True), request(opset=19),
                request(images=tmp_path), request(threads=1), request(params={"r": (16, -1.0)}),
                request(params={"r": (16, 1.0)}), request(images=tmp_path / "a" / "photos"),
                request(images=tmp_path / "b" / "photos")]
    names = [base.name()] + [v.name() for v in variants]
    assert len(set(names)) == len(names), names
    assert "r16_m1.0" in variants[6].name() and "r16_1.0" in variants[7].name()
    assert len({base.key()} | {v.key() for v in variants}) == len(variants) + 1
    assert request().key() == base.key() and request(images=tmp_path).name() == variants[4].name()  # deterministic


def test_unbuildable_precision_is_refused_before_any_work():
    with pytest.raises(SpecError, match="--precision fp16 is not built for openvino; choose f32 or bf16"):
        BuildRequest(spec=ModelSpec("deit_small_patch16_224"), build=BuildConfig(precision="fp16"))
    started = time.monotonic()
    result = deploy("build", "--precision", "fp16")
    assert result.returncode == 2 and "is not built for openvino" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and time.monotonic() - started < 60


def tiny_onnx(path: Path) -> None:
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4])  # noqa: E731
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [value("x")], [value("y")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, str(path))


def test_inspect_accepts_a_build_directory(tmp_path):
    build = tmp_path / "b"
    build.mkdir()
    tiny_onnx(build / "model.onnx")
    (build / "manifest.json").write_text(json.dumps({"files": {"onnx": "model.onnx"}}))
    result = deploy("inspect", str(build), "--no-passes", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ops"] == {"Relu": 1}
    plain = tmp_path / "plain"
    plain.mkdir()
    result = deploy("inspect", str(plain))
    assert result.returncode == 2 and "is a directory, not an ONNX file" in result.stderr


def test_sigterm_mid_build_leaves_nothing_behind(tmp_path):
    """``timeout`` sends SIGTERM: the staging directory and the lock go, as on Ctrl-C; exit 143."""
    out = tmp_path / "builds" / "b"
    process = subprocess.Popen([sys.executable, str(REPO / "deploy.py"), "build", "--model", "vit_tiny_patch16_224",
                                "--img-size", "96", "--r", "1", "--out", str(out), "--min-runs", "3", "--min-seconds", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(out.parent.glob(".b.*.tmp")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the build ended before it staged anything: " + process.stderr.read()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "terminated (SIGTERM)" in stderr and "Traceback" not in stderr
    assert sorted(os.listdir(out.parent)) == [], os.listdir(out.parent)


def test_a_build_reports_its_disk_use_and_can_share_a_dense_twin(tmp_path):
    """The second build reuses the first one's dense twin (--dense-from) instead of writing its own."""
    common = ("--model", "vit_tiny_patch16_224", "--img-size", "96", "--min-runs", "3", "--min-seconds", "0")
    first = deploy("build", *common, "--r", "1", "--out", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr
    assert "MB on disk: reduced" in first.stdout and "dense twin" in first.stdout
    second = deploy("build", *common, "--r", "2", "--out", str(tmp_path / "b"), "--dense-from", str(tmp_path / "a" / "dense"))
    assert second.returncode == 0, second.stderr
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert not (tmp_path / "b" / "dense").exists() and (tmp_path / "b" / manifest["dense"]).resolve() == tmp_path / "a" / "dense"
    assert json.loads((tmp_path / "b" / "report.json").read_text())["speedup"] > 0
    again = deploy("build", *common, "--r", "2", "--out", str(tmp_path / "b"), "--dense-from", str(tmp_path / "a" / "dense"))
    assert again.returncode == 0 and "rebuilding" in again.stdout, again.stderr
    other = deploy("build", *common, "--r", "1", "--out", str(tmp_path / "b"))
    assert other.returncode == 2 and "another request; pass --force" in other.stderr
