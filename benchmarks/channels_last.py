"""Does the channels-last patch convolution pay? bf16 inference with and without it, side by side.

    python benchmarks/channels_last.py --batch-size 256          # on the first CUDA device, else CPU

``fast.optimize_for_inference`` switches the patch convolution and its input to NHWC on CUDA
(``channels_last=None``). This script measures that choice: vitkit's and timm's ViT-B/16 in bf16
eager inference, each prepared by ``optimize_for_inference`` with channels-last on and off, and
each as a plain ``model.eval().to(bfloat16)`` (what a timm user writes), in one process, taking
turns run by run. It prints images/s, the ratio to plain timm and the extra memory of one batch.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from vitkit import fast
from vitkit.bench import machine_info, machine_line, peak_memory_mb, take_turns, timm_model
from vitkit.model import ViT, get_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    fast.tune_cpu_allocator()
    device = torch.device(args.device)
    cfg = get_config(args.model)
    torch.manual_seed(0)
    models = {"vitkit": ViT(cfg), "timm": timm_model(cfg)}
    runners = {}
    for library, model in models.items():
        for layout in ("NHWC", "NCHW"):
            runners[f"{library} {layout}"] = fast.optimize_for_inference(
                model, "bf16", compile=False, device=device, channels_last=layout == "NHWC")
        runners[f"{library} plain"] = model.to(device).eval().requires_grad_(False).to(torch.bfloat16)
    x = torch.randn(args.batch_size, cfg.in_channels, *cfg.img_size, device=device, dtype=torch.bfloat16)

    def inference(run):
        def step():
            with torch.inference_mode():
                return run(x)
        return step

    steps = {name: inference(run) for name, run in runners.items()}
    times, _ = take_turns(steps, args.runs, warmup=3, device=device)  # the warm-up: cuDNN picks its algorithms
    memory = {name: peak_memory_mb(step, device) for name, step in steps.items()}

    print(machine_line(machine_info(device)))
    print(f"model {args.model}, batch {args.batch_size}, bf16 eager inference, median of {args.runs} runs")
    base = statistics.median(times["timm plain"])
    print(f"{'contestant':<16}{'img/s':>10}{'ms/step':>10}{'vs timm plain':>15}{'peak MB':>10}")
    for name in steps:
        step_s = statistics.median(times[name])
        print(f"{name:<16}{args.batch_size / step_s:>10.1f}{1e3 * step_s:>10.2f}{base / step_s:>14.3f}x{memory[name]:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
