"""Does distillation pay on few labels? Students trained on the first N real digits alone, and with a
teacher trained on all 1437 (`vitkit train --teacher`), scored on the 360 test digits.

    python benchmarks/distill.py                          # trains its own teacher first (~1 min)
    python benchmarks/distill.py --teacher runs/demo/best --seeds 0 1 2

The teacher (configs/digits.yaml, ``--teacher-epochs``) sees every training image; each student sees
only the first ``--images`` of them, with the same recipe, steps and seed, and learns from the true
labels alone, or also from the teacher's answers on its augmented batches (DeiT's hard and soft
losses, alpha 0.5; soft at tau 1, DeiT's default). Student top-1 on the test split, per seed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from vitkit.train import resolve_config, train

STUDENTS = {
    "alone": {},
    "hard": {"distill_type": "hard"},
    "soft": {"distill_type": "soft", "distill_tau": 1.0},
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", help="a digits checkpoint to distil from (default: train one)")
    p.add_argument("--teacher-epochs", type=int, default=100)
    p.add_argument("--model", default="vit_digits", help="the students' model")
    p.add_argument("--images", type=int, default=256, help="training images each student sees")
    p.add_argument("--epochs", type=int, default=150, help="student epochs (over its images)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", help="where the runs go (default: a temporary folder)")
    args = p.parse_args(argv)
    quiet = {"progress": "off", "overwrite": True}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        teacher = args.teacher
        if teacher is None:
            result = train(resolve_config("configs/digits.yaml", dict(quiet, epochs=args.teacher_epochs,
                                                                       out=str(out / "teacher"))))
            teacher = str(out / "teacher" / "best")
            print(f"teacher: vit_digits_gap, {args.teacher_epochs} epochs on 1437 digits: "
                  f"{result.best_top1:.2f}% top-1", flush=True)
        scores: dict[str, list[float]] = {name: [] for name in STUDENTS}
        for seed in args.seeds:
            for name, extra in STUDENTS.items():
                distil = {"teacher": teacher, "distill_alpha": 0.5, **extra} if extra else {}
                result = train(resolve_config("configs/digits.yaml", dict(
                    quiet, model=args.model, train_subset=args.images, epochs=args.epochs, seed=seed,
                    out=str(out / f"{name}-{seed}"), **distil)))
                scores[name].append(result.history[-1]["top1"])
    print(f"\nstudents: {args.model}, the first {args.images} digits, {args.epochs} epochs, "
          f"top-1 on the 360 test digits at the last epoch, seeds {args.seeds}")
    print(f"{'student':<8}{'per seed':>30}{'mean':>9}")
    for name, values in scores.items():
        print(f"{name:<8}{' '.join(f'{v:.2f}%' for v in values):>30}{statistics.mean(values):>8.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
