"""The rotary positions' cost alone: vitkit's rotation of q (or k) against timm's, eager and compiled.

    python benchmarks/rotation.py                          # DINOv3-B/16's q at batch 8, bf16, on the CPU
    python benchmarks/rotation.py --device cuda --batch-size 256
    python benchmarks/rotation.py --model eva02_base_patch14_224    # EVA-02-B/14's q (257 tokens)

A rotation is memory traffic, not arithmetic: on a GPU, where the matmuls are fast, how many passes it
makes over q and k shows in the model's speed (README "On a GPU"). vitkit's ``layers._rotate_patches``
against timm's ``Eva`` attention's (``apply_rot_embed_cat`` on the patches, concatenated after the
prefix tokens; DINOv3's rotate-half layout for every ``--model``), on one (B, heads, tokens, head width) tensor in the given dtype with fp32 tables; the
contestants take turns run by run; medians. "infer" is the forward alone without autograd, "train" the
forward and backward. Each contestant's output is compared with the other's first.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vitkit.layers import _rotate_patches, rope_dinov3
from vitkit.model import get_config


def timm_rotation(x: torch.Tensor, rope: torch.Tensor, prefix: int) -> torch.Tensor:
    """timm's EvaAttention, for q (models/eva.py): the patches rotated, rejoined after the prefix tokens."""
    from timm.layers import apply_rot_embed_cat

    return torch.cat([x[:, :, :prefix], apply_rot_embed_cat(x[:, :, prefix:], rope, half=True)], dim=2).type_as(x)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_base_patch16_dinov3", help="a rotary variant: its grid, heads, prefix")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--no-compile", action="store_true", help="eager alone (compiling takes a minute on a CPU)")
    args = p.parse_args(argv)

    cfg = get_config(args.model)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    grid = (cfg.img_size[0] // cfg.patch_size, cfg.img_size[1] // cfg.patch_size)
    head_dim = cfg.emb_size // cfg.num_heads
    prefix = int(cfg.class_token) + cfg.reg_tokens
    tokens = prefix + grid[0] * grid[1]
    sin, cos = rope_dinov3(grid, head_dim, device=device)  # the tables' values do not change the cost
    timm_table = torch.cat([sin, cos], dim=-1)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, cfg.num_heads, tokens, head_dim, device=device, dtype=dtype)
    grad = torch.randn_like(x)
    contestants = {"vitkit": lambda t: _rotate_patches(t, (sin, cos), tokens),
                   "timm": lambda t: timm_rotation(t, timm_table, prefix)}
    diff = (contestants["vitkit"](x).float() - contestants["timm"](x).float()).abs().max().item()
    print(f"{args.model}: q of shape {tuple(x.shape)} ({prefix} prefix tokens), {args.dtype}, {device}; "
          f"torch {torch.__version__}; largest |vitkit - timm| {diff:.3g}")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for compiled in (False,) if args.no_compile else (False, True):
        for mode in ("infer", "train"):
            fns = {name: torch.compile(fn) if compiled else fn for name, fn in contestants.items()}

            def run(fn, mode=mode):
                if mode == "infer":
                    with torch.no_grad():
                        fn(x)
                else:
                    xg = x.detach().requires_grad_()
                    fn(xg).backward(grad)

            times = {name: [] for name in fns}
            for fn in fns.values():  # the first calls compile
                for _ in range(3):
                    run(fn)
            for _ in range(args.runs):
                for name, fn in fns.items():
                    sync()
                    start = time.perf_counter()
                    run(fn)
                    sync()
                    times[name].append(time.perf_counter() - start)
            ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
            print(f"{'compiled' if compiled else 'eager':8s} {mode:5s}: vitkit {ms['vitkit']:.3f} ms, "
                  f"timm {ms['timm']:.3f} ms, vitkit {ms['timm'] / ms['vitkit']:.2f}x timm's speed")


if __name__ == "__main__":
    main()
