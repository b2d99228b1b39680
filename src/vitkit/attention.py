"""Where a ViT looks: attention rollout, last-layer maps, and overlays on the image.

Two maps, both (B, gh, gw) over the patch grid and summing to 1 per image:

* ``last_layer_map``: the last block's attention from the class token to the patches
  (or, for a model without a class token, the mean over all query tokens).
* ``attention_rollout``: Abnar and Zuidema (2020), "Quantifying Attention Flow in
  Transformers": fuse the heads of each layer, add the identity for the residual
  connection (0.5 * A + 0.5 * I, rows renormalised), and multiply the layers together,
  so the map follows attention through the whole network rather than one layer.

The maps come out of the model's own blocks: only the blocks whose attention is needed
take the math path (``ViT.forward_intermediates``), the rest keep the fused kernel.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import fast

HEAD_FUSIONS = ("mean", "max", "min")
METHODS = ("rollout", "last-layer")


def parse_head(value: str | int) -> str | int:
    """``"mean"``/``"max"``/``"min"`` or a head index (``"3"`` -> 3), as the CLI's ``--head`` takes it."""
    if isinstance(value, int) or value in HEAD_FUSIONS:
        return value
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--head: expected one of {HEAD_FUSIONS} or a head index, got {value!r}") from None


def fuse_heads(att: Tensor, head: str | int = "mean") -> Tensor:
    """(B, h, N, N) attention -> (B, N, N): the mean, max or min over heads, or one head."""
    if head == "mean":
        return att.mean(dim=1)
    if head == "max":
        return att.amax(dim=1)
    if head == "min":
        return att.amin(dim=1)
    if isinstance(head, int) and not isinstance(head, bool):
        if not -att.shape[1] <= head < att.shape[1]:
            raise ValueError(f"head: index {head} is out of range for a model with {att.shape[1]} heads")
        return att[:, head]
    raise ValueError(f"head: expected one of {HEAD_FUSIONS} or a head index, got {head!r}")


def patch_grid(model, x: Tensor) -> tuple[int, int]:
    """The (gh, gw) patch grid the model lays over an input of x's size."""
    return (x.shape[-2] // model.cfg.patch_size, x.shape[-1] // model.cfg.patch_size)


def token_map(att: Tensor, num_prefix_tokens: int, grid: tuple[int, int], class_token: bool | None = None) -> Tensor:
    """(..., N, N) attention (or joint attention) -> (..., gh, gw) map over the patches, summing to 1.

    With a class token (token 0; by default, whenever there are prefix tokens): its row (what the
    class token reads from each patch). Without one: the mean over all query tokens of how much each
    patch is attended to. Prefix tokens (class, distillation, registers) are not image regions.
    """
    class_token = bool(num_prefix_tokens) if class_token is None else class_token
    row = att[..., 0, :] if class_token else att.mean(dim=-2)  # (..., N)
    row = row[..., num_prefix_tokens:].float()  # (..., N_patches): prefix tokens are not image regions
    row = row / row.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(row.dtype).tiny)
    return row.reshape(*row.shape[:-1], grid[0], grid[1])  # (..., gh, gw)


@torch.no_grad()
def last_layer_map(model, x: Tensor, head: str | int = "mean", per_head: bool = False, layer: int = -1) -> Tensor:
    """(B, C, H, W) -> (B, gh, gw), or (B, h, gh, gw) with ``per_head``: one block's attention map.

    Only block ``layer`` (default the last) takes the math path; the others stay fused.
    """
    depth = len(model.encoder.blocks)
    if not -depth <= layer < depth:
        raise ValueError(f"layer: block index {layer} is out of range for a model of depth {depth}")
    index = layer % depth
    att = model.forward_intermediates(x, layers=[index], return_attention=True)[f"attn{index}"]  # (B, h, N, N)
    if not per_head:
        att = fuse_heads(att, head)  # (B, N, N)
    return token_map(att, model.cfg.num_prefix_tokens, patch_grid(model, x), model.cfg.class_token)


def rollout_step(joint: Tensor | None, att: Tensor, head: str | int = "mean", residual: float = 0.5) -> Tensor:
    """Fold one layer's (B, h, N, N) attention into the joint attention (B, N, N) of the layers below.

    Holds, besides ``att`` and ``joint``, two (B, N, N) fp32 tensors at most: the mixed layer and the new
    product (``attention_bytes`` counts them); ``att`` and ``joint`` are left as they are.
    """
    # fused in fp32 (a bf16 mean would round), without an fp32 copy of every head
    a = att.mean(dim=1, dtype=torch.float32) if head == "mean" else fuse_heads(att, head).float()  # (B, N, N)
    # max/min fusions are not row-stochastic: renormalise before mixing in the residual. A new tensor:
    # one head of fp32 attention is a view of att, which the in-place steps below must not change
    a = a / a.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    a.mul_(1.0 - residual).diagonal(dim1=-2, dim2=-1).add_(residual)  # the residual stream: r * I + (1 - r) * A
    a.div_(a.sum(dim=-1, keepdim=True))
    return a if joint is None else a @ joint  # layer l's mixing applied after layers < l


@torch.no_grad()
def attention_rollout(model, x: Tensor, head: str | int = "mean", residual: float = 0.5) -> Tensor:
    """(B, C, H, W) -> (B, gh, gw): attention rollout through every block.

    Each layer's attention is folded into a (B, N, N) running product as soon as it is
    computed, so memory stays at one layer's attention whatever the depth.
    """
    if not 0.0 <= residual < 1.0:
        raise ValueError(f"residual: expected a weight in [0, 1), got {residual!r}")
    tokens, rope = model.patch_embed(x), model.rope_embedding(x)  # (B, N, E), rotary positions or None
    joint = None
    for block in model.encoder.blocks:
        tokens, att = block(tokens, return_attention=True, rope=rope)  # att: (B, h, N, N)
        joint = rollout_step(joint, att, head, residual)
        del att  # not held while the next block computes its own
    return token_map(joint, model.cfg.num_prefix_tokens, patch_grid(model, x), model.cfg.class_token)


def _tokens(model, x: Tensor) -> int:
    """N, the tokens of x's attention: the prefix tokens and x's patches."""
    gh, gw = patch_grid(model, x)
    return model.cfg.num_prefix_tokens + gh * gw


def attention_bytes(model, x: Tensor, method: str = "rollout") -> int:
    """Bytes the attention maps of x hold at their peak, counted in (B, N, N) fp32 tensors (N: the tokens).

    One block's math-path attention holds its logits and its probabilities, 2h tensors (3h with BEiT's
    relative position bias, which is added to the logits as one more); rollout keeps its running product
    beside them (2h + 1), and folding a layer into it holds the layer's h, the product, the fused layer and
    the new product (h + 3). Measured as peak RSS growth on the CPU (a 4-head patch-4 model at 256x256:
    4,097 tokens, 9 tensors, 576 MiB), the rest of the network adds a few MiB.
    """
    tokens = _tokens(model, x)
    h = model.cfg.num_heads
    block = (3 if model.cfg.rel_pos_bias else 2) * h
    tensors = max(block + 1, h + 3) if method == "rollout" else block
    return x.shape[0] * tensors * tokens**2 * 4


def check_attention_fits(model, x: Tensor, method: str = "rollout") -> None:
    """A clear error, in place of the kernel's out-of-memory kill, when the attention maps of x cannot
    fit in the memory the device has free now (``attention_bytes``: they grow with the square of the
    tokens; a 4-head patch-2 model at 320x480 has 38,400: about 49 GiB a layer)."""
    tokens = _tokens(model, x)
    need = attention_bytes(model, x, method)
    have = fast.device_memory(x.device, available=True)
    if have is not None and need > have:
        where = "free on this GPU" if x.device.type == "cuda" else f"available on this {x.device.type}"
        raise ValueError(f"attention maps of a {x.shape[-2]}x{x.shape[-1]} input: {tokens:,} tokens (patch "
                         f"{model.cfg.patch_size}), so {method} takes about {need / 2**30:.1f} GiB, more than the "
                         f"{have / 2**30:.1f} GiB {where}; use a smaller --img-size or batch")


def attention_map(model, x: Tensor, method: str = "rollout", head: str | int = "mean",
                  per_head: bool = False) -> Tensor:
    """One entry point for both methods: (B, gh, gw), or (B, h, gh, gw) for per-head last-layer maps."""
    if method in METHODS:
        check_attention_fits(model, x, method)
    if method == "rollout":
        if per_head:
            # Head i of one layer and head i of the next are unrelated: a per-head rollout means nothing.
            raise ValueError("--per-head: per-head maps are defined for --method last-layer only")
        return attention_rollout(model, x, head=head)
    if method == "last-layer":
        return last_layer_map(model, x, head=head, per_head=per_head)
    raise ValueError(f"method: expected one of {METHODS}, got {method!r}")


# --- pictures ---------------------------------------------------------------------------
# What save_attention_figure writes, by the file's suffix: matplotlib's Agg canvas formats (JPEG and
# WebP through Pillow), less its raw buffers and pgf, which needs LaTeX.
FIGURE_FORMATS = ("png", "jpg", "jpeg", "pdf", "svg", "svgz", "eps", "ps", "tif", "tiff", "webp")


def figure_format(path: str | os.PathLike) -> str:
    """The format a figure at ``path`` is written in, from its suffix (``a.JPG`` -> ``"jpg"``), or a
    ValueError naming the file and the suffixes taken."""
    suffix = os.path.splitext(os.fspath(path))[1].lower().lstrip(".")
    if suffix not in FIGURE_FORMATS:
        found = f"its suffix .{suffix}" if suffix else "no suffix"
        raise ValueError(f"--out {os.fspath(path)}: the picture's format is taken from the file's suffix, expected one "
                         f"of {', '.join('.' + f for f in FIGURE_FORMATS)}; found {found}")
    return suffix


def check_cmap(cmap: str) -> str:
    """``cmap`` if matplotlib has a colormap of that name, else a ValueError naming it and a few it has."""
    from matplotlib import colormaps

    if cmap not in colormaps:
        import difflib

        close = difflib.get_close_matches(cmap, list(colormaps), n=3)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise ValueError(f"--cmap {cmap}: not a matplotlib colormap{hint}; expected one such as jet, viridis, magma, gray "
                         f"(matplotlib.colormaps lists all {len(colormaps)})")
    return cmap


def check_alpha(alpha: float) -> float:
    """``alpha``, the map's opacity, if it is in [0, 1] (matplotlib would clip the blend), else a ValueError."""
    if not 0.0 <= alpha <= 1.0:  # NaN too
        raise ValueError(f"--alpha: expected an opacity from 0 (the image only) to 1 (the map only), got {alpha}")
    return alpha


def denormalize(x: Tensor, preprocess: dict) -> np.ndarray:
    """A preprocessed (C, H, W) tensor back to an (H, W, 3) float image in [0, 1] for display."""
    c = x.shape[0]
    mean = torch.tensor(preprocess.get("mean", [0.5] * c), dtype=torch.float32)[:, None, None]
    std = torch.tensor(preprocess.get("std", [0.5] * c), dtype=torch.float32)[:, None, None]
    img = (x.detach().float().cpu() * std + mean).clamp(0, 1)  # (C, H, W)
    img = img.expand(3, -1, -1) if c == 1 else img  # grayscale shown as RGB
    return img.permute(1, 2, 0).numpy()  # (H, W, 3)


def upsample_map(amap: Tensor, size: tuple[int, int]) -> np.ndarray:
    """(gh, gw) map -> (H, W) in [0, 1], bilinear, stretched from its minimum to its maximum for display."""
    m = F.interpolate(amap.detach().float().cpu()[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    m = m - m.min()
    return (m / m.max().clamp_min(1e-12)).numpy()


def overlay(image: np.ndarray, amap: Tensor, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a (gh, gw) map, upsampled and coloured, over an (H, W, 3) image in [0, 1]."""
    from matplotlib import colormaps

    check_alpha(alpha)
    heat = colormaps[check_cmap(cmap)](upsample_map(amap, image.shape[:2]))[..., :3]  # (H, W, 3)
    return (1.0 - alpha) * image + alpha * heat


def save_attention_figure(
    path: str | os.PathLike,
    image: np.ndarray,
    maps: Tensor,
    title: str | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
    dpi: int = 100,
) -> None:
    """Write a picture: the image, then one overlay per map ((gh, gw) one map, (h, gh, gw) one per head),
    in the format of the file's suffix (``FIGURE_FORMATS``: PNG, JPEG, PDF, SVG, ...).

    Drawn with matplotlib's Agg canvas (no display, no global pyplot state) and written atomically.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .checkpoint import atomic_file

    fmt = figure_format(path)
    check_alpha(alpha)
    check_cmap(cmap)
    maps = maps[None] if maps.ndim == 2 else maps  # (P, gh, gw)
    panels = [("input", image)] + [
        ("attention" if len(maps) == 1 else f"head {i}", overlay(image, m, alpha, cmap)) for i, m in enumerate(maps)
    ]
    cols = min(len(panels), 5)
    rows = -(-len(panels) // cols)
    panel_h = 3 * image.shape[0] / image.shape[1] + 0.4  # 3 inches wide, the image's aspect, a title line
    fig = Figure(figsize=(3 * cols, panel_h * rows + (0.4 if title else 0)), dpi=dpi)
    FigureCanvasAgg(fig)
    for k, (name, img) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.imshow(img, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_file(path) as f:
        fig.savefig(f, format=fmt)


__all__ = [
    "FIGURE_FORMATS",
    "check_alpha",
    "check_cmap",
    "figure_format",
    "attention_map",
    "attention_rollout",
    "last_layer_map",
    "fuse_heads",
    "token_map",
    "rollout_step",
    "overlay",
    "denormalize",
    "save_attention_figure",
]
