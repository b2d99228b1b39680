"""ViTConfig, the one description of a model, and the variant table that names them.

Every checkpoint vitkit writes carries its ViTConfig (as ``config.json``), so loading
never has to guess an architecture from tensor shapes.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import math
import numbers
from dataclasses import dataclass

POOLS = ("cls", "mean", "map", "cls_mean")
STEMS = ("patch", "conv")
FINAL_NORMS = ("tokens", "pooled", "none")
MLP_ACTS = ("gelu", "quick_gelu", "gelu_tanh", "swiglu")
ROPES = ("none", "dinov3", "eva02", "pe")
# the rotations of patch indices scaled to a reference grid (timm's RotaryEmbeddingCat): the ones that take
# rope_ref_grid and rope_grid_offset
GRID_ROPES = ("eva02", "pe")


def pooled_width(pool: str, emb_size: int) -> int:
    """The width of the features a ``pool`` gives the classifier: two tokens' worth for "cls_mean"."""
    return 2 * emb_size if pool == "cls_mean" else emb_size


def _is_int(value) -> bool:
    """True for ints (numpy ints too), False for bools, floats and strings."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral)


def to_2tuple(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``224 -> (224, 224)``; ``(224, 160) -> (224, 160)``.

    Only ints are accepted: ``int("32")`` or ``int(32.5)`` would silently build another model
    (a string "32" even iterates as (3, 2)).
    """
    if _is_int(size):
        return (int(size), int(size))
    if not isinstance(size, (tuple, list)) or len(size) != 2 or not all(_is_int(s) for s in size):
        raise ValueError(f"image size: expected an int or (height, width) of ints, got {size!r}")
    return (int(size[0]), int(size[1]))


@dataclass
class ViTConfig:
    """Every architectural choice of a ViT. The defaults are the seed tutorial's ViT-B/16."""

    img_size: int | tuple[int, int] = 224  # (H, W) the position table is laid out for
    patch_size: int = 16  # square patches: a Conv2d with kernel = stride = patch_size
    # "patch": that one Conv2d (the seed, and every checkpoint format). "conv": a convolutional stem
    # (Xiao et al. 2021, "Early convolutions help transformers see better"): a 3x3 conv, then
    # log2(patch_size) 3x3 stride-2 convs, with GELU, then a 1x1 conv to emb_size (layers.conv_stem).
    stem: str = "patch"
    in_channels: int = 3  # 3 for RGB, 1 for grayscale (digits, Fashion-MNIST)
    emb_size: int = 768  # token width
    depth: int = 12  # number of TransformerEncoderBlocks
    num_heads: int = 8  # the seed uses 8 heads at width 768 (the paper's B/16 uses 12)
    mlp_ratio: float = 4.0  # hidden width of FeedForwardBlock = mlp_ratio * emb_size
    qkv_bias: bool = True  # bias on the fused q/k/v projection (all peer checkpoints have it)
    drop_rate: float = 0.0  # dropout after the attention and MLP output projections
    attn_drop_rate: float = 0.0  # dropout on the attention probabilities
    pos_drop_rate: float = 0.0  # dropout after the position embedding is added
    head_drop_rate: float = 0.0  # dropout on the pooled features before the classifier
    drop_path_rate: float = 0.0  # stochastic depth, linearly increasing over the blocks
    class_token: bool = True  # prepend a learned [class] token
    dist_token: bool = False  # and a distillation token after it, with its own classifier (DeiT; logits averaged)
    # register tokens after the class token (Darcet et al. 2023, "Vision transformers need registers";
    # DINOv2's reg4 models): more prefix tokens that attend and are attended to, read by no head
    reg_tokens: int = 0
    # LayerScale (Touvron et al. 2021, CaiT; DeiT-III, DINOv2): each block's attention and MLP outputs
    # are scaled per channel by learned weights (ls1, ls2) initialised to this value; 0: off
    layer_scale: float = 0.0
    # CLIP's image tower (timm's pre_norm): a LayerNorm on the tokens before the first block
    # (patch_embed.norm_pre), and a patch projection without bias
    pre_norm: bool = False
    # the MLP's activation: "gelu" (exact, erf), "quick_gelu", x * sigmoid(1.702 x), which OpenAI's
    # CLIP weights were trained with, "gelu_tanh", GELU's tanh approximation (SigLIP's), or "swiglu",
    # silu(a) * b over the two halves of fc1's output, so fc2 reads half its width (DINOv2 giant's
    # packed weights_in, timm's SwiGLUPacked; mlp_ratio gives fc1's whole width, as timm's VisionTransformer's
    # does, where timm's Eva's gives each half's: create_model reads it so for those names, TIMM_EVA_SWIGLU)
    mlp_act: str = "gelu"
    # a LayerNorm on the MLP's hidden activations, before fc2 (EVA-02's sub-LN: timm's scale_mlp, mlp.norm)
    mlp_norm: bool = False
    # a LayerNorm on the attention's output, before its projection (EVA-02 CLIP's: timm's scale_attn_inner,
    # attn.norm)
    attn_norm: bool = False
    # BEiT's relative position bias (Bao et al. 2021; BEiT v2, Data2Vec): each block's attention adds
    # a learned bias per head to its logits, looked up by the offset between query and key patches
    # ((2h-1)(2w-1) offsets, and three entries for class-to-patch, patch-to-class and class-to-class).
    # BEiT has no absolute positions (abs_pos=False).
    rel_pos_bias: bool = False
    # Rotary positions: "dinov3" (Siméoni et al. 2025) rotates each patch's q and k by angles of its
    # centred, [-1, 1]-normalised (row, column), half the head width each, periods 100^(2i/(d/2)); the
    # prefix tokens are not rotated, and any image size has its own grid. DINOv3 has no absolute
    # positions (abs_pos=False). "eva02" (Fang et al. 2023, EVA-02; timm's RotaryEmbeddingCat): the angles are
    # the patch's row and column index (scaled to rope_ref_grid) times 10000^(-i/(d/4)), beside absolute
    # positions, the k bias masked. "pe" (Bolya et al. 2025, the Perception Encoder; timm's vit_pe_*): the
    # same with the column's angles first and the k bias kept (rotated with its key). "none": no rotation.
    rope: str = "none"
    # rope="eva02" or "pe" only (0 otherwise): coordinates scaled so that any grid spans this many patches a
    # side, the pretraining grid (timm's ref_feat_shape: 16 for every EVA-02, 224 / 14; 24 or 32 for PE)
    rope_ref_grid: int = 0
    # rope="eva02" or "pe": added to each patch index before scaling (timm's rope_grid_offset: PE's 1)
    rope_grid_offset: float = 0.0
    # Learned absolute positions (PatchEmbedding.positions, timm's pos_embed), added to the tokens; False:
    # none, as BEiT (use_abs_pos_emb=False) and DINOv3 have, whose positions are relative or rotary. A model
    # without them has no table to train or resample (timm's parameter count, and timm's fine-tuning).
    abs_pos: bool = True
    # "cls": the class token's output; "mean": mean of the patch tokens; "map": attention pooling, a
    # learned query attending over every token, then an MLP (SigLIP; timm's global_pool="map");
    # "cls_mean": the class token's output and the patch tokens' mean side by side, 2 x emb_size
    # features (DINOv2's linear classifiers)
    pool: str = "mean"
    # pool="map": the attention pooling's heads, where they differ from the blocks' (PE's 8); 0: the blocks'
    pool_heads: int = 0
    # pool="map": the attention pooling's MLP ratio, where it differs from the blocks' (PE-G's 4); 0: theirs
    pool_mlp_ratio: float = 0.0
    # pool="map": whether the pooling reads the prefix tokens (class token, registers) too, as timm's Eva
    # does (PE), or the patch tokens alone, as timm's VisionTransformer does unless pool_include_prefix
    pool_prefix: bool = True
    final_norm: str = "pooled"  # "tokens": LN on every token (timm/HF/torchvision); "pooled": LN after pooling (seed, timm fc_norm); "none"
    norm_eps: float = 1e-5  # LayerNorm eps: 1e-5 torch default (seed), 1e-6 timm/JAX, 1e-12 Hugging Face
    num_classes: int = 1000  # 0 gives a model without a classifier (features only)
    dynamic_img_size: bool = False  # accept any input size divisible by patch_size; positions are resampled on the fly

    def __post_init__(self) -> None:
        try:
            self.img_size = to_2tuple(self.img_size)
        except ValueError as e:
            raise ValueError(f"ViTConfig.img_size: {e}") from None
        self.validate()

    # --- derived facts -----------------------------------------------------------------
    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + int(self.dist_token) + self.reg_tokens

    @property
    def num_features(self) -> int:
        """The width of the pooled features the classifier reads."""
        return pooled_width(self.pool, self.emb_size)

    @property
    def head_dim(self) -> int:
        return self.emb_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.emb_size * self.mlp_ratio)

    # --- checks ------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming the field for any choice that cannot build a model."""

        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ViTConfig.{name}: expected a positive int, got {value!r}")

        for name in ("patch_size", "in_channels", "emb_size", "depth", "num_heads"):
            positive_int(name)
        for dim, name in zip(self.img_size, ("height", "width")):
            if dim <= 0:
                raise ValueError(f"ViTConfig.img_size: {name} must be positive, got {self.img_size}")
            if dim < self.patch_size:
                raise ValueError(
                    f"ViTConfig.img_size: {name} {dim} is smaller than patch_size {self.patch_size}"
                )
            if dim % self.patch_size:
                raise ValueError(
                    f"ViTConfig.img_size: {name} {dim} is not divisible by patch_size {self.patch_size}"
                )
        if self.emb_size % self.num_heads:
            raise ValueError(
                f"ViTConfig.num_heads: emb_size {self.emb_size} is not divisible by num_heads {self.num_heads}"
            )
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"ViTConfig.num_classes: expected an int >= 0, got {self.num_classes!r}")
        # bools are ints to Python; NaN and inf would fail later inside int(emb_size * mlp_ratio)
        if (isinstance(self.mlp_ratio, bool) or not isinstance(self.mlp_ratio, (int, float))
                or not math.isfinite(self.mlp_ratio) or self.mlp_ratio <= 0 or self.mlp_hidden < 1):
            raise ValueError(f"ViTConfig.mlp_ratio: expected a positive number, got {self.mlp_ratio!r}")
        for name in ("drop_rate", "attn_drop_rate", "pos_drop_rate", "head_drop_rate", "drop_path_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"ViTConfig.{name}: expected a probability in [0, 1), got {value!r}")
        if (isinstance(self.norm_eps, bool) or not isinstance(self.norm_eps, (int, float))
                or not 0 < self.norm_eps < math.inf):
            raise ValueError(f"ViTConfig.norm_eps: expected a positive number, got {self.norm_eps!r}")
        if self.stem not in STEMS:
            raise ValueError(f"ViTConfig.stem: expected one of {STEMS}, got {self.stem!r}")
        if self.stem == "conv" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise ValueError(f"ViTConfig.stem: 'conv' halves the image per conv, so patch_size must be a "
                             f"power of 2 (>= 2), got {self.patch_size}")
        if self.mlp_act not in MLP_ACTS:
            raise ValueError(f"ViTConfig.mlp_act: expected one of {MLP_ACTS}, got {self.mlp_act!r}")
        if self.mlp_act == "swiglu" and self.mlp_hidden % 2:
            raise ValueError(f"ViTConfig.mlp_act: 'swiglu' splits fc1's output in two halves, and its width "
                             f"int(emb_size * mlp_ratio) = {self.mlp_hidden} is odd")
        if self.pool not in POOLS:
            raise ValueError(f"ViTConfig.pool: expected one of {POOLS}, got {self.pool!r}")
        if self.final_norm not in FINAL_NORMS:
            raise ValueError(f"ViTConfig.final_norm: expected one of {FINAL_NORMS}, got {self.final_norm!r}")
        if self.pool in ("cls", "cls_mean") and not self.class_token:
            raise ValueError(f"ViTConfig.pool: {self.pool!r} pooling needs class_token=True; use pool='mean'")
        if self.pool == "cls_mean" and self.final_norm == "pooled":
            raise ValueError("ViTConfig.final_norm: 'pooled' has no one place under pool='cls_mean' (two features "
                             "side by side); use final_norm='tokens', as DINOv2 does")
        for name in ("qkv_bias", "class_token", "dist_token", "dynamic_img_size", "pre_norm", "rel_pos_bias", "abs_pos",
                     "mlp_norm", "attn_norm", "pool_prefix"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ViTConfig.{name}: expected a bool, got {getattr(self, name)!r}")
        if isinstance(self.reg_tokens, bool) or not isinstance(self.reg_tokens, int) or self.reg_tokens < 0:
            raise ValueError(f"ViTConfig.reg_tokens: expected an int >= 0, got {self.reg_tokens!r}")
        if self.pre_norm and self.stem != "patch":
            raise ValueError("ViTConfig.pre_norm: CLIP's pre-norm goes with the patch projection (stem='patch')")
        if self.reg_tokens and self.dist_token:
            raise ValueError("ViTConfig.reg_tokens: register tokens with a distillation token are not supported "
                             "(no published model has both, so their order is undefined)")
        if (isinstance(self.layer_scale, bool) or not isinstance(self.layer_scale, (int, float))
                or not 0 <= self.layer_scale < math.inf):
            raise ValueError(f"ViTConfig.layer_scale: expected a number >= 0 (0: off), got {self.layer_scale!r}")
        if self.rel_pos_bias and not (self.class_token and not self.dist_token and not self.reg_tokens):
            raise ValueError("ViTConfig.rel_pos_bias: BEiT's table has entries for one class token and the patches; "
                             f"got class_token={self.class_token}, dist_token={self.dist_token}, "
                             f"reg_tokens={self.reg_tokens}")
        if self.rope not in ROPES:
            raise ValueError(f"ViTConfig.rope: expected one of {ROPES}, got {self.rope!r}")
        if isinstance(self.rope_ref_grid, bool) or not isinstance(self.rope_ref_grid, int) or self.rope_ref_grid < 0:
            raise ValueError(f"ViTConfig.rope_ref_grid: expected an int >= 0, got {self.rope_ref_grid!r}")
        if (self.rope in GRID_ROPES) != (self.rope_ref_grid > 0):
            raise ValueError("ViTConfig.rope_ref_grid: EVA-02's and PE's rotations (rope='eva02', 'pe') scale their "
                             "coordinates to a reference grid (> 0; 16 for every EVA-02), and no other rope has one "
                             f"(0); got rope={self.rope!r}, rope_ref_grid={self.rope_ref_grid}")
        if (isinstance(self.rope_grid_offset, bool) or not isinstance(self.rope_grid_offset, (int, float))
                or not 0 <= self.rope_grid_offset < math.inf
                or (self.rope_grid_offset and self.rope not in GRID_ROPES)):
            raise ValueError("ViTConfig.rope_grid_offset: expected a number >= 0, and 0 unless rope is 'eva02' or "
                             f"'pe'; got rope={self.rope!r}, rope_grid_offset={self.rope_grid_offset!r}")
        if isinstance(self.pool_heads, bool) or not isinstance(self.pool_heads, int) or self.pool_heads < 0:
            raise ValueError(f"ViTConfig.pool_heads: expected an int >= 0 (0: the blocks' heads), got {self.pool_heads!r}")
        if (isinstance(self.pool_mlp_ratio, bool) or not isinstance(self.pool_mlp_ratio, (int, float))
                or not 0 <= self.pool_mlp_ratio < math.inf or (self.pool_mlp_ratio and self.pool != "map")
                or (self.pool_mlp_ratio and int(self.emb_size * self.pool_mlp_ratio) < 1)):
            raise ValueError(f"ViTConfig.pool_mlp_ratio: attention pooling's (pool='map') MLP ratio, a number >= 0 "
                             f"(0: the blocks'); got pool={self.pool!r}, pool_mlp_ratio={self.pool_mlp_ratio!r}")
        if not self.pool_prefix and (self.pool != "map" or not self.num_prefix_tokens):
            raise ValueError(f"ViTConfig.pool_prefix: False leaves the prefix tokens out of attention pooling "
                             f"(pool='map'); got pool={self.pool!r} with {self.num_prefix_tokens} prefix token(s)")
        if self.pool_heads and (self.pool != "map" or self.emb_size % self.pool_heads):
            raise ValueError(f"ViTConfig.pool_heads: attention pooling's (pool='map') heads, dividing emb_size "
                             f"{self.emb_size}; got pool={self.pool!r}, pool_heads={self.pool_heads}")
        if self.rope != "none" and self.head_dim % 4:
            raise ValueError(f"ViTConfig.rope: rotary positions split each head's width in four (two axes, sine "
                             f"and cosine); head width {self.head_dim} is not a multiple of 4")
        if self.rope != "none" and self.rel_pos_bias:
            raise ValueError("ViTConfig.rope: rotary positions and BEiT's relative position bias together are not "
                             "supported (no published model has both)")
        if self.rel_pos_bias and self.dynamic_img_size:
            raise ValueError("ViTConfig.rel_pos_bias: the relative position table is laid out for one grid; "
                             "dynamic_img_size=True is not supported with it")
        if self.dist_token and not (self.class_token and self.pool == "cls"):
            raise ValueError("ViTConfig.dist_token: a distillation token goes with class_token=True and pool='cls' "
                             f"(DeiT); got class_token={self.class_token}, pool={self.pool!r}")

    # --- (de)serialisation -------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["img_size"] = list(self.img_size)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> ViTConfig:
        """Build from a dict (e.g. a config.json); unknown fields are an error naming ``source``."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object of ViTConfig fields, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{source}: unknown ViTConfig field(s) {unknown}; known fields are {sorted(known)}")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from e

    def replace(self, **overrides) -> ViTConfig:
        """A copy with ``overrides``; a new pool other than "map" drops the attention pooling's heads
        (``POOLING_FIELDS`` belong to it), unless they are given too."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown ViTConfig field(s) {unknown}; known fields are {sorted(known)}")
        return dataclasses.replace(self, **_without_pool_heads(overrides))


# --- the variant table -----------------------------------------------------------------
# timm's Eva builds a SwiGLU MLP as two layers (gate and value; packed in one in EVA-02 T/S), each
# int(embed_dim * mlp_ratio) wide, rounded up to a multiple of its swiglu_align_to (0: not rounded), where
# vitkit's fc1 packs the two and ViTConfig.mlp_ratio gives that packed width (as timm's VisionTransformer takes
# it for SwiGLUPacked: DINOv2's giant). The names timm builds so -> (their mlp_ratio, swiglu_align_to): the
# table's MLP widths follow from them, and so do those of create_model(name, embed_dim=..., mlp_ratio=...), whose
# mlp_ratio is timm's (each layer's) for these names (to_config_fields)
TIMM_EVA_SWIGLU: dict[str, tuple[float, int]] = {
    "eva02_*": (4 * 2 / 3, 0),
    "vit_small_plus_patch16_dinov3*": (4.0, 8),
    "vit_huge_plus_patch16_dinov3*": (4.0, 8),
    "vit_7b_patch16_dinov3": (2.0, 64),
}


def timm_eva_swiglu(name: str) -> tuple[float, int] | None:
    """(timm's mlp_ratio, swiglu_align_to) of a name timm builds with Eva's SwiGLU (``TIMM_EVA_SWIGLU``), else None."""
    return next((rule for pattern, rule in TIMM_EVA_SWIGLU.items() if fnmatch.fnmatchcase(name, pattern)), None)


def eva_swiglu_ratio(width: int, mlp_ratio: float, align_to: int = 0) -> float:
    """ViTConfig's mlp_ratio (fc1's packed width) for timm's Eva SwiGLU of ``mlp_ratio`` and ``swiglu_align_to`` at
    ``width``: each layer int(width * mlp_ratio) wide, rounded up to a multiple of ``align_to``, as timm has it."""
    half = int(width * mlp_ratio)
    if align_to:
        half += -half % align_to
    ratio = 2 * half / width
    # ViTConfig.mlp_hidden takes int(width * ratio): a quotient that rounds below 2 * half is nudged up
    return ratio if int(width * ratio) == 2 * half else (2 * half + 0.5) / width


# Widths, depths and heads of the paper's sizes (big_vision's decode_variant), plus the
# published "Ti" and "S" from DeiT. MLP ratio is 4 for all of them.
SIZES: dict[str, dict] = {
    "tiny": dict(emb_size=192, depth=12, num_heads=3),
    "small": dict(emb_size=384, depth=12, num_heads=6),
    "base": dict(emb_size=768, depth=12, num_heads=12),
    "large": dict(emb_size=1024, depth=24, num_heads=16),
    "huge": dict(emb_size=1280, depth=32, num_heads=16),
}
PATCH_SIZES = (8, 14, 16, 32)
IMG_SIZES = (224, 384)

# What timm, Hugging Face and torchvision ViTs share: a class token whose output is
# classified, LayerNorm (eps 1e-6) on all tokens after the last block.
TIMM_STYLE = dict(class_token=True, pool="cls", final_norm="tokens", norm_eps=1e-6)


def _table() -> dict[str, dict]:
    table: dict[str, dict] = {}
    # timm's widths beside the paper's (SIZES), as its vision_transformer.py builds them, each MLP ratio written as
    # timm writes it (the MLP's width is int(emb_size * mlp_ratio) in both): the narrow ones of "Searching for
    # better ViT baselines" (timm's SBB series: wee to betwixt) and of the CLIP towers (xsmall, medium), ViT-B/16+
    # (base_plus), the shape-optimised SoViT-150M (two) and SoViT-400M, the "optimised" giant of SigLIP 2
    # (giantopt), and the ViT-g and ViT-G of "Scaling Vision Transformers" (giant, gigantic: timm's vit_giant_* is
    # this 1408-wide g, where its vit_giant_*_dinov2 is DINOv2's 1536-wide SwiGLU model, below)
    widths = {**SIZES,
              "wee": dict(emb_size=256, depth=14, num_heads=4, mlp_ratio=5.0),
              "little": dict(emb_size=320, depth=14, num_heads=5, mlp_ratio=5.6),
              "xsmall": dict(emb_size=256, depth=10, num_heads=4),
              "medium": dict(emb_size=512, depth=12, num_heads=8),
              "mediumd": dict(emb_size=512, depth=20, num_heads=8),
              "betwixt": dict(emb_size=640, depth=12, num_heads=10),
              "base_plus": dict(emb_size=896, depth=12, num_heads=14),
              "so150m": dict(emb_size=896, depth=18, num_heads=14, mlp_ratio=2.572),
              "so150m2": dict(emb_size=832, depth=21, num_heads=13, mlp_ratio=34 / 13),
              "so400m": dict(emb_size=1152, depth=27, num_heads=16, mlp_ratio=4304 / 1152),
              "giantopt": dict(emb_size=1536, depth=40, num_heads=16),
              "giant": dict(emb_size=1408, depth=40, num_heads=16, mlp_ratio=48 / 11),
              "gigantic": dict(emb_size=1664, depth=48, num_heads=16, mlp_ratio=64 / 13)}
    for size, dims in SIZES.items():
        for patch in PATCH_SIZES:
            for img in IMG_SIZES:
                if img % patch:  # 384 is no multiple of 14: the /14 grid is built at 378
                    img = img // patch * patch
                table[f"vit_{size}_patch{patch}_{img}"] = dict(
                    **dims, **TIMM_STYLE, patch_size=patch, img_size=img
                )
    # published without a classifier (timm's: in21k features, DINO's): features only
    for name in ("vit_huge_patch14_224", "vit_large_patch32_224", "vit_small_patch8_224"):
        table[name]["num_classes"] = 0
    # DeiT (Touvron et al. 2021; timm's deit_*): the paper's ViT, trained on ImageNet-1k alone. Its distilled
    # models (deit_*_distilled_*): a distillation token after the class token, with a classifier of its own, the
    # two heads' logits averaged.
    for size in ("tiny", "small", "base"):
        for img in IMG_SIZES if size == "base" else (224,):
            table[f"deit_{size}_patch16_{img}"] = dict(**SIZES[size], **TIMM_STYLE, patch_size=16, img_size=img)
            table[f"deit_{size}_distilled_patch16_{img}"] = dict(table[f"deit_{size}_patch16_{img}"], dist_token=True)
    # LayerScale models: DeiT-III (Touvron et al. 2022; timm's deit3_*, init 1e-6) and DINOv2 (Oquab et
    # al. 2023; init 1e-5, patch 14 at 518, no classifier), with 4 registers in the reg4 ones. Where timm gives the
    # prefix tokens no positions (no_embed_class: DeiT-III, reg4), vitkit's table holds zeros for them.
    for size, patch, imgs in (("small", 16, IMG_SIZES), ("medium", 16, (224,)), ("base", 16, IMG_SIZES),
                              ("large", 16, IMG_SIZES), ("huge", 14, (224,))):
        for img in imgs:
            table[f"deit3_{size}_patch{patch}_{img}"] = dict(**widths[size], **TIMM_STYLE, patch_size=patch,
                                                             img_size=img, layer_scale=1e-6)
    for size in ("small", "base", "large"):
        table[f"vit_{size}_patch14_dinov2"] = dict(**SIZES[size], **TIMM_STYLE, patch_size=14, img_size=518,
                                                   layer_scale=1e-5, num_classes=0)  # self-supervised: features
        table[f"vit_{size}_patch14_reg4_dinov2"] = dict(table[f"vit_{size}_patch14_dinov2"], reg_tokens=4)
    # DINOv2's giant: SwiGLU MLP, fc1 8192 wide (two halves of 4096), timm's mlp_ratio written as timm writes it
    giant = dict(emb_size=1536, depth=40, num_heads=24, mlp_ratio=2.66667 * 2, mlp_act="swiglu")
    table["vit_giant_patch14_dinov2"] = dict(table["vit_large_patch14_dinov2"], **giant)
    table["vit_giant_patch14_reg4_dinov2"] = dict(table["vit_giant_patch14_dinov2"], reg_tokens=4)
    # CLIP's image towers (Radford et al. 2021; timm's *_clip_*, the LAION/DFN/DataComp/MetaCLIP weights and their
    # ImageNet fine-tunes): a LayerNorm before the blocks, no patch bias, LayerNorm eps 1e-5. timm's classes: 1000
    # for the fine-tunes, else the width of the image embedding (CLIP's projection into the image-text space).
    clip = dict(TIMM_STYLE, norm_eps=1e-5, pre_norm=True)
    for size, patch, img, classes in (
            ("base", 32, 224, 1000), ("base", 16, 224, 1000), ("large", 14, 224, 1000), ("base", 32, 256, 512),
            ("base", 32, 384, 1000), ("base", 32, 448, 1000), ("base", 16, 384, 1000), ("large", 14, 336, 1000),
            ("huge", 14, 224, 1000), ("huge", 14, 336, 1000), ("huge", 14, 378, 1024), ("giant", 14, 224, 1024),
            ("gigantic", 14, 224, 1280), ("gigantic", 14, 378, 1280), ("xsmall", 16, 224, 512),
            ("medium", 16, 224, 512), ("medium", 32, 224, 512), ("betwixt", 32, 224, 512)):
        table[f"vit_{size}_patch{patch}_clip_{img}"] = dict(**widths[size], **clip, patch_size=patch, img_size=img,
                                                            num_classes=classes)
    table["vit_base_patch16_plus_clip_240"] = dict(**widths["base_plus"], **clip, patch_size=16, img_size=240,
                                                   num_classes=640)
    # OpenAI's own weights (and MetaCLIP's): QuickGELU; the classifier, the image embedding
    for size, patch, img, classes in (("base", 32, 224, 512), ("base", 16, 224, 512), ("large", 14, 224, 768),
                                      ("large", 14, 336, 768), ("huge", 14, 224, 1024), ("huge", 14, 378, 1024),
                                      ("gigantic", 14, 224, 1280)):
        table[f"vit_{size}_patch{patch}_clip_quickgelu_{img}"] = dict(table[f"vit_{size}_patch{patch}_clip_{img}"],
                                                                      mlp_act="quick_gelu", num_classes=classes)
    # SigLIP's towers (Zhai et al. 2023, and SigLIP 2's, Tschannen et al. 2025; timm's *_siglip_*): no class token,
    # attention pooling; the _gap_ ones pool the normalised patch tokens' mean instead. timm runs the first sizes
    # with exact GELU (transformers with its tanh form, which their HF files then say), and the later ones (B/32,
    # L/16 at 512, so400m/16, giantopt: SigLIP 2's, and the i18n so400m/16) with GELU's tanh form (act_layer)
    siglip = dict(class_token=False, pool="map", final_norm="tokens", norm_eps=1e-6, num_classes=0)
    # (size, patch, attention-pooled image sizes, mean-pooled ones, activation)
    for size, patch, maps, gaps, act in (("base", 16, (224, 256, 384, 512), (224, 256, 384, 512), "gelu"),
                                         ("large", 16, (256, 384), (256, 384), "gelu"),
                                         # (timm's so400m_patch14 at 384 crops its input to 378: not here)
                                         ("so400m", 14, (224, 378), (224, 378, 448, 896), "gelu"),
                                         ("base", 32, (256,), (256,), "gelu_tanh"),
                                         ("large", 16, (512,), (512,), "gelu_tanh"),
                                         ("so400m", 16, (256, 384, 512), (256, 384, 512), "gelu_tanh"),
                                         ("giantopt", 16, (256, 384), (256, 384), "gelu_tanh")):
        tower = dict(**widths[size], **siglip, patch_size=patch, mlp_act=act)
        for img in maps:
            table[f"vit_{size}_patch{patch}_siglip_{img}"] = dict(tower, img_size=img)
        for img in gaps:
            table[f"vit_{size}_patch{patch}_siglip_gap_{img}"] = dict(tower, img_size=img, pool="mean")
    # timm's SBB series ("Searching for better ViT baselines"; Wightman 2024): no class token, 1 or 4 registers
    # (no positions for them in timm but in the so150m ones: zeros), the patch tokens' mean normalised after
    # pooling, LayerScale (init 1e-5; none in base and so150m); so150m normalises every token, so150m2 has no
    # qkv bias
    sbb = dict(class_token=False, pool="mean", final_norm="pooled", norm_eps=1e-6, layer_scale=1e-5, patch_size=16)
    for size, registers, imgs in (("wee", 1, (256,)), ("little", 1, (256,)), ("little", 4, (256,)),
                                  ("medium", 1, (256,)), ("medium", 4, (256,)), ("mediumd", 4, (256, 384)),
                                  ("betwixt", 1, (256,)), ("betwixt", 4, (256, 384)), ("base", 4, (256,)),
                                  ("so150m2", 1, (256, 384, 448)), ("so150m", 4, (256, 384))):
        for img in imgs:
            table[f"vit_{size}_patch16_reg{registers}_gap_{img}"] = dict(**widths[size], **sbb, reg_tokens=registers,
                                                                         img_size=img)
    table["vit_base_patch16_reg4_gap_256"]["layer_scale"] = 0.0
    for name in ("vit_so150m2_patch16_reg1_gap_256", "vit_so150m2_patch16_reg1_gap_384",
                 "vit_so150m2_patch16_reg1_gap_448"):
        table[name]["qkv_bias"] = False
    for img in (256, 384):
        table[f"vit_so150m_patch16_reg4_gap_{img}"].update(layer_scale=0.0, final_norm="tokens")
    # ... and pooled by attention, which reads the patch tokens alone (timm's pool_include_prefix=False)
    table["vit_so150m_patch16_reg4_map_256"] = dict(table["vit_so150m_patch16_reg4_gap_256"], pool="map",
                                                    pool_prefix=False)
    # timm's _gap_ models without registers: no class token, every token normalised, then their mean; medium and
    # betwixt (the SBB series' first) without qkv bias, with LayerScale (init 1e-6); timm's ViT-B/16 gap has 16 heads
    gap = dict(TIMM_STYLE, class_token=False, pool="mean")
    for size, patch, img, classes in (("base", 16, 224, 1000), ("huge", 14, 224, 0), ("huge", 16, 448, 0),
                                      ("giant", 16, 224, 0), ("medium", 16, 240, 11821), ("medium", 16, 256, 1000),
                                      ("medium", 16, 384, 1000), ("betwixt", 16, 256, 1000)):
        table[f"vit_{size}_patch{patch}_gap_{img}"] = dict(**widths[size], **gap, patch_size=patch, img_size=img,
                                                           num_classes=classes)
        if size in ("medium", "betwixt"):
            table[f"vit_{size}_patch{patch}_gap_{img}"].update(qkv_bias=False, layer_scale=1e-6)
    table["vit_base_patch16_gap_224"]["num_heads"] = 16
    # More of timm's plain ViTs: ViT-g and ViT-G ("Scaling Vision Transformers"), ViT-B+ (LayerScale 1e-5), a
    # 36-block ViT-S with LayerScale ("Three things everyone should know about Vision Transformers"), MIIL's
    # ImageNet-21k ViT-B (no qkv bias, 11221 classes), FlexiViT (Beyer et al. 2023) at its default 240 and
    # patch 16 (no positions for the class token in timm: zeros), and EVA-01's ViT-L (the class token, the
    # patch tokens' mean normalised after pooling)
    for size, patch in (("giant", 14), ("gigantic", 14)):
        table[f"vit_{size}_patch{patch}_224"] = dict(**widths[size], **TIMM_STYLE, patch_size=patch, img_size=224)
    for patch, img in ((16, 240), (32, 256)):
        table[f"vit_base_patch{patch}_plus_{img}"] = dict(**widths["base_plus"], **TIMM_STYLE, patch_size=patch,
                                                          img_size=img, layer_scale=1e-5)
    table["vit_small_patch16_36x1_224"] = dict(table["vit_small_patch16_224"], depth=36, layer_scale=1e-5)
    table["vit_base_patch16_224_miil"] = dict(table["vit_base_patch16_224"], qkv_bias=False, num_classes=11221)
    for size in ("small", "base", "large"):
        table[f"flexivit_{size}"] = dict(**SIZES[size], **TIMM_STYLE, patch_size=16, img_size=240)
    eva01 = dict(TIMM_STYLE, pool="mean", final_norm="pooled")
    for img in (196, 336):
        table[f"eva_large_patch14_{img}"] = dict(**SIZES["large"], **eva01, patch_size=14, img_size=img)
    # ... and EVA-01's ViT-g (timm's Eva class, BEiT's names, no rotary positions: a plain ViT; its k bias,
    # which Eva has none of, zero), and its CLIP tower (the class token, normalised with every token)
    for img in (224, 336, 560):
        table[f"eva_giant_patch14_{img}"] = dict(**widths["giant"], **eva01, patch_size=14, img_size=img)
    table["eva_giant_patch14_clip_224"] = dict(table["eva_giant_patch14_224"], pool="cls", final_norm="tokens",
                                               num_classes=1024)
    # InternVL's InternViT-300M (timm's vit_intern300m_*): LayerScale (init 0.1), no final LayerNorm, any image
    # size; features
    table["vit_intern300m_patch14_448"] = dict(**SIZES["large"], **dict(TIMM_STYLE, final_norm="none"), patch_size=14,
                                               img_size=448, layer_scale=0.1, dynamic_img_size=True, num_classes=0)
    # NVIDIA's RADIO v3 and v4 (timm's *_radio_*): 7 or 9 registers after the class token (their positions,
    # none in timm: zeros), no final LayerNorm, LayerScale (1e-5) in B and L; features. RADIO's g: DINOv2's
    # giant's width, depth and heads, with a GELU MLP
    radio = dict(TIMM_STYLE, final_norm="none", num_classes=0, patch_size=16, img_size=512)
    radio_giant = {k: giant[k] for k in ("emb_size", "depth", "num_heads")}
    for size, dims, registers, version in (("base", SIZES["base"], 7, 3), ("large", SIZES["large"], 7, 3),
                                           ("huge", SIZES["huge"], 7, 3), ("giant", radio_giant, 7, 3),
                                           ("huge", SIZES["huge"], 9, 4), ("so400m", widths["so400m"], 9, 4)):
        table[f"vit_{size}_patch16_radio_v{version}"] = dict(**dims, **radio, reg_tokens=registers,
                                                             layer_scale=1e-5 if size in ("base", "large") else 0.0)
    # TIPSv2 (timm's *_reg1_tipsv2): one register after the class token (no positions in timm: zeros),
    # LayerScale (init 1.0); features
    for size in ("base", "large", "so400m"):
        table[f"vit_{size}_patch14_reg1_tipsv2"] = dict(**widths[size], **TIMM_STYLE, patch_size=14, img_size=448,
                                                        reg_tokens=1, layer_scale=1.0, num_classes=0)
    # BEiT (Bao et al. 2021; timm's beit_*) and BEiT v2 (Peng et al. 2022; beitv2_*): relative position
    # bias in every block, no absolute positions, LayerScale, the patch tokens'
    # mean normalised after pooling
    beit = dict(rel_pos_bias=True, abs_pos=False, class_token=True, pool="mean", final_norm="pooled", norm_eps=1e-6)
    for size in ("base", "large"):
        for img in IMG_SIZES + ((512,) if size == "large" else ()):
            table[f"beit_{size}_patch16_{img}"] = dict(**SIZES[size], **beit, patch_size=16, img_size=img,
                                                       layer_scale=0.1 if size == "base" else 1e-5)  # timm's inits
        table[f"beitv2_{size}_patch16_224"] = dict(**SIZES[size], **beit, patch_size=16, img_size=224,
                                                   layer_scale=1e-5)
    # DINOv3 (Siméoni et al. 2025; timm's vit_*_patch16_dinov3, its Eva class): rotary positions, no
    # absolute ones, 4 registers, LayerScale, LayerNorm eps 1e-5, no qkv bias
    # (the _qkvb weights have one, zero), any image size; timm pools the patch tokens' mean (the
    # reference code, the class token: --head-pool cls); self-supervised: no classifier
    for size in ("small", "base", "large"):
        table[f"vit_{size}_patch16_dinov3"] = dict(
            **SIZES[size], patch_size=16, img_size=256, dynamic_img_size=True, rope="dinov3", abs_pos=False, reg_tokens=4,
            layer_scale=1e-5, norm_eps=1e-5, qkv_bias=False, class_token=True, pool="mean", final_norm="tokens",
            num_classes=0)
        table[f"vit_{size}_patch16_dinov3_qkvb"] = dict(table[f"vit_{size}_patch16_dinov3"], qkv_bias=True)
    # the tiny one timm names (the EUPE weights), with qkv bias
    table["vit_tiny_patch16_dinov3_qkvb"] = dict(table["vit_small_patch16_dinov3_qkvb"], **SIZES["tiny"])
    # DINOv3's S+, H+ and 7B: a SwiGLU MLP, vitkit's fc1 packing its two layers (timm's fc1_g and fc1_x, each
    # 4x the width, 2x at 7B; HF's gate_proj and up_proj): their mlp_ratio from TIMM_EVA_SWIGLU, below
    small_plus = dict(emb_size=384, depth=12, num_heads=6, mlp_act="swiglu")
    huge_plus = dict(emb_size=1280, depth=32, num_heads=20, mlp_act="swiglu")
    for name, dims in (("small_plus", small_plus), ("huge_plus", huge_plus)):
        table[f"vit_{name}_patch16_dinov3"] = dict(table["vit_small_patch16_dinov3"], **dims)
        table[f"vit_{name}_patch16_dinov3_qkvb"] = dict(table[f"vit_{name}_patch16_dinov3"], qkv_bias=True)
    table["vit_7b_patch16_dinov3"] = dict(table["vit_small_patch16_dinov3"], emb_size=4096, depth=40, num_heads=32,
                                          mlp_act="swiglu")
    # EVA-02 (Fang et al. 2023; timm's eva02_*, its Eva class): rotary positions (rope="eva02", scaled to the
    # 16 x 16 grid of pretraining) beside absolute ones, a SwiGLU MLP, with a LayerNorm before fc2 in B and L
    # (mlp_norm), the patch tokens' mean normalised after pooling, LayerNorm eps 1e-6; 224: the masked-image
    # pretraining (features), 336 and 448: the ImageNet fine-tunes
    eva02_sizes = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12), "large": (1024, 16)}
    for size, (width, heads) in eva02_sizes.items():
        # mlp_ratio: each of SwiGLU's two layers 8/3 the width (2730 for large): TIMM_EVA_SWIGLU, below
        eva02 = dict(emb_size=width, depth=24 if size == "large" else 12, num_heads=heads, mlp_act="swiglu",
                     mlp_norm=size in ("base", "large"), rope="eva02", rope_ref_grid=16, patch_size=14,
                     class_token=True, pool="mean", final_norm="pooled", norm_eps=1e-6)
        table[f"eva02_{size}_patch14_224"] = dict(eva02, img_size=224, num_classes=0)
        fine_tuned = 336 if size in ("tiny", "small") else 448
        table[f"eva02_{size}_patch14_{fine_tuned}"] = dict(eva02, img_size=fine_tuned, num_classes=1000)
    # EVA-02's CLIP image towers (EVA-CLIP, timm's eva02_*_clip_*): a LayerNorm before the attention's
    # projection too (attn_norm), the class token, normalised with every token; the classifier is CLIP's
    # projection into the shared image-text space (512 and 768 wide)
    clip_tower = dict(attn_norm=True, pool="cls", final_norm="tokens")
    table["eva02_base_patch16_clip_224"] = dict(table["eva02_base_patch14_224"], **clip_tower, patch_size=16,
                                                num_classes=512)
    for img in (224, 336):
        table[f"eva02_large_patch14_clip_{img}"] = dict(table["eva02_large_patch14_224"], **clip_tower, img_size=img,
                                                        num_classes=768)
    # The Perception Encoder's core towers (Bolya et al. 2025; timm's vit_pe_core_*, its Eva class): rotary
    # positions (rope="pe": index + 1, scaled to the pretraining grid, columns first) beside absolute ones, a
    # LayerNorm on the tokens before the first block (pre_norm, no patch bias), attention pooling with 8
    # heads and an MLP of ratio 4 whatever the blocks' (timm's attn_pool_num_heads, attn_pool_mlp_ratio: fixed
    # where mlp_ratio changes), LayerNorm eps 1e-5; the classifier is CLIP's projection into the image-text space
    pe = dict(pre_norm=True, rope="pe", rope_grid_offset=1.0, pool="map", pool_heads=8, pool_mlp_ratio=4.0,
              final_norm="tokens", norm_eps=1e-5, class_token=True)
    for size, patch, img, ref, classes in (("tiny", 16, 384, 24, 512), ("small", 16, 384, 24, 512),
                                           ("base", 16, 224, 14, 1024), ("large", 14, 336, 24, 1024)):
        table[f"vit_pe_core_{size}_patch{patch}_{img}"] = dict(**SIZES[size], **pe, patch_size=patch, img_size=img,
                                                             rope_ref_grid=ref, num_classes=classes)
    # PE-G: no class token, no index offset, its pooling's MLP (ratio 4) narrower than the blocks'
    table["vit_pe_core_gigantic_patch14_448"] = dict(
        pe, emb_size=1536, depth=50, num_heads=16, mlp_ratio=8960 / 1536, class_token=False,
        rope_grid_offset=0.0, patch_size=14, img_size=448, rope_ref_grid=32, num_classes=1280)
    # PE's spatial and language towers (timm's vit_pe_spatial_*, vit_pe_lang_*): features, the patch tokens' mean
    # without a LayerNorm after the blocks, positions scaled to a 32 x 32 grid; LayerScale (init 0.1) in the
    # gigantic ones and the language ones (L: 23 blocks, G: 47)
    features = dict(pool="mean", pool_heads=0, pool_mlp_ratio=0.0, final_norm="none", num_classes=0, rope_ref_grid=32)
    for size, patch, img in (("tiny", 16, 512), ("small", 16, 512), ("base", 16, 512), ("large", 14, 448)):
        table[f"vit_pe_spatial_{size}_patch{patch}_{img}"] = dict(**SIZES[size], **dict(pe, **features),
                                                                  patch_size=patch, img_size=img)
    table["vit_pe_spatial_gigantic_patch14_448"] = dict(table["vit_pe_core_gigantic_patch14_448"], **features,
                                                        layer_scale=0.1)
    table["vit_pe_lang_large_patch14_448"] = dict(table["vit_pe_spatial_large_patch14_448"], depth=23, layer_scale=0.1)
    table["vit_pe_lang_gigantic_patch14_448"] = dict(table["vit_pe_spatial_gigantic_patch14_448"], depth=47)
    # The seed tutorial's model, exactly: 8 heads, mean pooling, LayerNorm after pooling.
    table["vit_seed_patch16_224"] = dict(dataclasses.asdict(ViTConfig()))
    # Small models for the embedded real datasets (1-channel images).
    table["vit_digits"] = dict(
        img_size=8, patch_size=2, in_channels=1, emb_size=64, depth=4, num_heads=4, mlp_ratio=2.0,
        num_classes=10, **TIMM_STYLE,
    )
    # The same without a class token: mean of the patch tokens, LayerNorm after pooling (the seed's head).
    # On 1437 training digits it learns faster and generalises better (97.5% vs 95.3% top-1 at epoch 60).
    table["vit_digits_gap"] = dict(table["vit_digits"], class_token=False, pool="mean", final_norm="pooled")
    # 28x28 Fashion-MNIST: 49 patch tokens at width 64, mean-pooled like vit_digits_gap.
    table["vit_fmnist"] = dict(
        img_size=28, patch_size=4, in_channels=1, emb_size=64, depth=6, num_heads=4, mlp_ratio=2.0,
        num_classes=10, class_token=False, pool="mean", final_norm="pooled", norm_eps=1e-6,
    )
    # The same transformer behind a convolutional stem: configs/fashion_mnist.yaml (README, "Measured").
    table["vit_fmnist_convstem"] = dict(table["vit_fmnist"], stem="conv")
    # the SwiGLU MLPs of timm's Eva models (EVA-02, DINOv3's S+, H+ and 7B): their widths as timm derives them
    for name, fields in table.items():
        if (rule := timm_eva_swiglu(name)) is not None:
            fields["mlp_ratio"] = eva_swiglu_ratio(fields["emb_size"], *rule)
    return table


VARIANTS: dict[str, dict] = _table()


# --- each variant's input preprocessing ---------------------------------------------------
# timm's normalisation constants (timm.data.constants), and the three its ViT weights use
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_normalisation(channels: int) -> dict[str, list[float]]:
    """The mean and std an image of ``channels`` channels is read with where a preprocess names none:
    ImageNet's for three channels, else 0.5 (for each channel)."""
    three = channels == 3
    return {"mean": list(IMAGENET_MEAN) if three else [0.5], "std": list(IMAGENET_STD) if three else [0.5]}
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic")
HALF = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic")  # [-1, 1]: timm's "inception"
OPENAI_CLIP = dict(mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, interpolation="bicubic")
UNIT = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bicubic")  # [0, 1], as read

# How the weights timm gives a name by default (its pretrained_cfg) want their inputs: mean, std, interpolation
# and crop_pct (the size is the config's). Rows are (fnmatch patterns, preprocessing), the first match wins, so
# a family's later names fall into its row. A name matching none (vit_digits, the seed, the sizes timm has no
# weights for) keeps default_preprocess's ImageNet statistics. Most families crop 0.9 at 224 and nothing above.
VARIANT_PREPROCESS: list[tuple[tuple[str, ...], dict]] = [
    # DINO's ViT-S/8 (Caron et al. 2021)
    (("vit_small_patch8_224",), dict(IMAGENET, crop_pct=0.9)),
    # the original ViTs and AugReg's (Steiner et al. 2021), trained in JAX on [-1, 1]: the names timm has them for
    (("vit_tiny_patch16_224", "vit_small_patch16_224", "vit_small_patch32_224", "vit_base_patch8_224",
      "vit_base_patch16_224", "vit_base_patch32_224", "vit_large_patch14_224", "vit_large_patch16_224",
      "vit_large_patch32_224", "vit_huge_patch14_224",
      # and the names timm has no weights for, which its default pretrained_cfg reads the same way
      "vit_base_patch16_gap_224", "vit_base_patch16_reg4_gap_256", "vit_giant_patch14_224", "vit_gigantic_patch14_224",
      "vit_small_patch16_36x1_224", "vit_so150m_patch16_reg4_map_256"), dict(HALF, crop_pct=0.9)),
    (("vit_tiny_patch16_384", "vit_small_patch16_384", "vit_small_patch32_384", "vit_base_patch16_384",
      "vit_base_patch32_384", "vit_large_patch16_384", "vit_large_patch32_384"), dict(HALF, crop_pct=1.0)),
    # CLIP towers: OpenAI's statistics, uncropped, but where timm's default weights are another's: its ImageNet
    # fine-tunes of LAION-2B's L/14 (at [-1, 1]) and B/16 (crop 0.95), the LAION /32 towers and TinyCLIP's (0.9)
    (("vit_large_patch14_clip_[0-9]*",), dict(HALF, crop_pct=1.0)),
    (("vit_base_patch16_clip_224",), dict(OPENAI_CLIP, crop_pct=0.95)),
    (("vit_*_patch32_clip*_224", "vit_xsmall_patch16_clip_224", "vit_medium_patch16_clip_224"),
     dict(OPENAI_CLIP, crop_pct=0.9)),
    (("vit_*_clip_*",), dict(OPENAI_CLIP, crop_pct=1.0)),
    # EVA-01 and EVA-02 (MIM, fine-tuned and CLIP weights alike: OpenAI's statistics, but for EVA-01's giant at
    # 560, fine-tuned on ImageNet-22k's labels), and RADIO's distilled towers
    (("eva_giant_patch14_560",), dict(IMAGENET, crop_pct=1.0)),
    (("eva02_*_224", "eva_giant_patch14_224", "eva_giant_patch14_clip_224"), dict(OPENAI_CLIP, crop_pct=0.9)),
    (("eva02_*", "eva_*", "vit_*_radio_*"), dict(OPENAI_CLIP, crop_pct=1.0)),
    # SigLIP (big_vision's [-1, 1], cropped 0.9 but for the so400m/14 weights PaliGemma's came from) and the
    # Perception Encoder
    (("vit_so400m_patch14_siglip_gap_384", "vit_so400m_patch14_siglip_gap_448", "vit_so400m_patch14_siglip_gap_896"),
     dict(HALF, crop_pct=1.0)),
    (("vit_*_siglip_*",), dict(HALF, crop_pct=0.9)),
    (("vit_pe_*",), dict(HALF, crop_pct=1.0)),
    # DINOv2, DINOv3 and InternViT: ImageNet's statistics, uncropped; I-JEPA's: cropped 0.9 at 224
    (("vit_*_dinov2", "vit_*_dinov3*", "vit_intern300m_*", "vit_huge_patch16_gap_448"), dict(IMAGENET, crop_pct=1.0)),
    (("vit_huge_patch14_gap_224", "vit_giant_patch16_gap_224"), dict(IMAGENET, crop_pct=0.9)),
    # timm's own (searching for better baselines, "sbb") ViTs with registers and the medium/betwixt/so150m
    # sizes, FlexiViT and the "plus" sizes: [-1, 1], cropped 0.95 up to 256, uncropped above
    (("vit_so150m2_*", "vit_*_reg*_gap_384", "vit_*_reg*_gap_448"), dict(HALF, crop_pct=1.0)),
    (("vit_*_reg*_gap_256", "vit_medium_patch16_gap_*", "vit_betwixt_patch16_gap_256", "vit_*_plus_2[0-9][0-9]",
      "flexivit_*"), dict(HALF, crop_pct=0.95)),
    # TIPSv2 and the MIIL ImageNet-21k weights read pixels in [0, 1], unnormalised
    (("vit_*_tipsv2",), dict(UNIT, crop_pct=1.0)),
    (("vit_base_patch16_224_miil",), dict(UNIT, interpolation="bilinear", crop_pct=0.875)),
    # BEiT: [-1, 1]; BEiT v2 and DeiT (I, III): ImageNet's statistics
    (("beit_*_224",), dict(HALF, crop_pct=0.9)),
    (("beit_*",), dict(HALF, crop_pct=1.0)),
    (("beitv2_large_*",), dict(IMAGENET, crop_pct=0.95)),
    (("beitv2_*", "deit*_224"), dict(IMAGENET, crop_pct=0.9)),
    (("deit*",), dict(IMAGENET, crop_pct=1.0)),
]


# The names under which timm holds weights that read images differently (told apart by their tag): their default
# weights' statistics above are then a guess for a file that does not say, and a conversion says so. Each: the
# other weights and theirs (tests/test_model.py checks the names against timm's tags).
MIXED_NORMALISATION: dict[str, str] = {
    **dict.fromkeys(("vit_small_patch16_224", "vit_base_patch8_224"), "timm's .dino weights use ImageNet's"),
    "vit_base_patch16_224": "timm's .dino and .mae weights use ImageNet's, .bamboo OpenAI CLIP's",
    **dict.fromkeys(("vit_large_patch16_224", "vit_huge_patch14_224"), "timm's .mae weights use ImageNet's"),
    "vit_large_patch14_clip_224": "timm's .openai, .dfn2b and .datacompxl weights use OpenAI CLIP's",
    "vit_large_patch14_clip_336": "timm's .openai weights use OpenAI CLIP's",
    "eva_giant_patch14_336": "timm's .m30m_ft_in22k_in1k weights use ImageNet's",
    **dict.fromkeys(("vit_large_patch16_dinov3", "vit_large_patch16_dinov3_qkvb", "vit_7b_patch16_dinov3"),
                    "timm's .sat493m (satellite) weights use their own (0.430, 0.411, 0.296)"),
}


# How an image is cut to the model's size (timm's crop_mode): "center" resizes the shorter side to
# img_size / crop_pct, keeping the aspect ratio, then crops the centre; "squash" resizes each side to
# img_size / crop_pct, the aspect ratio not kept, then crops the centre (at crop_pct 1.0: the whole image).
CROP_MODES = ("center", "squash")
# The resampling filters a preprocess dict may name (PIL's, as timm's and torchvision's eval transforms use them)
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")
# The names whose default weights in timm squash (pretrained_cfg crop_mode "squash"); the others crop the
# centre (tests/test_model.py checks every shared name against timm).
SQUASH_VARIANTS = (
    "eva02_base_patch14_448", "eva02_large_patch14_448", "eva_giant_patch14_336", "eva_giant_patch14_560",
    "eva_large_patch14_336", "vit_base_patch16_clip_384", "vit_gigantic_patch14_clip_378",
    "vit_huge_patch14_clip_336", "vit_large_patch14_clip_336", "vit_medium_patch16_gap_384",
    "vit_so150m2_patch16_reg1_gap_448",
)


def variant_preprocess(name: str) -> dict | None:
    """The mean, std, interpolation, crop_pct and crop_mode the weights timm names ``name`` for take
    (``VARIANT_PREPROCESS``, ``SQUASH_VARIANTS``), or None for a name of no known family."""
    for patterns, preprocess in VARIANT_PREPROCESS:
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            return dict(preprocess, crop_mode="squash" if name in SQUASH_VARIANTS else "center")
    return None


# The seed notebook's keyword names -> ViTConfig's. Its ViT passes **kwargs through TransformerEncoder and
# TransformerEncoderBlock down to MultiHeadAttention. Its drop_p (after each branch) and forward_drop_p
# (inside the MLP) are one rate in vitkit, as in timm (proj_drop_rate).
SEED_NAMES = {"n_classes": "num_classes", "forward_expansion": "mlp_ratio", "drop_p": "drop_rate",
              "forward_drop_p": "drop_rate", "dropout": "attn_drop_rate"}


def from_seed_names(kwargs: dict) -> dict:
    """``kwargs`` with the seed's names (``SEED_NAMES``) as ViTConfig's; two names for one field must agree."""
    out: dict = {}
    given: dict = {}
    for name, value in kwargs.items():
        field = SEED_NAMES.get(name, name)
        if field in out and out[field] != value:
            raise ValueError(f"{name}={value!r} and {given[field]}={out[field]!r}: both set ViTConfig.{field} "
                             f"(vitkit has one rate where the seed has drop_p and forward_drop_p); give one value")
        out[field], given[field] = value, name
    return out


# --- timm's keyword names ----------------------------------------------------------------
# The names timm builds with its Eva class though they have no rotary positions (EVA-01's giant): its attention
# pooling reads every token, where VisionTransformer's reads the patch tokens alone (the rotary models are Eva's
# too). EVA-01's L (eva_large_*) is timm's VisionTransformer: not here (test_timm_names checks each name's class)
TIMM_EVA = "eva_giant_*"
# timm's global_pool -> vitkit's pool (convert.timm.GLOBAL_POOL is the other direction)
TIMM_POOLS = {"token": "cls", "avg": "mean", "map": "map"}
# timm's global_pool values vitkit has no pooling for -> why
TIMM_POOLS_REFUSED = {
    "": "timm's global_pool='' pools nothing, its classifier reads every token ((B, N, classes) logits); vitkit's "
        "head pools (model.forward_features gives every token)",
    "avgmax": "vitkit has no max pooling", "max": "vitkit has no max pooling",
    "prr": "vitkit has no PRR attention pooling (timm's AttentionPoolPrr)",
}


def _as_is(name: str, value):
    return value


def _timm_pool(name: str, value) -> str:
    if isinstance(value, str) and value in TIMM_POOLS:
        return TIMM_POOLS[value]
    why = TIMM_POOLS_REFUSED.get(value, "not one of timm's pools") if isinstance(value, str) else "not a str"
    raise ValueError(f"{name}={value!r}: {why}; vitkit pools as timm's 'token' (pool='cls'), 'avg' (pool='mean') "
                     f"or 'map' (pool='map')")


def _timm_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected a bool, got {value!r}")
    return value


def _timm_square(name: str, value):
    """timm's (p, p) patch size as vitkit's p (its patches are square); anything else as it is, for ViTConfig to judge."""
    if isinstance(value, (tuple, list)) and len(value) == 2 and value[0] == value[1]:
        return value[0]
    if isinstance(value, (tuple, list)):
        raise ValueError(f"ViTConfig.patch_size: {name}={value!r}: vitkit's patches are square; expected an int or (p, p)")
    return value


def _timm_pos_embed(name: str, value) -> bool:
    if value in ("learn", "", "none"):
        return value == "learn"
    raise ValueError(f"{name}={value!r}: vitkit's positions are learned ('learn', abs_pos=True) or absent ('none' "
                     "or '', abs_pos=False)")


def _timm_act(name: str, value) -> str:
    if value in ("gelu", "quick_gelu", "gelu_tanh"):  # timm's names are vitkit's mlp_act
        return value
    raise ValueError(f"{name}={value!r}: vitkit's MLP activations by timm's names are 'gelu', 'quick_gelu' and "
                     "'gelu_tanh' (a layer class is not read: pass its name)")


def _timm_only(default, why: str):
    """A timm argument vitkit has no field for: its default (timm's) accepted, anything else refused."""
    def read(name: str, value):
        if value != default:
            raise ValueError(f"{name}={value!r}: {why}; vitkit accepts only {default!r}")
        return value
    return read


def _timm_layer(name: str, value):
    raise ValueError(f"{name}={value!r}: vitkit builds its own layers and does not take timm's; leave {name} out "
                     "(the ViTConfig fields mlp_act, norm_eps, pre_norm, mlp_norm, attn_norm choose what vitkit has)")


# timm's VisionTransformer keyword names -> ViTConfig's, so that ``timm.create_model(name, **kwargs)`` ports as
# ``vitkit.create_model(name, **kwargs)`` (ViT(**kwargs) and load_pretrained too: to_config_fields). Each name:
# (the field it sets, None for none; how its value reads, returning the field's value or raising ValueError
# with what vitkit expects). None for one of these (not a ViTConfig field) is dropped, as timm.create_model drops
# it: the model's own stands.
# Names that are ViTConfig fields too mean the same in both (img_size, patch_size, num_classes, depth,
# num_heads, mlp_ratio, qkv_bias, class_token, reg_tokens, pre_norm, pos_drop_rate, attn_drop_rate,
# drop_path_rate, dynamic_img_size), except:
#   mlp_ratio, for a model timm builds with its Eva's SwiGLU (TIMM_EVA_SWIGLU: EVA-02, DINOv3's S+, H+ and 7B),
#     is timm's there: each of its two layers' width (rounded up as timm rounds it), half of vitkit's packed fc1;
#     and a new width (embed_dim) derives that width as timm does.
#   drop_rate: vitkit's is the dropout after the attention and MLP projections (timm's proj_drop_rate), timm's
#     the head's (vitkit's head_drop_rate). Beside timm's own names it is read as timm's, and only 0 is taken.
#   final_norm: a bool is timm's (whether there is a final LayerNorm), a str vitkit's (where it is).
# What reads more than its own value (to_config_fields):
#   global_pool also places the final norm as timm does where fc_norm does not say: after pooling for 'avg', on
#     the tokens otherwise (the model's own placement where its pooling is unchanged).
#   global_pool='map' pools the patch tokens alone (pool_prefix=False)
#     in a model with a class token or registers, as timm's VisionTransformer does unless pool_include_prefix
#     (timm's Eva, vitkit's rope models and EVA-01's giant: TIMM_EVA, pools them all), where the model's own
#     pool_prefix does not say; vitkit's pool='map' keeps vitkit's pool_prefix (True unless given). So do
#     class_token and reg_tokens adding prefix tokens to a named model pooled by attention without any (SigLIP's:
#     its own pool_prefix says nothing of them); a model left without prefix tokens has nothing to leave out.
#   fc_norm (after pooling) and final_norm (bool) are vitkit's final_norm="pooled", "tokens" or "none".
#   no_embed_class: timm's position table without rows for the prefix tokens; vitkit's has them (a prefix token
#     plus a learned position is the same learned vector), and holds zeros there for timm's weights (convert).
TIMM_NAMES: dict[str, tuple] = {
    "in_chans": ("in_channels", _as_is),
    "embed_dim": ("emb_size", _as_is),
    "patch_size": ("patch_size", _timm_square),
    "global_pool": ("pool", _timm_pool),
    "fc_norm": ("final_norm", _timm_bool),
    "final_norm": ("final_norm", _timm_bool),  # a bool; a str is ViTConfig's own
    "pool_include_prefix": ("pool_prefix", _timm_bool),
    "init_values": ("layer_scale", _as_is),  # LayerScale's init; 0 (or None, the default) is none
    "proj_drop_rate": ("drop_rate", _as_is),
    "drop_rate": ("head_drop_rate", _as_is),  # beside timm's own names only (above)
    "pos_embed": ("abs_pos", _timm_pos_embed),
    "scale_attn_norm": ("attn_norm", _as_is),
    "scale_mlp_norm": ("mlp_norm", _as_is),
    "act_layer": ("mlp_act", _timm_act),
    "no_embed_class": (None, _timm_bool),  # accepted (above)
    "qk_norm": (None, _timm_only(False, "vitkit's attention has no q/k LayerNorm")),
    "proj_bias": (None, _timm_only(True, "vitkit's attention projection always has a bias")),
    "patch_drop_rate": (None, _timm_only(0.0, "vitkit has no patch dropout")),
    "dynamic_img_pad": (None, _timm_only(False, "vitkit does not pad images to a multiple of the patch size")),
    "weight_init": (None, _timm_only("", "vitkit initialises weights its own way")),
    "fix_init": (None, _timm_only(False, "vitkit does not rescale the projections by depth")),
    **{name: (None, _timm_layer) for name in ("embed_layer", "embed_norm_layer", "norm_layer", "block_fn",
                                               "mlp_layer", "attn_layer")},
    **{name: (None, _timm_only(None, "vitkit builds on the default device in fp32; move the model with "
                                     ".to(device, dtype)")) for name in ("device", "dtype")},
}


class ConfigFields(dict):
    """ViTConfig fields, with ``given``: the name each was given by where that was another's (seed, timm)."""

    given: dict[str, str]


def to_config_fields(kwargs: dict, base: ViTConfig | dict | None = None, variant: str | None = None) -> ConfigFields:
    """``kwargs`` with the seed's (``SEED_NAMES``) and timm's (``TIMM_NAMES``) names as ViTConfig's, for a model
    that is otherwise ``base`` (a ViTConfig or a variant's fields; the seed's model by default), which timm's
    global_pool, fc_norm and final_norm read (the final norm's place, what attention pooling reads). None for
    one of timm's own names is dropped, as timm.create_model drops it (the model's own stands); a value vitkit
    cannot build is refused, and two names for one field must agree. ``variant``: the name of the table's model
    ``base`` is (get_config's), which then reads as timm's model of that name does (what its attention pooling
    reads of prefix tokens the call adds: timm's class for the name, ``TIMM_EVA``)."""
    base = base if isinstance(base, ViTConfig) else ViTConfig(**(base or {}))
    known = {f.name for f in dataclasses.fields(ViTConfig)}

    def timms_own(name: str, value) -> bool:  # a name ViTConfig lacks, or final_norm as timm's bool
        return name in TIMM_NAMES and name not in known or name == "final_norm" and isinstance(value, bool)

    # beside timm's own names, drop_rate is read as timm's too
    timm_call = any(value is not None and timms_own(name, value) for name, value in kwargs.items())

    def read_as_timms(name: str, value) -> bool:  # through TIMM_NAMES (patch_size: timm's (p, p) too)
        return timms_own(name, value) or name == "patch_size" or name == "drop_rate" and timm_call

    # None for one of timm's own names is dropped, as timm.create_model drops it; ViTConfig's fields refuse it
    kwargs = {name: value for name, value in kwargs.items()
              if value is not None or not (timms_own(name, value) or name == "drop_rate" and timm_call)}
    out, given, timm = ConfigFields(), {}, {}

    def put(field: str, value, name: str) -> None:
        if field in out and out[field] != value:
            other = given[field]
            seed = name in SEED_NAMES and other in SEED_NAMES
            raise ValueError(f"{name}={kwargs[name]!r} and {other}={kwargs[other]!r}: both set ViTConfig.{field}"
                             + (f" (to {value!r} and {out[field]!r})"
                                if (value, out[field]) != (kwargs[name], kwargs[other]) else "")
                             + (" (vitkit has one rate where the seed has drop_p and forward_drop_p)" if seed else "")
                             + "; give one value")
        out[field], given[field] = value, name

    for name, value in kwargs.items():
        if not read_as_timms(name, value):
            put(SEED_NAMES.get(name, name), value, name)
            continue
        field, read = TIMM_NAMES[name]
        value = read(name, value)
        if name == "drop_rate" and value:
            raise ValueError(f"drop_rate={value!r} beside timm's names: timm's drop_rate is the head's dropout "
                             "(vitkit's head_drop_rate), vitkit's the dropout after the attention and MLP "
                             "projections (timm's proj_drop_rate); pass head_drop_rate or proj_drop_rate instead")
        if field in ("final_norm", "pool_prefix"):  # read with global_pool, below
            timm[name] = value
        elif field is not None:
            put(field, value, name)
    if variant is not None and (rule := timm_eva_swiglu(variant)) and out.get("mlp_act", base.mlp_act) == "swiglu":
        _timm_eva_swiglu_width(out, base, *rule)
    pool = out.get("pool", base.pool)
    _timm_final_norm(timm, "global_pool" in kwargs, out, base, pool, put)
    if "pool_include_prefix" in timm or "pool_prefix" not in out:  # (vitkit's pool_prefix, given, stands)
        # the pooling is timm's where global_pool names it, or where it is the own of a model of timm's name
        timms = "global_pool" in kwargs or variant is not None and pool == base.pool
        eva = variant is not None and fnmatch.fnmatchcase(variant, TIMM_EVA)
        _timm_pool_prefix(timm.get("pool_include_prefix"), out, base, pool, put, timms, eva)
    if "swiglu" in (base.mlp_act, out.get("mlp_act", base.mlp_act)):
        _refuse_timm_on_swiglu(kwargs, base, pool)
    out.given = {field: name for field, name in given.items() if name != field}
    return out


def _timm_final_norm(timm: dict, global_pool: bool, out: dict, base: ViTConfig, pool: str, put) -> None:
    """vitkit's final_norm from timm's fc_norm, final_norm (a bool) and global_pool."""
    fc_norm, has_norm = timm.get("fc_norm"), timm.get("final_norm")
    place = out.get("final_norm")  # vitkit's own (a str): it stands, and must agree with fc_norm and final_norm
    if fc_norm is None and has_norm is None:
        if global_pool and place is None and pool != base.pool and base.final_norm != "none":
            # timm's fc_norm defaults to global_pool == 'avg'; an unchanged pooling keeps the model's own place
            put("final_norm", "pooled" if pool == "mean" else "tokens", "global_pool")
        return
    if has_norm is None:
        has_norm = (place or base.final_norm) != "none"
    if fc_norm is None:
        fc_norm = (place == "pooled" if place else base.final_norm == "pooled" if pool == base.pool
                   else pool == "mean")
    value = "pooled" if has_norm and fc_norm else "tokens" if has_norm else "none"
    if value == "pooled" and timm.get("fc_norm") and out.get("dist_token", base.dist_token):
        # timm's VisionTransformerDistilled reads its two tokens in forward_head, which never applies fc_norm,
        # while use_fc_norm takes the final norm off the tokens: no norm at all, where vitkit's normalises both
        raise ValueError("fc_norm=True on a model with a distillation token (DeiT's distilled): timm's "
                         "VisionTransformerDistilled never applies fc_norm (its head reads the class and distillation "
                         "tokens as they are) and drops the norm on the tokens for it, so its network has no final "
                         "norm; vitkit's would normalise both tokens. Pass final_norm=False for that network "
                         "(timm's holds an unused fc_norm), or leave fc_norm out")
    if place is not None and place != value:
        names = " and ".join(f"{n}={timm[n]!r}" for n in ("fc_norm", "final_norm") if n in timm)
        raise ValueError(f"{names} (final_norm={value!r}, timm's names) and final_norm={place!r} disagree; give one")
    put("final_norm", value, "fc_norm" if "fc_norm" in timm else "final_norm")


def _timm_eva_swiglu_width(out: dict, base: ViTConfig, mlp_ratio: float, align_to: int) -> None:
    """ViTConfig's (packed) mlp_ratio for a model timm builds with Eva's SwiGLU (``TIMM_EVA_SWIGLU``) at the call's
    width: the call's mlp_ratio is timm's (each layer's), and a new width takes timm's rule, not the quotient the
    table holds for the model's own width (EVA-02's 2 * 512 / 192 gave an odd fc1 at width 64)."""
    if "emb_size" not in out and "mlp_ratio" not in out:
        return
    width, ratio = out.get("emb_size", base.emb_size), out.get("mlp_ratio", mlp_ratio)
    if (not _is_int(width) or width <= 0 or isinstance(ratio, bool) or not isinstance(ratio, numbers.Real)
            or not math.isfinite(ratio) or int(width * ratio) < 1):
        return  # ViTConfig refuses it, naming the value given
    out["mlp_ratio"] = eva_swiglu_ratio(width, ratio, align_to)


def _refuse_timm_on_swiglu(kwargs: dict, base: ViTConfig, pool: str) -> None:
    """timm's names that build another network than timm's on a SwiGLU model: refused, not misread."""
    if "act_layer" in kwargs:
        raise ValueError(f"act_layer={kwargs['act_layer']!r} on a SwiGLU model: timm keeps the gated MLP "
                         "(GluMlp with that activation) or refuses it; vitkit would drop the gate. Leave it out")
    if "global_pool" in kwargs and pool == "map" and base.pool != "map":
        raise ValueError("global_pool='map' on a SwiGLU model: timm's attention pool has a plain MLP, vitkit's "
                         "takes the blocks' SwiGLU; not the same network")


def _timm_pool_prefix(include: bool | None, out: dict, base: ViTConfig, pool: str, put, timms: bool,
                      eva: bool) -> None:
    """vitkit's pool_prefix from timm's pool_include_prefix, and what attention pooling reads where neither it
    nor pool_prefix says. ``timms``: the pooling is timm's (global_pool, or the own of a model of timm's name),
    which reads the prefix tokens as timm's class for the model does; ``eva``: that class is Eva, though the
    model has no rotary positions (``TIMM_EVA``)."""
    if pool != "map":
        if include and pool == "mean":
            raise ValueError("pool_include_prefix=True with average pooling averages the prefix tokens with the "
                             "patches; vitkit's mean (global_pool='avg') pools the patch tokens alone")
        return  # the class token (global_pool='token') is read as it is
    prefix = sum((out.get("class_token", base.class_token), out.get("dist_token", base.dist_token),
                  out.get("reg_tokens", base.reg_tokens)))
    if include is not None:
        put("pool_prefix", bool(include) or not prefix, "pool_include_prefix")  # no prefix tokens: nothing left out
    elif not prefix:
        # nothing to leave out: the model's own False (the so150m's), its prefix tokens gone, is moot, and True
        # is ViTConfig's one spelling of that
        if not base.pool_prefix:
            out["pool_prefix"] = True
    elif base.pool == "map" and base.num_prefix_tokens or not timms:
        return  # the model's own choice stands (vitkit's pool="map" on a model pooled otherwise: True)
    else:
        # timm's VisionTransformer pools the patch tokens alone unless pool_include_prefix; its Eva (vitkit's
        # rotary models, EVA-01's giant) and Beit read them all. A model pooled by attention without prefix tokens
        # (SigLIP, PE-G), whose own pool_prefix said nothing, reads those the call adds as timm's class does
        out["pool_prefix"] = base.rope != "none" or base.rel_pos_bias or eva


def list_models(pattern: str = "*") -> list[str]:
    """Names in the variant table, filtered by a shell-style ``pattern`` (``"vit_base*"``), matched whatever
    the case (``"VIT_BASE*"`` too; fnmatch's own case rule is the operating system's)."""
    pattern = pattern.lower()
    return sorted(n for n in VARIANTS if fnmatch.fnmatchcase(n.lower(), pattern))


# what belongs to attention pooling (pool="map"), and its value without it
POOLING_FIELDS = {"pool_heads": 0, "pool_mlp_ratio": 0.0, "pool_prefix": True}


def _without_pool_heads(overrides: dict) -> dict:
    """``overrides`` with attention pooling's own fields reset where they set a pool other than "map" and
    say nothing of those fields."""
    if overrides.get("pool", "map") != "map":
        return {**{k: v for k, v in POOLING_FIELDS.items() if k not in overrides}, **overrides}
    return overrides


def get_config(name: str, **overrides) -> ViTConfig:
    """The ViTConfig of a named variant, with ``overrides`` applied."""
    if name not in VARIANTS:
        close = difflib.get_close_matches(name, VARIANTS, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `vitkit models`"
        raise ValueError(f"unknown model name {name!r}{hint}")
    fields = dict(VARIANTS[name])
    overrides = to_config_fields(overrides, fields, variant=name)
    fields.update(_without_pool_heads(overrides))
    known = {f.name for f in dataclasses.fields(ViTConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown ViTConfig field(s) {unknown} for model {name!r}; known fields are {sorted(known)} "
                         "(and the seed's and timm's names: SEED_NAMES, TIMM_NAMES)")
    try:
        return ViTConfig(**fields)
    except ValueError as e:
        raise named_error(e, overrides) from None


def named_error(error: ValueError, fields: dict) -> ValueError:
    """``error``, ViTConfig's about a field ``to_config_fields`` was given by another name (timm's init_values for
    layer_scale), with that name in front."""
    for field, name in getattr(fields, "given", {}).items():
        if str(error).startswith(f"ViTConfig.{field}:"):
            return ValueError(f"{name}: {error}")
    return error


__all__ = ["ViTConfig", "VARIANTS", "VARIANT_PREPROCESS", "MIXED_NORMALISATION", "variant_preprocess", "SIZES", "SEED_NAMES",
           "from_seed_names", "TIMM_NAMES", "to_config_fields", "list_models", "get_config", "to_2tuple"]
