"""Does fine-tuning pay? Pretrain on Fashion-MNIST, then train on few real digits from scratch and
from the pretrained weights (``vitkit train --pretrained``), and compare test top-1.

    python benchmarks/finetune.py                                  # pretrain 5 epochs, then 50/200/1437 digits
    python benchmarks/finetune.py --pretrained runs/fashion-mnist  # reuse a Fashion-MNIST run's best/
    python benchmarks/finetune.py --subsets 100 --steps 300

The digits (scikit-learn's 8x8, the fixed 1437/360 split) are upscaled to 28x28 (bicubic), the size
of the Fashion-MNIST model. Each subset takes the first N training digits; every run takes
``--steps`` optimizer steps, and both runs of a subset have the same data, batch, augmentation and
seed, and by default the same learning rate: only the starting weights differ (``--finetune-lr`` and
``--layer-decay`` try a fine-tuning recipe). Scored on all 360 test digits (best/, the EMA's best
epoch). Needs Debian's ``dataset-fashion-mnist`` unless ``--pretrained`` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vitkit import fast
from vitkit.checkpoint import read_config, resolve_checkpoint
from vitkit.data import Dataset, Split, gray_preprocess, load_digits
from vitkit.train import resolve_config, train

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "fashion_mnist.yaml"


def digits_at(size: int) -> Dataset:
    """The real digits, upscaled from 8x8 to size x size, still uint8 white ink on black."""
    digits = load_digits()

    def up(split: Split) -> Split:
        images = F.interpolate(split.images.float(), size=(size, size), mode="bicubic", align_corners=False)
        return Split(images.round().clamp(0, 255).to(torch.uint8), split.labels)

    return Dataset(name=f"digits-{size}", train=up(digits.train), val=up(digits.val),
                   class_names=digits.class_names, preprocess=gray_preprocess((size, size)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pretrained", help="a Fashion-MNIST checkpoint or run folder (default: pretrain one)")
    p.add_argument("--pretrain-epochs", type=int, default=5)
    p.add_argument("--subsets", default="50,200,1437", help="numbers of training digits, comma-separated")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps of every run, whatever its subset")
    p.add_argument("--scratch-lr", type=float, default=2e-3)
    p.add_argument("--finetune-lr", type=float, help="default: --scratch-lr, so that only the start differs")
    p.add_argument("--layer-decay", type=float, default=1.0)
    p.add_argument("--out", default="runs/finetune")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.finetune_lr is None:
        args.finetune_lr = args.scratch_lr
    fast.tune_cpu_allocator()

    start = time.perf_counter()
    if args.pretrained is None:
        pretrain = resolve_config(str(CONFIG), dict(epochs=args.pretrain_epochs, out=str(out / "pretrain"),
                                                    overwrite=True, progress="off", threads=args.threads))
        train(pretrain)
        args.pretrained = str(out / "pretrain" / "best")
    pretrain_min = (time.perf_counter() - start) / 60
    source = resolve_checkpoint(args.pretrained)
    meta = read_config(source)
    model_cfg = meta["config"]
    data = digits_at(model_cfg.img_size[0])
    variant = meta.get("train", {}).get("model")  # what the scratch runs build: the same architecture
    if variant is None:
        p.error(f"--pretrained {source}: not a vitkit training run's checkpoint (config.json names no model)")
    print(f"pretrained: {source} (Fashion-MNIST top-1 {meta.get('metrics', {}).get('top1')}%); "
          f"{pretrain_min:.1f} min", flush=True)

    results = []
    for n in (int(s) for s in args.subsets.split(",")):
        batch = min(64, n // 2)
        epochs = -(-args.steps // (n // batch))  # the same number of steps for every subset
        common = dict(dataset="digits", train_subset=n, epochs=epochs, batch_size=batch, warmup_epochs=epochs / 10,
                      translate=2, progress="off", threads=args.threads, overwrite=True, ema_decay=0.99)
        row = {"train_digits": n}
        for name, extra in (("scratch", dict(lr=args.scratch_lr)),
                            ("finetuned", dict(lr=args.finetune_lr, pretrained=str(source),
                                               layer_decay=args.layer_decay))):
            cfg = dict(common, out=str(out / f"{name}-{n}"), **extra)
            if name == "scratch":  # the same architecture, from a fresh initialisation
                cfg["model"] = variant
            t = time.perf_counter()
            result = train(resolve_config(None, cfg), data=data)
            row[name] = round(result.best_top1, 2)
            row[f"{name}_min"] = round((time.perf_counter() - t) / 60, 2)
        results.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'digits':<7} {'scratch top-1':>14} {'fine-tuned top-1':>17}")
    for r in results:
        print(f"{r['train_digits']:<7} {r['scratch']:>13.2f}% {r['finetuned']:>16.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
