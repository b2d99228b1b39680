"""`vitkit models` and `vitkit summary`: the variant table and the layer table."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model variants")
    p.add_argument("pattern", nargs="?", default="*",
                   help="shell-style filter, any case, e.g. 'vit_base*' (none matching is an error)")
    p.set_defaults(func=run_models)

    p = sub.add_parser("summary", help="layer table, true parameter totals, sizes and GMACs")
    p.add_argument("model", help="a variant name (see `vitkit models`) or a checkpoint directory")
    p.add_argument("--input", nargs=3, type=int, metavar=("C", "H", "W"), help="input size (default: the model's)")
    p.add_argument("--num-classes", type=int, help="override the number of classes")
    p.set_defaults(func=run_summary)


def run_models(args: argparse.Namespace) -> int:
    from ..config import VARIANTS, list_models

    names = list_models(args.pattern)
    if not names:  # an empty table and exit 0 read as success: say it, as a name no command knows is said
        raise ValueError(f"no model matches {args.pattern!r}; `vitkit models` lists all {len(VARIANTS)}")
    column = max(map(len, names), default=0)
    for name in names:
        v = VARIANTS[name]
        print(f"{name:{column}s} width {v.get('emb_size', 768):5d}  depth {v.get('depth', 12):3d}  "
              f"heads {v.get('num_heads', 8):3d}  patch {v.get('patch_size', 16):3d}  img {v.get('img_size', 224)}")
    return 0


def run_summary(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from ..checkpoint import load_pretrained
    from ..model import create_model
    from ..summary import summary

    overrides = {} if args.num_classes is None else {"num_classes": args.num_classes}
    img = {"img_size": tuple(args.input[1:]), "in_channels": args.input[0]} if args.input else {}
    try:
        if Path(args.model).exists():
            # at another size the positions are resampled (and other channels adapt the first layer), as a
            # variant is built at it: the checkpoint's own size would refuse the input
            model = load_pretrained(args.model, **img, **overrides)
        else:  # shapes alone: on the meta device, no weights are made, so any size is instant (the giant: 4 GB)
            with torch.device("meta"):
                model = create_model(args.model, **img, **overrides)
    except ValueError as e:  # the config's checks of the size (positive, divisible by the patch), named by the flag
        if args.input and str(e).startswith(("ViTConfig.img_size", "ViTConfig.in_channels")):
            raise ValueError(f"--input {' '.join(map(str, args.input))}: {e}") from e
        raise
    summary(model, tuple(args.input) if args.input else None)
    return 0
