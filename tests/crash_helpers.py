"""Processes for test_crash_safety.py to kill: ``python tests/crash_helpers.py MODE DIRECTORY``.

MODE ``exchange`` or ``fallback`` (atomic_directory's renameat2 swap disabled): serve
"go START" lines on stdin; for each, fork a worker that saves generation START, START+1, ...
to DIRECTORY forever and print its pid; the test SIGKILLs the worker at a random moment and
the server reaps it and prints "reaped". Forking keeps torch's import (seconds) out of every trial.

MODE ``die-between-renames``: one fallback save of generation 1 that dies (os._exit, no
cleanup, like a power cut) right after moving the old checkpoint aside.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from vitkit import ViT, ViTConfig, checkpoint, save_pretrained

# ~3M parameters: a 13 MB model.safetensors, 30-150 ms to save and fsync here.
CFG = ViTConfig(
    img_size=32, patch_size=8, emb_size=256, depth=4, num_heads=4, num_classes=10,
    class_token=True, pool="cls", final_norm="tokens", norm_eps=1e-6,  # timm-style: every export format takes it
)


def set_generation(model: torch.nn.Module, generation: int) -> None:
    """Give every tensor a value that names both the generation and the tensor.

    A checkpoint that mixes two generations, or holds a partly written tensor, cannot
    match any single generation.
    """
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.fill_(generation + i / 1000)


def generation_of(model: torch.nn.Module, reference: torch.nn.Module) -> int | None:
    """The generation whose values ``model`` holds exactly, or None if it holds none."""
    first = next(model.parameters()).flatten()[0].item()
    generation = round(first)
    set_generation(reference, generation)
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    return generation if same else None


def serve(mode: str, directory: Path) -> None:
    torch.set_num_threads(1)  # nothing to share with the forked workers
    if mode == "fallback":
        checkpoint._exchange = lambda a, b: False
    model = ViT(CFG)
    print("ready", flush=True)
    for line in sys.stdin:
        start = int(line.split()[1])
        pid = os.fork()
        if pid == 0:  # the worker: save until killed
            generation = start
            while True:
                set_generation(model, generation)
                save_pretrained(model, directory, extra={"generation": generation})
                generation += 1
        print(pid, flush=True)
        os.waitpid(pid, 0)
        print("reaped", flush=True)


def die_between_renames(directory: Path) -> None:
    checkpoint._exchange = lambda a, b: False
    real_rename = os.rename

    def rename(src, dst):
        real_rename(src, dst)
        if Path(dst).name == f".{directory.name}.old":
            os._exit(9)  # the old checkpoint is aside, the new one not yet in place

    os.rename = rename
    model = ViT(CFG)
    set_generation(model, 1)
    save_pretrained(model, directory, extra={"generation": 1})
    raise SystemExit("the save finished: the crash point was never reached")


if __name__ == "__main__":
    mode, target = sys.argv[1], Path(sys.argv[2])
    if mode == "die-between-renames":
        die_between_renames(target)
    else:
        serve(mode, target)
