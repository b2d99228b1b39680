"""vitkit train: resume gives the weights of an uninterrupted run; signals, NaN and a second writer are handled.

Every run here is vit_digits on a slice of the real digits data, a few steps long.
"""

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vitkit import create_model, load_pretrained
from vitkit.cli import main
from vitkit.evaluate import evaluate_checkpoint
from vitkit.train import (
    STATE_NAME,
    Interrupted,
    NonFiniteLossError,
    RunDir,
    RunLockedError,
    Trainer,
    field_help,
    field_types,
    make_ema,
    non_finite_advice,
    resolve_config,
    resume,
    train,
)


def test_every_train_flag_says_what_it_does(capsys):
    """Each TrainConfig field's comment (beside it, or the lines above it) is its flag's --help."""
    helps = field_help()
    assert [name for name in field_types() if not helps.get(name)] == []
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--freeze-blocks INT, --freeze_blocks INT fine-tuning: keep the stem and the first N blocks" in out
    # a field whose comment says what its default means is not given argparse's default too
    assert "--name STR run name (default: DATASET-MODEL) --out STR run folder (default: runs/NAME) --overwrite" in out
    assert "(default: /usr/share/datasets/fashion-mnist) --skip-bad-images" in out


def tiny(out: Path, **overrides) -> dict:
    cfg = dict(dataset="digits", model="vit_digits", train_subset=256, batch_size=64, epochs=4, warmup_epochs=1,
               threads=1, progress="off", precision="fp32", out=str(out))
    cfg.update(overrides)
    return cfg


# Every source of randomness the recipe has: drop path, dropout, TrivialAugment, erasing, MixUp/CutMix, EMA.
FULL_RECIPE = dict(drop_path_rate=0.2, drop_rate=0.1, auto_augment="trivialaugment", random_erasing=0.5,
                   mixup_alpha=0.8, cutmix_alpha=1.0, ema=True, ema_decay=0.9, accum_steps=2, hflip=0.5)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "last" / "model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, f"resumed run differs from the uninterrupted one by {worst}"


def test_resume_after_stop_gives_the_uninterrupted_weights(tmp_path):
    small = dict(FULL_RECIPE, train_subset=128, batch_size=32)  # 4 steps per epoch
    full = train(resolve_config(None, tiny(tmp_path / "full", **small)))
    with pytest.raises(Interrupted, match="--resume"):
        train(resolve_config(None, tiny(tmp_path / "cut", stop_after_epoch=2, **small)))
    state = torch.load(tmp_path / "cut" / "last" / STATE_NAME, weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (2, 0, 8)
    resumed = resume(tmp_path / "cut", {"stop_after_epoch": 0})
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "cut"))
    s_full = torch.load(tmp_path / "full" / "last" / STATE_NAME, weights_only=True)
    s_cut = torch.load(tmp_path / "cut" / "last" / STATE_NAME, weights_only=True)
    for k, v in s_full["ema"].items():
        assert torch.equal(v, s_cut["ema"][k]), k
    assert [r["train_loss"] for r in full.history] == [r["train_loss"] for r in resumed.history]
    # and the run really changed the weights between epochs 2 and 4
    assert not torch.equal(weights(tmp_path / "full")["head.fc.weight"], state["ema"]["module.head.fc.weight"])


def test_fp16_follows_fp32_and_skips_the_steps_whose_gradients_overflow(tmp_path, monkeypatch):
    """--precision fp16 (autocast with dynamic loss scaling: GPUs without bf16), here on the CPU.
    At GradScaler's own start (2^16) nothing overflows on the digits and the losses follow an fp32
    run's. Started at a scale of 2^20, the first steps' fp16 gradients overflow: each of those
    steps is skipped (the optimizer's step count lags by as many) and halves the scale. An
    interrupted run then resumes, loss scale included, to the straight run's weights."""
    from functools import partial

    def state(run: str) -> dict:
        return torch.load(tmp_path / run / "last" / STATE_NAME, weights_only=True)

    cfg = dict(precision="fp16", train_subset=128, batch_size=32, epochs=3)  # 4 steps an epoch
    train(resolve_config(None, tiny(tmp_path / "fp16", **cfg)))
    train(resolve_config(None, tiny(tmp_path / "fp32", **dict(cfg, precision="fp32"))))
    fp16, fp32 = state("fp16"), state("fp32")
    assert (fp16["step_losses"] - fp32["step_losses"]).abs().max() < 2e-2
    assert fp16["grad_scaler"]["scale"] == 2.0**16 and fp32["grad_scaler"] == {}

    monkeypatch.setattr(torch.amp, "GradScaler", partial(torch.amp.GradScaler, init_scale=2.0**20))
    train(resolve_config(None, tiny(tmp_path / "straight", **cfg)))
    straight = state("straight")
    skipped = round(math.log2(2.0**20 / straight["grad_scaler"]["scale"]))
    steps = {int(p["step"]) for p in straight["optimizer"]["state"].values()}
    assert 1 <= skipped < straight["global_step"] == 12 and steps == {12 - skipped}
    with pytest.raises(Interrupted):
        train(resolve_config(None, tiny(tmp_path / "cut", stop_after_epoch=1, **cfg)))
    assert state("cut")["grad_scaler"]["scale"] < 2.0**20  # the backed-off scale is what resumes
    resume(tmp_path / "cut", {"stop_after_epoch": 0})
    assert state("cut")["grad_scaler"] == straight["grad_scaler"]
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "cut"))


def test_train_subset_leaves_the_callers_dataset_whole(tmp_path):
    from vitkit.data import load_digits

    digits = load_digits()
    train(resolve_config(None, tiny(tmp_path / "run", epochs=1, train_subset=64)), data=digits)
    assert len(digits.train) == 1437  # the next run on the same Dataset sees all of it


def test_run_folder_contents(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *flags(tiny(run, epochs=2))]) == 0
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert list(rows[0]) == ["epoch", "step", "train_loss", "val_loss", "top1", "top5", "lr", "images_per_s"]
    assert all(float(r["images_per_s"]) > 0 and 0 <= float(r["top1"]) <= 100 for r in rows)
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert resolve_config(str(run / "config.yaml")).epochs == 2
    model = load_pretrained(run / "best")
    assert model.class_names == [str(d) for d in range(10)] and model.preprocess["mean"] == [0.5]
    assert load_pretrained(run / "last").cfg.num_classes == 10
    # a second start in the same folder is refused; --overwrite starts afresh
    assert main(["train", *flags(tiny(run, epochs=1))]) == 2
    assert main(["train", *flags(tiny(run, epochs=1)), "--overwrite"]) == 0
    assert len(list(csv.DictReader(open(run / "metrics.csv")))) == 1


def test_overwrite_keeps_the_old_run_when_setup_fails(tmp_path, capsys):
    """--overwrite clears the old run only once the new one's data and flags have been checked."""
    run = tmp_path / "run"
    assert main(["train", *flags(tiny(run, epochs=1, train_subset=64))]) == 0
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert {Path("metrics.csv"), Path("curves.png"), Path("config.yaml")} <= set(before)
    assert any(p.parts[0] == "best" for p in before) and any(p.parts[0] == "last" for p in before)
    typo = tiny(run, epochs=1, dataset=f"folder:{tmp_path / 'typo'}")
    assert main(["train", *flags(typo), "--overwrite"]) == 2
    assert main(["train", *flags(tiny(run, epochs=1, train_subset=64, batch_size=128)), "--overwrite"]) == 2
    assert "--batch-size 128: larger than the 64 training images" in capsys.readouterr().err
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before  # every file of the old run, byte for byte
    assert main(["train", *flags(tiny(run, epochs=2, train_subset=64)), "--overwrite"]) == 0
    assert [r["epoch"] for r in csv.DictReader(open(run / "metrics.csv"))] == ["1", "2"]

def flags(cfg: dict) -> list[str]:
    return [x for k, v in cfg.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def test_config_file_then_flags_typed(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 7\nlr: 1\nmixup-alpha: 0.2\nema: true\n")
    cfg = resolve_config(str(f), {"epochs": "3", "ema": "false"})
    assert (cfg.epochs, cfg.lr, cfg.mixup_alpha, cfg.ema) == (3, 1.0, 0.2, False)
    with pytest.raises(ValueError, match="unknown training option 'epoch'.*did you mean epochs"):
        resolve_config(None, {"epoch": "3"})
    with pytest.raises(ValueError, match="--epochs: epochs expects int, got 'many'"):
        resolve_config(None, {"epochs": "many"})
    f.write_text("epochs: 2.5\n")
    with pytest.raises(ValueError, match="c.yaml: epochs expects int"):
        resolve_config(str(f))
    with pytest.raises(ValueError, match="--precision: expected one of"):
        resolve_config(None, {"precision": "fp8"})
    assert resolve_config(None, {"compile": "true", "compile_mode": "reduce-overhead"}).compile_mode == "reduce-overhead"
    with pytest.raises(ValueError, match="--compile-mode reduce-overhead: only used when compiling; add --compile true"):
        resolve_config(None, {"compile_mode": "reduce-overhead"})
    with pytest.raises(ValueError, match="--compile-mode: expected one of"):
        resolve_config(None, {"compile": "true", "compile_mode": "fast"})
    with pytest.raises(SystemExit):  # no prefix guessing on the command line: --epoch is not --epochs
        main(["train", "--epoch", "3", "--out", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("argv, usage, hint", [
    (["train", "--epoch", "3"], "usage: vitkit train", "unknown option --epoch; did you mean --epochs or"),
    (["train", "--epochs", "3", "--data_dri=x"], "usage: vitkit train", "unknown option --data_dri; did you mean "
                                                                          "--data-dir"),
    (["train", "--epoch", "3", "--lrr", "1"], "usage: vitkit train", "unknown options --epoch (did you mean "
                                                                       "--epochs or --warmup-epochs?), --lrr (did you mean --lr"),
    (["predict", "run", "a.png", "--topkk", "2"], "usage: vitkit predict", "unknown option --topkk; did you mean "
                                                                            "--topk?"),
    (["eval", "run", "--jsn"], "usage: vitkit eval", "unknown option --jsn; did you mean --json?"),
    (["models", "vit*", "extra"], "usage: vitkit models", "unrecognized arguments: extra"),
], ids=["train", "train-underscore", "train-two", "predict", "eval", "a-stray-argument"])
def test_a_misspelt_flag_gets_the_subcommands_usage_and_the_closest_flag(tmp_path, capsys, argv, usage, hint):
    """As a misspelt key in a config file is named with the closest option, so is a misspelt flag, under
    the subcommand's own usage; still a usage error (exit status 2), and nothing runs."""
    with pytest.raises(SystemExit) as stop:
        main(argv + (["--out", str(tmp_path / "never")] if argv[0] == "train" else []))
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert err.startswith(usage) and f"vitkit {argv[0]}: error: {hint}" in err, err
    assert not (tmp_path / "never").exists()


def test_a_run_from_before_the_erasing_mode_resumes_erasing_as_it_began(tmp_path):
    """A config.yaml without random_erasing_mode was written when erasing filled boxes with zeros:
    resumed, the run goes on with zeros ("const"), to the weights of a straight "const" run."""
    small = dict(FULL_RECIPE, train_subset=128, batch_size=32, epochs=2, random_erasing=1.0,
                 random_erasing_mode="const")
    train(resolve_config(None, tiny(tmp_path / "full", **small)))
    with pytest.raises(Interrupted):
        train(resolve_config(None, tiny(tmp_path / "cut", stop_after_epoch=1, **small)))
    config = tmp_path / "cut" / "config.yaml"
    config.write_text("".join(line for line in config.read_text().splitlines(keepends=True)
                              if not line.startswith("random_erasing_mode:")))
    resume(tmp_path / "cut", {"stop_after_epoch": 0})
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "cut"))
    assert resolve_config(None, {}).random_erasing_mode == "pixel"  # a new run erases as timm does


def test_resume_refuses_to_change_the_recipe(tmp_path):
    with pytest.raises(Interrupted):
        train(resolve_config(None, tiny(tmp_path / "r", epochs=2, stop_after_epoch=1)))
    with pytest.raises(ValueError, match=r"cannot change \['lr'\]"):
        resume(tmp_path / "r", {"lr": "0.5"})


def test_resume_with_other_epochs_refuses_fewer_than_done_and_says_how_the_lr_moves(tmp_path, capsys):
    """--epochs below the epochs done is refused, leaving config.yaml, last/ and metrics.csv as they were;
    extending a finished run re-lays the cosine over the new length, from the step reached, and says so:
    its epochs 3 and 4 get the lr of a straight 4-epoch run's."""
    run, straight = tmp_path / "run", tmp_path / "straight"
    train(resolve_config(None, tiny(run, epochs=2)))
    train(resolve_config(None, tiny(straight, epochs=4)))
    before = {name: (run / name).read_bytes() for name in ("config.yaml", "metrics.csv", "last/model.safetensors")}
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "1"]) == 2
    assert "--epochs 1: " in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"--epochs 1: .*run has already trained 2 epoch\(s\) of its 2; pass --epochs 2"):
        resume(run, {"epochs": 1})
    assert {name: (run / name).read_bytes() for name in before} == before
    resume(run, {"epochs": 4})
    err = capsys.readouterr().err
    rows = {name: list(csv.DictReader(open(r / "metrics.csv"))) for name, r in (("run", run), ("straight", straight))}
    was, now = (float(x) for x in re.search(r"--epochs 4 \(was 2\).* the lr goes from (\S+) to (\S+)", err).groups())
    assert was == pytest.approx(float(rows["run"][1]["lr"]), rel=1e-2) == 1e-5  # where the 2-epoch cosine ended
    assert now == pytest.approx(float(rows["straight"][1]["lr"]), rel=1e-2) and now > 100 * was
    assert [r["lr"] for r in rows["run"][2:]] == [r["lr"] for r in rows["straight"][2:]]
    assert resolve_config(str(run / "config.yaml")).epochs == 4 and len(rows["run"]) == 4


@pytest.mark.parametrize("log_every", [0, 3], ids=["read-every-step", "read-every-3-steps"])
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, log_every):
    """Read every step (a CPU's default), the NaN step stops before its update; read every 3 steps (a
    GPU's way, --log-every), the first NaN step is still the one named, and no checkpoint holds it."""
    run = tmp_path / "run"
    original = Trainer.loss_fn

    def poisoned(self, logits, targets):
        loss = original(self, logits, targets)
        return loss * float("nan") if self.epoch >= 1 else loss  # a NaN from the second epoch on

    monkeypatch.setattr(Trainer, "loss_fn", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at epoch 2, step 5.*last good checkpoint"):
        train(resolve_config(None, tiny(run, epochs=3, log_every=log_every)))
    state = torch.load(run / "last" / STATE_NAME, weights_only=True)
    assert state["epoch"] == 1
    good = weights(run)
    assert all(torch.isfinite(v).all() for v in good.values())
    assert len(list(csv.DictReader(open(run / "metrics.csv")))) == 1
    # and the run can go on from it (once the cause is fixed)
    monkeypatch.setattr(Trainer, "loss_fn", original)
    assert resume(run).history[-1]["epoch"] == 3


def test_huge_lr_is_reported_from_the_cli(tmp_path, capsys):
    code = main(["train", *flags(tiny(tmp_path / "run", epochs=1, lr=1e30, warmup_epochs=0, clip_grad=0))])
    err = capsys.readouterr().err
    assert code == 2 and "loss became nan" in err and "Try a lower --lr (now 1e+30)" in err
    # only what would change something: clipping is off, so turn it on; the run is already fp32
    assert "--clip-grad 1 (now off)" in err and "--precision" not in err, err
    assert not (tmp_path / "run" / "last").exists()


def test_non_finite_advice_names_only_flags_that_would_change_something():
    assert non_finite_advice(3e-3, 1.0, "bf16") == \
        "Try a lower --lr (now 0.003), a lower --clip-grad (now 1), or --precision fp32 (now bf16)"
    assert non_finite_advice(3e-3, 0.5, "fp32") == "Try a lower --lr (now 0.003) or a lower --clip-grad (now 0.5)"
    assert non_finite_advice(1e30, 0.0, "fp16") == \
        "Try a lower --lr (now 1e+30), --clip-grad 1 (now off), or --precision fp32 (now fp16)"


def test_two_runs_on_one_folder_are_refused(tmp_path, capsys):
    holder = RunDir(tmp_path / "run")
    holder.lock()
    try:
        with pytest.raises(RunLockedError, match=f"in use by another vitkit train \\(pid {os.getpid()}\\)"):
            RunDir(tmp_path / "run").lock()
        assert main(["train", *flags(tiny(tmp_path / "run", epochs=1))]) == 2
        assert "in use by another vitkit train" in capsys.readouterr().err
    finally:
        holder.unlock()
    RunDir(tmp_path / "run").lock()  # free again once the holder is gone


@pytest.mark.parametrize("log_every", [0, 3], ids=["read-every-step", "read-every-3-steps"])
def test_sigterm_mid_epoch_checkpoints_and_resumes_to_the_same_weights(tmp_path, log_every):
    """With --log-every 3 the metrics of up to 3 steps are still on the device when the signal comes:
    they are read before the checkpoint, and the run ends as the one that read every step."""
    run = tmp_path / "run"
    cfg = tiny(run, train_subset=512, batch_size=32, epochs=2, drop_path_rate=0.2, translate=1, log_every=log_every)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "vitkit", "train", *flags(dict(cfg, progress="on"))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    seen, deadline = b"", time.time() + 120
    while b" step " not in seen and time.time() < deadline:
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            break
        seen += chunk
    assert b" step " in seen, seen + proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert b"interrupted by SIGTERM" in err and f"--resume {run}".encode() in err
    state = torch.load(run / "last" / STATE_NAME, weights_only=True)
    assert 1 <= state["global_step"] < 32  # stopped before the end (normally a few steps in: mid-epoch)
    assert state["global_step"] == 16 * state["epoch"] + state["step_in_epoch"]
    load_pretrained(run / "last")  # a complete, loadable checkpoint
    assert not list(run.glob(".last.tmp-*"))  # no half-written temporary left

    assert main(["train", "--resume", str(run)]) == 0
    reference = train(resolve_config(None, dict(cfg, out=str(tmp_path / "ref"), log_every=0)))
    assert reference.history[-1]["epoch"] == 2
    assert_same_weights(weights(tmp_path / "ref"), weights(run))
    ours, theirs = (torch.load(r / "last" / STATE_NAME, weights_only=True) for r in (run, tmp_path / "ref"))
    assert torch.equal(ours["step_losses"], theirs["step_losses"]) and len(ours["step_losses"]) == 32
    assert [h["train_loss"] for h in ours["history"]] == [h["train_loss"] for h in theirs["history"]]


def test_predict_and_eval_cli_on_a_trained_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *flags(tiny(run, epochs=1))]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["images"] == 360 and r["checkpoint"] == str(run / "best")
    assert set(r["per_class"]) == {str(d) for d in range(10)}
    confusion = torch.tensor(r["confusion"])
    assert confusion.sum() == 360
    assert abs(100 * confusion.diagonal().sum().item() / 360 - r["top1"]) < 1e-9
    assert r["top1"] <= r["top5"] <= 100
    assert Path(r["confusion_png"]).read_bytes()[:4] == b"\x89PNG"
    # eval in the run's precision gives the figures its log gave for best/ (fp32 here; bf16 below)
    logged = list(csv.DictReader((run / "metrics.csv").open()))[-1]
    assert r["top1"] == pytest.approx(float(logged["top1"]), abs=1e-3)
    assert r["loss"] == pytest.approx(float(logged["val_loss"]), abs=1e-5)
    bf16_run = tmp_path / "bf16"
    assert main(["train", *flags(tiny(bf16_run, epochs=1, precision="bf16"))]) == 0
    capsys.readouterr()
    assert main(["eval", str(bf16_run), "--json", "--precision", "bf16"]) == 0
    rb, logged = json.loads(capsys.readouterr().out), list(csv.DictReader((bf16_run / "metrics.csv").open()))[-1]
    assert rb["top1"] == pytest.approx(float(logged["top1"]), abs=1e-3)
    assert rb["loss"] == pytest.approx(float(logged["val_loss"]), abs=1e-5)

    # int8: every Linear quantised (a different computation: the loss moves), accuracy barely
    assert main(["eval", str(run), "--json", "--precision", "int8", "--confusion", str(tmp_path / "c8.png")]) == 0
    r8 = json.loads(capsys.readouterr().out)
    assert r8["loss"] != r["loss"] and abs(r8["loss"] - r["loss"]) < 0.05 * r["loss"]
    assert abs(r8["top1"] - r["top1"]) <= 2.0
    with pytest.raises(ValueError, match="int8.*CPU only"):
        evaluate_checkpoint(run, device="cuda", precision="int8")


def test_folder_dataset_cli_reports_then_skips_a_corrupt_image(tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "shapes"
    for split, n in (("train", 8), ("val", 4)):
        for c, (color, size) in {"dark": (30, (10, 14)), "light": (220, (9, 9))}.items():
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", size, (color, color + i, color)).save(root / split / c / f"{i}.png")
    bad = root / "train" / "light" / "zz.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    args = ["train", "--dataset", f"folder:{root}", "--model", "vit_digits", "--epochs", "2", "--batch-size", "4",
            "--warmup-epochs", "0", "--threads", "1", "--progress", "off", "--out", str(tmp_path / "run")]
    assert main(args) == 2
    assert f"{bad}: corrupt or truncated image" in capsys.readouterr().err
    assert main([*args, "--skip-bad-images"]) == 0
    assert "skipped 1 unreadable image" in capsys.readouterr().err
    model = load_pretrained(tmp_path / "run" / "best")
    assert model.class_names == ["dark", "light"] and model.preprocess["img_size"] == [8, 8]
    assert main(["eval", str(tmp_path / "run"), "--json"]) == 0  # reads val/ only: the bad train image is moot
    assert json.loads(capsys.readouterr().out)["images"] == 8


def test_a_variant_timm_names_trains_on_image_files_normalised_as_timm_trains_it(tmp_path):
    """From scratch on a folder, a variant timm names reads its images with the mean and std timm's training
    resolves for it (its pretrained_cfg: AugReg's 0.5 for ViT-Ti/16), not ImageNet's; a resumed run goes on
    as it began, as its last/ checkpoint records, whatever the variant's statistics are now."""
    from PIL import Image

    root = tmp_path / "shapes"
    for split, n in (("train", 4), ("val", 2)):
        for c, color in {"dark": 30, "light": 220}.items():
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (20, 18), (color, color + i, color)).save(root / split / c / f"{i}.png")
    run = tmp_path / "run"
    with pytest.raises(Interrupted):
        train(resolve_config(None, tiny(run, dataset=f"folder:{root}", model="vit_tiny_patch16_224", img_size=16,
                                        train_subset=0, batch_size=4, epochs=2, warmup_epochs=0, stop_after_epoch=1)))
    assert load_pretrained(run / "last").preprocess["mean"] == [0.5, 0.5, 0.5]
    config = json.loads((run / "last" / "config.json").read_text())  # as a run begun before vitkit knew them
    config["preprocess"].update(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    (run / "last" / "config.json").write_text(json.dumps(config))
    resume(run, {"stop_after_epoch": 0})
    assert load_pretrained(run / "last").preprocess["std"] == [0.229, 0.224, 0.225]


def test_train_and_eval_on_a_csv_table(tmp_path, capsys):
    """`--dataset csv:FILE` end to end: a table of real photos with a split column trains, names the
    run's classes, and `vitkit eval` reads the table's val rows back, by default and when named."""
    from conftest import write_photo_folder

    root = write_photo_folder(tmp_path / "photos", {"train": 6, "val": 2})
    rows = [f"{p.relative_to(tmp_path)},{p.parent.name},{split}" for split in ("train", "val")
            for p in sorted((root / split).rglob("*.png"))]
    (tmp_path / "labels.csv").write_text("\n".join(["image,label,split", *rows]) + "\n")
    args = ["train", "--dataset", f"csv:{tmp_path / 'labels.csv'}", "--model", "vit_digits", "--epochs", "1",
            "--batch-size", "6", "--warmup-epochs", "0", "--threads", "1", "--progress", "off",
            "--out", str(tmp_path / "run")]
    assert main(args) == 0
    assert load_pretrained(tmp_path / "run" / "best").class_names == ["astronaut", "cat", "coffee"]
    capsys.readouterr()
    for extra in ([], ["--dataset", f"csv:{tmp_path / 'labels.csv'}"]):
        assert main(["eval", str(tmp_path / "run"), "--json", *extra]) == 0
        assert json.loads(capsys.readouterr().out)["images"] == 6


def test_compiled_training_follows_the_eager_run(tmp_path):
    """--compile true runs every step through torch.compile: the weights of the eager run, to
    float rounding, and checkpoints without the compiler's ``_orig_mod.`` prefix."""
    small = dict(train_subset=128, batch_size=32, epochs=1, ema=False)  # 4 steps
    train(resolve_config(None, tiny(tmp_path / "eager", **small)))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    train(resolve_config(None, tiny(tmp_path / "compiled", compile=True, **small)))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the steps really were compiled
    eager, compiled = weights(tmp_path / "eager"), weights(tmp_path / "compiled")
    assert eager.keys() == compiled.keys()
    worst = max((eager[k] - compiled[k]).abs().max().item() for k in eager)
    assert worst <= 1e-4, f"compiled training drifted from eager by {worst}"


def test_ema_follows_the_warm_up_formula_step_by_step():
    """EMA = d * EMA + (1 - d) * weights with d = min(decay, (1 + n) / (10 + n)), n updates so far;
    the first update copies. Written out here per tensor, against make_ema's one foreach lerp."""
    torch.manual_seed(0)
    model = create_model("vit_digits", num_classes=10)
    ema = make_ema(model, 0.95)
    expected = None
    for n in range(40):  # d rises from 2/11 to the 0.95 cap
        with torch.no_grad():
            for p in model.parameters():
                if n == 20:  # as model.to() does: the Parameter stays, its data is swapped for a copy
                    p.data = p.data.clone()
                p.add_(torch.randn_like(p))
        ema.update_parameters(model)
        d = min(0.95, (1 + n) / (10 + n))
        current = {k: v.detach().clone() for k, v in model.state_dict().items()}
        expected = current if n == 0 else {k: d * expected[k] + (1 - d) * v for k, v in current.items()}
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-5)
    assert int(ema.n_averaged) == 40


def test_ema_update_reads_nothing_back_from_the_device():
    """The EMA's update count lives on the host: after the first update (which reads the buffer once),
    an update runs no op that copies a tensor's value to the host (``aten._local_scalar_dense``, what
    ``int()``, ``float()`` and ``bool()`` of a tensor call), the per-step sync torch's AveragedModel
    makes on a GPU. A loaded state dict is read again, so a resumed EMA continues its warm-up."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostReads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    model = create_model("vit_digits", num_classes=10)
    ema = make_ema(model, 0.99)
    ema.update_parameters(model)
    with HostReads() as reads:
        for _ in range(3):
            ema.update_parameters(model)
    assert reads.count == 0
    assert int(ema.n_averaged) == 4
    # plain AveragedModel reads its count back on every update: the probe can see a read
    plain = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.99))
    plain.update_parameters(model)
    with HostReads() as reads:
        plain.update_parameters(model)
    assert reads.count > 0
    # a resumed EMA takes its count (and so its warm-up decay) from the state dict
    other = make_ema(create_model("vit_digits", num_classes=10), 0.99)
    other.load_state_dict(ema.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = ema.module.head.fc.bias.clone()
    ema.update_parameters(model)
    other.update_parameters(model)
    torch.testing.assert_close(other.module.state_dict(), ema.module.state_dict(), rtol=0, atol=0)
    d = min(0.99, 5 / 14)
    torch.testing.assert_close(ema.module.head.fc.bias, d * before + (1 - d) * model.head.fc.bias)


def digit_folder(root: Path, n_train: int, n_val: int) -> Path:
    """The first real digits as PNG files in root/{train,val}/CLASS/."""
    from PIL import Image

    from vitkit.data import load_digits

    digits = load_digits()
    for split, n in (("train", n_train), ("val", n_val)):
        part = getattr(digits, split)
        for i in range(n):
            label = int(part.labels[i])
            (root / split / str(label)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(part.images[i, 0].numpy(), mode="L").save(root / split / str(label) / f"{i}.png")
    return root


def test_train_subset_is_a_seeded_draw_from_every_class(tmp_path):
    """--train-subset N draws N images with the run's seed, not the first N: a folder lists its files class
    by class, so those were a class or two. The same seed draws the same files (resume, every rank), a
    streamed folder the same files as one held in memory, each with its own folder's label."""
    root = digit_folder(tmp_path / "digits", 200, 30)
    n = 40

    def subset(name, **kw):
        trainer = Trainer(resolve_config(None, tiny(tmp_path / name, dataset=f"folder:{root}", model="vit_digits_gap",
                                                    train_subset=n, batch_size=16, **kw)))
        trainer.run.unlock()
        return trainer.data.train

    held, streamed, again, other = (subset("a"), subset("b", folder_loading="stream"), subset("c"),
                                    subset("d", seed=1))
    assert len(held) == len(streamed) == n
    classes = set(held.labels.tolist())
    assert len(classes) >= 7  # the first 40 of 180 files, class by class, are the digits 0 to 2 alone
    assert [int(p.parent.name) for p in streamed.images.paths] == streamed.labels.tolist()  # a folder's own label
    assert torch.equal(held.images, streamed.images[torch.arange(n)]) and torch.equal(held.labels, streamed.labels)
    assert torch.equal(again.images, held.images) and torch.equal(again.labels, held.labels)  # seed 0 again
    assert not torch.equal(other.images, held.images)  # --seed 1


def test_a_streamed_folder_trains_to_the_weights_of_one_held_in_memory(tmp_path, capsys):
    """--folder-loading stream decodes each batch from the files (the next one in the background): the
    same batches, pixels and weights as the folder decoded once, with gradient accumulation, and
    `vitkit eval` of the streamed run scores what its training did."""
    root = digit_folder(tmp_path / "digits", 96, 30)
    runs = {}
    for loading in ("memory", "stream"):
        trainer = Trainer(resolve_config(None, tiny(tmp_path / loading, dataset=f"folder:{root}", model="vit_digits_gap",
                                                    folder_loading=loading, train_subset=0, batch_size=16,
                                                    accum_steps=2, epochs=2, ema=False, loader_threads=3)))
        if loading == "stream":  # --loader-threads sets both splits' decoder pools
            assert trainer.data.train.images.threads == trainer.data.val.images.threads == 3
        runs[loading] = (trainer.fit(), weights(tmp_path / loading))
    (held, held_w), (streamed, streamed_w) = runs["memory"], runs["stream"]
    assert held_w.keys() == streamed_w.keys() and all(torch.equal(held_w[k], streamed_w[k]) for k in held_w)
    assert [r["val_loss"] for r in held.history] == [r["val_loss"] for r in streamed.history]
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "stream"), "--json", "--folder-loading", "stream", "--batch-size", "8"]) == 0
    scored = json.loads(capsys.readouterr().out)
    best = next(r for r in streamed.history if r["top1"] == streamed.best_top1)
    assert scored["images"] == 30 and scored["loss"] == pytest.approx(best["val_loss"], abs=2e-6)
    # a run held in memory, stopped after epoch 1, resumes streamed (an option a resume may change)
    with pytest.raises(Interrupted):
        train(resolve_config(None, tiny(tmp_path / "cut", dataset=f"folder:{root}", model="vit_digits_gap",
                                        folder_loading="memory", train_subset=0, batch_size=16, accum_steps=2,
                                        epochs=2, ema=False, stop_after_epoch=1)))
    resume(tmp_path / "cut", {"stop_after_epoch": 0, "folder_loading": "stream"})
    cut_w = weights(tmp_path / "cut")
    assert all(torch.equal(held_w[k], cut_w[k]) for k in held_w)


def test_a_folder_of_class_folders_trains_and_evaluates_on_the_share_it_held_out(tmp_path, capsys):
    from PIL import Image

    from vitkit.data import load_digits

    digits = load_digits()
    root = tmp_path / "digits"  # digits/CLASS/*.png: no train/ or val/
    for i in range(120):
        (root / str(int(digits.train.labels[i]))).mkdir(parents=True, exist_ok=True)
        Image.fromarray(digits.train.images[i, 0].numpy(), mode="L").save(root / str(int(digits.train.labels[i])) / f"{i}.png")
    result = train(resolve_config(None, tiny(tmp_path / "run", dataset=f"folder:{root}", model="vit_digits_gap",
                                             train_subset=0, batch_size=16, epochs=2, val_fraction=0.2, ema=False)))
    held_out = int(capsys.readouterr().err.split(" of its 120 images")[0].rsplit(" ", 1)[1])
    assert 20 <= held_out <= 28  # 20% of each class, rounded per class
    assert main(["eval", str(tmp_path / "run"), "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    best = next(r for r in result.history if r["top1"] == result.best_top1)
    assert scored["images"] == held_out and scored["loss"] == pytest.approx(best["val_loss"], abs=2e-6)


def test_gradients_reach_the_optimizer_clipped_to_clip_grad(tmp_path):
    """--clip-grad C: the global gradient norm every optimizer step sees is at most C (and, unclipped,
    it is not: the bound is the clipping's doing)."""
    norms = {}
    for clip in (0.05, 0.0):
        trainer = Trainer(resolve_config(None, tiny(tmp_path / f"clip{clip}", epochs=1, clip_grad=clip, ema=False)))
        seen, model = norms.setdefault(clip, []), trainer.model
        trainer.optimizer.register_step_pre_hook(lambda *_, seen=seen, model=model: seen.append(
            torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()))
        trainer.fit()
    assert len(norms[0.05]) == 4 and max(norms[0.05]) <= 0.05 * (1 + 1e-4)
    assert min(norms[0.0]) > 0.05


def test_streamed_random_resized_crops_resume_to_the_straight_run(tmp_path, monkeypatch):
    """A streamed folder with --crop-scale cuts its crops from the files, boxes drawn per micro-batch
    from (seed, epoch, batch), also for the prefetch: a stopped run resumes to the straight run's
    weights, and a run held in memory (crops of the shrunk images, from the global RNG) differs."""
    root = digit_folder(tmp_path / "digits", 96, 20)
    base = tiny(tmp_path / "full", dataset=f"folder:{root}", model="vit_digits_gap", folder_loading="stream",
                train_subset=0, batch_size=16, epochs=2, ema=False, crop_scale=0.3)
    from vitkit.data import FileImages

    loads, load = [], FileImages.load
    monkeypatch.setattr(FileImages, "load", lambda self, idx, boxes=None: loads.append(boxes) or load(self, idx, boxes))
    train(resolve_config(None, base))
    monkeypatch.undo()
    crops = [b for b in loads if b is not None]
    assert len(crops) == 2 * (96 // 16) and all(b.shape == (16, 4) for b in crops)  # every training batch
    assert all((b[:, 2:] <= 8).all() and (b[:, 2:] >= 1).all() for b in crops)  # boxes in the 8x8 files
    with pytest.raises(Interrupted):
        train(resolve_config(None, dict(base, out=str(tmp_path / "cut"), stop_after_epoch=1)))
    resume(tmp_path / "cut", {"stop_after_epoch": 0})
    full, cut = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert all(torch.equal(full[k], cut[k]) for k in full)
    train(resolve_config(None, dict(base, out=str(tmp_path / "held"), folder_loading="memory")))
    held = weights(tmp_path / "held")
    assert not torch.equal(full["head.fc.weight"], held["head.fc.weight"])


def test_a_streamed_folder_decodes_each_image_once_per_epoch_under_accumulation(tmp_path, monkeypatch):
    """Eight micro-batches a step, this step's and the next prefetched: none is dropped before use and
    decoded again (96 training and 30 validation files, one epoch: 126 decodes)."""
    import vitkit.data

    root = digit_folder(tmp_path / "digits", 96, 30)
    calls, decode = [], vitkit.data._decode
    monkeypatch.setattr(vitkit.data, "_decode", lambda *a, **k: calls.append(a[0]) or decode(*a, **k))
    train(resolve_config(None, tiny(tmp_path / "run", dataset=f"folder:{root}", model="vit_digits_gap",
                                    folder_loading="stream", train_subset=0, batch_size=16, accum_steps=8,
                                    epochs=1, ema=False)))
    assert len(calls) == 126 and len(set(calls)) == 126
