"""Output comparison: numpy only, shared by export checks, the pass harness, runtimes and profiles.

Tolerances are written down once, per backend precision, in :data:`TOLERANCES`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .errors import FidelityError


@dataclass(frozen=True)
class Tolerance:
    """Acceptance for a candidate vs a reference output: ``max_abs`` (None: not checked), minimum
    per-sample cosine, minimum top-1 agreement (classification outputs only)."""

    max_abs: float | None
    min_cosine: float
    min_top1: float = 1.0


#: Backend output vs the torch model that produced it, on real photos (per precision).
TOLERANCES: dict[str, Tolerance] = {
    "onnxruntime:f32": Tolerance(max_abs=1e-4, min_cosine=0.99999),
    "openvino:f32": Tolerance(max_abs=1e-3, min_cosine=0.9999),
    "openvino:bf16": Tolerance(max_abs=None, min_cosine=0.99, min_top1=0.85),
    "tensorrt:f32": Tolerance(max_abs=1e-3, min_cosine=0.9999),
    "tensorrt:fp16": Tolerance(max_abs=None, min_cosine=0.999),
}


@dataclass(frozen=True)
class Comparison:
    """Candidate vs reference ``[B, K]`` (or ``[B, ...]``) outputs over a set of images."""

    images: int
    max_abs: float
    mean_abs: float
    min_cosine: float
    mean_cosine: float
    top1_agreement: float
    top5_overlap: float

    def to_json(self) -> dict:
        return asdict(self)

    def check(self, tol: Tolerance, what: str) -> "Comparison":
        """Raise :class:`FidelityError` naming ``what`` and every violated bound; return self."""
        failures = []
        if tol.max_abs is not None and not self.max_abs <= tol.max_abs:
            failures.append(f"max abs error {self.max_abs:.3g} > {tol.max_abs:g}")
        if not self.min_cosine >= tol.min_cosine:
            failures.append(f"min cosine {self.min_cosine:.6f} < {tol.min_cosine}")
        if not self.top1_agreement >= tol.min_top1:
            failures.append(f"top-1 agreement {self.top1_agreement:.1%} < {tol.min_top1:.0%}")
        if failures:
            raise FidelityError(f"{what}: " + "; ".join(failures) + f" (over {self.images} images)")
        return self


def compare(reference: np.ndarray, candidate: np.ndarray) -> Comparison:
    """Compare two ``[B, ...]`` outputs sample by sample (flattened after the batch axis).

    Top-1 / top-5 compare argmax / top-5 sets over the last axis; for feature outputs they say how
    often the strongest channel agrees and are informative only.
    """
    ref = np.asarray(reference, np.float64).reshape(len(reference), -1)
    cand = np.asarray(candidate, np.float64).reshape(len(candidate), -1)
    if ref.shape != cand.shape:
        raise FidelityError(f"output shapes differ: reference {reference.shape}, candidate {candidate.shape}")
    diff = np.abs(ref - cand)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    cosine = np.where(norms > 0, (ref * cand).sum(axis=1) / np.maximum(norms, 1e-300), 1.0)
    top1 = float(np.mean(ref.argmax(axis=1) == cand.argmax(axis=1)))
    k = min(5, ref.shape[1])
    ref5 = np.argsort(-ref, axis=1)[:, :k]
    cand5 = np.argsort(-cand, axis=1)[:, :k]
    overlap = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ref5, cand5)]))
    return Comparison(
        images=len(ref),
        max_abs=float(diff.max()),
        mean_abs=float(diff.mean()),
        min_cosine=float(cosine.min()),
        mean_cosine=float(cosine.mean()),
        top1_agreement=top1,
        top5_overlap=overlap,
    )
