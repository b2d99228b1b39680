"""`vitkit attention`, `vitkit embed` and `vitkit export`: look inside a checkpoint, and ship it."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from ..attention import HEAD_FUSIONS, METHODS

    p = sub.add_parser("attention", help="draw where a checkpoint looks in an image (rollout or last-layer map)")
    p.add_argument("checkpoint", help="a run folder (uses best/) or a vitkit checkpoint directory")
    p.add_argument("image", help="an image file (any format Pillow reads)")
    p.add_argument("--method", choices=METHODS, default="rollout",
                   help="rollout: attention flow through all blocks (Abnar & Zuidema 2020); "
                        "last-layer: the last block's class-token (or mean-token) attention")
    p.add_argument("--head", help=f"fuse heads by {'|'.join(HEAD_FUSIONS)} (default mean), or pick head N; "
                                  "not with --per-head, which draws every head")
    p.add_argument("--per-head", action="store_true", help="one panel per head of the last block (last-layer)")
    p.add_argument("--img-size", type=int, nargs="+", metavar=("H", "W"),
                   help="run at this size instead of the checkpoint's (one value: square); positions are resampled")
    p.add_argument("--cmap", default="jet", help="matplotlib colormap (default: jet)")
    p.add_argument("--alpha", type=float, default=0.5, help="opacity of the map over the image, 0 to 1 (default 0.5)")
    p.add_argument("--out", required=True,
                   help="the picture to write, in the format of its suffix: .png, .jpg, .pdf, .svg, .tif, .webp, ...")
    p.set_defaults(func=run_attention)

    p = sub.add_parser("embed", help="pooled pre-logits embeddings of images, saved as an (n, features) .npy")
    p.add_argument("checkpoint", help="a run folder (uses best/) or a vitkit checkpoint directory")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", required=True, help="the .npy file to write: float32, one row per image, in order")
    p.set_defaults(func=run_embed)

    from ..export import DEFAULT_OPSET, FORMATS

    p = sub.add_parser("export", help="ONNX or torch.export program with a dynamic batch (and image size)")
    p.add_argument("checkpoint", help="a run folder (uses best/) or a vitkit checkpoint directory")
    p.add_argument("--format", choices=FORMATS, default="onnx")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, >= 17 (default {DEFAULT_OPSET})")
    p.add_argument("--out", required=True, help="FILE.onnx or FILE.pt2")
    p.set_defaults(func=run_export)


def _load(checkpoint: str, img_size: list[int] | None = None):
    """The checkpoint in eval mode, at ``img_size`` when given (resampled positions, or on the fly)."""
    from ..checkpoint import load_pretrained
    from ..config import to_2tuple

    if img_size is not None and len(img_size) not in (1, 2):
        raise ValueError(f"--img-size: expected H or H W, got {img_size}")
    size = None if img_size is None else to_2tuple(img_size[0] if len(img_size) == 1 else img_size)
    model = load_pretrained(checkpoint)
    if size is not None and size != model.cfg.img_size:
        try:  # the config's own checks (positive, at least a patch, divisible by it), named by the flag
            model.cfg.replace(img_size=size)
        except ValueError as e:
            raise ValueError(f"--img-size {' '.join(map(str, img_size))}: {e}") from e
        if model.cfg.dynamic_img_size:  # the model resamples its positions per input
            model.preprocess = dict(model.preprocess, img_size=list(size))
        else:
            model = load_pretrained(checkpoint, img_size=size)
    return model.eval()


def run_attention(args: argparse.Namespace) -> int:
    from ..attention import (
        attention_map,
        check_alpha,
        check_cmap,
        denormalize,
        figure_format,
        parse_head,
        save_attention_figure,
    )
    from ..checkpoint import check_output_file
    from ..images import load_image, preprocess_image

    # the flags first: a bad one is named before the model runs
    if args.per_head and args.head is not None:
        raise ValueError(f"--head {args.head}: --per-head draws every head of the block apart; give one or the other")
    head = parse_head("mean" if args.head is None else args.head)
    check_output_file(args.out, "--out")  # a directory, or a folder no file can be made in
    figure_format(args.out)
    check_cmap(args.cmap)
    check_alpha(args.alpha)
    model = _load(args.checkpoint, args.img_size)
    x = preprocess_image(load_image(args.image, model.cfg.in_channels), model.preprocess)[None]  # (1, C, H, W)
    maps = attention_map(model, x, method=args.method, head=head, per_head=args.per_head)[0]  # ([h,] gh, gw)
    with_token = "class-token" if model.cfg.class_token else "mean-token"
    title = f"{args.method} ({with_token}, heads: {'each' if args.per_head else head}) {x.shape[-2]}x{x.shape[-1]}"
    save_attention_figure(args.out, denormalize(x[0], model.preprocess), maps, title=title,
                          alpha=args.alpha, cmap=args.cmap)
    print(f"wrote {args.out}: {args.method} map, grid {tuple(maps.shape[-2:])}")
    return 0


def run_embed(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from ..checkpoint import atomic_file, check_output_file
    from ..images import load_image, preprocess_image

    if args.batch_size < 1:
        raise ValueError(f"--batch-size: expected a positive int, got {args.batch_size}")
    check_output_file(args.out, "--out")  # before the model runs: a directory failed only at the end
    model = _load(args.checkpoint)
    rows = []
    with torch.inference_mode():
        for start in range(0, len(args.images), args.batch_size):
            paths = args.images[start:start + args.batch_size]
            x = torch.stack([preprocess_image(load_image(p, model.cfg.in_channels), model.preprocess) for p in paths])
            rows.append(model.forward_head(model.forward_features(x), pre_logits=True).float())  # (b, E)
    emb = torch.cat(rows).numpy()  # (n, E), or (n, 2E) for pool="cls_mean"
    with atomic_file(args.out) as f:
        np.save(f, emb)
    print(f"wrote {args.out}: embeddings of shape {emb.shape}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from ..checkpoint import check_output_file
    from ..export import export_model

    check_output_file(args.out, "--out")  # before the export runs: a directory failed only at the end
    model = _load(args.checkpoint)
    export_model(model, args.out, args.format, opset=args.opset)
    sizes = "any size divisible by the patch size" if model.cfg.dynamic_img_size else \
        f"{model.cfg.img_size[0]}x{model.cfg.img_size[1]}"
    print(f"wrote {args.out}: {args.format}, input x of shape (batch, {model.cfg.in_channels}, H, W), "
          f"dynamic batch, image size {sizes}")
    return 0
