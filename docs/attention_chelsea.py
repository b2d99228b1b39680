"""Train the small model behind docs/attention_chelsea.png (no pretrained weights offline).

The task: recognise which of 18 scikit-image photos a random crop comes from (Chelsea the
cat, the astronaut, the coffee cup, the rocket, ...). To recognise the cat photo from any
crop the model has to learn what is particular to it, so its attention on the whole photo
shows which parts it relies on. It is not an ImageNet classifier.

    python docs/attention_chelsea.py runs/chelsea-vit runs/chelsea.png   # ~12 min on one busy CPU core
    vitkit attention runs/chelsea-vit runs/chelsea.png --method last-layer --per-head --out docs/attention_chelsea.png

After 1500 steps it names all 18 whole photos correctly (Chelsea with p = 0.90).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import skimage.data
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

import vitkit
from vitkit.checkpoint import IMAGENET_MEAN, IMAGENET_STD, atomic_file

PHOTOS = ("chelsea", "astronaut", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
          "colorwheel", "stereo_motorcycle", "camera", "coins", "moon", "grass", "gravel", "brick", "cell", "page", "text")
SIZE = (96, 144)  # Chelsea's 2:3 aspect ratio


def photo(name: str) -> torch.Tensor:
    img = getattr(skimage.data, name)()
    img = img[0] if isinstance(img, tuple) else img  # stereo_motorcycle: (left, right, disparity)
    img = np.stack([img] * 3, axis=-1) if img.ndim == 2 else img[..., :3]
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)  # (3, H, W) uint8


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", help="checkpoint directory to write")
    ap.add_argument("cat_png", help="where to save Chelsea as a PNG")
    ap.add_argument("--steps", type=int, default=1500)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)

    with atomic_file(args.cat_png) as f:
        Image.fromarray(skimage.data.chelsea()).save(f, format="PNG")
    photos = [photo(n) for n in PHOTOS]
    augment = v2.Compose([
        v2.RandomResizedCrop(SIZE, scale=(0.1, 1.0), ratio=(1.0, 2.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(0.2, 0.2, 0.1),
    ])
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]

    cfg = vitkit.ViTConfig(img_size=SIZE, patch_size=12, in_channels=3, emb_size=96, depth=4, num_heads=4,
                           mlp_ratio=2.0, num_classes=len(PHOTOS), class_token=True, pool="cls",
                           final_norm="tokens", norm_eps=1e-6)
    model = vitkit.ViT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=args.steps, pct_start=0.1)
    start = time.time()
    for step in range(args.steps):
        labels = torch.randint(0, len(PHOTOS), (32,))
        x = torch.stack([(augment(photos[i]).float() / 255 - mean) / std for i in labels.tolist()])
        loss = F.cross_entropy(model(x), labels, label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  {time.time() - start:.0f}s", flush=True)
    preprocess = dict(img_size=list(SIZE), mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD),
                      interpolation="bicubic", crop_pct=1.0)
    vitkit.save_pretrained(model.eval(), args.out, preprocess=preprocess, class_names=list(PHOTOS))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
