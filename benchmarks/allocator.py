"""What ``fast.tune_cpu_allocator`` buys: page faults and time per step, with glibc's defaults and tuned.

    python benchmarks/allocator.py                      # ViT-B/16 batch 8 and vit_fmnist batch 128
    python benchmarks/allocator.py --library timm       # the same for timm's model

The setting is process-wide, so the two contestants cannot share a process: each measurement is a
fresh child process (build, two warm-up steps, then ``--steps`` timed steps), the two settings
alternating round by round (the order flips every round), medians over ``--rounds`` reported.
Page faults (minor: pages the kernel zero-fills on first touch) and system time come from
``getrusage``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from vitkit import fast

# (model, batch, mode, precision)
CONFIGS = [
    ("vit_base_patch16_224", 8, "train", "bf16-autocast"),
    ("vit_base_patch16_224", 8, "infer", "bf16"),
    ("vit_fmnist", 128, "train", "bf16-autocast"),
    ("vit_fmnist", 128, "train", "fp32"),
]


def child(library: str, model: str, batch: int, mode: str, precision: str, tuned: bool, steps: int) -> dict:
    """One measurement, in this process: time, page faults and system time per step."""
    from vitkit.bench import build_contestant
    from vitkit.config import get_config

    if tuned and not fast.tune_cpu_allocator():
        raise SystemExit("tune_cpu_allocator() did nothing here (not glibc, or MALLOC_* set)")
    contestant = build_contestant(library, get_config(model), mode, precision, False, batch, torch.device("cpu"))
    for _ in range(2):
        contestant.step()
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        contestant.step()
    elapsed, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return {"ms": 1e3 * elapsed / steps, "faults": (after.ru_minflt - before.ru_minflt) / steps,
            "sys_ms": 1e3 * (after.ru_stime - before.ru_stime) / steps}


def measure(args, config: tuple, tuned: bool) -> dict:
    model, batch, mode, precision = config
    cmd = [sys.executable, __file__, "--child", json.dumps([args.library, model, batch, mode, precision, tuned,
                                                            args.steps])]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--library", default="vitkit", choices=("vitkit", "timm"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        fast.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(*json.loads(args.child))))
        return 0
    from vitkit.bench import machine_info, machine_line

    info = machine_info(torch.device("cpu"))
    print(machine_line(info))
    print(f"{args.library}, eager, {args.steps} steps per process, median of {args.rounds} processes per setting")
    print(f"{'model':<22}{'batch':>6}  {'mode':<6}{'precision':<15}{'faults/step':>22}{'sys ms':>14}"
          f"{'ms/step':>18}{'speed-up':>10}")
    print(f"{'':<51}{'glibc':>11}{'tuned':>11}{'glibc':>7}{'tuned':>7}{'glibc':>9}{'tuned':>9}")
    for config in CONFIGS:
        results: dict[bool, list[dict]] = {False: [], True: []}
        for r in range(args.rounds):
            for tuned in (False, True) if r % 2 == 0 else (True, False):
                results[tuned].append(measure(args, config, tuned))
        med = {tuned: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for tuned, rs in results.items()}
        model, batch, mode, precision = config
        print(f"{model:<22}{batch:>6}  {mode:<6}{precision:<15}{med[False]['faults']:>11.0f}{med[True]['faults']:>11.0f}"
              f"{med[False]['sys_ms']:>7.0f}{med[True]['sys_ms']:>7.0f}{med[False]['ms']:>9.1f}{med[True]['ms']:>9.1f}"
              f"{med[False]['ms'] / med[True]['ms']:>9.3f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
