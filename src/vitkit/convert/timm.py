"""timm ``VisionTransformer`` state dicts (.safetensors, .pth, .bin), both directions.

vitkit's modules were named after timm's, so the table is mostly renames: the fused qkv
projection has the same (qkv, h, d) layout, the patch embedding is the same Conv2d.
timm's ``global_pool="avg"`` + ``fc_norm`` is vitkit's ``pool="mean", final_norm="pooled"``;
``class_token=False`` models have no ``cls_token`` and no class position. DeiT's distilled models
(``dist_token``, ``head_dist``) are vitkit's ``dist_token=True``. BEiT (timm's ``Beit``: beit_*,
beitv2_*) is vitkit's ``rel_pos_bias=True``: the same blocks under a few other names (``_from_beit``).
DINOv3 (timm's ``Eva``: vit_*_patch16_dinov3) shares those names and is vitkit's ``rope="dinov3"``;
its S+, H+ and 7B models' SwiGLU layers (fc1_g, fc1_x) are packed into vitkit's fc1.

timm's state dicts do not store the number of heads: it comes from ``model=NAME``,
``num_heads=N``, a timm hub ``config.json`` beside the weights (``model_args.num_heads``,
an ``architecture`` name vitkit knows, or else one timm's registry knows), or the convention heads = width / 64.
"""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoint import CheckpointError, atomic_directory, atomic_file, load_state_dict_file, read_json
from ..config import GRID_ROPES, MLP_ACTS, VARIANTS, ViTConfig, get_config, to_2tuple
from ..images import crop_mode
from . import (
    Foreign,
    KeyMap,
    Transform,
    config_with,
    count_blocks,
    mlp_ratio_of,
    require,
    resolve_heads,
    rule,
    square_grid,
    warn_norm_eps,
)


def _qk_channels(qkv: Tensor, cfg: ViTConfig, evens_first: bool) -> Tensor:
    """EVA-02's q and k channels reordered within each head, evens first (``evens_first``) or back: timm
    rotates neighbouring pairs of channels, vitkit a channel with the one half a head away
    (``layers.rope_eva02``); the same reordering of q and k keeps every q·k. v is left as it is."""
    if cfg.rope not in GRID_ROPES:
        return qkv
    e, h, d = cfg.emb_size, cfg.num_heads, cfg.head_dim
    qk = qkv[:2 * e].reshape(2 * h, d // 2, 2, *qkv.shape[1:]) if evens_first else \
        qkv[:2 * e].reshape(2 * h, 2, d // 2, *qkv.shape[1:])
    return torch.cat([qk.transpose(1, 2).reshape(2 * e, *qkv.shape[1:]), qkv[2 * e:]])


# the fused qkv projection, EVA-02's q and k channels reordered (identity for every other model)
QKV = Transform("eva02_qk_channels", lambda ts, cfg: _qk_channels(ts[0], cfg, evens_first=True),
                lambda t, cfg: [_qk_channels(t, cfg, evens_first=False)])

KEYS = KeyMap(
    "timm",
    [
        rule("patch_embed.projection.{p}", "patch_embed.proj.{p}"),
        rule("patch_embed.cls_token", "cls_token"),
        rule("patch_embed.positions", "pos_embed"),
        rule("encoder.blocks.{i}.norm1.{p}", "blocks.{i}.norm1.{p}"),
        rule("encoder.blocks.{i}.attn.qkv.{p}", "blocks.{i}.attn.qkv.{p}", QKV),
        rule("encoder.blocks.{i}.attn.projection.{p}", "blocks.{i}.attn.proj.{p}"),
        rule("encoder.blocks.{i}.norm2.{p}", "blocks.{i}.norm2.{p}"),
        rule("encoder.blocks.{i}.mlp.fc1.{p}", "blocks.{i}.mlp.fc1.{p}"),
        rule("encoder.blocks.{i}.mlp.fc2.{p}", "blocks.{i}.mlp.fc2.{p}"),
        rule("encoder.blocks.{i}.mlp.norm.{p}", "blocks.{i}.mlp.norm.{p}"),  # EVA-02's sub-LN (scale_mlp)
        rule("encoder.blocks.{i}.attn.norm.{p}", "blocks.{i}.attn.norm.{p}"),  # EVA-02 CLIP's (scale_attn_inner)
        rule("encoder.norm.{p}", "norm.{p}"),  # final_norm="tokens"
        rule("head.norm.{p}", "fc_norm.{p}"),  # final_norm="pooled"
        rule("head.fc.{p}", "head.{p}"),
        rule("patch_embed.dist_token", "dist_token"),  # distilled DeiT (VisionTransformerDistilled)
        rule("head.fc_dist.{p}", "head_dist.{p}"),
        rule("patch_embed.reg_token", "reg_token"),  # registers (DINOv2 reg4)
        rule("encoder.blocks.{i}.ls1.gamma", "blocks.{i}.ls1.gamma"),  # LayerScale (DeiT-III, DINOv2)
        rule("encoder.blocks.{i}.ls2.gamma", "blocks.{i}.ls2.gamma"),
        rule("patch_embed.norm_pre.{p}", "norm_pre.{p}"),  # CLIP's image tower (pre_norm)
        rule("encoder.blocks.{i}.attn.rel_pos_bias_table", "blocks.{i}.attn.relative_position_bias_table"),  # BEiT
        rule("head.attn_pool.latent", "attn_pool.latent"),  # attention pooling (global_pool="map": SigLIP)
        *(rule(f"head.attn_pool.{part}.{{p}}", f"attn_pool.{part}.{{p}}")
          for part in ("q", "kv", "proj", "norm", "mlp.fc1", "mlp.fc2")),
    ],
)
# The LayerScale init a file's gammas are taken to have started from, when its config does not say
# (DINOv2's; only a re-initialised block would use it)
LAYER_SCALE_INIT = 1e-5

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
# A bare timm state dict does not say how its inputs were normalised, and timm's ViTs differ: the
# augreg and original JAX-trained weights use 0.5, DeiT's use ImageNet's statistics.
UNKNOWN_NORMALISATION = ("timm's ViT weights use mean = std = 0.5 (augreg, JAX-trained) or ImageNet's "
                         "statistics (DeiT); pass --mean/--std with the weights' own (timm: pretrained_cfg), or "
                         "--model with their timm name")
# vitkit pool -> timm global_pool
GLOBAL_POOL = {"cls": "token", "mean": "avg", "map": "map"}
# (dist_token, pre_norm, SwiGLU, rel_pos_bias, rope) -> a timm architecture of the right class (Beit for
# BEiT, Eva for DINOv3 and EVA-02), LayerNorm eps and MLP layer (SwiGLUPacked), whose every size
# model_args then override, and that eps (a functools.partial in the architecture, not a model_arg)
TIMM_ARCHITECTURE = {(False, False, False, False, "none"): ("vit_base_patch16_224", 1e-6),
                     (True, False, False, False, "none"): ("deit_base_distilled_patch16_224", 1e-6),
                     (False, True, False, False, "none"): ("vit_base_patch16_clip_224", 1e-5),
                     (False, False, True, False, "none"): ("vit_giant_patch14_dinov2", 1e-6),
                     (False, False, False, True, "none"): ("beit_base_patch16_224", 1e-6),  # timm's Beit class
                     (False, False, False, False, "dinov3"): ("vit_base_patch16_dinov3", 1e-5),  # timm's Eva class
                     (False, False, True, False, "dinov3"): ("vit_small_plus_patch16_dinov3", 1e-5),  # Eva, SwiGLU
                     (False, False, True, False, "eva02"): ("eva02_base_patch14_448", 1e-6),  # Eva
                     (False, True, False, False, "pe"): ("vit_pe_core_base_patch16_224", 1e-5)}  # Eva, pre-norm


def architecture_key(cfg: ViTConfig) -> tuple[bool, bool, bool, bool, str]:
    return cfg.dist_token, cfg.pre_norm, cfg.mlp_act == "swiglu", cfg.rel_pos_bias, cfg.rope


# --- BEiT ---------------------------------------------------------------------------------------
# timm's Beit names what VisionTransformer (and KEYS) call blocks.{i}.attn.qkv.bias and
# blocks.{i}.ls{1,2}.gamma as q_bias and v_bias (no k bias: it would shift all of a query's logits
# alike, which the softmax ignores, so vitkit's qkv bias holds zeros there) and gamma_{1,2}.
# timm's Eva class (DINOv3, EVA-02) shares those names; EVA-02 B/L hold q, k, v as three projections.
BEIT_MARKERS = ("blocks.0.attn.q_bias", "blocks.0.gamma_1", "blocks.0.attn.relative_position_bias_table",
                "rel_pos_bias.relative_position_bias_table", "blocks.0.attn.q_proj.weight")
SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"  # BEiT's pretraining: one table for all blocks
# timm architectures with rotary positions vitkit does not read (its Eva class: RoPE-ViT's mixed and axial
# rotations), refused by name (DINOv3's, EVA-02's and the Perception Encoder's are read: rope="dinov3", "eva02", "pe")
ROTARY_ARCHITECTURES = ("_rope_",)
# the pretraining grid every EVA-02 scales its rotary coordinates to (timm's ref_feat_shape, 224 / 14)
EVA02_REF_GRID = 16
# Eva's SwiGLU (DINOv3 S+, H+, 7B) as two Linear layers, gate and value, where vitkit's fc1 packs them
# (gate first: layers.SiLUGate), as timm's SwiGLUPacked does
SWIGLU_HALVES = ("fc1_g", "fc1_x")


def is_beit(state: dict) -> bool:
    return any(k in state for k in BEIT_MARKERS)


def _learned_rotation(state: dict) -> bool:
    """RoPE-ViT's mixed rotation learns its frequencies (rope.freqs): neither DINOv3's nor EVA-02's."""
    return any(k.startswith("rope.") for k in state)


def _rotation_of(config: dict) -> str:
    """The rotary positions a timm hub config names ("dinov3", "eva02", "pe"), or "" where it names none: its
    architecture, or the model_args vitkit writes (which settle the layouts the tensors alone cannot tell)."""
    architecture, args = str(config.get("architecture", "")), config.get("model_args", {})
    if "dinov3" in architecture or args.get("rope_type") == "dinov3":
        return "dinov3"
    if architecture.startswith("vit_pe_") or (args.get("use_rot_pos_emb") and args.get("attn_type") == "rope"):
        return "pe"  # the Perception Encoder: its own names (a fused qkv bias), not BEiT's
    if architecture.startswith("eva02") or (args.get("use_rot_pos_emb") and args.get("rope_type", "cat") == "cat"):
        return "eva02"
    if architecture.startswith("eva_") or args.get("use_rot_pos_emb") is False:  # EVA-01 (eva_giant_*): no rotation
        return "none"
    return ""


def _from_beit(state: dict, src: str, rotation: str = "") -> tuple[dict, str]:
    """A Beit state dict (or a DINOv3 or EVA-02 one: timm's Eva class, under the same names) under
    VisionTransformer's names, plus each block's relative position table -> (that state, ViTConfig.rope).
    ``rotation``: the rotary positions the file's hub config names (``_rotation_of``), else read from the
    tensors' layout."""
    rope = rotation or "none"
    if not rotation and "blocks.0.attn.relative_position_bias_table" not in state and SHARED_TABLE not in state:
        # timm's Eva class shares BEiT's names and rotates q and k by position: DINOv3 (registers, no
        # absolute positions) and EVA-02 (absolute positions too, a SwiGLU MLP, no LayerScale) are read
        # with their rotations; another (RoPE-ViT's) would run without its own, so it is refused
        fc1, fc2 = state.get("blocks.0.mlp.fc1.weight"), state.get("blocks.0.mlp.fc2.weight")
        swiglu = (f"blocks.0.mlp.{SWIGLU_HALVES[0]}.weight" in state
                  or (fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]))
        if "reg_token" in state and "cls_token" in state and "pos_embed" not in state and not _learned_rotation(state):
            rope = "dinov3"
        elif ("pos_embed" in state and "reg_token" not in state and "blocks.0.gamma_1" not in state and swiglu
              and not _learned_rotation(state)):
            rope = "eva02"
        else:
            raise CheckpointError(f"{src}: BEiT's names (q_bias, gamma_1, q_proj) without its relative position "
                                  "tables, and neither DINOv3's layout (a class token, registers, no absolute "
                                  "positions) nor EVA-02's (absolute positions, a SwiGLU MLP, no LayerScale): "
                                  "another model of timm's Eva class (RoPE-ViT's rotary positions, EVA-01), which "
                                  "vitkit does not read; a hub dir whose config.json names a DINOv3 or EVA-02 "
                                  "architecture is read by that name")
    out = {}
    for key, value in state.items():
        block, _, name = key.rpartition(".")
        if name == "relative_position_index" or key == SHARED_TABLE:  # built from the grid; shared: below
            continue
        if block.endswith(".attn.q_proj"):  # EVA-02 B/L: q, k and v as three projections, the key without bias
            attn = block[:-len(".q_proj")]
            k = torch.zeros_like(value) if name == "bias" else require(state, f"{attn}.k_proj.weight", src, "timm (Eva)")
            v = require(state, f"{attn}.v_proj.{name}", src, "timm (Eva)")
            out[f"{attn}.qkv.{name}"] = torch.cat([value, k, v])  # (3E, ...): q, k, v
        elif block.endswith((".attn.k_proj", ".attn.v_proj")):
            continue  # read with q_proj above
        elif name in ("gamma_1", "gamma_2"):
            out[f"{block}.ls{name[-1]}.gamma"] = value
        elif name == "q_bias":
            v_bias = require(state, f"{block}.v_bias", src, "timm (BEiT)")
            out[f"{block}.qkv.bias"] = torch.cat([value, torch.zeros_like(value), v_bias])  # (3E,): q, k, v
        elif block.endswith(f".mlp.{SWIGLU_HALVES[0]}"):  # SwiGLU's gate: packed with its value half into fc1
            halves = [value, require(state, f"{block[:-len(SWIGLU_HALVES[0])]}{SWIGLU_HALVES[1]}.{name}", src, "timm (Eva)")]
            out[f"{block[:-len(SWIGLU_HALVES[0])]}fc1.{name}"] = torch.cat(halves)
        elif name != "v_bias" and not block.endswith(f".mlp.{SWIGLU_HALVES[1]}"):
            out[key] = value
    if SHARED_TABLE in state:
        # What BEiT's own fine-tuning does with a pretrained shared table: every block starts from a copy.
        for i in range(count_blocks(state, r"blocks\.(\d+)\.")):
            out[f"blocks.{i}.attn.relative_position_bias_table"] = state[SHARED_TABLE].clone()
    return out, rope


def _to_beit(state: dict, abs_pos: bool, swiglu: bool = False, separate_qkv: bool = False,
             qkv_bias: bool = True) -> dict:
    """``_from_beit`` undone (KEYS' names -> Beit's and Eva's); the k bias is dropped (see above).
    ``swiglu``: fc1 split into Eva's gate and value layers; ``separate_qkv``: q, k, v as three projections;
    ``qkv_bias=False``: the fused bias kept as it is (the Perception Encoder's, whose k part is real)."""
    out = {}
    for key, value in state.items():
        block, _, name = key.rpartition(".")
        if separate_qkv and block.endswith(".attn.qkv"):
            for part, tensor in zip("qkv", value.chunk(3), strict=True):
                if name == "weight" or part != "k":
                    out[f"{block[:-4]}.{part}_proj.{name}"] = tensor
        elif swiglu and block.endswith(".mlp.fc1"):
            for half, tensor in zip(SWIGLU_HALVES, value.chunk(2), strict=True):
                out[f"{block[:-3]}{half}.{name}"] = tensor
        elif name == "gamma" and block.endswith((".ls1", ".ls2")):
            out[f"{block[:-4]}.gamma_{block[-1]}"] = value
        elif key.endswith(".attn.qkv.bias") and qkv_bias:
            q_bias, _, v_bias = value.chunk(3)
            out[f"{block[:-4]}.q_bias"], out[f"{block[:-4]}.v_bias"] = q_bias, v_bias
        elif key != "pos_embed" or abs_pos:
            out[key] = value
    return out


def _eva02_separate_qkv(cfg: ViTConfig) -> bool:
    """timm's EVA-02 B and L (with the MLP's sub-LN) hold q, k, v as three projections; T and S one."""
    return cfg.rope == "eva02" and cfg.mlp_norm


def _eva_swiglu_split(cfg: ViTConfig) -> bool:
    """Whether timm's Eva builds a SwiGLU MLP of two layers (fc1_g, fc1_x: DINOv3's, EVA-02 B/L's, where
    swiglu_align_to or scale_mlp is set) rather than one packed fc1 (GluMlp: EVA-02 T/S)."""
    return cfg.rope == "dinov3" or cfg.mlp_norm


def state_from_vitkit(state: dict, cfg: ViTConfig) -> dict:
    """A vitkit state dict under the names of the timm class ``model_args`` builds (Beit's for BEiT, Eva's,
    the same, for DINOv3)."""
    state = KEYS.from_vitkit(state, cfg)
    if cfg.rel_pos_bias or cfg.rope in ("dinov3", "eva02") or (cfg.rope == "pe" and cfg.layer_scale):
        # Beit's and Eva's names (PE's LayerScale: gamma_1, gamma_2); a table of zero positions (vitkit
        # before abs_pos) is left out
        abs_pos = "pos_embed" in state and (cfg.rope in GRID_ROPES or bool(state["pos_embed"].any()))
        swiglu = cfg.mlp_act == "swiglu" and _eva_swiglu_split(cfg)
        state = _to_beit(state, abs_pos=abs_pos, swiglu=swiglu, separate_qkv=_eva02_separate_qkv(cfg),
                         qkv_bias=cfg.rope != "pe")
        if cfg.rope == "dinov3" and not cfg.layer_scale:  # timm's DINOv3 always scales: by ones (model_args)
            state.update({f"blocks.{i}.gamma_{j}": torch.ones(cfg.emb_size) for i in range(cfg.depth) for j in (1, 2)})
    return state


def read(path: Path) -> Foreign:
    """A weights file, or a timm hub directory (``config.json`` + ``model.safetensors``)."""
    directory = path if path.is_dir() else path.parent
    if path.is_dir():
        found = [directory / n for n in WEIGHT_FILES if (directory / n).is_file()]
        if not found:
            raise CheckpointError(f"{path}: a directory without {' or '.join(WEIGHT_FILES)}")
        path = found[0]
    config = {}
    cfg_file = directory / "config.json"
    if cfg_file.is_file():
        loaded = read_json(cfg_file)
        if isinstance(loaded, dict) and "architecture" in loaded:  # timm's hub config, not someone else's
            config = loaded
    if any(name in str(config.get("architecture", "")) for name in ROTARY_ARCHITECTURES):
        raise CheckpointError(f"{path}: a timm {config['architecture']}, whose attention rotates q and k by each "
                              "patch's position (rotary positions, timm's Eva class), which vitkit does not read")
    state = load_state_dict_file(path)
    rotation = _rotation_of(config)
    rope = "pe" if rotation == "pe" else "none"
    if is_beit(state) or rotation in ("dinov3", "eva02"):  # an EVA-02 without qkv bias has none of BEiT's names
        state, rope = _from_beit(state, str(path), rotation)
    foreign = Foreign(str(path), state, config=config, layout=rope)
    pretrained = config.get("pretrained_cfg", {})
    if "mean" in pretrained and "std" in pretrained:
        foreign.preprocess = dict(
            mean=list(pretrained["mean"]), std=list(pretrained["std"]),
            interpolation=pretrained.get("interpolation", "bicubic"), crop_pct=pretrained.get("crop_pct", 0.875),
            crop_mode=pretrained.get("crop_mode", "center"),
        )
    if isinstance(config.get("label_names"), list):
        foreign.class_names = [str(n) for n in config["label_names"]]
    return foreign


def infer_config(foreign: Foreign, base: dict) -> ViTConfig:
    s, src = foreign.state, foreign.path
    proj = require(s, "patch_embed.proj.weight", src, "timm")  # (E, C, p, p)
    width, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    class_token = "cls_token" in s
    dist_token = "dist_token" in s  # timm's VisionTransformerDistilled (DeiT): a second prefix token and head
    reg_tokens = s["reg_token"].shape[1] if "reg_token" in s else 0
    # a file without a position table fits any grid: the hub config's, else the named variant's size, else 224
    named_size = get_config(base["_model"]).img_size if base.get("_model") else 224
    num_patches, grid = patch_positions(foreign, named_size), _config_grid(foreign, named_size)
    pre_norm = "norm_pre.weight" in s
    # The file's own timm config, where there is one, fills what shapes cannot tell.
    args = foreign.config.get("model_args", {})
    # the file's architecture: its hub config's, else the variant the caller named (model=NAME)
    # ("eva_giant_patch14_224.clip_ft_in1k": the tag after the dot names the weights, not the architecture)
    architecture = str(foreign.config.get("architecture", "")).split(".")[0] or base.get("_model", "")
    # the architecture's own fields: vitkit's table's, else what timm's registry says it is (vitkit's names)
    known = VARIANTS.get(architecture) or (_timm_facts(architecture) if architecture else {})
    act = args.get("act_layer") or known.get("mlp_act", "gelu")  # timm's names are vitkit's
    if "quickgelu" in architecture:
        act = "quick_gelu"
    fc1, fc2 = (require(s, f"blocks.0.mlp.{fc}.weight", src, "timm") for fc in ("fc1", "fc2"))
    if fc1.shape[0] == 2 * fc2.shape[1]:  # a packed gated MLP (SwiGLUPacked: DINOv2's giant)
        if args.get("act_layer", "silu") != "silu":  # none given: the giant's architecture has SiLU
            raise CheckpointError(f"{src}: a gated MLP with act_layer {act!r}; vitkit's gated MLP is SwiGLU (silu)")
        act = "swiglu"
    if act not in MLP_ACTS:
        raise CheckpointError(f"{src}: act_layer {act!r} in its config; vitkit's MLP uses one of {MLP_ACTS}")
    # a bare CLIP tower: OpenAI's and LAION's differ in activation alone (a named QuickGELU or PE variant settles it)
    if (pre_norm and not foreign.config and "mlp_act" not in base and act != "quick_gelu"
            and known.get("rope", "none") == "none" and "attn_pool.latent" not in s):  # (PE pools by attention)
        warnings.warn(f"{src}: a CLIP image tower (norm_pre), read with LayerNorm eps 1e-5 and exact GELU, as "
                      "timm's *_clip_* architectures run it; OpenAI's own weights were trained with QuickGELU "
                      "(timm's *_quickgelu_*): pass mlp_act='quick_gelu' (--mlp-act quick_gelu) for those",
                      stacklevel=4)
    fc_norm = "fc_norm.weight" in s
    base = dict(base)
    if "num_heads" not in base:
        if "num_heads" in args:
            base["num_heads"] = int(args["num_heads"])
        elif architecture in VARIANTS:
            base["num_heads"] = VARIANTS[architecture]["num_heads"]
        elif "blocks.0.attn.relative_position_bias_table" in s:  # BEiT's tables hold a column per head
            base["num_heads"] = s["blocks.0.attn.relative_position_bias_table"].shape[1]
        elif "num_heads" in known:
            base["num_heads"] = known["num_heads"]
    global_pool = foreign.config.get("global_pool", args.get("global_pool"))
    if args.get("pool_include_prefix") and global_pool in ("avg", None) and "attn_pool.latent" not in s:
        raise CheckpointError(f"{src}: pool_include_prefix=True with average pooling (the prefix tokens averaged "
                              "with the patches); vitkit's mean pools the patch tokens alone")
    rope = foreign.layout or "none"  # read() tells DINOv3's, EVA-02's and PE's layouts
    if rope == "none" and known.get("rope") == "pe":  # a bare PE file (its names are a plain ViT's), named
        rope = "pe"
    if rope == "none" and pre_norm and "attn_pool.latent" in s and not architecture:
        warnings.warn(f"{src}: a pre-norm and attention pooling, as timm's Perception Encoder has (no CLIP tower); "
                      "read as a plain ViT, without the rotary positions that are not in the file: for a PE, pass "
                      "model=vit_pe_core_* (--model) or its timm hub dir", stacklevel=4)
    if "pool" not in base and global_pool in ("token", "avg"):
        base["pool"] = {timm: ours for ours, timm in GLOBAL_POOL.items()}[global_pool]
    return config_with(
        base,
        src,
        # the grid: the hub config's image size where it has as many patches, else a square of them
        img_size=tuple(g * patch for g in (grid if grid and grid[0] * grid[1] == num_patches
                                           else square_grid(num_patches, src))),
        patch_size=patch,
        in_channels=in_channels,
        emb_size=width,
        depth=count_blocks(s, r"blocks\.(\d+)\."),
        num_heads=resolve_heads(width, base, src),
        mlp_ratio=mlp_ratio_of(require(s, "blocks.0.mlp.fc1.weight", src, "timm").shape[0], width, src),
        qkv_bias="blocks.0.attn.qkv.bias" in s,
        class_token=class_token,
        dist_token=dist_token,
        reg_tokens=reg_tokens,
        layer_scale=float(args.get("init_values") or LAYER_SCALE_INIT) if "blocks.0.ls1.gamma" in s else 0.0,
        pool=implied_pool(s, rope, global_pool),  # where neither the caller nor a hub config says it (above)
        final_norm="pooled" if fc_norm else "tokens" if "norm.weight" in s else "none",
        pre_norm=pre_norm,
        mlp_act=act,
        # CLIP's towers: 1e-5, other timm ViTs: 1e-6
        rel_pos_bias="blocks.0.attn.relative_position_bias_table" in s,
        rope=rope,
        abs_pos="pos_embed" in s,  # none: Beit's and Eva's use_abs_pos_emb=False, VisionTransformer's pos_embed='none'
        rope_ref_grid=_ref_grid(args.get("ref_feat_shape", known.get("rope_ref_grid")), rope, src)
        if rope in GRID_ROPES else 0,
        rope_grid_offset=float(args.get("rope_grid_offset", known.get("rope_grid_offset", 0.0)))
        if rope in GRID_ROPES else 0.0,
        pool_heads=_pool_heads(args.get("attn_pool_num_heads", known.get("pool_heads", 0)), base, width)
        if "attn_pool.latent" in s else 0,
        pool_mlp_ratio=_pool_mlp_ratio(s, src),
        # the prefix tokens pooled by attention: always in Eva, only with pool_include_prefix in VisionTransformer
        pool_prefix=(rope != "none" or _pool_include_prefix(args, known, base, src)
                     if "attn_pool.latent" in s and _prefix_tokens(s) else True),
        mlp_norm="blocks.0.mlp.norm.weight" in s,
        attn_norm="blocks.0.attn.norm.weight" in s,
        # DINOv3 takes any image size (its positions are rotary only); the model's own setting where the config has it
        dynamic_img_size=bool(args.get("dynamic_img_size", rope == "dinov3")),
        norm_eps=TIMM_ARCHITECTURE.get((dist_token, pre_norm, act == "swiglu", False, rope), (None, 1e-6))[1],
        num_classes=s["head.weight"].shape[0] if "head.weight" in s else 0,
    )


# timm's activation modules -> vitkit's mlp_act (nn.GELU's by its approximate argument)
TIMM_ACTS = {"QuickGELU": "quick_gelu", ("GELU", "none"): "gelu", ("GELU", "tanh"): "gelu_tanh", "GELUTanh": "gelu_tanh"}


@functools.lru_cache(maxsize=16)
def _timm_facts(architecture: str) -> dict:
    """What a timm architecture vitkit's table lacks fixes and its weights do not show (a hub config names
    one, e.g. SigLIP 2's or EVA-01's, without model_args): its heads, its MLP's activation, its attention
    pooling's heads and its rotation's reference grid and offset (ViTConfig's names), from timm's
    own registry, its model built on the meta device (no memory, no weights). Empty without timm, or for a
    name timm does not know."""
    try:
        import timm

        if not timm.is_model(architecture):
            return {}
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = timm.create_model(architecture, pretrained=False)
    except Exception:  # an older timm, or a model that cannot be built on the meta device: the conventions
        return {}
    facts = {}
    heads = next((m.num_heads for m in model.modules() if isinstance(getattr(m, "num_heads", None), int)), None)
    if heads:
        facts["num_heads"] = int(heads)
    pool = getattr(model, "attn_pool", None)
    if isinstance(getattr(pool, "num_heads", None), int):
        facts["pool_heads"] = int(pool.num_heads)
    if isinstance(getattr(model, "pool_include_prefix", None), bool):  # VisionTransformer's (Eva: always)
        facts["pool_prefix"] = model.pool_include_prefix
    rope = getattr(model, "rope", None)  # Eva's rotary positions: the grid they are scaled to, the index offset
    if getattr(rope, "ref_feat_shape", None) is not None:
        facts["rope_ref_grid"] = list(rope.ref_feat_shape)  # (h, w): _ref_grid checks it is square
    if isinstance(getattr(rope, "grid_offset", None), (int, float)):
        facts["rope_grid_offset"] = float(rope.grid_offset)
    act = next((m.act for m in model.modules() if hasattr(m, "fc2") and isinstance(getattr(m, "act", None), nn.Module)),
               None)
    if act is not None:
        kind = type(act).__name__
        act_name = TIMM_ACTS.get((kind, getattr(act, "approximate", None)), TIMM_ACTS.get(kind))
        if act_name:
            facts["mlp_act"] = act_name
    return facts


def _pool_include_prefix(args: dict, known: dict, base: dict, src: str) -> bool:
    """timm's pool_include_prefix for a VisionTransformer pooled by attention: the caller's pool_prefix, its
    config's, its architecture's, else timm's default (False), which a bare file cannot confirm: a warning."""
    if "pool_prefix" in base:
        return bool(base["pool_prefix"])
    if "pool_include_prefix" in args or "pool_prefix" in known:
        return bool(args.get("pool_include_prefix", known.get("pool_prefix")))
    warnings.warn(f"{src}: attention pooling beside prefix tokens, read as timm's VisionTransformer builds it by "
                  "default, over the patch tokens alone; for a model built with pool_include_prefix=True, which "
                  "pools them too, pass pool_prefix=True (vitkit.convert.load)", stacklevel=5)
    return False


def _pool_mlp_ratio(s: dict, src: str) -> float:
    """Attention pooling's MLP ratio where its width differs from the blocks' MLP (PE-G), from the shapes; else 0."""
    pool_fc1, block_fc1 = s.get("attn_pool.mlp.fc1.weight"), s.get("blocks.0.mlp.fc1.weight")
    if pool_fc1 is None or block_fc1 is None or pool_fc1.shape[0] == block_fc1.shape[0]:
        return 0.0
    return mlp_ratio_of(pool_fc1.shape[0], pool_fc1.shape[1], src)


def _pool_heads(heads: int, base: dict, width: int) -> int:
    """vitkit's pool_heads from timm's attn_pool_num_heads: 0 where they are the blocks' (or unknown)."""
    heads = int(heads or 0)
    return 0 if heads == base.get("num_heads") or not heads or width % heads else heads


def _ref_grid(ref_feat_shape, rope: str, src: str) -> int:
    """EVA-02's or PE's rotary reference grid from a hub config's ``ref_feat_shape`` or timm's registry
    (without either, every EVA-02's 16; a PE's differs by model: refused)."""
    if ref_feat_shape is None and rope == "pe":
        raise CheckpointError(f"{src}: a Perception Encoder whose reference grid (ref_feat_shape) neither its config "
                              "nor timm's registry gives")
    if ref_feat_shape is None:
        return EVA02_REF_GRID
    h, w = (ref_feat_shape, ref_feat_shape) if isinstance(ref_feat_shape, int) else ref_feat_shape
    if h != w:
        raise CheckpointError(f"{src}: ref_feat_shape {ref_feat_shape} in its config is not square; vitkit's "
                              "rope_ref_grid is one side")
    return int(h)


def implied_pool(state: dict, rope: str, global_pool: str | None = None) -> str:
    """The pooling a timm state dict is read with where neither the caller (pool=) nor a hub config's
    global_pool ("token", "avg") says it, for the file cannot: attention pooling where it holds ``attn_pool``;
    timm's DINOv3 architectures' default, the patch tokens' mean (no fc_norm), where no global_pool is given;
    else the mean where it holds ``fc_norm`` (timm's norm after average pooling) or no class token (nothing
    else to pool), else the class token. ``export`` warns where a bare file would be read back so and the
    model pools otherwise."""
    if "attn_pool.latent" in state:
        return "map"
    if rope == "dinov3" and global_pool is None:
        return "mean"
    return "mean" if "fc_norm.weight" in state or "cls_token" not in state else "cls"


def _prefix_tokens(state: dict) -> int:
    return sum(state[k].shape[1] for k in ("cls_token", "dist_token", "reg_token") if k in state)


def patch_positions(foreign: Foreign, default_size: int | tuple[int, int] = 224) -> int:
    """The number of patch positions in the file's ``pos_embed``. timm's ``no_embed_class=True``
    (DeiT-III, DINOv2 with registers) gives positions to the patches only: the table then holds no
    entries for the prefix tokens (told by the file's config, its no_embed_class or the grid of its image
    size, or else by a table that is a square grid only without them)."""
    s = foreign.state
    if "pos_embed" not in s:  # no absolute positions: the grid from elsewhere
        return _patches_without_positions(foreign, default_size)
    held, prefix = s["pos_embed"].shape[1], _prefix_tokens(s)
    no_embed_class = foreign.config.get("model_args", {}).get("no_embed_class")
    grid = _config_grid(foreign)
    if no_embed_class is None and grid and grid[0] * grid[1] in (held, held - prefix):  # the config's grid tells
        no_embed_class = prefix > 0 and grid[0] * grid[1] == held
    if no_embed_class is None:
        no_embed_class = prefix > 0 and round((held - prefix) ** 0.5) ** 2 != held - prefix and round(held**0.5) ** 2 == held
    return held if no_embed_class else held - prefix


def _patches_without_positions(foreign: Foreign, default_size: int | tuple[int, int]) -> int:
    """The patch grid of a model without a ``pos_embed``: BEiT's relative position tables are laid out for
    it; rotary positions (DINOv3) and timm's ``pos_embed='none'`` fit any grid: the image size of the
    file's config, else ``default_size`` (the named variant's, as timm builds it; else timm's default 224)."""
    s = foreign.state
    table = s.get("blocks.0.attn.relative_position_bias_table")
    grid = _config_grid(foreign)
    if table is not None:
        if grid and (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3 == table.shape[0]:  # the config's grid, if it fits
            return grid[0] * grid[1]
        side = (round((table.shape[0] - 3) ** 0.5) + 1) // 2  # (2h-1)^2 + 3 entries for an h x h grid
        return side * side
    h, w = grid or _config_grid(foreign, default_size)
    return h * w


def _config_grid(foreign: Foreign, default: int | None = None) -> tuple[int, int] | None:
    """The patch grid of the image size the file's hub config gives (``model_args.img_size``, which timm
    builds the model at, square or not), else of ``default``; None without either."""
    size = foreign.config.get("model_args", {}).get("img_size", default)
    if size is None:
        return None
    proj = require(foreign.state, "patch_embed.proj.weight", foreign.path, "timm")
    h, w = to_2tuple(size)
    return h // proj.shape[-2], w // proj.shape[-1]


def to_vitkit(foreign: Foreign, cfg: ViTConfig) -> dict:
    state = foreign.state
    pos = state.get("pos_embed")
    if pos is not None and pos.shape[1] == cfg.num_patches and cfg.num_prefix_tokens:
        # no_embed_class: the prefix tokens join after the positions are added, which is the same
        # as their having zero positions (big_vision's class token gets the same treatment, jax.py)
        state = dict(state, pos_embed=torch.cat([pos.new_zeros(1, cfg.num_prefix_tokens, pos.shape[-1]), pos], 1))
    return KEYS.to_vitkit(state, cfg, foreign.path)


def model_args(cfg: ViTConfig, abs_pos: bool | None = None, no_embed_class: bool = False) -> dict:
    """The ``timm.create_model(...)`` keyword arguments that build the same network, given the
    architecture ``TIMM_ARCHITECTURE`` names for it (a SwiGLU model: vit_giant_patch14_dinov2's).
    ``abs_pos``: whether timm's model holds absolute positions; by default ``cfg.abs_pos`` (False also for
    a BEiT or DINOv3 model whose table holds zeros: one read by vitkit before ``abs_pos`` existed).
    ``no_embed_class``: a VisionTransformer whose table has no rows for the prefix tokens (``export``)."""
    abs_pos = cfg.abs_pos if abs_pos is None else abs_pos
    if cfg.pool not in GLOBAL_POOL:
        raise ValueError(f"timm export: no timm ViT pools as pool={cfg.pool!r} does; timm's global_pool takes "
                         f"{', '.join(f'{timm!r} (pool={ours!r})' for ours, timm in GLOBAL_POOL.items())}")
    if architecture_key(cfg) not in TIMM_ARCHITECTURE:
        raise ValueError("timm export: no timm ViT has more than one of a distillation token, CLIP's pre-norm, "
                         "a SwiGLU MLP, BEiT's relative positions and rotary positions; this model has "
                         f"dist_token={cfg.dist_token}, pre_norm={cfg.pre_norm}, mlp_act={cfg.mlp_act!r}, "
                         f"rel_pos_bias={cfg.rel_pos_bias}, rope={cfg.rope!r}")
    special = ("BEiT (Beit)" if cfg.rel_pos_bias else "DINOv3 (Eva)" if cfg.rope == "dinov3"
               else "EVA-02 (Eva)" if cfg.rope == "eva02" else "the Perception Encoder (Eva)" if cfg.rope == "pe"
               else None)
    # Eva: DINOv3 S+, H+, 7B and every EVA-02 have SwiGLU
    acts = {"eva02": {"swiglu": "SwiGLU"}, "dinov3": {"gelu": "exact GELU", "swiglu": "SwiGLU"}}.get(
        cfg.rope, {"gelu": "exact GELU"})
    pools = ("cls", "mean", "map") if cfg.rope == "pe" else ("cls", "mean")  # PE pools by attention
    if special and cfg.pool == "map" and cfg.num_prefix_tokens and not cfg.pool_prefix:
        raise ValueError(f"timm export: timm's {special} pools the prefix tokens too; this model pools the patch "
                         "tokens alone (pool_prefix=False)")
    if special and (cfg.mlp_act not in acts or cfg.pool not in pools or (cfg.final_norm == "none" and cfg.rope != "pe")):
        raise ValueError(f"timm export: timm's {special} has {' or '.join(acts.values())}, pools the class token or "
                         f"the mean, and normalises before or after pooling; this model has mlp_act={cfg.mlp_act!r}, "
                         f"pool={cfg.pool!r}, final_norm={cfg.final_norm!r}")
    eps = TIMM_ARCHITECTURE[architecture_key(cfg)][1]
    warn_norm_eps("timm", cfg.norm_eps, eps,
                  f"timm is given norm_layer=functools.partial(torch.nn.LayerNorm, eps={cfg.norm_eps})")
    shared = dict(
        img_size=list(cfg.img_size), patch_size=cfg.patch_size, in_chans=cfg.in_channels,
        num_classes=cfg.num_classes, global_pool=GLOBAL_POOL[cfg.pool], embed_dim=cfg.emb_size, depth=cfg.depth,
        num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
        # 0, not None, for no LayerScale: timm.create_model drops None arguments, and the architecture's
        # own init_values (vit_giant_patch14_dinov2's, beit's) would then build one
        init_values=float(cfg.layer_scale),
    )
    if cfg.rope != "none":  # Eva's own arguments, over vit_*_dinov3's and eva02_*'s rotary settings
        eva = dict(shared, class_token=cfg.class_token, num_reg_tokens=cfg.reg_tokens, use_abs_pos_emb=abs_pos,
                   use_fc_norm=cfg.final_norm == "pooled", use_post_transformer_norm=cfg.final_norm == "tokens",
                   use_pre_transformer_norm=cfg.pre_norm, dynamic_img_size=cfg.dynamic_img_size)
        if not cfg.layer_scale:  # Eva builds LayerScale for any init_values but None, which create_model drops
            if cfg.rope == "dinov3":  # ... and then takes the architecture's: scales of ones, the identity
                eva["init_values"] = 1.0  # (state_from_vitkit writes them)
            else:
                del eva["init_values"]  # eva02_*: none
        if cfg.mlp_act == "swiglu":
            # Eva's mlp_ratio gives the width of each of SwiGLU's two layers, half of vitkit's packed fc1.
            # swiglu_align_to=1 keeps the split layers (fc1_g, fc1_x) without rounding that width up
            # (the architectures round to 8 or 64, which their own widths already are); 0 (and no
            # scale_mlp) gives one packed fc1 (GluMlp), EVA-02 T/S's.
            half = cfg.mlp_hidden // 2
            ratio = half / cfg.emb_size
            if int(cfg.emb_size * ratio) != half:  # Eva takes int(width * ratio): a ratio rounded below half
                ratio = (half + 0.5) / cfg.emb_size
            eva.update(mlp_ratio=ratio, swiglu_mlp=True, swiglu_align_to=1 if cfg.rope == "dinov3" else 0)
        eva.update(scale_mlp=cfg.mlp_norm, scale_attn_inner=cfg.attn_norm)
        if cfg.rope in GRID_ROPES:
            eva.update(use_rot_pos_emb=True, rope_type="cat", rope_temperature=10000.0, rope_rotate_half=False,
                       ref_feat_shape=[cfg.rope_ref_grid] * 2, rope_grid_offset=float(cfg.rope_grid_offset))
        if cfg.rope == "eva02":
            eva["qkv_fused"] = not _eva02_separate_qkv(cfg)
        if cfg.rope == "pe":  # AttentionRope: one qkv projection, its k bias rotated with the key
            eva.update(attn_type="rope", rope_grid_indexing="xy")
        if cfg.pool == "map":
            eva.update(attn_pool_num_heads=cfg.pool_heads or cfg.num_heads,
                       attn_pool_mlp_ratio=cfg.pool_mlp_ratio or cfg.mlp_ratio)
        return eva
    if cfg.rel_pos_bias:  # Beit's own arguments
        if cfg.mlp_norm or cfg.attn_norm:
            raise ValueError("timm export: timm's BEiT (Beit) has no LayerNorm before fc2 or before the attention's "
                             f"projection; this model has mlp_norm={cfg.mlp_norm}, attn_norm={cfg.attn_norm}")
        beit = dict(shared, use_abs_pos_emb=abs_pos, use_rel_pos_bias=True)
        if (cfg.final_norm == "pooled") != (cfg.pool == "mean"):
            # only where it differs from what average pooling implies: timm's Beit took use_fc_norm from
            # 1.0.31 on, and an older one (1.0.29) refuses the argument
            beit["use_fc_norm"] = cfg.final_norm == "pooled"
        return beit
    if cfg.pool == "map" and cfg.num_prefix_tokens:  # only then: older timm versions may not take the argument
        shared["pool_include_prefix"] = cfg.pool_prefix  # (Eva's pooling reads them always: checked above)
    if cfg.pool_heads or cfg.pool_mlp_ratio:
        raise ValueError(f"timm export: timm's VisionTransformer pools with its blocks' heads and MLP ratio; this "
                         f"model's pooling has pool_heads={cfg.pool_heads}, pool_mlp_ratio={cfg.pool_mlp_ratio} "
                         "(timm's Eva holds those: the Perception Encoder, rope='pe')")
    plain = dict(
        shared, class_token=cfg.class_token,
        fc_norm=cfg.final_norm == "pooled", final_norm=cfg.final_norm != "none", dynamic_img_size=cfg.dynamic_img_size,
        reg_tokens=cfg.reg_tokens, pre_norm=cfg.pre_norm,
        # timm's names are vitkit's ("gelu", "quick_gelu", "gelu_tanh"); SwiGLU's gate is SiLU, in an MLP
        # layer (SwiGLUPacked) that only the architecture can name: TIMM_ARCHITECTURE
        act_layer="silu" if cfg.mlp_act == "swiglu" else cfg.mlp_act,
        no_embed_class=no_embed_class,  # vitkit's table holds the prefix tokens' positions: zero, left out
    )
    if not abs_pos:  # only then: older timm versions may not take the argument
        plain["pos_embed"] = "none"
    if cfg.mlp_norm:  # the same LayerNorm before fc2, under the same name (mlp.norm)
        plain["scale_mlp_norm"] = True
    if cfg.attn_norm:  # ... and before the attention's projection (attn.norm)
        plain["scale_attn_norm"] = True
    return plain


def _positionless_prefix(state: dict, cfg: ViTConfig, out: str, bare: bool) -> bool:
    """Whether to write a VisionTransformer's position table without its prefix tokens' rows, as timm's
    ``no_embed_class=True`` (DeiT-III, DINOv2 with registers, big_vision's class token) holds it: where those
    rows are all zero (a table read from such a file, untrained since), which is the same network, and the
    file then loads strictly into the architecture it came from. A bare file, which cannot say so, only
    where its reader (``patch_positions``) would tell it from the table's length."""
    pos = state.get("pos_embed")
    if (pos is None or not cfg.num_prefix_tokens or cfg.rope != "none" or cfg.rel_pos_bias
            or pos[:, :cfg.num_prefix_tokens].any()):
        return False
    if bare:
        trimmed = dict(state, pos_embed=pos[:, cfg.num_prefix_tokens:])
        return patch_positions(Foreign(out, trimmed)) == cfg.num_patches
    return True


def export(model: nn.Module, out: Path) -> Path:
    """A ``.safetensors``/``.pth`` state dict file, or a timm hub directory.

    The directory (``config.json`` + ``model.safetensors``) opens with
    ``timm.create_model("local-dir:OUT", pretrained=True)``; a file loads strictly into
    ``timm.create_model(..., **model_args(cfg)).load_state_dict``.
    """
    from safetensors.torch import save, save_file

    cfg = model.cfg
    state = state_from_vitkit({k: v.detach().cpu() for k, v in model.state_dict().items()}, cfg)
    bare = out.suffix in (".pth", ".pt", ".bin", ".safetensors")
    no_embed_class = _positionless_prefix(state, cfg, str(out), bare)
    if no_embed_class:
        state["pos_embed"] = state["pos_embed"][:, cfg.num_prefix_tokens:].contiguous()
    args = model_args(cfg, abs_pos="pos_embed" in state, no_embed_class=no_embed_class)
    read_back = implied_pool(state, cfg.rope)
    if bare and read_back != cfg.pool:
        # the final norm is told by the tensors (fc_norm, norm, neither); the pooling is not
        warnings.warn(
            f"timm export: {out}: a bare state dict does not hold the pooling, and this one would be read back "
            f"(by vitkit, as timm's default for these tensors) as pool={read_back!r}, while the "
            f"model has pool={cfg.pool!r} (final_norm={cfg.final_norm!r}): export a hub dir (OUT without a suffix) "
            f"to keep it, or pass the pooling when loading: vitkit.convert.load(..., pool={cfg.pool!r}), "
            f"timm.create_model(..., global_pool={args['global_pool']!r})",
            stacklevel=3,
        )
    if out.suffix in (".pth", ".pt", ".bin"):
        with atomic_file(out) as f:
            torch.save(state, f)
        return out
    if out.suffix == ".safetensors":
        with atomic_file(out) as f:
            f.write(save(state, metadata={"format": "pt"}))
        return out
    preprocess = getattr(model, "preprocess", None) or {}
    hub_config = {
        # timm resolves the architecture name (its class: VisionTransformer, or DeiT's distilled one),
        # then model_args override all of its fields.
        "architecture": TIMM_ARCHITECTURE[architecture_key(cfg)][0],
        "num_classes": cfg.num_classes,
        "num_features": cfg.emb_size,
        "global_pool": args["global_pool"],
        "model_args": args,
        "pretrained_cfg": {
            "input_size": [cfg.in_channels, *cfg.img_size],
            "fixed_input_size": not cfg.dynamic_img_size,
            "interpolation": preprocess.get("interpolation", "bicubic"),
            "crop_pct": preprocess.get("crop_pct", 0.875),
            "crop_mode": crop_mode(preprocess) if preprocess else "center",
            "mean": list(preprocess.get("mean", (0.485, 0.456, 0.406))),
            "std": list(preprocess.get("std", (0.229, 0.224, 0.225))),
            "num_classes": cfg.num_classes,
            "first_conv": "patch_embed.proj",
            "classifier": ["head", "head_dist"] if cfg.dist_token else "head",
        },
    }
    class_names = getattr(model, "class_names", None)
    if class_names:
        hub_config["label_names"] = list(class_names)
    with atomic_directory(out) as tmp:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hub_config, indent=2) + "\n")
    return out
