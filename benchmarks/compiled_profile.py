"""Where a compiled training step's time goes: vitkit's kernels beside timm's, both compiled, in one process.

    python benchmarks/compiled_profile.py --model vit_base_patch16_dinov3 --batch-size 128   # on a GPU

Each contestant (``vitkit``; ``timm``, its model of the same architecture; ``vitkit-full``, vitkit
without the class-token shortcut of the last block) is built and compiled as ``vitkit bench
--compile`` builds it (bf16 autocast, fused AdamW), timed taking turns, then profiled for two steps:
the total kernel time, the number of kernel calls and the largest kernels, by self time. This is how
Inductor's folding of the rotary tables' sin and cos into the rotation kernels was found (README, "On a
GPU"). On a CPU the table lists CPU ops instead.
"""

from __future__ import annotations

import argparse
import time
import types

import torch
from torch.profiler import ProfilerActivity, profile

from vitkit.bench import build_contestant, take_turns
from vitkit.config import get_config
from vitkit.model import ViT

CONTESTANTS = ("vitkit", "timm", "vitkit-full")


def build(who: str, cfg, batch: int, device: torch.device):
    if who != "vitkit-full":
        return build_contestant(who, cfg, "train", "bf16-autocast", True, batch, device)
    model = ViT(cfg)  # the full last block: forward_head(forward_features(x))
    model.forward = types.MethodType(lambda self, x: self.forward_head(self.forward_features(x)), model)
    return build_contestant("vitkit", cfg, "train", "bf16-autocast", True, batch, device, model=model)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_base_patch16_dinov3")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--contestants", default=",".join(CONTESTANTS), help=f"some of {CONTESTANTS}")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--top", type=int, default=22, help="kernels listed for each contestant")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = get_config(args.model)
    built = {}
    for who in args.contestants.split(","):
        if who not in CONTESTANTS:
            raise SystemExit(f"--contestants: unknown {who!r}; expected some of {CONTESTANTS}")
        start = time.perf_counter()
        built[who] = build(who, cfg, args.batch_size, device)
        print(f"{who}: built and compiled in {time.perf_counter() - start:.0f} s", flush=True)
    times, _ = take_turns({who: c.step for who, c in built.items()}, args.runs, 2, device)
    print(f"{args.model}, batch {args.batch_size}, bf16-autocast training, compiled, on "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}")
    for who, seconds in times.items():
        print(f"{who:<12} {1e3 * sorted(seconds)[len(seconds) // 2]:10.2f} ms/step (median of {len(seconds)})")
    activity, sort = ((ProfilerActivity.CUDA, "self_cuda_time_total") if device.type == "cuda"
                      else (ProfilerActivity.CPU, "self_cpu_time_total"))
    for who, c in built.items():
        if device.type == "cuda":
            torch.cuda.synchronize()
        with profile(activities=[activity]) as prof:
            for _ in range(2):
                c.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        events = prof.key_averages()
        own = [(e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total, e.count) for e in events]
        total, calls = sum(t for t, _ in own), sum(n for t, n in own if t > 0)
        print(f"\n-- {who}: 2 steps, {total / 1e3:.1f} ms of {'kernels' if device.type == 'cuda' else 'ops'}, "
              f"{calls} calls")
        print(events.table(sort_by=sort, row_limit=args.top, max_name_column_width=90))
    return 0


if __name__ == "__main__":
    main()
