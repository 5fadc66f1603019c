"""The dense/reduced model factory: timm model + weights -> eval-mode ``VisionTransformer``."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Optional

import timm
import torch
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer

from ..errors import SpecError
from ..spec import ModelSpec, Preprocess

_WRAPPER_KEYS = ("state_dict", "model", "model_ema", "module")


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a timm-keyed state dict from ``.safetensors`` or ``.pth``/``.pt``/``.bin``.

    Unwraps the usual training-checkpoint containers (``state_dict``, ``model``, ``module.`` prefix).

    Raises:
        SpecError: missing file, unknown suffix, or a file that cannot be parsed (corrupt/truncated).
    """
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise SpecError(f"checkpoint {path}: unknown format {path.suffix!r}; use .safetensors or .pth")
    except SpecError:
        raise
    except Exception as exc:  # safetensors / pickle raise many types on corrupt files
        raise SpecError(f"checkpoint {path} is corrupt or not a state dict ({type(exc).__name__}: {exc})") from exc
    for key in _WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SpecError(f"checkpoint {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _check_name(name: str) -> None:
    if timm.is_model(name):
        return
    names = timm.list_models()
    close = [n for n in names if n.startswith(name)][:3] or [n for n in names if name in n][:3]
    close = close or difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f" Close matches: {', '.join(close)}." if close else " See timm.list_models('vit_*')."
    raise SpecError(f"unknown timm model {name!r}.{hint}")


def create_model(spec: ModelSpec) -> tuple[VisionTransformer, Preprocess]:
    """Build the dense reference model for ``spec`` in eval mode, and its input preprocessing.

    ``hf:`` names go through :func:`vitfold.export.hf.create_hf_model` (a transformers checkpoint
    converted to timm and checked against transformers on the photos).

    Random weights are seeded (seed 0) so that a build is reproducible. With a checkpoint the number
    of classes is read from its ``head.weight`` (a headless checkpoint gives a feature model).

    Raises:
        SpecError: unknown name (with close matches), not a ViT, image size not a multiple of the
            patch size, or a checkpoint that is corrupt or does not match (missing / unexpected /
            mis-shaped keys named).
    """
    if spec.is_hf:
        from .hf import create_hf_model

        return create_hf_model(spec)
    _check_name(spec.name)
    state: Optional[dict] = load_state_dict(Path(spec.checkpoint)) if spec.checkpoint else None
    kwargs: dict = {}
    if spec.img_size is not None:
        kwargs["img_size"] = spec.img_size
    if state is not None:
        kwargs["num_classes"] = state["head.weight"].shape[0] if "head.weight" in state else 0
    torch.manual_seed(0)
    try:
        model = timm.create_model(spec.name, pretrained=spec.pretrained, **kwargs)
    except (RuntimeError, OSError, ValueError) as exc:
        if spec.pretrained:
            raise SpecError(f"cannot load timm pretrained weights for {spec.name} ({exc}); use --checkpoint") from exc
        raise SpecError(f"timm cannot build {spec.name} with {kwargs}: {exc}") from exc
    if not isinstance(model, (VisionTransformer, Eva)):
        raise SpecError(
            f"{spec.name} is a {type(model).__name__}, not a timm VisionTransformer or Eva; vitfold reduces "
            f"tokens of plain ViTs (vit_*, deit_*, deit3_*, *_dinov2) and Eva / RoPE ViTs (eva02_*, *_dinov3, vit_pe_*)"
        )
    patch = model.patch_embed.patch_size[0]
    size = model.patch_embed.img_size[0]
    if spec.img_size is not None and spec.img_size % patch:
        raise SpecError(f"image size {spec.img_size} is not a multiple of {spec.name}'s patch size {patch}")
    if state is not None:
        _load_checked(model, state, spec.checkpoint)
    cfg = model.pretrained_cfg or {}
    pre = Preprocess(
        img_size=size,
        mean=tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))),
        interpolation=cfg.get("interpolation", "bicubic"),
        crop_pct=float(cfg.get("crop_pct", 0.875)),
    )
    return model.eval(), pre


def _load_checked(model: torch.nn.Module, state: dict, path: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    problems = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", shapes)):
        if keys:
            shown = ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise SpecError(f"checkpoint {path} does not match {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)
