"""Throughput, memory and FLOP rate of vitkit against timm, measured side by side.

All contestants live in one process and take turns run by run (the order flips every
round), so a noisy neighbour slows them alike and their ratio stays meaningful; every
figure is a median. Each contestant's FLOP rate is put against this machine's own
matmul rate for the same dtype, measured here with a large ``torch.matmul`` (and, on
a GPU, against the card's datasheet peak: MFU).

Contestants, built with the same architecture and random weights:

* ``vitkit``: vitkit's model through ``vitkit.fast`` (fused attention where it is the faster
  kernel: all of inference, GPU and fp32 training; the math path and the lean ops for bf16 training on CPU,
  whose fused backward is slow, see ``layers.lean_training``; ``optimize_for_inference`` or
  ``optimize_for_training`` when compiling).
* ``timm``: ``timm``'s VisionTransformer, plain ``torch.compile`` when compiling, its fused attention.
* ``vitkit-math``: vitkit with the explicit math attention everywhere, the naive baseline.
* ``timm-recipe``: timm's model through vitkit.fast's recipe: shows how much of a win is the
  recipe (freezing, prepacking), not the model code.

``NAME:PRECISION[:eager|compiled]`` runs a contestant in its own precision and mode, so that each
library's best path can meet the other's in one process. Every step is timed on two clocks:
the wall clock, and this process's CPU clock, which a machine shared with other jobs disturbs
far less (use one thread there: an OpenMP team stalls whenever the OS parks one of its threads).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from . import fast
from .checkpoint import check_output_file
from .config import ViTConfig, get_config
from .layers import conv_stem
from .model import ViT

MODES = ("infer", "train")
CONTESTANTS = ("vitkit", "timm", "vitkit-math", "timm-recipe")
BASELINE = "timm"  # ratios are against this contestant when it runs

# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) from the vendors' datasheets, matched by
# substring of torch.cuda.get_device_name(); first match wins, so specific names come first.
GPU_PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A10G": 70.0,
    "A10": 125.0,
    "L40S": 362.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
}

# CPU flags that decide which kernels run: printed so a reader can tell AMX from AVX512-BF16.
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


# --- the machine ---------------------------------------------------------------------------
def _cpuinfo() -> tuple[str, list[str]]:
    model, flags = fast.cpu_info()
    return model or platform.processor() or platform.machine(), [f for f in CPU_FLAGS if f in flags]


def gpu_peak_tflops(name: str) -> float | None:
    """The datasheet dense bf16 peak of a GPU by name, or None when the table does not know it."""
    for key, tflops in GPU_PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops
    return None


def machine_info(device: torch.device) -> dict:
    cpu, flags = _cpuinfo()
    info = {
        "cpu": cpu,
        "cpu_flags": flags,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
        "native_bf16": fast.has_native_bf16(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_peak_bf16_tflops"] = gpu_peak_tflops(info["gpu"])
    return info


def machine_line(m: dict) -> str:
    """``machine_info`` in one line: what every report and benchmark script prints first."""
    return (f"machine: {m.get('gpu') or m['cpu']}; {m['threads']} threads; cpu flags: {' '.join(m['cpu_flags']) or 'n/a'} "
            f"(capability {m['cpu_capability']}); native bf16: {m['native_bf16']}; torch {m['torch']}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(dtype: torch.dtype, device: torch.device, n: int | None = None, reps: int = 5) -> tuple[float, float]:
    """FLOP/s of an (n x n) @ (n x n) matmul on this machine: the achievable GEMM rate, median of ``reps``.

    Returns (per wall-clock second, per CPU second of this process).
    """
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    times, cpu_times = [], []
    for i in range(reps + 2):  # two warm-up products
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        torch.matmul(a, b, out=out)
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    flops = 2 * n**3
    return flops / statistics.median(times), flops / max(statistics.median(cpu_times), 1e-9)


# --- memory --------------------------------------------------------------------------------
def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_rss_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    # Give freed heap back to the OS, so the next high-water mark counts only what this step needs.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory_mb(step: Callable[[], object], device: torch.device) -> float:
    """Extra memory one call of ``step`` needs at its peak, in MiB (NaN where it cannot be measured).

    CUDA: ``max_memory_allocated`` over what was allocated before. CPU: torch's allocations
    bypass tracemalloc, so the resident-set high-water mark (VmHWM) over the RSS before.
    """
    gc.collect()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    _malloc_trim()
    before = _proc_status_kb("VmRSS")
    if before is None or not _reset_rss_peak():
        return math.nan
    step()
    return (_proc_status_kb("VmHWM") - before) / 1024


# --- contestants ---------------------------------------------------------------------------
def timm_model(cfg: ViTConfig, abs_pos: bool | None = None) -> nn.Module:
    """timm's model of ``cfg``'s architecture (VisionTransformer, or the class TIMM_ARCHITECTURE names), random
    weights; ``abs_pos``: with absolute positions or without (default: ``cfg.abs_pos``)."""
    try:
        import timm
    except ImportError as e:
        raise ValueError("contestant 'timm': timm is not installed (pip install timm)") from e
    from .convert.timm import TIMM_ARCHITECTURE, architecture_key, model_args

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the eps warning: passed explicitly below
        args = model_args(cfg, abs_pos)
    # The architecture picks timm's class (DeiT's distilled one) and its MLP layer (SwiGLU's); args
    # then override every field it sets, as a timm hub config's model_args do.
    model = timm.create_model(TIMM_ARCHITECTURE[architecture_key(cfg)][0], pretrained=False, **args,
                              norm_layer=partial(nn.LayerNorm, eps=cfg.norm_eps))
    if cfg.stem == "conv":  # what a timm user writes for a convolutional stem: swap PatchEmbed's projection
        model.patch_embed.proj = conv_stem(cfg.in_channels, cfg.patch_size, cfg.emb_size)
    return model


def timm_twin(model: ViT) -> nn.Module:
    """``timm_model`` holding ``model``'s weights (on the CPU): the peer for parity checks."""
    from .convert.timm import state_from_vitkit

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    # A conv stem has no rule in the timm key map (timm has none; timm_model swaps vitkit's in): same layers, same names.
    stem = {k: state.pop(k) for k in list(state) if model.cfg.stem == "conv" and k.startswith("patch_embed.projection.")}
    state = state_from_vitkit(state, model.cfg)
    theirs = timm_model(model.cfg, abs_pos="pos_embed" in state)
    theirs.load_state_dict({**state, **{k.replace("patch_embed.projection.", "patch_embed.proj.", 1): v
                                        for k, v in stem.items()}})
    return theirs


@dataclass
class Contestant:
    name: str
    model: nn.Module  # the module whose parameters the step uses (before wrapping or compiling)
    step: Callable[[], object]  # one inference batch or one training step, on prepared inputs
    compile_s: float = 0.0  # first call (compilation when compiling), outside the timed runs


def _build_model(name: str, cfg: ViTConfig) -> nn.Module:
    if name.startswith("timm"):
        return timm_model(cfg)
    model = ViT(cfg)
    if name == "vitkit-math":
        model.set_fused_attention(False)
    return model


def build_contestant(name: str, cfg: ViTConfig, mode: str, precision: str, compile: bool,
                     batch_size: int, device: torch.device, model: nn.Module | None = None) -> Contestant:
    """A model and its step function, prepared as its library's recipe prepares it; ``model``: this
    one (a variant the caller has set up) instead of a fresh build of ``cfg``."""
    if name not in CONTESTANTS:
        raise ValueError(f"contestants: unknown contestant {name!r}; expected some of {CONTESTANTS}")
    model = (_build_model(name, cfg) if model is None else model).to(device)
    uses_recipe = name != "timm"  # vitkit, vitkit-math and timm-recipe go through vitkit.fast
    x = torch.randn(batch_size, cfg.in_channels, *cfg.img_size, device=device)
    if mode == "infer":
        if uses_recipe:
            run = fast.optimize_for_inference(model, precision, compile=compile, device=device, inplace=True)
        elif precision == "int8":  # what a timm user writes: torch's dynamic quantisation, defaults
            from torch.ao.quantization import quantize_dynamic

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run = quantize_dynamic(model.eval(), {nn.Linear}, dtype=torch.qint8)
        else:  # what a timm user writes: eval, .to(dtype), torch.compile
            model = model.eval().requires_grad_(False)
            if precision == "bf16":
                model = model.to(torch.bfloat16)
            run = torch.compile(model) if compile else model
        if precision == "bf16":  # cast once, outside the timings, for every contestant
            x = x.to(torch.bfloat16)

        def step():
            with torch.inference_mode(), fast.autocast(precision, device):
                return run(x)
    elif mode == "train":
        y = torch.randint(0, max(cfg.num_classes, 1), (batch_size,), device=device)
        if uses_recipe:
            run = fast.optimize_for_training(model, compile=compile, precision=precision)
        else:
            model.train()
            if precision == "bf16":
                model.to(torch.bfloat16)
            run = torch.compile(model) if compile else model
        if precision == "bf16":
            x = x.to(torch.bfloat16)
        # The same optimizer for every contestant: the comparison is about the model.
        opt = fast.adamw(model.parameters(), lr=1e-4)

        def step():
            with fast.autocast(precision, device):
                loss = F.cross_entropy(run(x).float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
    else:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    start = time.perf_counter()
    step()  # the first call compiles (and allocates optimizer state): kept out of the timings
    _sync(device)
    return Contestant(name, model, step, compile_s=time.perf_counter() - start)


def parse_contestant(spec: str, precision: str, compile: bool) -> tuple[str, str, bool]:
    """``"timm"`` -> ("timm", precision, compile); ``"vitkit:int8:eager"`` -> ("vitkit", "int8", False).

    The suffixes let one run put each library's best path side by side, whatever they are.
    """
    name, *rest = spec.split(":")
    if len(rest) > 2 or (len(rest) == 2 and rest[1] not in ("eager", "compiled")):
        raise ValueError(f"contestants: {spec!r}: expected NAME[:PRECISION[:eager|compiled]]")
    if rest:
        precision = fast.check_precision(rest[0], inference=True)
    if len(rest) == 2:
        compile = rest[1] == "compiled"
    return name, precision, compile


# --- the measurement -----------------------------------------------------------------------
def take_turns(steps: dict[str, Callable[[], object]], runs: int, warmup: int = 1,
               device: torch.device | str = "cpu") -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Call each step ``warmup`` times untimed, then time ``runs`` rounds in which every step runs
    once, taking turns; the order flips every round, so no one always runs first.

    Returns the seconds of every timed call, by name: on the wall clock and on this process's CPU
    clock. The device is synchronised around each call. Every benchmark that compares contestants
    in one process (``run_benchmark`` and the A/B scripts in benchmarks/) times them here.
    """
    device = torch.device(device)
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(runs):
        for name in names if r % 2 == 0 else names[::-1]:
            _sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            steps[name]()
            _sync(device)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - cpu_start)
    return wall, cpu



@dataclass
class Result:
    contestant: str
    step_s: list[float]  # every timed run, in order
    images_per_s: float  # batch_size / median(step_s)
    peak_mem_mb: float  # extra memory of one step at its peak
    gflops: float  # achieved, counting the model's MACs (x3 for a training step)
    matmul_fraction: float  # gflops / this machine's matmul rate for the dtype
    mfu: float | None  # gflops / the GPU's datasheet bf16 peak (GPU, bf16 only)
    first_call_s: float  # the untimed first call: compilation when compiling
    # CPU seconds of this process per step (all threads): on a machine shared with other jobs,
    # the wall clock counts their time too, the CPU clock mostly does not.
    cpu_s: list[float] = field(default_factory=list)
    images_per_cpu_s: float = math.nan
    vs_baseline: float | None = None  # images/s over the baseline contestant's
    vs_baseline_cpu: float | None = None  # the same ratio on the CPU clock
    # The lowest and highest ratio of a single round (the baseline's run over this one's in the same
    # round, minutes apart at most): how far the machine's drift moves the median ratio.
    vs_baseline_rounds: tuple[float, float] | None = None
    matmul_fraction_cpu: float = math.nan  # FLOPs per CPU second over the matmul's per CPU second


@dataclass
class Report:
    machine: dict
    model: str
    batch_size: int
    mode: str
    precision: str
    compile: bool
    runs: int
    gmacs_per_image: float  # forward pass, attention matmuls included (vitkit.summary)
    matmul_gflops: float  # this machine's matmul rate in the dtype the matmuls run in
    matmul_dtype: str
    matmul_gflops_per_cpu_s: float  # the same on the CPU clock (all threads of this process)
    results: list[Result] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        m = self.machine
        lines = [
            machine_line(m),
            f"matmul rate ({self.matmul_dtype}): {self.matmul_gflops:.1f} GFLOP/s measured, "
            f"{self.matmul_gflops_per_cpu_s:.1f} GFLOP per CPU second"
            + (f"; datasheet peak {m['gpu_peak_bf16_tflops']} TFLOP/s bf16" if m.get("gpu_peak_bf16_tflops") else ""),
            f"model {self.model} ({self.gmacs_per_image:.3f} GMACs/image forward), batch {self.batch_size}, "
            f"{self.mode}, {self.precision}, {'compiled' if self.compile else 'eager'}, median of {self.runs} runs",
            f"{'contestant':<24}{'img/s':>10}{'ms/step':>10}{'peak MB':>10}{'GFLOP/s':>10}{'% matmul':>10}"
            + (f"{'MFU':>8}" if any(r.mfu is not None for r in self.results) else "")
            + f"{'vs ' + BASELINE:>10}{'rounds':>12}{'img/cpu-s':>11}{'(cpu) vs':>9}{'% (cpu)':>9}{'1st call s':>12}",
        ]
        for r in self.results:
            ratio = f"{r.vs_baseline:.3f}" if r.vs_baseline is not None else "-"
            rounds = f"{r.vs_baseline_rounds[0]:.2f}-{r.vs_baseline_rounds[1]:.2f}" if r.vs_baseline_rounds else "-"
            cpu_ratio = f"{r.vs_baseline_cpu:.3f}" if r.vs_baseline_cpu is not None else "-"
            mfu = f"{100 * r.mfu:7.1f}%" if r.mfu is not None else ""
            lines.append(
                f"{r.contestant:<24}{r.images_per_s:>10.2f}{1e3 * statistics.median(r.step_s):>10.1f}"
                f"{r.peak_mem_mb:>10.1f}{r.gflops:>10.1f}{100 * r.matmul_fraction:>9.1f}%{mfu}{ratio:>10}{rounds:>12}"
                f"{r.images_per_cpu_s:>11.2f}{cpu_ratio:>9}"
                f"{100 * r.matmul_fraction_cpu:>8.1f}%{r.first_call_s:>12.1f}"
            )
        return "\n".join(lines)


def forward_macs(cfg: ViTConfig) -> int:
    """Multiply-accumulates of one image's forward pass, counted by ``vitkit.summary`` on the meta
    device (shapes alone, no weights)."""
    from .summary import summary

    with torch.device("meta"):
        return summary(ViT(cfg), print_table=False).macs


def run_benchmark(
    model: str | ViTConfig = "vit_base_patch16_224",
    batch_size: int = 8,
    mode: str = "infer",
    precision: str = "fp32",
    compile: bool = False,
    contestants: tuple[str, ...] | list[str] = ("vitkit", "timm"),
    runs: int = 5,
    warmup: int = 1,
    device: str | torch.device = "cpu",
    seed: int = 0,
    matmul_size: int | None = None,
) -> Report:
    """Build every contestant, warm them up, then time ``runs`` interleaved rounds. See the module doc.

    ``matmul_size``: the side of the square matmul that measures the machine's rate (default 2048
    on CPU, 8192 on GPU).
    """
    fast.check_precision(precision, inference=mode == "infer")
    fast.tune_cpu_allocator()  # process-wide: every contestant runs under it
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if batch_size < 1 or runs < 1 or warmup < 0:
        raise ValueError(f"batch_size and runs must be >= 1 and warmup >= 0; got {batch_size}, {runs}, {warmup}")
    contestants = list(dict.fromkeys(contestants))  # drop repeats, keep order
    if not contestants:
        raise ValueError("contestants: expected at least one")
    device = check_device(device)
    cfg = model if isinstance(model, ViTConfig) else get_config(model)
    name = model if isinstance(model, str) else "custom ViTConfig"

    specs = []  # every spec read before any contestant is built: a typo in the last costs no warm-up
    for spec in contestants:
        who, prec, comp = parse_contestant(spec, precision, compile)
        if who not in CONTESTANTS:
            where = "" if who == spec else f" in {spec!r}"
            raise ValueError(f"contestants: unknown contestant {who!r}{where}; expected some of {CONTESTANTS}")
        if prec == "int8" and (comp or device.type != "cpu" or mode != "infer"):
            raise ValueError(f"contestants: {spec!r}: int8 is for CPU inference in eager mode only")
        specs.append((spec, who, prec, comp))
    torch.manual_seed(seed)
    built = []
    for spec, who, prec, comp in specs:
        c = build_contestant(who, cfg, mode, prec, comp, batch_size, device)
        c.name = spec
        built.append(c)
    times, cpu_times = take_turns({c.name: c.step for c in built}, runs, warmup, device)
    memory = {c.name: peak_memory_mb(c.step, device) for c in built}

    # int8 is put against the bf16 matmul rate: torch has no general int8 matmul to time.
    matmul_dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    rate, cpu_rate = matmul_rate(matmul_dtype, device, matmul_size)
    macs = forward_macs(cfg)
    flops_per_image = 2 * macs * (3 if mode == "train" else 1)  # backward ~ 2x forward
    info = machine_info(device)
    # MFU is against the bf16 tensor-core peak: only meaningful when the matmuls run in bf16.
    peak = info.get("gpu_peak_bf16_tflops") if precision != "fp32" else None
    report = Report(info, name, batch_size, mode, precision, compile, runs, macs / 1e9, rate / 1e9,
                    str(matmul_dtype).replace("torch.", ""), cpu_rate / 1e9)
    for c in built:
        ips = batch_size / statistics.median(times[c.name])
        achieved = ips * flops_per_image
        report.results.append(Result(
            c.name, times[c.name], ips, memory[c.name], achieved / 1e9, achieved / rate,
            achieved / (peak * 1e12) if peak else None, c.compile_s,
            cpu_s=cpu_times[c.name], images_per_cpu_s=batch_size / statistics.median(cpu_times[c.name]),
        ))
        r = report.results[-1]
        r.matmul_fraction_cpu = r.images_per_cpu_s * flops_per_image / cpu_rate
    base = next((r for r in report.results if r.contestant.split(":")[0] == BASELINE), None)
    for r in report.results:
        r.vs_baseline = r.images_per_s / base.images_per_s if base else None
        r.vs_baseline_cpu = r.images_per_cpu_s / base.images_per_cpu_s if base else None
        if base:
            per_round = [b / t for b, t in zip(base.step_s, r.step_s)]  # run i of each is in round i
            r.vs_baseline_rounds = (min(per_round), max(per_round))
    return report


# --- the command line (shared by `vitkit bench` and benchmarks/throughput.py) --------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="vit_base_patch16_224", help="a variant name (see `vitkit models`)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--mode", choices=MODES, default="infer", help="forward only, or forward+loss+backward+AdamW")
    p.add_argument("--precision", choices=fast.INFERENCE_PRECISIONS, default="fp32",
                   help="int8: dynamic int8 Linear layers, CPU inference only")
    p.add_argument("--compile", action="store_true", help="torch.compile every contestant")
    p.add_argument("--contestants", default="vitkit,timm",
                   help=f"comma-separated, from {','.join(CONTESTANTS)}; NAME:PRECISION[:eager|compiled] "
                        "overrides --precision/--compile for one contestant")
    p.add_argument("--runs", type=int, default=5, help="timed runs per contestant (medians are reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per contestant after the first call")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON ('-' for stdout)")


def check_device(device: str | torch.device) -> torch.device:
    """``--device``: cpu, cuda or cuda:N that this machine has (``auto`` too), or a ValueError naming the flag."""
    from .train import DistInfo, resolve_device

    resolved = resolve_device(str(device), DistInfo())
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: expected cpu, cuda or cuda:N (the benchmark times those)")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return resolved


def run_from_args(args: argparse.Namespace) -> Report:
    # every flag checked before anything is built or timed: a bad one never costs the benchmark
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads: expected a positive number of threads, got {args.threads}")
    if args.json and args.json != "-":
        check_output_file(args.json, "--json")
    if args.threads is not None:  # (run_benchmark checks --device and every contestant before it builds one)
        fast.set_num_threads(args.threads)
    report = run_benchmark(
        args.model, args.batch_size, args.mode, args.precision, args.compile,
        [c.strip() for c in args.contestants.split(",") if c.strip()], args.runs, args.warmup, args.device,
    )
    print(report.table())
    if args.json == "-":
        print(json.dumps(report.to_dict(), indent=2))
    elif args.json:
        from .checkpoint import atomic_file

        with atomic_file(os.fspath(args.json), "w") as f:
            json.dump(report.to_dict(), f, indent=2)
    return report


__all__ = [
    "CONTESTANTS",
    "GPU_PEAK_BF16_TFLOPS",
    "MODES",
    "Report",
    "Result",
    "add_arguments",
    "check_device",
    "gpu_peak_tflops",
    "machine_info",
    "machine_line",
    "matmul_rate",
    "peak_memory_mb",
    "run_benchmark",
    "run_from_args",
    "take_turns",
    "timm_model",
    "timm_twin",
]
