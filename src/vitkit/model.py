"""TransformerEncoder, ClassificationHead and ViT, built from one ViTConfig."""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .config import (
    GRID_ROPES,
    ViTConfig,
    from_seed_names,
    get_config,
    named_error,
    pooled_width,
    to_config_fields,
    variant_preprocess,
)
from .layers import (
    AttentionPool,
    PatchEmbedding,
    TransformerEncoderBlock,
    _dropout,
    _global_hooks,
    init_weights,
    rope_dinov3,
    rope_eva02,
)

# Parameters trained without weight decay besides biases and norms, by name (timm/DeiT/BEiT): the prefix
# tokens, the position table, BEiT's relative position tables. train.param_groups and no_weight_decay read it.
NO_DECAY_NAMES = ("cls_token", "dist_token", "reg_token", "positions", "rel_pos_bias_table")


def first_conv_weight(shapes: dict[str, tuple[int, ...]]) -> str:
    """The stem's first convolution's weight among a state dict's ``{name: shape}``: the first 4-d
    one in the patch embedding (the projection, or a conv stem's first layer)."""
    return next(name for name, shape in shapes.items() if name.startswith("patch_embed.") and len(shape) == 4)


class TransformerEncoder(nn.Module):
    """``depth`` TransformerEncoderBlocks, then (final_norm="tokens") a LayerNorm on every token.

    ``TransformerEncoder(cfg)``, or as the seed builds it: ``TransformerEncoder(depth, emb_size=..., **kwargs)``
    (ViTConfig's fields or the seed's names, ``config.SEED_NAMES``)."""

    def __init__(self, cfg: ViTConfig | int = 12, **kwargs):
        super().__init__()
        if not isinstance(cfg, ViTConfig):  # the seed's call: a depth and the blocks' keywords
            cfg = ViTConfig(**{**from_seed_names(kwargs), "depth": cfg})
        elif kwargs:
            cfg = cfg.replace(**from_seed_names(kwargs))
        # Stochastic depth grows linearly from 0 at the first block to drop_path_rate at the last.
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(
            TransformerEncoderBlock(
                cfg.emb_size, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias,
                drop_p=cfg.drop_rate, attn_drop_p=cfg.attn_drop_rate, drop_path=rate, norm_eps=cfg.norm_eps,
                layer_scale=cfg.layer_scale, mlp_act=cfg.mlp_act,
                rel_pos_grid=cfg.grid_size if cfg.rel_pos_bias else None, mask_k_bias=cfg.rope in ("dinov3", "eva02"),
                mlp_norm=cfg.mlp_norm, attn_norm=cfg.attn_norm,
            )
            for rate in rates
        )
        self.norm = nn.LayerNorm(cfg.emb_size, eps=cfg.norm_eps) if cfg.final_norm == "tokens" else nn.Identity()
        self.grad_checkpointing = False

    def forward(self, x: Tensor, mask: Tensor | None = None, last_queries: int | None = None,
                rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """(B, N, E) -> (B, N, E); with ``last_queries=q`` the last block computes only the first
        q tokens, (B, N, E) -> (B, q, E). ``rope``: the patches' rotary positions, if any."""
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            queries = last_queries if i == last else None
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, mask, False, queries, rope, use_reentrant=False)
            else:
                x = block(x, mask=mask, num_queries=queries, rope=rope)
        return self.norm(x)


class ClassificationHead(nn.Module):
    """Pool the tokens (class token, mean of patch tokens, both side by side, or attention pooling),
    optional LayerNorm, then Linear."""

    def __init__(self, emb_size: int = 768, n_classes: int = 1000, pool: str = "mean",
                 num_prefix_tokens: int = 1, norm: bool = True, norm_eps: float = 1e-5, drop: float = 0.0,
                 dist: bool = False, num_heads: int = 8, mlp_ratio: float = 4.0, mlp_act: str = "gelu",
                 pool_prefix: bool = True):
        super().__init__()
        self.pool = pool
        self.num_prefix_tokens = num_prefix_tokens
        self.pool_prefix = pool_prefix  # pool="map": the prefix tokens pooled too (ViTConfig.pool_prefix)
        # pool="map": attention pooling over every token (SigLIP), with the blocks' heads, MLP and norm eps
        self.attn_pool = AttentionPool(emb_size, num_heads, mlp_ratio, norm_eps, mlp_act) if pool == "map" else None
        self.norm = nn.LayerNorm(emb_size, eps=norm_eps) if norm else nn.Identity()
        self.drop = nn.Dropout(drop)
        self.fc = nn.Linear(pooled_width(pool, emb_size), n_classes) if n_classes > 0 else nn.Identity()
        # DeiT: the distillation token (token 1) has a classifier of its own; the two are averaged,
        # except in distilled training (``distilled_training``), which trains each on its own target
        self.fc_dist = (nn.Linear(emb_size, n_classes) if n_classes > 0 else nn.Identity()) if dist else None
        self.distilled_training = False

    def pool_tokens(self, x: Tensor) -> Tensor:
        if self.pool == "cls":
            return x[:, 0]  # (B, N, E) -> (B, E)
        if self.attn_pool is not None:
            return self.attn_pool(x if self.pool_prefix else x[:, self.num_prefix_tokens:])  # (B, N, E) -> (B, E)
        # Mean over patch tokens only, as timm's global_pool="avg" (the seed also averaged the class token).
        patches = x[:, self.num_prefix_tokens:]
        if torch.onnx.is_in_onnx_export():
            # ReduceSum keeps its opset-13 form through opset 18; ReduceMean's changed at 18, and the
            # exporter's conversion down to opset 17 fails on it (and then writes opset 18)
            mean = patches.sum(dim=1) / patches.shape[1]  # (B, N, E) -> (B, E)
        else:
            mean = patches.mean(dim=1)  # (B, N, E) -> (B, E)
        if self.pool == "cls_mean":
            return torch.cat([x[:, 0], mean], dim=-1)  # -> (B, 2E)
        return mean

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.fc_dist is None:
            x = _dropout(self.drop, self.norm(self.pool_tokens(x)))
            return x if pre_logits else self.fc(x)
        cls, dist = (_dropout(self.drop, self.norm(x[:, i])) for i in (0, 1))  # (B, N, E) -> 2 x (B, E)
        if pre_logits:
            return (cls + dist) / 2
        logits, logits_dist = self.fc(cls), self.fc_dist(dist)
        if self.distilled_training and self.training:
            return logits, logits_dist
        return (logits + logits_dist) / 2


class ViT(nn.Module):
    """Vision Transformer (Dosovitskiy et al., 2020), as the seed builds it.

    ``ViT()`` is the seed's model; ``ViT(cfg)`` or ``ViT(emb_size=192, ...)`` any other.
    The seed's own keyword names (``n_classes``, and what its ``**kwargs`` carried down to the blocks:
    ``forward_expansion``, ``drop_p``, ``forward_drop_p``, ``num_heads``, ``dropout``) are accepted
    (``config.SEED_NAMES``), and so are timm VisionTransformer's (``in_chans``, ``embed_dim``, ``global_pool``,
    ``init_values``...: ``config.TIMM_NAMES``), over the seed's defaults.
    """

    def __init__(self, cfg: ViTConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg or ViTConfig()
        if overrides:
            overrides = to_config_fields(overrides, cfg)
            try:
                cfg = cfg.replace(**overrides)
            except ValueError as e:
                raise named_error(e, overrides) from None
        self.cfg = cfg
        self.patch_embed = PatchEmbedding(
            cfg.in_channels, cfg.patch_size, cfg.emb_size, cfg.img_size,
            class_token=cfg.class_token, pos_drop_rate=cfg.pos_drop_rate, dynamic_img_size=cfg.dynamic_img_size,
            stem=cfg.stem, dist_token=cfg.dist_token, reg_tokens=cfg.reg_tokens, pre_norm=cfg.pre_norm,
            norm_eps=cfg.norm_eps, abs_pos=cfg.abs_pos,
        )
        self.encoder = TransformerEncoder(cfg)
        self.head = ClassificationHead(
            cfg.emb_size, cfg.num_classes, cfg.pool, cfg.num_prefix_tokens,
            norm=cfg.final_norm == "pooled", norm_eps=cfg.norm_eps, drop=cfg.head_drop_rate, dist=cfg.dist_token,
            num_heads=cfg.pool_heads or cfg.num_heads, mlp_ratio=cfg.pool_mlp_ratio or cfg.mlp_ratio,
            mlp_act=cfg.mlp_act,
            pool_prefix=cfg.pool_prefix,
        )
        self.apply(init_weights)
        # The rotary tables of the configured grid, kept rather than rebuilt at every call: under
        # torch.compile, Inductor folded their sin and cos into the rotation kernels, evaluated again
        # for every element of q and k (compiled DINOv3-B training on an H100: 0.94x timm, 1.04x kept).
        # Not in the state dict: they follow from the config. Always fp32, whatever the weights' dtype.
        self.register_buffer("rope_sin", None, persistent=False)
        self.register_buffer("rope_cos", None, persistent=False)
        self._build_rope_tables()

    def _rope_tables(self, grid: tuple[int, int], device: torch.device | str | None) -> tuple[Tensor, Tensor]:
        if self.cfg.rope in GRID_ROPES:
            return rope_eva02(grid, self.cfg.head_dim, self.cfg.rope_ref_grid, self.cfg.rope_grid_offset,
                              columns_first=self.cfg.rope == "pe", device=device)
        return rope_dinov3(grid, self.cfg.head_dim, device=device)

    def _build_rope_tables(self, device: torch.device | str | None = None) -> None:
        if self.cfg.rope != "none":
            self.rope_sin, self.rope_cos = self._rope_tables(self.cfg.grid_size, device)

    def _apply(self, fn, recurse: bool = True):
        """``Module._apply`` (what ``.to``, ``.cuda``, ``.half`` and ``.to_empty`` run), then the rotary
        tables built again on their new device: a dtype cast would have rounded them (the rotation is
        computed in fp32), and ``to_empty`` would have left them uninitialised."""
        super()._apply(fn, recurse)
        if self.rope_sin is not None:
            self._build_rope_tables(self.rope_sin.device)
        return self

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    # --- timm's model-level names, so that code and tools written for timm's ViT work on this one ---
    @property
    def num_features(self) -> int:
        """The width the classifier reads (timm's ``num_features``; 2E for cls_mean pooling)."""
        return self.cfg.num_features

    @property
    def embed_dim(self) -> int:
        return self.cfg.emb_size

    @property
    def num_prefix_tokens(self) -> int:
        return self.cfg.num_prefix_tokens

    @property
    def pretrained_cfg(self) -> dict:
        """timm's description of the input (``timm.data.resolve_data_config(model=m)`` reads it): a loaded
        checkpoint's own normalisation and size (``preprocess``), else the defaults for this config."""
        from .checkpoint import default_preprocess
        from .images import crop_mode

        pre = getattr(self, "preprocess", None) or default_preprocess(self.cfg)
        return {"input_size": (self.cfg.in_channels, *pre.get("img_size", self.cfg.img_size)), "mean": tuple(pre["mean"]),
                "std": tuple(pre["std"]), "interpolation": pre.get("interpolation", "bicubic"),
                "crop_pct": pre.get("crop_pct", 1.0),  # preprocess_image's defaults, for a hand-written config
                "crop_mode": crop_mode(pre), "num_classes": self.cfg.num_classes, "classifier": "head.fc",
                "first_conv": first_conv_weight({n: p.shape for n, p in self.named_parameters()}).removesuffix(".weight")}

    default_cfg = pretrained_cfg  # timm's older name

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def no_weight_decay(self) -> set[str]:
        """The parameters trained without weight decay besides biases and norms (which timm's optimiser
        factory leaves out by their shape): the prefix tokens, positions and BEiT's tables."""
        return {name for name, _ in self.named_parameters() if name.endswith(NO_DECAY_NAMES)}

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's layer grouping (``create_optimizer_v2(model, layer_decay=...)``): the stem, each block,
        the final token norm with the last block; what matches nothing (the head) comes last."""
        return {"stem": r"^patch_embed",
                "blocks": r"^encoder\.blocks\.(\d+)" if coarse else
                [(r"^encoder\.blocks\.(\d+)", None), (r"^encoder\.norm", (self.cfg.depth - 1,))]}

    # --- the forward pass, split as timm splits it ---------------------------------------
    def rope_embedding(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """The rotary positions (sin, cos) of the patches of images shaped like ``x``, or None
        (``cfg.rope="none"``): each input's own grid has its own; the configured grid's are kept."""
        if self.cfg.rope == "none":
            return None
        grid = (x.shape[-2] // self.cfg.patch_size, x.shape[-1] // self.cfg.patch_size)
        # statically_known_true: a symbolic size (torch.export's dynamic image size) is not guarded on;
        # TorchScript's tracer (and the ONNX export on it) records sizes as tensors: tables in the graph
        if not torch.jit.is_tracing() and all(statically_known_true(n == m) for n, m in zip(grid, self.cfg.grid_size)):
            return self.rope_sin, self.rope_cos
        return self._rope_tables(grid, x.device)

    def forward_features(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """(B, C, H, W) -> (B, N, E): all tokens after the encoder (and its final norm)."""
        return self.encoder(self.patch_embed(x), mask=mask, rope=self.rope_embedding(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, N, E) -> (B, num_classes), or the pooled (B, E) features with ``pre_logits=True``."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """(B, C, H, W) -> (B, num_classes). A class-token head reads one token (DeiT's, two), so the
        last block computes only those (their keys and values still come from every token): about 7% of
        ViT-B/16's work saved, logits unchanged. ``forward_features`` gives every token."""
        if self.head.pool == "cls" and mask is None and not self._last_block_watched():
            read = 1 + int(self.cfg.dist_token)  # registers, after these, are read by no head
            tokens = self.encoder(self.patch_embed(x), last_queries=read, rope=self.rope_embedding(x))  # (B, 1|2, E)
            return self.forward_head(tokens)  # -> (B, classes)
        return self.forward_head(self.forward_features(x, mask=mask))

    def _last_block_watched(self) -> bool:
        """Whether a forward hook would see the last block's or the final norm's tokens (a feature
        extractor's hook on ``encoder.blocks[-1]``): they then get every token, as from timm's model."""
        if _global_hooks():
            return True
        stack = [self.encoder.blocks[-1], self.encoder.norm]  # a walk by hand: Module.modules() costs 2.5x,
        while stack:  # and a call per module (layers._watched) 1.2x
            module = stack.pop()
            if module._forward_hooks or module._forward_pre_hooks:
                return True
            stack.extend(module._modules.values())
        return False

    # --- a look inside ------------------------------------------------------------------
    def forward_intermediates(
        self,
        x: Tensor,
        layers: int | Iterable[int] | None = None,
        return_attention: bool = False,
        output_fmt: str = "NLC",
        norm: bool = False,
        mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Run the model and return what the chosen blocks produce, by name.

        ``layers``: block indices (negative counts from the end), or an int n for the last n
        blocks; default all. Returns ``{"logits", "features", "block{i}"...}`` plus
        ``"attn{i}"`` (B, h, N, N) probabilities when ``return_attention``. Only the chosen
        blocks take the math path; the others stay on the fused kernel (under autograd in bf16 on CPU,
        every block takes the math path: ``layers.lean_training``).
        ``output_fmt="NCHW"`` gives patch tokens as (B, E, H/p, W/p) maps for dense tasks.
        """
        depth = len(self.encoder.blocks)
        if layers is None:
            chosen = set(range(depth))
        elif isinstance(layers, int):
            if not 1 <= layers <= depth:
                raise ValueError(f"layers: expected the number of last blocks, 1 to {depth}, or block indices; got {layers}")
            chosen = set(range(depth - layers, depth))
        else:
            chosen = {i % depth if -depth <= i < depth else _bad_layer(i, depth) for i in layers}
        if output_fmt not in ("NLC", "NCHW"):
            raise ValueError(f"output_fmt: expected 'NLC' or 'NCHW', got {output_fmt!r}")
        grid = (x.shape[-2] // self.cfg.patch_size, x.shape[-1] // self.cfg.patch_size)
        out: dict[str, Tensor] = {}
        tokens, rope = self.patch_embed(x), self.rope_embedding(x)
        for i, block in enumerate(self.encoder.blocks):
            if i in chosen and return_attention:
                tokens, out[f"attn{i}"] = block(tokens, mask=mask, return_attention=True, rope=rope)
            else:
                tokens = block(tokens, mask=mask, rope=rope)
            if i in chosen:
                tap = self.encoder.norm(tokens) if norm else tokens
                if output_fmt == "NCHW":
                    tap = rearrange(tap[:, self.cfg.num_prefix_tokens:], "b (gh gw) e -> b e gh gw",
                                    gh=grid[0], gw=grid[1])
                out[f"block{i}"] = tap
        features = self.encoder.norm(tokens)
        out["features"] = features
        out["logits"] = self.forward_head(features)
        return out

    def set_fused_attention(self, fused: bool) -> None:
        """Switch every block between the fused kernel and the explicit math path."""
        for block in self.encoder.blocks:
            block.attn.fused = fused

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new, freshly initialised classifier for ``num_classes`` classes. ``global_pool`` (timm's
        argument) may name the pooling the model has (timm's "token"/"avg"/"map" or vitkit's names);
        another pooling changes the head's parts: ``load_pretrained(path, pool=..., final_norm=...)``."""
        from .convert.timm import GLOBAL_POOL

        vitkit_pool = {timm_name: ours for ours, timm_name in GLOBAL_POOL.items()}.get(global_pool, global_pool)
        if global_pool is not None and vitkit_pool != self.cfg.pool:
            raise ValueError(f"reset_classifier: global_pool={global_pool!r}, but this model pools with "
                             f"{self.cfg.pool!r}; another pooling: load_pretrained(path, pool=..., final_norm=...) "
                             f"or `vitkit train --head-pool`")
        self.cfg = self.cfg.replace(num_classes=num_classes)
        like = next(self.patch_embed.parameters())  # the model's device and dtype (a bf16 model's head is bf16)

        def fresh() -> nn.Module:
            fc = nn.Linear(self.cfg.num_features, num_classes) if num_classes > 0 else nn.Identity()
            init_weights(fc)
            return fc.to(device=like.device, dtype=like.dtype)

        self.head.fc = fresh()
        if self.head.fc_dist is not None:
            self.head.fc_dist = fresh()


def _bad_layer(i: int, depth: int) -> int:
    raise ValueError(f"layers: block index {i} is out of range for a model of depth {depth}")


def create_model(name: str | ViTConfig, pretrained: str | os.PathLike | bool | None = None, **overrides) -> ViT:
    """Build a model from the variant table (``list_models()``) or a ViTConfig.

    A variant's model reads images as the weights timm names it for do (``preprocess``, what
    ``pretrained_cfg``, ``vitkit predict`` and its saved checkpoints follow: ``checkpoint.default_preprocess``).
    ``pretrained`` is a vitkit checkpoint (directory or .safetensors file); when the
    overrides change the image size or the number of classes, positions are resampled and
    the classifier is re-initialised (see ``vitkit.checkpoint``).

    ``overrides`` are ViTConfig's fields, or the seed's or timm's names for them (``config.SEED_NAMES``,
    ``config.TIMM_NAMES``): ``timm.create_model(name, num_classes=10, in_chans=1, global_pool="avg",
    init_values=1e-5)`` builds the same network here.
    """
    if pretrained is True:
        raise ValueError("pretrained=True: vitkit has no weight hub; pass a vitkit checkpoint (directory or "
                         ".safetensors), or read a timm/HF/torchvision/JAX file with vitkit.convert.load first")
    if pretrained is not None and pretrained is not False:  # False: timm's spelling of "no weights"
        from .checkpoint import load_pretrained

        return load_pretrained(pretrained, **overrides)
    from .checkpoint import default_preprocess

    if isinstance(name, ViTConfig):
        model = ViT(name, **overrides)
        model.preprocess = default_preprocess(model.cfg)
        return model
    cfg = get_config(name, **overrides)
    if overrides.get("drop_rate") and variant_preprocess(name) is not None:  # a name timm has (its rows name only those)
        import warnings

        # code ported from timm.create_model(name, drop_rate=...) means the head's dropout; beside timm's own names
        # get_config refuses it, alone it cannot tell
        warnings.warn(f"drop_rate={overrides['drop_rate']!r}: vitkit's drop_rate is the dropout after the attention "
                      "and MLP projections (timm's proj_drop_rate); timm.create_model's is the head's (vitkit's "
                      "head_drop_rate). Pass proj_drop_rate or head_drop_rate to say which", stacklevel=2)
    model = ViT(cfg)
    model.preprocess = default_preprocess(cfg, name)
    return model


__all__ = ["TransformerEncoder", "ClassificationHead", "ViT", "create_model"]
