"""`vitkit convert SRC OUT --from FMT --to FMT`: move weights between vitkit, timm, HF, torchvision, JAX."""

from __future__ import annotations

import argparse
import sys
import warnings


def register(sub: argparse._SubParsersAction) -> None:
    from ..config import CROP_MODES, INTERPOLATIONS, MLP_ACTS, POOLS
    from ..convert import EXPORT_FORMATS, IMPORT_FORMATS

    p = sub.add_parser(
        "convert",
        help="convert weights between vitkit, timm, Hugging Face, torchvision and JAX .npz",
        description=(
            "Read SRC in the format named by --from and write OUT in the format named by --to (default: a vitkit "
            "checkpoint directory that `vitkit.load_pretrained(OUT)` opens). The architecture is read from the "
            "checkpoint; timm and torchvision files do not store the number of heads: give --model NAME or "
            "--num-heads N, otherwise heads = width / 64 (the published convention) is assumed."
        ),
    )
    p.add_argument("src", help="the source checkpoint: a file or a directory")
    p.add_argument("out", help="where to write: a directory (vitkit, hf, timm) or a file (.safetensors/.pth, .npz)")
    p.add_argument("--from", dest="src_fmt", required=True, choices=IMPORT_FORMATS, help="the source format")
    p.add_argument("--to", dest="dst_fmt", default="vitkit", choices=EXPORT_FORMATS, help="the target format")
    p.add_argument("--model", help="a vitkit variant name (see `vitkit models`) giving the number of heads, and the "
                   "input normalisation where the file does not hold it (timm's pretrained_cfg for the name)")
    p.add_argument("--num-heads", type=int, help="the number of attention heads of the source model")
    p.add_argument("--mlp-act", choices=MLP_ACTS, help="the source model's MLP activation, where its file does not "
                   "say: quick_gelu for OpenAI's CLIP weights in a bare timm file")
    p.add_argument("--pool", choices=POOLS, help="the source model's pooling, where its file does not say: a bare "
                   "timm state dict is read as timm's default for its tensors (the mean with fc_norm or for DINOv3, else "
                   "the class token)")
    p.add_argument("--img-size", type=int, nargs="+", metavar=("H", "W"),
                   help="resample the position table for this image size (one value: square)")
    p.add_argument("--patch-size", type=int, help="another patch size: the patch projection's kernels resampled as "
                   "FlexiViT and timm do, the positions to the new grid")
    p.add_argument("--num-classes", type=int, help="a new, freshly initialised classifier with N classes")
    p.add_argument("--mean", type=float, nargs="+", help="the input mean the weights were trained with, per channel "
                   "(where the file does not hold it, a bare timm state dict: else --model's, else ImageNet's)")
    p.add_argument("--std", type=float, nargs="+", help="the input standard deviation, per channel")
    p.add_argument("--interpolation", choices=INTERPOLATIONS, help="how the weights' images were resized, where "
                   "the file does not say or says otherwise (torchvision's SWAG weights at 224: bicubic)")
    p.add_argument("--crop-pct", type=float, help="the share of the resized image the model sees (timm's crop_pct; "
                   "torchvision's SWAG weights at 224: 1.0)")
    p.add_argument("--crop-mode", choices=CROP_MODES, help="center: the shorter side resized, the centre cut; squash: "
                   "each side resized, the aspect ratio not kept")
    p.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    from ..convert import convert

    img_size = None
    if args.img_size is not None:
        if len(args.img_size) > 2:
            raise ValueError(f"--img-size: expected H or H W, got {len(args.img_size)} values {args.img_size}")
        img_size = tuple(args.img_size) if len(args.img_size) == 2 else args.img_size[0]
    overrides = {k: v for k, v in (("num_heads", args.num_heads), ("mlp_act", args.mlp_act), ("pool", args.pool),
                                   ("patch_size", args.patch_size)) if v is not None}
    # Warnings (assumed heads, a re-initialised head, dropped tensors) are part of the answer: print them plainly.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = convert(
            args.src, args.out, args.src_fmt, args.dst_fmt,
            model=args.model, img_size=img_size, num_classes=args.num_classes, mean=args.mean, std=args.std,
            preprocess=dict(interpolation=args.interpolation, crop_pct=args.crop_pct, crop_mode=args.crop_mode),
            **overrides,
        )
    for w in caught:
        print(f"vitkit convert: warning: {w.message}", file=sys.stderr)
    print(f"wrote {out} ({args.dst_fmt})")
    return 0
