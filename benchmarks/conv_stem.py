"""Does the channels-last conv stem pay? Training steps with the stem in NHWC and in NCHW, side by side.

    python benchmarks/conv_stem.py                                  # fp32 and bf16 autocast
    python benchmarks/conv_stem.py --precision fp32 --runs 40

``PatchEmbedding.set_channels_last(True)`` runs a convolutional stem channels-last (opt-in).
This script measures that choice on the Fashion-MNIST recipe's model (vit_fmnist_convstem, batch
128): vitkit with the stem in NHWC and in NCHW (the default), and timm's ViT with the same stem
(NCHW, what a timm user has), one training step each (forward, cross-entropy, backward, AdamW), in
one process, taking turns run by run, medians reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from vitkit import fast
from vitkit.bench import build_contestant, machine_info, machine_line, take_turns
from vitkit.model import ViT, get_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_fmnist_convstem")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--precision", choices=["fp32", "bf16-autocast"], action="append",
                   help="repeatable (default: both)")
    p.add_argument("--runs", type=int, default=25)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    fast.tune_cpu_allocator()
    device = torch.device(args.device)
    cfg = get_config(args.model)
    if cfg.stem != "conv":
        p.error(f"--model: expected a conv-stem variant (stem='conv'), got {args.model!r} with stem={cfg.stem!r}")
    print(machine_line(machine_info(device)))
    for precision in args.precision or ["fp32", "bf16-autocast"]:
        torch.manual_seed(0)
        nhwc = ViT(cfg)
        nhwc.patch_embed.set_channels_last(True)
        contestants = {
            "vitkit NHWC": build_contestant("vitkit", cfg, "train", precision, False, args.batch_size, device,
                                            model=nhwc),
            "vitkit NCHW": build_contestant("vitkit", cfg, "train", precision, False, args.batch_size, device),
            "timm": build_contestant("timm", cfg, "train", precision, False, args.batch_size, device),
        }
        times, _ = take_turns({name: c.step for name, c in contestants.items()}, args.runs, warmup=2, device=device)
        print(f"\nmodel {args.model}, batch {args.batch_size}, train, {precision}, eager, median of {args.runs} runs")
        base = statistics.median(times["timm"])
        nchw = statistics.median(times["vitkit NCHW"])
        print(f"{'contestant':<14}{'img/s':>10}{'ms/step':>10}{'vs timm':>10}{'vs NCHW':>10}")
        for name in contestants:
            step_s = statistics.median(times[name])
            print(f"{name:<14}{args.batch_size / step_s:>10.1f}{1e3 * step_s:>10.2f}{base / step_s:>9.3f}x"
                  f"{nchw / step_s:>9.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
