"""What oneDNN's linear primitive (``layers._cpu_linear``) buys over torch's ``addmm`` path.

    python benchmarks/onednn_linear.py                 # ViT-B/16, batch 8
    python benchmarks/onednn_linear.py --model vit_fmnist --batch-size 128

The same vitkit model with ``layers.ONEDNN_LINEAR`` on and off, in one process, taking turns run by
run (the order flips every round), medians reported, for eager inference in fp32 and in bf16 and
for the bf16-autocast training step (where the lean op's forward uses it). The switch is read at
call time, set for each contestant's turn and put back after it.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys

import torch

from vitkit import layers
from vitkit.bench import build_contestant, machine_info, machine_line, take_turns
from vitkit.config import get_config
from vitkit.fast import tune_cpu_allocator

CONFIGS = [("infer", "fp32"), ("infer", "bf16"), ("train", "bf16-autocast")]


def switched(on: bool, step):
    """``step()`` with oneDNN's linear switched ``on`` for its turn (put back in ``main``)."""
    layers.ONEDNN_LINEAR = on
    return step()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--runs", type=int, default=9)
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    tune_cpu_allocator()  # as in vitkit's own commands
    if args.threads:
        torch.set_num_threads(args.threads)
    device, cfg = torch.device("cpu"), get_config(args.model)
    info = machine_info(device)
    print(machine_line(info))
    print(f"model {args.model}, batch {args.batch_size}, median of {args.runs} runs; eager")
    print(f"{'mode':<8}{'precision':<16}{'oneDNN ms':>11}{'addmm ms':>11}{'speed-up':>10}")
    saved = layers.ONEDNN_LINEAR
    try:
        for mode, precision in CONFIGS:
            steps = {}
            for on in (True, False):
                layers.ONEDNN_LINEAR = on
                built = build_contestant("vitkit", cfg, mode, precision, False, args.batch_size, device)
                steps[on] = functools.partial(switched, on, built.step)
            times, _ = take_turns(steps, args.runs, warmup=1, device=device)
            fast, plain = (statistics.median(times[on]) for on in (True, False))
            print(f"{mode:<8}{precision:<16}{1e3 * fast:>11.1f}{1e3 * plain:>11.1f}{plain / fast:>9.3f}x")
    finally:
        layers.ONEDNN_LINEAR = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
