"""How fast the training loader feeds a model: images/s of one batch's indexing, transfer and augmentation.

    python benchmarks/loader.py                       # configs/digits.yaml and configs/fashion_mnist.yaml
    python benchmarks/loader.py --device cuda         # the same on a GPU (augmented there, as vitkit train does)

What ``vitkit train`` does per step before the model runs: index the uint8 training images with the
step's batch, move them to the device, and augment them there (``vitkit.train.make_augment``: the
config's translation, flips, RandAugment, erasing, MixUp/CutMix). Compare the figure with the
training images/s that ``vitkit bench --mode train`` or the run's metrics.csv show for the same
model: the loader is the bottleneck only when it is the lower of the two. On CPU it runs on
``--threads`` threads (default 1: the loader shares the cores with training).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time

import torch

from vitkit import fast
from vitkit.bench import _sync, machine_info, machine_line
from vitkit.data import global_batches, load_dataset
from vitkit.train import make_augment, resolve_config


def loader_rate(config: str, device: torch.device, batches: int, data_dir: str | None) -> tuple[str, int, float]:
    cfg = resolve_config(config, {"data_dir": data_dir} if data_dir else None)
    data = load_dataset(cfg.dataset, cfg.data_dir)
    augment = make_augment(cfg, data)
    # the training order, epoch after epoch, made only as far as the batches timed here reach
    order = itertools.chain.from_iterable(global_batches(len(data.train), cfg.batch_size, 0, epoch)
                                          for epoch in itertools.count())
    times = []
    for i, idx in enumerate(itertools.islice(order, batches + 3)):  # three warm-up batches
        _sync(device)
        start = time.perf_counter()
        x = data.train.images[idx].to(device, non_blocking=True)
        x, targets = augment(x, data.train.labels[idx].to(device, non_blocking=True))
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return cfg.dataset, cfg.batch_size, cfg.batch_size / statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="*", default=["configs/digits.yaml", "configs/fashion_mnist.yaml"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", help="where fashion-mnist's idx files are, if not in the default place")
    p.add_argument("--batches", type=int, default=200, help="timed batches (median reported)")
    args = p.parse_args(argv)
    fast.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(machine_line(machine_info(device)))
    print(f"{'config':<32}{'dataset':<16}{'batch':>6}{'images/s':>12}")
    for config in args.configs:
        dataset, batch, rate = loader_rate(config, device, args.batches, args.data_dir)
        print(f"{config:<32}{dataset:<16}{batch:>6}{rate:>12,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
