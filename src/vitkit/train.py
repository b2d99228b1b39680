"""``vitkit train``: the DeiT/timm recipe on real data, resumable, ready for torch.distributed.

Reading order: ``TrainConfig`` (every knob, typed; a config file and ``--key value`` flags
override its defaults), ``DistInfo`` (the one place rank and world size come from),
``RunDir`` (what a run writes, under a lock), then ``Trainer`` (the loop).

The recipe: AdamW (no weight decay on norms, biases, class token and positions), linear
warm-up then cosine decay per optimizer step, label smoothing, MixUp/CutMix, RandAugment /
TrivialAugment, random erasing, stochastic depth, gradient clipping and accumulation,
model EMA, bf16 autocast, a fixed seed. Every piece can be switched off from the config.

Reproducibility: the data order of an epoch is a function of (seed, epoch) only, and
``last/`` holds the optimizer, scheduler, EMA and every RNG state, so on CPU a run stopped
and resumed ends with the same weights as one that never stopped.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import io
import math
import os
import random
import shutil
import signal
import sys
import time
import types
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import (
    CONFIG_NAME,
    CheckpointError,
    _resolve,
    atomic_directory,
    atomic_file,
    default_preprocess,
    load_pretrained,
    preprocess_for_channels,
    read_config,
    save_pretrained,
)
from .config import ViTConfig, get_config
from .data import (
    ERASING_MODES,
    FOLDER_LOADING,
    BatchAugment,
    Dataset,
    FileImages,
    global_batches,
    is_file_dataset,
    load_dataset,
    normalize,
    prefetch,
    resize_dataset,
    seed_of,
)
from .distributed import (
    STRATEGIES,
    full_model,
    full_optimizer_state,
    is_elastic_restart,
    load_model_state,
    load_optimizer_state,
    no_sync,
    wrap_model,
)
from .fast import adamw, cpu_info, default_training_precision, set_num_threads, tune_cpu_allocator
from .fast import autocast as fast_autocast
from .model import NO_DECAY_NAMES, ViT

# --head-pool -> the (pool, final_norm) of the fine-tuned model
HEAD_POOLS = {"mean": ("mean", "pooled"), "cls": ("cls", "tokens"), "map": ("map", "tokens"),
              "cls_mean": ("cls_mean", "tokens")}
# a training (and evaluation) precision -> the vitkit.fast precision it runs as
TRAINING_AUTOCAST = {"fp32": "fp32", "bf16": "bf16-autocast", "fp16": "fp16-autocast"}
STATE_NAME = "training_state.pt"  # beside model.safetensors in last/; read with torch.load(weights_only=True)
CONFIG_FILE = "config.yaml"  # the resolved TrainConfig of a run
CURVES_EVERY_S = 30.0
METRIC_FIELDS = ("epoch", "step", "train_loss", "val_loss", "top1", "top5", "lr", "images_per_s")


# --- the configuration ---------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Every choice of a training run. The defaults are the digits recipe (configs/digits.yaml), but for
    ``precision`` and ``threads``, whose defaults suit any data set."""

    # data
    dataset: str = "digits"  # digits | fashion-mnist | folder:PATH | csv:FILE (image paths and classes)
    data_dir: str | None = None  # where fashion-mnist's idx files are (default: /usr/share/datasets/fashion-mnist)
    skip_bad_images: bool = False  # folder and csv datasets: leave unreadable images out (counted) instead of failing
    # folder and csv datasets: memory (decode every image once) | stream (decode each batch from the files, the
    # next one in the background) | auto (stream when the decoded images would fill a quarter of the RAM)
    folder_loading: str = "auto"
    loader_threads: int = 0  # a streamed folder's decoder threads (timm: --workers; 0: as many as cores, up to 4)
    val_fraction: float = 0.1  # a folder of class folders only (no train/, val/), or a csv without a split column: each class's share held out
    train_subset: int = 0  # train on N of the images only (0: all), drawn at random with --seed; quick runs and tests
    # model
    model: str = "vit_digits_gap"  # a variant name (`vitkit models`); num_classes comes from the data
    # fine-tuning: the checkpoint's architecture and weights replace --model's; its classifier is kept
    # only for the same classes, and its first convolution is adapted to the data's channels
    pretrained: str | None = None  # a vitkit checkpoint to fine-tune: a run's best/, or `vitkit convert` output
    img_size: int = 0  # input size in pixels (0: the model's own); images are resized to it, positions resampled
    layer_decay: float = 1.0  # layer-wise lr decay (BEiT, timm --layer-decay): block i of L at lr*decay^(L-i); 1: off
    # fine-tuning: keep the stem and the first N blocks as pretrained (all L blocks: the final norm too,
    # a linear probe of the head); their backward pass is skipped, so a step costs less
    freeze_blocks: int = 0
    # fine-tuning: the head's pooling, where it should differ from the checkpoint's. mean: the average of
    # the patch tokens with the final LayerNorm after it (timm's global_pool="avg" + fc_norm, MAE's and
    # BEiT's fine-tuning recipe); cls: the class token; map: attention pooling; cls_mean: the class token and
    # the patch tokens' mean side by side (DINOv2's linear probes). The final norm keeps its weights.
    head_pool: str = ""
    drop_path_rate: float = 0.0  # stochastic depth (the rate of the last block)
    drop_rate: float = 0.0  # dropout after the attention and MLP output projections
    # optimisation
    epochs: int = 200  # passes over the training set
    batch_size: int = 64  # the GLOBAL batch: summed over ranks and accumulation steps
    accum_steps: int = 1  # gradient accumulation: micro-batch = batch_size / (world_size * accum_steps)
    lr: float = 3e-3  # peak learning rate, reached at the end of warm-up
    min_lr: float = 1e-5  # where the cosine ends
    warmup_epochs: float = 5.0  # linear warm-up to --lr over these epochs (fractions allowed), then the cosine
    weight_decay: float = 0.05  # AdamW's; on weight matrices only (not biases, norms, tokens, positions)
    clip_grad: float = 1.0  # max global gradient norm (0: off)
    label_smoothing: float = 0.1  # of the cross-entropy's targets (0: off)
    # augmentation (applied a batch at a time, see vitkit.data.BatchAugment)
    # random resized crop (torchvision's RandomResizedCrop, timm's --scale/--ratio): a crop of S to 1
    # of the image's area, aspect ratio from 1/R to R, resized back; the usual first step on photos
    crop_scale: float = 0.0  # S, the smallest crop's share of the image (timm: 0.08; 0: off)
    crop_ratio: float = 4 / 3  # R: crops' aspect ratios from 1/R to R
    translate: int = 1  # random shift of up to N pixels each way
    hflip: float = 0.0  # probability of a horizontal flip (0 for digits: a flipped 2 is not a 2)
    auto_augment: str = "none"  # none | randaugment | trivialaugment
    ra_num_ops: int = 2  # randaugment: operations per image
    ra_magnitude: int = 9  # randaugment: their strength, 0 to 30 (torchvision's scale)
    random_erasing: float = 0.0  # probability
    random_erasing_mode: str = "pixel"  # what an erased box holds: pixel (normal noise, timm's default) | const (0)
    mixup_alpha: float = 0.0  # 0: off
    cutmix_alpha: float = 0.0  # 0: off
    mixup_prob: float = 1.0  # probability a batch is mixed (when mixup or cutmix is on)
    # knowledge distillation (DeiT, without its distillation token): a teacher checkpoint scores each
    # augmented batch, and the loss becomes (1 - alpha) * loss + alpha * the distillation loss
    teacher: str | None = None  # a vitkit checkpoint: a run's best/, or `vitkit convert` output
    distill_type: str = "hard"  # hard: cross-entropy to the teacher's top class (DeiT's best) | soft: KL at tau
    distill_alpha: float = 0.5  # the distillation loss's share of the loss
    distill_tau: float = 1.0  # the soft loss's temperature
    # model EMA (evaluated and saved as best/ when on)
    ema: bool = True  # keep an exponential moving average of the weights
    ema_decay: float = 0.998  # per step
    # the run
    # auto | fp32 | bf16 | fp16: bf16 or fp16 autocast over fp32 weights; fp16 with dynamic loss scaling
    # (timm's --amp; GPUs without bf16). auto: bf16 where the hardware runs it fast, fp16 on older GPUs
    precision: str = "auto"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0  # the initial weights, the data order and the augmentation
    name: str | None = None  # run name (default: DATASET-MODEL)
    out: str | None = None  # run folder (default: runs/NAME)
    overwrite: bool = False  # start afresh in a run folder that already holds a run
    stop_after_epoch: int = 0  # checkpoint and exit after this epoch, as an interruption would (0: off)
    eval_batch_size: int = 512  # images per evaluation batch (memory only: no effect on the scores)
    strategy: str = "ddp"  # under torchrun: ddp (replicate the model) | fsdp (shard it, FSDP2; needs --ema false)
    compile: bool = False  # torch.compile the training forward/backward (compiles once at the start)
    # torch.compile's mode; reduce-overhead replays each step's forward and backward as CUDA graphs,
    # which pays for small models on a GPU (kernel launches are their step); on a CPU it is the default
    compile_mode: str = "default"  # default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    grad_checkpointing: bool = False  # recompute block activations in backward: less memory, one more forward a step
    threads: int = 0  # torch intra-op threads (0: torch's default); 1 is fastest for tiny models on a busy CPU
    progress: str = "auto"  # auto (a bar when stdout is a terminal) | on | off
    # a read feeds the progress bar, the non-finite check and a stop signal under torchrun; each waits
    # for the device, so a GPU's queue empties at every one (32: DEVICE_LOG_EVERY)
    log_every: int = 0  # steps between host reads of the metrics; 0: every step on a CPU, every 32 on a GPU

    def __post_init__(self) -> None:
        choices = {
            "precision": ("auto", *TRAINING_AUTOCAST),
            "auto_augment": ("none", "randaugment", "trivialaugment"),
            "random_erasing_mode": ERASING_MODES,
            "progress": ("auto", "on", "off"),
            "folder_loading": FOLDER_LOADING,
            "strategy": STRATEGIES,
            "distill_type": DISTILL_TYPES,
            "head_pool": ("", *HEAD_POOLS),
            "compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"--{key.replace('_', '-')}: expected one of {allowed}, got {getattr(self, key)!r}")
        if self.img_size < 0:
            raise ValueError(f"--img-size: expected an int >= 0 (0: the model's own), got {self.img_size}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"--layer-decay: expected a value in (0, 1] (1: off), got {self.layer_decay}")
        if self.loader_threads < 0:
            raise ValueError(f"--loader-threads: expected an int >= 0 (0: automatic), got {self.loader_threads}")
        if self.freeze_blocks < 0:
            raise ValueError(f"--freeze-blocks: expected an int >= 0 (0: off), got {self.freeze_blocks}")
        if self.head_pool and not self.pretrained:
            raise ValueError(f"--head-pool {self.head_pool}: changes a pretrained checkpoint's head; a new model "
                             "takes its pooling from --model; pass --pretrained CKPT")
        if self.freeze_blocks and not self.pretrained:
            raise ValueError(f"--freeze-blocks {self.freeze_blocks}: keeps pretrained layers as they are; "
                             "pass --pretrained CKPT")
        if self.log_every < 0:
            raise ValueError(f"--log-every: expected an int >= 0 (0: automatic), got {self.log_every}")
        for key in ("epochs", "batch_size", "accum_steps", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"--{key.replace('_', '-')}: expected a positive int, got {getattr(self, key)}")
        for key in ("lr", "min_lr", "weight_decay", "clip_grad", "warmup_epochs", "mixup_alpha", "cutmix_alpha"):
            if getattr(self, key) < 0:
                raise ValueError(f"--{key.replace('_', '-')}: expected a number >= 0, got {getattr(self, key)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction: expected a share in (0, 1), got {self.val_fraction}")
        if self.crop_ratio < 1.0:
            raise ValueError(f"--crop-ratio: expected R >= 1 (aspect ratios from 1/R to R), got {self.crop_ratio}")
        if self.distill_tau <= 0:
            raise ValueError(f"--distill-tau: expected a temperature > 0, got {self.distill_tau}")
        for key in ("label_smoothing", "hflip", "random_erasing", "mixup_prob", "ema_decay", "crop_scale",
                    "distill_alpha"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"--{key.replace('_', '-')}: expected a value in [0, 1], got {getattr(self, key)}")
        if self.compile_mode != "default" and not self.compile:
            raise ValueError(f"--compile-mode {self.compile_mode}: only used when compiling; add --compile true")
        if self.strategy == "fsdp" and self.ema:
            raise ValueError("--strategy fsdp: the model EMA is not sharded; pass --ema false (or use --strategy ddp)")

    @property
    def run_name(self) -> str:
        if self.name:
            return self.name
        data = Path(self.dataset.split(":", 1)[1]).stem if is_file_dataset(self.dataset) else self.dataset
        model = self.model
        if self.pretrained:  # a run's best/ or last/ is named after its run
            path = Path(self.pretrained).resolve()
            model = path.parent.name if path.name in ("best", "last") else path.name
        return f"{data}-{model}"

    @property
    def run_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / self.run_name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def field_types() -> dict[str, tuple[type, bool]]:
    """name -> (base type, optional) for every TrainConfig field, from the annotations."""
    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for f in dataclasses.fields(TrainConfig):
        tp, optional = hints[f.name], False
        if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            tp, optional = args[0], True
        out[f.name] = (tp, optional)
    return out


def field_help() -> dict[str, str]:
    """name -> the help text of its flag: the comment beside the field in TrainConfig's source, or
    else the comment lines right above it."""
    import inspect
    import re

    helps, above = {}, []
    for line in inspect.getsource(TrainConfig).splitlines():
        if m := re.match(r"\s+#\s*(.*)", line):
            above.append(m.group(1))
            continue
        if m := re.match(r"\s+(\w+): [^=]+=[^#]*?(?:#\s*(.*))?$", line):
            helps[m.group(1)] = m.group(2) or " ".join(above)
        above = []
    return helps


def coerce(key: str, value, source: str):
    """Check/convert one config value against TrainConfig's type of ``key``; errors name ``source``."""
    types_ = field_types()
    if key not in types_:
        close = difflib.get_close_matches(key, types_, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"{source}: unknown training option {key!r}{hint}")
    tp, optional = types_[key]
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise ValueError(f"{source}: {key} cannot be empty")
    if isinstance(value, str) and tp is not str:
        text = value.strip().lower()
        if tp is bool:
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"{source}: {key} expects true or false, got {value!r}")
        try:
            return tp(float(text)) if tp is int and float(text).is_integer() else tp(text)
        except ValueError:
            raise ValueError(f"{source}: {key} expects {tp.__name__}, got {value!r}") from None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not tp:
        raise ValueError(f"{source}: {key} expects {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value


def read_config_file(path: str | os.PathLike) -> dict:
    """A YAML (or JSON) file of TrainConfig fields, each checked and typed."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of training options, got {type(data).__name__}")
    return {k.replace("-", "_"): coerce(k.replace("-", "_"), v, str(path)) for k, v in data.items()}


def resolve_config(file: str | None = None, overrides: dict | None = None) -> TrainConfig:
    """Defaults, then a config file, then flags: nanoGPT's configurator order, typed."""
    values = read_config_file(file) if file else {}
    values.update({k: coerce(k, v, f"--{k.replace('_', '-')}") for k, v in (overrides or {}).items()})
    return TrainConfig(**values)


# Options a resumed run may change: how long it runs and how it reports, never the math of a step.
RESUME_OVERRIDABLE = ("epochs", "stop_after_epoch", "progress", "eval_batch_size", "device", "data_dir", "threads",
                      "strategy", "grad_checkpointing", "compile", "compile_mode", "log_every", "folder_loading",
                      "loader_threads")
# --log-every 0 on a GPU: a read every 32 steps keeps the queue full; a stop signal under torchrun waits for it
DEVICE_LOG_EVERY = 32


# --- distributed: the one place rank and world size come from -------------------------------
@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def current(cls) -> DistInfo:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, t: Tensor) -> Tensor:
        """Sum ``t`` over ranks (in place); a no-op in a single process."""
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t


def init_distributed(device: str) -> DistInfo:
    """Join the process group torchrun describes (RANK/WORLD_SIZE in the environment), if any."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        store, rank, world_size = next(dist.rendezvous("env://"))
        # torchrun's agent keeps one store across `--max-restarts` attempts: without a prefix per
        # attempt, a restarted rank can read the address a dead peer published in the previous
        # attempt and fail to connect ("Connection refused"), depending on who starts first.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"vitkit/attempt_{attempt}/", store)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size)
    return DistInfo.current()


# --- hardware --------------------------------------------------------------------------------
def resolve_device(name: str, dist: DistInfo) -> torch.device:
    """``--device auto|cpu|cuda|cuda:N``: a torch.device this machine has, or a ValueError naming the flag."""
    name = str(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and dist.distributed:
        name = f"cuda:{dist.local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name}: expected auto, cpu, cuda or cuda:N ({e})") from None


def resolve_precision(precision: str, device: torch.device) -> str:
    """``--precision auto|fp32|bf16|fp16`` -> ``fp32|bf16|fp16``; in training, bf16 and fp16 always mean autocast."""
    return default_training_precision(device) if precision == "auto" else precision


def autocast(device: torch.device, precision: str):
    """The autocast context of a training precision (``fp32``, ``bf16`` or ``fp16``), via vitkit.fast."""
    return fast_autocast(TRAINING_AUTOCAST[precision], device)


# --- RNG state, storable with weights_only ----------------------------------------------------
def get_rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- the run folder ---------------------------------------------------------------------------
class RunLockedError(ValueError):
    """Another process is writing the same run folder."""


class NonFiniteLossError(ValueError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


def non_finite_advice(lr: float, clip_grad: float, precision: str) -> str:
    """What to try after a NaN or inf loss: only flags that would change something (a run already in
    fp32 is not told to use fp32); ``precision`` is the one the run trains in (``auto`` resolved)."""
    tries = [f"a lower --lr (now {lr:g})",
             "--clip-grad 1 (now off)" if clip_grad <= 0 else f"a lower --clip-grad (now {clip_grad:g})"]
    if precision != "fp32":
        tries.append(f"--precision fp32 (now {precision})")
    return "Try " + (" or ".join(tries) if len(tries) == 2 else ", ".join(tries[:-1]) + ", or " + tries[-1])


class Interrupted(Exception):
    """SIGINT/SIGTERM: the current step finished, ``last/`` was written."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class RunDir:
    """``runs/NAME``: config.yaml, metrics.csv, curves.png, last/ and best/, guarded by a lock.

    The lock is ``fcntl.flock`` on ``.lock`` (holding the owner's pid): the kernel drops
    it when the process dies, so a crashed run never leaves the folder locked.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.last = self.path / "last"
        self.best = self.path / "best"
        self._lock_file = None

    def lock(self) -> None:
        import fcntl

        self.path.mkdir(parents=True, exist_ok=True)
        f = open(self.path / ".lock", "a+")  # noqa: SIM115 (held open for the run's lifetime)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip() or "?"
            f.close()
            raise RunLockedError(
                f"{self.path}: in use by another vitkit train (pid {owner}); wait for it to finish, or pick "
                "another folder with --out/--name"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._lock_file = f

    def unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing releases the flock
            self._lock_file = None

    def clear(self) -> None:
        for name in ("last", "best"):
            shutil.rmtree(self.path / name, ignore_errors=True)
        for name in ("metrics.csv", "curves.png"):
            (self.path / name).unlink(missing_ok=True)

    def write_config(self, cfg: TrainConfig) -> None:
        import yaml

        with atomic_file(self.path / CONFIG_FILE, "w") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)

    def write_metrics(self, history: list[dict], curves: bool = True) -> None:
        with atomic_file(self.path / "metrics.csv", "w") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
            writer.writeheader()
            writer.writerows(history)
        if curves:
            self.write_curves(history)

    def write_curves(self, history: list[dict]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [r["epoch"] for r in history]
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
        ax_loss.plot(epochs, [r["train_loss"] for r in history], label="train")
        ax_loss.plot(epochs, [r["val_loss"] for r in history], label="val")
        ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
        ax_loss.legend()
        ax_acc.plot(epochs, [r["top1"] for r in history], label="top-1")
        ax_acc.plot(epochs, [r["top5"] for r in history], label="top-5")
        ax_acc.set(xlabel="epoch", ylabel="val accuracy (%)", title="accuracy")
        ax_acc.legend()
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        with atomic_file(self.path / "curves.png") as f:
            f.write(buf.getvalue())


def read_run_config(run: str | os.PathLike) -> TrainConfig:
    path = Path(run) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; is {run} a vitkit run folder (runs/NAME)?")
    values = read_config_file(path)
    # a run begun before the option existed erased with zeros (the mean colour, once normalised)
    values.setdefault("random_erasing_mode", "const")
    return TrainConfig(**values)


# --- progress ---------------------------------------------------------------------------------
class Progress:
    """One self-overwriting status line on a terminal; silent otherwise (logs get the epoch lines)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.width = 0

    def update(self, text: str) -> None:
        if self.enabled:
            sys.stdout.write("\r" + text.ljust(self.width))
            sys.stdout.flush()
            self.width = len(text)

    def close(self) -> None:
        if self.enabled and self.width:
            sys.stdout.write("\r" + " " * self.width + "\r")
            sys.stdout.flush()
            self.width = 0


# --- the optimizer and schedule ---------------------------------------------------------------
def layer_of(name: str, depth: int) -> int:
    """A parameter's layer for layer-wise lr decay, as timm numbers them (BEiT's scheme): 0 for the
    stem (patch embedding, class token, positions), i + 1 for block i and, in timm, for the final
    token norm after the last block; depth + 1 for the head (its norm after pooling, its classifier)."""
    if name.startswith("patch_embed."):
        return 0
    if name.startswith("encoder.blocks."):
        return int(name.split(".")[2]) + 1
    if name.startswith("encoder.norm."):
        return depth
    return depth + 1


def freeze_blocks(model: nn.Module, blocks: int) -> int:
    """Stop training the stem and the first ``blocks`` blocks (``layer_of`` <= blocks: with every block,
    the final norm too, leaving the classifier, a linear probe). Autograd then records nothing before
    the first trained layer. Returns the number of parameters that still train."""
    depth = len(model.encoder.blocks)
    if not 0 <= blocks <= depth:
        raise ValueError(f"--freeze-blocks {blocks}: the model has {depth} blocks")
    for name, p in model.named_parameters():
        # the final norm after pooling (head.norm: a mean-pooled model's, or the encoder's moved there by
        # --head-pool mean) is the last block's output norm here, as encoder.norm is; layer decay counts it
        # with the head, as timm does (layer_of)
        layer = depth if name.startswith("head.norm.") else layer_of(name, depth)
        if layer <= blocks:
            p.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """Decay matrices only: no decay on biases, norms, the class token, positions and BEiT's relative
    position tables (timm/DeiT/BEiT).

    With ``layer_decay`` < 1 (fine-tuning, BEiT), each layer's groups carry ``lr_scale`` =
    layer_decay ** (depth + 1 - layer): 1 for the head, the smallest for the stem.
    """
    depth = len(model.encoder.blocks) if layer_decay != 1.0 else 0
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim <= 1 or name.endswith(NO_DECAY_NAMES))
        layer = layer_of(name, depth) if layer_decay != 1.0 else 0
        group = groups.setdefault((layer, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0})
        if layer_decay != 1.0:
            group["lr_scale"] = layer_decay ** (depth + 1 - layer)
        group["params"].append(p)
    if layer_decay == 1.0:  # the two groups, [decay, no decay], even when one is empty: as before layer decay
        for key in ((0, True), (0, False)):
            groups.setdefault(key, {"params": [], "weight_decay": weight_decay if key[1] else 0.0})
    return [groups[key] for key in sorted(groups, key=lambda k: (k[0], not k[1]))]


DISTILL_TYPES = ("hard", "soft")


def distillation_loss(student: Tensor, teacher: Tensor, kind: str, tau: float = 1.0) -> Tensor:
    """DeiT's distillation term (Touvron et al. 2021, ``deit/losses.py``): ``hard``, cross-entropy to
    the teacher's top class; ``soft``, KL(teacher || student) of the softmaxes at temperature ``tau``,
    times tau², summed and divided by the number of logits, as DeiT's code does. (B, K) logits each."""
    if kind == "hard":
        return F.cross_entropy(student, teacher.argmax(-1))
    if kind != "soft":
        raise ValueError(f"distill_type: expected one of {DISTILL_TYPES}, got {kind!r}")
    return F.kl_div(F.log_softmax(student / tau, dim=-1), F.log_softmax(teacher / tau, dim=-1),
                    reduction="sum", log_target=True) * (tau * tau) / student.numel()


class Teacher:
    """A checkpoint that scores each training batch as its own training would have shown it: the
    student's normalised batch taken back to pixels, then normalised with the teacher's mean and
    std, resized to its input size and (first convolution adapted, as for fine-tuning) its channels."""

    def __init__(self, path: str, student_preprocess: dict, channels: int, device: torch.device, precision: str):
        self.model = load_pretrained(path, in_channels=channels, map_location=device).eval()
        self.model.requires_grad_(False)
        self.precision, self.size = precision, tuple(self.model.cfg.img_size)
        def stats(pre: dict, key: str) -> Tensor:
            return torch.tensor(pre[key], dtype=torch.float32, device=device)[:, None, None]  # (C, 1, 1)
        teacher = self.model.preprocess
        # x_teacher = (x * std_s + mean_s - mean_t) / std_t: one multiply-add per channel
        self.scale = stats(student_preprocess, "std") / stats(teacher, "std")
        self.shift = (stats(student_preprocess, "mean") - stats(teacher, "mean")) / stats(teacher, "std")
        self.interpolation = "bilinear" if teacher.get("interpolation") == "bilinear" else "bicubic"

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        """(B, C, H, W) as the student sees it -> the teacher's (B, K) float logits."""
        x = x * self.scale + self.shift
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode=self.interpolation, align_corners=False, antialias=True)
        with autocast(x.device, self.precision):
            return self.model(x).float()


def warmup_cosine(warmup_steps: int, total_steps: int, min_factor: float):
    """lr factor per optimizer step: linear from 1/warmup to 1, then cosine down to min_factor."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


class ModelEma(torch.optim.swa_utils.AveragedModel):
    """Exponential moving average of the weights, warmed up as TensorFlow's ExponentialMovingAverage with
    num_updates: decay = min(decay, (1+n)/(10+n)) at update n (timm's ModelEmaV3 keeps the decay constant by
    default), so 0.9995 is reached only after about 18,000 updates.

    One in-place ``_foreach_lerp_`` over all floating tensors per step (timm's ModelEmaV3 does the
    same); integer buffers are copied. The update count ``n`` is kept on the host: torch's
    ``AveragedModel.update_parameters`` moves its count to the device and the decay then has to be
    read back, a host sync every step that stalls a GPU's queue. The ``n_averaged`` buffer is still
    written (without a sync), so checkpoints keep AveragedModel's layout and resume as before.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__(model, use_buffers=True)
        self.decay = decay
        self._updates: int | None = None  # the host's copy of n_averaged; read from the buffer once
        self._pairs: tuple | None = None  # (model, floating (ours, theirs), integral (ours, theirs))

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._updates = None  # a loaded count is read again at the next update

    def _pair_up(self, model: nn.Module) -> tuple:
        """The EMA's tensors beside the model's, split into floating (averaged) and integral (copied).
        Built once per model and kept: walking both modules' tensors every step cost vit_digits_gap
        ~0.3 ms a step, 9x its lerp. Parameter objects are kept, not their data, so a ``model.to()``
        (which swaps a Parameter's data in place) is still seen."""
        ours = [*self.module.parameters(), *self.module.buffers()]
        theirs = [*model.parameters(), *model.buffers()]
        if len(ours) != len(theirs):
            raise ValueError(f"EMA update: the model has {len(theirs)} parameters and buffers, the EMA {len(ours)}")
        floating = [(o, t) for o, t in zip(ours, theirs) if o.is_floating_point()]
        integral = [(o, t) for o, t in zip(ours, theirs) if not o.is_floating_point()]
        return model, tuple(map(list, zip(*floating))) or ([], []), tuple(map(list, zip(*integral))) or ([], [])

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        if self._pairs is None or self._pairs[0] is not model:
            self._pairs = self._pair_up(model)
        _, (ours, theirs), (ours_int, theirs_int) = self._pairs
        if ours and ours[0].device != theirs[0].device:  # an EMA kept on another device than the model
            theirs = [t.to(o.device) for o, t in zip(ours, theirs)]
            theirs_int = [t.to(o.device) for o, t in zip(ours_int, theirs_int)]
        if self._updates is None:
            self._updates = int(self.n_averaged)
        n = self._updates
        if n == 0:  # the first update copies
            torch._foreach_copy_(ours + ours_int, theirs + theirs_int)
        else:
            d = min(self.decay, (1.0 + n) / (10.0 + n))
            torch._foreach_lerp_(ours, theirs, 1.0 - d)
            if ours_int:  # integer buffers (none in vitkit's models) are copied, not averaged
                torch._foreach_copy_(ours_int, theirs_int)
        self._updates = n + 1
        self.n_averaged.fill_(n + 1)  # a write, not a read: no sync even where the buffer is on a GPU


def make_ema(model: nn.Module, decay: float) -> ModelEma:
    """The model EMA the trainer keeps (``ModelEma``), evaluated and saved as ``best/`` when on."""
    return ModelEma(model, decay)


def make_augment(cfg: TrainConfig, data: Dataset) -> BatchAugment:
    """The training augmentation ``cfg`` asks for, for ``data``'s normalisation and classes."""
    return BatchAugment(
        data.preprocess, data.num_classes, translate=cfg.translate, hflip=cfg.hflip,
        auto_augment=cfg.auto_augment, ra_num_ops=cfg.ra_num_ops, ra_magnitude=cfg.ra_magnitude,
        random_erasing=cfg.random_erasing, erasing_mode=cfg.random_erasing_mode, mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha,
        mixup_prob=cfg.mixup_prob, crop_scale=cfg.crop_scale, crop_ratio=cfg.crop_ratio,
    )


# --- the loop ---------------------------------------------------------------------------------
@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict]
    best_top1: float


class Trainer:
    """One training run. ``Trainer(cfg).fit()``; ``Trainer(cfg, resume=True)`` continues ``last/``."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, data: Dataset | None = None):
        self.cfg = cfg
        set_num_threads(cfg.threads)  # 0: torch's default
        tune_cpu_allocator()  # no page faults step after step (process-wide)
        self.dist = init_distributed(cfg.device)
        self.device = resolve_device(cfg.device, self.dist)
        self.precision = resolve_precision(cfg.precision, self.device)
        if cfg.strategy == "fsdp" and self.precision == "fp16":  # after "auto" is resolved
            raise ValueError("--strategy fsdp: fp16's loss scaling would find overflows on some shards and not "
                             "others, and skip the step there only; use --precision bf16 (or --strategy ddp)")
        if self.precision == "fp16" and self.device.type == "cpu" and self.dist.is_main and not (
                {"avx512_fp16", "amx_fp16"} & set(cpu_info()[1])):
            print("note: --precision fp16 on a CPU without fp16 arithmetic runs several times slower than fp32; "
                  "it is meant for GPUs without bf16 (bf16, or fp32, is the faster choice here)",
                  file=sys.stderr, flush=True)
        self.run = RunDir(cfg.run_dir)
        self.resume = resume
        if self.dist.is_main:
            self.run.lock()
        try:
            self._setup(data)
        except BaseException:
            self.run.unlock()
            raise

    # --- setup ------------------------------------------------------------------------------
    def _shape_mismatch(self, want: tuple[int, ...], found: tuple[int, ...]) -> str:
        """Why the data's (C, H, W) images are not the model's, and what to pass instead."""
        cfg = self.cfg
        source = f"--pretrained {cfg.pretrained}" if cfg.pretrained else f"--model {cfg.model}"
        size = f" at --img-size {cfg.img_size}" if cfg.img_size else ""
        if want[0] != found[0]:
            fix = (f"pick a {found[0]}-channel model (`vitkit models`), or fine-tune --pretrained weights, whose "
                   "first convolution is adapted to the data's channels")
        else:
            fix = "pick a model made for this data (`vitkit models`), or pass --img-size N to resize the images"
        return (f"{source}{size} takes {'x'.join(map(str, want))} images but --dataset {cfg.dataset} has "
                f"{'x'.join(map(str, found))}; {fix}")

    def _setup(self, data: Dataset | None) -> None:
        cfg, dist = self.cfg, self.dist
        if cfg.batch_size % (dist.world_size * cfg.accum_steps):
            raise ValueError(f"--batch-size {cfg.batch_size}: must be divisible by world size {dist.world_size} "
                             f"x --accum-steps {cfg.accum_steps}")
        self.micro_batch = cfg.batch_size // (dist.world_size * cfg.accum_steps)
        if cfg.pretrained and not self.resume:
            source, run = Path(cfg.pretrained).resolve(), self.run.path.resolve()
            if source == run or run in source.parents:  # --overwrite would delete it; best/ is rewritten anyway
                raise ValueError(f"--pretrained {cfg.pretrained}: inside the run folder {self.run.path}, which this "
                                 "run writes over; copy the checkpoint elsewhere, or pick another --name/--out")
        overwrite = False
        if not self.resume and self.run.last.exists():
            if not cfg.overwrite:
                raise ValueError(f"{self.run.path}: already holds a run; continue it with "
                                 f"`vitkit train --resume {self.run.path}`, pick another --name/--out, "
                                 "or pass --overwrite to start afresh")
            overwrite = True  # the old run is cleared below, once the data, model and flags have been checked

        model_cfg, preprocess, pretrained = self._architecture()
        # a pretrained first convolution is adapted to the data's channels; a size must match
        def check_shape(image_shape: tuple[int, ...]) -> None:
            want = (image_shape[0] if pretrained else model_cfg.in_channels, *model_cfg.img_size)
            if image_shape != want:
                raise ValueError(self._shape_mismatch(want, image_shape))

        if data is None:
            builtin = not is_file_dataset(cfg.dataset)
            # folder images are resized once to the model's input and normalised as its checkpoints say;
            # the built-in sets are resized only at an --img-size (else a wrong model is an error below)
            data = load_dataset(
                cfg.dataset, cfg.data_dir, img_size=None if builtin else model_cfg.img_size,
                channels=model_cfg.in_channels, preprocess=preprocess, skip_bad_images=cfg.skip_bad_images,
                folder_loading=cfg.folder_loading, val_fraction=cfg.val_fraction,
            )
            if builtin and cfg.img_size:  # the channels first: no resize of a whole set for a model that can't take it
                check_shape((data.image_shape[0], *model_cfg.img_size))
                data = resize_dataset(data, model_cfg.img_size, (preprocess or {}).get("interpolation"))
            if builtin and cfg.pretrained:  # normalised as the checkpoint's own training data was, as folders are
                stats = preprocess_for_channels(preprocess, data.image_shape[0])
                data = dataclasses.replace(data, preprocess=dict(data.preprocess, mean=stats["mean"], std=stats["std"]))
        self.data = data
        if cfg.train_subset:
            # a copy: a Dataset the caller passed in stays whole for its next run; drawn with the run's
            # seed (the same images on every rank and on resume), not the first N, which a folder lists
            # class by class
            self.data = dataclasses.replace(self.data, train=self.data.train.sample(cfg.train_subset, cfg.seed))
        for split in (self.data.train, self.data.val):  # the splits the run reads, subset included
            if isinstance(split.images, FileImages):
                if cfg.loader_threads:
                    split.images.threads = cfg.loader_threads  # read when its pool starts, at the first batch
                # this step's micro-batches and the next step's are prefetched: room for both
                split.images.max_prefetched = max(FileImages.MAX_PREFETCHED, 2 * cfg.accum_steps)
        check_shape(self.data.image_shape)
        if len(self.data.train) < cfg.batch_size:
            raise ValueError(f"--batch-size {cfg.batch_size}: larger than the {len(self.data.train)} training images")
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        if pretrained:
            self.model = self._pretrained_model(model_cfg, pretrained)
        else:
            self.model = ViT(model_cfg.replace(num_classes=self.data.num_classes, drop_path_rate=cfg.drop_path_rate,
                                               drop_rate=cfg.drop_rate))
        self.model = self.model.to(self.device)
        if cfg.freeze_blocks:
            trained = freeze_blocks(self.model, cfg.freeze_blocks)
            if dist.is_main:
                total = sum(p.numel() for p in self.model.parameters())
                print(f"--freeze-blocks {cfg.freeze_blocks}: {trained:,} of {total:,} parameters train", flush=True)
        self.model.set_grad_checkpointing(cfg.grad_checkpointing)
        # DDP wraps the model; FSDP shards it in place (self.model's parameters become DTensor shards)
        self.ddp = wrap_model(self.model, cfg.strategy, dist, self.device)
        self.params = list(self.model.parameters())  # after wrapping: under FSDP, its DTensor shards
        # what a training step calls; self.model keeps the plain parameters for checkpoints and eval
        self.step_model = torch.compile(self.ddp, mode=cfg.compile_mode) if cfg.compile else self.ddp
        # CUDA graphs reuse their output memory: each forward starts a new step, so that graph trees
        # know the last step's outputs (logits, saved activations) are no longer needed
        self.cuda_graphs = (cfg.compile and cfg.compile_mode in ("reduce-overhead", "max-autotune")
                            and self.device.type == "cuda")
        # fused on CPU too: torch's CPU default loop took 1.5 ms against 0.4 of a 20 ms vit_digits_gap
        # step here (benchmarks/adamw.py); each group carries its own weight decay
        groups = param_groups(self.model, cfg.weight_decay, cfg.layer_decay)
        for group in groups:  # each group's peak lr; the schedule scales them all alike
            group["lr"] = cfg.lr * group.get("lr_scale", 1.0)
        self.optimizer = adamw(groups, lr=cfg.lr, betas=(0.9, 0.999))
        # fp16: the loss scaled up before backward so that small gradients do not flush to zero; a step
        # whose gradients overflow is skipped and the scale halved. Off (a pass-through) otherwise.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.steps_per_epoch = len(self.data.train) // cfg.batch_size
        total = cfg.epochs * self.steps_per_epoch
        warmup = max(1, round(cfg.warmup_epochs * self.steps_per_epoch)) if cfg.warmup_epochs > 0 else 0
        # the schedule's (warmup steps, min factor): a resume with another --epochs re-lays it (_load_last)
        self.schedule = (warmup, cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(warmup, total, self.schedule[1]))
        self.ema = make_ema(self.model, cfg.ema_decay) if cfg.ema else None
        self.augment = make_augment(cfg, self.data)
        self.teacher = self._teacher() if cfg.teacher else None
        # a model with DeiT's distillation token trains its two heads apart when there is a teacher
        self.model.head.distilled_training = self.teacher is not None and self.model.head.fc_dist is not None
        # Each rank augments with its own stream; seeded apart from the model's initialisation.
        torch.manual_seed(cfg.seed * 7919 + 1 + dist.rank)
        random.seed(cfg.seed + dist.rank)
        np.random.seed(cfg.seed + dist.rank)

        self.epoch = 0  # epochs completed
        self.step_in_epoch = 0  # optimizer steps done in the current (unfinished) epoch
        self.global_step = 0
        self.best_top1 = -1.0
        self.history: list[dict] = []
        self.running = torch.zeros(3, dtype=torch.float64)  # (loss sum, correct, images) this epoch, all ranks
        self.step_losses: list[float] = []  # mean loss of every optimizer step so far, all ranks
        # steps whose metrics are still on the device: (epoch, step, their all-reduced stats)
        self.unread: list[tuple[int, int, Tensor]] = []
        # on a CPU a read costs nothing (its ops have finished): then every step is read before
        # its update, so a non-finite loss never reaches the weights
        self.log_every = cfg.log_every or (1 if self.device.type == "cpu" else DEVICE_LOG_EVERY)
        if self.resume:
            self._load_last()
        elif dist.is_main:
            # --overwrite: the old run goes only now, when setup has succeeded; a typo'd --dataset
            # or a too-large --batch-size above leaves it whole
            if overwrite:
                self.run.clear()
            self.run.write_config(cfg)

    def _architecture(self) -> tuple[ViTConfig, dict, dict | None]:
        """The model's config and how folder images are normalised: --model's, or when fine-tuning the
        --pretrained checkpoint's (on --resume last/'s: the pretrained files are not read again); and
        the --pretrained checkpoint's config.json when this run starts from it, else None."""
        cfg = self.cfg
        size = {"img_size": cfg.img_size} if cfg.img_size else {}
        if cfg.pretrained is None:
            model_cfg = get_config(cfg.model, **size)
            # folder images normalised as timm trains the variant (its weights' own mean and std, timm's
            # pretrained_cfg); a resumed run as it began, which last/ records, whatever vitkit now says
            preprocess = default_preprocess(model_cfg, cfg.model)
            if self.resume and (self.run.last / CONFIG_NAME).is_file():
                saved = read_config(self.run.last).get("preprocess")
                preprocess = dict(saved, img_size=list(model_cfg.img_size)) if saved else preprocess
            return model_cfg, preprocess, None
        try:
            meta = read_config(_resolve(self.run.last if self.resume else cfg.pretrained)[1])
        except (CheckpointError, FileNotFoundError, ValueError) as e:
            if self.resume:  # last/'s own error names it
                raise
            # the error names the format where it can tell it; else the general hint
            hint = "" if "vitkit convert" in str(e) else (" (weights in another format: `vitkit convert SRC OUT "
                                                          "--from timm|hf|torchvision|jax` first)")
            raise type(e)(f"--pretrained {cfg.pretrained}: {e}{hint}") from e
        try:
            model_cfg = meta["config"].replace(**size)
        except ValueError as e:  # a size the checkpoint's patches do not divide: the flag's fault, not the file's
            raise ValueError(f"--img-size {cfg.img_size}: {e}") from e
        if cfg.head_pool and not self.resume:  # (last/ holds the new head already)
            pool, final_norm = HEAD_POOLS[cfg.head_pool]
            try:
                model_cfg = model_cfg.replace(pool=pool, final_norm=final_norm)
            except ValueError as e:  # pool="cls" without a class token
                raise ValueError(f"--head-pool {cfg.head_pool}: {e}") from e
        if cfg.model != TrainConfig.model and not self.resume and self.dist.is_main:  # set by a flag or a --config
            print(f"--model {cfg.model} is not used: the architecture comes from --pretrained {cfg.pretrained}",
                  file=sys.stderr, flush=True)
        preprocess = dict(meta.get("preprocess") or default_preprocess(model_cfg), img_size=list(model_cfg.img_size))
        return model_cfg, preprocess, None if self.resume else meta

    def _same_classes(self, meta: dict) -> bool:
        """Whether a checkpoint (``meta``: its config.json) was trained on the data's classes: as many,
        and, where it names them, the same names in the same order."""
        names = meta.get("class_names")
        return meta["config"].num_classes == self.data.num_classes and names in (None, self.data.class_names)

    def _reordered_classes(self, meta: dict) -> list[int] | None:
        """For a checkpoint that names the data's classes in another order: for each of the data's classes,
        its row in the checkpoint's classifier; else None."""
        names = meta.get("class_names")
        if not names or names == self.data.class_names or sorted(names) != sorted(self.data.class_names):
            return None
        return [names.index(name) for name in self.data.class_names]

    def _teacher(self) -> Teacher:
        cfg, data = self.cfg, self.data
        try:
            meta = read_config(_resolve(cfg.teacher)[1])
        except (CheckpointError, FileNotFoundError, ValueError) as e:
            raise type(e)(f"--teacher {cfg.teacher}: {e} (weights in another format: `vitkit convert` them "
                          "first)") from e
        names = meta.get("class_names")
        if not self._same_classes(meta):
            raise ValueError(f"--teacher {cfg.teacher}: scores {meta['config'].num_classes} classes"
                             f"{f' {names}' if names else ''}, but --dataset {cfg.dataset} has {data.num_classes}"
                             f" {data.class_names}; a teacher must be trained on the same classes, in the same order")
        teacher = Teacher(cfg.teacher, data.preprocess, data.image_shape[0], self.device, self.precision)
        if self.dist.is_main:
            print(f"distilling from {cfg.teacher} ({cfg.distill_type}, alpha {cfg.distill_alpha}"
                  f"{f', tau {cfg.distill_tau}' if cfg.distill_type == 'soft' else ''}; the teacher sees "
                  f"{teacher.size[0]}x{teacher.size[1]})", flush=True)
        return teacher

    def _pretrained_model(self, model_cfg: ViTConfig, meta: dict) -> ViT:
        """The --pretrained checkpoint (``meta``: its config.json) at the run's size and the data's
        channels, with its classifier if it was trained on these classes (the same number and, where
        it names them, the same names)."""
        cfg, data = self.cfg, self.data
        old = meta["config"]
        model = load_pretrained(cfg.pretrained, img_size=model_cfg.img_size, in_channels=data.image_shape[0],
                                drop_path_rate=cfg.drop_path_rate, drop_rate=cfg.drop_rate,
                                pool=model_cfg.pool, final_norm=model_cfg.final_norm)
        keep_head, rows = self._same_classes(meta), self._reordered_classes(meta)
        if rows is not None:  # the same classes named in another order: the classifier's rows follow the names
            with torch.no_grad():
                for fc in (model.head.fc, model.head.fc_dist):
                    if isinstance(fc, nn.Linear):
                        fc.weight.copy_(fc.weight[rows])
                        if fc.bias is not None:
                            fc.bias.copy_(fc.bias[rows])
        elif not keep_head:
            model.reset_classifier(data.num_classes)
        if self.dist.is_main:
            names = meta.get("class_names")
            why = (f" (its classes {names} are not the data's {data.class_names})" if names
                   and old.num_classes == data.num_classes else "")
            changes = ["its classifier kept, its rows reordered to the data's class names" if rows is not None
                       else "its classifier kept" if keep_head
                       else f"{old.num_classes} -> {data.num_classes} classes, a new classifier{why}"]
            if old.img_size != model_cfg.img_size:
                resampled = [what for what, held in (("positions", old.abs_pos),
                                                     ("relative position tables", old.rel_pos_bias)) if held]
                changes.append(f"{' and '.join(resampled) or 'image size'} "  # rotary: nothing to resample
                               f"{'resampled ' if resampled else ''}from {old.img_size[0]}x{old.img_size[1]} "
                               f"to {model_cfg.img_size[0]}x{model_cfg.img_size[1]}")
            if old.in_channels != data.image_shape[0]:
                changes.append(f"first convolution adapted from {old.in_channels} to {data.image_shape[0]} channels")
            if (old.pool, old.final_norm) != (model_cfg.pool, model_cfg.final_norm):
                changes.append(f"pooling {old.pool} -> {model_cfg.pool}, final norm {old.final_norm} -> "
                               f"{model_cfg.final_norm}")
            print(f"fine-tuning {cfg.pretrained}: {'; '.join(changes)}", flush=True)
        return model

    # --- checkpoints ---------------------------------------------------------------------------
    def _state(self) -> dict:
        return {
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "optimizer": full_optimizer_state(self.model, self.optimizer, self.dist.rank),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "grad_scaler": self.scaler.state_dict(),  # {} unless fp16
            "rng": get_rng_state(), "best_top1": self.best_top1, "history": self.history,
            "step_losses": torch.tensor(self.step_losses, dtype=torch.float64),
            "running": self.running.clone(),
        }

    def save_last(self) -> None:
        """model.safetensors + config.json + training_state.pt, replacing last/ in one atomic step."""
        model, state = full_model(self.model, self.dist.rank), self._state()  # collective under FSDP
        if not self.dist.is_main:
            return
        with atomic_directory(self.run.last) as tmp:
            # save_pretrained swaps its own files into tmp; the outer swap publishes all of them together.
            save_pretrained(model, tmp, preprocess=self.data.preprocess, class_names=self.data.class_names,
                            extra={"train": self.cfg.to_dict()})
            torch.save(state, tmp / STATE_NAME)

    def save_best(self, row: dict) -> None:
        model = full_model(self.eval_model, self.dist.rank)  # collective under FSDP
        if self.dist.is_main:
            save_pretrained(model, self.run.best, preprocess=self.data.preprocess,
                            class_names=self.data.class_names, extra={"train": self.cfg.to_dict(), "metrics": row})

    def _load_last(self) -> None:
        from .checkpoint import load_state_dict_file

        last = self.run.last
        path = last / STATE_NAME
        if not path.is_file():
            raise CheckpointError(f"{path}: no training state; {self.run.path} has no resumable last/ checkpoint")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 (any unreadable file is reported by path)
            raise CheckpointError(f"{path}: not a readable training state ({e})") from e
        load_model_state(self.model, load_state_dict_file(last / "model.safetensors"), self.dist.rank)
        load_optimizer_state(self.model, self.optimizer, state["optimizer"], self.dist.rank)
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("grad_scaler"):  # an fp16 run's loss scale (checkpoints before fp16 have none)
            self.scaler.load_state_dict(state["grad_scaler"])
        if self.ema is not None:
            if state["ema"] is None:
                raise CheckpointError(f"{path}: the run had no EMA; cannot resume with ema on")
            self.ema.load_state_dict(state["ema"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.best_top1 = state["global_step"], state["best_top1"]
        self.history, self.running = list(state["history"]), state["running"].clone()
        self.step_losses = state["step_losses"].tolist()
        self._check_epochs()
        # One process: its stream as saved (rank 0's). Under torchrun each rank reseeds at every step (train_step).
        if self.dist.rank == 0:
            set_rng_state(state["rng"])

    def _check_epochs(self) -> None:
        """A resume with another --epochs than config.yaml's (what last/ was trained towards): fewer than
        the epochs done, or begun, would leave config.yaml, last/ and metrics.csv disagreeing, and is
        refused; otherwise the cosine schedule is laid over the new length from the step reached, and the
        lr change is printed (extending a finished run restarts it part-way: 1e-5 can become 2e-3)."""
        cfg = self.cfg
        saved = read_run_config(self.run.path).epochs  # the new value is written only after setup
        if cfg.epochs == saved:
            return
        begun = self.epoch + (1 if self.step_in_epoch else 0)
        if cfg.epochs < begun:
            raise ValueError(f"--epochs {cfg.epochs}: {self.run.path} has already trained {self.epoch} epoch(s)"
                             f"{f' and part of epoch {begun}' if begun > self.epoch else ''} of its {saved}; pass "
                             f"--epochs {begun} or more, or start a new run")
        step, (warmup, min_factor) = self.scheduler.last_epoch, self.schedule
        was = warmup_cosine(warmup, saved * self.steps_per_epoch, min_factor)(step)
        now = warmup_cosine(warmup, cfg.epochs * self.steps_per_epoch, min_factor)(step)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * now  # the new schedule from this step on, not one step late
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        if self.dist.is_main:
            print(f"--epochs {cfg.epochs} (was {saved}): the learning-rate schedule now runs over {cfg.epochs} "
                  f"epochs; at step {step} (epoch {self.epoch}) the lr goes from {cfg.lr * was:.2e} to "
                  f"{cfg.lr * now:.2e}", file=sys.stderr, flush=True)

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    # --- one step -------------------------------------------------------------------------------
    def loss_fn(self, logits: Tensor, targets: Tensor) -> Tensor:
        # targets are class indices, or (B, num_classes) probabilities after MixUp/CutMix
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.cfg.label_smoothing)

    def _decode_crops(self, micro: Tensor) -> Tensor | None:
        """A streamed folder's random resized crops, (B, 4) boxes in each file's own pixels, or None:
        drawn from a generator of (seed, epoch, the micro-batch's first index), not the global RNG, so
        the next batch's boxes can be drawn early for its prefetch, and a resumed run draws the same."""
        images = self.data.train.images
        if self.cfg.crop_scale <= 0 or not isinstance(images, FileImages):
            return None
        seed = seed_of(self.cfg.seed, self.epoch, int(micro[0]), len(micro))
        sizes = images.sizes[micro]  # (B, 2): height, width
        return self.augment.crop_boxes(len(micro), sizes[:, 0], sizes[:, 1],
                                       generator=torch.Generator().manual_seed(seed % 2**63))

    def _micro_batches(self, idx: Tensor) -> list[Tensor]:
        """This rank's micro-batches of the global batch ``idx``: its share, cut into ``accum_steps``."""
        per_rank = self.cfg.batch_size // self.dist.world_size
        mine = idx[self.dist.rank * per_rank:(self.dist.rank + 1) * per_rank]
        return [mine[k * self.micro_batch:(k + 1) * self.micro_batch] for k in range(self.cfg.accum_steps)]

    def train_step(self, idx: Tensor, signum: int = 0) -> Tensor | None:
        """One optimizer step on the global batch ``idx``; this rank takes its contiguous slice.

        One all_reduce per step carries the metrics and every rank's reasons to stop: (loss sum,
        correct, images, non-finite flag, signal), summed over all ranks. They stay on the device
        until ``read_metrics``, every ``log_every`` steps (before this step's update); returns
        the rows read then, or None.
        """
        cfg, dist = self.cfg, self.dist
        if dist.distributed:
            # Each rank's augmentation and dropout draws, from (seed, step, rank): the checkpoint holds
            # rank 0's stream alone, so without this a resumed run's other ranks drew otherwise than the
            # uninterrupted run's (a 2-process run with shifted images ended 3.8e-3 away from it)
            torch.manual_seed(seed_of(cfg.seed, self.global_step, dist.rank) % 2**63)
        self.optimizer.zero_grad(set_to_none=True)
        # The metrics stay on the device until the step's one all_reduce: no host sync per
        # micro-batch, and a tensor that NCCL (which reduces CUDA tensors only) can reduce.
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.float64, device=self.device)
        for k, micro in enumerate(self._micro_batches(idx)):
            # uint8 images to the device, then augmented there (see BatchAugment)
            boxes = self._decode_crops(micro)
            images = self.data.train.images[micro] if boxes is None else self.data.train.images.load(micro, boxes)
            x, targets = self.augment(images.to(self.device, non_blocking=True),
                                      self.data.train.labels[micro].to(self.device, non_blocking=True),
                                      cropped=boxes is not None)
            sync = k == cfg.accum_steps - 1 or not dist.distributed
            with no_sync(self.ddp, sync):
                if self.cuda_graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                with autocast(self.device, self.precision):
                    logits = self.step_model(x)
                # DeiT (distilled_training, set with a teacher): the class head learns the labels, the
                # distillation head the teacher; any other model learns both with its one output
                two_heads = isinstance(logits, tuple)
                logits, student = logits if two_heads else (logits, logits)
                loss = self.loss_fn(logits, targets)
                if self.teacher is not None:
                    distill = distillation_loss(student.float(), self.teacher(x), cfg.distill_type, cfg.distill_tau)
                    loss = (1 - cfg.distill_alpha) * loss + cfg.distill_alpha * distill
                if two_heads:
                    logits = (logits + student) / 2  # what the model answers, for the accuracy
                self.scaler.scale(loss / cfg.accum_steps).backward()
            loss_sum += loss.detach().double() * len(micro)
            hard = targets.argmax(-1) if targets.ndim == 2 else targets
            correct += (logits.detach().argmax(-1) == hard).sum()
        # Every rank must agree to stop on a bad loss, or the others would hang in all_reduce.
        local = torch.stack([loss_sum, correct, torch.full_like(loss_sum, cfg.batch_size // dist.world_size),
                             (~loss_sum.isfinite()).double(), torch.full_like(loss_sum, float(signum))])
        self.unread.append((self.epoch + 1, self.global_step + 1, dist.all_reduce(local)))
        # every rank reads at the same steps, so all of them see a stop at the same step
        rows = self.read_metrics() if len(self.unread) >= self.log_every else None
        if cfg.clip_grad > 0:  # over a list made once: walking the modules per step was half its cost
            self.scaler.unscale_(self.optimizer)  # the norm of the true gradients (fp16; else nothing)
            nn.utils.clip_grad_norm_(self.params, cfg.clip_grad)
        self.scaler.step(self.optimizer)  # optimizer.step(), unless fp16 gradients overflowed
        self.scaler.update()
        if self.scaler.is_enabled():  # a skipped fp16 step still advances the schedule, as in timm
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step()` before", UserWarning)
                self.scheduler.step()
        else:
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.global_step += 1
        self.step_in_epoch += 1
        return rows

    def read_metrics(self) -> Tensor | None:
        """Bring the unread steps' metrics to the host, in one sync: (steps, 5) rows, or None if
        none were unread. Adds them to the epoch's running totals and the per-step losses; a
        non-finite loss stops the run here, before any checkpoint holds its weights."""
        if not self.unread:
            return None
        rows = torch.stack([stats for _, _, stats in self.unread]).cpu()  # (steps, 5); the host sync
        for (epoch, step, _), row in zip(self.unread, rows):
            if row[3] > 0:
                raise NonFiniteLossError(
                    f"loss became {float(row[0] / row[2]):.4g} at epoch {epoch}, step {step}; stopped. The last good "
                    f"checkpoint is kept in {self.run.last} "
                    f"({'epoch ' + str(self.epoch) if self.run.last.exists() else 'none was written yet'}). "
                    + non_finite_advice(self.cfg.lr, self.cfg.clip_grad, self.precision)
                )
            self.running += row[:3]
            self.step_losses.append(float(row[0] / row[2]))
        self.unread.clear()
        return rows

    # --- evaluation -------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        from .evaluate import evaluate

        result = evaluate(self.eval_model, self.data.val, self.data.preprocess, self.data.num_classes,
                          batch_size=self.cfg.eval_batch_size, device=self.device, precision=self.precision,
                          dist=self.dist)
        return result

    # --- the loop ---------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        cfg, dist = self.cfg, self.dist
        stop = {"signum": 0}

        def on_signal(signum, _frame):
            stop["signum"] = signum  # finish the step in flight, then checkpoint and leave

        handlers = {}
        if threading_is_main():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, on_signal)
        curves_at = time.monotonic()
        progress = Progress(dist.is_main and (cfg.progress == "on" or (cfg.progress == "auto" and sys.stdout.isatty())))
        streamed = isinstance(self.data.train.images, FileImages)
        if dist.is_main:
            model = cfg.model if cfg.pretrained is None else f"{cfg.pretrained} (fine-tuning)"
            print(f"training {model} on {self.data.name} ({len(self.data.train)} train / {len(self.data.val)} val) "
                  f"for {cfg.epochs} epochs: global batch {cfg.batch_size} on {dist.world_size} process(es), "
                  f"{self.device.type}, {self.precision}; run folder {self.run.path}", flush=True)
        try:
            while self.epoch < cfg.epochs:
                self.model.train()
                batches = global_batches(len(self.data.train), cfg.batch_size, cfg.seed, self.epoch)
                t0, done_images = time.perf_counter(), 0
                todo = batches[self.step_in_epoch:]
                for i, idx in enumerate(todo):
                    if streamed:  # decode the next batch while this one trains (the first: this one too)
                        for ahead in todo[i:i + 2] if i == 0 else todo[i + 1:i + 2]:
                            for micro in self._micro_batches(ahead):
                                prefetch(self.data.train.images, micro, self._decode_crops(micro))
                    rows = self.train_step(idx, stop["signum"])
                    done_images += len(idx)
                    # the epoch's last steps are read before its totals; all of them before a checkpoint
                    if self.unread and (i == len(todo) - 1 or (stop["signum"] and not dist.distributed)):
                        rows = self.read_metrics()
                    if rows is None:
                        continue
                    stats = rows[-1]
                    rate = done_images / max(time.perf_counter() - t0, 1e-9)
                    progress.update(
                        f"epoch {self.epoch + 1}/{cfg.epochs} step {self.step_in_epoch}/{len(batches)} "
                        f"loss {stats[0] / stats[2]:.4f} acc {100 * stats[1] / stats[2]:.1f}% "
                        f"lr {self.scheduler.get_last_lr()[0]:.2e} {rate:.0f} img/s"
                    )
                    # under torchrun a signal waits for the next read, so that every rank stops at the same step
                    if rows[:, 4].any() or (stop["signum"] and not dist.distributed):
                        progress.close()
                        self.save_last()
                        if dist.is_main and self.history:
                            self.run.write_curves(self.history)
                        signum = int(stop["signum"] or signal.SIGTERM)
                        raise Interrupted(signum, (
                            f"interrupted by {signal.Signals(signum).name} at epoch {self.epoch + 1}, step "
                            f"{self.global_step}; saved {self.run.last}. Resume with: vitkit train --resume "
                            f"{self.run.path}"
                        ))
                train_time = time.perf_counter() - t0
                progress.close()
                totals = self.running.clone()
                self.epoch += 1
                self.step_in_epoch = 0
                self.running.zero_()
                val = self.evaluate()
                row = {
                    "epoch": self.epoch, "step": self.global_step,
                    "train_loss": round(float(totals[0] / max(totals[2], 1)), 6),
                    "val_loss": round(val["loss"], 6), "top1": round(val["top1"], 4), "top5": round(val["top5"], 4),
                    "lr": float(f"{max(self.scheduler.get_last_lr()):.6g}"),  # the head's, under layer decay
                    "images_per_s": round(done_images / max(train_time, 1e-9), 1),
                }
                self.history.append(row)
                if row["top1"] > self.best_top1:
                    self.best_top1 = row["top1"]
                    self.save_best(row)
                self.save_last()
                if dist.is_main:
                    # A plot costs ~0.5 s: redraw it at most every CURVES_EVERY_S, and at the end.
                    final = self.epoch in (cfg.epochs, cfg.stop_after_epoch)
                    curves = final or time.monotonic() - curves_at > CURVES_EVERY_S
                    self.run.write_metrics(self.history, curves=curves)
                    curves_at = time.monotonic() if curves else curves_at
                    print(f"epoch {row['epoch']:3d}/{cfg.epochs}  train_loss {row['train_loss']:.4f}  "
                          f"val_loss {row['val_loss']:.4f}  top1 {row['top1']:6.2f}%  top5 {row['top5']:6.2f}%  "
                          f"lr {row['lr']:.2e}  {row['images_per_s']:.0f} img/s", flush=True)
                if cfg.stop_after_epoch and self.epoch == cfg.stop_after_epoch and self.epoch < cfg.epochs:
                    raise Interrupted(0, f"stopped after epoch {self.epoch} (--stop-after-epoch); saved "
                                         f"{self.run.last}. Resume with: vitkit train --resume {self.run.path}")
        finally:
            progress.close()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            self.run.unlock()
        if dist.is_main:
            print(f"done: best top-1 {self.best_top1:.2f}% -> {self.run.best}; last -> {self.run.last}", flush=True)
        return TrainResult(self.run.path, self.history, self.best_top1)


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def train(cfg: TrainConfig, data: Dataset | None = None) -> TrainResult:
    """Train a new run (Python API for ``vitkit train``)."""
    if is_elastic_restart() and (cfg.run_dir / "last" / STATE_NAME).is_file():
        # torchrun restarted the group after a worker died: continue from the last checkpoint
        return resume(cfg.run_dir, {k: getattr(cfg, k) for k in RESUME_OVERRIDABLE}, data=data)
    return Trainer(cfg, data=data).fit()


def resume(run: str | os.PathLike, overrides: dict | None = None, data: Dataset | None = None) -> TrainResult:
    """Continue ``run``/last/ with the run's own config; only RESUME_OVERRIDABLE options may change."""
    saved = read_run_config(run)
    changed = {k: v for k, v in (overrides or {}).items() if getattr(saved, k) != coerce(k, v, f"--{k}")}
    refused = sorted(set(changed) - set(RESUME_OVERRIDABLE))
    if refused:
        raise ValueError(f"--resume {run}: cannot change {refused} of a run in progress (only "
                         f"{list(RESUME_OVERRIDABLE)}); start a new run for a new recipe")
    values = saved.to_dict()
    values.update({k: coerce(k, v, f"--{k}") for k, v in changed.items()})
    values["out"] = str(run)
    cfg = TrainConfig(**values)
    trainer = Trainer(cfg, resume=True, data=data)
    if trainer.dist.is_main and changed:
        trainer.run.write_config(cfg)
    return trainer.fit()


__all__ = [
    "TrainConfig", "Trainer", "TrainResult", "DistInfo", "RunDir", "train", "resume", "resolve_config",
    "Teacher", "distillation_loss",
    "read_config_file", "coerce", "NonFiniteLossError", "RunLockedError", "Interrupted", "normalize",
]
