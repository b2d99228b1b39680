"""Weights that move both ways between vitkit and timm, Hugging Face, torchvision and JAX.

Each foreign format is one module with ONE explicit key map: a table of rules
``(vitkit key pattern, foreign key pattern(s), transform)``. The same table is read
left-to-right to import and right-to-left to export, so the two directions cannot drift
apart. A transform is a named pair of functions (e.g. split/concat q, k, v; transpose a
Dense kernel) that turns the foreign tensor(s) into the vitkit tensor and back.

The user names the source format; it is never guessed from the keys. The architecture
(a ViTConfig) is read from the checkpoint: tensor shapes, plus the file's own config
where it has one (Hugging Face config.json, timm's hub config.json). Heads cannot be read
from the shapes of timm or torchvision weights: they come from ``model=NAME``,
``num_heads=N``, the file's config, or the published convention heads = width / 64.

    model = vitkit.convert.load("vit.safetensors", "timm", img_size=384)
    vitkit.convert.export(model, "hf_dir", "hf")
"""

from __future__ import annotations

import importlib
import math
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoint import (
    CheckpointError,
    build_with_state,
    check_state_dict,
    default_preprocess,
    load_pretrained,
    named_preprocess,
    preprocess_for_channels,
    save_pretrained,
)
from ..config import MIXED_NORMALISATION, POOLING_FIELDS, ViTConfig, get_config

IMPORT_FORMATS = ("vitkit", "timm", "hf", "torchvision", "jax")
EXPORT_FORMATS = ("vitkit", "timm", "hf", "torchvision", "jax")
# ViTConfig fields beyond the plain ViT -> (what they are, with {value} the model's, the foreign
# formats that hold them)
BEYOND_PLAIN_VIT = {
    "dist_token": ("DeiT's distillation token (dist_token=True)", ("timm", "hf")),
    "reg_tokens": ("register tokens (reg_tokens > 0)", ("timm", "hf")),
    "layer_scale": ("LayerScale (layer_scale > 0)", ("timm", "hf")),
    "pre_norm": ("CLIP's pre-norm (pre_norm=True)", ("timm", "hf")),
    "mlp_act": ("an MLP activation other than exact GELU (mlp_act={value!r})", ("timm", "hf")),
    "rel_pos_bias": ("BEiT's relative position bias (rel_pos_bias=True)", ("timm", "hf")),
    "rope": ("rotary positions (rope={value!r})", ("timm", "hf")),
    "abs_pos": ("no absolute positions (abs_pos=False)", ("timm", "hf")),
    "mlp_norm": ("EVA-02's LayerNorm before fc2 (mlp_norm=True)", ("timm",)),
    "attn_norm": ("EVA-02 CLIP's LayerNorm before the attention's projection (attn_norm=True)", ("timm",)),
    "pool_heads": ("attention pooling with heads of its own (pool_heads={value})", ("timm",)),
    "pool_mlp_ratio": ("attention pooling with an MLP of its own width (pool_mlp_ratio={value})", ("timm",)),
}
# Architecture fields no checkpoint shape reveals; as overrides they describe the SOURCE
# (how to read its weights), not a change applied after loading.
SOURCE_FIELDS = ("num_heads", "pool", "norm_eps", "mlp_act", "pool_prefix")


# --- transforms -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Transform:
    """How one vitkit tensor is made from its foreign tensor(s), and split back."""

    name: str
    to_vitkit: Callable[[list[Tensor], ViTConfig], Tensor]
    from_vitkit: Callable[[Tensor, ViTConfig], list[Tensor]]


IDENTITY = Transform("identity", lambda ts, cfg: ts[0], lambda t, cfg: [t])
# A Linear weight is (out, in); a JAX Dense kernel is (in, out).
TRANSPOSE = Transform("transpose", lambda ts, cfg: ts[0].T, lambda t, cfg: [t.T])
# Separate q, k, v projections (Hugging Face) <-> vitkit's fused one, laid out (qkv, h, d) on dim 0.
CONCAT_QKV = Transform("concat_qkv", lambda ts, cfg: torch.cat(ts, dim=0), lambda t, cfg: list(t.chunk(3, dim=0)))


@dataclass(frozen=True)
class Rule:
    """``vitkit`` and ``foreign`` are key patterns; ``{i}`` is a block index, ``{p}`` weight|bias."""

    vitkit: str
    foreign: tuple[str, ...]
    transform: Transform = IDENTITY


def rule(vitkit: str, foreign: str | tuple[str, ...], transform: Transform = IDENTITY) -> Rule:
    return Rule(vitkit, (foreign,) if isinstance(foreign, str) else tuple(foreign), transform)


def _pattern(template: str) -> re.Pattern:
    regex = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(regex)


def meta_state(cfg: ViTConfig) -> dict[str, Tensor]:
    """The state dict of a ViT of ``cfg`` on the meta device: names and shapes, no memory."""
    from ..model import ViT

    with torch.device("meta"):
        return ViT(cfg).state_dict()


class KeyMap:
    """One format's table of rules, usable in both directions.

    ``ignore``: regexes of foreign keys that carry nothing vitkit uses (e.g. Hugging Face's
    pooler); they are dropped on import with a warning naming them.
    """

    def __init__(self, fmt: str, rules: list[Rule], ignore: tuple[str, ...] = ()):
        self.fmt = fmt
        self.rules = rules
        self._compiled = [(r, _pattern(r.vitkit)) for r in rules]
        self.ignore = tuple(re.compile(p) for p in ignore)

    def foreign_names(self, vitkit_key: str) -> tuple[Rule, list[str]]:
        for r, regex in self._compiled:
            m = regex.fullmatch(vitkit_key)
            if m:
                return r, [f.format(**m.groupdict()) for f in r.foreign]
        # Only reachable if vitkit grows a parameter this table does not know yet.
        raise CheckpointError(f"{self.fmt} key map: no rule for the vitkit key {vitkit_key!r}")

    def from_vitkit(self, state: dict[str, Tensor], cfg: ViTConfig) -> dict[str, Tensor]:
        """vitkit state dict -> this format's state dict."""
        out: dict[str, Tensor] = {}
        for key, tensor in state.items():
            r, names = self.foreign_names(key)
            for name, t in zip(names, r.transform.from_vitkit(tensor, cfg), strict=True):
                out[name] = t if t.device.type == "meta" else t.contiguous()
        return out

    def to_vitkit(self, foreign: dict[str, Tensor], cfg: ViTConfig, source: str) -> dict[str, Tensor]:
        """This format's state dict -> vitkit state dict for ``cfg``, every tensor shape-checked.

        The foreign names are checked first, so a bad file is reported in its own terms
        (missing / unexpected / wrongly shaped keys under the names the file uses).
        """
        dropped = sorted(k for k in foreign if any(p.fullmatch(k) for p in self.ignore))
        if dropped:
            warnings.warn(f"{source}: dropped {len(dropped)} tensor(s) vitkit does not use: {dropped}", stacklevel=3)
        foreign = {k: v for k, v in foreign.items() if k not in dropped}
        target = meta_state(cfg)
        expected = {k: v.shape for k, v in self.from_vitkit(target, cfg).items()}
        check_state_dict(expected, foreign, f"{source} ({self.fmt} layout)")
        out = {}
        for key in target:
            r, names = self.foreign_names(key)
            out[key] = r.transform.to_vitkit([foreign[n] for n in names], cfg)
        check_state_dict({k: v.shape for k, v in target.items()}, out, f"{source} (converted to vitkit)")
        return out


# --- what a reader hands back ---------------------------------------------------------------
@dataclass
class Foreign:
    """A foreign checkpoint as read from disk: its tensors and whatever its own config says."""

    path: str
    state: dict[str, Tensor]
    config: dict = field(default_factory=dict)  # the file's own config (HF config.json...), if any
    preprocess: dict | None = None
    class_names: list[str] | None = None
    layout: str = ""  # a sub-layout within the format (JAX: "vision_transformer" or "big_vision")


# --- helpers the format modules share -------------------------------------------------------
def require(state: dict[str, Tensor], key: str, source: str, fmt: str) -> Tensor:
    if key not in state:
        some = sorted(state)[:8]
        raise CheckpointError(
            f"{source}: no tensor {key!r}, which every {fmt} ViT checkpoint has; is this really a {fmt} "
            f"checkpoint? (first keys: {some})"
        )
    return state[key]


def count_blocks(state: dict[str, Tensor], prefix_regex: str) -> int:
    """Number of blocks, from keys like ``blocks.11.norm1.weight`` (``prefix_regex`` captures the index)."""
    found = {int(m.group(1)) for k in state if (m := re.match(prefix_regex, k))}
    return max(found) + 1 if found else 0


def square_grid(num_patches: int, source: str) -> tuple[int, int]:
    """(g, g) for a position table of g*g patches; foreign files do not store the grid's aspect."""
    g = round(num_patches**0.5)
    if g * g != num_patches:
        raise CheckpointError(
            f"{source}: the position table has {num_patches} patch positions, not a square grid; "
            "non-square foreign checkpoints are not supported (load at a square size, then pass img_size)"
        )
    return (g, g)


def mlp_ratio_of(hidden: int, width: int, source: str) -> float:
    ratio = hidden / width
    if int(width * ratio) != hidden:
        raise CheckpointError(f"{source}: MLP width {hidden} is not representable as mlp_ratio * {width}")
    return ratio


def resolve_heads(width: int, base: dict, source: str, by_width: dict[int, int] | None = None,
                  family: str = "") -> int:
    """Heads from the caller (model name / num_heads), the format's own models of this width
    (``by_width``, ``family``'s), or the published convention: head width 64."""
    if "num_heads" in base:
        return int(base["num_heads"])
    if by_width and width in by_width:
        heads = by_width[width]
        warnings.warn(
            f"{source}: heads are not stored in this format; assuming {family}'s own ViTs' {heads} heads at "
            f"width {width}. Pass model=NAME or num_heads=N if the model differs.",
            stacklevel=4,
        )
        return heads
    if width % 64:
        raise CheckpointError(
            f"{source}: the number of attention heads is not stored in this format and width {width} is not "
            "a multiple of 64 (the usual head width); pass model=NAME or num_heads=N (CLI: --model/--num-heads)"
        )
    heads = width // 64
    warnings.warn(
        f"{source}: heads are not stored in this format; assuming the published convention "
        f"heads = width / 64 = {heads}. Pass model=NAME or num_heads=N if the model differs.",
        stacklevel=4,
    )
    return heads


def warn_norm_eps(fmt: str, norm_eps: float, theirs: float, unless: str) -> None:
    """Every exporter's one wording for a format whose models fix LayerNorm's eps (``theirs``) where the
    model has another: written all the same, with a warning of how the reader can be told (``unless``)."""
    if norm_eps != theirs:
        warnings.warn(f"{fmt} export: the model's LayerNorm eps is {norm_eps}, {fmt}'s uses {theirs}; outputs will "
                      f"differ slightly unless {unless}", stacklevel=4)


def crop_share(*sides: tuple[int, int]) -> float:
    """The crop_pct for which timm's floor(crop / crop_pct) is each ``(crop, resized)`` side's resized size
    where one share fits them all: the least crop / resized, nudged down where the float division would
    fall one short (232 and 224: 224 / (224 / 232) = 231.99...)."""
    pct = min(crop / size for crop, size in sides)
    while any(math.floor(crop / pct) < size for crop, size in sides):
        pct = math.nextafter(pct, 0.0)
    return pct


def base_fields(model: str | None, overrides: dict) -> dict:
    """Source fields no shape reveals: from a variant name (``model``) and SOURCE_FIELDS overrides.

    Pops those overrides out of ``overrides``; what remains is applied after loading.
    """
    base: dict = {}
    if model is not None:
        base["num_heads"] = get_config(model).num_heads
        base["_model"] = model
    for name in SOURCE_FIELDS:
        if name in overrides:
            base[name] = overrides.pop(name)
    return base


def config_with(base: dict, source: str, **fields) -> ViTConfig:
    """A ViTConfig from shape-read ``fields``, with the caller's source fields taking priority.

    If a variant name was given (``model=NAME``), its width and patch must be the file's.
    """
    name = base.get("_model")
    if name is not None:
        named = get_config(name)
        diffs = [
            f"{f}: {name} has {getattr(named, f)}, the checkpoint has {fields[f]}"
            for f in ("emb_size", "patch_size")
            if getattr(named, f) != fields[f]
        ]
        if diffs:
            raise CheckpointError(f"{source}: the weights are not a {name}: " + "; ".join(diffs))
    fields.update({k: v for k, v in base.items() if not k.startswith("_")})
    if fields.get("pool", "map") != "map":  # attention pooling's own fields go with it (a pool override)
        fields.update({k: v for k, v in POOLING_FIELDS.items() if k not in base})
    try:
        return ViTConfig(**fields)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from e


# --- the public API ---------------------------------------------------------------------------
def _format_module(fmt: str, allowed: tuple[str, ...], direction: str):
    if fmt not in allowed:
        raise ValueError(f"{direction} format: expected one of {', '.join(allowed)}, got {fmt!r}")
    return importlib.import_module(f"{__name__}.{fmt}")


def load(
    path: str | os.PathLike,
    fmt: str,
    model: str | None = None,
    img_size: int | tuple[int, int] | None = None,
    num_classes: int | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    preprocess: dict | None = None,
    **overrides,
):
    """Load a ``fmt`` checkpoint ("vitkit", "timm", "hf", "torchvision", "jax") as a vitkit ViT.

    ``model``: a vitkit variant name whose head count to use (timm/torchvision files do not
    store it). ``num_heads``, ``pool``, ``norm_eps`` overrides also describe the source.
    ``img_size`` resamples the positions, ``num_classes`` re-initialises the classifier,
    other overrides (``dynamic_img_size=True``, dropouts) apply to the loaded model.
    ``mean``/``std``: the input normalisation the weights were trained with, where the file does
    not say it or says it wrongly (one value per channel, or one for all). A file that does not say
    is read with ``model``'s (timm's pretrained_cfg for the name), else ImageNet's, with a warning.
    ``preprocess``: any of ``interpolation``, ``crop_pct`` and ``crop_mode`` (and mean/std) likewise, for a
    file whose resizing is not what its format's convention says (torchvision's SWAG weights at 224).
    """
    vit, unknown_normalisation = _load(path, fmt, model, img_size, num_classes, **overrides)
    given = {k: [float(x) for x in v] for k, v in (("mean", mean), ("std", std)) if v is not None}
    given.update({k: v for k, v in (preprocess or {}).items() if v is not None})
    from ..images import check_preprocess, crop_mode

    unknown = set(given) - {"mean", "std", "interpolation", "crop_pct", "crop_mode"}
    if unknown:
        raise ValueError(f"preprocess: expected mean, std, interpolation, crop_pct or crop_mode; got {sorted(unknown)}")
    # the mode first, as the file has it: a new crop_pct alone changes the share, not the mode (a file written
    # before crop_mode implies it from its crop_pct)
    read_as = {**vit.preprocess, "crop_mode": crop_mode(vit.preprocess), **given}
    flags = "/".join(f"--{k.replace('_', '-')}" for k in given)
    check_preprocess(read_as, vit.cfg.in_channels, f"{path}" + (f" with {flags}" if flags else ""))
    vit.preprocess = read_as
    if unknown_normalisation and not {"mean", "std"} & set(given):  # the file did not say, and the guess may be wrong
        warnings.warn(f"{path}: holds no input normalisation; {unknown_normalisation}", stacklevel=2)
    return vit


def _load(path, fmt: str, model: str | None, img_size, num_classes: int | None, **overrides) -> tuple[nn.Module, str]:
    """``load`` but the normalisation: the model, and which mean/std are assumed and why they are a guess (or "")."""
    if fmt == "vitkit":
        return load_pretrained(path, img_size=img_size, num_classes=num_classes, **overrides), ""
    module = _format_module(fmt, IMPORT_FORMATS, "source")
    source = str(path)
    foreign: Foreign = module.read(Path(path))
    base = base_fields(model, overrides)
    cfg: ViTConfig = module.infer_config(foreign, base)
    state = module.to_vitkit(foreign, cfg)
    vit = build_with_state(cfg, state, source, img_size=img_size, num_classes=num_classes, **overrides)
    # What the file says about its inputs (mean/std, resizing), at the size the model now has; statistics
    # for another channel count (a 3-channel processor config beside a 1-channel model) averaged, as
    # load_pretrained does for adapted channels. A file that says nothing is read as timm reads the variant
    # the user named: with its weights' own.
    pre = foreign.preprocess
    fits = bool(pre) and "mean" in pre and "std" in pre
    if fits:
        pre = preprocess_for_channels(pre, vit.cfg.in_channels)
    named = None if fits else named_preprocess(vit.cfg, model)
    vit.preprocess = dict(pre) if fits else named or default_preprocess(vit.cfg)
    vit.preprocess["img_size"] = list(vit.cfg.img_size)
    changed_head = num_classes is not None and num_classes != cfg.num_classes
    vit.class_names = None if changed_head else foreign.class_names
    if fits or named and model not in MIXED_NORMALISATION:
        return vit, ""
    if named:  # timm's weights under this name differ by tag: the default's are a guess too
        return vit, (f"{model}'s default weights' mean/std in timm are assumed ({named['mean']}, {named['std']}); "
                     f"{MIXED_NORMALISATION[model]}: pass --mean/--std if yours are those")
    unknown = getattr(module, "UNKNOWN_NORMALISATION", "")
    return vit, unknown and f"ImageNet's mean/std are assumed. {unknown}"


def export(model, out: str | os.PathLike, fmt: str) -> Path:
    """Write a vitkit ViT in ``fmt`` ("vitkit", "timm", "hf", "torchvision", "jax"), atomically."""
    model = getattr(model, "_orig_mod", model)
    if fmt == "vitkit":
        return save_pretrained(model, out)
    module = _format_module(fmt, EXPORT_FORMATS, "target")
    if model.cfg.stem != "patch":
        raise ValueError(f"target format {fmt}: this model has a convolutional stem (stem={model.cfg.stem!r}), "
                         f"which a {fmt} ViT cannot hold; save it in vitkit's format instead")
    plain = ViTConfig()
    for part, (describe, formats) in BEYOND_PLAIN_VIT.items():
        if getattr(model.cfg, part) != getattr(plain, part) and fmt not in formats:
            raise ValueError(f"target format {fmt}: this model has {describe.format(value=getattr(model.cfg, part))}, "
                             f"which a {fmt} ViT cannot hold; "
                             f"save it in {' or '.join(('vitkit', *formats))} format instead")
    return module.export(model, Path(out))


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    src_fmt: str,
    dst_fmt: str = "vitkit",
    model: str | None = None,
    img_size: int | tuple[int, int] | None = None,
    num_classes: int | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    preprocess: dict | None = None,
    **overrides,
) -> Path:
    """``load(src, src_fmt, ...)`` then ``export(..., out, dst_fmt)``: what ``vitkit convert`` runs."""
    vit = load(src, src_fmt, model=model, img_size=img_size, num_classes=num_classes, mean=mean, std=std,
               preprocess=preprocess, **overrides)
    return export(vit, out, dst_fmt)


__all__ = ["load", "export", "convert", "KeyMap", "Rule", "Transform", "Foreign", "IMPORT_FORMATS", "EXPORT_FORMATS"]
