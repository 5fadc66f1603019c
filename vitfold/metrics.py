"""Output comparison: numpy only, shared by export checks, the pass harness, runtimes and profiles.

Backend tolerances are written down once per precision in each backend's record
(:mod:`vitfold.runtimes.backends`); the pass harness's own are in :data:`TOLERANCES`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from .errors import FidelityError


@dataclass(frozen=True)
class Tolerance:
    """Acceptance for a candidate vs a reference output: ``max_abs`` (None: not checked), minimum
    per-sample cosine, minimum top-1 agreement (classification outputs only), minimum mean per-token
    cosine (feature maps ``[B, N, C]`` only; None: not checked)."""

    max_abs: float | None
    min_cosine: float
    min_top1: float = 1.0
    min_token_cosine: float | None = None

    def to_json(self) -> dict:
        return {"max_abs": self.max_abs, "min_cosine": self.min_cosine, "min_top1": self.min_top1,
                "min_token_cosine": self.min_token_cosine}

    @classmethod
    def from_json(cls, data: dict) -> "Tolerance":
        return cls(**{k: data[k] for k in ("max_abs", "min_cosine", "min_top1", "min_token_cosine") if k in data})


TOLERANCES: dict[str, Tolerance] = {
    # The graph after the ``precision`` pass vs the float32 graph, both on ONNX Runtime CPU (the pass
    # harness): fp16 keeps 10 mantissa bits, bf16 7, with float32 islands (vitfold/passes/precision.py).
    "precision-pass:fp16": Tolerance(max_abs=None, min_cosine=0.999, min_top1=1.0),
    "precision-pass:bf16": Tolerance(max_abs=None, min_cosine=0.99, min_top1=0.0),
}


@dataclass(frozen=True)
class Comparison:
    """Candidate vs reference outputs over a set of images.

    Classification outputs ``[B, K]``: per-sample cosine, top-1 agreement and top-5 overlap.
    Dense features ``[B, N, C]``: per-sample cosine of the flattened map, and per-token cosine
    (``token_cosine_mean`` / ``token_cosine_min`` over every token of every image); top-1 and top-5
    are None there (an argmax over a feature map means nothing), and a tolerance's ``max_abs`` is
    relative to the largest reference feature (when above 1): feature maps reach tens (DINOv2) where
    logits stay near 10, and float32 rounding scales with the magnitude.
    """

    images: int
    max_abs: float
    mean_abs: float
    min_cosine: float
    mean_cosine: float
    top1_agreement: Optional[float]
    top5_overlap: Optional[float]
    token_cosine_mean: Optional[float] = None
    token_cosine_min: Optional[float] = None
    reference_max_abs: Optional[float] = None

    def to_json(self) -> dict:
        return asdict(self)

    def check(self, tol: Tolerance, what: str) -> "Comparison":
        """Raise :class:`FidelityError` naming ``what`` and every violated bound; return self."""
        failures = []
        limit = tol.max_abs
        if limit is not None and self.token_cosine_mean is not None and self.reference_max_abs:
            # Dense features: float32 keeps ~7 digits of the largest feature, so the bound scales with it.
            limit = tol.max_abs * max(1.0, self.reference_max_abs)
        if limit is not None and not self.max_abs <= limit:
            failures.append(f"max abs error {self.max_abs:.3g} > {limit:g}")
        if not self.min_cosine >= tol.min_cosine:
            failures.append(f"min cosine {self.min_cosine:.6f} < {tol.min_cosine}")
        if self.top1_agreement is not None and not self.top1_agreement >= tol.min_top1:
            failures.append(f"top-1 agreement {self.top1_agreement:.1%} < {tol.min_top1:.0%}")
        if (tol.min_token_cosine is not None and self.token_cosine_mean is not None
                and not self.token_cosine_mean >= tol.min_token_cosine):
            failures.append(f"mean token cosine {self.token_cosine_mean:.4f} < {tol.min_token_cosine}")
        if failures:
            raise FidelityError(f"{what}: " + "; ".join(failures) + f" (over {self.images} images)")
        return self


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``[B, K]`` logits, in float64."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def cosine_rows(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows of two ``[M, D]`` arrays (1.0 where both are zero)."""
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1)
    return np.where(norms > 0, (reference * candidate).sum(axis=1) / np.maximum(norms, 1e-300), 1.0)


def compare(reference: np.ndarray, candidate: np.ndarray, *, classes: bool = True) -> Comparison:
    """Compare two outputs sample by sample: logits ``[B, K]``, an embedding ``[B, C]`` (a headless
    model: ``classes=False``) or dense features ``[B, N, C]``. Top-1 and top-5 are computed for
    class scores only (None for an embedding or a feature map: an argmax over channels means nothing).

    Raises:
        FidelityError: the shapes differ.
    """
    if np.shape(reference) != np.shape(candidate):
        raise FidelityError(f"output shapes differ: reference {np.shape(reference)}, candidate {np.shape(candidate)}")
    features = np.ndim(reference) == 3
    ref = np.asarray(reference, np.float64).reshape(len(reference), -1)
    cand = np.asarray(candidate, np.float64).reshape(len(candidate), -1)
    diff = np.abs(ref - cand)
    cosine = cosine_rows(ref, cand)
    top1 = overlap = token_mean = token_min = None
    if features:
        width = np.shape(reference)[-1]
        tokens = cosine_rows(ref.reshape(-1, width), cand.reshape(-1, width))
        token_mean, token_min = float(tokens.mean()), float(tokens.min())
    elif classes:
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
        token_cosine_mean=token_mean,
        token_cosine_min=token_min,
        reference_max_abs=float(np.abs(ref).max()),
    )
