"""What an explicit ``torch.set_num_threads`` costs torch's CPU flash attention, and why
``fast.set_num_threads`` skips the call when torch already runs that many threads.

    python benchmarks/threads.py                    # 3 rounds of fresh processes
    python benchmarks/threads.py --rounds 5 --threads 2

ATen's ``set_num_threads`` also turns MKL's dynamic threading off; after it, an MKL matmul called
inside one of torch's own parallel loops (the flash-attention kernel's are) starts threads of its
own. The setting is process-wide, so each measurement is a fresh child process: ``default`` leaves
torch's thread count alone, ``explicit`` calls ``torch.set_num_threads`` with the same count. The
two alternate round by round (the order flips every round); medians over ``--rounds``. Measured,
in fp32 on CPU: ``F.scaled_dot_product_attention`` forward and backward, and forward alone, at
vit_fmnist's shape (batch 128, 4 heads, 49 tokens, head width 16), and a vit_fmnist training step
of timm and of vitkit, both on that kernel in fp32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from vitkit import fast

SETTINGS = ("default", "explicit")


def timed_ms(fn, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def child(setting: str, threads: int, steps: int) -> dict:
    """Every measurement, in this process, under ``setting``."""
    from vitkit.bench import build_contestant
    from vitkit.config import get_config

    fast.tune_cpu_allocator()  # as vitkit's commands do (process-wide)
    if setting == "explicit":
        torch.set_num_threads(threads or torch.get_num_threads())  # the call fast.set_num_threads skips
    elif threads and threads != torch.get_num_threads():
        raise SystemExit(f"--threads {threads}: torch's default here is {torch.get_num_threads()}; "
                         "the 'default' setting can only run torch's default count")
    torch.manual_seed(0)
    qkv = torch.randn(128, 49, 3, 4, 16, requires_grad=True)  # (B, N, 3, h, d), as a qkv projection gives
    grad = torch.randn(128, 4, 49, 16)

    def attention(backward: bool) -> None:
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, h, N, d), views
        with torch.set_grad_enabled(backward):
            out = F.scaled_dot_product_attention(q, k, v)
        if backward:
            out.backward(grad)

    results = {"threads": torch.get_num_threads(),
               "flash attention fwd+bwd": timed_ms(lambda: attention(True), steps * 4),
               "flash attention forward": timed_ms(lambda: attention(False), steps * 4)}
    for library in ("timm", "vitkit"):
        step = build_contestant(library, get_config("vit_fmnist"), "train", "fp32", False, 128,
                                torch.device("cpu")).step
        results[f"{library} vit_fmnist fp32 train step"] = timed_ms(step, steps)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per setting")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per process")
    p.add_argument("--threads", type=int, default=0, help="the count set explicitly (default: torch's default)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.threads, args.steps)))
        return 0
    runs: dict[str, list[dict]] = {s: [] for s in SETTINGS}
    for r in range(args.rounds):
        for setting in SETTINGS if r % 2 == 0 else reversed(SETTINGS):
            cmd = [sys.executable, __file__, "--child", setting, "--threads", str(args.threads), "--steps",
                   str(args.steps)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise SystemExit(out.stderr[-2000:])
            runs[setting].append(json.loads(out.stdout.strip().splitlines()[-1]))
    from vitkit.bench import machine_info, machine_line

    print(machine_line(machine_info(torch.device("cpu"))))
    print(f"{runs['default'][0]['threads']} threads either way; medians of {args.rounds} fresh processes per setting")
    print(f"{'measurement':<34}{'default ms':>12}{'explicit ms':>13}{'explicit/default':>18}")
    for key in runs["default"][0]:
        if key == "threads":
            continue
        default, explicit = (statistics.median(run[key] for run in runs[s]) for s in SETTINGS)
        print(f"{key:<34}{default:>12.2f}{explicit:>13.2f}{explicit / default:>17.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
