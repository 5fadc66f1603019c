"""Model specification and input preprocessing: plain data, no torch.

``Preprocess`` travels in every build's manifest, so a device app can prepare images exactly as the
model expects (timm's eval transform) with Pillow and numpy alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional


@dataclass(frozen=True)
class ModelSpec:
    """What to build.

    Attributes:
        name: timm model name (``deit_small_patch16_224``).
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
    def weights(self) -> str:
        if self.checkpoint:
            return f"checkpoint {self.checkpoint}"
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
        )
