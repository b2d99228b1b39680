"""The Fashion-MNIST recipe: train configs/fashion_mnist.yaml, evaluate the test set, report time and top-1.

    python benchmarks/fashion_mnist.py                       # runs/fashion-mnist, target 92%
    python benchmarks/fashion_mnist.py --epochs 5 --out runs/fm-quick
    python benchmarks/fashion_mnist.py --resume              # go on after an interruption

Extra ``--key value`` pairs override the config file, as with ``vitkit train``. The exit
status is 0 when the test top-1 reaches ``--target``, 1 otherwise. Needs Debian's
``dataset-fashion-mnist`` (``make fashion-mnist``) or ``--data-dir``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from vitkit.evaluate import evaluate_checkpoint
from vitkit.train import Interrupted, resolve_config, resume, train

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "fashion_mnist.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--target", type=float, default=92.0, help="test top-1 (%%) to reach")
    parser.add_argument("--resume", action="store_true", help="continue the run folder's last/ checkpoint")
    args, rest = parser.parse_known_args(argv)
    if len(rest) % 2 or not all(k.startswith("--") for k in rest[::2]):
        parser.error(f"expected --key value pairs after the options, got {rest}")
    overrides = {k[2:].replace("-", "_"): v for k, v in zip(rest[::2], rest[1::2])}
    cfg = resolve_config(args.config, overrides)

    start = time.perf_counter()
    try:
        if args.resume:
            result = resume(cfg.run_dir, {k: v for k, v in overrides.items() if k not in ("out", "name")})
        else:
            result = train(cfg)
    except Interrupted as e:
        print(e, file=sys.stderr)
        return 128 + e.signum if e.signum else 0
    minutes = (time.perf_counter() - start) / 60
    report = evaluate_checkpoint(result.run_dir / "best")
    summary = {
        "top1": round(report["top1"], 2), "top5": round(report["top5"], 2), "target": args.target,
        "train_minutes_this_invocation": round(minutes, 1), "epochs": cfg.epochs, "run": str(result.run_dir),
        "train_images_per_s": [r["images_per_s"] for r in result.history][-1:],
    }
    print(json.dumps(summary, indent=2))
    ok = report["top1"] >= args.target
    print(f"Fashion-MNIST test top-1 {report['top1']:.2f}% ({'>=' if ok else '<'} {args.target}%) "
          f"after {minutes:.1f} min of training", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
