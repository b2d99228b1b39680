"""Fine-tuning: `vitkit train --pretrained CKPT` starts from a checkpoint's weights, with timm's rules for
new channels and layer-wise lr decay, and resumes without the pretrained files.

Oracles: timm's ``adapt_input_conv``, ``param_groups_layer_decay`` and ``resample_abs_pos_embed``, and
a timm model built with random weights; the data are real photos (scikit-image) and the real digits.
"""

import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed
from timm.models._manipulate import adapt_input_conv
from timm.optim import param_groups_layer_decay

import vitkit.convert as vc
from conftest import write_photo_folder
from vitkit import create_model, load_pretrained, save_pretrained
from vitkit.checkpoint import default_preprocess
from vitkit.cli import main
from vitkit.convert.timm import KEYS
from vitkit.layers import adapt_input_channels
from vitkit.train import Interrupted, Trainer, param_groups, resolve_config, resume, train


def run_cfg(out: Path, **overrides) -> dict:
    cfg = dict(dataset="digits", train_subset=128, batch_size=32, epochs=2, warmup_epochs=1, threads=1,
               progress="off", precision="fp32", ema=False, out=str(out))
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Three real photos as a folder dataset: random square crops of each, 8 to train and 4 to validate."""
    return write_photo_folder(tmp_path_factory.mktemp("photos"), {"train": 8, "val": 4})


@pytest.mark.parametrize("channels", [1, 2, 4, 3])
def test_adapt_input_channels_follows_timm(channels):
    weight = torch.randn(16, 3, 4, 4)
    assert torch.equal(adapt_input_channels(weight, channels), adapt_input_conv(channels, weight))


def test_adapted_models_see_grey_as_the_original_saw_equal_channels(tmp_path):
    rgb = create_model("vit_digits_gap", in_channels=3).eval()
    save_pretrained(rgb, tmp_path / "rgb")
    grey = load_pretrained(tmp_path / "rgb", in_channels=1).eval()
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(grey(x), rgb(x.expand(-1, 3, -1, -1)), rtol=1e-5, atol=1e-5)
    assert grey.preprocess["mean"] == [pytest.approx(sum(default_preprocess(rgb.cfg)["mean"]) / 3)]
    save_pretrained(grey, tmp_path / "grey")  # and back: one channel copied to three, scaled by 1/3
    back = load_pretrained(tmp_path / "grey", in_channels=3).eval()
    torch.testing.assert_close(back(x.expand(-1, 3, -1, -1)), grey(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="in_channels: cannot adapt a first convolution of 4 input channels to 2"):
        adapt_input_channels(torch.randn(8, 4, 2, 2), 2)


@pytest.mark.parametrize("variant", ["class-token", "mean-pool"])
def test_layer_decay_groups_match_timm(variant):
    """Each parameter's lr scale and weight decay, against timm's BEiT groups on the same architecture."""
    extra = {} if variant == "class-token" else dict(class_token=False, global_pool="avg", fc_norm=True)
    peer = timm.create_model("vit_tiny_patch16_224", depth=3, num_classes=5, img_size=32, **extra)
    ours = create_model("vit_tiny_patch16_224", depth=3, num_classes=5, img_size=32,
                        **({} if variant == "class-token" else dict(class_token=False, pool="mean",
                                                                   final_norm="pooled")))
    expected = {}
    for group in param_groups_layer_decay(peer, 0.05, peer.no_weight_decay(), layer_decay=0.65):
        names = {id(p): n for n, p in peer.named_parameters()}
        for p in group["params"]:
            expected[names[id(p)]] = (group["lr_scale"], group["weight_decay"])
    names = {id(p): n for n, p in ours.named_parameters()}
    got = {}
    for group in param_groups(ours, 0.05, layer_decay=0.65):
        for p in group["params"]:
            foreign = KEYS.foreign_names(names[id(p)])[1]
            got.update({f: (pytest.approx(group["lr_scale"]), group["weight_decay"]) for f in foreign})
    assert got == expected
    assert len({scale for scale, _ in expected.values()}) == 5  # stem, 3 blocks, head: the decay is real
    # without layer decay: the two groups of every run so far, decay first
    plain = param_groups(ours, 0.05)
    assert [g["weight_decay"] for g in plain] == [0.05, 0.0] and all("lr_scale" not in g for g in plain)


def test_fine_tuning_a_converted_timm_model_starts_from_its_weights(tmp_path, photos, capsys):
    """lr 0: the run's weights stay the pretrained ones, so its features are timm's at the new size."""
    peer = timm.create_model("vit_tiny_patch16_224", depth=2, num_classes=1000).eval()
    save_file(peer.state_dict(), tmp_path / "timm.safetensors")
    assert main(["convert", str(tmp_path / "timm.safetensors"), str(tmp_path / "tiny"), "--from", "timm",
                 "--model", "vit_tiny_patch16_224"]) == 0
    cfg = run_cfg(tmp_path / "run", dataset=f"folder:{photos}", pretrained=str(tmp_path / "tiny"), img_size=64,
                  batch_size=8, epochs=1, lr=0.0, min_lr=0.0, train_subset=0, translate=0)
    train(resolve_config(None, cfg))
    assert "fine-tuning" in capsys.readouterr().out
    tuned = load_pretrained(tmp_path / "run" / "best").eval()
    assert tuned.cfg.img_size == (64, 64) and tuned.class_names == ["astronaut", "cat", "coffee"]
    assert tuned.head.fc.weight.shape == (3, 192)  # a new classifier for the three classes
    assert tuned.preprocess["mean"] == load_pretrained(tmp_path / "tiny").preprocess["mean"]  # the checkpoint's
    at_64 = timm.create_model("vit_tiny_patch16_224", depth=2, num_classes=1000, img_size=64).eval()
    state = dict(peer.state_dict())
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], (4, 4), num_prefix_tokens=1)
    at_64.load_state_dict(state)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(tuned.forward_features(x), at_64.forward_features(x), rtol=1e-4, atol=1e-4)


def test_the_classifier_is_kept_only_for_the_same_classes(tmp_path):
    """A digits checkpoint fine-tuned on digits keeps its head (lr 0: exactly); on other classes it gets a new one."""
    train(resolve_config(None, run_cfg(tmp_path / "a", model="vit_digits_gap", epochs=1)))
    before = load_file(tmp_path / "a" / "best" / "model.safetensors")
    train(resolve_config(None, run_cfg(tmp_path / "b", pretrained=str(tmp_path / "a" / "best"), lr=0.0, min_lr=0.0,
                                       epochs=1)))
    after = load_file(tmp_path / "b" / "best" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # the same number of classes under other names is another task: a new classifier
    model = load_pretrained(tmp_path / "a" / "best")
    save_pretrained(model, tmp_path / "renamed", class_names=[f"c{i}" for i in range(10)])
    train(resolve_config(None, run_cfg(tmp_path / "c", pretrained=str(tmp_path / "renamed"), lr=0.0, min_lr=0.0,
                                       epochs=1)))
    renamed = load_file(tmp_path / "c" / "best" / "model.safetensors")
    assert not torch.equal(renamed["head.fc.weight"], before["head.fc.weight"])
    assert all(torch.equal(renamed[k], before[k]) for k in before if not k.startswith("head.fc."))
    # the same classes named in another order (an HF id2label, say) keep the classifier, its rows following the
    # names: row i of the checkpoint scores digit 9 - i, so the tuned model's row for digit d is its row 9 - d
    digits = [str(d) for d in range(10)]
    model.head.fc.weight.data, model.head.fc.bias.data = model.head.fc.weight.data.flip(0), model.head.fc.bias.data.flip(0)
    save_pretrained(model, tmp_path / "reversed", class_names=digits[::-1])
    train(resolve_config(None, run_cfg(tmp_path / "d", pretrained=str(tmp_path / "reversed"), lr=0.0, min_lr=0.0,
                                       epochs=1)))
    reordered = load_file(tmp_path / "d" / "best" / "model.safetensors")
    assert all(torch.equal(reordered[k], before[k]) for k in before)


def resumed_without_the_pretrained_files_is_straight(base: dict, tmp_path: Path) -> dict:
    """Train ``base`` straight to tmp_path/full; again to tmp_path/cut, stopped after epoch 1, its
    pretrained files deleted, resumed: both end with the same weights, which are returned."""
    train(resolve_config(None, base))
    with pytest.raises(Interrupted):
        train(resolve_config(None, dict(base, out=str(tmp_path / "cut"), stop_after_epoch=1)))
    shutil.rmtree(base["pretrained"])
    resume(tmp_path / "cut", {"stop_after_epoch": 0})
    full, cut = (load_file(tmp_path / r / "last" / "model.safetensors") for r in ("full", "cut"))
    assert full.keys() == cut.keys() and all(torch.equal(full[k], cut[k]) for k in full)
    return full


def test_fine_tuning_resumes_without_the_pretrained_files(tmp_path):
    """An RGB checkpoint fine-tuned on grey digits with layer decay: stopped, its pretrained files
    deleted, resumed, it ends with the weights of a run that never stopped."""
    torch.manual_seed(1)
    save_pretrained(create_model("vit_digits_gap", in_channels=3, num_classes=4), tmp_path / "rgb")
    base = run_cfg(tmp_path / "full", pretrained=str(tmp_path / "rgb"), layer_decay=0.7, epochs=3, lr=3e-3)
    full = resumed_without_the_pretrained_files_is_straight(base, tmp_path)
    assert full["patch_embed.projection.weight"].shape[1] == 1  # the first convolution, adapted to grey
    lrs = torch.load(tmp_path / "full" / "last" / "training_state.pt", weights_only=True)["optimizer"]["param_groups"]
    assert len({round(g["lr"], 12) for g in lrs}) == 6  # stem, 4 blocks, head: each its own rate


def test_fine_tuning_errors_name_the_option(tmp_path, capsys):
    base = ["train", "--threads", "1", "--progress", "off", "--epochs", "1", "--out", str(tmp_path / "run")]
    assert main([*base, "--pretrained", str(tmp_path / "nowhere")]) == 2
    assert f"--pretrained {tmp_path / 'nowhere'}" in capsys.readouterr().err
    peer = timm.create_model("vit_tiny_patch16_224", depth=1)  # a timm file is pointed to `vitkit convert`
    save_file(peer.state_dict(), tmp_path / "timm.safetensors")
    assert main([*base, "--pretrained", str(tmp_path / "timm.safetensors")]) == 2
    assert "`vitkit convert SRC OUT --from timm|hf|torchvision|jax` first" in capsys.readouterr().err
    vc.export(create_model("vit_tiny_patch16_224", depth=1), tmp_path / "hub", "timm")
    assert main([*base, "--pretrained", str(tmp_path / "hub")]) == 2  # a timm hub dir: its own command, once
    err = capsys.readouterr().err
    assert f"`vitkit convert {tmp_path / 'hub'} OUT --from timm`" in err and err.count("vitkit convert") == 1
    save_pretrained(create_model("vit_tiny_patch16_224", depth=1), tmp_path / "imagenet")
    assert main([*base, "--pretrained", str(tmp_path / "imagenet")]) == 2  # 224x224 on 8x8 digits
    err = capsys.readouterr().err
    assert f"--pretrained {tmp_path / 'imagenet'} takes 1x224x224 images" in err and "has 1x8x8" in err
    assert "pass --img-size N to resize" in err
    # a size the checkpoint's patches do not divide is the flag's fault, not the file's
    assert main([*base, "--pretrained", str(tmp_path / "imagenet"), "--img-size", "70"]) == 2
    err = capsys.readouterr().err
    assert "--img-size 70: ViTConfig.img_size: height 70 is not divisible by patch_size 16" in err
    assert "vitkit convert" not in err
    # an RGB model from scratch on grey digits: the channels are named before any image is resized
    assert main([*base, "--model", "vit_tiny_patch16_224", "--img-size", "32"]) == 2
    err = capsys.readouterr().err
    assert "--model vit_tiny_patch16_224 at --img-size 32 takes 3x32x32 images but --dataset digits has 1x32x32" in err
    assert "pick a 1-channel model" in err and "resizing" not in err
    # a checkpoint inside the run folder it would write (--overwrite clears it) is refused, and kept
    train(resolve_config(None, run_cfg(tmp_path / "own", model="vit_digits_gap", epochs=1)))
    before = (tmp_path / "own" / "best" / "model.safetensors").read_bytes()
    own = ["--pretrained", str(tmp_path / "own" / "best"), "--out", str(tmp_path / "own"), "--overwrite"]
    assert main([*base[:-2], *own]) == 2
    assert "inside the run folder" in capsys.readouterr().err
    assert (tmp_path / "own" / "best" / "model.safetensors").read_bytes() == before
    for flag, value, expected in (("--layer-decay", "0", "--layer-decay: expected a value in (0, 1]"),
                                  ("--img-size", "-8", "--img-size: expected an int >= 0")):
        assert main([*base, flag, value]) == 2
        assert expected in capsys.readouterr().err


def test_fine_tuning_an_rgb_model_on_a_builtin_set_at_a_new_size(tmp_path, capsys):
    """An RGB checkpoint on the grey 8x8 digits at --img-size 16: the data resized once with the
    checkpoint's interpolation and normalised with its (channel-averaged) mean and std, as a folder's
    images would be; `vitkit eval` then resizes the same way and scores what training scored, and
    `vitkit predict` on an 8x8 file feeds the model the pixels it trained on."""
    from vitkit.data import load_digits, normalize, save_samples
    from vitkit.evaluate import evaluate_checkpoint
    from vitkit.predict import predict_files

    rgb = create_model("vit_digits_gap", in_channels=3)
    save_pretrained(rgb, tmp_path / "rgb")  # ImageNet mean/std, bicubic: default_preprocess
    stats = default_preprocess(rgb.cfg)
    result = train(resolve_config(None, run_cfg(tmp_path / "run", pretrained=str(tmp_path / "rgb"), img_size=16,
                                                epochs=2, model="vit_fmnist")))
    assert "--model vit_fmnist is not used: the architecture comes from --pretrained" in capsys.readouterr().err
    model = load_pretrained(tmp_path / "run")
    assert model.cfg.img_size == (16, 16) and model.cfg.in_channels == 1
    assert model.cfg.emb_size == rgb.cfg.emb_size and model.cfg.depth == rgb.cfg.depth  # not vit_fmnist's
    assert model.preprocess["img_size"] == [16, 16] and model.preprocess["interpolation"] == "bicubic"
    for key in ("mean", "std"):
        assert model.preprocess[key] == [pytest.approx(sum(stats[key]) / 3)]
    scored = evaluate_checkpoint(tmp_path / "run", confusion_png=tmp_path / "confusion.png")
    best = next(row for row in result.history if row["top1"] == result.best_top1)  # best/'s epoch
    assert scored["images"] == 360 and scored["top1"] == pytest.approx(best["top1"], abs=1e-4)
    assert scored["loss"] == pytest.approx(best["val_loss"], abs=2e-6)  # the same pixels, the same normalisation
    path = save_samples(load_digits(), tmp_path / "files", n=1)[0]  # an 8x8 PNG
    probabilities = {p["label"]: p["probability"] for p in predict_files(tmp_path / "run", [path], topk=10)[0]["predictions"]}
    resized = load_digits().val.images[:1].float()
    x = normalize(torch.nn.functional.interpolate(resized, size=(16, 16), mode="bicubic").round().clamp(0, 255)
                  .to(torch.uint8), model.preprocess)  # an independent resize: close, not equal, to PIL's
    with torch.no_grad():
        ours = model.eval()(x).softmax(-1)[0]
    assert max(abs(probabilities[str(c)] - float(ours[c])) for c in range(10)) < 0.05


@pytest.mark.parametrize("frozen", [2, 4])
def test_frozen_blocks_stay_as_pretrained_and_the_rest_trains(tmp_path, capsys, frozen):
    """--freeze-blocks N keeps the stem and blocks 0..N-1 bit-identical to the checkpoint (with weight
    decay on, so a frozen tensor left in the optimizer would move); at N = depth (a linear probe) only
    the head trains. A stopped run resumes to the weights of a straight one."""
    save_pretrained(create_model("vit_digits_gap", num_classes=10), tmp_path / "pre")
    before = load_file(tmp_path / "pre" / "model.safetensors")
    base = run_cfg(tmp_path / "full", pretrained=str(tmp_path / "pre"), freeze_blocks=frozen, weight_decay=0.05)
    train(resolve_config(None, base))
    assert f"--freeze-blocks {frozen}: " in capsys.readouterr().out
    after = load_file(tmp_path / "full" / "last" / "model.safetensors")
    for name, tensor in after.items():
        block = int(name.split(".")[2]) if name.startswith("encoder.blocks.") else None
        # at every block (a linear probe) the final norm, after pooling here (head.norm), stays too
        kept = (name.startswith("patch_embed.") or (block is not None and block < frozen)
                or (frozen == 4 and name.startswith("head.norm.")))
        assert torch.equal(tensor, before[name]) == kept, name
    assert not torch.equal(after["head.fc.weight"], before["head.fc.weight"])
    with pytest.raises(Interrupted):
        train(resolve_config(None, dict(base, out=str(tmp_path / "cut"), stop_after_epoch=1)))
    resume(tmp_path / "cut", {"stop_after_epoch": 0})
    cut = load_file(tmp_path / "cut" / "last" / "model.safetensors")
    assert all(torch.equal(after[k], cut[k]) for k in after)


def test_freeze_blocks_errors_name_the_option(tmp_path):
    with pytest.raises(ValueError, match="--freeze-blocks 2: keeps pretrained layers as they are; pass --pretrained"):
        resolve_config(None, run_cfg(tmp_path / "run", freeze_blocks=2))
    save_pretrained(create_model("vit_digits_gap", num_classes=10), tmp_path / "pre")
    with pytest.raises(ValueError, match="--freeze-blocks 5: the model has 4 blocks"):
        train(resolve_config(None, run_cfg(tmp_path / "run", pretrained=str(tmp_path / "pre"), freeze_blocks=5)))


def test_head_pool_mean_is_timms_avg_pool_with_fc_norm_and_resumes(tmp_path):
    """--head-pool mean on a class-token checkpoint: the patch tokens' average with the final
    LayerNorm moved after the pooling (its weights kept), which is timm's global_pool="avg" + fc_norm
    given the same weights; the run then stops, resumes from last/ without the pretrained files,
    and ends with the weights of a run that never stopped."""
    from vitkit.data import load_digits
    from vitkit.data import normalize as normalize_images

    torch.manual_seed(2)
    pretrained = create_model("vit_digits", num_classes=10)
    with torch.no_grad():  # away from LayerNorm's init, so that a norm left behind would show
        pretrained.encoder.norm.weight.normal_()
        pretrained.encoder.norm.bias.normal_()
    save_pretrained(pretrained, tmp_path / "cls")
    base = run_cfg(tmp_path / "full", pretrained=str(tmp_path / "cls"), head_pool="mean", epochs=3)
    trainer = Trainer(resolve_config(None, dict(base, out=str(tmp_path / "probe"))))
    model = trainer.model.eval()
    assert (model.cfg.pool, model.cfg.final_norm) == ("mean", "pooled")
    assert torch.equal(model.head.norm.weight, pretrained.encoder.norm.weight)
    trainer.run.unlock()
    peer = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, in_chans=1,
                             embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0, num_classes=10, global_pool="avg",
                             fc_norm=True).eval()
    state = KEYS.from_vitkit(pretrained.state_dict(), pretrained.cfg)
    peer.load_state_dict({("fc_norm." + k[5:] if k.startswith("norm.") else k): v for k, v in state.items()})
    digits = load_digits()
    x = normalize_images(digits.val.images[:16], trainer.data.preprocess)
    with torch.no_grad():
        assert (model(x) - peer(x)).abs().max() < 1e-5
    full = resumed_without_the_pretrained_files_is_straight(base, tmp_path)
    assert "head.norm.weight" in full and "encoder.norm.weight" not in full
    with pytest.raises(ValueError, match="--head-pool mean: changes a pretrained checkpoint's head"):
        resolve_config(None, run_cfg(tmp_path / "run", head_pool="mean"))
    save_pretrained(create_model("vit_digits_gap", num_classes=10), tmp_path / "gap")
    with pytest.raises(ValueError, match="--head-pool cls: ViTConfig.pool: 'cls' pooling needs class_token=True"):
        train(resolve_config(None, run_cfg(tmp_path / "run2", pretrained=str(tmp_path / "gap"), head_pool="cls")))


def test_head_pool_cls_mean_is_dinov2s_linear_head(tmp_path):
    """--head-pool cls_mean on a class-token checkpoint: a classifier on the class token and the patch
    tokens' mean side by side, checked against transformers' Dinov2ForImageClassification given the
    same weights (a DINOv2-shaped model: LayerScale on). The wider classifier starts afresh, with a
    warning naming it; a run stopped and resumed without the pretrained files ends as a straight one."""
    import transformers

    from vitkit.data import load_digits
    from vitkit.data import normalize as normalize_images

    torch.manual_seed(3)
    pretrained = create_model("vit_digits", num_classes=10, layer_scale=0.5, final_norm="tokens", norm_eps=1e-6)
    save_pretrained(pretrained, tmp_path / "cls")
    base = run_cfg(tmp_path / "full", pretrained=str(tmp_path / "cls"), head_pool="cls_mean", epochs=2)
    with pytest.warns(UserWarning, match=r"initialised afresh: \['head.fc.bias', 'head.fc.weight'\]"):
        trainer = Trainer(resolve_config(None, dict(base, out=str(tmp_path / "probe"))))
    model = trainer.model.eval()
    assert (model.cfg.pool, model.head.fc.weight.shape) == ("cls_mean", (10, 128))
    vc.export(model, tmp_path / "hf", "hf")
    theirs = transformers.Dinov2ForImageClassification.from_pretrained(tmp_path / "hf").eval()
    x = normalize_images(load_digits().val.images[:16], trainer.data.preprocess)
    with torch.no_grad():
        assert (model(x) - theirs(x).logits).abs().max() < 1e-5
    trainer.run.unlock()
    full = resumed_without_the_pretrained_files_is_straight(base, tmp_path)  # stopped, resumed: as if straight
    assert full["head.fc.weight"].shape == (10, 128)
