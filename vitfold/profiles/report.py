"""Profile a build directory against its dense twin and write ``report.json`` + ``report.md``.

Needs only the build directory and the runtimes (no torch): parity with torch is re-checked against
the ``reference.npy`` outputs saved at build time on the same photos.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .. import __version__, runtimes
from ..artifact import check_writable, read_manifest, write_text_atomic
from ..images import batches, list_images, load_images
from ..metrics import Tolerance, compare
from ..spec import Preprocess
from .flops import ModelDims, graph_macs, schedule_macs
from .latency import NOISY_COV, measure_interleaved, noisy_variants, speedup
from .schedule_report import AUTO_JSON, render_markdown as schedule_lines, with_measurement

REPORT_SCHEMA = 1


@dataclass(frozen=True)
class LatencyOptions:
    """Latency harness settings (see :func:`vitfold.profiles.latency.measure_interleaved`)."""

    warmup: int = 10
    min_runs: int = 50
    min_seconds: float = 3.0
    runs_per_turn: int = 5

    def to_json(self) -> dict:
        return asdict(self)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(settings: dict) -> dict:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "vitfold": __version__,
        "runtime": settings,
    }


def _outputs(session, check: list[np.ndarray], count: int) -> np.ndarray:
    return np.concatenate([next(iter(session(b).values())) for b in check])[:count]


def kl_divergence(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean KL(softmax(reference) || softmax(candidate)) over samples, in nats."""
    def log_softmax(x):
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    p_log, q_log = log_softmax(reference.astype(np.float64)), log_softmax(candidate.astype(np.float64))
    return float(np.mean(np.sum(np.exp(p_log) * (p_log - q_log), axis=1)))


def profile_build(directory: Path, images: Optional[Path] = None, options: Optional[LatencyOptions] = None,
                  per_layer=None) -> dict:
    """Measure a build and its dense twin; write and return the report.

    Before anything is measured, both builds' files are checked against their sha256 and
    ``directory`` must be writable (the report goes there). ``report.json`` and ``report.md`` are
    replaced atomically. ``per_layer`` (a :class:`vitfold.profiles.per_layer.LayerProfileOptions`)
    adds a separate pass with the backend's per-layer counters: time per block and category,
    ``per_layer.png``.

    Raises:
        ArtifactError: not a complete build directory (or no dense twin), a file that does not match
            its sha256, files the backend cannot load, or a directory that is not writable.
        FidelityError: a backend no longer matches its torch reference on the build's photos.
    """
    options = options or LatencyOptions()
    directory = Path(directory)
    manifest = read_manifest(directory)
    if "dense" not in manifest:
        from ..errors import ArtifactError

        raise ArtifactError(f"{directory} has no dense twin (manifest key 'dense'); rebuild it with `deploy.py build`")
    dense_dir = directory / manifest["dense"]
    dense_manifest = read_manifest(dense_dir)
    check_writable(directory, "report.json")
    classes = manifest["outputs"][0] == "logits"  # else an embedding [B, C] or a feature map [B, N, C]
    pre = Preprocess.from_json(manifest["preprocess"])
    batch_size = manifest["input"]["shape"][0]
    paths = list_images(images)
    check = batches(load_images(paths, pre), batch_size)
    count = len(paths)
    backend = runtimes.get_backend(manifest["build"]["backend"])
    dirs = {"dense": dense_dir, "reduced": directory}
    if "dense_f32" in manifest:  # bf16 / fp16 / int8 / compressed weights: the whole gain is against dense f32
        dirs["dense_f32"] = directory / manifest["dense_f32"]

    # runtimes.load checks every listed file (model.onnx and reference.npy, read below, included)
    # against its sha256 before the backend opens it: every build, before anything is measured
    with contextlib.ExitStack() as stack:
        sessions = {label: stack.enter_context(runtimes.load(where)) for label, where in dirs.items()}
        outputs = {label: _outputs(session, check, count) for label, session in sessions.items()}
        parity = {}
        if images is None:  # the build's own photos: the saved torch outputs apply
            listed_by = {"dense": dense_manifest, "reduced": manifest}
            for label, where in dirs.items():
                listed = listed_by.get(label) or read_manifest(where)
                key = listed["checks"].get("tolerance", {}).get("key") or f"{listed['build']['backend']}:{listed['build']['precision']}"
                tolerance = (Tolerance.from_json(listed["checks"]["tolerance"]) if "tolerance" in listed["checks"]
                             else backend.tolerance(listed["build"]["precision"]))
                reference = np.load(where / listed["files"]["reference"])[:count]
                parity[label] = compare(reference, outputs[label], classes=classes).check(tolerance, f"{label}: {key} vs torch").to_json()
        dense_out, reduced_out = outputs["dense"], outputs["reduced"]
        fidelity = compare(dense_out, reduced_out, classes=classes).to_json()
        if not classes and dense_out.ndim == 2:
            fidelity["output"] = "embedding"
        if classes:
            fidelity["kl"] = kl_divergence(dense_out, reduced_out)
        sample = check[0]
        latency = measure_interleaved(
            {label: (lambda s=session: s(sample)) for label, session in sessions.items()},
            batch_size,
            warmup=options.warmup,
            min_runs=options.min_runs,
            min_seconds=options.min_seconds,
            runs_per_turn=options.runs_per_turn,
        )
        settings = sessions["reduced"].settings
        # backend-specific measurements (TensorRT: CUDA-event latency, Jetson power / clock state)
        backend_profile = (backend.load_module().profile_extras({"dense": sessions["dense"], "reduced": sessions["reduced"]},
                                                                sample) if backend.profile_extras else None)

    dims = ModelDims.from_json(manifest["dims"])
    macs = {
        "dense": schedule_macs(dims, dense_manifest["schedule"]["tokens"]),
        "reduced": schedule_macs(dims, manifest["schedule"]["tokens"], manifest["schedule"].get("site", "attention")),
    }
    graph = {
        "dense": graph_macs(dense_dir / dense_manifest["files"]["onnx"], batch_size),
        "reduced": graph_macs(directory / manifest["files"]["onnx"], batch_size),
    }
    report = {
        "schema": REPORT_SCHEMA,
        "name": manifest["name"],
        "model": manifest["spec"]["name"],
        "weights": manifest["weights"],
        "method": manifest["method"],
        "schedule": manifest["schedule"],
        "batch_size": batch_size,
        "backend": manifest["build"],
        "latency_options": options.to_json(),
        "latency": {k: v.to_json() for k, v in latency.items()},
        "speedup": speedup(latency["dense"], latency["reduced"]),
        "gmacs": {k: v["total"] / 1e9 for k, v in macs.items()},
        "graph_gmacs": {k: (None if v is None else v / 1e9) for k, v in graph.items()},  # None: no onnx here
        "flop_ratio": macs["dense"]["total"] / macs["reduced"]["total"],
        "fidelity_vs_dense": fidelity,
        "parity_vs_torch": parity or {"dense": dense_manifest["checks"]["backend_vs_torch"],
                                      "reduced": manifest["checks"]["backend_vs_torch"]},
        "images": [p.name for p in paths],
        "noisy": noisy_variants(latency["dense"], latency["reduced"]),
        "environment": environment(settings),
    }
    if "dense_f32" in latency:  # the whole gain: reduced at this precision over dense f32
        report["speedup_vs_dense_f32"] = speedup(latency["dense_f32"], latency["reduced"])
        report["fidelity_vs_dense_f32"] = compare(outputs["dense_f32"], reduced_out, classes=classes).to_json()
    if "quantization" in manifest:
        report["quantization"] = manifest["quantization"]
    if "gate" in manifest:  # data-dependent gate: its capacity and the check photos over it
        report["gate"] = manifest["gate"]
    if backend_profile is not None:
        report["backend_profile"] = backend_profile
    if per_layer is not None:
        from .per_layer import profile_build_layers

        report["per_layer"] = profile_build_layers(directory, check[0], per_layer)
    if (directory / AUTO_JSON).is_file():  # a hardware-aware schedule: predicted vs measured
        report["auto_schedule"] = with_measurement(json.loads((directory / AUTO_JSON).read_text()), report)
    write_text_atomic(directory / "report.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(directory / "report.md", render_markdown(report))
    return report


def fidelity_summary(fid: dict) -> str:
    """One line of fidelity vs dense: top-1 / top-5 / cosine / KL for logits, embedding cosine and
    max abs for a headless model's embedding ``[B, C]``, token cosine for feature maps."""
    if fid.get("output") == "embedding":
        return (f"embedding cosine mean {fid['mean_cosine']:.4f} (min {fid['min_cosine']:.4f}), "
                f"max abs {fid['max_abs']:.3g}")
    if fid.get("token_cosine_mean") is not None:
        return (f"per-token cosine mean {fid['token_cosine_mean']:.4f} (min {fid['token_cosine_min']:.4f}), "
                f"map cosine mean {fid['mean_cosine']:.4f}")
    return (f"top-1 agreement {fid['top1_agreement']:.0%}, top-5 overlap {fid['top5_overlap']:.0%}, "
            f"logit cosine mean {fid['mean_cosine']:.4f} (min {fid['min_cosine']:.4f})"
            + (f", KL {fid['kl']:.4f}" if "kl" in fid else ""))


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _ms(stats: dict, key: str) -> str:
    return f"{stats[key]:.2f}" if key in stats else "n/a"  # p10_ms is absent from reports written before it


def _ratio(stats: dict) -> str:
    return f"{stats['p90_ms'] / stats['median_ms']:.2f}"


def noise_summary(report: dict) -> str:
    """Why a report's ``noisy`` variants make its speedup uncertain (see
    :func:`vitfold.profiles.latency.noisy_variants`); empty when none are."""
    lat, noisy = report["latency"], report["noisy"]
    if not noisy:
        return ""
    if noisy == ["dense", "reduced"] and all("p10_ms" in lat[v] for v in noisy) and (
            max(lat[v]["p10_ms"] for v in noisy) <= min(lat[v]["p90_ms"] for v in noisy)):
        spans = ", ".join(f"{v} {lat[v]['p10_ms']:.2f}..{lat[v]['p90_ms']:.2f} ms" for v in noisy)
        return f"speedup {report['speedup']:.2f}x is within the run-to-run spread (p10..p90 overlap: {spans})"
    covs = ", ".join(f"{v} {lat[v]['cov']:.1%}" for v in noisy)
    return f"CoV above {NOISY_COV:.0%} ({covs}): the speedup is uncertain, the machine was likely busy"


def gate_lines(gate: dict) -> list[str]:
    """report.md lines for a gated build (``evit-mass``): capacity, calibration, photos over it."""
    check = gate["check"]
    return ["", "## Gate", "",
            f"- keep mass {gate['keep_mass']}, capacity {gate['capacity']} kept tokens at blocks {gate['locations']}"
            + (f" (percentile {gate['calibration']['percentile']:g} of {gate['calibration']['images']} images, "
               f"{gate['calibration']['source']})" if gate["calibration"] else " (given)"),
            f"- check photos over the capacity: {check['exceeded']} of {check['images']}"
            + (f" ({', '.join(check['exceeded_images'])}): the bounded model differs from the dynamic one there"
               if check["exceeded"] else ""),
            f"- bounded vs dynamic torch model on the others: max abs {check['max_abs_fitting']}"]


def quantization_lines(q: dict) -> list[str]:
    """report.md lines for a quantized build: tool, calibration, ignored scope, token choices."""
    lines = ["", "## Quantization", "", f"- {q.get('tool')} ({q['quantizer']}): precision {q['precision']}"
             + (f", weights {q['weights']}" if q.get("weights") else "")]
    if q.get("calibration"):
        c = q["calibration"]
        lines.append(f"- calibration: {c['images']} images from {c['source']} (subset {c['subset']}, seed {c['seed']})")
    scope = q["ignored_scope"]
    lines.append(f"- kept float (the token reduction, found on the graph): {scope['nodes']} nodes, "
                 f"{scope['decisions']} decisions at {scope['sites']} sites")
    choices = q.get("choices")
    if choices and choices.get("sites"):
        lines.append(f"- token choices identical to the f32 graph: {choices['identical']:.1%} of {choices['sites']} sites x "
                     f"{choices['photos']} check batches (first site {choices['first_site']:.1%}; {choices['runner']})")
    return lines


def render_markdown(report: dict) -> str:
    """A short human-readable report."""
    lat, par, fid = report["latency"], report["parity_vs_torch"], report["fidelity_vs_dense"]
    env = report["environment"]
    lines = [
        f"# {report['name']}",
        "",
        f"- model: `{report['model']}`, weights: {report['weights']}",
        f"- method: `{report['method']['name']}` {json.dumps(report['method']['params'])}",
        f"- tokens per block: {report['schedule']['tokens']}",
        f"- backend: {report['backend']['backend']} ({report['backend']['precision']}), batch {report['batch_size']}, "
        f"{env['runtime'].get('intra_op_threads', env['runtime'].get('inference_num_threads'))} threads on {env['cpu']}",
        "",
        "| variant | median ms | p10 ms | p90 ms | p99 ms | CoV | p90/median | img/s | GMACs | max abs vs torch | top-1 vs torch |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in (k for k in ("dense_f32", "dense", "reduced") if k in lat):
        gmacs = report["gmacs"]["reduced" if v == "reduced" else "dense"]
        vs_torch = (f"{par[v]['max_abs']:.2e} | {_pct(par[v]['top1_agreement'])}" if v in par else "n/a | n/a")
        lines.append(
            f"| {v} | {lat[v]['median_ms']:.2f} | {_ms(lat[v], 'p10_ms')} | {lat[v]['p90_ms']:.2f} | {lat[v]['p99_ms']:.2f} | "
            f"{lat[v]['cov']:.1%} | {_ratio(lat[v])} | {lat[v]['throughput']:.1f} | {gmacs:.3f} | {vs_torch} |"
        )
    lines += [
        "",
        f"**Speedup {report['speedup']:.2f}x** (dense median / reduced median) against a FLOP ratio of "
        f"{report['flop_ratio']:.2f}x ({report['speedup'] / report['flop_ratio']:.0%} of it).",
        "",
        f"Reduced vs dense on {len(report['images'])} photos: {fidelity_summary(fid)}.",
    ]
    if "speedup_vs_dense_f32" in report:
        lines += ["", f"**Whole gain {report['speedup_vs_dense_f32']:.2f}x** over dense f32 "
                      f"({report['backend'].get('precision')}{', weights ' + report['backend']['weights'] if report['backend'].get('weights') else ''} "
                      f"and the token reduction together); reduced vs dense f32: "
                      f"{fidelity_summary(report['fidelity_vs_dense_f32'])}."]
    if "quantization" in report:
        lines += quantization_lines(report["quantization"])
    if report["noisy"]:
        lines += ["", f"**Warning: {noise_summary(report)}.** The raw samples are in report.json "
                      "(`latency.*.samples_ms`); re-run `deploy.py profile` (more `--min-runs`, an idle machine)."]
    lines += report.get("backend_profile", {}).get("markdown", [])
    if "per_layer" in report:
        from .per_layer import render_markdown as per_layer_lines

        lines += per_layer_lines(report["per_layer"])
    if "auto_schedule" in report:
        lines += schedule_lines(report["auto_schedule"])
    if "gate" in report:
        lines += gate_lines(report["gate"])
    if report["weights"].startswith("random"):
        lines += ["", "Weights are random: parity with torch is meaningful, fidelity vs dense is not."]
    return "\n".join(lines) + "\n"
