"""timm's Eva family (EVA-02: RoPE + SwiGLU; DINOv3: RoPE with rotate-half, registers, layer scale)
under ToMe and EViT / Top-K: parity at r=0 / keep 1.0, the RoPE table gathered with the tokens
(against an independent reference made of timm's own EvaBlock), and static exports on both CPU
backends."""

from __future__ import annotations

import json

import pytest
import torch
from timm.models.eva import Eva

from conftest import deploy
from vitfold.reduce import create_method
from vitfold.reduce._registry import TokenLayout
from vitfold.reduce.eva import ReducedEva


def tiny_eva(kind: str) -> Eva:
    """A 4-block, 64-wide Eva on 32x32 inputs (8x8 patches of 4 px) with random weights."""
    torch.manual_seed(0)
    common = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, num_classes=10, use_rot_pos_emb=True)
    if kind == "eva02":  # EVA-02: RoPE (interleaved), SwiGLU, fused qkv with q / v bias
        model = Eva(**common, mlp_ratio=8 / 3, swiglu_mlp=True, ref_feat_shape=(8, 8))
    elif kind == "pe":  # Perception Encoder: timm's AttentionRope, pre-transformer norm, xy RoPE grid
        model = Eva(**common, mlp_ratio=4, attn_type="rope", use_pre_transformer_norm=True, ref_feat_shape=(8, 8),
                    rope_grid_offset=1.0, rope_grid_indexing="xy")
    else:  # DINOv3-like: RoPE rotate-half, 4 registers, layer scale
        model = Eva(**common, mlp_ratio=4, num_reg_tokens=4, init_values=0.5, rope_type="dinov3", use_abs_pos_emb=False,
                    qkv_bias=False, rope_temperature=100, dynamic_img_size=True,
                    rope_rotate_half=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name or "gamma" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


KINDS = ["eva02", "dinov3", "pe"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method,params", [("tome", {"r": 0}), ("evit", {"keep_rate": 1.0, "locations": [1, 2]}),
                                           ("topk", {"keep_rate": 1.0, "locations": [1]})])
def test_no_reduction_is_the_dense_model_bit_for_bit(kind, method, params):
    model = tiny_eva(kind)
    m = create_method(method, **params)
    reduced = m.apply(model, m.schedule(TokenLayout.of(model)))
    assert isinstance(reduced, ReducedEva) and type(model) is Eva  # a patched copy, the model untouched
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reduced(x), model(x))


@pytest.mark.parametrize("kind", KINDS)
def test_pruning_gathers_the_rope_rows_with_the_tokens(kind):
    """Top-K at block 1 against a reference made of timm's EvaBlock: run block 1's attention, keep the
    top-k tokens by class attention, then run the later blocks on them with the RoPE rows gathered
    by the same indices. A patch that kept the table in the original order would differ."""
    model = tiny_eva(kind)
    P = model.num_prefix_tokens
    m = create_method("topk", keep_rate=0.5, locations=[1])
    reduced = m.apply(model, m.schedule(TokenLayout.of(model)))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = reduced.forward_features(x)

        t = model.norm_pre(model._pos_embed(model.patch_embed(x))[0])
        rope = model._pos_embed(model.patch_embed(x))[1]
        t = model.blocks[0](t, rope=rope)
        block = model.blocks[1]
        attn = block.attn
        y = block.norm1(t)
        captured = {}
        hook = attn.register_forward_hook(lambda mod, inp, out: captured.setdefault("out", out))
        block.attn(y, rope=rope)
        hook.remove()
        # class attention, written out: q / k as EvaAttention makes them, rotated by timm's helper
        B, N, C = y.shape
        if getattr(attn, "q_bias", None) is not None:
            qkv = torch.nn.functional.linear(y, attn.qkv.weight, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
        else:
            qkv = attn.qkv(y)
        q, k, _ = qkv.reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        from timm.layers import apply_rot_embed_cat

        q = torch.cat([q[:, :, :P], apply_rot_embed_cat(q[:, :, P:], rope, half=attn.rotate_half)], dim=2)
        k = torch.cat([k[:, :, :P], apply_rot_embed_cat(k[:, :, P:], rope, half=attn.rotate_half)], dim=2)
        cls = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(-1).mean(1)[:, 0, P:]
        keep = (N - P) // 2
        idx = cls.topk(keep, dim=1).indices
        gamma = block.gamma_1 if block.gamma_1 is not None else 1.0
        t = t + gamma * captured["out"]
        t = torch.cat([t[:, :P], torch.stack([t[b, P:][idx[b]] for b in range(B)])], dim=1)
        t = t + (block.gamma_2 if block.gamma_2 is not None else 1.0) * block.mlp(block.norm2(t))
        table = torch.stack([rope[idx[b]] for b in range(B)])[:, None]  # [B, 1, keep, D]
        for later in model.blocks[2:]:
            t = later(t, rope=table)
        want = model.norm(t)
        stale = t  # the same tokens with the table left in the original order: must differ
    assert got.shape == want.shape == (2, P + keep, 64)
    assert (got - want).abs().max() <= 1e-5
    with torch.no_grad():
        wrong = stale
        for later in model.blocks[2:]:
            wrong = later(wrong, rope=torch.stack([rope[:keep]] * 2)[:, None])
    assert (model.norm(wrong) - want).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_tome_rope_merges_differ_and_stay_close_to_dense(kind):
    model = tiny_eva(kind)
    layout = TokenLayout.of(model)
    x = torch.randn(2, 3, 32, 32)
    outs = {}
    for how in ("dst", "mean"):
        m = create_method("tome", r=6, rope_merge=how)
        reduced = m.apply(model, m.schedule(layout))
        with torch.no_grad():
            outs[how] = reduced.forward_features(x)
        assert outs[how].shape[1] == layout.num_tokens - 4 * 6
    assert not torch.equal(outs["dst"], outs["mean"])
    with pytest.raises(Exception, match="rope_merge"):
        create_method("tome", r=6, rope_merge="nearest")


def test_remove_restores_the_dense_classes():
    from vitfold.reduce.tome import ToMe

    model = tiny_eva("eva02")
    m = create_method("tome", r=4)
    reduced = m.apply(model, m.schedule(TokenLayout.of(model)))
    ToMe.remove(reduced)
    assert type(reduced) is Eva and type(reduced.blocks) is torch.nn.Sequential
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reduced(x), model(x))


@pytest.mark.parametrize("model,method,backend", [
    ("eva02_tiny_patch14_224", ["--method", "tome", "--r", "2"], "onnxruntime"),
    ("vit_small_patch16_dinov3", ["--method", "evit", "--keep", "0.7"], "openvino"),
])
def test_eva_builds_export_static_and_match_torch(model, method, backend, tmp_path):
    out = tmp_path / "b"
    result = deploy("build", "--model", model, "--img-size", "112", *method, "--backend", backend, "--out", str(out),
                    "--min-runs", "3", "--min-seconds", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["checks"]["backend_vs_torch"]["max_abs"] <= manifest["checks"]["tolerance"]["max_abs"]
    assert manifest["schedule"]["tokens"][-1] < manifest["schedule"]["tokens"][0]
    report = json.loads((out / "report.json").read_text())
    assert report["graph_gmacs"]["reduced"] == pytest.approx(report["gmacs"]["reduced"], rel=0.01)
    import onnx

    graph = onnx.load(str(out / "model.opt.onnx"), load_external_data=False).graph
    dims = [d for v in list(graph.input) + list(graph.output) for d in v.type.tensor_type.shape.dim]
    assert all(d.HasField("dim_value") for d in dims)  # static


@pytest.mark.parametrize("method", ["dpc-knn", "kmedoids", "expedite", "evit-mass"])
def test_methods_without_an_eva_patch_refuse_it(method):
    """Eva runs its blocks in its own loop: a method patching ``model.blocks`` as a whole would never
    run and the "reduced" model would silently be the dense one. They refuse instead."""
    from vitfold.errors import SpecError

    import timm

    model = timm.create_model("eva02_tiny_patch14_224", img_size=224).eval()  # 12 blocks, 16x16 patches
    m = create_method(method)
    with pytest.raises((SpecError, NotImplementedError), match="tome, evit, topk|EvaBlock|got Eva"):
        m.apply(model, m.schedule(TokenLayout.of(model)))


def test_restore_at_is_refused_for_eva():
    """restore_at would need the full RoPE table back mid-network; it says so instead of running wrong."""
    from vitfold.errors import SpecError

    model = tiny_eva("eva02")
    method = create_method("evit", keep_rate=0.5, locations=(1,), trace_source=True, restore_at=2)
    with pytest.raises(SpecError, match="restore_at is not implemented for Eva models"):
        method.apply(model, method.schedule(TokenLayout.of(model)))
