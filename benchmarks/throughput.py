"""Throughput of vitkit against timm: one configuration, or the whole acceptance suite.

    python benchmarks/throughput.py --model vit_base_patch16_224 --batch-size 8 --precision bf16 --compile
    python benchmarks/throughput.py --suite --json results.json      # every row of README "Performance"

One configuration takes the same flags as ``vitkit bench`` (the measuring code is
``vitkit.bench``). ``--suite`` runs the configurations below in one process, each with its
contestants interleaved run by run, then prints the ratios the README reports, including
each library's best path against the other's (best over eager and compiled).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from vitkit import fast
from vitkit.bench import add_arguments, run_benchmark, run_from_args
from vitkit.checkpoint import atomic_file

B16 = "vit_base_patch16_224"
# (label, model, batch, mode, precision, compile, contestants)
SUITE = [
    ("B/16 infer fp32 eager", B16, 8, "infer", "fp32", False, "vitkit,timm,vitkit-math"),
    ("B/16 infer bf16 eager", B16, 8, "infer", "bf16", False, "vitkit,timm"),
    # Every path of each library in one process, for the best-vs-best headline.
    ("B/16 infer best paths", B16, 8, "infer", "bf16", False,
     "timm:bf16:eager,timm:bf16:compiled,vitkit:bf16:eager,vitkit:bf16:compiled,vitkit:int8:eager,"
     "timm-recipe:bf16:compiled"),
    ("B/16 train bf16-autocast eager", B16, 8, "train", "bf16-autocast", False, "vitkit,timm"),
    ("B/16 train bf16-autocast compiled", B16, 8, "train", "bf16-autocast", True, "vitkit,timm"),
    ("digits train fp32 eager", "vit_digits", 128, "train", "fp32", False, "vitkit,timm,vitkit-math"),
    ("digits train fp32 compiled", "vit_digits", 128, "train", "fp32", True, "vitkit,timm"),
    ("digits train bf16-autocast eager", "vit_digits", 128, "train", "bf16-autocast", False, "vitkit,timm"),
    ("digits train bf16-autocast compiled", "vit_digits", 128, "train", "bf16-autocast", True, "vitkit,timm"),
    ("fmnist train fp32 eager", "vit_fmnist", 128, "train", "fp32", False, "vitkit,timm,vitkit-math"),
    ("fmnist train fp32 compiled", "vit_fmnist", 128, "train", "fp32", True, "vitkit,timm"),
    # --precision auto on a CPU with bf16 arithmetic, and on GPUs: what `vitkit train` runs.
    ("fmnist train bf16-autocast eager", "vit_fmnist", 128, "train", "bf16-autocast", False, "vitkit,timm"),
    ("fmnist train bf16-autocast compiled", "vit_fmnist", 128, "train", "bf16-autocast", True, "vitkit,timm"),
]


def best_of(reports: dict, labels: list[str], library: str, clock: str) -> tuple[float, str]:
    """The highest images per second (``clock`` "wall" or "cpu") a library reached, and where."""
    attr = "images_per_s" if clock == "wall" else "images_per_cpu_s"
    found = [(getattr(r, attr), f"{label}: {r.contestant}") for label in labels if label in reports
             for r in reports[label].results if r.contestant.split(":")[0] == library]
    return max(found) if found else (float("nan"), "-")


def run_suite(runs: int, warmup: int, only: str | None, device: str) -> dict:
    reports = {}
    for label, model, batch, mode, precision, compile_, contestants in SUITE:
        if only and only not in label:
            continue
        start = time.perf_counter()
        print(f"\n== {label}", flush=True)
        report = run_benchmark(model, batch, mode, precision, compile_, contestants.split(","), runs, warmup, device)
        reports[label] = report
        print(report.table())
        print(f"({time.perf_counter() - start:.0f} s)", flush=True)

    print("\n== ratios over timm's images per second (wall clock / CPU clock), same process, medians")
    for label, report in reports.items():
        ratios = ", ".join(f"{r.contestant} {r.vs_baseline:.2f}x / {r.vs_baseline_cpu:.2f}x"
                           for r in report.results if r.vs_baseline != 1.0)
        print(f"{label:<34} {ratios}")
    for what, labels in [("B/16 infer, best vs best", ["B/16 infer best paths"]),
                         ("B/16 train, best vs best", [k for k in reports if k.startswith("B/16 train")]),
                         ("digits train, best vs best", [k for k in reports if k.startswith("digits train")]),
                         ("fmnist train, best vs best", [k for k in reports if k.startswith("fmnist train")])]:
        if not any(label in reports for label in labels):  # --only left this group out
            continue
        for clock in ("wall", "cpu"):
            (ours, at), (theirs, their_at) = best_of(reports, labels, "vitkit", clock), best_of(reports, labels, "timm", clock)
            print(f"{what:<34} [{clock}] vitkit {ours:.2f} img/s ({at}) / timm {theirs:.2f} img/s ({their_at}) "
                  f"= {ours / theirs:.2f}x")
    return reports


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(p)
    p.add_argument("--suite", action="store_true", help="run every configuration of the README table")
    p.add_argument("--only", help="with --suite: only the configurations whose label contains this text")
    args = p.parse_args(argv)
    if not args.suite:
        run_from_args(args)
        return 0
    if args.threads:
        fast.set_num_threads(args.threads)
    reports = run_suite(args.runs, args.warmup, args.only, args.device)
    if args.json:
        with atomic_file(args.json, "w") as f:
            json.dump({label: r.to_dict() for label, r in reports.items()}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
