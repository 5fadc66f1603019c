"""Shared fixtures: tiny timm ViTs of every flavour ToMe must respect, and the real DINOv2 weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DINOV2 = REPO.parent / "shared" / "data" / "dinov2_vits14_224.safetensors"


def deploy(*args, cwd=None) -> subprocess.CompletedProcess:
    """Run ``python deploy.py ARGS`` as a user would, from ``cwd``."""
    return subprocess.run([sys.executable, str(REPO / "deploy.py"), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=900)


def pytest_addoption(parser):
    parser.addoption("--dinov2", default=os.environ.get("VITFOLD_DINOV2", str(DEFAULT_DINOV2)),
                     help="path to dinov2_vits14_224.safetensors (env VITFOLD_DINOV2)")


@pytest.fixture(scope="session")
def dinov2_path(request) -> Path:
    path = Path(request.config.getoption("--dinov2"))
    if not path.is_file():
        pytest.skip(f"real DINOv2 weights not found at {path} (pass --dinov2 PATH or set VITFOLD_DINOV2)")
    return path


def tiny_vit(**overrides):
    """A 4-block, 64-wide ViT on 32x32 inputs (16 patches + prefix tokens), random weights, eval."""
    import torch
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    kwargs = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=10)
    kwargs.update(overrides)
    return VisionTransformer(**kwargs).eval()


#: Flavours ToMe must handle: plain, layer scale (DeiT-3 / DINOv2), qk-norm, registers, no class token.
FLAVOURS = {
    "plain": {},
    "layer_scale": {"init_values": 0.1},
    "qk_norm": {"qk_norm": True},
    "registers": {"reg_tokens": 4, "init_values": 0.1},
    "no_class_token": {"class_token": False, "global_pool": "avg"},
}


def plain_attention(block, x):
    """A timm block's attention written out (explicit probabilities, one image), for plain references.

    Returns ``(x + ls1(attention output) [1, N, C], probabilities [1, H, N, N])``.
    """
    attn = block.attn
    n, c = x.shape[1], x.shape[2]
    qkv = attn.qkv(block.norm1(x)).reshape(1, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    probs = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)
    return x + block.ls1(attn.proj((probs @ v).transpose(1, 2).reshape(1, n, c))), probs
