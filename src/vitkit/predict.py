"""``vitkit predict``: class probabilities for image files, with the checkpoint's own preprocessing.

Any image Pillow reads (RGB, grayscale, RGBA composited on white, palette, 16-bit; any size)
goes through ``vitkit.images.load_image`` and ``preprocess_image`` with the ``preprocess``
dict saved in the checkpoint's config.json, so a file is turned into exactly the kind of
tensor the model was trained on.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .checkpoint import load_pretrained
from .data import IMAGE_EXTENSIONS, image_files
from .images import ImageError, load_image, preprocess_image


def image_paths(paths: list[str | os.PathLike]) -> list[Path]:
    """``paths`` with each directory replaced by the image files under it (any depth, sorted)."""
    out = []
    for path in map(Path, paths):
        if path.is_dir():
            found = image_files(path)
            if not found:
                raise ImageError(f"{path}: a directory with no image files ({', '.join(IMAGE_EXTENSIONS)})")
            out.extend(found)
        else:
            out.append(path)
    return out


@torch.no_grad()
def _check_topk(topk: int) -> None:
    if topk < 1:
        raise ValueError(f"--topk: expected a positive number of classes to list, got {topk}")


def _check_classifier(model: nn.Module, source: str) -> None:
    if model.cfg.num_classes == 0:
        raise ValueError(f"{source}: no classifier (num_classes 0: a features-only backbone, as DINOv2's and "
                         "CLIP's towers convert), so nothing to predict; `vitkit embed` gives its features, "
                         "`vitkit train --pretrained` fits a classifier")


def predict(model: nn.Module, paths: list[str | os.PathLike], topk: int = 5, batch_size: int = 64,
            skip_bad_images: bool = False) -> list[dict]:
    """``[{"image": path, "predictions": [{"label", "index", "probability"}, ...]}, ...]``, best first.

    An unreadable file raises ``ImageError`` naming it; with ``skip_bad_images`` it gets
    ``{"image": path, "error": why}`` instead, in its place, and the others are still classified."""
    _check_topk(topk)
    _check_classifier(model, "the model")
    model.eval()
    names = getattr(model, "class_names", None)
    k = min(topk, model.cfg.num_classes)
    device = next(model.parameters()).device
    results = []
    for start in range(0, len(paths), batch_size):
        chunk, images, errors = paths[start:start + batch_size], [], {}
        for path in chunk:
            try:
                images.append(preprocess_image(load_image(path, model.cfg.in_channels), model.preprocess))
            except ImageError as e:
                if not skip_bad_images:
                    raise
                errors[str(path)] = str(e)
        if images:
            probs = model(torch.stack(images).to(device)).float().softmax(-1)  # (B, num_classes)
            top = iter(zip(*(t.tolist() for t in probs.topk(k, dim=-1))))
        for path in chunk:
            if str(path) in errors:
                results.append({"image": str(path), "error": errors[str(path)]})
                continue
            p, i = next(top)
            results.append({
                "image": str(path),
                "predictions": [{"label": names[c] if names else str(c), "index": c, "probability": q}
                                for q, c in zip(p, i)],
            })
    return results


def predict_files(checkpoint: str | os.PathLike, paths: list[str | os.PathLike], topk: int = 5,
                  device: str = "cpu", skip_bad_images: bool = False) -> list[dict]:
    """``predict`` with a checkpoint (a run folder means its best/) on files and directories of them."""
    from .train import DistInfo, resolve_device

    _check_topk(topk)  # before the model loads
    model = load_pretrained(checkpoint, map_location=resolve_device(device, DistInfo()))
    _check_classifier(model, str(checkpoint))
    return predict(model, image_paths(paths), topk=topk, skip_bad_images=skip_bad_images)


__all__ = ["predict", "predict_files", "image_paths"]
