"""What `vitkit train --freeze-blocks N` saves: the time of a fine-tuning step with the stem and the
first N blocks kept as pretrained, against training every block, in one process.

    python benchmarks/freeze.py                                   # ViT-B/16, batch 8, bf16 autocast
    python benchmarks/freeze.py --model vit_small_patch16_224 --batch-size 32 --frozen 0 6 12

One training step each (forward, cross-entropy, backward, AdamW on what trains), taking turns round
by round, medians reported. A frozen block still runs forward, but autograd records nothing before
the first trained layer, so its backward pass (about two thirds of its cost) and its optimizer
update are skipped.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F

from vitkit import create_model, fast
from vitkit.bench import machine_info, machine_line, peak_memory_mb, take_turns
from vitkit.train import freeze_blocks, param_groups


def contestant(model_name: str, frozen: int, batch_size: int, precision: str):
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10)
    trained = freeze_blocks(model, frozen) if frozen else sum(p.numel() for p in model.parameters())
    optimizer = fast.adamw(param_groups(model, 0.05), lr=1e-4)
    x = torch.randn(batch_size, model.cfg.in_channels, *model.cfg.img_size)
    y = torch.randint(0, 10, (batch_size,))
    model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        with fast.autocast(precision, x.device):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    step()  # optimizer state
    return step, trained


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--precision", default="bf16-autocast", choices=("fp32", "bf16-autocast"))
    p.add_argument("--frozen", type=int, nargs="+", default=[0, 6, 10, 12], help="block counts to compare")
    p.add_argument("--runs", type=int, default=7)
    args = p.parse_args(argv)
    fast.tune_cpu_allocator()
    device = torch.device("cpu")
    built = {n: contestant(args.model, n, args.batch_size, args.precision) for n in args.frozen}
    steps = {n: step for n, (step, _) in built.items()}
    times, _ = take_turns(steps, args.runs, warmup=1, device=device)
    memory = {n: peak_memory_mb(step, device) for n, step in steps.items()}
    print(machine_line(machine_info(device)))
    print(f"model {args.model}, batch {args.batch_size}, train step, {args.precision}, median of {args.runs} runs")
    base = statistics.median(times[args.frozen[0]])
    print(f"{'frozen blocks':<15}{'trained params':>16}{'ms/step':>10}{'speed-up':>10}{'peak MB':>10}")
    for n, (_, trained) in built.items():
        t = statistics.median(times[n])
        print(f"{n:<15}{trained:>16,}{1e3 * t:>10.1f}{base / t:>9.2f}x{memory[n]:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
