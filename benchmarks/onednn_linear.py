"""What oneDNN's linear primitive (``layers._cpu_linear``) buys over torch's ``addmm`` path.

    python benchmarks/onednn_linear.py                 # ViT-B/16, batch 8
    python benchmarks/onednn_linear.py --model vit_fmnist --batch-size 128
    python benchmarks/onednn_linear.py --sizes --threads 1   # single Linears, small to ViT-B sized

The same vitkit model with ``layers.ONEDNN_LINEAR`` on and off, in one process, taking turns run by
run (the order flips every round), medians reported, for eager inference in fp32 and in bf16 and
for the bf16-autocast training step (where the lean op's forward uses it). The switch is read at
call time, set for each contestant's turn and put back after it. The models' fp32 Linears below
``layers.ONEDNN_LINEAR_MIN_MACS_FP32`` multiply-adds take addmm either way.

``--sizes`` times single Linear layers instead, from a tiny model's (17 x 64 by 64 x 192) to
ViT-B/16's, each through ``layers._cpu_linear`` (oneDNN's primitive, whatever the size) and
through ``F.linear`` (addmm) in turns: oneDNN's
larger cost per call against its faster kernel, the measurement behind that threshold.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys

import torch
import torch.nn.functional as F

from vitkit import layers
from vitkit.bench import build_contestant, machine_info, machine_line, take_turns
from vitkit.config import get_config
from vitkit.fast import set_num_threads, tune_cpu_allocator

CONFIGS = [("infer", "fp32"), ("infer", "bf16"), ("train", "bf16-autocast")]


def switched(on: bool, step):
    """``step()`` with oneDNN's linear switched ``on`` for its turn (put back in ``main``)."""
    layers.ONEDNN_LINEAR = on
    return step()


# (rows, in, out) of single Linears: vit_digits (batch 1, 8, 64), vit_fmnist (batch 8, 128), ViT-B/16 (1, 8)
SIZES = [(17, 64, 192), (136, 64, 192), (136, 64, 128), (392, 64, 128), (1088, 64, 192), (6272, 64, 128),
         (6272, 128, 64), (197, 768, 768), (394, 768, 2304), (1576, 768, 768), (1576, 768, 3072)]


def repeat(calls: int, fn, *args) -> None:
    with torch.inference_mode():
        for _ in range(calls):
            fn(*args)


def time_sizes(runs: int) -> None:
    """oneDNN's primitive against addmm for single Linears of each size in ``SIZES``, fp32 and bf16."""
    print(f"{'precision':<11}{'rows x in x out':>20}{'MACs':>10}{'addmm us':>11}{'oneDNN us':>11}{'speed-up':>10}")
    for dtype in (torch.float32, torch.bfloat16):
        for rows, fan_in, fan_out in SIZES:
            x, w, b = (torch.randn(*shape, dtype=dtype) for shape in ((rows, fan_in), (fan_out, fan_in), (fan_out,)))
            calls = max(1, int(2e8 // (rows * fan_in * fan_out)))  # ~0.2 GMAC a turn: short calls repeat
            times, _ = take_turns({"addmm": functools.partial(repeat, calls, F.linear, x, w, b),
                                   "onednn": functools.partial(repeat, calls, layers._cpu_linear, x, w, b)},
                                  runs, warmup=2)
            plain, fast = (1e6 * statistics.median(times[k]) / calls for k in ("addmm", "onednn"))
            print(f"{str(dtype).replace('torch.', ''):<11}{f'{rows} x {fan_in} x {fan_out}':>20}"
                  f"{rows * fan_in * fan_out:>10.1e}{plain:>11.1f}{fast:>11.1f}{plain / fast:>9.2f}x")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--runs", type=int, default=9)
    p.add_argument("--threads", type=int)
    p.add_argument("--sizes", action="store_true", help="time single Linears of several sizes instead of a model")
    args = p.parse_args(argv)
    tune_cpu_allocator()  # as in vitkit's own commands
    if args.threads:
        set_num_threads(args.threads)
    device, cfg = torch.device("cpu"), get_config(args.model)
    info = machine_info(device)
    print(machine_line(info))
    if args.sizes:
        time_sizes(args.runs)
        return 0
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
