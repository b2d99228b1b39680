"""Does a streamed folder keep a ViT fed? Decoding images/s of ``--folder-loading stream`` against the
model's training images/s, in one process.

    python benchmarks/folder_stream.py                                   # vit_tiny_patch16_224, 224x224
    python benchmarks/folder_stream.py --model vit_small_patch16_224 --images 800

It writes a folder of real JPEG photos (random crops of scikit-image's astronaut, cat and coffee,
200 to 500 pixels a side, as a camera roll would hold) to a temporary directory, then times:

* ``stream``: the training loop's own pattern, ``prefetch`` of the next batch and ``images[idx]`` of
  this one, with nothing else running (the decoder's own rate; ``--decode-threads``);
* ``memory``: decoding the whole folder once (``--folder-loading memory``), per image;
* ``train``: one bf16-autocast training step of the model on such a batch, already decoded;
* ``stream + train``: the two together, as ``vitkit train`` runs them: the decoder threads share the
  cores with the step. Its images/s against ``train`` alone is what streaming costs the run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def write_photos(root: Path, count: int) -> None:
    from PIL import Image
    from skimage import data

    rng = np.random.default_rng(0)
    sources = {"astronaut": data.astronaut(), "cat": data.chelsea(), "coffee": data.coffee()}
    for split, n in (("train", count), ("val", max(3, count // 10))):
        for i in range(n):
            name = list(sources)[i % 3]
            image = sources[name]
            h, w = image.shape[:2]
            sh, sw = int(rng.integers(200, min(h, 500))), int(rng.integers(200, min(w, 500)))
            y, x = int(rng.integers(0, h - sh + 1)), int(rng.integers(0, w - sw + 1))
            (root / split / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[y:y + sh, x:x + sw]).save(root / split / name / f"{i}.jpg", quality=90)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--images", type=int, default=480, help="training images written")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--decode-threads", type=int, default=0, help="0: FileImages' default (up to 4)")
    p.add_argument("--steps", type=int, default=6, help="timed training steps (after one warm-up)")
    args = p.parse_args(argv)

    from vitkit import fast
    from vitkit.bench import build_contestant, machine_info, machine_line
    from vitkit.config import get_config
    from vitkit.data import FileImages, load_dataset, prefetch

    fast.tune_cpu_allocator()
    device = torch.device("cpu")
    cfg = get_config(args.model)
    print(machine_line(machine_info(device)))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "photos"
        write_photos(root, args.images)
        spec = dict(img_size=cfg.img_size, channels=cfg.in_channels)
        start = time.perf_counter()
        held = load_dataset(f"folder:{root}", folder_loading="memory", **spec)
        memory_rate = (len(held.train) + len(held.val)) / (time.perf_counter() - start)
        streamed = load_dataset(f"folder:{root}", folder_loading="stream", **spec)
        images: FileImages = streamed.train.images
        if args.decode_threads:
            images.threads = args.decode_threads
        bs = args.batch_size
        batches = [torch.arange(i, i + bs) for i in range(0, len(images) - bs + 1, bs)]

        def stream_epoch(step=None) -> tuple[float, int]:
            start, seen = time.perf_counter(), 0
            for i, idx in enumerate(batches):
                for ahead in batches[i:i + 2]:
                    prefetch(images, ahead)
                x = images[idx]
                if step is not None:
                    step(x)
                seen += len(idx)
            return seen / (time.perf_counter() - start), seen

        stream_rate, _ = stream_epoch()
        contestant = build_contestant("vitkit", cfg.replace(num_classes=3), "train", "bf16-autocast", False, bs, device)
        contestant.step()  # warm-up
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            contestant.step()
            times.append(time.perf_counter() - start)
        train_rate = bs / statistics.median(times)
        together_rate, _ = stream_epoch(lambda x: contestant.step())
    print(f"model {args.model} at {cfg.img_size[0]}x{cfg.img_size[1]}, batch {bs}, {len(images)} JPEG photos, "
          f"{images.threads} decoder threads")
    print(f"{'what':<42}{'images/s':>10}")
    for name, rate in (("memory: decode the folder once", memory_rate), ("stream: decode batch by batch", stream_rate),
                       ("train: bf16 autocast step, decoded batch", train_rate),
                       ("stream + train, as vitkit train runs", together_rate)):
        print(f"{name:<42}{rate:>10.1f}")
    print(f"streaming costs the run {100 * (1 - together_rate / train_rate):.1f}% of its training speed; the "
          f"decoder alone runs {stream_rate / train_rate:.1f}x the model's rate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
