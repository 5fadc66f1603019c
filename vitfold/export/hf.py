"""Hugging Face transformers checkpoints as timm VisionTransformers (``--model hf:DIR``).

Design: convert, do not patch. The checkpoint is loaded with transformers itself (its own key
conversions, its own checks), its architecture is rebuilt as the equivalent timm
``VisionTransformer`` from ``config.json``, and the state dict is mapped key by key (q / k / v
projections concatenated into timm's ``qkv``). Every token-reduction method, pass and report then
works on one model class, and the converted model is checked against the transformers model on the
photos before anything else runs (:data:`PARITY_MAX_ABS`; a miss is an error). Patching
transformers' modules instead would mean a second implementation of every method per family.

Covered (``config.json`` ``architectures`` / ``model_type``):

==========================================  ============================================================
ViTForImageClassification, ViTModel          class token; logits (``id2label`` names the classes)
DeiTForImageClassificationWithTeacher        class + distillation token; logits = mean of both heads
DeiTForImageClassification, DeiTModel        class + distillation token; logits from the class head
Dinov2Model                                  class token, layer scale; features (final norm)
CLIPVisionModel, CLIPModel (vision tower)    pre-norm; features = ``post_layernorm`` on every token
SiglipVisionModel, SiglipModel (vision)      no class token; features (the attention-pool head is left out)
==========================================  ============================================================

Features are the final-norm tokens ``[B, N, C]``. For CLIP transformers normalises only the class
token (``pooler_output``); timm's ``norm`` is that same LayerNorm applied to every token, which is
what the check compares. Requires transformers >= 5 (the ``[hf]`` extra): the parameter names are
those of the loaded model, which transformers 5 normalises across checkpoints.
"""

from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..errors import SpecError
from ..spec import ModelSpec, Preprocess

PREFIX = "hf:"
PARITY_MAX_ABS = 1e-4  # converted vs transformers, f32, on the photos (issue 16)

#: architecture -> (family, output): the transformers classes this module converts.
ARCHITECTURES = {
    "ViTForImageClassification": ("vit", "logits"),
    "ViTModel": ("vit", "features"),
    "DeiTForImageClassificationWithTeacher": ("deit", "logits"),
    "DeiTForImageClassification": ("deit", "logits"),
    "DeiTModel": ("deit", "features"),
    "Dinov2Model": ("dinov2", "features"),
    "CLIPVisionModel": ("clip", "features"),
    "CLIPModel": ("clip", "features"),
    "SiglipVisionModel": ("siglip", "features"),
    "SiglipModel": ("siglip", "features"),
}
_DEFAULT_ARCHITECTURE = {"vit": "ViTModel", "deit": "DeiTModel", "dinov2": "Dinov2Model", "clip": "CLIPModel",
                         "clip_vision_model": "CLIPVisionModel", "siglip": "SiglipModel",
                         "siglip_vision_model": "SiglipVisionModel"}
_ACTIVATIONS = {"gelu": nn.GELU, "gelu_pytorch_tanh": partial(nn.GELU, approximate="tanh"),
                "gelu_new": partial(nn.GELU, approximate="tanh"), "gelu_fast": partial(nn.GELU, approximate="tanh")}
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}

# Key map, applied to the transformers model's own state dict (after its checkpoint conversions).
_DROP = re.compile(r"^(embeddings\.mask_token|pooler\..*|head\..*|text_model\..*|text_projection\..*|"
                   r"visual_projection\..*|logit_scale|logit_bias)$")
_LAYER = re.compile(r"^(?:encoder\.layers?|layers)\.(\d+)\.(.+)$")
_LAYER_PARTS = [
    (r"(?:attention|self_attn)\.(q|k|v)_proj\.(weight|bias)", r"attn.\1.\2"),
    (r"(?:attention\.o_proj|self_attn\.out_proj)\.(weight|bias)", r"attn.proj.\1"),
    (r"(?:layernorm_before|norm1|layer_norm1)\.(weight|bias)", r"norm1.\1"),
    (r"(?:layernorm_after|norm2|layer_norm2)\.(weight|bias)", r"norm2.\1"),
    (r"mlp\.(fc1|fc2)\.(weight|bias)", r"mlp.\1.\2"),
    (r"layer_scale1\.lambda1", "ls1.gamma"),
    (r"layer_scale2\.lambda1", "ls2.gamma"),
]
_TOP = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.class_embedding", "cls_token"),
    (r"embeddings\.distillation_token", "dist_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.position_embedding\.weight", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"embeddings\.patch_embedding\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"pre_layrnorm\.(weight|bias)", r"norm_pre.\1"),
    (r"(?:layernorm|post_layernorm)\.(weight|bias)", r"norm.\1"),
    (r"(?:classifier|cls_classifier)\.(weight|bias)", r"head.\1"),
    (r"distillation_classifier\.(weight|bias)", r"head_dist.\1"),
]


def is_hf(name: str) -> bool:
    """True for ``hf:DIR`` / ``hf:owner/name`` model names."""
    return name.startswith(PREFIX)


def resolve(spec: ModelSpec) -> Path:
    """The local ``save_pretrained`` directory of ``spec.name``: the path itself, or a hub snapshot.

    A hub id is fetched with ``huggingface_hub`` (config and preprocessing always; the safetensors
    weights with ``--pretrained``). Raises :class:`SpecError` for a directory without ``config.json``
    or a hub that cannot be reached.
    """
    where = spec.name[len(PREFIX):]
    if not where:
        raise SpecError("--model hf: needs a directory or a hub id, e.g. hf:./my-finetuned-vit")
    local = Path(where).expanduser()
    if local.exists() or where.startswith((".", "/", "~")):
        if not local.is_dir():
            raise SpecError(f"{where} is not a directory; --model hf:DIR takes a transformers save_pretrained directory")
        if not (local / "config.json").is_file():
            raise SpecError(f"{where} has no config.json: not a transformers save_pretrained directory "
                            "(save it with model.save_pretrained(DIR), or give a timm name)")
        return local
    try:
        from huggingface_hub import snapshot_download

        patterns = ["config.json", "preprocessor_config.json"] + (["*.safetensors"] if spec.pretrained else [])
        return Path(snapshot_download(where, allow_patterns=patterns))
    except Exception as exc:  # offline, unknown repo, gated repo: all end the same way for the user
        raise SpecError(f"cannot fetch {where} from the Hugging Face hub ({type(exc).__name__}); where the hub is "
                        f"not reachable, save the model with save_pretrained and pass hf:DIR") from exc


def read_config(directory: Path) -> dict:
    """``config.json`` as a dict, with ``architecture`` (one of :data:`ARCHITECTURES`) resolved.

    Raises:
        SpecError: unreadable JSON, or an architecture / ``model_type`` this module does not convert.
    """
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise SpecError(f"{directory / 'config.json'} cannot be read as JSON ({exc})") from exc
    names = [a for a in config.get("architectures") or [] if a in ARCHITECTURES]
    architecture = names[0] if names else _DEFAULT_ARCHITECTURE.get(config.get("model_type", ""))
    if architecture is None:
        given = ", ".join(config.get("architectures") or []) or config.get("model_type", "no model_type")
        raise SpecError(f"{directory}: transformers {given} is not covered; vitfold converts "
                        f"{', '.join(ARCHITECTURES)}")
    return {**config, "architecture": architecture}


def label_names(config: dict) -> Optional[list[str]]:
    """``id2label`` of a classification checkpoint, in class order; None for feature models and for
    the placeholder ``LABEL_i`` names transformers writes when none were given."""
    if ARCHITECTURES[config["architecture"]][1] != "logits":
        return None
    labels = config.get("id2label") or {}
    names = [str(labels.get(str(i), labels.get(i, ""))) for i in range(len(labels))]
    if not names or all(re.fullmatch(r"LABEL_\d+", n) for n in names):
        return None
    return names


def preprocess(directory: Path, img_size: int) -> Preprocess:
    """:class:`Preprocess` from ``preprocessor_config.json`` (ImageNet defaults where it is absent).

    ``do_center_crop`` with ``size.shortest_edge`` S and a crop C gives ``crop_pct = C / S``; a resize to
    ``height x width`` without a crop (ViT, SigLIP) is ``resize="squash"``.
    """
    path = directory / "preprocessor_config.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    mean = tuple(float(v) for v in data.get("image_mean", (0.485, 0.456, 0.406)))
    std = tuple(float(v) for v in data.get("image_std", (0.229, 0.224, 0.225)))
    interpolation = _RESAMPLE.get(int(data.get("resample", 3)), "bicubic")
    size = data.get("size") or {}
    size = {"shortest_edge": size} if isinstance(size, int) else size
    if data.get("do_center_crop", False) and "shortest_edge" in size:
        crop = data.get("crop_size") or {}
        crop = crop.get("height", img_size) if isinstance(crop, dict) else int(crop)
        return Preprocess(img_size, mean, std, interpolation, crop_pct=float(crop) / float(size["shortest_edge"]))
    if data and "height" in size:
        return Preprocess(img_size, mean, std, interpolation, crop_pct=1.0, resize="squash")
    return Preprocess(img_size, mean, std, interpolation, crop_pct=1.0 if data else 0.875)


def _load_transformers(directory: Path, config: dict) -> nn.Module:
    try:
        import transformers
    except ImportError as exc:
        raise SpecError("--model hf: needs transformers: pip install -c constraints.txt -e \".[hf]\"") from exc
    transformers.utils.logging.set_verbosity_error()  # its load report is checked below, not printed
    transformers.utils.logging.disable_progress_bar()
    cls = getattr(transformers, config["architecture"])
    weights = sorted(directory.glob("*.safetensors")) + sorted(directory.glob("pytorch_model*.bin"))
    if not weights:
        torch.manual_seed(0)
        return cls(cls.config_class.from_pretrained(str(directory))).eval()
    try:
        model, info = cls.from_pretrained(str(directory), output_loading_info=True)
    except Exception as exc:  # shape mismatches, corrupt files: transformers raises several types
        raise SpecError(f"{directory}: transformers cannot load these weights into {config['architecture']} "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
    if problems:
        shown = "; ".join(f"{k.replace('_', ' ')}: {', '.join(str(x) for x in list(v)[:4])}"
                          + (f" (+{len(v) - 4} more)" if len(v) > 4 else "") for k, v in problems.items())
        raise SpecError(f"{directory}: the weights do not match config.json ({shown})")
    return model.eval()


def _vision_part(model: nn.Module, config: dict) -> tuple[nn.Module, dict]:
    """The vision tower and its config dict (CLIPModel / SiglipModel hold one beside a text tower)."""
    if config["architecture"] in ("CLIPModel", "SiglipModel"):
        return model.vision_model, model.config.vision_config.to_dict()
    return model, model.config.to_dict()


def _timm_model(family: str, vcfg: dict, architecture: str, img_size: int, num_classes: int) -> nn.Module:
    from timm.layers import QuickGELU
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    act = vcfg.get("hidden_act", "gelu")
    act_layer = QuickGELU if act == "quick_gelu" else _ACTIVATIONS.get(act)
    if act_layer is None:
        raise SpecError(f"activation {act!r} of this {architecture} is not covered ({', '.join(_ACTIVATIONS)}, quick_gelu)")
    if vcfg.get("use_swiglu_ffn"):
        raise SpecError(f"{architecture} with use_swiglu_ffn (DINOv2 giant) is not covered")
    width = int(vcfg["hidden_size"])
    hidden = int(vcfg["intermediate_size"]) if "intermediate_size" in vcfg else int(round(width * float(vcfg["mlp_ratio"])))
    kwargs = dict(
        img_size=img_size, patch_size=int(vcfg["patch_size"]), embed_dim=width, depth=int(vcfg["num_hidden_layers"]),
        num_heads=int(vcfg["num_attention_heads"]), mlp_ratio=(hidden + 0.5) / width, qkv_bias=bool(vcfg.get("qkv_bias", True)),
        norm_layer=partial(nn.LayerNorm, eps=float(vcfg.get("layer_norm_eps", 1e-12))), act_layer=act_layer,
        num_classes=num_classes, global_pool="token", in_chans=int(vcfg.get("num_channels", 3)),
    )
    if family == "dinov2":
        kwargs["init_values"] = float(vcfg.get("layerscale_value", 1.0))
    if family == "clip":
        kwargs["pre_norm"] = True  # pre_layrnorm; timm then builds the patch projection without a bias, as CLIP
    if family == "siglip":
        kwargs.update(class_token=False, global_pool="avg", fc_norm=False)  # post_layernorm on every token
    cls = VisionTransformerDistilled if family == "deit" else VisionTransformer
    torch.manual_seed(0)
    return cls(**kwargs).eval()


def _map_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = re.sub(r"^(vit|deit|vision_model)\.", "", key)
        if _DROP.match(key):
            continue
        layer = _LAYER.match(key)
        if layer:
            index, rest = layer.groups()
            for pattern, repl in _LAYER_PARTS:
                if re.fullmatch(pattern, rest):
                    out[f"blocks.{index}." + re.sub(pattern, repl, rest)] = value
                    break
            else:
                raise SpecError(f"no timm counterpart for the transformers parameter {key}")
            continue
        for pattern, repl in _TOP:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, repl, key)] = value
                break
        else:
            raise SpecError(f"no timm counterpart for the transformers parameter {key}")
    for prefix in sorted({k.rsplit(".", 2)[0] for k in out if k.endswith((".q.weight", ".q.bias"))}):
        for part in ("weight", "bias"):
            pieces = [out.pop(f"{prefix}.{p}.{part}", None) for p in "qkv"]
            if all(p is not None for p in pieces):
                out[f"{prefix}.qkv.{part}"] = torch.cat(pieces, dim=0)
    if "cls_token" in out:
        out["cls_token"] = out["cls_token"].reshape(1, 1, -1)
    if "pos_embed" in out and out["pos_embed"].dim() == 2:
        out["pos_embed"] = out["pos_embed"][None]
    return out


def _position_table(vision: nn.Module, table: torch.Tensor, prefix: int, img_size: int, patch: int) -> torch.Tensor:
    """The position embeddings transformers adds at ``img_size`` (its own interpolation when the
    checkpoint was trained at another size), so that the converted model matches it there."""
    grid = img_size // patch
    if table.shape[1] == prefix + grid * grid:
        return table
    probe = torch.zeros(1, prefix + grid * grid, table.shape[-1])
    with torch.no_grad():
        return vision.embeddings.interpolate_pos_encoding(probe, img_size, img_size).detach().clone()


def _reference_outputs(hf: nn.Module, vision: nn.Module, config: dict, family: str, images: torch.Tensor,
                       resized: bool) -> dict[str, torch.Tensor]:
    kwargs = {"interpolate_pos_encoding": True} if resized and family != "dinov2" else {}
    with torch.no_grad():
        if config["architecture"].endswith(("ForImageClassification", "WithTeacher")):
            logits = hf(pixel_values=images, **kwargs).logits
            base = getattr(hf, hf.base_model_prefix)
            return {"logits": logits, "tokens": base(pixel_values=images, **kwargs).last_hidden_state}
        out = vision(pixel_values=images, **kwargs).last_hidden_state
        if family == "clip":
            out = vision.post_layernorm(out)
        return {"tokens": out}


def create_hf_model(spec: ModelSpec) -> tuple[nn.Module, Preprocess]:
    """The timm equivalent of a transformers checkpoint, checked against it on the photos.

    Args:
        spec: ``name`` is ``hf:DIR`` (a ``save_pretrained`` directory: ``config.json``, weights, optional
            ``preprocessor_config.json``) or ``hf:owner/name`` (hub; weights with ``spec.pretrained``).
            ``img_size`` None keeps ``config.image_size``.

    Returns:
        ``(model, preprocess)``: an eval-mode timm ``VisionTransformer`` (``VisionTransformerDistilled``
        for DeiT) whose logits ``[B, classes]`` or final-norm tokens ``[B, N, C]`` match transformers'
        within :data:`PARITY_MAX_ABS` on the shipped photos, and the checkpoint's preprocessing.

    Raises:
        SpecError: no ``config.json``, an uncovered architecture (named), weights that do not match the
            config, an unreachable hub, a ``--checkpoint`` (the directory holds the weights), or a
            conversion that misses the transformers model by more than :data:`PARITY_MAX_ABS`.
    """
    if spec.checkpoint:
        raise SpecError("--checkpoint is for timm names; an hf: directory carries its own weights")
    directory = resolve(spec)
    config = read_config(directory)
    family, output = ARCHITECTURES[config["architecture"]]
    hf = _load_transformers(directory, config)
    vision, vcfg = _vision_part(hf, config)
    native = int(vcfg["image_size"])
    img_size = spec.img_size or native
    patch = int(vcfg["patch_size"])
    if img_size % patch:
        raise SpecError(f"image size {img_size} is not a multiple of {spec.name}'s patch size {patch}")
    state = _map_state(hf.state_dict() if config["architecture"] not in ("CLIPModel", "SiglipModel")
                       else {f"vision_model.{k}": v for k, v in vision.state_dict().items()})
    num_classes = state["head.weight"].shape[0] if "head.weight" in state else 0
    model = _timm_model(family, vcfg, config["architecture"], img_size, num_classes)
    prefix = model.num_prefix_tokens
    state["pos_embed"] = _position_table(vision, state["pos_embed"], prefix, img_size, patch)
    if config["architecture"] == "DeiTForImageClassification":
        # timm's distilled head averages two heads: (2 W x_cls + 0) / 2 is W x_cls exactly in floating
        # point (scaling by 2 is exact), so the class head alone gives transformers' logits.
        state["head.weight"], state["head.bias"] = state["head.weight"] * 2, state["head.bias"] * 2
        state["head_dist.weight"] = torch.zeros_like(state["head.weight"])
        state["head_dist.bias"] = torch.zeros_like(state["head.bias"])
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or shapes:
        raise SpecError(f"{directory}: converting {config['architecture']} to timm left missing {missing[:4]}, "
                        f"unexpected {unexpected[:4]}, mis-shaped {shapes[:4]}")
    model.load_state_dict(state, strict=True)
    pre = preprocess(directory, img_size)
    check_parity(hf, vision, model, config, family, pre, resized=img_size != native)
    names = label_names(config)
    if names is not None and len(names) != num_classes:
        raise SpecError(f"{directory}: config.json names {len(names)} classes (id2label) but the head has {num_classes}")
    model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}), "hf_architecture": config["architecture"],
                            "hf_output": output, "label_names": names}
    return model, pre


def check_parity(hf: nn.Module, vision: nn.Module, model: nn.Module, config: dict, family: str, pre: Preprocess,
                 resized: bool = False) -> float:
    """Max abs difference between the converted model and transformers on the shipped photos.

    Compares the final-norm tokens ``[B, N, C]`` always, and the logits ``[B, classes]`` of
    classification checkpoints. Returns the largest difference; raises :class:`SpecError` above
    :data:`PARITY_MAX_ABS`.
    """
    from ..images import list_images, load_images

    images = torch.from_numpy(load_images(list_images(None), pre))
    want = _reference_outputs(hf, vision, config, family, images, resized)
    with torch.no_grad():
        got = {"tokens": model.forward_features(images)}
        if "logits" in want:
            got["logits"] = model(images)
    worst = {k: float((got[k] - want[k]).abs().max()) for k in want}
    if max(worst.values()) > PARITY_MAX_ABS:
        detail = ", ".join(f"{k} {v:.2e}" for k, v in worst.items())
        raise SpecError(f"the timm conversion of {config['architecture']} differs from transformers on the photos "
                        f"(max abs {detail} > {PARITY_MAX_ABS:g}): a conversion bug; please report it")
    return max(worst.values())
