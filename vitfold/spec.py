"""Model specification and input preprocessing: plain data, no torch.

``Preprocess`` travels in every build's manifest, so a device app can prepare images exactly as the
model expects (timm's eval transform) with Pillow and numpy alone.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Optional


@dataclass(frozen=True)
class ModelSpec:
    """What to build.

    Attributes:
        name: timm model name (``deit_small_patch16_224``), or ``hf:DIR`` / ``hf:owner/name``: a Hugging
            Face transformers checkpoint, converted to timm (:mod:`vitfold.export.hf`).
        checkpoint: optional ``.pth`` / ``.safetensors`` state dict with timm keys.
        pretrained: load timm's hub weights (needs network); otherwise weights are random (seed 0)
            unless ``checkpoint`` is given.
        img_size: input height = width in pixels; None keeps the model's default.
        batch_size: static batch dimension of the exported graph.
    """

    name: str
    checkpoint: Optional[str] = None
    pretrained: bool = False
    img_size: Optional[int] = None
    batch_size: int = 1

    @property
    def is_hf(self) -> bool:
        """A transformers checkpoint (``hf:...``) rather than a timm name."""
        return self.name.startswith("hf:")

    @property
    def slug(self) -> str:
        """The model's part of a build name: the timm name, or ``hf-<directory or hub id>``."""
        if not self.is_hf:
            return self.name
        where = self.name[3:].rstrip("/")
        base = where.replace("\\", "/").rsplit("/", 1)[-1] if where.startswith((".", "/", "~")) else where.replace("/", "-")
        return "hf-" + (re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.") or "model")

    @property
    def weights(self) -> str:
        if self.checkpoint:
            return f"checkpoint {self.checkpoint}"
        if self.is_hf:
            return f"transformers {self.name[3:]}"
        return "timm pretrained" if self.pretrained else "random (seed 0): fidelity figures are not meaningful"

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Preprocess:
    """timm's eval transform: resize the short side to ``img_size / crop_pct``, centre crop
    ``img_size``, scale to [0, 1], normalise with ``mean`` / ``std`` (RGB)."""

    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    resize: str = "shortest"  # "squash": resize to img_size x img_size, no crop (transformers' ViT / SigLIP processors)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Preprocess":
        return cls(
            img_size=int(data["img_size"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            interpolation=data.get("interpolation", "bicubic"),
            crop_pct=float(data.get("crop_pct", 0.875)),
            resize=data.get("resize", "shortest"),
        )
