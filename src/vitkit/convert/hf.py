"""Hugging Face ``ViTModel`` / ``ViTForImageClassification`` directories, both directions, and the
other ViTs transformers holds: DeiT's distilled models (``DeiTModel`` /
``DeiTForImageClassificationWithTeacher``, model_type "deit"), DINOv2, CLIP and SigLIP; read only,
ViT-MSN (ViT's layout) and I-JEPA (ViT's without a class token).

The table is written in the layout Hugging Face stores on disk (and on the Hub):
``vit.encoder.layer.N.attention.attention.query`` ... with separate q, k, v projections,
``layernorm_before``/``layernorm_after``, a ``vit.`` prefix and a ``classifier``.
(transformers 5 renames modules in memory, e.g. ``q_proj``, but still saves this layout.)
A ``ViTModel`` file has no ``vit.`` prefix, no classifier, and a pooler (dense + tanh on
the class token) that image classification does not use: it is dropped with a warning.
DeiT's files have the same blocks under a ``deit.`` prefix, a ``distillation_token`` and two
classifiers (``cls_classifier``, ``distillation_classifier``) whose logits are averaged: vitkit's
``dist_token=True``. (The Hub's non-distilled DeiT weights are stored as model_type "vit".)
DINOv2 (``Dinov2Model``, ``Dinov2WithRegistersModel``: model_type "dinov2" and
"dinov2_with_registers") names its block parts ``norm1``, ``mlp.fc1``, ``layer_scale1.lambda1``...
(vitkit's ``layer_scale``) and gives its registers no positions: vitkit's zero rows for them; on
export, position rows the registers learned are added to the register tokens, which is the same.
Its image classifiers read the class token and the patch tokens' mean side by side (vitkit's
pool="cls_mean").
BEiT (model_type "beit") and Data2Vec's vision model ("data2vec-vision", the same layout) add each
block's ``relative_position_bias_table`` (vitkit's ``rel_pos_bias``; a shared one is copied into every
block), ``lambda_1``/``lambda_2`` (LayerScale), and a key projection without bias (zeros in vitkit's
qkv bias: a k bias shifts all of a query's logits alike, which the softmax ignores); with
``use_mean_pooling`` the classifier reads the patch tokens' mean through ``pooler.layernorm``.
CLIP's vision tower (model_type "clip_vision_model", or a whole "clip" model's ``vision_model``) is
pre-norm (vitkit's ``pre_norm``), with its bias-free ``visual_projection`` as the classifier.
SigLIP's (model_type "siglip_vision_model", or a whole "siglip" model's) has no class token and
pools by attention (vitkit's pool="map"). ``CLIPForImageClassification`` and
``SiglipForImageClassification`` put a ``classifier`` on the mean of the tower's patch tokens
(vitkit's pool="mean"; CLIP's without its final LayerNorm).

Everything about the architecture comes from the directory's ``config.json``
(hidden_size, num_attention_heads, image_size, patch_size, num_channels, layer_norm_eps,
qkv_bias) and the class names from its ``id2label``. Note: HF's own
``interpolate_pos_encoding=True`` resamples bicubic *without* antialiasing at run time;
vitkit resamples once, on load, bicubic with antialiasing (as timm does).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import CheckpointError, atomic_directory, load_state_dict_file, read_json
from ..config import GRID_ROPES, ViTConfig
from ..images import crop_mode, scaled_size
from . import (
    CONCAT_QKV,
    IDENTITY,
    Foreign,
    KeyMap,
    Transform,
    config_with,
    count_blocks,
    crop_share,
    mlp_ratio_of,
    require,
    rule,
)

# model_type -> the class a directory of the family holds, for config.json's "architectures" on export
ARCHITECTURE = {"vit": "ViTForImageClassification", "deit": "DeiTForImageClassificationWithTeacher",
                "dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel",
                "clip_vision_model": "CLIPVisionModel", "siglip_vision_model": "SiglipVisionModel",
                # The image classifiers on those two towers: config.json has the whole image-text model's
                # model_type, a vision_config and id2label; the weights, the tower and a `classifier` on the
                # mean of the patch tokens (CLIP's before its post_layernorm, SigLIP's after it).
                "clip": "CLIPForImageClassification", "siglip": "SiglipForImageClassification",
                # I-JEPA: ViT's layout without a class token, its classifier on the mean of every token;
                # read only (vitkit writes such a model as SigLIP's, which holds the same network)
                "ijepa": "IJepaForImageClassification",
                # BEiT and Data2Vec-vision: relative position tables, LayerScale, mean pooling (see above)
                "beit": "BeitForImageClassification", "data2vec-vision": "Data2VecVisionForImageClassification",
                # DINOv3's ViTs: rotary positions (vitkit's rope="dinov3"), registers, LayerScale; features only
                "dinov3_vit": "DINOv3ViTModel"}
# model_types whose files are another family's layout under the same prefix: ViT-MSN's is ViT's
SAME_LAYOUT = {"vit_msn": "vit"}
DINOV2 = ("dinov2", "dinov2_with_registers")
# their image classifiers: a `classifier` on the class token and the patch tokens' mean side by side
# (vitkit's pool="cls_mean"), under the same model_type
DINOV2_CLASSIFIERS = {"dinov2": "Dinov2ForImageClassification",
                      "dinov2_with_registers": "Dinov2WithRegistersForImageClassification"}
# DINOv2's giant: a SwiGLU MLP whose packed weights_in/weights_out are vitkit's fc1/fc2 (mlp_act="swiglu")
SWIGLU_NAMES = {"weights_in": "fc1", "weights_out": "fc2"}
CLIP, SIGLIP = "clip_vision_model", "siglip_vision_model"
# a whole image-text model's model_type -> its vision tower's
TOWERS = {"clip": CLIP, "siglip": SIGLIP}
TOWER_FAMILIES = (*TOWERS, *TOWERS.values())  # the layouts _tower_key_map writes
BEIT = ("beit", "data2vec-vision")
# model_type -> the prefix of its keys in a file (a bare base model's keys get it on reading)
DINOV3 = "dinov3_vit"
PREFIX = {family: "vision_model" if family in TOWER_FAMILIES else family.replace("-", "_") for family in ARCHITECTURE}
PREFIX[DINOV3] = "model"  # its base_model_prefix; DINOv3ViTModel's own files have none
# BEiT's tables, one a block, or one for all (its pretraining's), under the family's prefix
BEIT_TABLE = "{prefix}.encoder.layer.{i}.attention.attention.relative_position_bias.relative_position_bias_table"
BEIT_SHARED_TABLE = "{prefix}.encoder.relative_position_bias.relative_position_bias_table"
# What transformers' config classes fill in where a config.json (or a vision_config) leaves a field out:
# each family's own defaults (transformers 5's configuration_*.py), not ViT's; read() applies them, so
# infer_config reads every field as transformers would. Keyed by the config's model_type (ViT-MSN's
# and MAE's, whose layouts are ViT's, have their own).
_VIT_DEFAULTS = {"hidden_act": "gelu", "layer_norm_eps": 1e-12, "image_size": 224, "patch_size": 16,
                 "num_channels": 3, "intermediate_size": 3072}
HF_DEFAULTS = {
    **{family: _VIT_DEFAULTS for family in ("vit", "deit", "vit_mae", "ijepa", "beit", "data2vec-vision")},
    "vit_msn": {**_VIT_DEFAULTS, "layer_norm_eps": 1e-6},
    "dinov2": {**_VIT_DEFAULTS, "layer_norm_eps": 1e-6, "patch_size": 14},  # mlp_ratio, no intermediate_size
    "dinov2_with_registers": {**_VIT_DEFAULTS, "layer_norm_eps": 1e-6},
    "clip_vision_model": {**_VIT_DEFAULTS, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "patch_size": 32},
    "siglip_vision_model": {**_VIT_DEFAULTS, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6},
    "dinov3_vit": {**_VIT_DEFAULTS, "layer_norm_eps": 1e-5, "intermediate_size": 1536},
}
# HF's activation names -> vitkit's mlp_act
HF_ACTS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh"}
# CLIP: (E,) class embedding and (N, E) position table, an nn.Embedding's weight <-> vitkit's (1, 1, E), (1, N, E)
UNSQUEEZED = Transform("unsqueezed", lambda ts, cfg: ts[0].reshape(1, -1, ts[0].shape[-1]),
                       lambda t, cfg: [t.reshape(-1, t.shape[-1]) if t.shape[1] > 1 else t.reshape(-1)])


def _register_positions(registers: bool) -> Transform:
    """HF DINOv2 with registers: positions for the class token and the patches only; vitkit's table
    has zero rows for the registers between them (export folds any that are not zero: ``export``)."""
    if not registers:
        return IDENTITY
    return Transform(
        "register_positions",
        lambda ts, cfg: torch.cat([ts[0][:, :1], ts[0].new_zeros(1, cfg.reg_tokens, ts[0].shape[-1]), ts[0][:, 1:]], 1),
        lambda t, cfg: [torch.cat([t[:, :1], t[:, 1 + cfg.reg_tokens:]], 1)],
    )


def _key_map(family: str) -> KeyMap:
    """The table for a model_type: the same attention in every family, under the family's prefix;
    ViT and DeiT name the rest of a block as BERT does, DINOv2 as timm does, with LayerScale; DeiT
    adds the distillation token and two classifiers named after the tokens they read."""
    prefix = PREFIX[family]
    layer = f"{prefix}.encoder.layer.{{i}}"
    if family in DINOV2:
        block = [
            rule("encoder.blocks.{i}.norm1.{p}", f"{layer}.norm1.{{p}}"),
            rule("encoder.blocks.{i}.ls1.gamma", f"{layer}.layer_scale1.lambda1"),
            rule("encoder.blocks.{i}.norm2.{p}", f"{layer}.norm2.{{p}}"),
            rule("encoder.blocks.{i}.mlp.fc1.{p}", f"{layer}.mlp.fc1.{{p}}"),
            rule("encoder.blocks.{i}.mlp.fc2.{p}", f"{layer}.mlp.fc2.{{p}}"),
            rule("encoder.blocks.{i}.ls2.gamma", f"{layer}.layer_scale2.lambda1"),
        ]
    else:
        block = [
            rule("encoder.blocks.{i}.norm1.{p}", f"{layer}.layernorm_before.{{p}}"),
            rule("encoder.blocks.{i}.norm2.{p}", f"{layer}.layernorm_after.{{p}}"),
            rule("encoder.blocks.{i}.mlp.fc1.{p}", f"{layer}.intermediate.dense.{{p}}"),
            rule("encoder.blocks.{i}.mlp.fc2.{p}", f"{layer}.output.dense.{{p}}"),
        ]
    if family in BEIT:
        block += [
            rule("encoder.blocks.{i}.ls1.gamma", f"{layer}.lambda_1"),
            rule("encoder.blocks.{i}.ls2.gamma", f"{layer}.lambda_2"),
            rule("encoder.blocks.{i}.attn.rel_pos_bias_table", BEIT_TABLE.format(prefix=prefix, i="{i}")),
        ]
    classifier = [rule("head.fc.{p}", "classifier.{p}")]  # every family's but DeiT's
    heads = {
        "deit": [rule("head.fc.{p}", "cls_classifier.{p}"),
                 rule("patch_embed.dist_token", f"{family}.embeddings.distillation_token"),
                 rule("head.fc_dist.{p}", "distillation_classifier.{p}")],
        "dinov2_with_registers": [rule("patch_embed.reg_token", f"{family}.embeddings.register_tokens"), *classifier],
        # use_mean_pooling: the patch tokens' mean through the pooler's LayerNorm (vitkit's final_norm="pooled")
        **{beit: [rule("head.norm.{p}", f"{PREFIX[beit]}.pooler.layernorm.{{p}}"), *classifier] for beit in BEIT},
    }.get(family, classifier)
    return KeyMap(
        "hf",
        [
            rule("patch_embed.projection.{p}", f"{prefix}.embeddings.patch_embeddings.projection.{{p}}"),
            *([] if family == "ijepa" else [rule("patch_embed.cls_token", f"{prefix}.embeddings.cls_token")]),
            rule("patch_embed.positions", f"{prefix}.embeddings.position_embeddings",
                 _register_positions(family == "dinov2_with_registers")),
            rule(
                "encoder.blocks.{i}.attn.qkv.{p}",
                tuple(f"{layer}.attention.attention.{n}.{{p}}" for n in ("query", "key", "value")),
                CONCAT_QKV,
            ),
            rule("encoder.blocks.{i}.attn.projection.{p}", f"{layer}.attention.output.dense.{{p}}"),
            *block,
            rule("encoder.norm.{p}", f"{prefix}.layernorm.{{p}}"),
            *heads,
        ],
        # the pooler (dense + tanh on the class token; BEiT's is its mean pooling's LayerNorm) and the
        # mask token (masked image modelling)
        ignore=(*([] if family in BEIT else [rf"{prefix}\.pooler\..*"]), rf"{prefix}\.embeddings\.mask_token"),
    )


def _tower_key_map(family: str) -> KeyMap:
    """CLIP's and SigLIP's vision towers, one block layout. CLIP (``CLIPVisionModel``, and
    ``CLIPVisionModelWithProjection``'s projection as vitkit's classifier, with a zero bias, as timm
    reads CLIP's): pre-norm, no patch bias, the final LayerNorm on the pooled class token only
    (vitkit's final_norm="pooled"). SigLIP (``SiglipVisionModel``): no class token, the final
    LayerNorm on every token, attention pooling (vitkit's pool="map") whose fused in_proj is read as
    separate q and kv projections (``read``; ``export`` fuses them again). Their image classifiers
    (``family`` "clip", "siglip"): the tower, and a ``classifier`` on the patch tokens' mean, which
    reads neither CLIP's post_layernorm nor SigLIP's pooling head (dropped on reading, with a warning)."""
    tower = TOWERS.get(family, family)
    classifier = family in TOWERS
    layer = "vision_model.encoder.layers.{i}"
    embeddings = "vision_model.embeddings"
    if tower == CLIP:
        stem = [rule("patch_embed.projection.weight", f"{embeddings}.patch_embedding.weight"),
                rule("patch_embed.cls_token", f"{embeddings}.class_embedding", UNSQUEEZED),
                rule("patch_embed.norm_pre.{p}", "vision_model.pre_layrnorm.{p}")]  # sic: HF's spelling
        head = [rule("head.norm.{p}", "vision_model.post_layernorm.{p}"),
                # timm's CLIP normalises every token (final_norm="tokens"); the pooled class token, all
                # that HF's post_layernorm sees, comes out the same
                rule("encoder.norm.{p}", "vision_model.post_layernorm.{p}"),
                rule("head.fc.{p}", "visual_projection.{p}")]  # its bias: zero, added on reading, checked on export
    else:
        pool = "vision_model.head"
        stem = [rule("patch_embed.projection.{p}", f"{embeddings}.patch_embedding.{{p}}")]
        head = [rule("encoder.norm.{p}", "vision_model.post_layernorm.{p}"),
                rule("head.attn_pool.latent", f"{pool}.probe"),
                rule("head.attn_pool.q.{p}", f"{pool}.attention.q_proj.{{p}}"),  # in_proj's rows, split on reading
                rule("head.attn_pool.kv.{p}", f"{pool}.attention.kv_proj.{{p}}"),
                rule("head.attn_pool.proj.{p}", f"{pool}.attention.out_proj.{{p}}"),
                rule("head.attn_pool.norm.{p}", f"{pool}.layernorm.{{p}}"),
                rule("head.attn_pool.mlp.fc1.{p}", f"{pool}.mlp.fc1.{{p}}"),
                rule("head.attn_pool.mlp.fc2.{p}", f"{pool}.mlp.fc2.{{p}}")]
    unread = ()
    if classifier:  # the first rule that matches a vitkit key wins: the classifier before the projection
        head = [rule("head.fc.{p}", "classifier.{p}"), *head]
        unread = (r"vision_model\.post_layernorm\..*",) if tower == CLIP else (r"vision_model\.head\..*",)
    return KeyMap(
        "hf",
        [
            *stem,
            rule("patch_embed.positions", f"{embeddings}.position_embedding.weight", UNSQUEEZED),
            rule("encoder.blocks.{i}.norm1.{p}", f"{layer}.layer_norm1.{{p}}"),
            rule("encoder.blocks.{i}.attn.qkv.{p}",
                 tuple(f"{layer}.self_attn.{n}_proj.{{p}}" for n in ("q", "k", "v")), CONCAT_QKV),
            rule("encoder.blocks.{i}.attn.projection.{p}", f"{layer}.self_attn.out_proj.{{p}}"),
            rule("encoder.blocks.{i}.norm2.{p}", f"{layer}.layer_norm2.{{p}}"),
            rule("encoder.blocks.{i}.mlp.fc1.{p}", f"{layer}.mlp.fc1.{{p}}"),
            rule("encoder.blocks.{i}.mlp.fc2.{p}", f"{layer}.mlp.fc2.{{p}}"),
            *head,
        ],
        ignore=unread,
    )


def _dinov3_key_map() -> KeyMap:
    """DINOv3ViTModel (transformers 5 writes its in-memory names): q/k/v/o projections, LayerScale as
    layer_scale{1,2}.lambda1, the MLP as up/down projections, registers, no absolute positions (vitkit's
    abs_pos=False) and no classifier."""
    prefix = PREFIX[DINOV3]
    layer = f"{prefix}.layer.{{i}}"
    return KeyMap(
        "hf",
        [
            rule("patch_embed.projection.{p}", f"{prefix}.embeddings.patch_embeddings.{{p}}"),
            rule("patch_embed.cls_token", f"{prefix}.embeddings.cls_token"),
            rule("patch_embed.reg_token", f"{prefix}.embeddings.register_tokens"),
            rule("patch_embed.positions", f"{prefix}.embeddings.position_embeddings"),  # a model with abs_pos only
            rule("encoder.blocks.{i}.norm1.{p}", f"{layer}.norm1.{{p}}"),
            rule("encoder.blocks.{i}.attn.qkv.{p}",
                 tuple(f"{layer}.attention.{n}_proj.{{p}}" for n in ("q", "k", "v")), CONCAT_QKV),
            rule("encoder.blocks.{i}.attn.projection.{p}", f"{layer}.attention.o_proj.{{p}}"),
            rule("encoder.blocks.{i}.ls1.gamma", f"{layer}.layer_scale1.lambda1"),
            rule("encoder.blocks.{i}.norm2.{p}", f"{layer}.norm2.{{p}}"),
            rule("encoder.blocks.{i}.mlp.fc1.{p}", f"{layer}.mlp.up_proj.{{p}}"),
            rule("encoder.blocks.{i}.mlp.fc2.{p}", f"{layer}.mlp.down_proj.{{p}}"),
            rule("encoder.blocks.{i}.ls2.gamma", f"{layer}.layer_scale2.lambda1"),
            rule("encoder.norm.{p}", f"{prefix}.norm.{{p}}"),
        ],
        ignore=(rf"{prefix}\.embeddings\.mask_token",),
    )


# model_type -> its key map
KEYS = {family: _tower_key_map(family) if family in TOWER_FAMILIES else _key_map(family)
        for family in ARCHITECTURE if family != DINOV3}
KEYS[DINOV3] = _dinov3_key_map()
# SigLIP's pooling head: nn.MultiheadAttention's fused in_proj (q, k, v rows) <-> vitkit's q and kv
SIGLIP_IN_PROJ = "vision_model.head.attention.in_proj_{}"

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
DEFAULT_LABEL = re.compile(r"LABEL_\d+")


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return load_state_dict_file(directory / name)
    index = directory / "model.safetensors.index.json"  # a sharded checkpoint
    if index.is_file():
        state = {}
        for shard in sorted(set(read_json(index)["weight_map"].values())):
            state.update(load_state_dict_file(directory / shard))
        return state
    raise CheckpointError(f"{directory}: no {' or '.join(WEIGHT_FILES)} (or a sharded index) in this directory")


def read(path: Path) -> Foreign:
    """A directory written by ``save_pretrained`` (or one of its weight files)."""
    directory = path if path.is_dir() else path.parent
    cfg_file = directory / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{directory}: no config.json; a Hugging Face ViT directory has one")
    config = read_json(cfg_file)
    family = config.get("model_type")
    state = load_state_dict_file(path) if path.is_file() else _read_weights(directory)
    if family in TOWERS:  # a whole CLIPModel / SiglipModel, or an image classifier on its vision tower
        whole = family
        if "classifier.weight" not in state:  # the image-text model: its vision tower (and CLIP's projection)
            family = TOWERS[family]
        config = dict(config.get("vision_config") or {}, model_type=family, id2label=config.get("id2label"))
        text = [k for k in state if not k.startswith(("vision_model.", "visual_projection.", "classifier."))]
        state = {k: v for k, v in state.items() if k not in text}
        if text:
            warnings.warn(f"{path}: a whole {whole} model; its vision tower is read, its text tower and logit "
                          f"scale ({len(text)} tensors) are not", stacklevel=3)
    # the fields the file leaves out, as the family's config class fills them (a tower's: its vision config's)
    config = {**HF_DEFAULTS.get(TOWERS.get(family, family), {}), **config}
    if family == "vit_mae":  # MAE's pretraining: a plain ViT encoder, and a decoder only pretraining uses
        family, decoder = "vit", [k for k in state if k.startswith("decoder.")]
        state = {k: v for k, v in state.items() if k not in decoder}
        if decoder:
            warnings.warn(f"{path}: MAE's pixel decoder ({len(decoder)} tensors) is not read, only its encoder",
                          stacklevel=3)
    family = SAME_LAYOUT.get(family, family)
    if family not in KEYS:
        raise CheckpointError(f"{cfg_file}: model_type is {family!r}; expected one of "
                              f"{', '.join(map(repr, [*KEYS, *SAME_LAYOUT, 'vit_mae']))}")
    gated = config.get("use_swiglu_ffn") or (family == DINOV3 and config.get("use_gated_mlp"))
    if config["hidden_act"] not in HF_ACTS and not gated:  # SwiGLU's: DINOv2 ignores it, DINOv3 checks it
        raise CheckpointError(f"{cfg_file}: hidden_act {config['hidden_act']!r}; vitkit's MLP takes one of "
                              f"{tuple(HF_ACTS)}")
    prefix = PREFIX[family]
    if not any(k.startswith(f"{prefix}.") for k in state):
        state = {f"{prefix}.{k}": v for k, v in state.items()}  # a base model (ViTModel...): no prefix
    elif config.get("model_type") == "vit_msn":  # transformers 5 writes its classifier's blocks without "vit."
        state = {f"{prefix}.{k}" if k.startswith("encoder.") else k: v for k, v in state.items()}
    for part in ("weight", "bias"):  # SigLIP's pooling head: split its fused q, k, v projection
        fused = state.pop(SIGLIP_IN_PROJ.format(part), None)
        if fused is not None:
            q, kv = fused.split([fused.shape[0] // 3, 2 * fused.shape[0] // 3])
            state[f"vision_model.head.attention.q_proj.{part}"] = q
            state[f"vision_model.head.attention.kv_proj.{part}"] = kv
    if "visual_projection.weight" in state:  # CLIP's projection has no bias; vitkit's classifier a zero one
        state["visual_projection.bias"] = state["visual_projection.weight"].new_zeros(
            state["visual_projection.weight"].shape[0])
    if family == "deit" and "classifier.weight" in state:
        raise CheckpointError(
            f"{path}: a DeiTForImageClassification, whose one classifier reads the class token while the "
            "distillation token still runs through every block; vitkit's distilled models average two "
            "classifiers (DeiTForImageClassificationWithTeacher, the Hub's distilled DeiT weights)")
    if family in BEIT:
        state = _beit_as_vit(state, config, prefix, str(path))
    if family == DINOV3:
        state = _dinov3_as_vit(state, config, str(path))
    if config.get("use_swiglu_ffn"):  # DINOv2's giant: its packed SwiGLU layers under vitkit's MLP names
        state = {re.sub(r"\.mlp\.(weights_in|weights_out)\.", lambda m: f".mlp.{SWIGLU_NAMES[m[1]]}.", k): v
                 for k, v in state.items()}
    foreign = Foreign(str(path), state, config=config, layout=family)
    id2label = config.get("id2label") or {}
    names = [str(id2label[k]) for k in sorted(id2label, key=int)]
    if names and not all(DEFAULT_LABEL.fullmatch(n) for n in names):
        foreign.class_names = names
    pre_file = directory / "preprocessor_config.json"
    if pre_file.is_file():
        try:
            foreign.preprocess = read_image_processor(read_json(pre_file), str(pre_file))
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:  # sizes that are no sizes
            raise CheckpointError(f"{pre_file}: an image processor config vitkit cannot read ({e!r})") from e
    return foreign


# A directory saved by model.save_pretrained alone holds no preprocessor_config.json, and HF's processors differ
UNKNOWN_NORMALISATION = ("It is a model.save_pretrained directory without preprocessor_config.json; HF's ViT, BEiT and "
                         "SigLIP processors use mean = std = 0.5, DeiT's and DINOv2's ImageNet's, CLIP's OpenAI's: "
                         "pass --mean/--std with the weights' own, or save the image processor beside the model")
# The image processors whose bare-number "size" is the shorter side (transformers' default_to_square=False);
# the others' is a square
SHORTEST_EDGE_PROCESSORS = ("CLIP", "ChineseCLIP", "Bit", "Siglip", "ConvNext")
# PIL's resampling codes, which HF's image processors store as "resample"
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def read_image_processor(pre: dict, src: str) -> dict | None:
    """An HF image processor's config (preprocessor_config.json) as a vitkit preprocess dict, size aside:
    its resize and crop as timm's crop_pct and crop_mode ("size": {"height", "width"} resizes each side,
    {"shortest_edge"} the shorter one; "crop_size" then cuts the centre), and its rescale and normalisation
    folded into one mean and std on [0, 1] pixels. None where it holds no mean and std."""
    if not isinstance(pre, dict) or "image_mean" not in pre or "image_std" not in pre:
        return None
    if pre.get("resample", 2) not in PIL_RESAMPLE:
        raise CheckpointError(f"{src}: resample: expected one of PIL's codes {sorted(PIL_RESAMPLE)}, "
                              f"got {pre.get('resample')!r}")
    size = pre.get("size") or {}
    if isinstance(size, int):  # a bare number: the shorter side for the processors that say so, else a square
        kind = str(pre.get("image_processor_type") or pre.get("feature_extractor_type") or "")
        size = {"shortest_edge": size} if kind.startswith(SHORTEST_EDGE_PROCESSORS) else {"height": size, "width": size}
    crop = pre.get("crop_size") if pre.get("do_center_crop") else None
    crop = {"height": crop, "width": crop} if isinstance(crop, int) else crop
    preprocess = dict(interpolation=PIL_RESAMPLE[pre.get("resample", 2)], crop_pct=1.0, crop_mode="squash")
    if "shortest_edge" in size:
        # the shorter side to the edge, the centre cut: for a non-square crop only nearly timm's centre mode,
        # whose scale for each side is the crop's over crop_pct (the shorter crop side's share is taken)
        edge = size["shortest_edge"]
        kept = min(crop["height"], crop["width"]) if crop else edge
        preprocess.update(crop_mode="center", crop_pct=crop_share((kept, edge)))
    elif crop and "height" in size:  # each side resized, then cut: a share that gives both sides' sizes
        preprocess["crop_pct"] = crop_share((crop["height"], size["height"]), (crop["width"], size["width"]))
    # HF: (pixels * rescale_factor - mean) / std; vitkit: (pixels / 255 - mean') / std'
    scale = 255.0 * (pre.get("rescale_factor", 1 / 255) if pre.get("do_rescale", True) else 1.0)
    mean, std = (pre["image_mean"], pre["image_std"]) if pre.get("do_normalize", True) else ([0.0] * 3, [1.0] * 3)
    preprocess.update(mean=[float(m) / scale for m in mean], std=[float(v) / scale for v in std])
    return preprocess


def _beit_as_vit(state: dict, config: dict, prefix: str, src: str) -> dict:
    """A BEiT file's tensors as the key map reads them: a zero key bias beside the query's and value's,
    each block's own table (a shared one copied into all of them, as BEiT's fine-tuning starts). Without
    use_absolute_position_embeddings there is no position table: vitkit's abs_pos=False."""
    state = dict(state)
    depth = count_blocks(state, rf"{prefix}\.encoder\.layer\.(\d+)\.")
    _zero_key_bias(state, f"{prefix}.encoder.layer.{{i}}.attention.attention.{{}}.bias", ("query", "key"), depth)
    shared = state.pop(BEIT_SHARED_TABLE.format(prefix=prefix), None)
    if shared is not None:
        state.update({BEIT_TABLE.format(prefix=prefix, i=i): shared.clone() for i in range(depth)})
    return state


def _zero_key_bias(state: dict, name: str, query_key: tuple[str, str], depth: int) -> None:
    """A zero key bias beside each block's query bias (``name`` formats with the block and the projection):
    BEiT and DINOv3 have none, and vitkit's qkv bias holds zeros there."""
    for i in range(depth):
        query, key = (name.format(part, i=i) for part in query_key)
        if query in state and key not in state:
            state[key] = torch.zeros_like(state[query])


def _dinov3_as_vit(state: dict, config: dict, src: str) -> dict:
    """A DINOv3ViTModel's tensors as the key map reads them: a zero key bias (DINOv3 has none, and vitkit
    masks it), no position table (its positions are rotary: vitkit's abs_pos=False), a gated MLP's gate_proj and
    up_proj packed as up_proj (vitkit's fc1: SwiGLU). Refused: what vitkit's DINOv3 cannot compute (a gate
    of another activation, a key bias, another rotary base, projections without bias)."""
    unsupported = {"key_bias": False, "proj_bias": True, "mlp_bias": True, "rope_theta": 100.0}
    wrong = {k: config[k] for k, v in unsupported.items() if k in config and config[k] != v}
    if config.get("query_bias", True) != config.get("value_bias", True):
        wrong.update(query_bias=config.get("query_bias"), value_bias=config.get("value_bias"))
    if config.get("use_gated_mlp") and config["hidden_act"] != "silu":
        wrong.update(use_gated_mlp=True, hidden_act=config["hidden_act"])
    if wrong:
        raise CheckpointError(f"{src}: a DINOv3 vitkit does not read: {wrong} (vitkit's DINOv3: {unsupported}, "
                              "query and value biases both or neither, a gated MLP's activation silu: SwiGLU)")
    state, prefix = dict(state), PREFIX[DINOV3]
    if config.get("use_gated_mlp"):  # S+, H+, 7B: SwiGLU, its gate and value layers packed as vitkit's fc1
        for key in [k for k in state if ".mlp.gate_proj." in k]:
            value = require(state, key.replace(".gate_proj.", ".up_proj."), src, "hf (DINOv3, use_gated_mlp)")
            state[key.replace(".gate_proj.", ".up_proj.")] = torch.cat([state.pop(key), value])
    _zero_key_bias(state, f"{prefix}.layer.{{i}}.attention.{{}}_proj.bias", ("q", "k"),
                   count_blocks(state, rf"{prefix}\.layer\.(\d+)\."))
    for token in ("cls_token", "register_tokens"):
        require(state, f"{prefix}.embeddings.{token}", src, "hf (DINOv3ViTModel)")
    return state


def infer_config(foreign: Foreign, base: dict) -> ViTConfig:
    c, s = foreign.config, foreign.state
    try:
        width = int(c["hidden_size"])
        fields = dict(
            img_size=c["image_size"],  # these: the file's, else its family's defaults (HF_DEFAULTS, read)
            patch_size=int(c["patch_size"]),
            in_channels=int(c["num_channels"]),
            emb_size=width,
            depth=int(c["num_hidden_layers"]),
            num_heads=int(c["num_attention_heads"]),
            mlp_ratio=(float(c.get("mlp_ratio", 4)) if foreign.layout in DINOV2
                       else mlp_ratio_of(int(c["intermediate_size"]), width, foreign.path)),
            qkv_bias=bool(c.get("query_bias", True) if foreign.layout == DINOV3 else c.get("qkv_bias", True)),
            norm_eps=float(c["layer_norm_eps"]),
        )
    except KeyError as e:
        raise CheckpointError(f"{foreign.path}: config.json has no {e.args[0]!r}") from e
    family = foreign.layout
    tower = TOWERS.get(family, family)
    swiglu = bool(c.get("use_swiglu_ffn"))
    if family == DINOV3 and c.get("use_gated_mlp"):  # intermediate_size: each of the two layers vitkit's fc1 packs
        swiglu = True
        fields["mlp_ratio"] = mlp_ratio_of(2 * int(c["intermediate_size"]), width, foreign.path)
    elif swiglu:  # DINOv2's giant: its mlp_ratio gives the width before SwiGLU's rounding; fc1's packed width is vitkit's
        fc1 = s.get(f"{family}.encoder.layer.0.mlp.fc1.weight")
        if fc1 is None:
            raise CheckpointError(f"{foreign.path}: use_swiglu_ffn is true, but the file has no first block's weights_in")
        fields["mlp_ratio"] = mlp_ratio_of(fc1.shape[0], width, foreign.path)
    # ViTForImageClassification classifies the class token's output; SigLIP pools by attention
    # (without its head, vision_use_head=False: the mean of the tokens, as features); the towers'
    # image classifiers average the patch tokens
    if family in (*TOWERS, "ijepa") or (tower == SIGLIP and "vision_model.head.probe" not in s):
        pool = "mean"
    elif family in DINOV2 and "classifier.weight" in s:  # Dinov2ForImageClassification
        pool = "cls_mean"
    elif family in BEIT:
        pool = "mean" if c.get("use_mean_pooling", True) else "cls"
    else:
        pool = "map" if tower == SIGLIP else "cls"
    held = count_blocks(s, rf"{PREFIX[family]}\.(?:encoder\.)?layers?\.(\d+)\.")  # CLIP: layers; DINOv3: no encoder
    if held != fields["depth"]:  # checked before a model of the claimed depth is built
        raise CheckpointError(f"{foreign.path}: config.json says {fields['depth']} layers, the weights hold {held}")
    return config_with(
        base,
        foreign.path,
        **fields,
        dist_token=family == "deit",
        reg_tokens=(s[f"{PREFIX[family]}.embeddings.register_tokens"].shape[1]
                    if family in ("dinov2_with_registers", DINOV3) else 0),
        layer_scale=(float(c.get("layerscale_value", 1.0)) if family in (*DINOV2, DINOV3)
                     else float(c.get("layer_scale_init_value", 0.1)) if f"{PREFIX[family]}.encoder.layer.0.lambda_1" in s
                     else 0.0),
        rel_pos_bias=BEIT_TABLE.format(prefix=PREFIX[family], i=0) in s,
        rope="dinov3" if family == DINOV3 else "none",
        # BEiT without use_absolute_position_embeddings, and DINOv3: no position table
        abs_pos=f"{PREFIX[family]}.embeddings.position_embeddings" in s if family in (*BEIT, DINOV3) else True,
        dynamic_img_size=family == DINOV3,  # rotary positions: any image size
        pre_norm=tower == CLIP,
        mlp_act="swiglu" if swiglu else HF_ACTS[c["hidden_act"]],
        class_token=tower not in (SIGLIP, "ijepa"),
        pool=pool,
        # CLIP: post_layernorm on the pooled token only, and not at all in its image classifier
        final_norm=("pooled" if family in BEIT and pool == "mean"
                    else {"clip": "none", CLIP: "pooled"}.get(family, "tokens")),
        num_classes=next((s[k].shape[0] for k in ("classifier.weight", "cls_classifier.weight",
                                                   "visual_projection.weight") if k in s), 0),
    )


def to_vitkit(foreign: Foreign, cfg: ViTConfig) -> dict:
    return KEYS[foreign.layout].to_vitkit(foreign.state, cfg, foreign.path)


def _family(cfg: ViTConfig) -> str:
    if cfg.rope == "dinov3":
        return DINOV3
    if cfg.rel_pos_bias:
        return "beit"
    if cfg.pre_norm:  # CLIP's tower, or its image classifier on the patch tokens' mean
        return "clip" if cfg.pool == "mean" else CLIP
    if not cfg.class_token:  # attention pooling, or features alone: SigLIP's tower; a classifier on the mean
        return "siglip" if cfg.pool == "mean" and cfg.num_classes else SIGLIP
    if cfg.layer_scale or cfg.reg_tokens:
        return "dinov2_with_registers" if cfg.reg_tokens else "dinov2"
    return "deit" if cfg.dist_token else "vit"


def _swiglu_width(width: int, mlp_ratio: float) -> int:
    """The width of the SwiGLU gate HF's DINOv2 builds from its config (Dinov2SwiGLUFFN)."""
    return (int(int(width * mlp_ratio) * 2 / 3) + 7) // 8 * 8


def hf_config(cfg: ViTConfig, class_names: list[str] | None = None, abs_pos: bool | None = None) -> dict:
    """The config.json ``ViTForImageClassification.from_pretrained`` reads (with ``dist_token``:
    ``DeiTForImageClassificationWithTeacher``'s; with LayerScale or registers, DINOv2's; with
    ``pre_norm`` or without a class token, CLIP's or SigLIP's tower or its image classifier; with
    ``rel_pos_bias``, BEiT's). ``abs_pos``: whether HF's model holds absolute positions; by default
    ``cfg.abs_pos`` (False also for a BEiT model whose table holds zeros)."""
    abs_pos = cfg.abs_pos if abs_pos is None else abs_pos
    problems = []
    family = _family(cfg)
    tower = TOWERS.get(family, family)
    if cfg.rope in GRID_ROPES:
        problems.append(f"transformers has no EVA-02 or Perception Encoder (rope={cfg.rope!r}): export to timm")
    if not cfg.abs_pos and family not in ("beit", DINOV3):
        problems.append(f"HF's {ARCHITECTURE[family]} has absolute positions, and this model none (abs_pos=False): "
                        "export to timm")
    # DINOv2's config gives the MLP width before SwiGLU keeps 2/3 of it (rounded up to a multiple of 8):
    # the first whole ratio that gives this model's gate width, None if none does
    swiglu = cfg.mlp_act == "swiglu"
    if swiglu:
        hf_mlp_ratio = next((r for r in range(1, 17) if _swiglu_width(cfg.emb_size, r) == cfg.mlp_hidden // 2), None)
    else:
        hf_mlp_ratio = cfg.mlp_ratio
    if family == SIGLIP and (cfg.pool not in ("map", "mean") or cfg.num_classes):
        problems.append(f"HF's SigLIP tower pools by attention (or not at all) and has no classifier, and its "
                        f"image classifier reads the tokens' mean; this model has pool={cfg.pool!r} and "
                        f"{cfg.num_classes} classes: export its features (num_classes=0), or export to timm")
    elif family == "clip" and not (cfg.class_token and cfg.num_classes):
        problems.append(f"HF's CLIPForImageClassification averages the tokens after the class token into a "
                        f"classifier; this model has class_token={cfg.class_token} and {cfg.num_classes} classes")
    elif family == DINOV3:
        if cfg.num_classes or cfg.pool not in ("cls", "mean") or cfg.final_norm != "tokens" or cfg.dist_token:
            problems.append("HF's DINOv3ViTModel has no classifier, normalises every token and pools nothing "
                            f"(its pooler output is the class token); this model has {cfg.num_classes} classes, "
                            f"pool={cfg.pool!r}, final_norm={cfg.final_norm!r}: export its features "
                            "(num_classes=0), or export to timm")
        if cfg.mlp_act not in ("gelu", "swiglu"):
            problems.append(f"HF's DINOv3 has an MLP of exact GELU or SwiGLU (use_gated_mlp); this model has "
                            f"mlp_act={cfg.mlp_act!r}: export to timm")
    elif family == "beit":
        if (cfg.pool, cfg.final_norm) not in (("mean", "pooled"), ("cls", "tokens")):
            problems.append("HF's BEiT classifies the patch tokens' mean normalised after pooling (use_mean_pooling) "
                            "or the class token normalised with every token; this model has "
                            f"pool={cfg.pool!r}, final_norm={cfg.final_norm!r}: export to timm")
        if not cfg.qkv_bias:
            problems.append("HF's BEiT has query and value biases; this model has none (qkv_bias=False)")
    elif tower not in (CLIP, SIGLIP, *DINOV2) and (not cfg.class_token or cfg.pool != "cls"):
        problems.append(f"HF ViT classifies the class token (needs class_token=True, pool='cls'; got pool={cfg.pool!r})")
    if tower == SIGLIP and (cfg.layer_scale or cfg.reg_tokens or not cfg.qkv_bias):
        problems.append("HF's SigLIP tower has no LayerScale or registers, and a qkv bias: export to timm")
    # CLIP: post_layernorm on the pooled class token only, which either norm gives it; none on what
    # its image classifier averages
    norms = {CLIP: ("pooled", "tokens"), "clip": ("none",), "beit": ("pooled", "tokens"),
             DINOV3: ("tokens",)}.get(family, ("tokens",))
    if cfg.final_norm not in norms:
        problems.append(f"HF's {ARCHITECTURE[family]} needs final_norm in {norms}, got {cfg.final_norm!r}")
    if tower == CLIP and (cfg.layer_scale or cfg.reg_tokens or cfg.dist_token or not cfg.qkv_bias):
        problems.append("HF's CLIP tower has no LayerScale, registers or distillation token, and a qkv bias: "
                        "export to timm")
    if family in DINOV2:
        if cfg.pool not in (("cls_mean",) if cfg.num_classes else ("cls", "cls_mean")):
            problems.append(f"HF's DINOv2 classifier reads the class token and the patch tokens' mean side by side "
                            f"(pool='cls_mean'), its backbone the class token; this model has pool={cfg.pool!r} and "
                            f"{cfg.num_classes} classes: export its features (num_classes=0), export to timm, or "
                            "train that head (vitkit train --head-pool cls_mean)")
        if not cfg.layer_scale:
            problems.append("HF's DINOv2 with registers has LayerScale in every block; this model has none "
                            "(layer_scale=0): export to timm")
        if cfg.dist_token:
            problems.append("HF's DINOv2 has no distillation token: export to timm")
        if hf_mlp_ratio is None or hf_mlp_ratio != int(hf_mlp_ratio):
            problems.append(f"HF's DINOv2 takes a whole mlp_ratio, and no whole one gives this model's MLP "
                            f"({cfg.mlp_hidden} wide{', SwiGLU' if swiglu else ''}): export to timm")
    elif cfg.mlp_act == "swiglu" and family != DINOV3:
        problems.append(f"HF's {ARCHITECTURE[family]} has no SwiGLU MLP (DINOv2's and DINOv3's have): export to timm")
    h, w = cfg.img_size
    if h != w and family in (*DINOV2, "beit"):
        # DINOv2 resamples its position table as a square grid in every forward pass (it fails at another
        # shape); BEiT lays a non-square grid's relative positions out transposed (other logits)
        problems.append(f"HF's {ARCHITECTURE[family]} takes square images only (its "
                        f"{'position table is read' if family in DINOV2 else 'relative position tables are laid out'}"
                        f" for a square grid); this model is {h}x{w}: export to timm, or load it at a square size "
                        "first (img_size=S)")
    if problems:
        raise ValueError("hf export: " + "; ".join(problems))
    names = list(class_names) if class_names else [f"LABEL_{i}" for i in range(cfg.num_classes)]
    act = next((hf for hf, ours in HF_ACTS.items() if ours == cfg.mlp_act), "silu")  # SwiGLU's: DINOv2 ignores it, DINOv3 reads it
    labels = {"id2label": {str(i): n for i, n in enumerate(names)}, "label2id": {n: i for i, n in enumerate(names)}}
    if tower in (CLIP, SIGLIP):  # CLIPVisionConfig's and SiglipVisionConfig's own fields
        if h != w:
            raise ValueError(f"hf export: HF's {tower} takes square images, this model {h}x{w}")
        vision = {
            "model_type": tower, "hidden_size": cfg.emb_size, "intermediate_size": cfg.mlp_hidden,
            "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.num_heads, "num_channels": cfg.in_channels,
            "image_size": h, "patch_size": cfg.patch_size, "hidden_act": act, "layer_norm_eps": cfg.norm_eps,
            "attention_dropout": 0.0,
        }
        if tower == SIGLIP:  # its attention pooling, which the image classifier goes without
            vision["vision_use_head"] = cfg.pool == "map"
        if family in TOWERS:  # an image classifier: the whole model's config, with the tower's inside
            return {"architectures": [ARCHITECTURE[family]], "model_type": family, "vision_config": vision, **labels}
        if family == CLIP:  # the projection (if any) is the classifier
            architecture = "CLIPVisionModelWithProjection" if cfg.num_classes else "CLIPVisionModel"
            return {"architectures": [architecture], **vision, "projection_dim": cfg.num_classes or 512}
        return {"architectures": [ARCHITECTURE[family]], **vision}
    if family == DINOV3:
        return {
            "architectures": [ARCHITECTURE[family]], "model_type": family, "hidden_size": cfg.emb_size,
            "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.num_heads,
            "intermediate_size": cfg.mlp_hidden // 2 if swiglu else cfg.mlp_hidden,  # gated: each of its two layers
            "hidden_act": act, "layer_norm_eps": cfg.norm_eps, "image_size": h if h == w else [h, w],
            "patch_size": cfg.patch_size, "num_channels": cfg.in_channels, "num_register_tokens": cfg.reg_tokens,
            "layerscale_value": cfg.layer_scale or 1.0, "query_bias": cfg.qkv_bias, "key_bias": False,
            "value_bias": cfg.qkv_bias, "proj_bias": True, "mlp_bias": True, "use_gated_mlp": swiglu,
            "rope_theta": 100.0, "drop_path_rate": 0.0, "attention_dropout": 0.0, **labels,
        }
    if family == "beit":
        return {
            "architectures": [ARCHITECTURE[family] if cfg.num_classes else "BeitModel"], "model_type": family,
            "hidden_size": cfg.emb_size, "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.num_heads,
            "intermediate_size": cfg.mlp_hidden, "hidden_act": act, "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0, "drop_path_rate": 0.0, "initializer_range": 0.02,
            "layer_norm_eps": cfg.norm_eps, "image_size": h if h == w else [h, w], "patch_size": cfg.patch_size,
            "num_channels": cfg.in_channels, "use_mask_token": False, "use_absolute_position_embeddings": abs_pos,
            "use_relative_position_bias": True, "use_shared_relative_position_bias": False,
            "layer_scale_init_value": cfg.layer_scale, "use_mean_pooling": cfg.pool == "mean", **labels,
        }
    dinov2 = dict(mlp_ratio=int(hf_mlp_ratio), layerscale_value=cfg.layer_scale, use_swiglu_ffn=swiglu,
                  drop_path_rate=0.0, **({"num_register_tokens": cfg.reg_tokens} if cfg.reg_tokens else {}))
    return {
        "architectures": [DINOV2_CLASSIFIERS[family] if family in DINOV2 and cfg.num_classes else ARCHITECTURE[family]],
        "model_type": family,
        "hidden_size": cfg.emb_size,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.mlp_hidden,
        "hidden_act": act,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": cfg.norm_eps,
        "image_size": h if h == w else [h, w],
        "patch_size": cfg.patch_size,
        "num_channels": cfg.in_channels,
        "qkv_bias": cfg.qkv_bias,
        "encoder_stride": cfg.patch_size,
        **labels,
        **(dinov2 if family in DINOV2 else {}),
    }


def export(model: nn.Module, out: Path) -> Path:
    """A directory (config.json, model.safetensors, preprocessor_config.json) for ``from_pretrained``."""
    from safetensors.torch import save_file

    cfg: ViTConfig = model.cfg
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    # a BEiT table of zeros (read by vitkit before abs_pos) is written as no table
    abs_pos = cfg.abs_pos and (bool(state["patch_embed.positions"].any()) or not cfg.rel_pos_bias)
    config = hf_config(cfg, getattr(model, "class_names", None), abs_pos)
    if cfg.reg_tokens and cfg.abs_pos:  # a register's position is a constant added to a constant token: fold it in
        positions = state["patch_embed.positions"]
        state["patch_embed.reg_token"] = state["patch_embed.reg_token"] + positions[:, 1:1 + cfg.reg_tokens]
    family = _family(cfg)
    state = KEYS[family].from_vitkit(state, cfg)
    for part in ("weight", "bias"):  # SigLIP's pooling head: q and kv fused again into in_proj
        if f"vision_model.head.attention.q_proj.{part}" in state:
            state[SIGLIP_IN_PROJ.format(part)] = torch.cat([state.pop(f"vision_model.head.attention.{n}_proj.{part}")
                                                            for n in ("q", "kv")])
    bias = state.pop("visual_projection.bias", None)
    if bias is not None and bias.any():  # CLIP's projection has none: only a zero one is exact
        raise ValueError("hf export: HF's CLIP projection has no bias, this model's classifier has a nonzero one "
                         "(trained): export to timm, or keep num_classes=0 (features)")
    if cfg.mlp_act == "swiglu" and family in DINOV2:  # DINOv2's giant: vitkit's fc1/fc2 are its packed SwiGLU layers
        names = {ours: theirs for theirs, ours in SWIGLU_NAMES.items()}
        state = {re.sub(r"\.mlp\.(fc1|fc2)\.", lambda m: f".mlp.{names[m[1]]}.", k): v for k, v in state.items()}
    if family == DINOV3:  # no key bias (vitkit masks it), no positions (they must be zero), LayerScale always
        prefix = PREFIX[DINOV3]
        if cfg.mlp_act == "swiglu":  # the packed fc1 (up_proj under the key map) split: gate, then value
            for key in [k for k in state if ".mlp.up_proj." in k]:
                state[key.replace(".up_proj.", ".gate_proj.")], state[key] = state[key].chunk(2)
        positions = state.pop(f"{prefix}.embeddings.position_embeddings", None)
        if positions is not None and positions.any():
            raise ValueError("hf export: HF's DINOv3 has no absolute positions, and this model's are not zero "
                             "(trained): export to timm, whose DINOv3 (Eva) holds them")
        state = {k: v for k, v in state.items() if not k.endswith(".attention.k_proj.bias")}
        if not cfg.layer_scale:  # HF's blocks always scale: by ones, the identity
            state.update({f"{prefix}.layer.{i}.layer_scale{j}.lambda1": torch.ones(cfg.emb_size)
                          for i in range(cfg.depth) for j in (1, 2)})
        state[f"{prefix}.embeddings.mask_token"] = torch.zeros(1, 1, cfg.emb_size)
    if family == "beit":  # no key bias (vitkit's shifts every logit of a query alike: nothing); positions if any
        state = {k: v for k, v in state.items()
                 if not k.endswith(".attention.attention.key.bias") and (abs_pos or not k.endswith("position_embeddings"))}
    if family in DINOV2:  # masked image modelling's token, unused in a forward pass: zeros, as HF initialises it
        state[f"{family}.embeddings.mask_token"] = torch.zeros(1, cfg.emb_size)
    if family == "clip":  # the tower's post_layernorm, which its image classifier never reads: the identity
        state.update({"vision_model.post_layernorm.weight": torch.ones(cfg.emb_size),
                      "vision_model.post_layernorm.bias": torch.zeros(cfg.emb_size)})
    preprocess = getattr(model, "preprocess", None) or {}
    gray = cfg.in_channels == 1
    (h, w), crop_pct = cfg.img_size, float(preprocess.get("crop_pct", 1.0))
    scaled = dict(zip(("height", "width"), scaled_size((h, w), crop_pct)))
    if preprocess and crop_mode(preprocess) == "center":  # the shorter side, then the centre (DINOv2's processor)
        geometry = {"image_processor_type": "BitImageProcessor", "size": {"shortest_edge": min(scaled.values())},
                    "do_center_crop": True, "crop_size": {"height": h, "width": w}}
    elif crop_pct != 1.0:  # each side, then the centre (DeiT's)
        geometry = {"image_processor_type": "DeiTImageProcessor", "size": scaled, "do_center_crop": True,
                    "crop_size": {"height": h, "width": w}}
    else:  # each side to the size: the whole image (ViT's)
        geometry = {"image_processor_type": "ViTImageProcessor", "size": {"height": h, "width": w}}
    processor = {
        **geometry,
        "do_resize": True,
        "resample": {name: code for code, name in PIL_RESAMPLE.items()}[preprocess.get("interpolation", "bicubic")],
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(preprocess.get("mean", [0.5] if gray else [0.485, 0.456, 0.406])),
        "image_std": list(preprocess.get("std", [0.5] if gray else [0.229, 0.224, 0.225])),
    }
    with atomic_directory(out) as tmp:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    return out
