"""torchrun DDP (gloo, CPU) computes the same steps as one process with the same global batch."""

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from vitkit.train import STATE_NAME, resolve_config, train

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

# No randomness outside the data order (no dropout, drop path or augmentation): the ranks' RNG
# streams differ from a single process's, the data order (seed, epoch) does not. The gradients
# agree to float rounding (two half-batch means averaged vs one mean); Adam's normalised update
# turns that into weight differences proportional to the lr, hence a modest lr here.
CFG = dict(dataset="digits", model="vit_digits", train_subset=256, batch_size=64, epochs=2, warmup_epochs=1, lr=5e-4,
           drop_path_rate=0.0, translate=0, threads=1, progress="off", precision="fp32", label_smoothing=0.1)


def flags(cfg: dict) -> list[str]:
    return [x for k, v in cfg.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def final(run) -> tuple[dict, list[float], list[dict]]:
    state = torch.load(run / "last" / STATE_NAME, weights_only=True)
    return load_file(run / "last" / "model.safetensors"), state["step_losses"].tolist(), state["history"]


def torchrun_train(cfg: dict) -> subprocess.CompletedProcess:
    """`vitkit train` under torchrun, two gloo processes of one thread each; it must succeed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vitkit", "train", *flags(cfg)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stdout + out.stderr
    # DDP's stride warning for the one-channel patch convolution is noise on every rank (distributed.py)
    assert "Grad strides do not match" not in out.stderr, out.stderr
    return out


def assert_same_run(a, b, tol=1e-5):
    (wa, la, ha), (wb, lb, hb) = a, b
    assert len(la) == len(lb) == 8
    assert max(abs(x - y) for x, y in zip(la, lb)) <= tol, (la, lb)
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= tol, f"final weights differ by {worst}"
    assert [r["top1"] for r in ha] == [r["top1"] for r in hb]  # the sharded evaluation counts the same images


def test_two_gloo_processes_match_one_process(tmp_path):
    """The ranks read their metrics every 3 steps (--log-every 3, a GPU's way), the one process every step."""
    train(resolve_config(None, dict(CFG, out=str(tmp_path / "one"))))
    out = torchrun_train(dict(CFG, log_every=3, out=str(tmp_path / "ddp")))
    assert "on 2 process(es)" in out.stdout and out.stdout.count("epoch   2/2") == 1  # only rank 0 prints
    assert_same_run(final(tmp_path / "one"), final(tmp_path / "ddp"))


def test_ddp_training_with_shifted_images_is_quiet(tmp_path):
    """With shifted images (translate) in bf16, the one-channel patch convolution's weight gradient comes
    back with strides DDP's bucket does not expect, along the size-1 axis alone: torchrun_train asserts
    that DDP's warning is not printed."""
    out = torchrun_train(dict(CFG, precision="bf16", translate=1, epochs=1, out=str(tmp_path / "bf16")))
    assert "bf16" in out.stdout


def test_fine_tuning_under_two_gloo_processes_matches_one_process(tmp_path):
    """--pretrained with an adapted first convolution, a new classifier and layer decay under torchrun:
    the two ranks' steps and final weights are the one process's."""
    from vitkit import create_model, save_pretrained

    torch.manual_seed(1)
    save_pretrained(create_model(CFG["model"], in_channels=3, num_classes=4), tmp_path / "rgb")
    ft = dict(CFG, pretrained=str(tmp_path / "rgb"), layer_decay=0.7)
    train(resolve_config(None, dict(ft, out=str(tmp_path / "one"))))
    out = torchrun_train(dict(ft, out=str(tmp_path / "ddp")))
    assert out.stdout.count("fine-tuning") == 2  # rank 0's two lines: what changed, and the run
    assert_same_run(final(tmp_path / "one"), final(tmp_path / "ddp"))


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    train(resolve_config(None, dict(CFG, out=str(tmp_path / "full"))))
    train(resolve_config(None, dict(CFG, accum_steps=4, out=str(tmp_path / "accum"))))
    assert_same_run(final(tmp_path / "full"), final(tmp_path / "accum"))


def test_a_streamed_folder_under_two_gloo_processes_matches_one_process_in_memory(tmp_path):
    """Each rank streams its own share of a folder of class folders (its held-out share the same on
    every rank) and prefetches its next micro-batch: the run of one process holding it in memory."""
    from PIL import Image

    from vitkit.data import load_digits

    digits = load_digits()
    root = tmp_path / "digits"
    for i in range(300):
        label = str(int(digits.train.labels[i]))
        (root / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(digits.train.images[i, 0].numpy(), mode="L").save(root / label / f"{i}.png")
    folder = dict(CFG, dataset=f"folder:{root}", model="vit_digits_gap")
    train(resolve_config(None, dict(folder, folder_loading="memory", out=str(tmp_path / "one"))))
    torchrun_train(dict(folder, folder_loading="stream", out=str(tmp_path / "ddp")))
    assert_same_run(final(tmp_path / "one"), final(tmp_path / "ddp"))


def test_distillation_under_two_gloo_processes_matches_one_process(tmp_path):
    """--teacher (soft, so the loss is smooth in the logits) under torchrun: each rank scores its own
    share with its own copy of the teacher; the steps and weights are the one process's."""
    from vitkit import create_model, save_pretrained

    torch.manual_seed(2)
    save_pretrained(create_model("vit_digits_gap", num_classes=10), tmp_path / "teacher")
    distil = dict(CFG, teacher=str(tmp_path / "teacher"), distill_type="soft", distill_tau=2.0, distill_alpha=0.5)
    train(resolve_config(None, dict(distil, out=str(tmp_path / "one"))))
    out = torchrun_train(dict(distil, out=str(tmp_path / "ddp")))
    assert out.stdout.count("distilling from") == 1  # rank 0 says it
    assert_same_run(final(tmp_path / "one"), final(tmp_path / "ddp"))


def test_a_resumed_two_process_run_with_random_augmentation_draws_what_the_uninterrupted_one_did(tmp_path):
    """Shifted images, flips and drop path draw from each rank's RNG, and a checkpoint holds rank 0's
    stream alone: the ranks reseed from (seed, step, rank) at every step, so a 2-process run stopped
    after epoch 1 and resumed by 2 processes ends exactly where the uninterrupted one does."""
    noisy = dict(CFG, translate=1, hflip=0.5, drop_path_rate=0.1)
    torchrun_train(dict(noisy, out=str(tmp_path / "straight")))
    stopped = torchrun_train(dict(noisy, out=str(tmp_path / "resumed"), stop_after_epoch=1))
    assert stopped.stderr.count("stopped after epoch 1") == 1  # said by rank 0 alone
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vitkit", "train", "--resume", str(tmp_path / "resumed"), "--stop-after-epoch", "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert_same_run(final(tmp_path / "straight"), final(tmp_path / "resumed"), tol=0.0)
