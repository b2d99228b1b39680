"""``vitkit eval``: top-1, top-5, loss, per-class accuracy and a confusion matrix of a checkpoint.

``evaluate`` is also what the training loop calls after every epoch; under torch.distributed
each rank scores its share of the images and the sums are all-reduced.
"""

from __future__ import annotations

import io
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import _resolve, atomic_file, load_pretrained, read_config
from .data import Dataset, Split, load_dataset, normalize, prefetch
from .fast import quantize_int8

EVAL_PRECISIONS = ("fp32", "bf16", "fp16", "int8")


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, preprocess: dict, num_classes: int, batch_size: int = 512,
             device: torch.device | str = "cpu", precision: str = "fp32", dist=None) -> dict:
    """Score ``model`` on ``split``: loss (plain cross-entropy), top-1/top-5 (%), per-class accuracy (%),
    and the (num_classes, num_classes) confusion matrix, rows = true class, columns = prediction."""
    from .train import DistInfo, autocast

    dist = dist or DistInfo.current()
    device = torch.device(device)
    was_training = model.training
    model.eval()
    k = min(5, num_classes)
    # On the device: no host sync per batch, and tensors that NCCL (CUDA tensors only) can reduce.
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-k hits, images
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.float64, device=device)
    mine = torch.arange(dist.rank, len(split), dist.world_size)  # this rank's share, interleaved
    # the same number of batches on every rank (a last one may be empty): an FSDP forward is collective
    for start in range(0, -(-len(split) // dist.world_size), batch_size):
        idx = mine[start:start + batch_size]
        for ahead in (idx, mine[start + batch_size:start + 2 * batch_size]):  # a streamed folder: this batch
            prefetch(split.images, ahead)  # (if not yet) and the next, decoding while the model runs
        x = normalize(split.images[idx].to(device), preprocess)  # uint8 crosses to the device: 1/4 of the bytes
        y = split.labels[idx].to(device)
        with autocast(device, precision):
            logits = model(x)
        logits = logits.float()
        topk = logits.topk(k, dim=-1).indices  # (B, k)
        sums[:3] += torch.stack([
            F.cross_entropy(logits, y, reduction="sum").double(),
            (topk[:, 0] == y).sum().double(),
            (topk == y[:, None]).any(-1).sum().double(),
        ])
        confusion += torch.bincount(y * num_classes + topk[:, 0], minlength=num_classes ** 2).double()
    sums[3] = len(mine)  # the batches above cover this rank's share exactly
    sums = dist.all_reduce(sums).cpu()
    confusion = dist.all_reduce(confusion).cpu()
    model.train(was_training)
    confusion = confusion.reshape(num_classes, num_classes)  # (K*K,) -> (true K, predicted K)
    per_class = (100 * confusion.diagonal() / confusion.sum(1).clamp(min=1)).tolist()
    n = max(sums[3].item(), 1)
    return {
        "loss": sums[0].item() / n, "top1": 100 * sums[1].item() / n, "top5": 100 * sums[2].item() / n,
        "images": int(sums[3].item()), "per_class": per_class, "confusion": confusion.long(),
    }


def plot_confusion(confusion: Tensor, class_names: list[str], path: str | os.PathLike, title: str = "") -> Path:
    """A confusion-matrix PNG (counts in the cells), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(class_names)
    size = max(4.0, 0.5 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(confusion.numpy(), cmap="Blues")
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(class_names, rotation=90)
    ax.set_yticklabels(class_names)
    if n <= 30:
        peak = max(int(confusion.max()), 1)
        for i in range(n):
            for j in range(n):
                v = int(confusion[i, j])
                if v:
                    ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                            color="white" if v > peak / 2 else "black")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    with atomic_file(path) as f:
        f.write(buf.getvalue())
    return Path(path)


def match_classes(model: nn.Module, data: Dataset, source: str, dataset: str) -> Dataset:
    """``data`` with its labels numbered as the model numbers its classes: a model that names its
    classes (``class_names``) is scored on a dataset of the same names only; the same names in another
    order (a folder's sorted names against a table's, say) have their labels mapped, and a note says so.
    A model without names is checked for the number of classes alone."""
    names = getattr(model, "class_names", None)
    if names is None:
        if model.cfg.num_classes != data.num_classes:
            raise ValueError(f"{source}: the model has {model.cfg.num_classes} classes but --dataset {dataset} "
                             f"has {data.num_classes} {data.class_names}")
        return data
    if names == data.class_names:
        return data
    if sorted(names) != sorted(data.class_names) or len(set(names)) != len(names):
        missing = [n for n in names if n not in data.class_names]
        extra = [n for n in data.class_names if n not in names]
        raise ValueError(f"{source}: the model was trained on the classes {names} but --dataset {dataset} has "
                         f"{data.class_names} (not in the data: {missing}; not the model's: {extra}); "
                         "a model is scored only on the classes it was trained on")
    print(f"--dataset {dataset}: its classes {data.class_names} are the model's {names} in another order; "
          "its labels are mapped to the model's", file=sys.stderr, flush=True)
    to_model = torch.tensor([names.index(n) for n in data.class_names], dtype=torch.long)
    def remap(split: Split) -> Split:
        return Split(split.images, to_model[split.labels])

    return replace(data, train=remap(data.train), val=remap(data.val), class_names=list(names))


def evaluate_checkpoint(path: str | os.PathLike, dataset: str | None = None, data_dir: str | None = None,
                        batch_size: int = 512, device: str = "cpu", precision: str = "fp32",
                        confusion_png: str | os.PathLike | None = None, skip_bad_images: bool = False,
                        folder_loading: str = "auto") -> dict:
    """Load a checkpoint (or a run folder's best/), score it on the dataset's test split, plot the confusion.

    ``precision``: ``fp32``, ``bf16`` or ``fp16`` (autocast), or ``int8`` (every Linear dynamically quantised,
    ``vitkit.fast.quantize_int8``; CPU only): how much accuracy a faster inference path costs.
    """
    from .train import DistInfo, resolve_device

    if precision not in EVAL_PRECISIONS:
        raise ValueError(f"precision: expected one of {EVAL_PRECISIONS}, got {precision!r}")
    if batch_size < 1:
        raise ValueError(f"--batch-size: expected a positive number of images a batch, got {batch_size}")
    if precision == "int8":
        if str(device) not in ("cpu", "auto"):
            raise ValueError(f"precision 'int8': CPU only, got device {device!r}")
        device = "cpu"
    device = resolve_device(device, DistInfo())  # a clean error for cuda on a machine without it
    # a run folder (its best/), a checkpoint directory or its model.safetensors, as predict and embed take
    ckpt = _resolve(path)[1]
    meta = read_config(ckpt)
    model = load_pretrained(path, map_location=device)
    if precision == "int8":
        model, precision = quantize_int8(model), "fp32"  # int8 Linears take float activations
    dataset = dataset or (meta.get("train") or {}).get("dataset")
    if not dataset:
        raise ValueError(f"{ckpt}: the checkpoint does not say which dataset it was trained on; pass --dataset")
    data_dir = data_dir or (meta.get("train") or {}).get("data_dir")
    # a folder of class folders only: the validation images its training held out
    val_fraction = (meta.get("train") or {}).get("val_fraction", 0.1)
    data = load_dataset(dataset, data_dir, img_size=model.cfg.img_size, channels=model.cfg.in_channels,
                        preprocess=model.preprocess, skip_bad_images=skip_bad_images, with_train=False,
                        folder_loading=folder_loading, val_fraction=val_fraction)
    data = match_classes(model, data, f"{ckpt}", dataset)
    class_names = model.class_names or data.class_names
    want = (model.cfg.in_channels, *model.cfg.img_size)
    if tuple(data.val.images.shape[1:]) != want:
        raise ValueError(f"{ckpt}: the model takes {want} images but {dataset} has {tuple(data.val.images.shape[1:])}")
    result = evaluate(model, data.val, model.preprocess, data.num_classes, batch_size=batch_size,
                      device=device, precision=precision)
    if confusion_png is None:
        run = Path(path)  # a run folder: run/confusion.png; a checkpoint (or its weights file): beside it
        confusion_png = (run / "confusion.png" if run.is_dir() and ckpt != run
                         else ckpt.parent / f"confusion-{ckpt.name}.png")
    plot_confusion(result["confusion"], class_names, confusion_png,
                   title=f"{dataset}: top-1 {result['top1']:.2f}%")
    return {
        "checkpoint": str(ckpt), "dataset": dataset, "split": "val", "images": result["images"],
        "loss": result["loss"], "top1": result["top1"], "top5": result["top5"],
        "per_class": dict(zip(class_names, result["per_class"])),
        "confusion": result["confusion"].tolist(), "confusion_png": str(confusion_png),
    }


__all__ = ["EVAL_PRECISIONS", "evaluate", "evaluate_checkpoint", "match_classes", "plot_confusion"]
