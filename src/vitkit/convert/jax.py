"""Google JAX/Flax ViT ``.npz`` checkpoints: both published layouts in, ``vision_transformer`` out.

Two layouts share Flax's naming (``kernel``/``scale``, ``/`` as separator):

* ``vision_transformer`` (github.com/google-research/vision_transformer, the original
  paper and AugReg checkpoints): ``Transformer/posembed_input/pos_embedding`` holds the
  class position too; block parts are ``LayerNorm_0``, ``MultiHeadDotProductAttention_1``,
  ``LayerNorm_2``, ``MlpBlock_3``.
* ``big_vision`` (``params/`` prefix): ``pos_embedding`` at the top, added to the patch
  tokens *before* the class token is prepended, so the class token has no position
  (vitkit stores a zero there); parts are ``..._0``, ``LayerNorm_1``, ``MlpBlock_0``;
  a scanned encoder stacks all blocks in ``Transformer/encoderblock/`` on a leading axis.

The layout is told apart exactly as timm's ``_load_weights`` (the oracle) does: by the
``params/`` prefix / where the positions live. Flax kernels: conv (p, p, C, E), Dense
(in, out), attention q/k/v (E, h, d) and out (h, d, E); the heads ARE stored.
Flax's ``nn.gelu`` defaults to the tanh approximation, vitkit (like timm, which loads
these files the same way) uses exact GELU: logits differ from JAX's by ~1e-3.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..checkpoint import CheckpointError, atomic_file
from ..config import ViTConfig
from . import (
    IDENTITY,
    TRANSPOSE,
    Foreign,
    KeyMap,
    Transform,
    config_with,
    count_blocks,
    mlp_ratio_of,
    require,
    rule,
    square_grid,
    warn_norm_eps,
)

NORM_EPS = 1e-6  # Flax LayerNorm's default epsilon, which Google's ViTs (and timm's npz loader) run with

# --- transforms between Flax and PyTorch layouts ---------------------------------------------
# Conv kernel (p, p, C, E) <-> Conv2d weight (E, C, p, p).
CONV = Transform("conv_hwio", lambda ts, cfg: ts[0].permute(3, 2, 0, 1), lambda t, cfg: [t.permute(2, 3, 1, 0)])


def _qkv_kernel_in(ts: list[Tensor], cfg: ViTConfig) -> Tensor:
    # each (E, h, d) -> (E, h*d) -> transposed to a Linear's (h*d, E); stacked q, k, v -> (3E, E)
    return torch.cat([t.reshape(t.shape[0], -1).T for t in ts], dim=0)


def _qkv_kernel_out(t: Tensor, cfg: ViTConfig) -> list[Tensor]:
    # (3E, E) -> three (E_out, E_in) -> each transposed and split per head: (E, h, d)
    return [w.T.reshape(cfg.emb_size, cfg.num_heads, cfg.head_dim) for w in t.chunk(3, dim=0)]


QKV_KERNEL = Transform("jax_qkv_kernel", _qkv_kernel_in, _qkv_kernel_out)
# q/k/v biases (h, d) each <-> (3E,)
QKV_BIAS = Transform(
    "jax_qkv_bias",
    lambda ts, cfg: torch.cat([t.reshape(-1) for t in ts]),
    lambda t, cfg: [b.reshape(cfg.num_heads, cfg.head_dim) for b in t.chunk(3)],
)
# out kernel (h, d, E) -> (h*d, E) -> Linear weight (E, h*d)
OUT_KERNEL = Transform(
    "jax_out_kernel",
    lambda ts, cfg: ts[0].reshape(-1, ts[0].shape[-1]).T,
    lambda t, cfg: [t.T.reshape(cfg.num_heads, cfg.head_dim, cfg.emb_size)],
)
# big_vision positions cover the patches only: the class token gets position zero.
PATCH_POSITIONS = Transform(
    "positions_without_prefix",
    lambda ts, cfg: torch.cat([ts[0].new_zeros(1, cfg.num_prefix_tokens, ts[0].shape[-1]), ts[0]], dim=1),
    lambda t, cfg: [t[:, cfg.num_prefix_tokens:]],
)


def _key_map(layout: str, positions: str, position_transform: Transform, mha: str, ln2: str, mlp: str) -> KeyMap:
    """The two layouts differ only in these names (timm's ``_load_weights`` has the same switch)."""
    blk = "Transformer/encoderblock_{i}"
    att = f"{blk}/{mha}"
    return KeyMap(
        f"jax ({layout})",
        [
            rule("patch_embed.projection.weight", "embedding/kernel", CONV),
            rule("patch_embed.projection.bias", "embedding/bias"),
            rule("patch_embed.cls_token", "cls"),
            rule("patch_embed.positions", positions, position_transform),
            rule("encoder.blocks.{i}.norm1.weight", f"{blk}/LayerNorm_0/scale"),
            rule("encoder.blocks.{i}.norm1.bias", f"{blk}/LayerNorm_0/bias"),
            rule("encoder.blocks.{i}.attn.qkv.weight", tuple(f"{att}/{n}/kernel" for n in ("query", "key", "value")),
                 QKV_KERNEL),
            rule("encoder.blocks.{i}.attn.qkv.bias", tuple(f"{att}/{n}/bias" for n in ("query", "key", "value")),
                 QKV_BIAS),
            rule("encoder.blocks.{i}.attn.projection.weight", f"{att}/out/kernel", OUT_KERNEL),
            rule("encoder.blocks.{i}.attn.projection.bias", f"{att}/out/bias"),
            rule("encoder.blocks.{i}.norm2.weight", f"{blk}/{ln2}/scale"),
            rule("encoder.blocks.{i}.norm2.bias", f"{blk}/{ln2}/bias"),
            rule("encoder.blocks.{i}.mlp.fc1.weight", f"{blk}/{mlp}/Dense_0/kernel", TRANSPOSE),
            rule("encoder.blocks.{i}.mlp.fc1.bias", f"{blk}/{mlp}/Dense_0/bias"),
            rule("encoder.blocks.{i}.mlp.fc2.weight", f"{blk}/{mlp}/Dense_1/kernel", TRANSPOSE),
            rule("encoder.blocks.{i}.mlp.fc2.bias", f"{blk}/{mlp}/Dense_1/bias"),
            rule("encoder.norm.weight", "Transformer/encoder_norm/scale"),
            rule("encoder.norm.bias", "Transformer/encoder_norm/bias"),
            rule("head.fc.weight", "head/kernel", TRANSPOSE),
            rule("head.fc.bias", "head/bias"),
        ],
    )


KEYS = {
    "vision_transformer": _key_map(
        "vision_transformer", "Transformer/posembed_input/pos_embedding", IDENTITY,
        mha="MultiHeadDotProductAttention_1", ln2="LayerNorm_2", mlp="MlpBlock_3",
    ),
    "big_vision": _key_map(
        "big_vision", "pos_embedding", PATCH_POSITIONS,
        mha="MultiHeadDotProductAttention_0", ln2="LayerNorm_1", mlp="MlpBlock_0",
    ),
}
PREFIXES = ("opt/target/", "params/img/", "params/")  # training-state and big_vision wrappers, as timm strips them
SCANNED = "Transformer/encoderblock/"


def read(path: Path) -> Foreign:
    if not path.is_file():
        what = "a directory" if path.is_dir() else "not found"
        raise CheckpointError(f"{path}: {what}; a JAX checkpoint is one .npz file")
    try:
        # allow_pickle=False: an .npz holds plain arrays; never unpickle objects from it.
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError(f"a single {type(loaded).__name__}, not an archive of named arrays")
        with loaded as npz:
            pickles = [n for n in npz.files if n.endswith("data.pkl")]
            arrays = {} if pickles else {k: np.asarray(npz[k]) for k in npz.files}
    except (ValueError, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable .npz of arrays ({e})") from e
    if pickles:  # np.load opens any zip archive, and torch.save writes one
        raise CheckpointError(f"{path}: not a JAX .npz: expected an archive of .npy arrays, found a PyTorch "
                              f"checkpoint (torch.save's zip, with {pickles[0]!r}); read it as --from timm or "
                              "--from torchvision")
    other = sorted(k for k, v in arrays.items() if v.dtype.kind not in "biuf")  # a zip's raw members: bytes
    if other:
        raise CheckpointError(f"{path}: not a JAX .npz: expected numeric arrays, found {len(other)} entries of "
                              f"other data ({', '.join(repr(k) for k in other[:3])}{', ...' if len(other) > 3 else ''})")
    prefix = next((p for p in PREFIXES if any(k.startswith(p + "embedding/") for k in arrays)), "")
    state = {k[len(prefix):]: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()
             if k.startswith(prefix)}
    layout = "big_vision" if prefix.startswith("params/") or "pos_embedding" in state else "vision_transformer"
    if layout == "big_vision":
        state = _unscan(state)
        state = _fold_class_position(state, path)
    foreign = Foreign(str(path), state, layout=layout)
    # Google's ViTs are trained on inputs scaled to [-1, 1].
    foreign.preprocess = dict(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], interpolation="bilinear", crop_pct=0.875,
                              crop_mode="center")
    return foreign


def _unscan(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A scanned encoder (all blocks stacked on axis 0) -> one ``encoderblock_{i}`` per block."""
    out = {}
    for k, v in state.items():
        if k.startswith(SCANNED):
            for i, block in enumerate(v.unbind(0)):
                out[f"Transformer/encoderblock_{i}/{k[len(SCANNED):]}"] = block.clone()
        else:
            out[k] = v
    return out


def _fold_class_position(state: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """big_vision's ``fix_old_checkpoints``: an old table with a class position (1 + g*g entries)
    is split, the class entry added into ``cls``, as big_vision itself does on load."""
    pe = state.get("pos_embedding")
    if pe is None or "cls" not in state:
        return state
    n = pe.shape[1]
    if round((n - 1) ** 0.5) ** 2 == n - 1 and round(n**0.5) ** 2 != n:
        state = dict(state, cls=state["cls"] + pe[:, :1], pos_embedding=pe[:, 1:].clone())
    return state


def infer_config(foreign: Foreign, base: dict) -> ViTConfig:
    s, src = foreign.state, foreign.path
    kernel = require(s, "embedding/kernel", src, "jax")  # (p, p, C, E)
    patch, in_channels, width = kernel.shape[0], kernel.shape[2], kernel.shape[3]
    keys = KEYS[foreign.layout]
    query = keys.foreign_names("encoder.blocks.0.attn.qkv.weight")[1][0]  # the layout's block-0 query kernel
    dense0 = keys.foreign_names("encoder.blocks.0.mlp.fc1.weight")[1][0]
    positions = keys.foreign_names("patch_embed.positions")[1][0]
    num_heads = require(s, query, src, "jax").shape[1]  # query kernel (E, h, d)
    class_token = "cls" in s
    num_positions = require(s, positions, src, "jax").shape[1]
    num_patches = num_positions - (class_token if foreign.layout == "vision_transformer" else 0)
    if "MAPHead_0/probe" in s or "pre_logits/kernel" in s:
        raise CheckpointError(f"{src}: attention-pooling (MAPHead) and pre_logits heads are not supported by vitkit")
    return config_with(
        base,
        src,
        img_size=tuple(g * patch for g in square_grid(num_patches, src)),
        patch_size=patch,
        in_channels=in_channels,
        emb_size=width,
        depth=count_blocks(s, r"Transformer/encoderblock_(\d+)/"),
        num_heads=num_heads,
        mlp_ratio=mlp_ratio_of(require(s, dense0, src, "jax").shape[1], width, src),
        qkv_bias=query.replace("/kernel", "/bias") in s,
        class_token=class_token,
        # Google's "token" classifier reads the class token; without one it is "gap" (mean of all tokens).
        pool="cls" if class_token else "mean",
        final_norm="tokens" if "Transformer/encoder_norm/scale" in s else "none",
        norm_eps=NORM_EPS,
        num_classes=s["head/kernel"].shape[1] if "head/kernel" in s else 0,
    )


def to_vitkit(foreign: Foreign, cfg: ViTConfig) -> dict:
    return KEYS[foreign.layout].to_vitkit(foreign.state, cfg, foreign.path)


def export(model: nn.Module, out: Path) -> Path:
    """An ``.npz`` in the ``vision_transformer`` layout (what timm's ``load_pretrained`` reads)."""
    cfg: ViTConfig = model.cfg
    if cfg.pool not in ("cls", "mean"):
        raise ValueError(f"jax export: the vision_transformer layout's classifier reads the class token or the "
                         f"patch tokens' mean (pool='cls' or 'mean'); this model has pool={cfg.pool!r}")
    if cfg.img_size[0] != cfg.img_size[1]:
        # an .npz holds no image size: its readers (vitkit's, big_vision's) take the positions for a square grid
        raise ValueError(f"jax export: an .npz holds no image size, and its position table is read as a square "
                         f"grid; this model is {cfg.img_size[0]}x{cfg.img_size[1]}: export to timm, hf or vitkit, "
                         "or load it at a square size first (img_size=S)")
    if cfg.pool == "mean" and cfg.class_token:
        # Google's classifier is "token" (the class token) or, in a model without one, "gap"; an .npz does
        # not say which, and readers (vitkit's, timm's) tell them apart by the class token alone
        raise ValueError("jax export: the vision_transformer layout has no classifier on the patch tokens' mean "
                         "beside a class token (a file with a class token is read as pool='cls'); this model has "
                         "class_token=True and pool='mean': export to timm, hf or vitkit instead")
    if cfg.final_norm == "pooled":
        raise ValueError(
            "jax export: the vision_transformer layout has no norm after pooling (final_norm='pooled'); "
            "only final_norm='tokens' or 'none' models can be written"
        )
    if not re.fullmatch(r".+\.npz", out.name):
        raise ValueError(f"jax export: {out}: the output must be a .npz file")
    warn_norm_eps("jax", cfg.norm_eps, NORM_EPS, f"the reader is told (vitkit.convert.load(..., norm_eps="
                  f"{cfg.norm_eps}); timm: norm_layer=functools.partial(torch.nn.LayerNorm, eps={cfg.norm_eps}))")
    keys = KEYS["vision_transformer"]
    state = keys.from_vitkit({k: v.detach().cpu() for k, v in model.state_dict().items()}, cfg)
    if not cfg.qkv_bias:  # Google's attention always has q, k, v biases (timm's loader reads them): zeros, the same
        for i in range(cfg.depth):
            for name in keys.foreign_names(f"encoder.blocks.{i}.attn.qkv.bias")[1]:
                state[name] = torch.zeros(cfg.num_heads, cfg.head_dim)
    arrays = {k: v.float().numpy() for k, v in state.items()}
    with atomic_file(out) as f:
        np.savez(f, **arrays)
    return out
