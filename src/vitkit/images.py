"""Reading user images safely, and the preprocessing a checkpoint asks for.

Every image vitkit reads goes through ``load_image``: any mode (RGB, grayscale, RGBA,
palette, 16-bit: scaled by the full 16-bit range, so an image keeps its brightness), any
size; Pillow's decompression-bomb limit stays on; a file that is not an image gets an
error that names it.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from .config import CROP_MODES, INTERPOLATIONS, default_normalisation


class ImageError(ValueError):
    """An input image vitkit cannot read; the message names the file."""


def load_image(path: str | os.PathLike, channels: int = 3) -> Image.Image:
    """Open ``path`` fully (so truncation is caught here) as RGB (channels=3) or L (channels=1)."""
    path = Path(path)
    if path.is_dir():
        raise ImageError(f"{path}: is a directory; expected an image file (any format Pillow reads)")
    if not path.is_file():
        raise ImageError(f"{path}: no such image file")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow warns below its hard limit; vitkit treats any bomb warning as an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                img = _to_mode(img, channels)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{path}: refused: the image is too large to decode safely ({e})") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"{path}: not an image Pillow can read") from e
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise ImageError(f"{path}: corrupt or truncated image ({e})") from e
    return img


SIXTEEN_BIT_MAX = 65535


def _deep_to_8bit(arr: np.ndarray) -> np.ndarray:
    """16-bit samples (``I;16*``) -> 8-bit by the mode's full range, ``v * 255 / 65535`` rounded, as an
    8-bit file of the same image holds them (65535 -> 255, 257 * v -> v): the absolute brightness is
    kept, where a per-image min-max stretch turned a uniform white image black. Mode ``I`` (32-bit
    ints: a 16-bit PNG in some Pillow versions, 32-bit TIFFs) is read as 16-bit samples too; values
    outside 0..65535 are clipped to it (below 0 is black, above 65535 white)."""
    arr = np.clip(arr.astype(np.float64), 0, SIXTEEN_BIT_MAX)
    return np.rint(arr * (255.0 / SIXTEEN_BIT_MAX)).astype(np.uint8)


def _to_mode(img: Image.Image, channels: int) -> Image.Image:
    key = img.info.get("transparency")  # a palette's transparent entries, or an L/RGB/16-bit PNG's colour key
    if img.mode in ("RGBA", "LA", "PA") or (key is not None and img.mode in ("P", "L", "RGB", "1")):
        # Composite transparency on white rather than dropping alpha (which shows hidden pixels).
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img)
        gray = _deep_to_8bit(arr)
        if isinstance(key, int):
            gray[arr == key] = 255  # the colour-keyed pixels, composited on white as above
        img = Image.fromarray(gray, mode="L")
    return img.convert("L" if channels == 1 else "RGB")


_INTERPOLATION = {name: Image.Resampling[name.upper()] for name in INTERPOLATIONS}


def crop_mode(preprocess: dict) -> str:
    """``preprocess``'s crop mode (``config.CROP_MODES``). A dict without one was written before vitkit
    knew timm's centre mode at crop_pct 1.0: it squashed there and cropped the centre below, and is
    read that way."""
    if "crop_mode" in preprocess:
        return preprocess["crop_mode"]
    return "squash" if float(preprocess.get("crop_pct", 1.0)) == 1.0 else "center"


def check_preprocess(preprocess, channels: int, source: str) -> None:
    """Raise ValueError naming ``source`` for a preprocess dict ``preprocess_image`` cannot follow.

    A checkpoint's config.json may come from anywhere: a KeyError or a division by zero deep
    inside predict is no way to say that its ``preprocess`` is wrong.
    """
    if not isinstance(preprocess, dict):
        raise ValueError(f"{source}: preprocess: expected an object, got {type(preprocess).__name__}")

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    lengths = {1, 3, channels}
    checks = {
        "img_size": (lambda v: isinstance(v, (list, tuple)) and len(v) == 2
                     and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in v),
                     "[height, width] of positive ints"),
        # timm's share of the resized image: 0.875, 0.9, 1.0 (above 1 pads); 87.5 is a percentage typed for it
        "crop_pct": (lambda v: number(v) and 0.01 <= v <= 4, "a share between 0.01 and 4 (timm's 0.875, 0.9, 1.0)"),
        "interpolation": (lambda v: isinstance(v, str) and v in _INTERPOLATION, f"one of {sorted(_INTERPOLATION)}"),
        "crop_mode": (lambda v: isinstance(v, str) and v in CROP_MODES, f"one of {list(CROP_MODES)}"),
        # one value per channel, or one for all; 3 is what default_preprocess writes for any non-gray model
        "mean": (lambda v: isinstance(v, (list, tuple)) and len(v) in lengths and all(map(number, v)),
                 f"{' or '.join(map(str, sorted(lengths)))} numbers"),
        "std": (lambda v: isinstance(v, (list, tuple)) and len(v) in lengths
                and all(number(x) and x > 0 for x in v), f"{' or '.join(map(str, sorted(lengths)))} positive numbers"),
    }
    for key, (ok, expected) in checks.items():
        if key in preprocess and not ok(preprocess[key]):
            raise ValueError(f"{source}: preprocess.{key}: expected {expected}, got {preprocess[key]!r}")


# Above this many pixels a resized image is not made whole, only its crop (resize_image)
RESIZE_MAX_PIXELS = 2**24


def scaled_size(img_size, crop_pct: float) -> tuple[int, int]:
    """timm's resize target before the crop: (height, width) over crop_pct, floored (at least a pixel)."""
    h, w = img_size
    return max(1, math.floor(h / crop_pct)), max(1, math.floor(w / crop_pct))


def _centre(outer: int, inner: int) -> int:
    """The offset of a centred cut of ``inner`` pixels from ``outer``, half rounded to even (torchvision's)."""
    return int(round((outer - inner) / 2))


def resize_image(img: Image.Image, preprocess: dict) -> Image.Image:
    """The geometric half of ``preprocess_image``, as timm's eval transform (and torchvision's
    Resize and CenterCrop, whose rounding it follows) cuts a PIL image: resize to img_size / crop_pct,
    by the shorter side ("center") or each side ("squash", ``crop_mode``), then crop the centre."""
    h, w = preprocess.get("img_size", [224, 224])
    interp = _INTERPOLATION[preprocess.get("interpolation", "bicubic")]
    scale_h, scale_w = scaled_size((h, w), float(preprocess.get("crop_pct", 1.0)))
    if crop_mode(preprocess) == "squash":
        size = (scale_w, scale_h)
    elif scale_h == scale_w:  # the shorter side to the scale, the longer truncated (torchvision's Resize(int))
        short, long = sorted(img.size)
        size = (scale_w, int(scale_h * long / short)) if img.width <= img.height else (int(scale_w * long / short), scale_h)
    else:  # a non-square size: the side that reaches its scale first, both rounded (timm's ResizeKeepRatio)
        ratio = min(img.height / scale_h, img.width / scale_w)
        size = (round(img.width / ratio), round(img.height / ratio))
    if size[0] * size[1] > RESIZE_MAX_PIXELS and size[0] >= w and size[1] >= h:
        # A sliver (2 x 60000: its shorter side to 256 makes 7.7 gigapixels, 23 GB, as in timm and
        # torchvision) resizes only the crop (PIL's box: each output pixel's source window as in the whole
        # resize, but PIL rounds the coordinates otherwise: up to 2 levels of 255 apart on photos with
        # bicubic or bilinear, more on noise or with nearest and lanczos; so only where it must)
        left, top = _centre(size[0], w), _centre(size[1], h)
        sx, sy = img.width / size[0], img.height / size[1]
        return img.resize((w, h), interp, box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))
    if img.size != size:
        img = img.resize(size, interp)
    if img.size == (w, h):
        return img
    if img.width < w or img.height < h:  # crop_pct above 1: torchvision pads with zeros, centred
        padded = Image.new(img.mode, (max(w, img.width), max(h, img.height)))
        padded.paste(img, ((padded.width - img.width) // 2, (padded.height - img.height) // 2))
        img = padded
    left, top = _centre(img.width, w), _centre(img.height, h)
    return img.crop((left, top, left + w, top + h))


def preprocess_image(img: Image.Image, preprocess: dict) -> Tensor:
    """Resize and crop (``resize_image``), scale to [0, 1], normalise: (C, H, W).

    ``preprocess`` is the dict a checkpoint's config.json carries (timm's eval transform).
    """
    img = resize_image(img, preprocess)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    x = torch.from_numpy(arr).unsqueeze(0) if arr.ndim == 2 else torch.from_numpy(arr).permute(2, 0, 1)
    stats = {**default_normalisation(x.shape[0]), **preprocess}
    mean, std = (torch.tensor(stats[k], dtype=torch.float32) for k in ("mean", "std"))
    return (x - mean[:, None, None]) / std[:, None, None]


def load_and_preprocess(path: str | os.PathLike, preprocess: dict, channels: int) -> Tensor:
    return preprocess_image(load_image(path, channels), preprocess)


__all__ = ["load_image", "crop_mode", "scaled_size", "resize_image", "preprocess_image", "load_and_preprocess", "ImageError"]
