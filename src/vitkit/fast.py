"""The fast path: bf16, ``torch.compile`` and weight prepacking, for inference and training.

What is on by default, and why:

* Fused attention (``F.scaled_dot_product_attention``) is the model's default (``fused=True``):
  flash kernels on CPU and GPU, never materialising the (B, h, N, N) attention matrix. One
  exception, automatic: bf16 training on CPU takes the math path, because torch's CPU flash-attention
  backward is slower than batched matmuls (``layers.lean_training``). There, for ViT-B-sized blocks,
  attention and the Linear layers run as vitkit's own lean ops, which keep less between the forward
  and backward passes than autograd would: ViT-B/16's training step is faster than timm's and
  holds less memory (README, "Performance").
* ``precision="bf16"`` where the hardware has bf16 arithmetic (CPUs with AVX512-BF16 or AMX,
  NVIDIA GPUs from Ampere on): half the memory traffic, and the bf16 GEMMs run at about twice
  the fp32 rate. Where bf16 is only emulated it is *slower*, so ``default_precision`` falls back
  to fp32 there.
* ``optimize_for_inference`` compiles with Inductor's freezing: weights become constants, the CPU
  GEMMs get oneDNN-prepacked weights with the bias (and GELU) fused into the same kernel, and
  memory is planned once for the whole graph. Measured on a 2-core AVX512-BF16 EPYC for
  ViT-B/16 (batch 8): bf16 eager runs at 91-93% of the bf16 matmul rate (its Linear layers go
  through the same oneDNN primitive, ``layers._cpu_linear``), and frozen compiled bf16 ran 8%
  faster than that; in fp32 the frozen graph was 8% *slower* than eager (README, "Performance").
* ``tune_cpu_allocator``, called by the CLI, the trainer and the benchmark: glibc keeps freed
  tensors for the next step instead of returning their pages to the OS and faulting them in again.

What is not default, and why:

* Compilation costs tens of seconds to minutes on a laptop CPU; it pays off for a served model
  or a long training run, not for a one-off ``vitkit predict``.
* Pure bf16 training (``model.to(torch.bfloat16)``) loses precision in the weight update; train
  with ``precision="bf16-autocast"`` (fp32 master weights, bf16 matmuls) instead.
* ``precision="int8"`` (CPU inference only): dynamic int8 quantisation of every Linear layer
  (weights int8 per output channel, activations quantised on the fly). On an AVX512-VNNI CPU
  without AMX it ran ViT-B/16 at 1.5x bf16's images/s, and the Fashion-MNIST model scored 92.07% in
  int8 against 92.06% in fp32 (``benchmarks/int8_accuracy.py``; ``vitkit eval --precision int8``).
  It is opt-in all the same: it moves logits ~5x more than bf16 does, gains nothing on tiny models
  (0.96x bf16 at vit_fmnist), loses to bf16 on CPUs with AMX (0.6x; it warns there), and rests on
  torch's ``quantize_dynamic``, which torch has deprecated.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import os
from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn

# fp32: weights and math in float32. bf16-autocast: fp32 weights, matmuls in bf16 (mixed
# precision, the recipe for training). bf16: weights and activations in bfloat16. fp16-autocast:
# matmuls in float16, for GPUs without bf16 (T4, V100); training it needs loss scaling (vitkit.train).
PRECISIONS = ("fp32", "bf16-autocast", "bf16", "fp16-autocast")
# the autocast precisions -> the dtype their matmuls run in
AUTOCAST_DTYPES = {"bf16-autocast": torch.bfloat16, "fp16-autocast": torch.float16}
# int8: Linear weights in int8, for inference on CPU only (``quantize_int8``).
# Where AMX multiplies bf16 tiles it is the slower choice: ViT-B/16, batch 8, on 2 cores of an AMX
# Xeon (torch 2.11, `benchmarks/throughput.py --device cpu --threads 2 --contestants
# timm:bf16:eager,vitkit:bf16:eager,vitkit:int8:eager`): int8 15.7 images/s, bf16 26.1.
INT8_ON_AMX = ("precision 'int8' on a CPU with AMX: bf16 is faster there (ViT-B/16 on 2 cores of an AMX Xeon: "
               "int8 at 0.60x bf16's images/s); int8 pays on CPUs with AVX512-VNNI and no AMX")
INFERENCE_PRECISIONS = PRECISIONS + ("int8",)


def check_precision(precision: str, inference: bool = False) -> str:
    allowed = INFERENCE_PRECISIONS if inference else PRECISIONS
    if precision not in allowed:
        raise ValueError(f"precision: expected one of {allowed}, got {precision!r}")
    return precision


def quantize_int8(model: nn.Module) -> nn.Module:
    """Dynamic int8 quantisation of every ``nn.Linear`` (per-channel weights), for CPU inference.

    Activations stay float and are quantised per batch inside each Linear; everything else
    (patch conv, LayerNorm, attention) stays fp32. Returns a new module; ``model`` is unchanged.
    """
    return _quantize_int8_inplace(copy.deepcopy(model))


def _quantize_int8_inplace(model: nn.Module) -> nn.Module:
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation notice for its quantized tensors
        return quantize_dynamic(model.eval().float(), {nn.Linear: per_channel_dynamic_qconfig}, inplace=True)


def has_native_bf16(device: str | torch.device = "cpu") -> bool:
    """True where bf16 matmuls run in hardware (AVX512-BF16/AMX CPUs, Ampere+ GPUs)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def cpu_info() -> tuple[str, list[str]]:
    """(CPU model name, flags) from /proc/cpuinfo; ("", []) where there is none (not Linux)."""
    model, flags = "", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = value.split()
                    break
    except OSError:
        pass
    return model, flags


def device_memory(device: str | torch.device = "cpu", available: bool = False) -> int | None:
    """Bytes of memory a device has: a GPU's free memory now, the machine's RAM for the CPU; None where
    the system does not say (not POSIX). ``available``: for the CPU, what can be allocated now without
    swapping (Linux's MemAvailable: free memory plus reclaimable caches), the RAM where that is unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if available:
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key == "MemAvailable" and value.split()[1:] == ["kB"]:
                        return int(value.split()[0]) * 1024
        except (OSError, ValueError):
            pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


# glibc malloc's mallopt(3) parameters.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# The largest mmap threshold glibc accepts on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX).
_MMAP_THRESHOLD_MAX = 32 * 2**20
_allocator_tuned = False


def tune_cpu_allocator() -> bool:
    """Keep freed memory in the process for reuse, instead of glibc handing it back to the OS.

    glibc's malloc serves large blocks with mmap, and trims the top of its heap whenever enough is
    free there: a training or inference step that frees its activations gives the pages back, and
    the next step faults them in again, each one zero-filled by the kernel. ``benchmarks/allocator.py``
    (fresh processes, each setting in turn; 2-core EPYC) counted per ViT-B/16 bf16 training step
    (batch 8) 63,000 page faults with glibc's defaults and 600 tuned (the step 1.03x faster); per
    inference step 47,000 and none (1.04x); per vit_fmnist fp32 training step 12,000 and 160 (1.10x).
    Blocks under 32 MiB now come from the heap, and the heap is never trimmed: the resident set stays
    at its high-water mark, as with a caching allocator (jemalloc, tcmalloc, or CUDA's).

    Process-wide; ``vitkit`` commands, ``vitkit.train`` and ``vitkit.bench`` call it. It does nothing,
    and returns False, where the C library is not glibc, where ``MALLOC_MMAP_THRESHOLD_`` or
    ``MALLOC_TRIM_THRESHOLD_`` is set (the user's own choice wins), or with ``VITKIT_TUNE_MALLOC=0``.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    if os.environ.get("VITKIT_TUNE_MALLOC", "1") == "0" or any(
            name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc only: musl and others take other parameters
        return False
    # The mmap threshold first: setting either parameter by hand stops glibc adapting the other,
    # and a fixed default mmap threshold (128 KiB) would map nearly every tensor afresh.
    _allocator_tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
                            and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _allocator_tuned


def set_num_threads(threads: int) -> None:
    """``torch.set_num_threads(threads)``, unless torch already runs that many (or ``threads`` is 0).

    Setting them is not free of side effects: ATen's ``set_num_threads`` (ParallelOpenMP.cpp, see
    pytorch/pytorch#13757) also turns MKL's dynamic threading off, after which an MKL matmul called
    inside one of torch's own parallel loops starts threads of its own. torch's CPU flash attention
    does exactly that: ``python benchmarks/threads.py`` (fresh processes, 2-core EPYC, 2 threads
    either way) timed its fp32 forward and backward 1.57-1.69x slower after an explicit
    ``torch.set_num_threads(2)`` than with torch's default of 2 (its forward alone 1.8-1.9x), and a
    vit_fmnist fp32 training step 1.2x slower, vitkit's and timm's alike. vitkit's commands take
    ``--threads`` through here, so asking for the count torch already has costs nothing.
    """
    if threads and threads != torch.get_num_threads():
        torch.set_num_threads(threads)


def default_precision(device: str | torch.device = "cpu") -> str:
    """Inference: ``"bf16"`` where the hardware has bf16 arithmetic, else ``"fp32"``.

    Measured here (avx512_bf16, no AMX): ViT-B/16 inference in bf16 runs at 2x fp32.
    """
    return "bf16" if has_native_bf16(device) else "fp32"


def default_training_precision(device: str | torch.device = "cpu") -> str:
    """Training (``--precision auto``): ``"bf16"`` autocast on bf16 GPUs and on CPUs with bf16
    arithmetic (AVX512-BF16 or AMX), ``"fp16"`` autocast on older GPUs, else ``"fp32"``.

    Measured on a 2-core EPYC with avx512_bf16 and no AMX (``benchmarks/throughput.py``), with
    the math attention path that CPU training takes (``layers.lean_training``): vit_fmnist
    (batch 128) trained at 1293-1465 images/s in bf16 autocast against 786-886 in fp32, and the
    tiny vit_digits_gap (16 tokens) at the same speed in both. Through the fused kernel's slow CPU
    backward, bf16 had been *slower* than fp32, which is why the attention rule matters here.
    """
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "fp32"
        # emulated bf16 (a T4 reports it as supported) is slow: there, fp16 with loss scaling, as timm's --amp
        return "bf16" if has_native_bf16(device) else "fp16"
    flags = cpu_info()[1]
    return "bf16" if "amx_bf16" in flags or "avx512_bf16" in flags else "fp32"


def autocast(precision: str, device: str | torch.device = "cpu") -> AbstractContextManager:
    """The autocast context ``precision`` asks for: bf16 (fp16) matmuls for ``"bf16-autocast"``
    (``"fp16-autocast"``), else nothing."""
    dtype = AUTOCAST_DTYPES.get(check_precision(precision, inference=True))
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _patch_conv(model: nn.Module) -> nn.Conv2d | None:
    embed = getattr(model, "patch_embed", None)
    conv = getattr(embed, "projection", None) or getattr(embed, "proj", None)  # vitkit's name, timm's name
    return conv if isinstance(conv, nn.Conv2d) else None


class InferenceModel(nn.Module):
    """A model prepared for inference: takes any float input and casts it to what the model runs in.

    ``forward`` runs under ``torch.inference_mode`` and, for the autocast precisions, autocast; the
    wrapped model (``.model``) may be compiled.
    """

    def __init__(self, model: nn.Module, precision: str, device: torch.device, channels_last: bool,
                 freezing: bool = False):
        super().__init__()
        self.model = model
        self.precision = precision
        self.device = device
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32  # int8 takes float input
        self.channels_last = channels_last
        self.freezing = freezing

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"input: expected a torch.Tensor of shape (B, C, H, W), got {type(x).__name__}")
        if x.dtype != self.dtype or x.device != self.device:
            x = x.to(self.device, self.dtype, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.precision not in AUTOCAST_DTYPES and not self.freezing and torch.is_inference_mode_enabled():
            return self.model(x)  # nothing to enter: a small model's call costs no more than the bare model's
        with torch.inference_mode(), autocast(self.precision, self.device), _inductor_freezing(self.freezing):
            return self.model(x)


class _FrozenForward(nn.Module):
    """What ``torch.compile`` compiles for a frozen inference model: a forward of its own.

    Dynamo caches graphs per code object. A graph compiled without freezing takes the weights as
    inputs and fits every instance of the model's class, so a later frozen compile of another
    instance would be handed that graph, unfrozen (the bench's ``timm-recipe`` after ``timm``
    compiled plainly). Frozen graphs guard on the weights they hold, one instance each; under this
    wrapper's code they never meet the class's other graphs.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def _inductor_freezing(on: bool) -> AbstractContextManager:
    """Inductor's ``freezing`` switched on for the calls that may compile, and only for them.

    ``torch.compile(options={"freezing": True})`` is not enough: the option reaches Inductor, but
    Dynamo reads the global flag while it traces, to decide whether the parameters become graph
    constants, so with the option alone the weights stay inputs and nothing is frozen or prepacked
    (torch 2.14: every Linear stayed ``addmm``; with the flag, oneDNN's prepacked linear with the
    bias and GELU fused, and ViT-B/16 bf16 inference 8% faster than eager).
    """
    if not on:
        return contextlib.nullcontext()
    import torch._inductor.config as inductor_config

    return inductor_config.patch(freezing=True)


def optimize_for_inference(
    model: nn.Module,
    precision: str | None = None,
    compile: bool = True,
    freezing: bool | None = None,
    device: str | torch.device | None = None,
    channels_last: bool | None = None,
    inplace: bool = False,
) -> InferenceModel:
    """Eval mode, frozen weights, bf16 where it pays, ``torch.compile``: the fastest forward pass.

    ``model`` is left as it was (its mode, dtype, device, gradients): the inference model is a copy.
    ``inplace=True`` makes ``model`` itself the inference model instead, for a model too big to hold
    twice.

    ``precision`` defaults to ``default_precision(device)``. ``freezing`` (default: on for CPU)
    turns the weights into compile-time constants so Inductor can prepack them for oneDNN and
    fuse bias and activation into the GEMMs; the returned model can then not be trained, and
    changing the original model's weights afterwards does not reach it. Works on any
    ``nn.Module`` taking an image batch (vitkit's ViT, or a timm/torchvision model).

    ``channels_last`` (default: on for CUDA) switches the patch convolution and its input to NHWC,
    the layout cuDNN's bf16 convolutions prefer (``benchmarks/channels_last.py`` measures it); SDPA
    picks the flash kernel for bf16 on its own.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    precision = check_precision(precision or default_precision(device), inference=True)
    if precision == "int8" and (device.type != "cpu" or compile):
        raise ValueError("precision 'int8': CPU inference in eager mode only (use compile=False on a CPU model)")
    if precision == "int8" and "amx_bf16" in cpu_info()[1]:
        import warnings

        warnings.warn(INT8_ON_AMX, stacklevel=2)
    if not inplace:
        model = copy.deepcopy(model)
    model = model.eval().requires_grad_(False).to(device)
    # bf16 weights for "bf16"; fp32 for the rest, a .half() or .bfloat16() model's included (autocast
    # and int8 take fp32 weights)
    model = model.to(torch.bfloat16) if precision == "bf16" else model.float()
    if precision == "int8":
        model = _quantize_int8_inplace(model)
    if channels_last is None:
        channels_last = device.type == "cuda"
    channels_last = channels_last and _patch_conv(model) is not None
    if channels_last:
        _patch_conv(model).to(memory_format=torch.channels_last)
    if compile:
        if freezing is None:
            freezing = device.type == "cpu"
        # Frozen by InferenceModel.forward, around each call (see _inductor_freezing).
        model = torch.compile(_FrozenForward(model) if freezing else model)
    return InferenceModel(model, precision, device, channels_last, freezing=bool(compile and freezing))


def optimize_for_training(model: nn.Module, compile: bool = True, precision: str | None = None) -> nn.Module:
    """Train mode, bf16 weights only for ``precision="bf16"``, then ``torch.compile``.

    ``precision`` defaults to ``"bf16-autocast"`` where the hardware has bf16, else ``"fp32"``.

    Run the forward pass under ``autocast(precision, device)`` for ``"bf16-autocast"``. The
    returned module shares parameters with ``model`` (so the optimizer and ``state_dict`` of the
    original keep working); no freezing, since the weights change every step.
    """
    if precision is None:
        native = has_native_bf16(next(model.parameters()).device)
        precision = "bf16-autocast" if native else "fp32"
    check_precision(precision)
    model.train()
    if precision == "bf16":
        model.to(torch.bfloat16)
    return torch.compile(model) if compile else model


def adamw(params, lr: float = 1e-3, weight_decay: float = 0.05, **kwargs) -> torch.optim.AdamW:
    """AdamW with the single fused kernel (one pass over all parameters) where torch has it.

    Same update as the default ``foreach`` implementation, fewer passes over memory; on CPU torch's
    default is a Python loop over the tensors (``benchmarks/adamw.py``). ``params``: tensors or
    param groups (dicts with ``"params"``), as torch's optimizers take them.
    """
    params = list(params)
    tensors = [t for group in params for t in (group["params"] if isinstance(group, dict) else [group])]
    kwargs.setdefault("fused", all(t.device.type in ("cpu", "cuda") for t in tensors))
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kwargs)


__all__ = [
    "AUTOCAST_DTYPES",
    "INFERENCE_PRECISIONS",
    "PRECISIONS",
    "InferenceModel",
    "adamw",
    "autocast",
    "default_precision",
    "has_native_bf16",
    "cpu_info",
    "default_training_precision",
    "optimize_for_inference",
    "optimize_for_training",
    "quantize_int8",
]
