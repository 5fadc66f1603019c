"""The device side: build and profile an exported build on the machine that will run it. No torch.

    # workstation (torch):  python deploy.py build --backend tensorrt --export-only --tensorrt-version 10.3 ...
    # device (no torch):    python -m vitfold.device build builds/<name>
    #                       python -m vitfold.device profile builds/<name> [--per-layer]

``build`` reads each variant's manifest (the reduced build, its dense twin, and the dense f32 build of
a quantized one), builds the backend artifact from the exported graph (``model.opt.onnx``, or the
quantized model the workstation wrote), checks its outputs on the build's photos against
``reference.npy`` with the tolerance the manifest recorded, rewrites the manifest (files, versions,
sha256) and profiles the build against its dense twin (``report.json`` / ``report.md``). An engine
only runs on the TensorRT version and GPU that built it, which is why this step runs on the device.

Imports only the runtime side: numpy, Pillow and the backend's package (``vitfold.runtimes``,
``vitfold.artifact``, ``vitfold.images``, ``vitfold.metrics``, ``vitfold.profiles``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np

from . import runtimes
from .artifact import read_manifest, verify_files, write_manifest
from .errors import SpecError, VitfoldError
from .images import batches, list_images, load_images
from .metrics import Tolerance, compare
from .runtimes import BuildConfig
from .spec import Preprocess


def variants(directory: Path) -> List[Path]:
    """The build directories of a build: its dense twin, its dense f32 build (if any), itself."""
    manifest = read_manifest(directory)
    linked = [directory / manifest[key] for key in ("dense", "dense_f32") if key in manifest]
    return [p.resolve() for p in linked] + [Path(directory).resolve()]


def build_variant(directory: Path, *, images: Optional[Path] = None, force: bool = False,
                  log: Callable[[str], None] = print) -> dict:
    """Build the backend artifact of one exported variant in place and check it against its
    ``reference.npy``; returns the parity figures. A variant that already has its artifact is only
    checked (``force`` rebuilds it). ``images``: the folder the workstation checked on, when it was
    not the shipped photos (the same files must be here).

    Raises:
        ArtifactError: not an exported build, or files that do not match their sha256.
        FidelityError: the artifact misses the manifest's tolerance on the photos.
        BackendUnavailable: the backend (or its device) is missing here.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    cfg = BuildConfig.from_json(manifest["build"])
    files = manifest["files"]
    pre = Preprocess.from_json(manifest["preprocess"])
    paths = list_images(images)
    if [p.name for p in paths] != manifest["checks"]["images"]:
        raise SpecError(f"{directory}: reference.npy was computed on {manifest['checks']['images']}, the photos here are "
                        f"{[p.name for p in paths]}; pass the workstation's --images folder (copied here) with --images")
    check = batches(load_images(paths, pre), manifest["input"]["shape"][0])
    if force or "backend" not in files:
        source = directory / (files.get("quantized") or files.get("fused") or files["optimized"])
        log(f"{directory.name}: build {cfg.backend} ({cfg.label}) from {source.name}")
        built = runtimes.build(source, directory, cfg)
        manifest["files"] = files = {**files, **built["files"]}
        manifest["versions"] = {**manifest.get("versions", {}), **built["versions"]}
        if "fused" in files and "quantized" not in files:  # --fused-ops: the same outputs as the graph form, here too
            manifest["checks"]["fused_vs_graph_form"] = check_fused(directory, manifest, check[0], log)
        manifest["stage"] = "built on the device"
        write_manifest(directory, manifest)
    reference = np.load(directory / files["reference"])
    with runtimes.load(directory, verify=False) as session:
        outputs = np.concatenate([next(iter(session(b).values())) for b in check])
    tolerance = Tolerance.from_json(manifest["checks"]["tolerance"])
    key = manifest["checks"]["tolerance"]["key"]
    parity = compare(reference, outputs, classes=manifest["outputs"][0] == "logits")
    parity.check(tolerance, f"{directory.name}: {key} on this device vs the workstation's torch reference")
    manifest["checks"]["backend_vs_torch"] = parity.to_json()
    write_manifest(directory, manifest)
    log(f"{directory.name}: parity max abs {parity.max_abs:.2e}, min cosine {parity.min_cosine:.6f}")
    return parity.to_json()


def check_fused(directory: Path, manifest: dict, sample: np.ndarray, log: Callable[[str], None] = print) -> dict:
    """A ``--fused-ops`` build, built here: build its graph form (``model.opt.onnx``) beside it, in a
    temporary folder, and run both on ``sample`` ``[B, 3, H, W]``; their outputs must agree within
    :data:`vitfold.native.FUSED_TOLERANCE` of their scale (the same token choices), as the workstation's
    build checks.

    Returns ``{"max_abs": float, "tolerance": float}`` (the tolerance relative to the outputs' scale).

    Raises:
        FidelityError: the fused build moved an output beyond the tolerance.
    """
    import tempfile

    from .native import FUSED_TOLERANCE, check_fused_outputs

    cfg = BuildConfig.from_json(manifest["build"])
    plain = BuildConfig.from_json({**manifest["build"], "extra": {k: v for k, v in cfg.extra.items() if k != "fused_ops"}})
    module = runtimes.backend_module(cfg.backend)
    with tempfile.TemporaryDirectory(prefix="vitfold-graph-form-") as tmp:
        built = runtimes.build(Path(directory) / manifest["files"]["optimized"], Path(tmp), plain)
        files = {k: v for k, v in manifest["files"].items() if k not in ("extension", "plugin", "fused")}
        with module.load(Path(tmp), {"files": {**files, **built["files"]}, "build": plain.to_json()}) as graph_form:
            expected = graph_form(sample)
    with module.load(Path(directory), manifest) as fused:
        got = fused(sample)
    change = check_fused_outputs(expected, got, f"{Path(directory).name}: ", cfg.backend)
    log(f"{Path(directory).name}: fused sites match the graph form: max abs {change:.2g}")
    return {"max_abs": change, "tolerance": FUSED_TOLERANCE}


def build(directory: Path, *, images: Optional[Path] = None, force: bool = False, profile: bool = True,
          log: Callable[[str], None] = print) -> Optional[dict]:
    """Build every variant of ``directory`` on this device, then profile it; returns the report.

    Raises:
        as :func:`build_variant`; ArtifactError from the profile (a build that is not writable).
    """
    for variant in variants(Path(directory)):
        build_variant(variant, images=images, force=force, log=log)
    if not profile:
        return None
    from .profiles.report import profile_build

    log("profile: latency (dense and reduced interleaved), FLOPs, fidelity")
    return profile_build(Path(directory), images=images)


def _require_onnx_for_per_layer() -> None:
    """Per-layer profiles place each backend layer in its block from the ONNX graph's node metadata."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise SpecError("--per-layer reads the block of each layer from the ONNX graph: `pip install onnx` "
                        "on this device (the rest of the device side runs without it)") from None


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitfold.device", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    b = commands.add_parser("build", help="build the backend artifacts of an exported build, check and profile it")
    b.add_argument("directory", type=Path)
    b.add_argument("--force", action="store_true", help="rebuild artifacts that exist already")
    b.add_argument("--no-profile", action="store_true", help="build and check only")
    b.add_argument("--images", type=Path, default=None, help="the folder the workstation checked on (default: the shipped photos)")
    pr = commands.add_parser("profile", help="re-measure a built build against its dense twin")
    pr.add_argument("directory", type=Path)
    pr.add_argument("--per-layer", action="store_true", help="add the backend's per-layer counters")
    ev = commands.add_parser("eval", help="accuracy of a built build and its dense twin on a labeled folder")
    ev.add_argument("directory", type=Path)
    ev.add_argument("--data", type=Path, required=True, help="ImageFolder: DIR/<class>/<image>")
    ev.add_argument("--labels", type=Path, default=None, help="folder name of class i on line i")
    args = parser.parse_args(argv)
    try:
        if args.command == "eval":
            from .evaluate import evaluate

            result = evaluate(args.directory, args.data, args.labels)
            low, high = result["drop"]["interval"]
            print(f"{result['images']} images, {result['classes']} classes ({result['metric']}): top-1 dense "
                  f"{result['dense']['top1']:.2%}, build {result['reduced']['top1']:.2%}, drop {result['drop']['top1']:+.2%} "
                  f"(95% interval {low:+.2%} .. {high:+.2%}), agreement {result['agreement']:.2%}")
            return 0
        if args.command == "build":
            report = build(args.directory, images=args.images, force=args.force, profile=not args.no_profile)
        else:
            from .profiles.per_layer import LayerProfileOptions
            from .profiles.report import profile_build

            if args.per_layer:
                _require_onnx_for_per_layer()
            report = profile_build(args.directory, per_layer=LayerProfileOptions() if args.per_layer else None)
    except VitfoldError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return exc.exit_code
    if report is not None:
        from .profiles.report import fidelity_summary

        print(f"{report['name']}: speedup {report['speedup']:.2f}x (FLOP ratio {report['flop_ratio']:.2f}x); "
              f"vs dense: {fidelity_summary(report['fidelity_vs_dense'])}")
        print(f"report: {Path(args.directory) / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
