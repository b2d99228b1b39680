"""What a GPU run of vitkit must show besides speed: same logits as timm, flash attention, a clean profile.

    python benchmarks/gpu_checks.py              # on the first CUDA device (falls back to CPU to try it out)

Run by ``benchmarks/gpu.sh`` on a lent GPU machine. It prints:
1. vitkit against timm with the same (random) weights on the device: the largest logit difference in
   fp32 and in bf16 and fp16 autocast, relative to the logits' scale.
2. Which SDPA kernel vitkit's attention gets: the forward and backward of a bf16 ViT-B/16 step run
   with only the flash kernel allowed (an error here means vitkit's attention falls off flash).
3. Whether an EMA update makes the host wait for the device: vitkit's ``ModelEma`` (none) and torch's
   ``AveragedModel`` (one or more), run under ``torch.cuda.set_sync_debug_mode("error")``.
4. Every architecture feature on the device: a small model of each (registers, LayerScale, CLIP, SigLIP,
   SwiGLU, DeiT, conv stem, dynamic size, BEiT, DINOv3, cls+mean), all weights random, against timm holding the same
   weights in fp32 (logits and input gradients), then a forward and backward in bf16 and fp16 autocast.
5. The ten most expensive device kernels of one bf16-autocast training step (ViT-B/16 by default), vitkit and timm
   side by side, so a gap in the bench can be traced to a kernel.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from vitkit import fast
from vitkit.bench import timm_twin
from vitkit.model import ViT, get_config


def parity(device: torch.device, name: str, batch: int) -> None:
    torch.manual_seed(0)
    ours = ViT(get_config(name)).to(device).eval()
    theirs = timm_twin(ours).to(device).eval()
    x = torch.randn(batch, ours.cfg.in_channels, *ours.cfg.img_size, device=device)
    for precision in ("fp32", "bf16-autocast", "fp16-autocast"):
        with torch.inference_mode(), fast.autocast(precision, device):
            a, b = ours(x).float(), theirs(x).float()
        rel = ((a - b).norm() / b.norm()).item()
        print(f"parity {name} {precision}: max |vitkit - timm| = {(a - b).abs().max().item():.3g}, "
              f"relative norm {rel:.3g}, same top-1 for {(a.argmax(1) == b.argmax(1)).float().mean().item():.0%}")


def training_loss(out: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against fixed labels, taken over the output's last axis: a model's logits, or the
    pooled features of one without a head (num_classes 0: SigLIP so400m), where labels drawn from
    range(num_classes) would not exist."""
    return F.cross_entropy(out.float(), torch.arange(out.shape[0], device=out.device) % out.shape[-1])


def flash_only(device: torch.device, name: str, batch: int) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = ViT(get_config(name)).to(device).train()
    x = torch.randn(batch, model.cfg.in_channels, *model.cfg.img_size, device=device)
    backend = SDPBackend.FLASH_ATTENTION if device.type == "cuda" else SDPBackend.MATH
    try:
        with sdpa_kernel(backend), fast.autocast("bf16-autocast", device):
            loss = training_loss(model(x))
        with sdpa_kernel(backend):
            loss.backward()
        print(f"attention: {name} forward and backward ran with only {backend.name} allowed (loss {loss.item():.3f})")
    except RuntimeError as e:
        print(f"attention: FAILED with only {backend.name} allowed: {str(e).splitlines()[0]}")


def ema_syncs(device: torch.device, name: str) -> None:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from vitkit.train import make_ema

    if device.type != "cuda":
        print("ema: no CUDA device, host syncs not checked")
        return
    model = ViT(get_config(name)).to(device)
    emas = {"vitkit ModelEma": make_ema(model, 0.999),
            "torch AveragedModel": AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999), use_buffers=True)}
    for label, ema in emas.items():
        ema.update_parameters(model)  # the first update copies (vitkit reads its count once)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            ema.update_parameters(model)
            print(f"ema: {label}: an update made no host sync")
        except RuntimeError as e:
            print(f"ema: {label}: an update synced the host ({str(e).splitlines()[0][:80]})")
        finally:
            torch.cuda.set_sync_debug_mode("default")


# name -> ViTConfig fields over a small base; each exercises one feature (or a family's combination).
FEATURES = {
    "seed (mean pool, LN after pooling)": {},
    "cls token, LN on tokens": dict(pool="cls", final_norm="tokens"),
    "registers + LayerScale (DINOv2)": dict(pool="cls", final_norm="tokens", reg_tokens=4, layer_scale=1e-5),
    "CLIP (pre-norm, QuickGELU)": dict(pool="cls", final_norm="tokens", pre_norm=True, mlp_act="quick_gelu"),
    "SigLIP (attention pool, tanh GELU)": dict(pool="map", final_norm="tokens", class_token=False, mlp_act="gelu_tanh"),
    "SwiGLU + LayerScale (DINOv2 giant)": dict(pool="cls", final_norm="tokens", mlp_act="swiglu", layer_scale=1e-5),
    "DeiT (distillation token)": dict(pool="cls", final_norm="tokens", dist_token=True),
    "conv stem": dict(stem="conv"),
    "dynamic image size (input 48x40)": dict(pool="cls", final_norm="tokens", dynamic_img_size=True),
    "BEiT (relative position bias, LayerScale)": dict(rel_pos_bias=True, abs_pos=False, layer_scale=0.1),
    "BEiT, class-token head, absolute positions too": dict(rel_pos_bias=True, pool="cls", final_norm="tokens"),
    "DINOv3 (rotary positions, registers, any image size)": dict(rope="dinov3", abs_pos=False, reg_tokens=4,
                                                                 layer_scale=1e-5, dynamic_img_size=True),
    "DINOv3 S+/H+/7B (SwiGLU)": dict(rope="dinov3", abs_pos=False, reg_tokens=4, layer_scale=1e-5,
                                     dynamic_img_size=True, mlp_act="swiglu"),
    "EVA-02 B/L (rotary + absolute positions, SwiGLU with a LayerNorm)": dict(rope="eva02", rope_ref_grid=16,
                                                                             mlp_act="swiglu", mlp_norm=True),
    "Perception Encoder (rotary + absolute positions, pre-norm, 2-head pooling)": dict(
        rope="pe", rope_ref_grid=4, rope_grid_offset=1.0, pre_norm=True, pool="map", pool_heads=2,
        final_norm="tokens"),
    "cls+mean (no timm twin)": dict(pool="cls_mean", final_norm="tokens"),
}


def features(device: torch.device) -> None:
    from vitkit.config import ViTConfig

    base = dict(img_size=32, patch_size=8, emb_size=64, depth=2, num_heads=4, num_classes=10, norm_eps=1e-6)
    for label, fields in FEATURES.items():
        torch.manual_seed(0)
        line = f"feature {label}:"
        try:
            cfg = ViTConfig(**{**base, **fields})
            ours = ViT(cfg)
            with torch.no_grad():  # every weight random, so a part applied in the wrong place shows
                for name, p in ours.named_parameters():
                    p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.2 * torch.randn_like(p))
            ours = ours.to(device)
            x = torch.randn(4, cfg.in_channels, *((48, 40) if cfg.dynamic_img_size else cfg.img_size), device=device)
            theirs = timm_twin(ours).to(device) if cfg.pool != "cls_mean" else None
            if theirs is not None:
                xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
                a, b = ours(xa), theirs(xb)
                a.square().sum().backward()
                b.square().sum().backward()
                line += (f" fp32 |logits diff| {(a - b).abs().max().item():.2g} (scale {b.abs().max().item():.2g}),"
                         f" |input grad diff| {(xa.grad - xb.grad).abs().max().item():.2g}"
                         f" (scale {xb.grad.abs().max().item():.2g});")
            for precision in ("bf16-autocast", "fp16-autocast"):
                ours.zero_grad(set_to_none=True)
                with fast.autocast(precision, device):
                    loss = ours(x).float().logsumexp(1).mean()
                loss.backward()
                finite = all(p.grad is None or torch.isfinite(p.grad).all() for p in ours.parameters())
                line += f" {precision} loss {loss.item():.3f}, grads {'finite' if finite else 'NOT FINITE'};"
        except Exception as e:  # one feature failing must not hide the others
            line += f" FAILED: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        print(line)


def profile_step(device: torch.device, name: str, batch: int, top: int = 10) -> None:
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    ours = ViT(get_config(name)).to(device)
    models = {"vitkit": ours, "timm": timm_twin(ours).to(device)}
    x = torch.randn(batch, ours.cfg.in_channels, *ours.cfg.img_size, device=device)
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    for library, model in models.items():
        model.train()
        opt = fast.adamw(model.parameters(), lr=1e-4)

        def step(model=model, opt=opt):
            with fast.autocast("bf16-autocast", device):
                loss = training_loss(model(x))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(3):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        with profile(activities=[activity]) as prof:
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"\n-- {library}: one bf16-autocast {name} training step, batch {batch}, top {top} kernels")
        print(prof.key_averages().table(sort_by=sort, row_limit=top, max_name_column_width=60))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--batch-size", type=int, default=64, help="of the profiled training step")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}")
    parity(device, args.model, 8)
    flash_only(device, args.model, 8)
    ema_syncs(device, args.model)
    features(device)
    profile_step(device, args.model, args.batch_size)


if __name__ == "__main__":
    main()
