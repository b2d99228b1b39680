"""``vitkit predict``: class probabilities for image files, with the checkpoint's own preprocessing.

Any image Pillow reads (RGB, grayscale, RGBA composited on white, palette, 16-bit; any size)
goes through ``vitkit.images.load_image`` and ``preprocess_image`` with the ``preprocess``
dict saved in the checkpoint's config.json, so a file is turned into exactly the kind of
tensor the model was trained on.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .checkpoint import load_pretrained
from .images import load_image, preprocess_image


@torch.no_grad()
def predict(model: nn.Module, paths: list[str | os.PathLike], topk: int = 5, batch_size: int = 64) -> list[dict]:
    """``[{"image": path, "predictions": [{"label", "index", "probability"}, ...]}, ...]``, best first."""
    model.eval()
    names = getattr(model, "class_names", None)
    k = max(1, min(topk, model.cfg.num_classes))
    device = next(model.parameters()).device
    results = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        x = torch.stack([preprocess_image(load_image(p, model.cfg.in_channels), model.preprocess) for p in chunk])
        probs = model(x.to(device)).float().softmax(-1)  # (B, num_classes)
        top = probs.topk(k, dim=-1)
        for path, p, i in zip(chunk, top.values.tolist(), top.indices.tolist()):
            results.append({
                "image": str(path),
                "predictions": [{"label": names[c] if names else str(c), "index": c, "probability": q}
                                for q, c in zip(p, i)],
            })
    return results


def predict_files(checkpoint: str | os.PathLike, paths: list[str | os.PathLike], topk: int = 5,
                  device: str = "cpu") -> list[dict]:
    model = load_pretrained(checkpoint, map_location=device)  # a run folder means its best/
    return predict(model, paths, topk=topk)


__all__ = ["predict", "predict_files"]
