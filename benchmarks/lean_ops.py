"""What vitkit's lean ops buy in bf16 CPU training: time and peak memory against plain autograd and timm.

    python benchmarks/lean_ops.py                                   # ViT-B/16, batch 8
    python benchmarks/lean_ops.py --model vit_fmnist --batch-size 128

Contestants, one training step each (forward, cross-entropy, backward, AdamW), bf16 autocast, in one
process, taking turns round by round (the order flips every round), medians reported:

* ``lean``: vitkit as it ships (``layers.lean_training``: lean_linear and lean_attention from
  ``LEAN_MIN_ELEMENTS`` input elements on, probabilities recomputed from ``RECOMPUTE_MIN_TOKENS``);
* ``lean-any-size``: the lean ops at any input size (``LEAN_MIN_ELEMENTS`` = 0);
* ``lean-recompute``: the same, with the attention probabilities recomputed at any length;
* ``plain``: vitkit's model with the lean ops off (the math attention path and nn.Linear under
  plain autograd): what the thresholds fall back to;
* ``timm``: timm's VisionTransformer, the peer.

The switches are the module-level thresholds in ``vitkit.layers``, read at call time, set for each
contestant's turn and put back after it. This is where the thresholds' figures come from.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from contextlib import contextmanager

import torch

from vitkit import fast, layers
from vitkit.bench import build_contestant, machine_info, machine_line, peak_memory_mb, take_turns
from vitkit.config import get_config

# contestant -> (library, {vitkit.layers threshold: value for its turn})
VARIANTS = {
    "lean": ("vitkit", {}),
    "lean-any-size": ("vitkit", {"LEAN_MIN_ELEMENTS": 0}),
    "lean-recompute": ("vitkit", {"LEAN_MIN_ELEMENTS": 0, "RECOMPUTE_MIN_TOKENS": 0}),
    "plain": ("vitkit", {"LEAN_MIN_ELEMENTS": math.inf}),
    "timm": ("timm", {}),
}


@contextmanager
def thresholds(values: dict):
    saved = {name: getattr(layers, name) for name in values}
    for name, value in values.items():
        setattr(layers, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(layers, name, value)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--runs", type=int, default=9)
    p.add_argument("--threads", type=int)
    p.add_argument("--profile", action="store_true",
                   help="then profile one 'lean' and one timm step (torch.profiler): where their time goes, op by op")
    args = p.parse_args(argv)
    fast.tune_cpu_allocator()  # as in vitkit's own commands; process-wide, so timm runs under it too
    if args.threads:
        fast.set_num_threads(args.threads)
    device = torch.device("cpu")
    cfg = get_config(args.model)
    torch.manual_seed(0)
    built = {}
    for name, (library, values) in VARIANTS.items():
        with thresholds(values):  # the first call (optimizer state) under the contestant's own settings
            built[name] = build_contestant(library, cfg, "train", "bf16-autocast", False, args.batch_size, device)

    def turn(name: str):  # the contestant's step under its own thresholds
        def step():
            with thresholds(VARIANTS[name][1]):
                return built[name].step()
        return step

    steps = {name: turn(name) for name in built}
    times, _ = take_turns(steps, args.runs, warmup=1, device=device)
    memory = {name: peak_memory_mb(step, device) for name, step in steps.items()}

    info = machine_info(device)
    print(machine_line(info))
    print(f"model {args.model}, batch {args.batch_size}, train step, bf16 autocast, median of {args.runs} runs")
    timm_s = statistics.median(times["timm"])
    print(f"{'contestant':<16}{'ms/step':>10}{'vs timm':>10}{'peak MB':>10}")
    for name in built:
        step_s = statistics.median(times[name])
        print(f"{name:<16}{1e3 * step_s:>10.1f}{timm_s / step_s:>9.3f}x{memory[name]:>10.1f}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        linear_ops = ("aten::mm", "aten::addmm", "mkldnn::_linear_pointwise")  # the lean forward: oneDNN's linear
        for name in ("lean", "timm"):  # where each step's time goes, op by op
            with thresholds(VARIANTS[name][1]), profile(activities=[ProfilerActivity.CPU]) as prof:
                built[name].step()
            events = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in events)
            matmul = sum(e.self_cpu_time_total for e in events if e.key in linear_ops)
            print(f"\none '{name}' step: the Linear layers' matmuls ({', '.join(linear_ops)}) take "
                  f"{100 * matmul / total:.0f}% of its CPU time ({matmul / 1e6:.2f} s of {total / 1e6:.2f} s)")
            print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40))
    return 0


if __name__ == "__main__":
    sys.exit(main())
