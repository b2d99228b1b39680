"""torchvision ``VisionTransformer`` (``vit_b_16``, ``vit_b_32``, ``vit_l_16``...) state dicts.

torchvision's ``nn.MultiheadAttention`` keeps q, k, v fused in ``in_proj_weight`` in the
same (qkv, h, d) order as vitkit, so the table is renames only. LayerNorm eps is 1e-6,
the classifier reads the class token, GELU is exact. Heads are not stored: they come from
``model=NAME`` / ``num_heads=N``, else torchvision's own ViTs' (``TORCHVISION_HEADS``: 12 at width
768, 16 at 1024 and at 1280, vit_h_14's, where width / 64 would say 20), else the convention
heads = width / 64. A ``heads.pre_logits`` layer (``representation_size``) is not supported.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..checkpoint import CheckpointError, atomic_file, load_state_dict_file
from ..config import ViTConfig
from . import (
    Foreign,
    KeyMap,
    config_with,
    count_blocks,
    crop_share,
    mlp_ratio_of,
    require,
    resolve_heads,
    rule,
    square_grid,
    warn_norm_eps,
)

NORM_EPS = 1e-6  # every torchvision ViT's LayerNorm (VisionTransformer's norm_layer)

LAYER = "encoder.layers.encoder_layer_{i}"
# torchvision's own ViTs' heads by width (vit_b_16/32, vit_l_16/32, vit_h_14), as torchvision.models builds them
TORCHVISION_HEADS = {768: 12, 1024: 16, 1280: 16}
KEYS = KeyMap(
    "torchvision",
    [
        rule("patch_embed.projection.{p}", "conv_proj.{p}"),
        rule("patch_embed.cls_token", "class_token"),
        rule("patch_embed.positions", "encoder.pos_embedding"),
        rule("encoder.blocks.{i}.norm1.{p}", f"{LAYER}.ln_1.{{p}}"),
        rule("encoder.blocks.{i}.attn.qkv.weight", f"{LAYER}.self_attention.in_proj_weight"),
        rule("encoder.blocks.{i}.attn.qkv.bias", f"{LAYER}.self_attention.in_proj_bias"),
        rule("encoder.blocks.{i}.attn.projection.{p}", f"{LAYER}.self_attention.out_proj.{{p}}"),
        rule("encoder.blocks.{i}.norm2.{p}", f"{LAYER}.ln_2.{{p}}"),
        rule("encoder.blocks.{i}.mlp.fc1.{p}", f"{LAYER}.mlp.0.{{p}}"),
        rule("encoder.blocks.{i}.mlp.fc2.{p}", f"{LAYER}.mlp.3.{{p}}"),
        rule("encoder.norm.{p}", "encoder.ln.{p}"),
        rule("head.fc.{p}", "heads.head.{p}"),
    ],
)


def read(path: Path) -> Foreign:
    if path.is_dir():
        raise CheckpointError(f"{path}: a directory; a torchvision checkpoint is one .pth file "
                              "(torch.save of VisionTransformer.state_dict())")
    foreign = Foreign(str(path), load_state_dict_file(path))
    foreign.preprocess = dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], crop_mode="center",
                              **_weights_resize(foreign.state))
    return foreign


# How torchvision's weights for a (width, patch) at 224 resize before the centre 224 cut, where it is not the
# ImageNet recipe's 256, bilinear (IMAGENET1K_V1 of vit_b_16, vit_b_32, vit_l_32): vit_l_16's V1 takes 242, and
# vit_h_14 has no 224 weights but SWAG_LINEAR's (224 itself, bicubic). Above 224 every file is a SWAG end-to-end
# fine-tune (384, 512, 518), resized to the size itself, bicubic. (tests/test_preprocess_parity.py checks every
# weights enum's transforms.)
RESIZE_AT_224 = {(1024, 16): (242, "bilinear"), (1280, 14): (224, "bicubic")}


def _weights_resize(state: dict) -> dict:
    """The interpolation and crop_pct of torchvision's weights for the file's width, patch and size; its
    vit_b_16 and vit_l_16 SWAG_LINEAR weights (224 like V1) cannot be told from V1's: `vitkit convert
    --interpolation bicubic --crop-pct 1.0`."""
    proj, pos = state.get("conv_proj.weight"), state.get("encoder.pos_embedding")
    if proj is None or pos is None:
        return dict(interpolation="bilinear", crop_pct=0.875)  # infer_config names what is missing
    width, patch = proj.shape[0], proj.shape[-1]
    if pos.shape[1] - 1 != (224 // patch) ** 2:
        return dict(interpolation="bicubic", crop_pct=1.0)
    resize, interpolation = RESIZE_AT_224.get((width, patch), (256, "bilinear"))
    return dict(interpolation=interpolation, crop_pct=crop_share((224, resize)))


def infer_config(foreign: Foreign, base: dict) -> ViTConfig:
    s, src = foreign.state, foreign.path
    proj = require(s, "conv_proj.weight", src, "torchvision")  # (E, C, p, p)
    width, patch = proj.shape[0], proj.shape[-1]
    num_patches = require(s, "encoder.pos_embedding", src, "torchvision").shape[1] - 1
    fc1 = require(s, f"{LAYER.format(i=0)}.mlp.0.weight", src, "torchvision")
    return config_with(
        base,
        src,
        img_size=tuple(g * patch for g in square_grid(num_patches, src)),
        patch_size=patch,
        in_channels=proj.shape[1],
        emb_size=width,
        depth=count_blocks(s, r"encoder\.layers\.encoder_layer_(\d+)\."),
        num_heads=resolve_heads(width, base, src, TORCHVISION_HEADS, "torchvision"),
        mlp_ratio=mlp_ratio_of(fc1.shape[0], width, src),
        qkv_bias=True,  # nn.MultiheadAttention always has in_proj_bias here
        class_token=True,
        pool="cls",
        final_norm="tokens",
        norm_eps=NORM_EPS,
        num_classes=s["heads.head.weight"].shape[0] if "heads.head.weight" in s else 0,
    )


def to_vitkit(foreign: Foreign, cfg: ViTConfig) -> dict:
    return KEYS.to_vitkit(foreign.state, cfg, foreign.path)


def export(model: nn.Module, out: Path) -> Path:
    """A ``.pth`` state dict for ``torchvision.models.VisionTransformer(...).load_state_dict``."""
    cfg: ViTConfig = model.cfg
    problems = []
    if cfg.img_size[0] != cfg.img_size[1]:
        problems.append(f"square images only (img_size {cfg.img_size})")
    if not (cfg.class_token and cfg.pool == "cls" and cfg.final_norm == "tokens" and cfg.qkv_bias):
        problems.append("needs class_token=True, pool='cls', final_norm='tokens', qkv_bias=True")
    if cfg.num_classes == 0 or cfg.in_channels != 3:
        problems.append("needs a classifier and 3 input channels")
    if problems:
        raise ValueError("torchvision export: " + "; ".join(problems))
    warn_norm_eps("torchvision", cfg.norm_eps, NORM_EPS, "torchvision's VisionTransformer is given "
                  f"norm_layer=functools.partial(torch.nn.LayerNorm, eps={cfg.norm_eps})")
    state = KEYS.from_vitkit({k: v.detach().cpu() for k, v in model.state_dict().items()}, cfg)
    with atomic_file(out) as f:
        torch.save(state, f)
    return out
