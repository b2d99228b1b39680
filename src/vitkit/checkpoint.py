"""vitkit's own checkpoint format and the safe, atomic file handling every writer uses.

A checkpoint is a directory: ``model.safetensors`` (the weights) and ``config.json``
(``{"format": "vitkit", "model": ViTConfig, "preprocess": {...}, "class_names": [...]}``).
Loading never executes code from a file: safetensors first, ``.pth``/``.bin`` only
through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import pickle
import re
import secrets
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ViTConfig,
    default_normalisation,
    to_2tuple,
    to_config_fields,
    variant_preprocess,
)
from .layers import adapt_input_channels, resample_patch_embed, resample_positions, resample_rel_pos_table

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT = "vitkit"


class CheckpointError(ValueError):
    """A file that is not a checkpoint vitkit can load; the message names the file."""


# --- atomic writes ---------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def _temp_path(final: Path) -> Path:
    """A fresh name beside ``final`` (same file system, so the final rename is atomic)."""
    return final.parent / f".{final.name}.tmp-{secrets.token_hex(6)}"


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces ``final`` in one step.

    Files are fsynced before the swap, so a crash (or SIGKILL, or a full disk) at any
    point leaves either the old ``final`` or the new one, never a mix. On error the
    temporary directory is removed and ``final`` is untouched.
    """
    final = Path(final)
    if final.exists() and not final.is_dir():
        # renameat2 would happily swap a directory with the user's file and then lose the file
        raise FileExistsError(f"{final}: exists and is not a directory; refusing to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(final)
    try:
        # Created inside the try (not with mkdtemp before it): a Ctrl-C that lands just after
        # the mkdir still removes it. Mode 0o777 minus the umask, as any mkdir (mkdtemp gives 0700).
        os.mkdir(tmp, 0o777)
        yield tmp
        _fsync_tree(tmp)
        if final.exists():
            if not _exchange(tmp, final):
                # No renameat2: move the old one aside first. A crash between the two
                # renames leaves the old copy at .NAME.old, which load_pretrained finds.
                old = final.parent / f".{final.name}.old"
                shutil.rmtree(old, ignore_errors=True)
                os.rename(final, old)
                try:
                    os.rename(tmp, final)
                except BaseException:
                    os.rename(old, final)  # the new one could not go in: put the previous one back
                    raise
                tmp = old
        else:
            os.rename(tmp, final)
            tmp = None
        _fsync_dir(final.parent)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def check_output_file(path: str | os.PathLike, flag: str) -> None:
    """A ValueError naming ``flag`` unless a file can be written at ``path``: not a directory, and its folder
    (or the nearest one that exists, under which the missing ones will be made) one this process can
    create a file in: tried with a temporary file, so a read-only mount or /proc is caught too."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{flag} {path}: is a directory; expected the name of a file to write")
    folder = target.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{flag} {path}: {folder} is not a directory; expected a file in a writable folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".vitkit-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write a file in {folder} ({e.strerror or e})") from None


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temporary file beside ``final``; on success fsync it and rename it into place. A ``final``
    that is a directory is refused before anything is written (the rename would fail only at the end)."""
    final = Path(final)
    if final.is_dir():
        raise IsADirectoryError(f"{final}: is a directory; expected the name of a file to write")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(final)
    try:
        # as in atomic_directory: created inside the try, with open()'s permissions (mkstemp gives 0600)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# --- reading state dicts safely ---------------------------------------------------------
def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read tensors from ``.safetensors``, or ``.pth``/``.pt``/``.bin`` through weights_only."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes)")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    if path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"{path}: refused to load: the pickle asks to run code or build objects that a weights "
                f"file does not need, and vitkit loads .pth/.bin only with torch.load(weights_only=True). "
                f"Detail: {_pickle_detail(e)}"
            ) from e
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable PyTorch file ({e})") from e
        for key in ("state_dict", "model", "model_state_dict", "module"):  # common wrappers
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
            raise CheckpointError(f"{path}: expected a dict of tensors (a state dict), got {type(obj).__name__}")
        return obj
    raise CheckpointError(f"{path}: unknown weights file type {path.suffix!r}; expected .safetensors, .pth, .pt or .bin")


def _pickle_detail(e: Exception) -> str:
    """The line of torch's refusal that names what the pickle asked for (e.g. ``GLOBAL posix.system``)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (named or lines or ["(no detail)"])[0]


def check_state_dict(expected: dict[str, torch.Size], got: dict[str, Tensor], source: str) -> None:
    """Raise CheckpointError listing missing, unexpected and wrongly shaped keys by name."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = sorted(
        f"{k}: expected {tuple(expected[k])}, found {tuple(got[k].shape)}"
        for k in set(expected) & set(got)
        if tuple(expected[k]) != tuple(got[k].shape)
    )
    if missing or unexpected or shapes:
        parts = [f"{source}: the weights do not fit the model"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
        if shapes:
            parts.append(f"wrongly shaped ({len(shapes)}): {shapes}")
        raise CheckpointError("\n  ".join(parts))


# --- the vitkit format ------------------------------------------------------------------
def named_preprocess(cfg: ViTConfig, variant: str | None) -> dict | None:
    """How the weights timm names ``variant`` for read an image (``config.VARIANT_PREPROCESS``; timm's
    pretrained_cfg), at ``cfg``'s size; None for a name of no known family, or a ``cfg`` whose channels
    are not the weights' three."""
    named = variant_preprocess(variant) if variant is not None and cfg.in_channels == 3 else None
    if named is None:
        return None
    return dict(img_size=list(cfg.img_size), mean=list(named["mean"]), std=list(named["std"]),
                interpolation=named["interpolation"], crop_pct=named["crop_pct"], crop_mode=named["crop_mode"])


def default_preprocess(cfg: ViTConfig, variant: str | None = None) -> dict:
    """How a model of ``cfg`` reads an image when no checkpoint says: as ``variant``'s weights do
    (``named_preprocess``), else with ImageNet's statistics (0.5 for a grey model), bicubic, the centre
    cropped 0.875 (grey: the whole image resized)."""
    named = named_preprocess(cfg, variant)
    if named is not None:
        return named
    gray = cfg.in_channels == 1
    return dict(
        img_size=list(cfg.img_size),
        mean=[0.5] if gray else list(IMAGENET_MEAN),
        std=[0.5] if gray else list(IMAGENET_STD),
        interpolation="bicubic",
        crop_pct=1.0 if gray else 0.875,
        crop_mode="squash" if gray else "center",
    )


def preprocess_for_channels(preprocess: dict, channels: int) -> dict:
    """``preprocess`` for an input of ``channels`` channels: a checkpoint's mean and std as they are
    when the counts match, else one mean and std, the channels' average, for each channel (the
    normalisation that goes with ``layers.adapt_input_channels``). A checkpoint that names no mean or std
    gets the ones ``images.preprocess_image`` would use (ImageNet's for three channels, else 0.5)."""
    preprocess = {**default_normalisation(channels), **preprocess}
    if all(len(preprocess[k]) == channels for k in ("mean", "std")):
        return preprocess
    return dict(preprocess, **{k: [sum(preprocess[k]) / len(preprocess[k])] * channels for k in ("mean", "std")})


def save_pretrained(
    model: nn.Module,
    directory: str | os.PathLike,
    preprocess: dict | None = None,
    class_names: list[str] | None = None,
    extra: dict | None = None,
) -> Path:
    """Write ``model.safetensors`` and ``config.json`` to ``directory`` atomically."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model saves its original
    cfg: ViTConfig = model.cfg
    meta = {
        "format": FORMAT,
        "model": cfg.to_dict(),
        "preprocess": preprocess or getattr(model, "preprocess", None) or default_preprocess(cfg),
        "class_names": class_names if class_names is not None else getattr(model, "class_names", None),
    }
    if extra:
        meta.update(extra)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_directory(directory) as tmp:
        try:
            save_file(state, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        except SafetensorError as e:
            # safetensors reports a full disk as "... No space left on device (os error 28)", naming no file
            code = re.search(r"os error (\d+)", str(e))
            raise OSError(int(code.group(1)) if code else errno.EIO, f"{directory}: could not save the weights ({e})") from e
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(directory)


def read_json(path: Path):
    """Parse a JSON file; an unreadable one is a CheckpointError naming it."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def read_config(directory: str | os.PathLike) -> dict:
    """The parsed ``config.json`` of a checkpoint directory, checked for its required fields."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: no config.json; is {directory} a vitkit checkpoint directory?")
    meta = read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("model"), dict):
        hint = ""
        if isinstance(meta, dict) and ("model_type" in meta or "architecture" in meta):  # another library's: say how
            fmt, what = (("hf", f"a Hugging Face model (model_type {meta['model_type']!r})") if "model_type" in meta
                         else ("timm", f"a timm model (architecture {meta['architecture']!r})"))
            hint = f"; it looks like {what}: convert it first, `vitkit convert {directory} OUT --from {fmt}`"
        raise CheckpointError(f"{path}: expected a vitkit config with \"format\": \"vitkit\" and a \"model\" "
                              f"object{hint}")
    try:
        meta["config"] = cfg = ViTConfig.from_dict(meta["model"], source=str(path))
        if meta.get("preprocess") is not None:
            from .images import check_preprocess  # images imports this module

            check_preprocess(meta["preprocess"], cfg.in_channels, str(path))
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    names = meta.get("class_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise CheckpointError(f"{path}: class_names: expected a list of strings or null, got {names!r}")
    if names is not None and len(names) != cfg.num_classes:
        raise CheckpointError(f"{path}: {len(names)} class_names for a model with num_classes={cfg.num_classes}")
    return meta


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A training run folder (runs/NAME) means its best/ checkpoint (else last/); anything else is taken as given."""
    path = Path(path)
    is_checkpoint = (path / CONFIG_NAME).is_file() or (path / WEIGHTS_NAME).exists()
    if path.is_dir() and not is_checkpoint and any((path / n).is_dir() for n in ("best", "last")):
        for name in ("best", "last"):
            if (path / name / CONFIG_NAME).is_file():
                return path / name
        raise FileNotFoundError(f"{path}: a run folder without a best/ or last/ checkpoint yet")
    return path


def _resolve(path: str | os.PathLike) -> tuple[Path, Path]:
    """(weights file, directory) for a checkpoint directory, a run folder or a .safetensors file."""
    path = resolve_checkpoint(path)
    backup = path.parent / f".{path.name}.old"
    if not path.exists() and (backup / WEIGHTS_NAME).is_file():
        # atomic_directory's fallback was interrupted between its two renames: the previous save is here
        warnings.warn(f"{path}: missing; loading {backup}, left by an interrupted save", stacklevel=3)
        return backup / WEIGHTS_NAME, backup
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.exists():
            backup = path.parent / f".{path.name}.old"  # see atomic_directory's fallback
            if (backup / WEIGHTS_NAME).exists():
                return backup / WEIGHTS_NAME, backup
        return weights, path
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CheckpointError(f"{path}: no such weights file")
        return path, path.parent
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory or file")
    raise CheckpointError(f"{path}: expected a vitkit checkpoint directory or its model.safetensors")


def load_pretrained(
    path: str | os.PathLike,
    img_size: int | tuple[int, int] | None = None,
    num_classes: int | None = None,
    map_location: str | torch.device = "cpu",
    **overrides,
) -> nn.Module:
    """Load a vitkit checkpoint, optionally at another image size or with a new classifier.

    ``img_size`` resamples the position table (bicubic, antialiased, class token apart);
    a different ``num_classes`` re-initialises the classifier with a warning; another
    ``in_channels`` adapts the first convolution as timm does (``layers.adapt_input_channels``).
    Other overrides (dropouts, ``dynamic_img_size``...) change the config before the weights load; timm's
    names for them are read too (``config.TIMM_NAMES``: ``in_chans``, ``global_pool``...).
    """
    from .model import ViT

    weights, directory = _resolve(path)
    meta = read_config(directory)
    cfg: ViTConfig = meta["config"]
    overrides = to_config_fields(overrides, cfg)
    state = load_state_dict_file(weights)
    model = build_with_state(cfg, state, str(weights), img_size=img_size, num_classes=num_classes, **overrides)
    model.preprocess = meta.get("preprocess") or default_preprocess(cfg)
    model.class_names = meta.get("class_names")
    if num_classes is not None and num_classes != cfg.num_classes:
        model.class_names = None
    if img_size is not None:
        model.preprocess = dict(model.preprocess, img_size=list(to_2tuple(img_size)))
    model.preprocess = preprocess_for_channels(model.preprocess, model.cfg.in_channels)
    assert isinstance(model, ViT)
    return model.to(map_location)


# the final LayerNorm's two places: on every token (final_norm="tokens") or on the pooled features ("pooled")
FINAL_NORM_KEYS = {"tokens": "encoder.norm", "pooled": "head.norm"}


def _repooled(state: dict[str, Tensor], new_cfg: ViTConfig, fresh: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """``state`` for another pooling or final norm (fine-tuning with timm's global_pool="avg" + fc_norm,
    say), ``fresh`` the new model's own state: the final LayerNorm moves to its new place with its
    weights; a part the old model lacks (attention pooling), or holds in another shape (the classifier
    of cls_mean's wider features), keeps its fresh initialisation, with a warning; one the new model
    lacks is dropped."""
    reshaped = {k.rpartition(".")[0] for k, v in state.items() if k in fresh and v.shape != fresh[k].shape}
    state = {k: v for k, v in state.items() if k.rpartition(".")[0] not in reshaped}  # whole layers afresh
    old_norm = next((place for place in FINAL_NORM_KEYS.values() if f"{place}.weight" in state), None)
    new_norm = FINAL_NORM_KEYS.get(new_cfg.final_norm)
    if old_norm and new_norm and old_norm != new_norm:
        for part in ("weight", "bias"):
            state[f"{new_norm}.{part}"] = state.pop(f"{old_norm}.{part}")
    missing = sorted(k for k in fresh if k not in state)
    if missing:
        warnings.warn(f"{source}: pool={new_cfg.pool!r}, final_norm={new_cfg.final_norm!r} adds parts the checkpoint "
                      f"lacks or holds in another shape, initialised afresh: {missing}", stacklevel=4)
    return {k: state[k] if k in state else fresh[k] for k in fresh}


def build_with_state(
    cfg: ViTConfig,
    state: dict[str, Tensor],
    source: str,
    img_size: int | tuple[int, int] | None = None,
    num_classes: int | None = None,
    **overrides,
) -> nn.Module:
    """A ViT of ``cfg`` holding ``state`` (vitkit keys), adapted to a new size or head."""
    from .model import ViT, first_conv_weight

    # Check the weights against a model on the meta device (no memory) before building the real one:
    # a config.json claiming a huge model must not allocate it. Depth first, as meta still costs time per block.
    blocks = {k.split(".")[2] for k in state if k.startswith("encoder.blocks.") and k.count(".") >= 3}
    if len(blocks) != cfg.depth:
        raise CheckpointError(f"{source}: the config says depth {cfg.depth}, the weights hold {len(blocks)} blocks")
    with torch.device("meta"):
        expected = {k: v.shape for k, v in ViT(cfg).state_dict().items()}
    check_state_dict(expected, state, source)
    model = ViT(cfg)
    model.load_state_dict(state)
    new_fields = dict(overrides)
    if img_size is not None and to_2tuple(img_size) != cfg.img_size:
        new_fields["img_size"] = to_2tuple(img_size)
    if not new_fields and (num_classes is None or num_classes == cfg.num_classes):
        return model
    new_cfg = cfg.replace(**new_fields)
    state = dict(state)
    if new_cfg.grid_size != cfg.grid_size:
        if cfg.abs_pos:
            state["patch_embed.positions"] = resample_positions(
                state["patch_embed.positions"], new_cfg.grid_size, cfg.grid_size, cfg.num_prefix_tokens
            )
        for key in [k for k in state if k.endswith(".attn.rel_pos_bias_table")]:  # BEiT's, one a block
            state[key] = resample_rel_pos_table(state[key], new_cfg.grid_size, cfg.grid_size)
    if new_cfg.patch_size != cfg.patch_size:
        if cfg.stem != "patch":
            raise ValueError(f"patch_size: a {cfg.stem!r} stem's convolutions cannot be resampled to another patch "
                             f"size (from {cfg.patch_size} to {new_cfg.patch_size}); only the plain patch projection can")
        key = "patch_embed.projection.weight"
        state[key] = resample_patch_embed(state[key], (new_cfg.patch_size, new_cfg.patch_size))
    if new_cfg.in_channels != cfg.in_channels:  # the stem's first convolution: the first 4-d weight
        first_conv = first_conv_weight(expected)
        state[first_conv] = adapt_input_channels(state[first_conv], new_cfg.in_channels)
    model = ViT(new_cfg)
    if (new_cfg.pool, new_cfg.final_norm) != (cfg.pool, cfg.final_norm):
        state = _repooled(state, new_cfg, model.state_dict(), source)
    model.load_state_dict(state)
    if num_classes is not None and num_classes != cfg.num_classes:
        warnings.warn(
            f"{source}: the checkpoint has {cfg.num_classes} classes, {num_classes} were asked for; "
            + ("the classifier is removed (features only)" if num_classes == 0
               else "the classifier is re-initialised for them and must be trained"),
            stacklevel=3,
        )
        model.reset_classifier(num_classes)
    return model


__all__ = [
    "save_pretrained",
    "load_pretrained",
    "load_state_dict_file",
    "check_state_dict",
    "atomic_directory",
    "atomic_file",
    "read_config",
    "read_json",
    "resolve_checkpoint",
    "build_with_state",
    "CheckpointError",
]
