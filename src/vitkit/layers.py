"""The seed tutorial's building blocks, under its names, with its bugs fixed.

Reading order follows the tutorial: PatchEmbedding -> MultiHeadAttention -> ResidualAdd
-> FeedForwardBlock -> TransformerEncoderBlock. Shapes use B batch, C channels, H/W image
height/width, N tokens, E width, h heads, d head width (E = h * d).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn.modules import module as nn_module

from .config import to_2tuple


def trunc_normal_(tensor: Tensor, std: float = 0.02) -> Tensor:
    """timm's initialisation for tokens and positions: N(0, std) truncated at +-2 (absolute)."""
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2.0, b=2.0)


def resample_positions(
    positions: Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int], num_prefix_tokens: int,
    always: bool = False,
) -> Tensor:
    """Resize a (1, prefix + gh*gw, E) position table to another patch grid.

    Bicubic with antialiasing, computed in float32, prefix (class) tokens kept apart:
    the same recipe as timm's ``resample_abs_pos_embed``, so checkpoints resampled by
    either library agree.
    """
    if not always and tuple(new_grid) == tuple(old_grid):
        return positions
    prefix, grid = positions[:, :num_prefix_tokens], positions[:, num_prefix_tokens:]
    dtype = grid.dtype
    grid = rearrange(grid.float(), "1 (gh gw) e -> 1 e gh gw", gh=old_grid[0], gw=old_grid[1])
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", antialias=True, align_corners=False)
    grid = rearrange(grid, "1 e gh gw -> 1 (gh gw) e").to(dtype)
    return torch.cat([prefix, grid], dim=1)


def adapt_input_channels(weight: Tensor, in_channels: int) -> Tensor:
    """A first convolution's (out, C, kh, kw) weight for ``in_channels`` input channels instead of C.

    timm's ``adapt_input_conv`` rules, so a checkpoint adapted by either library agrees: to one
    channel, the sum over the old ones (a grey image x gives what (x, x, x) gave); from three, the
    channels repeated and scaled by 3 / in_channels. From one channel the copies are scaled by
    1 / in_channels, so an image whose channels are equal gives what the grey one gave.
    """
    old = weight.shape[1]
    if in_channels == old:
        return weight
    dtype, w = weight.dtype, weight.float()
    if in_channels == 1:
        w = w.sum(dim=1, keepdim=True)
    elif old in (1, 3):
        w = w.repeat(1, -(-in_channels // old), 1, 1)[:, :in_channels] * (old / in_channels)
    else:
        raise ValueError(f"in_channels: cannot adapt a first convolution of {old} input channels to "
                         f"{in_channels}; expected a 1- or 3-channel checkpoint, or 1 channel asked for")
    return w.to(dtype)


def conv_stem(in_channels: int, patch_size: int, emb_size: int) -> nn.Sequential:
    """(B, C, H, W) -> (B, E, H/p, W/p): a 3x3 conv at full resolution, then log2(p) 3x3
    stride-2 convs, each with GELU, then a 1x1 conv.

    Xiao et al. 2021's stem, without its BatchNorm (no running statistics to keep in step with
    an EMA or across ranks), and led by a stride-1 conv as in Hassani et al. 2021's compact
    transformers, so that the first downsampling already sees local features. Channels double
    from E/p up to E.
    """
    steps = patch_size.bit_length() - 1  # p = 2**steps
    widths = [max(emb_size >> (steps - i), 8) for i in range(steps + 1)]  # E/p, ..., E/2, E
    layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], kernel_size=3, padding=1), nn.GELU()]
    for c_in, c_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1), nn.GELU()]
    layers.append(nn.Conv2d(widths[-1], emb_size, kernel_size=1))
    return nn.Sequential(*layers)


class PatchEmbedding(nn.Module):
    """Image -> patch tokens, with the class token prepended and positions added.

    A Conv2d whose kernel and stride are the patch size is a linear map of each
    flattened patch; the seed's choice, and the layout every checkpoint format uses.
    ``stem="conv"`` makes the same tokens with a small convolutional stem (``conv_stem``).
    """

    def __init__(
        self,
        in_channels: int = 3,
        patch_size: int = 16,
        emb_size: int = 768,
        img_size: int | tuple[int, int] = 224,
        class_token: bool = True,
        pos_drop_rate: float = 0.0,
        dynamic_img_size: bool = False,
        stem: str = "patch",
        dist_token: bool = False,
        reg_tokens: int = 0,
        pre_norm: bool = False,
        norm_eps: float = 1e-5,
        abs_pos: bool = True,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.img_size = to_2tuple(img_size)
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_prefix_tokens = int(class_token) + int(dist_token) + reg_tokens
        self.dynamic_img_size = dynamic_img_size
        if stem == "conv":
            self.projection = conv_stem(in_channels, patch_size, emb_size)
        else:
            # CLIP's projection (pre_norm) has no bias: the LayerNorm after it would cancel most of one
            self.projection = nn.Conv2d(in_channels, emb_size, kernel_size=patch_size, stride=patch_size,
                                        bias=not pre_norm)
        # Fix: the seed used torch.randn (std 1) for both; timm/JAX use a truncated normal, std 0.02.
        self.cls_token = nn.Parameter(trunc_normal_(torch.empty(1, 1, emb_size))) if class_token else None
        # DeiT's distillation token, after the class token; its output feeds a classifier of its own
        self.dist_token = nn.Parameter(trunc_normal_(torch.empty(1, 1, emb_size))) if dist_token else None
        # registers after it (timm's reg_token, initialised as timm does: N(0, 1e-6))
        self.reg_token = nn.Parameter(torch.randn(1, reg_tokens, emb_size) * 1e-6) if reg_tokens else None
        num_tokens = self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]
        # none where positions are relative or rotary (BEiT, DINOv3: ViTConfig.abs_pos=False)
        self.positions = nn.Parameter(trunc_normal_(torch.empty(1, num_tokens, emb_size))) if abs_pos else None
        self.pos_drop = nn.Dropout(pos_drop_rate)
        # CLIP: the tokens normalised before the first block (timm's norm_pre, CLIP's ln_pre)
        self.norm_pre = nn.LayerNorm(emb_size, eps=norm_eps) if pre_norm else None
        self.channels_last = False  # set_channels_last(True) opts in

    def set_channels_last(self, on: bool = True) -> PatchEmbedding:
        """Run the projection in NHWC (weights and input channels-last) or NCHW (the default).

        For the conv stem NHWC is faster: oneDNN's convolutions skip reordering activations and
        weights at every call, and the stem's (B, E, h, w) output is already the row-major (B, N, E)
        token layout (``benchmarks/conv_stem.py`` measures it). It stays opt-in because the
        Fashion-MNIST recipe scored lower with it in the runs so far (README, "Performance"). State
        dicts are unaffected: checkpoints are saved contiguous.
        """
        self.projection.to(memory_format=torch.channels_last if on else torch.contiguous_format)
        self.channels_last = on
        return self

    def check_input(self, x: Tensor) -> None:
        """A clear error for a wrong input, instead of a shape error from inside a conv."""
        if not isinstance(x, Tensor):
            raise TypeError(f"input: expected a torch.Tensor of shape (B, C, H, W), got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(
                f"input: expected a 4-d tensor (B, C, H, W), got {x.ndim}-d with shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"input: expected a floating-point tensor, got dtype {x.dtype}")
        weight = next(self.projection.parameters())
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"input: dtype {x.dtype} does not match the model's {weight.dtype}; use x.to(model dtype)")
        if x.device != weight.device:
            raise ValueError(f"input: on {x.device}, the model is on {weight.device}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"input: expected {self.in_channels} channel(s), got {x.shape[1]} (shape {tuple(x.shape)})"
            )
        h, w = x.shape[-2:]
        if self.dynamic_img_size:
            if h == 0 or w == 0 or h % self.patch_size or w % self.patch_size:
                raise ValueError(
                    f"input: image size {h}x{w} is not divisible by patch size {self.patch_size}"
                    + (" (an empty image)" if h == 0 or w == 0 else "")
                )
        elif (h, w) != self.img_size:
            raise ValueError(
                f"input: expected image size {self.img_size[0]}x{self.img_size[1]}, got {h}x{w}; "
                "build the model with img_size=... or dynamic_img_size=True"
            )

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.projection(x)  # (B, E, H/p, W/p)
        grid = tuple(x.shape[-2:])
        # = rearrange(x, "b e gh gw -> b (gh gw) e"), as two views: no einops parsing per call
        x = x.flatten(2).transpose(1, 2)  # (B, N_patches, E)
        prefix = [t for t in (self.cls_token, self.dist_token, self.reg_token) if t is not None]
        if prefix:  # (B, 1 or R, E) views each, no copies -> (B, prefix + N_patches, E)
            x = torch.cat([t.expand(x.shape[0], -1, -1) for t in prefix] + [x], dim=1)
        positions = self.positions
        if positions is None:  # relative or rotary positions only: the blocks add them
            # row-major (B, N, E) tokens (see below): the concatenation made them so, else a copy
            x = _dropout(self.pos_drop, x if prefix else x.contiguous())
            return x if self.norm_pre is None else self.norm_pre(x)
        # Under torch.export the grid is symbolic: resample unconditionally (exact identity at the
        # native grid) so that one exported program serves every image size.
        exporting = self.dynamic_img_size and torch.compiler.is_exporting()
        if exporting or grid != self.grid_size:  # only reachable with dynamic_img_size
            positions = resample_positions(positions, grid, self.grid_size, self.num_prefix_tokens, always=exporting)
        # Fix: the seed added in place (x += positions), which mutates a tensor autograd needs.
        # positions first: a sum takes its memory layout from its first operand, and x (with no class
        # token) is a transposed view of the conv's (B, E, N) output. The tokens must leave here row-major
        # (B, N, E): every residual add keeps its input's layout, and every LayerNorm would copy a
        # transposed stream to contiguous, forward and backward (vit_fmnist fp32 training: 24 copies a step).
        x = _dropout(self.pos_drop, positions + x)
        return x if self.norm_pre is None else self.norm_pre(x)


def expand_mask(mask: Tensor, batch: int, num_tokens: int) -> Tensor:
    """Bring a boolean attention mask (True = may attend) to a shape that broadcasts to (B, h, N, N).

    Accepted: (B, N) or (B, 1, N) key masks, (N, N) or (B, N, N) query x key masks, or (B, h, N, N).
    When the batch has as many images as there are tokens, a 2-d mask could be either: refused.
    """
    if mask.dtype != torch.bool:
        raise ValueError(f"mask: expected a boolean tensor (True = may attend), got dtype {mask.dtype}")
    if mask.ndim == 2 and batch == num_tokens and mask.shape == (batch, num_tokens):
        raise ValueError(f"mask: shape {tuple(mask.shape)} is both (B, N) and (N, N) with B = N = {batch}; "
                         f"pass a key mask as (B, 1, N) and a query x key mask as (1, N, N)")
    if mask.ndim == 2 and mask.shape == (batch, num_tokens):
        return mask[:, None, None, :]  # (B, 1, 1, N): which keys each query may see
    if mask.ndim == 2 and mask.shape == (num_tokens, num_tokens):
        return mask[None, None]  # (1, 1, N, N)
    if mask.ndim == 3 and mask.shape[-2:] in ((num_tokens, num_tokens), (1, num_tokens)):
        return mask[:, None]  # (B, 1, N|1, N)
    if mask.ndim == 4 and mask.shape[-2:] == (num_tokens, num_tokens):
        return mask
    raise ValueError(
        f"mask: expected shape (B, N), (N, N), (B, N, N) or (B, h, N, N) with B={batch}, N={num_tokens}; "
        f"got {tuple(mask.shape)}"
    )


def relative_position_index(grid: tuple[int, int]) -> Tensor:
    """(N, N) long, N = 1 + h*w: for each query and key token (the class token first, then the patches
    row by row), its entry in BEiT's relative position table. Patch pairs index their offset
    (dy, dx), (2h-1)(2w-1) entries; then class-to-patch, patch-to-class and class-to-class, the last three
    (timm's gen_relative_position_index, BEiT's layout, so the tables load as they are)."""
    h, w = grid
    cpu = torch.device("cpu")  # real even under a meta-device context: the index is a non-persistent buffer,
    # which no state dict fills in (a model built on meta, then given its weights, keeps this one)
    coords = torch.stack(torch.meshgrid(torch.arange(h, device=cpu), torch.arange(w, device=cpu),
                                        indexing="ij")).flatten(1)  # (2, h*w)
    offsets = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (h*w, h*w, 2): query minus key
    patches = (offsets[..., 0] + h - 1) * (2 * w - 1) + (offsets[..., 1] + w - 1)
    distances = (2 * h - 1) * (2 * w - 1)
    index = torch.zeros(h * w + 1, h * w + 1, dtype=torch.long, device=cpu)
    index[1:, 1:] = patches
    index[0, :] = distances  # the class token asking
    index[:, 0] = distances + 1  # a patch asking the class token
    index[0, 0] = distances + 2
    return index


def resample_patch_embed(weight: Tensor, new_size: tuple[int, int]) -> Tensor:
    """The patch projection's kernels for another patch size, (E, C, p, p) -> (E, C, P, P): FlexiViT's
    pseudo-inverse of resizing (Beyer et al. 2023; big_vision, and timm's resample_patch_embed), so that
    a patch resized to the new size (bicubic, antialiased) gives the projection the old kernels gave."""
    old_size = tuple(weight.shape[-2:])
    if old_size == tuple(new_size):
        return weight
    old_total = old_size[0] * old_size[1]
    basis = torch.eye(old_total, dtype=torch.float32).reshape(old_total, 1, *old_size)
    resize = F.interpolate(basis, size=new_size, mode="bicubic", antialias=True, align_corners=False)
    resize = resize[:, 0].permute(1, 2, 0).reshape(-1, old_total)  # (new pixels, old pixels)
    kernels = weight.float().cpu().reshape(*weight.shape[:2], -1) @ torch.linalg.pinv(resize)  # -> (E, C, P*P)
    return kernels.reshape(*weight.shape[:2], *new_size).to(weight.device, weight.dtype)


def _geometric_offsets(src: int, dst: int) -> Tensor:
    """Where a table's ``src`` offsets (-(src//2) .. src//2) sit on an axis of ``dst`` offsets: 0 and ±1
    where they were, the farther ones spread on a geometric progression out to about ±(dst//2). BEiT's
    fine-tuning code (unilm beit/run_class_finetuning.py), as timm's resize_rel_pos_bias_table has it."""
    left, right = 1.01, 1.5
    while right - left > 1e-6:  # the ratio whose progression of src//2 steps reaches dst//2
        ratio = (left + right) / 2.0
        if (1.0 - ratio ** (src // 2)) / (1.0 - ratio) > dst // 2:
            right = ratio
        else:
            left = ratio
    steps, at = [], 1.0
    for i in range(src // 2):
        steps.append(at)
        at += ratio ** (i + 1)
    return torch.tensor([-d for d in reversed(steps)] + [0.0] + steps)


def _linear_weights(points: Tensor, targets: Tensor) -> Tensor:
    """(targets, points): linear interpolation between the two points around each target, the nearest
    point's value beyond the ends (timm's RegularGridInterpolator, one axis)."""
    right = torch.bucketize(targets, points).clamp(max=len(points) - 1)
    left = (right - 1).clamp(min=0)
    to_left, to_right = (targets - points[left]).clamp(min=0), (points[right] - targets).clamp(min=0)
    on_point = (to_left == 0) & (to_right == 0)
    to_left, to_right = to_left.masked_fill(on_point, 1.0), to_right.masked_fill(on_point, 1.0)
    weights = torch.zeros(len(targets), len(points))
    rows = torch.arange(len(targets))
    weights.index_put_((rows, left), to_right / (to_left + to_right), accumulate=True)
    weights.index_put_((rows, right), to_left / (to_left + to_right), accumulate=True)
    return weights


def resample_rel_pos_table(table: Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int]) -> Tensor:
    """BEiT's relative position table for another patch grid, as BEiT's own fine-tuning at another size
    (and timm's checkpoint filter) does it: each head's (2h-1, 2w-1) patch-offset entries interpolated
    linearly from offsets placed on a geometric progression (``_geometric_offsets``), so the near offsets
    keep their biases and the far ones spread out; the class token's three entries kept.
    ``(entries, heads) -> (new entries, heads)``."""
    if tuple(old_grid) == tuple(new_grid):
        return table
    heads = table.shape[1]
    (h, w), (new_h, new_w) = old_grid, new_grid
    src, dst = (2 * h - 1, 2 * w - 1), (2 * new_h - 1, 2 * new_w - 1)
    rows, cols = (_linear_weights(_geometric_offsets(s, d), torch.arange(-(d // 2), d // 2 + 1, dtype=torch.float32))
                  for s, d in zip(src, dst))  # (new rows, rows), (new columns, columns)
    offsets = table[:-3].float().cpu().reshape(*src, heads).permute(2, 0, 1)  # -> (heads, 2h-1, 2w-1)
    offsets = rows @ offsets @ cols.t()  # -> (heads, 2H-1, 2W-1)
    offsets = offsets.permute(1, 2, 0).reshape(-1, heads).to(table.device, table.dtype)
    return torch.cat([offsets, table[-3:]])  # -> (new entries, heads)


# DINOv3's rotary positions: the periods' base (its RopePositionEmbedding's default, every published model's)
ROPE_TEMPERATURE = 100.0


def rope_dinov3(grid: tuple[int, int], head_dim: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """(sin, cos), each (h*w, head_dim) fp32: DINOv3's rotation of the patches of an h x w grid, row by row.

    Each patch's coordinates are the centres of its row and column, normalised to [-1, 1] per axis;
    the angles are 2π·coordinate/period over head_dim/4 periods per axis, rows first, laid out twice
    (the rotate-half layout). As timm's RotaryEmbeddingDinoV3 and the reference code compute them."""
    h, w = grid
    # (k + 0.5) / n, written so the length is n itself: torch.export cannot size arange(0.5, n) by a symbolic n
    centres = [(torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n for n in (h, w)]
    coords = 2.0 * torch.stack(torch.meshgrid(*centres, indexing="ij"), dim=-1).flatten(0, 1) - 1.0  # (h*w, 2)
    quarter = head_dim // 4
    periods = ROPE_TEMPERATURE ** (2.0 * torch.arange(quarter, device=device, dtype=torch.float32) / (head_dim // 2))
    angles = (2 * math.pi * coords[:, :, None] / periods).flatten(1)  # (h*w, 2, d/4) -> (h*w, d/2)
    angles = torch.cat([angles, angles], dim=-1)  # -> (h*w, d)
    return angles.sin(), angles.cos()


# EVA-02's rotary positions: the frequencies' base (timm's RotaryEmbeddingCat default, every EVA-02's)
EVA02_ROPE_TEMPERATURE = 10000.0


def rope_eva02(grid: tuple[int, int], head_dim: int, ref_grid: int, offset: float = 0.0, columns_first: bool = False,
               device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """(sin, cos), each (h*w, head_dim) fp32: EVA-02's rotation of the patches of an h x w grid, row by row.

    A patch's coordinates are its row and column index, scaled by ref_grid / h and ref_grid / w (the
    pretraining grid: fine-tuning at 448 keeps 224's range); the angles are coordinate · 10000^(-i/(d/4))
    for i < d/4 on each axis, rows first. timm (RotaryEmbeddingCat) lays each angle out twice side by
    side and rotates neighbouring pairs of a head's channels; here the layout is DINOv3's (the angles,
    then the angles again: rotate_half), which is the same rotation once the q and k channels are
    reordered, evens first (``convert.timm`` does that). The Perception Encoder's (``columns_first``, timm's
    grid_indexing="xy") adds ``offset`` to each index and gives the columns the first angles."""
    h, w = grid
    quarter = head_dim // 4
    bands = 1.0 / (EVA02_ROPE_TEMPERATURE ** (torch.arange(quarter, device=device).to(torch.float32) / quarter))
    # (index + offset) / size * reference, in timm's order, for the same rounding
    coords = [(torch.arange(n, device=device).to(torch.float32) + offset) / n * ref_grid for n in (h, w)]
    grid_coords = torch.stack(torch.meshgrid(*coords, indexing="ij"), dim=-1)  # (h, w, 2): row, column
    if columns_first:
        grid_coords = grid_coords.flip(-1)
    angles = (grid_coords[..., None] * bands).flatten(-2).flatten(0, 1)  # (h, w, 2, d/4) -> (h*w, d/2)
    angles = torch.cat([angles, angles], dim=-1)  # -> (h*w, d)
    return angles.sin(), angles.cos()


def _rotate(x: Tensor, sin: Tensor, cos: Tensor, first: int) -> Tensor:
    """x (B, h, N, d) with its tokens from ``first`` on rotated: x·cos + rotate_half(x)·sin, in fp32
    (the tables' dtype), rounded once into x's dtype; the first tokens copied as they are."""
    patches = x[:, :, first:]
    half = x.shape[-1] // 2
    # A product and two in-place halves, not cat(-x2, x1) and a sum: every pass over q or k is memory
    # traffic, and that formula made seven, four of them in fp32. On an H100 (`vitkit bench`, README
    # "On a GPU"), against timm: EVA-02-B bf16 inference went from 0.84x to 1.09x, DINOv3-B's from
    # 1.02x to 1.36x (peak 1,117 -> 828 MB), and their bf16-autocast training from 1.07x to 1.13x and
    # 1.02x to 1.22x (with _RotatePatches' backward).
    rotated = patches * cos  # (B, h, n, d), fp32
    rotated[..., :half].addcmul_(patches[..., half:], sin[..., :half], value=-1)
    rotated[..., half:].addcmul_(patches[..., :half], sin[..., half:])
    out = torch.empty_like(x)
    out[:, :, :first] = x[:, :, :first]
    out[:, :, first:] = rotated
    return out


class _RotatePatches(torch.autograd.Function):
    """``_rotate`` with its gradient written out: a rotation's transpose is the rotation by minus the
    angle, so the backward pass is the same three passes with -sin. Autograd through ``_rotate``'s
    in-place slices would add a zero-filled gradient of all of q (or k) per slice. The tables never
    take a gradient (``ViT.rope_embedding`` builds them from the grid)."""

    generate_vmap_rule = True  # torch.func.vmap (per-sample gradients) runs forward and backward as written

    @staticmethod
    def forward(x: Tensor, sin: Tensor, cos: Tensor, first: int) -> Tensor:
        return _rotate(x, sin, cos, first)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, sin, cos, ctx.first = inputs
        ctx.save_for_backward(sin, cos)
        ctx.save_for_forward(sin, cos)

    @staticmethod
    def backward(ctx, grad: Tensor):
        sin, cos = ctx.saved_tensors
        return _rotate(grad, -sin, cos, ctx.first), None, None, None

    @staticmethod
    def jvp(ctx, x_tangent: Tensor, *table_tangents) -> Tensor:
        """Forward-mode AD (``torch.autograd.forward_ad``): a rotation is linear, its tangent rotated alike."""
        sin, cos = ctx.saved_tensors
        return _rotate(x_tangent, sin, cos, ctx.first)


def _rotate_patches(x: Tensor, rope: tuple[Tensor, Tensor], num_tokens: int) -> Tensor:
    """x (B, h, n, d), the first n of num_tokens tokens, rotated where they are patches (the last
    len(sin) of the num_tokens): x·cos + rotate_half(x)·sin, computed in fp32 and returned in x's dtype."""
    sin, cos = rope
    first = num_tokens - sin.shape[0]  # the prefix tokens, not rotated
    if x.shape[2] <= first:
        return x
    n = x.shape[2] - first
    sin, cos = sin[:n], cos[:n]
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        # the formula as written, which inductor fuses into one kernel each way; _rotate's in-place
        # slices stay several (with them, compiled DINOv3-B training ran at 0.91x timm on an H100).
        # benchmarks/rotation.py times both libraries' rotations, eager and compiled. (TorchScript's
        # tracer, and the ONNX exporter built on it, cannot record an autograd Function.)
        patches = x[:, :, first:]
        half = patches.shape[-1] // 2
        rotated = torch.cat([-patches[..., half:], patches[..., :half]], dim=-1)  # rotate_half
        return torch.cat([x[:, :, :first], (patches * cos + rotated * sin).to(x.dtype)], dim=2)
    if torch.is_grad_enabled() and x.requires_grad:
        return _RotatePatches.apply(x, sin, cos, first)
    return _rotate(x, sin, cos, first)


# From this many tokens on, lean_training recomputes the attention probabilities in the backward
# pass instead of keeping them (they grow with the square of the tokens). Measured with
# benchmarks/lean_ops.py (one process, 2-core EPYC, bf16 autocast): at ViT-B/16 (197 tokens, batch 8)
# recomputing them cost 1-5% of the step for 0-77 MB of its peak; at vit_fmnist (49 tokens), 13%.
RECOMPUTE_MIN_TOKENS = 256

# The lean ops (torch.library custom ops) cost some tens of microseconds each to call, noise at ViT-B/16
# (8 x 197 x 768 = 1.2M elements into each qkv projection) but not at the small models: at any size
# (benchmarks/lean_ops.py, "lean-any-size"), they made a vit_digits step (128 x 17 x 64) 11% slower and
# a vit_fmnist step 2% slower, where memory is no concern. Below this many input elements a layer runs
# as plain autograd.
LEAN_MIN_ELEMENTS = 2**20


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` runs in: autocast's where it is on, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def lean_training(x: Tensor) -> bool:
    """True on CPU, in bf16 (or fp16), when autograd records: where vitkit swaps in its own backward.

    There torch's flash-attention backward is far slower than batched matmuls, so attention takes
    ``lean_attention`` (the math path with its backward pass written out; from ``RECOMPUTE_MIN_TOKENS``
    tokens on it recomputes the probabilities), and the Linear layers take ``lean_linear``, which
    keeps neither bf16 copies of the weights nor gelu(h) between the passes. Measured on a 2-core EPYC
    (avx512_bf16), bf16 autocast, in one process (``benchmarks/throughput.py``): a vit_fmnist training
    step (49 tokens, batch 128) ran 2.9-3.2x timm's (fused) speed, vit_digits 3.4-3.7x, ViT-B/16
    (batch 8) 1.16-1.22x with 9-20% less peak memory. In fp32 the fused backward is the faster one (vit_fmnist:
    1,129 against 1,032 images/s), and inference (no autograd) stays fused everywhere.
    """
    # cheapest first: in inference (no grad) this is asked of every Linear, and must cost nothing
    return (x.requires_grad and torch.is_grad_enabled() and x.device.type == "cpu"
            and compute_dtype(x) != torch.float32)


def lean_ops_pay(x: Tensor) -> bool:
    """``lean_training`` for an input big enough that the lean ops' call cost is noise (``LEAN_MIN_ELEMENTS``)."""
    return lean_training(x) and x.numel() >= LEAN_MIN_ELEMENTS  # in this order: no size guard when exporting


def fused_kernel_pays(q: Tensor) -> bool:
    """Whether ``F.scaled_dot_product_attention`` beats the math path for this query tensor:
    everywhere but in ``lean_training``."""
    return not lean_training(q)


# The lean ops below are torch.library custom ops, forward and backward each, rather than
# autograd.Functions: torch.compile traces a Function's forward and backward into one graph and then
# decides for itself what to keep between them (it kept gelu(h), and copies of q and k); an op is
# opaque to it, so only what setup_context saves is kept, compiled or not.


def _heads_as_batch(x: Tensor) -> Tensor:
    """(B, h, N, d) -> (B*h, N, d), a contiguous copy: q, k and v arrive as strided views of the qkv
    projection, and the batched matmuls below then read plain matrices (a transpose is free)."""
    out = x.new_empty((x.shape[0] * x.shape[1], *x.shape[2:]))
    out.view(x.shape).copy_(x)
    return out


def _scaled_bmm(a: Tensor, b: Tensor, scale: float) -> Tensor:
    """``scale · (a @ b)`` batched, the scale applied in the matmul's fp32 accumulator (alpha), not
    in a pass over an operand or the result."""
    # beta=0: the input is ignored; a broadcast zero stands in for it, allocating nothing.
    return torch.baddbmm(a.new_zeros(()).expand(a.shape[0], a.shape[1], b.shape[2]), a, b, beta=0, alpha=scale)


def _attention_probs(q: Tensor, k: Tensor, scale: float, bias: Tensor | None) -> Tensor:
    """softmax(q kᵀ · scale + bias) over the keys: (B*h, Nq, d), (B*h, N, d), (1, h, Nq, N) | None
    -> (B*h, Nq, N)."""
    energy = _scaled_bmm(q, k.transpose(1, 2), scale)
    if bias is not None:  # BEiT's relative positions, the same for every image
        energy.view(-1, *bias.shape[1:]).add_(bias)  # (B*h, Nq, N) as (B, h, Nq, N)
    return energy.softmax(dim=-1)


@torch.library.custom_op("vitkit::lean_attention", mutates_args=())
def _lean_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float,
                    keep_probabilities: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (out (B, h, Nq, d), and for the backward pass: q, k, v as (B*h, N, d), probabilities (B*h, Nq, N))."""
    with torch.autocast(q.device.type, enabled=False):  # in the inputs' dtype, softmax included
        q3, k3, v3 = _heads_as_batch(q), _heads_as_batch(k), _heads_as_batch(v)
        att = _attention_probs(q3, k3, scale, bias)
        out = torch.bmm(att, v3).view(*q.shape[:-1], v.shape[-1])  # (B*h, Nq, d) -> (B, h, Nq, d)
    return out, q3, k3, v3, att


@_lean_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float,
      keep_probabilities: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    b, h, nq, d = q.shape
    n = k.shape[2]
    return (q.new_empty((b, h, nq, v.shape[-1])), q.new_empty((b * h, nq, d)), k.new_empty((b * h, n, d)),
            v.new_empty((b * h, n, v.shape[-1])), q.new_empty((b * h, nq, n)))


@torch.library.custom_op("vitkit::lean_attention_backward", mutates_args=())
def _lean_attention_backward(d_out: Tensor, q: Tensor, k: Tensor, v: Tensor, att: Tensor | None,
                             bias: Tensor | None, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(B, h, Nq, d) gradient; (B*h, N, d) q, k, v; probabilities or None (recomputed); the bias or None
    -> the gradients of q, k and v, each (B*h, N, d), and of the bias (empty without one)."""
    with torch.autocast(q.device.type, enabled=False):
        d_out = d_out.reshape(q.shape[0], q.shape[1], -1)  # (B, h, Nq, d) -> (B*h, Nq, d)
        if att is None:
            att = _attention_probs(q, k, scale, bias)  # (B*h, Nq, N), as in the forward pass
        d_v = torch.bmm(att.transpose(1, 2), d_out)  # (B*h, N, d)
        d_att = torch.bmm(d_out, v.transpose(1, 2))  # (B*h, Nq, N)
        d_energy = torch._softmax_backward_data(d_att, att, -1, att.dtype)  # att * (d_att - rowsum(att*d_att))
        d_q = _scaled_bmm(d_energy, k, scale)  # (B*h, Nq, d)
        d_k = _scaled_bmm(d_energy.transpose(1, 2), q, scale)  # (B*h, N, d)
        # the bias is added to every image's logits: its gradient is their sum (a bf16 sum accumulates in
        # fp32; asking for an fp32 result would first copy all of d_energy to fp32)
        d_bias = q.new_empty(0) if bias is None else d_energy.view(-1, *bias.shape[1:]).sum(0, keepdim=True)
    return d_q, d_k, d_v, d_bias


@_lean_attention_backward.register_fake
def _(d_out: Tensor, q: Tensor, k: Tensor, v: Tensor, att: Tensor | None,
      bias: Tensor | None, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), \
        (q.new_empty(0) if bias is None else bias.new_empty(bias.shape))


def _lean_attention_setup(ctx, inputs, output) -> None:
    q, k, v, bias, scale, keep_probabilities = inputs
    _, q3, k3, v3, att = output
    ctx.mark_non_differentiable(q3, k3, v3, att)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for those four
    ctx.save_for_backward(q3, k3, v3, att if keep_probabilities else None, bias)
    ctx.scale, ctx.head_shapes = scale, (q.shape, k.shape, v.shape)


def _lean_attention_grad(ctx, d_out: Tensor | None, *_):
    if d_out is None:  # grads are not materialised: out took no part in the loss
        return None, None, None, None, None, None
    q3, k3, v3, att, bias = ctx.saved_tensors
    *grads, d_bias = _lean_attention_backward(d_out, q3, k3, v3, att, bias, ctx.scale)
    d_q, d_k, d_v = (g.view(shape) for g, shape in zip(grads, ctx.head_shapes))  # (B*h, N, d) -> (B, h, N, d)
    return d_q, d_k, d_v, None if bias is None else d_bias, None, None


_lean_attention.register_autograd(_lean_attention_grad, setup_context=_lean_attention_setup)


def lean_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, keep_probabilities: bool,
                   bias: Tensor | None = None) -> Tensor:
    """softmax(q kᵀ · scale + bias) v, (B, h, Nq, d) -> (B, h, Nq, d), with the backward pass written out;
    ``bias``: (1, h, Nq, N) in q's dtype, added to every image's logits (BEiT's relative positions).

    ``keep_probabilities=False`` keeps only q, k and v for the backward pass, as flash attention
    does: the (B, h, Nq, N) probabilities are recomputed there (one more batched matmul, a few
    percent of a ViT-B's FLOPs) instead of being held between the passes, which at ViT-B/16 is
    7 MB per block for a batch of 8 in bf16. No mask, no dropout: ``MultiHeadAttention._math``
    covers those.
    """
    return _lean_attention(q, k, v, bias, float(scale), keep_probabilities)[0]


# What a lean Linear applies to its input first: nothing, or GELU (exact or tanh), recomputed in
# backward. Each GELU activation (by its ViTConfig.mlp_act name, which FeedForwardBlock also reads here)
# with its F.gelu ``approximate`` argument.
LEAN_GELUS = {"gelu": "none", "gelu_tanh": "tanh"}
LEAN_ACTIVATIONS = ("identity", *LEAN_GELUS)


def _activate(x: Tensor, activation: str) -> Tensor:
    if activation == "identity":
        return x
    return F.gelu(x, approximate=LEAN_GELUS[activation])


# oneDNN's linear primitive (what inductor calls for CPU Linear layers): the bias goes into the
# matmul's accumulator as with addmm, but addmm first writes the bias into every output row, a pass
# over the output. ViT-B/16 eager inference (batch 8, benchmarks/onednn_linear.py): 1.12-1.19x in
# fp32, 1.00-1.02x in bf16. It has no autograd formula: only for what autograd does not record.
ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# Each call costs oneDNN about 13 us more than addmm, which only a large fp32 matmul earns back.
# `python benchmarks/onednn_linear.py --sizes` (2-core EPYC, 1 and 2 threads, four runs): a 17x64 by
# 64x192 fp32 Linear (vit_digits, batch 1) ran at 0.34-0.41x addmm's speed, 1.3e7 multiply-adds at
# 0.96-1.01x, 5.1e7 at 1.02-1.25x, ViT-B/16's at 1.07-1.48x. In bf16 oneDNN was the faster at every
# size (1.01-1.30x): torch's own bf16 addmm goes through it too, with more around it.
ONEDNN_LINEAR_MIN_MACS_FP32 = 2**25


def _cpu_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN's primitive where it applies (CPU, x and weight
    both fp32 or both bf16); the caller makes sure autograd and autocast are not involved, and that
    the primitive pays (``_onednn_linear_pays``)."""
    if ONEDNN_LINEAR and x.device.type == "cpu" and x.dtype == weight.dtype in (torch.float32, torch.bfloat16):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


# torch.nn.functional has no in-place GELU; torch.ops.aten.gelu_ is the same kernel through ~1.5 us
# more of Python dispatch, a fifth of a small model's GELU
_gelu_inplace = getattr(torch._C._nn, "gelu_", torch.ops.aten.gelu_)


def _onednn_linear_pays(x: Tensor, out_features: int) -> bool:
    """Whether oneDNN's primitive beats addmm for ``x`` times a (out_features, in) weight."""
    return ONEDNN_LINEAR and (x.dtype == torch.bfloat16 or (
        x.dtype == torch.float32 and x.numel() * out_features >= ONEDNN_LINEAR_MIN_MACS_FP32))


@torch.library.custom_op("vitkit::lean_linear", mutates_args=())
def _lean_linear(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str) -> Tensor:
    with torch.autocast(x.device.type, enabled=False):  # x is in the compute dtype already
        w, b = weight.to(x.dtype), None if bias is None else bias.to(x.dtype)
        return _cpu_linear(_activate(x, activation), w, b).contiguous()  # (..., in) -> (..., out)


@_lean_linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("vitkit::lean_linear_backward", mutates_args=())
def _lean_linear_backward(d_out: Tensor, x: Tensor, weight: Tensor, activation: str) -> tuple[Tensor, Tensor, Tensor]:
    """-> gradients of x (x's dtype), weight and bias (the weight's dtype: fp32 master weights)."""
    # The order is for the cache: the bias gradient while d_out is fresh from the op before, and
    # GELU's backward right after its recompute, while x is still cached (a ViT-B fc2's x is 9.7 MB).
    with torch.autocast(x.device.type, enabled=False):
        d_rows = d_out.reshape(-1, d_out.shape[-1])  # (..., out) -> (rows, out)
        d_bias = d_rows.sum(0).to(weight.dtype)
        w = weight.to(x.dtype)  # cast again: cheaper than holding the cast copy between the passes
        d_x = d_out.matmul(w)  # (..., in)
        act = _activate(x, activation)  # recomputed
        if activation != "identity":  # in place: d_x is this function's own
            torch.ops.aten.gelu_backward.grad_input(d_x, x, approximate=LEAN_GELUS[activation], grad_input=d_x)
        d_weight = d_rows.t().mm(act.reshape(-1, act.shape[-1])).to(weight.dtype)  # (out, in)
        return d_x.contiguous(), d_weight, d_bias


@_lean_linear_backward.register_fake
def _(d_out: Tensor, x: Tensor, weight: Tensor, activation: str) -> tuple[Tensor, Tensor, Tensor]:
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape[0])


def _lean_linear_setup(ctx, inputs, output) -> None:
    x, weight, bias, activation = inputs
    ctx.save_for_backward(x, weight)  # x, not gelu(x); the parameter, not a cast copy of it
    ctx.activation, ctx.has_bias = activation, bias is not None


def _lean_linear_grad(ctx, d_out: Tensor):
    d_x, d_weight, d_bias = _lean_linear_backward(d_out, *ctx.saved_tensors, ctx.activation)
    return d_x, d_weight, d_bias if ctx.has_bias else None, None


_lean_linear.register_autograd(_lean_linear_grad, setup_context=_lean_linear_setup)


def lean_linear(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str = "identity") -> Tensor:
    """``F.linear(act(x), weight, bias)`` in ``compute_dtype(x)`` that keeps, for the backward pass,
    x and the weight *parameter*: under autocast, the usual Linear keeps a bf16 copy of every weight
    (172 MB at ViT-B) from the forward pass to the backward pass; casting again there costs about a
    millisecond per ViT-B block. With ``activation="gelu"`` it keeps h, not gelu(h): the MLP's two
    (B, N, 4E) activations become one, recomputed in the backward pass.
    """
    if activation not in LEAN_ACTIVATIONS:
        raise ValueError(f"activation: expected one of {LEAN_ACTIVATIONS}, got {activation!r}")
    return _lean_linear(x.to(compute_dtype(x)), weight, bias, activation)


def _global_hooks() -> bool:
    """Whether a forward hook is registered for every module (``nn.modules.module.register_module_forward_hook``,
    FlopCounterMode's module tracker): every call is watched."""
    return bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks)


def _watched(module: nn.Module) -> bool:
    """Whether a forward hook would see ``module``'s call: one of its own, or one on every module."""
    return bool(module._forward_hooks or module._forward_pre_hooks) or _global_hooks()


def _stock(module: nn.Module, cls: type) -> bool:
    """A plain ``cls`` (nn.Linear, nn.GELU) with no hooks: one that vitkit may run through another
    function (a hook would not see the call; a subclass or a quantised layer computes something else)."""
    return type(module) is cls and not _watched(module)


def lean_linear_applies(layer: nn.Module, x: Tensor) -> bool:
    """Whether ``layer(x)`` may run as ``lean_linear``: a stock Linear where ``lean_ops_pay``."""
    return lean_ops_pay(x) and _stock(layer, nn.Linear)


def _inference_linear_applies(layer: nn.Module, x: Tensor) -> bool:
    """Whether ``layer(x)`` should run as ``_cpu_linear``: oneDNN pays for its size, and this is
    eager CPU inference, where autograd records nothing and autocast casts nothing (torch.compile and
    export trace ``layer(x)``: Inductor picks its own kernels, and an exported graph stays portable).
    The cheap questions first: a small model asks this of every Linear, at every call."""
    out_features = getattr(layer, "out_features", None)  # an attribute of the instance: no Module.__getattr__
    if out_features is None or not _onednn_linear_pays(x, out_features):
        return False
    if not _stock(layer, nn.Linear) or x.device.type != "cpu":  # a quantised layer's weight is a method
        return False
    if torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling():
        return False
    weight, bias = layer.weight, layer.bias
    return not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                             or (bias is not None and bias.requires_grad)))


def _linear(layer: nn.Module, x: Tensor, bias: Tensor | None = None) -> Tensor:
    """``layer(x)``: lean where ``lean_linear_applies``, through oneDNN's linear primitive in eager
    CPU inference where that pays, else the layer itself. ``bias``: used in place of a plain Linear's
    own (a masked copy of it)."""
    if bias is not None and isinstance(getattr(layer, "weight", None), Tensor):
        if not _stock(layer, nn.Linear):  # hooked, pruned or subclassed (LoRA): the layer runs as itself,
            out = layer(x)  # its own bias then swapped for the one asked for
            return out + (bias - layer.bias).to(out.dtype)
        if x.requires_grad and torch.is_grad_enabled():
            if lean_linear_applies(layer, x):
                return lean_linear(x, layer.weight, bias)
        elif _inference_linear_applies(layer, x):
            return _cpu_linear(x, layer.weight, bias)
        return F.linear(x, layer.weight, bias)
    if x.requires_grad and torch.is_grad_enabled():  # autograd records: never oneDNN's primitive
        if lean_linear_applies(layer, x):
            return lean_linear(x, layer.weight, layer.bias)
    elif _inference_linear_applies(layer, x):
        return _cpu_linear(x, layer.weight, layer.bias)
    return layer(x)


def _heads_first(projected: Tensor) -> tuple[Tensor, ...]:
    """(B, N, k, h, d) -> k views (B, h, N, d); no copies.

    Unbinding dim 2 before moving the heads, rather than permuting to (k, B, h, N, d) first as timm
    does, matters to the backward pass: torch's attention kernels return gradients laid out
    (B, N, h, d), so autograd stacks them straight into the (B, N, k, h, d) layout of the Linear's
    output gradient, one copy instead of a stack and then a reshape copy. Where autograd does not
    record, one permute makes the same views (k + 1 view ops fewer: small models are call-bound).
    """
    if projected.requires_grad:
        return tuple(t.transpose(1, 2) for t in projected.unbind(2))
    return projected.permute(2, 0, 3, 1, 4).unbind(0)  # (B, N, k, h, d) -> k x (B, h, N, d)


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention with a fused kernel and a readable math twin.

    ``fused=True`` (default) calls ``F.scaled_dot_product_attention`` wherever it is the faster
    kernel (``fused_kernel_pays``); ``fused=False`` always takes the math path, the seed's
    einsum form with its bugs fixed, which can also return the attention probabilities.
    q, k and v come from one Linear laid out as (qkv, h, d), the layout timm and JAX
    checkpoints use (the seed put the qkv axis innermost, which no checkpoint uses).
    """

    def __init__(
        self,
        emb_size: int = 768,
        num_heads: int = 8,
        dropout: float = 0.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        fused: bool = True,
        rel_pos_grid: tuple[int, int] | None = None,
        mask_k_bias: bool = False,
        norm: bool = False,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        if emb_size % num_heads:
            raise ValueError(f"MultiHeadAttention: emb_size {emb_size} is not divisible by num_heads {num_heads}")
        self.emb_size = emb_size
        self.num_heads = num_heads
        self.head_dim = emb_size // num_heads
        # Fix: the seed divided by sqrt(emb_size) *after* the softmax; attention scales the
        # logits by 1/sqrt(head_dim) *before* it (Vaswani et al., eq. 1).
        self.scale = self.head_dim**-0.5
        self.fused = fused
        self.qkv = nn.Linear(emb_size, emb_size * 3, bias=qkv_bias)
        self.att_drop = nn.Dropout(dropout)
        # EVA-02 CLIP's sub-LN (timm's scale_attn_inner): the heads' output normalised before the projection
        self.norm = nn.LayerNorm(emb_size, eps=norm_eps) if norm else None
        self.projection = nn.Linear(emb_size, emb_size)
        self.proj_drop = nn.Dropout(proj_drop)
        # BEiT's relative position bias (rel_pos_grid: the patch grid; one class token before it):
        # a learned logit offset per head and relative position, zeros at first as in BEiT
        self.rel_pos_bias_table = None
        self.register_buffer("rel_pos_index", None, persistent=False)
        if rel_pos_grid is not None:
            entries = (2 * rel_pos_grid[0] - 1) * (2 * rel_pos_grid[1] - 1) + 3
            self.rel_pos_bias_table = nn.Parameter(torch.zeros(entries, num_heads))
            self.register_buffer("rel_pos_index", relative_position_index(rel_pos_grid), persistent=False)
        # Rotary positions rotate each key with its bias, so a k bias no longer shifts a query's logits alike:
        # DINOv3 masks it out (its LinearKMaskedBias; timm's Eva has none), and so does vitkit: its gradient
        # is then exactly zero, the bias stays as loaded (zero), and exports drop nothing.
        self.mask_k_bias = mask_k_bias and qkv_bias

    def _qkv_bias(self) -> Tensor | None:
        """The qkv bias the projection adds: with ``mask_k_bias``, its k third zero (else None: the layer's own)."""
        bias = getattr(self.qkv, "bias", None)
        if not self.mask_k_bias or not isinstance(bias, Tensor):
            return None
        e = self.emb_size
        return torch.cat([bias[:e], bias.new_zeros(e), bias[2 * e:]])  # (3E,): q | 0 | v

    def relative_position_bias(self) -> Tensor:
        """(1, h, N, N): the logit offsets that the table gives each query and key (BEiT)."""
        n = self.rel_pos_index.shape[0]
        # Each head's (N, N) block contiguous: adding a permuted (N, N, h) gather to the logits, and
        # scattering its gradient back, took ~5x longer. An fp32 table (training, under autocast too) is
        # gathered along its transpose's rows, fast both ways; a bf16 one (inference) row by row, then
        # transposed: the strided gather is ~4x slower in bf16, and an fp32 copy cost 16 MB of peak memory.
        table, index = self.rel_pos_bias_table, self.rel_pos_index.view(-1)
        if table.dtype == torch.float32:
            bias = table.t().index_select(1, index)  # (h, entries) -> (h, N*N)
        else:
            bias = table.index_select(0, index).t().contiguous()  # (entries, h) -> (N*N, h) -> (h, N*N)
        return bias.view(1, -1, n, n)  # (h, N*N) -> (1, h, N, N)

    def forward(self, x: Tensor, mask: Tensor | None = None, return_attention: bool = False,
                num_queries: int | None = None, rope: tuple[Tensor, Tensor] | None = None):
        """(B, N, E) -> (B, N, E). ``num_queries=q``: only the first q tokens ask (their outputs,
        (B, q, E), are all that is computed), still attending to all N tokens; no mask then.
        ``rope``: (sin, cos) of the patches (``rope_dinov3``, ``rope_eva02``), which rotate their queries and keys."""
        b, n, _ = x.shape
        if num_queries is not None:
            if mask is not None:
                raise ValueError("MultiHeadAttention: num_queries does not take a mask")
            queries, keys, values = self._split_qkv(x, num_queries)
            n_out = num_queries
        else:
            queries, keys, values = self._project_qkv(x)
            n_out = n
        if rope is not None:
            queries, keys = _rotate_patches(queries, rope, n), _rotate_patches(keys, rope, n)
        if mask is not None:
            mask = expand_mask(mask, b, n)
            # A query that may attend to nothing gets a zero output, not NaN, on both paths:
            # let it attend everywhere (finite softmax, finite gradients), then zero its output.
            attends_nothing = ~mask.any(dim=-1, keepdim=True)  # (B|1, h|1, N|1, 1)
            mask = mask | attends_nothing
        # What is added to the logits: the boolean mask, or BEiT's bias (with the mask's -inf folded in)
        logit_mask = mask
        if self.rel_pos_bias_table is not None:
            logit_mask = self.relative_position_bias()[:, :, :n_out].to(queries.dtype)  # (1, h, q, N)
            if mask is not None:
                logit_mask = logit_mask.masked_fill(~mask, float("-inf"))
        # ONNX's exporter decomposes SDPA with a float mask into ops whose strides its later view of the
        # output cannot take (torch 2.14): with BEiT's bias it exports the math path, the same function
        onnx_with_bias = logit_mask is not None and logit_mask.is_floating_point() and torch.onnx.is_in_onnx_export()
        if self.fused and not return_attention and fused_kernel_pays(queries) and not onnx_with_bias:
            out, att = self._fused(queries, keys, values, logit_mask), None
        elif (self.fused and not return_attention and mask is None and not (self.training and self.att_drop.p)
              and lean_ops_pay(keys)):  # logit_mask: BEiT's bias, or None
            recompute = keys.shape[-2] >= RECOMPUTE_MIN_TOKENS
            out, att = lean_attention(queries, keys, values, self.scale, keep_probabilities=not recompute,
                                      bias=logit_mask), None
        else:
            out, att = self._math(queries, keys, values, logit_mask)
        if mask is not None:
            out = out.masked_fill(attends_nothing, 0.0)
            if att is not None:
                att = att.masked_fill(attends_nothing, 0.0)
        out = out.transpose(1, 2).reshape(b, n_out, self.emb_size)  # (B, h, N, d) -> (B, N, E)
        if self.norm is not None:
            out = self.norm(out)
        out = _dropout(self.proj_drop, _linear(self.projection, out))
        return (out, att) if return_attention else out

    def _project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, N, E) -> q, k, v, each (B, h, N, d)."""
        b, n, _ = x.shape
        qkv = _linear(self.qkv, x, self._qkv_bias()).reshape(b, n, 3, self.num_heads, self.head_dim)  # -> (B, N, 3, h, d)
        return _heads_first(qkv)

    def _split_qkv(self, x: Tensor, num_queries: int) -> tuple[Tensor, Tensor, Tensor]:
        """Queries of the first ``num_queries`` tokens only, keys and values of all: the rows of
        the fused qkv weight, used as they are (contiguous slices, no copies)."""
        b, n, e = x.shape
        weight, bias = getattr(self.qkv, "weight", None), getattr(self.qkv, "bias", None)
        if not isinstance(weight, Tensor) or not _stock(self.qkv, nn.Linear):
            # a quantised, hooked, pruned or subclassed (LoRA) qkv: run it whole, as itself
            q, k, v = self._project_qkv(x)
            return q[:, :, :num_queries], k, v
        # split, not two slices: its gradient is one concatenation, where each slice's would be
        # zeros the size of the whole weight, then added together
        w_q, w_kv = weight.split([e, 2 * e])
        if self.mask_k_bias and bias is not None:
            bias = self._qkv_bias()
        b_q, b_kv = (None, None) if bias is None else bias.split([e, 2 * e])
        q = F.linear(x[:, :num_queries], w_q, b_q)
        kv = F.linear(x, w_kv, b_kv)
        q = q.reshape(b, num_queries, self.num_heads, self.head_dim).transpose(1, 2)  # (B, q, E) -> (B, h, q, d)
        k, v = _heads_first(kv.reshape(b, n, 2, self.num_heads, self.head_dim))  # (B, N, 2E) -> 2 x (B, h, N, d)
        return q, k, v

    def _fused(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        drop = self.att_drop.p if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, scale=self.scale)

    def _math(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """``mask``: boolean (True = may attend), or a float offset added to the logits (BEiT's bias)."""
        energy = torch.einsum("bhqd, bhkd -> bhqk", q, k) * self.scale  # (B, h, N, N)
        if mask is not None and mask.is_floating_point():
            energy = energy + mask
        elif mask is not None:
            # Fix: the seed called a non-existent `mask_fill` and discarded its result.
            # The fill is the most negative value of the logits' own dtype (fp16/bf16 safe).
            energy = energy.masked_fill(~mask, torch.finfo(energy.dtype).min)
        if energy.dtype == torch.bfloat16:
            # Autocast would run this softmax in fp32 and autograd would keep its output twice, in
            # fp32 and cast to bf16 for the next matmul (3 bytes more per (B, h, N, N) entry). Its
            # kernel accumulates in fp32 either way, and the next matmul reads bf16: same forward.
            with torch.autocast(energy.device.type, enabled=False):
                att = energy.softmax(dim=-1)
        else:
            att = energy.softmax(dim=-1)
        out = torch.einsum("bhqk, bhkd -> bhqd", _dropout(self.att_drop, att), v)  # (B, h, N, d)
        return out, att


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample while training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


_DROPOUTS = (nn.Dropout, DropPath)  # the layers _dropout may skip


def _dropout(layer: nn.Module, x: Tensor) -> Tensor:
    """``layer(x)`` for a Dropout or DropPath layer, skipped where it is the identity (eval mode, or
    p=0) and nothing hooks it: even then nn.Dropout's call costs about 3.6 us, and a small model's
    inference is call-bound (vit_digits calls 14 of them per forward pass, 5% of it at batch 1)."""
    if type(layer) in _DROPOUTS and (not layer.training or layer.p == 0) and _stock(layer, type(layer)):
        return x
    return layer(x)


class ResidualAdd(nn.Module):
    """``x + drop_path(fn(x))``.

    Fix: the seed did ``x += res`` in place, which overwrites the output of ``fn`` that
    autograd may need and can mutate the caller's tensor.
    """

    def __init__(self, fn: nn.Module, drop_path: float = 0.0):
        super().__init__()
        self.fn = fn
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        return x + _dropout(self.drop_path, self.fn(x, **kwargs))


class LayerScale(nn.Module):
    """``x * gamma``, a learned per-channel scale of a residual branch (CaiT, DeiT-III, DINOv2);
    ``gamma`` starts small, so that each block starts close to the identity."""

    def __init__(self, emb_size: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((emb_size,), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma

    def extra_repr(self) -> str:
        return f"{self.gamma.shape[0]}"


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the sigmoid approximation of GELU that OpenAI's CLIP was trained with."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class SiLUGate(nn.Module):
    """SwiGLU's gate on a packed projection: silu(first half) * second half, (..., 2h) -> (..., h).
    The halves are DINOv2's ``weights_in`` layout (timm's ``SwiGLUPacked``)."""

    def forward(self, x: Tensor) -> Tensor:
        half = x.shape[-1] // 2
        # two slices, not chunk: ONNX exports chunk as a Split with num_outputs, which opset 17 lacks
        return F.silu(x[..., :half]) * x[..., half:]


class FeedForwardBlock(nn.Module):
    """Linear -> GELU -> Dropout -> Linear -> Dropout: the MLP after attention (``act``: ViTConfig.mlp_act,
    exact GELU, its tanh form, CLIP's QuickGELU, or SwiGLU's gate, after which fc2 reads half of fc1's width)."""

    def __init__(self, emb_size: int, expansion: float = 4, drop_p: float = 0.0, act: str = "gelu",
                 norm: bool = False, norm_eps: float = 1e-5):
        super().__init__()
        hidden = int(emb_size * expansion)
        self.fc1 = nn.Linear(emb_size, hidden)
        if act == "quick_gelu":
            self.act = QuickGELU()
        elif act == "swiglu":
            self.act = SiLUGate()
        else:
            self.act = nn.GELU(approximate=LEAN_GELUS[act])
        self.drop1 = nn.Dropout(drop_p)
        fc2_in = hidden // 2 if act == "swiglu" else hidden
        # EVA-02's sub-LN (timm's scale_mlp): the hidden activations normalised before fc2
        self.norm = nn.LayerNorm(fc2_in, eps=norm_eps) if norm else None
        self.fc2 = nn.Linear(fc2_in, emb_size)
        self.drop2 = nn.Dropout(drop_p)

    def forward(self, x: Tensor) -> Tensor:
        h = _linear(self.fc1, x)  # (B, N, E) -> (B, N, hidden)
        if h.requires_grad and torch.is_grad_enabled():  # autograd records
            lean_gelu = self._lean_gelu(h)
            if lean_gelu:  # fc2(gelu(h)) in one op that keeps only h
                return _dropout(self.drop2, lean_linear(h, self.fc2.weight, self.fc2.bias, lean_gelu))
            h = self.act(h)
        elif _stock(self.act, nn.GELU) and _stock(self.fc1, nn.Linear) and not torch.compiler.is_compiling():
            # Eager inference (compiled and exported graphs stay functional): GELU in place on fc1's
            # output, which nothing else holds (no hook kept it). The block's peak is then one
            # (B, N, hidden) tensor, not two (timm's has both).
            h = _gelu_inplace(h, approximate=self.act.approximate)
        else:
            h = self.act(h)  # rebinding h frees fc1's output before fc2 runs when autograd need not keep it
        h = _dropout(self.drop1, h)
        if self.norm is not None:
            h = self.norm(h)
        return _dropout(self.drop2, _linear(self.fc2, h))

    def _lean_gelu(self, h: Tensor) -> str | None:
        """The ``lean_linear`` activation for fc2(drop1(act(h))) where that op can run it: the stock
        GELU and nothing in between (no active dropout); else None."""
        if (not _stock(self.act, nn.GELU) or (self.training and self.drop1.p) or self.norm is not None
                or not lean_linear_applies(self.fc2, h)):
            return None
        return next(name for name, approximate in LEAN_GELUS.items() if approximate == self.act.approximate)


class AttentionPool(nn.Module):
    """Multihead attention pooling (Lee et al. 2019; SigLIP's head, timm's ``AttentionPoolLatent``):
    a learned query attends over every token, and an MLP refines the result, (B, N, E) -> (B, E).
    Its parameter names are timm's."""

    def __init__(self, emb_size: int, num_heads: int, mlp_ratio: float = 4.0, norm_eps: float = 1e-6,
                 act: str = "gelu"):
        super().__init__()
        self.num_heads = num_heads
        self.latent = nn.Parameter(trunc_normal_(torch.empty(1, 1, emb_size), std=emb_size**-0.5))
        self.q = nn.Linear(emb_size, emb_size)
        self.kv = nn.Linear(emb_size, 2 * emb_size)
        self.proj = nn.Linear(emb_size, emb_size)
        self.norm = nn.LayerNorm(emb_size, eps=norm_eps)
        self.mlp = FeedForwardBlock(emb_size, expansion=mlp_ratio, act=act)
        self.fused = True  # False: the attention written out (vitkit.summary counts its matmuls so)

    def forward(self, x: Tensor) -> Tensor:
        b, n, e = x.shape
        h, d = self.num_heads, e // self.num_heads
        q = self.q(self.latent).reshape(1, 1, h, d).transpose(1, 2).expand(b, -1, -1, -1)  # (B, h, 1, d)
        k, v = self.kv(x).reshape(b, n, 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, h, N, d)
        if self.fused:
            pooled = F.scaled_dot_product_attention(q, k, v)
        else:
            pooled = (q @ k.transpose(-2, -1) * d**-0.5).softmax(dim=-1) @ v
        pooled = pooled.reshape(b, e)  # (B, h, 1, d) -> (B, E)
        pooled = self.proj(pooled)
        return pooled + self.mlp(self.norm(pooled))


class TransformerEncoderBlock(nn.Module):
    """Pre-norm block: ``x = x + attn(norm1(x))``, then ``x = x + mlp(norm2(x))``.

    The seed's two ResidualAdd(Sequential(LayerNorm, ...)) branches, written out so that
    the state-dict names (norm1, attn, norm2, mlp) read like the equation and match timm.
    """

    def __init__(
        self,
        emb_size: int = 768,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_p: float = 0.0,
        attn_drop_p: float = 0.0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-5,
        layer_scale: float = 0.0,
        mlp_act: str = "gelu",
        rel_pos_grid: tuple[int, int] | None = None,
        mask_k_bias: bool = False,
        mlp_norm: bool = False,
        attn_norm: bool = False,
        *,
        forward_expansion: float | None = None,
        forward_drop_p: float | None = None,
        dropout: float | None = None,
    ):
        """``forward_expansion``, ``forward_drop_p`` and ``dropout`` (its MultiHeadAttention's) are the
        seed's names for ``mlp_ratio``, ``drop_p`` (one rate here, as timm's proj_drop) and ``attn_drop_p``."""
        super().__init__()
        if forward_expansion is not None:
            mlp_ratio = forward_expansion
        if forward_drop_p is not None:
            if drop_p and drop_p != forward_drop_p:
                raise ValueError(f"drop_p={drop_p} and forward_drop_p={forward_drop_p}: vitkit has one rate for both "
                                 f"(after the attention and inside the MLP); give one value")
            drop_p = forward_drop_p
        if dropout is not None:
            attn_drop_p = dropout
        self.norm1 = nn.LayerNorm(emb_size, eps=norm_eps)
        self.attn = MultiHeadAttention(emb_size, num_heads, attn_drop_p, qkv_bias=qkv_bias, proj_drop=drop_p,
                                       rel_pos_grid=rel_pos_grid, mask_k_bias=mask_k_bias, norm=attn_norm,
                                       norm_eps=norm_eps)
        self.ls1 = LayerScale(emb_size, layer_scale) if layer_scale else None  # timm's names: ls1, ls2
        self.norm2 = nn.LayerNorm(emb_size, eps=norm_eps)
        self.mlp = FeedForwardBlock(emb_size, expansion=mlp_ratio, drop_p=drop_p, act=mlp_act, norm=mlp_norm,
                                    norm_eps=norm_eps)
        self.ls2 = LayerScale(emb_size, layer_scale) if layer_scale else None
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, mask: Tensor | None = None, return_attention: bool = False,
                num_queries: int | None = None, rope: tuple[Tensor, Tensor] | None = None):
        """``num_queries=q``: compute only the first q tokens' outputs, (B, N, E) -> (B, q, E);
        what a class-token head needs from the last block (``ViT.forward``). ``rope``: the rotary
        positions of the patches, if the model has them (``ViT.rope_embedding``)."""
        if return_attention:
            y, att = self.attn(self.norm1(x), mask=mask, return_attention=True, rope=rope)
        elif num_queries is not None:
            y, att = self.attn(self.norm1(x), num_queries=num_queries, rope=rope), None
            x = x[:, :num_queries]  # (B, N, E) -> (B, q, E)
        else:
            y, att = self.attn(self.norm1(x), mask=mask, rope=rope), None
        x = x + _dropout(self.drop_path, y if self.ls1 is None else self.ls1(y))
        del y  # in inference, the attention output would otherwise stay alive through the MLP's peak
        y = self.mlp(self.norm2(x))
        x = x + _dropout(self.drop_path, y if self.ls2 is None else self.ls2(y))
        return (x, att) if return_attention else x


def init_weights(module: nn.Module) -> None:
    """timm's default ViT initialisation for Linear and LayerNorm layers."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        # lecun normal on the flattened patch, as in JAX ViT
        fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        trunc_normal_(module.weight, std=math.sqrt(1.0 / fan_in))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


__all__ = [
    "PatchEmbedding",
    "MultiHeadAttention",
    "ResidualAdd",
    "LayerScale",
    "QuickGELU",
    "AttentionPool",
    "FeedForwardBlock",
    "TransformerEncoderBlock",
    "DropPath",
    "resample_positions",
    "resample_patch_embed",
    "resample_rel_pos_table",
    "relative_position_index",
    "rope_dinov3",
    "rope_eva02",
    "expand_mask",
]
