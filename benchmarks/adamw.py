"""AdamW's step on CPU: torch's default (a Python loop over tensors) against foreach and fused.

    python benchmarks/adamw.py                      # the model variants vitkit train uses, and ViT-B/16

Each implementation updates its own copy of the model's parameters with the same gradients, in one
process, taking turns; medians of ``--runs``. For scale, the last column is the model's forward and
backward pass at the config's batch size (``--batch-size``): ``vitkit train`` runs one AdamW step
per forward and backward, so the optimizer's share of a training step is about
``step / (step + forward+backward)``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from vitkit import fast
from vitkit.bench import machine_info, machine_line, take_turns
from vitkit.model import create_model
from vitkit.train import param_groups

IMPLEMENTATIONS = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", default=["vit_digits_gap", "vit_fmnist_convstem", "vit_base_patch16_224"])
    p.add_argument("--batch-size", type=int, default=64, help="for the forward+backward column")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    fast.tune_cpu_allocator()
    if args.threads:
        fast.set_num_threads(args.threads)
    print(machine_line(machine_info(torch.device("cpu"))))
    print(f"{'model':<24}{'default ms':>12}{'foreach ms':>12}{'fused ms':>10}{'fwd+bwd ms':>12}{'default/fused':>15}")
    for name in args.models:
        torch.manual_seed(0)
        model = create_model(name, num_classes=10)
        optimizers = {}
        for label, kwargs in IMPLEMENTATIONS.items():
            twin = copy.deepcopy(model)
            for param in twin.parameters():
                param.grad = torch.randn_like(param)
            optimizers[label] = torch.optim.AdamW(param_groups(twin, 0.05), lr=1e-3, **kwargs)
        # two warm-up steps each: the first allocates the optimizer state
        times, _ = take_turns({label: opt.step for label, opt in optimizers.items()}, args.runs, warmup=2)
        x = torch.randn(args.batch_size, model.cfg.in_channels, *model.cfg.img_size)
        y = torch.randint(0, 10, (args.batch_size,))
        passes = []
        for r in range(min(args.runs, 5) + 1):
            start = time.perf_counter()
            F.cross_entropy(model(x), y).backward()
            if r:
                passes.append(time.perf_counter() - start)
        ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        print(f"{name:<24}{ms['default']:>12.2f}{ms['foreach']:>12.2f}{ms['fused']:>10.2f}"
              f"{1e3 * statistics.median(passes):>12.1f}{ms['default'] / ms['fused']:>14.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
