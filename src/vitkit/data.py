"""Training data: real datasets held in memory as uint8 tensors, augmented a batch at a time.

Three sources, named by ``--dataset``:

* ``digits``: scikit-learn's 8x8 handwritten digits (1797 real images, shipped inside
  the sklearn package, so nothing is downloaded). Fixed stratified split: 1437 train / 360 test.
* ``fashion-mnist``: the idx files Debian's ``dataset-fashion-mnist`` installs under
  ``/usr/share/datasets/fashion-mnist`` (or ``--data-dir``). 60000 train / 10000 test.
* ``folder:PATH``: an ImageFolder tree ``PATH/{train,val}/CLASS/IMAGE`` (or ``PATH/CLASS/IMAGE``,
  a share of each class held out for validation), every image read
  through ``vitkit.images.load_image`` and resized once to the model's input size; or, for a
  folder too large to hold decoded (``--folder-loading``), decoded again at each use
  (``FileImages``), the next batch while the model trains on this one.
* ``csv:FILE``: a table of image paths (relative to the file's folder) and their classes, with an
  optional train/val split column (``load_csv``); read as a folder is.

The first two are resized once too when a size is asked for (``vitkit train --img-size``, or a
checkpoint trained at another size in ``vitkit eval``): ``resize_dataset``.

Every split is one ``(N, C, H, W)`` uint8 tensor, the same numbers an image file of it
would hold, so a checkpoint's ``preprocess`` dict (resize, /255, mean/std) turns a saved
image back into exactly what the model saw in training. Augmentation runs on whole batches
(``BatchAugment``), so loading never limits the training speed of these small models.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from .config import to_2tuple
from .fast import device_memory
from .images import ImageError, load_image, preprocess_image, resize_image

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
DIGITS_TEST_SIZE = 360  # 1797 - 360 = 1437 training images
DIGITS_MAX = 16  # sklearn's digits count ink in 0..16 per pixel


@dataclass
class Split:
    """One split: ``images`` (N, C, H, W) uint8 (a tensor in memory, or ``FileImages`` decoding a
    folder's files as they are indexed) and ``labels`` (N,) int64."""

    images: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        assert self.images.dtype == torch.uint8 and self.images.ndim == 4, self.images.shape
        assert self.labels.shape == (self.images.shape[0],), (self.labels.shape, self.images.shape)

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, n: int) -> Split:
        """The first ``n`` examples."""
        return Split(self.images[:n], self.labels[:n])

    def sample(self, n: int, seed: int) -> Split:
        """``n`` examples drawn at random (without replacement) by a generator seeded with ``seed``, kept in
        their order: the same ones for the same seed, on every rank and on resume. (A folder's or a table's
        files are listed class by class: its first ``n`` could miss whole classes.)"""
        if n >= len(self):
            return self
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self), generator=g)[:n].sort().values
        images = self.images.take(idx.tolist()) if isinstance(self.images, FileImages) else self.images[idx]
        return Split(images, self.labels[idx])


@dataclass
class Dataset:
    name: str
    train: Split
    val: Split
    class_names: list[str]
    # How an image file becomes model input (vitkit.images.preprocess_image); saved in every checkpoint.
    preprocess: dict = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # unreadable images left out (--skip-bad-images)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # (C, H, W)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def gray_preprocess(size: tuple[int, int]) -> dict:
    """Eval transform of the 1-channel datasets: the file's pixels /255, then (x - 0.5) / 0.5 into [-1, 1]."""
    return dict(img_size=list(size), mean=[0.5], std=[0.5], interpolation="bilinear", crop_pct=1.0, crop_mode="squash")


def normalize(images: Tensor, preprocess: dict) -> Tensor:
    """uint8 (B, C, H, W) -> float (B, C, H, W): what preprocess_image does to a file, on a batch."""
    mean = torch.tensor(preprocess["mean"], dtype=torch.float32, device=images.device)
    std = torch.tensor(preprocess["std"], dtype=torch.float32, device=images.device)
    return (images.float() / 255.0 - mean[:, None, None]) / std[:, None, None]


# --- the sources -------------------------------------------------------------------------
def load_digits() -> Dataset:
    """sklearn's real 8x8 digits, as white ink (255) on black (0), split 1437/360 stratified."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    # 0..16 ink -> 0..255 like an image file; rounding makes a saved PNG hold exactly these numbers.
    images = torch.from_numpy(bunch.images).float().mul(255.0 / DIGITS_MAX).round().to(torch.uint8)
    images = images.unsqueeze(1)  # (N, 8, 8) -> (N, 1, 8, 8)
    labels = torch.from_numpy(bunch.target).long()
    idx = torch.arange(len(labels)).numpy()
    train_idx, test_idx = train_test_split(
        idx, test_size=DIGITS_TEST_SIZE, stratify=bunch.target, random_state=0, shuffle=True
    )
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return Dataset(
        name="digits",
        train=Split(images[train_idx], labels[train_idx]),
        val=Split(images[test_idx], labels[test_idx]),
        class_names=[str(d) for d in range(10)],
        preprocess=gray_preprocess((8, 8)),
    )


def _read_idx(path: Path, magic: int, ndim: int) -> Tensor:
    """One gzipped (or plain) idx file: big-endian magic, then ``ndim`` sizes, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read the idx file ({e})") from e
    header = 4 + 4 * ndim
    if len(data) < header or struct.unpack(">I", data[:4])[0] != magic:
        raise ValueError(f"{path}: not an idx file with magic number {magic}")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = 1
    for d in dims:
        expected *= d
    if len(data) - header != expected:
        raise ValueError(f"{path}: header says {dims} = {expected} bytes of data, found {len(data) - header}")
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(
        f"{directory / stem}.gz: Fashion-MNIST file not found. Install the data with "
        f"`apt-get install dataset-fashion-mnist` (it fills {FASHION_MNIST_DIR}), or point --data-dir "
        "at a folder holding train-images-idx3-ubyte[.gz] and the other three idx files"
    )


def load_fashion_mnist(data_dir: str | os.PathLike | None = None) -> Dataset:
    directory = Path(data_dir or FASHION_MNIST_DIR)
    splits = {}
    for split, prefix in (("train", "train"), ("val", "t10k")):
        images = _read_idx(_find_idx(directory, f"{prefix}-images-idx3-ubyte"), 2051, 3)
        labels = _read_idx(_find_idx(directory, f"{prefix}-labels-idx1-ubyte"), 2049, 1)
        if len(images) != len(labels):
            raise ValueError(f"{directory}: {prefix} has {len(images)} images but {len(labels)} labels")
        splits[split] = Split(images.unsqueeze(1).clone(), labels.long())  # (N, 28, 28) -> (N, 1, 28, 28)
    return Dataset("fashion-mnist", splits["train"], splits["val"], list(FASHION_MNIST_CLASSES),
                   preprocess=gray_preprocess((28, 28)))


def _decode(path: Path, channels: int, to_unit: dict, box: tuple[int, int, int, int] | None = None) -> Tensor:
    """One file as the uint8 (C, H, W) pixels the model's input is normalised from: ``preprocess_image``
    with mean 0 and std 1 gives the resized pixels / 255, back to the values an image file holds.
    ``box`` (top, left, height, width, in the file's pixels): that crop of the original, resized."""
    img = load_image(path, channels)
    if box is not None:
        top, left, h, w = box
        img = img.crop((left, top, left + w, top + h))
    return preprocess_image(img, to_unit).mul(255.0).round().to(torch.uint8)


def _check_header(path: Path) -> tuple[int, int]:
    """What a streamed split checks of each file up front, without decoding it: that Pillow can open it.
    Returns its (height, width)."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():  # a table (csv:) may name a file that is not there
        raise ImageError(f"{path}: no such image file")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: the file is empty (0 bytes)")
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except UnidentifiedImageError as e:
        raise ImageError(f"{path}: not an image Pillow can read") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: corrupt or truncated image ({e})") from e


class FileImages:
    """A folder split's images, decoded from their files when indexed: it stands in for ``Split.images``
    (an (N, C, H, W) uint8 tensor) where the decoded split would not fit in memory.

    ``images[idx]`` (a tensor of indices) decodes those files on a thread pool (Pillow releases the GIL
    while it decodes and resizes) into exactly the pixels the in-memory split holds; ``prefetch(idx)``
    starts that work early, so the next batch decodes while the model trains on this one.
    ``load(idx, boxes)`` decodes a random resized crop of each original instead (``sizes``: the files'
    (height, width), the space the boxes are drawn in), as timm crops the full-resolution photo.
    """

    dtype = torch.uint8
    ndim = 4
    MAX_PREFETCHED = 8  # batches decoded ahead and not yet asked for; the oldest are dropped beyond (per instance:
    # the trainer raises it to hold two steps of micro-batches under gradient accumulation)

    def __init__(self, paths: list[Path], channels: int, to_unit: dict, threads: int | None = None,
                 sizes: list[tuple[int, int]] | None = None):
        self.paths, self.channels, self.to_unit = list(paths), channels, to_unit
        self.sizes = torch.tensor(sizes, dtype=torch.float32).reshape(-1, 2) if sizes is not None else None
        self.threads = threads or min(4, os.cpu_count() or 1)
        h, w = to_unit["img_size"]
        self.shape = torch.Size((len(self.paths), channels, h, w))
        self._pool = None
        self._pending: dict[tuple, list] = {}  # (indices, boxes) -> the images' futures, oldest first
        self.max_prefetched = self.MAX_PREFETCHED

    def __len__(self) -> int:
        return len(self.paths)

    def _submit(self, i: int, box: tuple | None):
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="vitkit-decode")
        return self._pool.submit(_decode, self.paths[i], self.channels, self.to_unit, box)

    @staticmethod
    def _key(idx, boxes: Tensor | None) -> tuple:
        indices = tuple(torch.as_tensor(idx).reshape(-1).tolist())
        return indices, None if boxes is None else tuple(map(tuple, boxes.long().tolist()))

    def _futures(self, key: tuple) -> list:
        indices, boxes = key
        return [self._submit(i, None if boxes is None else boxes[j]) for j, i in enumerate(indices)]

    def prefetch(self, idx: Tensor, boxes: Tensor | None = None) -> None:
        key = self._key(idx, boxes)
        if key[0] and key not in self._pending:
            self._pending[key] = self._futures(key)
            while len(self._pending) > self.max_prefetched:
                self._pending.pop(next(iter(self._pending)))

    def load(self, idx: Tensor, boxes: Tensor | None = None) -> Tensor:
        """(B, C, H, W) uint8 of the files ``idx``, whole or (``boxes``, (B, 4)) cropped, resized."""
        key = self._key(idx, boxes)
        futures = self._pending.pop(key, None) or self._futures(key)
        if not futures:
            return torch.empty((0, *self.shape[1:]), dtype=torch.uint8)
        return torch.stack([f.result() for f in futures])  # re-raises a file's ImageError here

    def take(self, indices: list[int]) -> FileImages:
        """These files only, still decoded at each use (``images[tensor]`` would decode them)."""
        sizes = None if self.sizes is None else self.sizes[indices].tolist()
        return FileImages([self.paths[i] for i in indices], self.channels, self.to_unit, self.threads, sizes)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return self.take(list(range(len(self.paths)))[idx])
        if isinstance(idx, int):
            return _decode(self.paths[idx], self.channels, self.to_unit)
        return self.load(idx)


def prefetch(images, idx: Tensor, boxes: Tensor | None = None) -> None:
    """Start decoding ``images[idx]`` (or its ``boxes``) in the background where the images are files."""
    if isinstance(images, FileImages):
        images.prefetch(idx, boxes)


def image_files(directory: Path) -> list[Path]:
    """The image files under ``directory`` (any depth; by extension, IMAGE_EXTENSIONS), sorted. Symlinked
    folders are followed (Python 3.11's ``rglob`` skipped them), each real folder read once, so a link
    back up the tree (``loop -> ..``) ends there. Hidden folders and files are not read: a notebook's
    ``.ipynb_checkpoints`` holds copies of the images beside it, macOS's ``._NAME`` files are not images."""
    found, seen = [], set()
    for folder, subfolders, names in os.walk(directory, followlinks=True):
        here = os.stat(folder)
        seen.add((here.st_dev, here.st_ino))
        keep = []
        for name in sorted(subfolders):
            if name.startswith("."):
                continue
            try:
                st = os.stat(os.path.join(folder, name))
            except OSError:  # a dangling link
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                keep.append(name)
        subfolders[:] = keep  # os.walk descends into these only
        found += [Path(folder) / name for name in names
                  if Path(name).suffix.lower() in IMAGE_EXTENSIONS and not name.startswith(".")]
    return sorted(p for p in found if p.is_file())


def _class_files(root: Path, class_names: list[str]) -> list[tuple[Path, int]]:
    """(path, label) of every image under ``root/CLASS/`` (any depth), class by class, sorted."""
    files = []
    for label, name in enumerate(class_names):
        class_dir = root / name
        if class_dir.is_dir():  # a class may be absent from val/
            files += [(p, label) for p in image_files(class_dir)]
    return files


def hold_out(files: list[tuple[Path, int]], fraction: float) -> tuple[list, list]:
    """``files`` split into (train, val): ``fraction`` of each class (rounded; at least one of a class
    of two or more, never all of it) drawn for val by a fixed generator, so the same files give the
    same split in training, in ``vitkit eval`` and on every rank."""
    by_class: dict[int, list] = {}
    for item in files:
        by_class.setdefault(item[1], []).append(item)
    generator = torch.Generator().manual_seed(0)
    train, val = [], []
    for label in sorted(by_class):
        group = by_class[label]
        n_val = min(len(group) - 1, max(1, round(fraction * len(group))))
        chosen = set(torch.randperm(len(group), generator=generator)[:n_val].tolist())
        val += [item for i, item in enumerate(group) if i in chosen]
        train += [item for i, item in enumerate(group) if i not in chosen]
    return train, val


def _folder_split(files: list[tuple[Path, int]], where: str, preprocess: dict, channels: int,
                  skip_bad_images: bool, skipped: list[str], stream: bool) -> Split:
    """``files`` decoded (or, ``stream``, checked and left to ``FileImages``); ``where``: what holds
    them, for the message when none is readable."""
    to_unit = dict(preprocess, mean=[0.0] * channels, std=[1.0] * channels)
    images, labels, sizes = [], [], []
    for path, label in files:
        try:
            if stream:  # its header now, its pixels at each use
                sizes.append(_check_header(path))
                images.append(path)
            else:  # the whole image, once
                images.append(_decode(path, channels, to_unit))
        except ImageError as e:
            if not skip_bad_images:
                raise ImageError(f"{e}; pass --skip-bad-images to leave unreadable images out") from e
            skipped.append(str(e))
            continue
        labels.append(label)
    if not images:
        raise ValueError(f"{where}: no readable images")
    images = FileImages(images, channels, to_unit, sizes=sizes) if stream else torch.stack(images)  # (N, C, H, W)
    return Split(images, torch.tensor(labels, dtype=torch.long))


# `--folder-loading auto` streams a folder whose decoded images would take more than this share of the RAM
STREAM_ABOVE_RAM_FRACTION = 0.25
FOLDER_LOADING = ("auto", "memory", "stream")


def _check_file_options(loading: str, val_fraction: float) -> None:
    if loading not in FOLDER_LOADING:
        raise ValueError(f"--folder-loading: expected one of {FOLDER_LOADING}, got {loading!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"--val-fraction: expected a share in (0, 1), got {val_fraction}")


def _held_out_note(source: Path, files: dict[str, list], val_fraction: float, why: str) -> None:
    print(f"{source}: {why}: {len(files['val'])} of its {len(files['train']) + len(files['val'])} images "
          f"({val_fraction:.0%} of each class) held out for validation (--val-fraction)", file=sys.stderr, flush=True)


def _subfolders(directory: Path) -> list[str]:
    """The class folders of ``directory``, sorted: its subfolders but hidden ones (``.ipynb_checkpoints``,
    ``.git``), which hold no class."""
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def _check_classes(root: Path, class_names: list[str], files: list[tuple[Path, int]], training: bool) -> None:
    """Every class folder of ``root`` holds images (``files``: the (path, label) listed under them), and
    ``training`` needs two classes or more: a lone folder is most often a wrapper (``DIR/images/CLASS/*``),
    named in the message, as is an empty one."""
    counts = torch.bincount(torch.tensor([label for _, label in files], dtype=torch.long),
                            minlength=len(class_names))
    empty = [name for name, n in zip(class_names, counts.tolist()) if n == 0]
    if empty:
        raise ValueError(f"{root}: the class folder(s) {', '.join(str(root / name) for name in empty)} hold no image "
                         f"files ({', '.join(IMAGE_EXTENSIONS)}); add their images, or move the folder(s) out")
    if training and len(class_names) < 2:
        only = root / class_names[0]
        inner = _subfolders(only)
        hint = (f"; its images are in the subfolders {inner}: if those are the classes, pass --dataset folder:{only}"
                if inner else "")
        raise ValueError(f"{root}: one class folder, {class_names[0]!r}; training needs two or more "
                         f"({root}/CLASS/*.png|jpg|..., or {root}/train/CLASS/... and {root}/val/CLASS/...){hint}")


def load_folder(root: str | os.PathLike, img_size: tuple[int, int], channels: int,
                preprocess: dict, skip_bad_images: bool = False, with_train: bool = True,
                loading: str = "auto", val_fraction: float = 0.1) -> Dataset:
    """``root/train/CLASS/*`` and ``root/val/CLASS/*``, classes being train/'s subfolders, sorted; or,
    with neither train/ nor val/, ``root/CLASS/*``, each class's ``val_fraction`` held out (``hold_out``).
    ``with_train=False`` reads only val (evaluation), leaving the train split empty. ``loading``:
    ``memory`` decodes every image once, ``stream`` decodes each batch from its files (``FileImages``),
    ``auto`` streams when the decoded images would take over ``STREAM_ABOVE_RAM_FRACTION`` of the RAM."""
    _check_file_options(loading, val_fraction)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    has = {split: (root / split).is_dir() for split in ("train", "val")}
    if any(has.values()):
        for split, there in has.items():
            if not there:
                raise FileNotFoundError(f"{root / split}: missing; a folder dataset needs {root}/train/CLASS/... "
                                        f"and {root}/val/CLASS/... (or only class folders {root}/CLASS/...)")
        class_names = _subfolders(root / "train")
        if not class_names:
            raise ValueError(f"{root / 'train'}: no class subfolders")
        extra = sorted(set(_subfolders(root / "val")) - set(class_names))
        if extra:
            raise ValueError(f"{root / 'val'}: classes {extra} do not appear in {root / 'train'}")
        where = {"train": root / "train", "val": root / "val"}
        files = {split: _class_files(where[split], class_names) for split in where}
        _check_classes(root / "train", class_names, files["train"], with_train)  # val/ may lack a class
    else:
        class_names = _subfolders(root)
        if not class_names:
            raise ValueError(f"{root}: no class subfolders (expected {root}/CLASS/*.png|jpg|..., or "
                             f"{root}/train/CLASS/... and {root}/val/CLASS/...)")
        listed = _class_files(root, class_names)
        _check_classes(root, class_names, listed, with_train)
        files = dict(zip(("train", "val"), hold_out(listed, val_fraction)))
        where = {"train": root, "val": root}
        _held_out_note(root, files, val_fraction, "no train/ and val/ folders")
    where = {split: f"{where[split]} (expected {where[split]}/CLASS/*.png|jpg|...)" for split in where}
    return _load_files(f"folder:{root}", files, where, class_names, img_size, channels, preprocess,
                       skip_bad_images, with_train, loading)


# csv: the names a table's header may give the image's path and its class (the first present, in any case),
# and the values of its optional "split" column
CSV_PATH_COLUMNS = ("image", "path", "file", "filename")
CSV_LABEL_COLUMNS = ("label", "class", "target")
CSV_SPLITS = ("train", "val")


def load_csv(table: str | os.PathLike, img_size: tuple[int, int], channels: int, preprocess: dict,
             skip_bad_images: bool = False, with_train: bool = True, loading: str = "auto",
             val_fraction: float = 0.1) -> Dataset:
    """A CSV table, one image a row: its path (relative to the table's folder, or absolute), its class
    and, optionally, its split (a ``split`` column: train or val; without one, each class's
    ``val_fraction`` is held out, as in a folder of class folders). The classes are the train rows'
    labels, sorted (as numbers where every label is a whole number). Read as ``load_folder`` reads."""
    import csv

    _check_file_options(loading, val_fraction)
    table = Path(table)
    if not table.is_file():
        raise FileNotFoundError(f"{table}: no such file")
    with open(table, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: a spreadsheet's byte-order mark
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        columns = {name.strip().lower(): name for name in header}
        path_column, label_column = (next((columns[c] for c in names if c in columns), None)
                                     for names in (CSV_PATH_COLUMNS, CSV_LABEL_COLUMNS))
        if path_column is None or label_column is None:
            raise ValueError(f"{table}: expected a header naming an image column ({'|'.join(CSV_PATH_COLUMNS)}) and "
                             f"a class column ({'|'.join(CSV_LABEL_COLUMNS)}); found {header}")
        split_column = columns.get("split")
        rows = []
        for line, row in enumerate(reader, start=2):  # line 1 is the header
            path, label = ((row.get(c) or "").strip() for c in (path_column, label_column))
            split = (row.get(split_column) or "").strip().lower() if split_column else None
            if not path or not label:
                raise ValueError(f"{table}, line {line}: expected an image path and a class, got {path!r} and {label!r}")
            if split_column and split not in CSV_SPLITS:
                raise ValueError(f"{table}, line {line}: split {split!r}; expected one of {CSV_SPLITS}")
            rows.append((table.parent / path, label, split))
    labels = {label for _, label, split in rows if split != "val"}
    if not labels:
        raise ValueError(f"{table}: no training rows")
    class_names = sorted(labels, key=int) if all(label.isdigit() for label in labels) else sorted(labels)
    index = {name: i for i, name in enumerate(class_names)}
    if split_column:
        unknown = sorted({label for _, label, split in rows if label not in index})
        if unknown:
            raise ValueError(f"{table}: classes {unknown} of val rows appear in no train row")
        files = {name: [(path, index[label]) for path, label, split in rows if split == name] for name in CSV_SPLITS}
        if not files["val"]:
            raise ValueError(f"{table}: a split column, and no val rows")
    else:
        files = dict(zip(CSV_SPLITS, hold_out([(path, index[label]) for path, label, _ in rows], val_fraction)))
        _held_out_note(table, files, val_fraction, "no split column")
    if with_train and len(class_names) < 2:  # as for a folder of one class: nothing to tell apart
        raise ValueError(f"{table}: one class, {class_names[0]!r}, in its train rows; training needs two or more "
                         f"(column {label_column!r})")
    where = {name: f"{table} ({name} rows)" for name in CSV_SPLITS}
    return _load_files(f"csv:{table}", files, where, class_names, img_size, channels, preprocess,
                       skip_bad_images, with_train, loading)


# the --dataset kinds read from image files: their prefix -> their loader
FILE_DATASETS = {"folder:": load_folder, "csv:": load_csv}


def is_file_dataset(spec: str) -> bool:
    return spec.startswith(tuple(FILE_DATASETS))


def _load_files(name: str, files: dict[str, list[tuple[Path, int]]], where: dict[str, str], class_names: list[str],
                img_size: tuple[int, int], channels: int, preprocess: dict, skip_bad_images: bool,
                with_train: bool, loading: str) -> Dataset:
    """A Dataset of listed image files, ``files[split]`` (path, label) for "train" and "val": decoded
    once, or streamed (``loading``, as ``load_folder`` says); ``where[split]`` names their source."""
    preprocess = dict(preprocess, img_size=list(img_size))
    stream = loading == "stream"
    root = name.split(":", 1)[1]
    if loading == "auto":
        count = len(files["val"]) + (len(files["train"]) if with_train else 0)
        decoded = count * channels * img_size[0] * img_size[1]
        ram = device_memory("cpu")
        stream = ram is not None and decoded > STREAM_ABOVE_RAM_FRACTION * ram
        if stream:
            print(f"{root}: {count} images would take {decoded / 2**30:.1f} GiB decoded, over "
                  f"{STREAM_ABOVE_RAM_FRACTION:.0%} of the {ram / 2**30:.0f} GiB of RAM: decoding each batch from "
                  "its files (--folder-loading memory to decode them once)", file=sys.stderr, flush=True)
    skipped: list[str] = []
    if with_train:
        train = _folder_split(files["train"], where["train"], preprocess, channels, skip_bad_images, skipped, stream)
    else:
        train = Split(torch.zeros(0, channels, *img_size, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))
    val = _folder_split(files["val"], where["val"], preprocess, channels, skip_bad_images, skipped, stream)
    if skipped:
        print(f"skipped {len(skipped)} unreadable image(s) in {root}:", file=sys.stderr)
        for reason in skipped:
            print(f"  {reason}", file=sys.stderr)
    return Dataset(name, train, val, class_names, preprocess=preprocess, skipped=skipped)


def resize_split(split: Split, preprocess: dict) -> Split:
    """Every image resized as ``preprocess_image`` resizes a file of it (PIL, the same interpolation),
    still uint8: (N, C, H, W) -> (N, C, *img_size). Channels go one at a time, as PIL does in RGB."""
    from PIL import Image

    h, w = preprocess["img_size"]
    n, c = split.images.shape[:2]
    out = torch.empty((n, c, h, w), dtype=torch.uint8)
    for i in range(n):
        for ch in range(c):
            plane = Image.fromarray(split.images[i, ch].numpy())  # mode L: PIL rounds to uint8 itself
            out[i, ch] = torch.frombuffer(bytearray(resize_image(plane, preprocess).tobytes()),
                                          dtype=torch.uint8).view(h, w)
    return Split(out, split.labels)


def resize_dataset(data: Dataset, img_size: tuple[int, int], interpolation: str | None = None) -> Dataset:
    """``data`` with every image resized once to ``img_size`` (the whole image, as folder images are),
    with the interpolation of its ``preprocess`` unless given. The returned ``preprocess`` says so, so
    ``vitkit predict`` on a file of the original size feeds the model the same pixels as training did."""
    img_size = tuple(img_size)
    if data.image_shape[1:] == img_size:  # any interpolation to the same size is the identity
        return data
    preprocess = dict(data.preprocess, img_size=list(img_size), crop_pct=1.0, crop_mode="squash")
    if interpolation is not None:
        preprocess["interpolation"] = interpolation
    print(f"resizing {data.name} from {data.image_shape[1]}x{data.image_shape[2]} to {img_size[0]}x{img_size[1]} "
          f"({preprocess.get('interpolation', 'bicubic')})", file=sys.stderr, flush=True)
    return replace(data, train=resize_split(data.train, preprocess), val=resize_split(data.val, preprocess),
                   preprocess=preprocess)


def load_dataset(spec: str, data_dir: str | None = None, img_size: tuple[int, int] | None = None,
                 channels: int = 3, preprocess: dict | None = None, skip_bad_images: bool = False,
                 with_train: bool = True, folder_loading: str = "auto", val_fraction: float = 0.1) -> Dataset:
    """``digits``, ``fashion-mnist``, ``folder:PATH`` or ``csv:FILE``, at ``img_size``: images from files
    are always resized to it (224x224 when None), the built-in sets only when it is given, with the interpolation
    of ``preprocess`` (the model's) where it names one. ``channels`` and ``preprocess``'s crop and
    normalisation only matter for image files."""
    if spec in ("digits", "fashion-mnist", "fashion_mnist", "fmnist"):
        data = load_digits() if spec == "digits" else load_fashion_mnist(data_dir)
        if not with_train:
            data = replace(data, train=data.train.subset(0))
        if img_size is None:
            return data
        return resize_dataset(data, to_2tuple(img_size), (preprocess or {}).get("interpolation"))
    if is_file_dataset(spec):
        from .checkpoint import default_preprocess
        from .config import ViTConfig

        img_size = (224, 224) if img_size is None else to_2tuple(img_size)
        if preprocess is None:
            preprocess = default_preprocess(ViTConfig(img_size=img_size, patch_size=1, in_channels=channels,
                                                      emb_size=8, num_heads=1))
        kind, where = spec.split(":", 1)
        # Training sees the whole image resized, not a centre crop, and so does its validation; the
        # checkpoints it writes say so. Evaluation alone reads images as the model's own preprocess says,
        # as `vitkit predict` and the library the weights came from do.
        if with_train:
            preprocess = dict(preprocess, crop_pct=1.0, crop_mode="squash")
        return FILE_DATASETS[f"{kind}:"](where, img_size, channels, preprocess, skip_bad_images,
                                         with_train, folder_loading, val_fraction)
    raise ValueError(f"--dataset: unknown dataset {spec!r}; expected 'digits', 'fashion-mnist', 'folder:PATH' "
                     "or 'csv:FILE'")


def save_samples(data: Dataset, directory: str | os.PathLike, n: int = 6) -> list[Path]:
    """The first ``n`` test images as PNG files named ``INDEX-CLASS.png`` (for trying ``vitkit predict``)."""
    from PIL import Image

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(min(n, len(data.val))):
        img = data.val.images[i]  # (C, H, W) uint8
        arr = img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()  # -> (H, W) or (H, W, C)
        label = data.class_names[int(data.val.labels[i])].replace("/", "-")
        path = directory / f"{i}-{label}.png"
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths


# --- batches -----------------------------------------------------------------------------
def seed_of(*parts: int) -> int:
    """One seed from several integers ((seed, epoch), (seed, step, rank), ...): each folded in by a prime,
    so that a draw is a function of where it happens, never of the RNG's history."""
    folded = 0
    for part in parts:
        folded = folded * 1_000_003 + part
    return folded


def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The order of epoch ``epoch``: a function of (seed, epoch) only, never of the RNG's history,
    so a resumed run, and every rank of a distributed one, sees the same order."""
    g = torch.Generator().manual_seed(seed_of(seed, epoch))
    return torch.randperm(n, generator=g)


def global_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[Tensor]:
    """Index tensors of the epoch's full (global) batches; the ragged tail is dropped, as DeiT does,
    so every step of every rank has the same size."""
    perm = epoch_permutation(n, seed, epoch)
    steps = n // batch_size
    return [perm[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


# what random erasing fills a box with (BatchAugment's erasing_mode)
ERASING_MODES = ("pixel", "const")


class BatchAugment:
    """Training augmentation of a uint8 (B, C, H, W) batch -> normalised float batch (+ soft targets).

    Cheap geometric steps (random resized crop, translation, horizontal flip) are vectorised over the
    batch; RandAugment / TrivialAugment and random erasing are torchvision.transforms.v2
    applied per image (each image its own random op); MixUp / CutMix are v2's batch transforms.
    All randomness comes from torch's global CPU RNG, which a checkpoint saves and restores, also
    for a batch on a GPU: the trainer moves the uint8 batch first and augments it there (a quarter
    of the bytes of a float batch cross the bus, and the host's one core is not the GPU's feeder),
    with the same draws, so a run's augmentations do not depend on the device. (One exception: a
    streamed folder's crops, cut while its files decode, take their boxes from ``crop_boxes`` with a
    generator of their own; the trainer passes ``cropped=True`` for those batches.)
    """

    def __init__(self, preprocess: dict, num_classes: int, translate: int = 0, hflip: float = 0.0,
                 auto_augment: str = "none", ra_num_ops: int = 2, ra_magnitude: int = 9,
                 random_erasing: float = 0.0, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 mixup_prob: float = 1.0, crop_scale: float = 0.0, crop_ratio: float = 4 / 3,
                 erasing_mode: str = "pixel"):
        from torchvision.transforms import v2

        if not 0.0 <= crop_scale <= 1.0:
            raise ValueError(f"crop_scale: expected the smallest crop's share of the image, in [0, 1] (0: off), "
                             f"got {crop_scale}")
        if crop_ratio < 1.0:
            raise ValueError(f"crop_ratio: expected R >= 1 (aspect ratios from 1/R to R), got {crop_ratio}")
        self.preprocess = preprocess
        self.num_classes = num_classes
        self.crop_scale, self.crop_ratio = crop_scale, crop_ratio
        self.translate = translate
        self.hflip = hflip
        if auto_augment == "randaugment":
            self.auto = v2.RandAugment(num_ops=ra_num_ops, magnitude=ra_magnitude)
        elif auto_augment == "trivialaugment":
            self.auto = v2.TrivialAugmentWide()
        elif auto_augment == "none":
            self.auto = None
        else:
            raise ValueError(f"auto_augment: expected 'none', 'randaugment' or 'trivialaugment', got {auto_augment!r}")
        if erasing_mode not in ERASING_MODES:
            raise ValueError(f"erasing_mode: expected one of {ERASING_MODES}, got {erasing_mode!r}")
        # after normalising: "pixel" fills the box with standard normal noise (timm's default, its
        # mode="pixel"; torchvision's value="random"), "const" with 0, the dataset's mean colour
        fill = "random" if erasing_mode == "pixel" else 0
        self.erase = v2.RandomErasing(p=random_erasing, value=fill) if random_erasing > 0 else None
        mixes = []
        if mixup_alpha > 0:
            mixes.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            mixes.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        self.mix = v2.RandomChoice(mixes) if mixes else None
        self.mixup_prob = mixup_prob

    def shift(self, x: Tensor) -> Tensor:
        """Translate each image by its own (dy, dx) in [-t, t], filling with zeros: pad, then crop."""
        b, _, h, w = x.shape
        t = self.translate
        padded = torch.nn.functional.pad(x, (t, t, t, t))  # (B, C, H+2t, W+2t)
        oy = torch.randint(0, 2 * t + 1, (b,)).to(x.device)
        ox = torch.randint(0, 2 * t + 1, (b,)).to(x.device)
        rows = (oy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
        cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
        out = padded[torch.arange(b, device=x.device)[:, None, None], :, rows, cols]  # (B, H, W, C)
        return out.permute(0, 3, 1, 2).contiguous()  # (B, H, W, C) -> (B, C, H, W)

    # torchvision's RandomResizedCrop.get_params: this many tries, then the centre crop
    CROP_ATTEMPTS = 10

    def crop_boxes(self, b: int, h, w, generator: torch.Generator | None = None) -> Tensor:
        """(B, 4) boxes (top, left, height, width), drawn as torchvision's ``RandomResizedCrop`` (and
        timm's) draws one: an area share in [crop_scale, 1] and a log-uniform aspect ratio in
        [1/crop_ratio, crop_ratio], the first of ``CROP_ATTEMPTS`` tries that fits, else the centre crop
        of the image clamped to that ratio range. ``h``, ``w``: the images' size, one for all or (B,)
        each; all B images' tries at once, from ``generator`` (default: the CPU RNG)."""
        h = torch.as_tensor(h, dtype=torch.float64).expand(b)[:, None]  # (B, 1)
        w = torch.as_tensor(w, dtype=torch.float64).expand(b)[:, None]
        shares = torch.empty(b, self.CROP_ATTEMPTS, dtype=torch.float64)
        shares.copy_(torch.empty(b, self.CROP_ATTEMPTS).uniform_(self.crop_scale, 1.0, generator=generator))
        log_r = math.log(self.crop_ratio)
        aspect = torch.exp(torch.empty(b, self.CROP_ATTEMPTS).uniform_(-log_r, log_r, generator=generator)).double()
        cw = torch.sqrt(h * w * shares * aspect).round()
        ch = torch.sqrt(h * w * shares / aspect).round()
        fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
        first = fits.float().argmax(1, keepdim=True)  # the first try that fits (0 when none does: replaced below)
        ch, cw = ch.gather(1, first), cw.gather(1, first)  # (B, 1)
        top = (torch.rand(b, 1, generator=generator).double() * (h - ch + 1)).floor()
        left = (torch.rand(b, 1, generator=generator).double() * (w - cw + 1)).floor()
        # no try fits: the centre crop, as wide as the ratio range allows
        in_ratio = w / h
        fw = torch.where(in_ratio > self.crop_ratio, (h * self.crop_ratio).round(), w)
        fh = torch.where(in_ratio < 1 / self.crop_ratio, (w * self.crop_ratio).round(), h)
        centre = torch.cat([((h - fh) / 2).floor(), ((w - fw) / 2).floor(), fh, fw], dim=1)
        boxes = torch.cat([top, left, ch, cw], dim=1)
        return torch.where(fits.any(1, keepdim=True), boxes, centre).float()

    def resized_crop(self, x: Tensor, boxes: Tensor) -> Tensor:
        """Each image's box, resized (bilinear) back to the image's size: one ``grid_sample`` for the
        batch. Sample points are clamped to the box, so each image equals torchvision's
        ``resized_crop`` of its own box when it enlarges it (crops of an image already at the model's
        size always do). uint8 (B, C, H, W) -> uint8 (B, C, H, W)."""
        b, _, h, w = x.shape
        top, left, ch, cw = (boxes[:, k].to(x.device)[:, None] for k in range(4))  # each (B, 1)
        # pixel centres of the output, in the input's pixel coordinates (align_corners=False)
        ys = (top + (torch.arange(h, device=x.device) + 0.5) * ch / h - 0.5).clamp(min=top, max=top + ch - 1)
        xs = (left + (torch.arange(w, device=x.device) + 0.5) * cw / w - 0.5).clamp(min=left, max=left + cw - 1)
        grid = torch.stack(torch.broadcast_tensors((2 * xs[:, None, :] + 1) / w - 1,   # (B, 1, W) and
                                                   (2 * ys[:, :, None] + 1) / h - 1),  # (B, H, 1)
                           dim=-1)  # -> (B, H, W, 2), (x, y) as grid_sample takes them
        out = torch.nn.functional.grid_sample(x.float(), grid, mode="bilinear", align_corners=False)
        return out.round_().clamp_(0, 255).to(torch.uint8)

    def __call__(self, images: Tensor, labels: Tensor, cropped: bool = False) -> tuple[Tensor, Tensor]:
        """``cropped``: the batch is random resized crops already (of a streamed folder's originals)."""
        x = images
        if self.crop_scale > 0 and not cropped:
            x = self.resized_crop(x, self.crop_boxes(x.shape[0], x.shape[2], x.shape[3]))
        if self.translate > 0:
            x = self.shift(x)
        if self.hflip > 0:
            flip = (torch.rand(x.shape[0]) < self.hflip).to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if self.auto is not None:
            x = torch.stack([self.auto(img) for img in x])
        x = normalize(x, self.preprocess)
        if self.erase is not None:
            x = torch.stack([self.erase(img) for img in x])
        if self.mix is not None and torch.rand(()) < self.mixup_prob:
            x, targets = self.mix(x, labels)  # targets: (B, num_classes) mixed one-hot
        else:
            targets = labels
        return x, targets


__all__ = [
    "Split", "Dataset", "FileImages", "prefetch", "hold_out", "load_dataset", "resize_dataset", "load_digits", "load_fashion_mnist", "load_folder", "normalize",
    "gray_preprocess", "save_samples", "seed_of", "epoch_permutation", "global_batches", "BatchAugment",
]
