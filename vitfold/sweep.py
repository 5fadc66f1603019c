"""``deploy.py sweep``: many methods and settings on one model, one dense baseline, one table and plot.

Every point is an ordinary build (:func:`vitfold.build.build`) whose dense twin is the sweep's one
shared dense build. Points are cached by a hash of everything that defines the artifact (model spec,
method and parameters, backend settings, opset, task): re-running a sweep with more points builds
only the new ones. Each point's latency is measured interleaved with the dense baseline (the ratio is
what is compared across points; absolute times drift between runs on a shared machine).

Jobs are pure functions of their request, so the loop can move to a process pool or a cluster
without a redesign (DESIGN.md, "Beyond one machine"); here they run one after another, because on
a small CPU parallel builds would disturb the latency runs.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

from .artifact import read_manifest
from .build import BuildRequest, build, build_dense
from .errors import ArtifactError, SpecError
from .profiles.report import profile_build
from .reduce import create_method
from .runtimes import BuildConfig

#: Short parameter names accepted in a sweep spec (``evit:keep=0.7``).
ALIASES = {"keep": "keep_rate", "at": "locations"}


@dataclass(frozen=True)
class Point:
    """One sweep point: a method and its parameters."""

    method: str
    params: dict

    @property
    def label(self) -> str:
        """``keep=0.7,fuse=False``: the parameters as a user writes them in ``--methods``."""
        short = {v: k for k, v in ALIASES.items()}
        return ",".join(f"{short.get(k, k)}={v}" for k, v in self.params.items()) or "default"


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_points(text: str) -> list[Point]:
    """Parse ``"tome:r=4,8,13 evit:keep=0.5,0.7:fuse=false topk:keep=0.7"`` into points.

    Methods are separated by spaces; after the method name, ``:``-separated ``key=v1,v2,...``
    settings; the points are every combination of the listed values.

    Raises:
        SpecError: a malformed entry (names it and shows the syntax).
    """
    points = []
    for entry in text.split():
        name, *settings = entry.split(":")
        if not name:
            raise SpecError(f"sweep entry {entry!r} has no method name; write e.g. tome:r=8,13")
        keys, values = [], []
        for setting in settings:
            key, sep, raw = setting.partition("=")
            if not sep or not key or not raw:
                raise SpecError(f"sweep entry {entry!r}: {setting!r} is not key=v1,v2 (e.g. evit:keep=0.5,0.7)")
            keys.append(ALIASES.get(key, key).replace("-", "_"))
            values.append([_value(v) for v in raw.split(",") if v])
        for combo in itertools.product(*values):
            points.append(Point(name, dict(zip(keys, combo))))
    if not points:
        raise SpecError("no sweep points given; write e.g. --methods \"tome:r=8,13 evit:keep=0.7\"")
    return points


def _cached(directory: Path) -> bool:
    try:
        read_manifest(directory)
    except ArtifactError:
        return False
    return True


def run_sweep(
    base: BuildRequest,
    points: list[Point],
    out: Path,
    *,
    reprofile: bool = False,
    log: Callable[[str], None] = print,
    advance: Optional[Callable[[str], None]] = None,
    eval_data: Optional[Path] = None,
    eval_labels: Optional[Path] = None,
) -> dict:
    """Build (or reuse) the dense baseline and every point, profile, write ``sweep.json/.md/.png``.

    Args:
        base: model spec, backend settings, images, latency options shared by every point (its
            method and parameters are ignored).
        points: from :func:`parse_points`.
        out: sweep directory; points go in ``out/<build name>-<hash>``, the baseline in ``out/dense-<hash>``.
        reprofile: re-measure cached points (default: reuse their reports).
        advance: called once per finished step (baseline, then each point) with its label, for progress bars.
        eval_data, eval_labels: a labeled folder (and its ``--labels`` file): every point also gets its
            accuracy and the drop from the dense twin (:func:`vitfold.evaluate.evaluate`).

    Returns:
        The sweep summary (also written to ``sweep.json``).

    Raises:
        VitfoldError subclasses from the builds: the sweep stops at the first failing point; points
        already built stay cached.
    """
    for point in points:  # unknown methods / parameters fail before anything is built
        create_method(point.method, **point.params)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    dense_request = replace(base, method="none", params={}, dense_dir=None)
    dense_dir = out / f"dense-{dense_request.key()}"
    if not _cached(dense_dir):
        log("dense baseline: build")
        build_dense(replace(dense_request, out=dense_dir), log=log)
    dense_f32_dir = None
    if base.build.label != "f32":  # the whole gain of every point is measured against one dense f32 build
        f32 = BuildConfig.from_json({**base.build.to_json(), "precision": "f32", "weights": None})
        dense_f32_request = replace(dense_request, build=f32, calibrate=None, tolerance=None)
        dense_f32_dir = out / f"dense-f32-{dense_f32_request.key()}"
        if not _cached(dense_f32_dir):
            log("dense f32 baseline: build")
            build_dense(replace(dense_f32_request, out=dense_f32_dir), log=log)
    if advance:
        advance("dense baseline")
    rows: list[dict] = []
    eval_cache: dict = {}
    for point in points:
        request = replace(base, method=point.method, params=point.params, dense_dir=dense_dir,
                          dense_f32_dir=dense_f32_dir, out=None)
        directory = out / f"{request.name()}-{request.key()}"
        cached = _cached(directory)
        if cached and (directory / "report.json").is_file() and not reprofile:
            report = json.loads((directory / "report.json").read_text())
            log(f"{point.method} {point.label}: cached")
        elif cached:
            log(f"{point.method} {point.label}: cached, profiling again")
            report = profile_build(directory, images=base.images, options=base.latency)
        else:
            log(f"{point.method} {point.label}: build")
            _, report = build(replace(request, out=directory), log=log)
        row = _row(point, directory, report)
        if eval_data is not None:
            from .evaluate import evaluate

            accuracy = evaluate(directory, eval_data, eval_labels, cache=eval_cache)
            row.update(accuracy=accuracy["reduced"]["top1"], dense_accuracy=accuracy["dense"]["top1"],
                       accuracy_drop=accuracy["drop"]["top1"], accuracy_interval=accuracy["drop"]["interval"])
            log(f"{point.method} {point.label}: top-1 {accuracy['reduced']['top1']:.2%} "
                f"(dense {accuracy['dense']['top1']:.2%})")
        rows.append(row)
        if advance:
            advance(f"{point.method} {point.label}")
    summary = {
        "model": base.spec.name,
        "weights": base.spec.weights,
        "backend": base.build.to_json(),
        "batch_size": base.spec.batch_size,
        "task": base.task,
        "dense": dense_dir.name,
        "eval_data": None if eval_data is None else str(eval_data),
        "points": rows,
    }
    (out / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "sweep.md").write_text(render_markdown(summary))
    plot_sweep(summary, out / "sweep.png")
    return summary


def fidelity_value(fidelity: dict) -> float:
    """The sweep's fidelity axis: mean per-token cosine for features, mean logit/feature cosine otherwise."""
    return fidelity["token_cosine_mean"] if fidelity.get("token_cosine_mean") is not None else fidelity["mean_cosine"]


def _row(point: Point, directory: Path, report: dict) -> dict:
    fid = report["fidelity_vs_dense"]
    return {
        "method": point.method,
        "params": point.params,
        "label": point.label,
        "directory": directory.name,
        "tokens": report["schedule"]["tokens"],
        "gmacs": report["gmacs"]["reduced"],
        "dense_gmacs": report["gmacs"]["dense"],
        "flop_ratio": report["flop_ratio"],
        "speedup": report["speedup"],
        "speedup_vs_dense_f32": report.get("speedup_vs_dense_f32"),
        "median_ms": report["latency"]["reduced"]["median_ms"],
        "dense_median_ms": report["latency"]["dense"]["median_ms"],
        "cov": report["latency"]["reduced"]["cov"],
        "noisy": report["noisy"],
        "fidelity": fidelity_value(fid),
        "top1_agreement": fid.get("top1_agreement"),
        "top5_overlap": fid.get("top5_overlap"),
        "kl": fid.get("kl"),
    }


def render_markdown(summary: dict) -> str:
    """The sweep table: one row per point, sorted by method then FLOPs."""
    b = summary["backend"]
    lines = [
        f"# Sweep: {summary['model']} on {b['backend']} {b['precision']}, batch {summary['batch_size']}",
        "",
        f"Weights: {summary['weights']}. Dense baseline: `{summary['dense']}`. Speedup = dense median / point "
        "median, measured interleaved with the dense model for every point.",
        "",
        "| method | params | GMACs | FLOP ratio | speedup | speedup / FLOP ratio | vs dense f32 | median ms | fidelity (cosine) | top-1 vs dense | KL | accuracy (drop) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(summary["points"], key=lambda r: (r["method"], -r["gmacs"])):
        top1 = "n/a" if r["top1_agreement"] is None else f"{r['top1_agreement']:.0%}"
        kl = "n/a" if r["kl"] is None else f"{r['kl']:.4f}"
        noisy = " (noisy)" if r["noisy"] else ""
        whole = "n/a" if r.get("speedup_vs_dense_f32") is None else f"{r['speedup_vs_dense_f32']:.2f}x"
        lines.append(
            f"| {r['method']} | {r['label']} | {r['gmacs']:.3f} | {r['flop_ratio']:.2f}x | {r['speedup']:.2f}x{noisy} | "
            f"{r['speedup'] / r['flop_ratio']:.0%} | {whole} | {r['median_ms']:.2f} | {r['fidelity']:.4f} | {top1} | {kl} | "
            f"{accuracy_cell(r)} |"
        )
    if summary.get("eval_data"):
        lines += ["", f"Accuracy: top-1 on `{summary['eval_data']}` (`deploy.py eval`), drop from the dense twin with its "
                      "95% paired bootstrap interval."]
    if summary["weights"].startswith("random"):
        lines += ["", "Weights are random: the fidelity columns mean nothing; pass --checkpoint for real figures."]
    return "\n".join(lines) + "\n"


def accuracy_cell(row: dict) -> str:
    """A sweep row's accuracy, its drop from the dense twin and the drop's 95% interval, as one table cell."""
    if row.get("accuracy") is None:
        return "n/a"
    low, high = row["accuracy_interval"]
    return f"{row['accuracy']:.2%} ({row['accuracy_drop']:+.2%}, {low:+.2%}..{high:+.2%})"


def plot_sweep(summary: dict, path: Path) -> Path:
    """Latency (speedup over dense) vs fidelity, one curve per method, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_accuracy = any(r.get("accuracy") is not None for r in summary["points"])
    fig, axes = plt.subplots(1, 2 if with_accuracy else 1, figsize=(12 if with_accuracy else 7, 4.5), dpi=120, squeeze=False)
    by_method: dict[str, list[dict]] = {}
    for row in summary["points"]:
        by_method.setdefault(row["method"], []).append(row)
    panels = [("fidelity", "fidelity vs dense (mean cosine)")] + ([("accuracy", "top-1 accuracy (eval data)")] if with_accuracy else [])
    b = summary["backend"]
    for ax, (key, ylabel) in zip(axes[0], panels):
        for method, rows in sorted(by_method.items()):
            rows = sorted(rows, key=lambda r: r["speedup"])
            ax.plot([r["speedup"] for r in rows], [r[key] for r in rows], marker="o", label=method)
            for r in rows:
                ax.annotate(r["label"], (r["speedup"], r[key]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if key == "accuracy":
            dense = summary["points"][0]["dense_accuracy"]
            ax.axhline(dense, color="black", linewidth=0.8, linestyle="--", label=f"dense {dense:.1%}")
        ax.axvline(1.0, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlabel("speedup over dense (measured, interleaved)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{summary['model']}, {b['backend']} {b['precision']}, batch {summary['batch_size']}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
