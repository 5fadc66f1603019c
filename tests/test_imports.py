"""The package's import graph, read from the source (imports inside functions count: they run when
called): no cycle, and the runtime side (what a device app loads) and profiles/ reach no torch, timm or
onnx-graphsurgeon."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "vitfold"
TORCH_FREE = ("vitfold.runtimes", "vitfold.profiles", "vitfold.artifact", "vitfold.images", "vitfold.metrics",
              "vitfold.spec", "vitfold.errors", "vitfold.quantize", "vitfold.device", "vitfold.evaluate")
HEAVY = ("torch", "timm", "onnx_graphsurgeon", "torchvision")


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports (absolute names; ``from x import y`` counts ``x`` and ``x.y``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            out |= {target} | {f"{target}.{a.name}" for a in node.names}
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    edges = {}
    for name, path in mods.items():
        targets = set()
        for target in imports(name, path):
            if target in mods and target != name:
                targets.add(target)
            elif target.split(".")[0] in HEAVY:
                targets.add(target.split(".")[0])
        edges[name] = targets
    return edges


def test_the_import_graph_has_no_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the DFS stack, 2: done
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_runtime_side_and_profiles_reach_no_torch():
    edges = graph()
    assert any(t in edges["vitfold.reduce.tome"] for t in ("torch", "timm")), "the graph reader lost torch imports"
    bad = {}
    for start in (m for m in edges if m.startswith(TORCH_FREE)):
        seen, todo, parent = {start}, [start], {start: None}
        while todo:
            node = todo.pop()
            for nxt in edges.get(node, ()):
                if nxt in HEAVY:
                    path, at = [nxt], node
                    while at is not None:
                        path.append(at)
                        at = parent[at]
                    bad[start] = " -> ".join(reversed(path))
                    todo = []
                    break
                if nxt not in seen:
                    seen.add(nxt)
                    parent[nxt] = node
                    todo.append(nxt)
    assert not bad, bad


#: The runtime side as files: what a device (JetPack 5: Python 3.8) runs.
RUNTIME_FILES = ("runtimes", "profiles", "artifact.py", "images.py", "metrics.py", "spec.py", "errors.py", "device.py", "entry.py", "evaluate.py",
                 "__init__.py")


def test_runtime_side_parses_as_python_3_8():
    """vermin reads every runtime-side file for features newer than Python 3.8 (``str.removesuffix``,
    ``importlib.resources.files``, ``match``, runtime ``list[int]``, ...). Annotations are not
    evaluated there: every module has ``from __future__ import annotations``."""
    import shutil
    import subprocess
    import sys

    import pytest

    beside = Path(sys.executable).parent / "vermin"  # the venv's console script, also when it is not on PATH
    vermin = str(beside) if beside.is_file() else shutil.which("vermin")
    if vermin is None:
        pytest.skip("vermin is not installed (it is in the dev extra)")
    result = subprocess.run([vermin, "--target=3.8-", "--no-tips", "--violations",
                             *(str(ROOT / f) for f in RUNTIME_FILES)], capture_output=True, text=True)
    assert result.returncode == 0 and "not met" not in result.stdout, result.stdout + result.stderr
    for path in [p for f in RUNTIME_FILES for p in ((ROOT / f).rglob("*.py") if (ROOT / f).is_dir() else [ROOT / f])]:
        text = path.read_text()
        if text.strip() and ("list[" in text or "dict[" in text or "tuple[" in text or " | " in text):
            assert "from __future__ import annotations" in text, f"{path.name} needs postponed annotations for 3.8"


def test_command_line_on_python_below_3_10_says_export_on_a_workstation(monkeypatch, capsys):
    """Below 3.10 only the runtime side is installed: one line, exit 2, before importing click or torch."""
    import sys

    import pytest

    from vitfold import entry

    monkeypatch.setattr(sys, "version_info", (3, 8, 18, "final", 0))
    with pytest.raises(SystemExit) as exc:
        entry.main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "3.8.18" in err and "--export-only" in err and "python -m vitfold.device build" in err
