"""The cost of one EMA update per training step: vitkit's make_ema against timm's ModelEmaV3.

    python benchmarks/ema.py                    # CPU
    python benchmarks/ema.py --device cuda

Three ways to keep an exponential moving average of the weights, timed in one process, taking turns:
``vitkit`` (``vitkit.train.make_ema``: one ``_foreach_lerp_``), ``timm`` (``timm.utils.ModelEmaV3``,
also a foreach lerp) and ``per-tensor`` (torch's ``AveragedModel`` with a per-tensor ``avg_fn``, the
form torch's docs show and vitkit used before: on a GPU it reads the step count from the device
for every tensor). The EMA runs once per optimizer step, so compare it with the step's time.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
import sys

import torch
from torch.optim.swa_utils import AveragedModel

from vitkit.bench import machine_info, machine_line, take_turns
from vitkit.model import create_model
from vitkit.train import make_ema


def per_tensor_ema(model: torch.nn.Module, decay: float) -> AveragedModel:
    def ema_avg(averaged, current, num_averaged):
        d = min(decay, (1.0 + float(num_averaged)) / (10.0 + float(num_averaged)))
        return averaged * d + current * (1.0 - d)

    return AveragedModel(model, avg_fn=ema_avg, use_buffers=True)


def timm_update(ema, model: torch.nn.Module, steps: itertools.count) -> None:
    ema.update(model, step=next(steps))  # ModelEmaV3 takes the step number for its warm-up


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", default=["vit_digits_gap", "vit_fmnist_convstem", "vit_base_patch16_224"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--runs", type=int, default=20)
    args = p.parse_args(argv)
    from timm.utils import ModelEmaV3

    device = torch.device(args.device)
    print(machine_line(machine_info(device)))
    print(f"{'model':<24}{'tensors':>8}{'vitkit ms':>11}{'timm ms':>9}{'per-tensor ms':>15}{'timm/vitkit':>13}")
    for name in args.models:
        model = create_model(name, num_classes=10).to(device)
        timm_ema = ModelEmaV3(model, decay=0.999, use_warmup=True)
        updates = {
            "vitkit": functools.partial(make_ema(model, 0.999).update_parameters, model),
            "timm": functools.partial(timm_update, timm_ema, model, itertools.count()),
            "per-tensor": functools.partial(per_tensor_ema(model, 0.999).update_parameters, model),
        }
        times, _ = take_turns(updates, args.runs, warmup=2, device=device)
        ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        print(f"{name:<24}{sum(1 for _ in model.parameters()):>8}{ms['vitkit']:>11.2f}{ms['timm']:>9.2f}"
              f"{ms['per-tensor']:>15.2f}{ms['timm'] / ms['vitkit']:>12.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
