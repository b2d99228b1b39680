"""vitkit's own checkpoint format: round trips, resampling on load (timm is the oracle), head
changes, refusal of code-running pickles, and error messages that name the keys."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from timm.layers import resample_abs_pos_embed

from vitkit import ViT, ViTConfig, create_model, load_pretrained, save_pretrained
from vitkit.checkpoint import CheckpointError, build_with_state, load_state_dict_file


def small_cfg(**kw) -> ViTConfig:
    fields = dict(img_size=32, patch_size=8, emb_size=32, depth=2, num_heads=4, num_classes=5,
                  class_token=True, pool="cls", final_norm="tokens", norm_eps=1e-6)
    fields.update(kw)
    return ViTConfig(**fields)


def test_round_trip_gives_equal_logits(tmp_path):
    model = ViT(small_cfg()).eval()
    save_pretrained(model, tmp_path / "ckpt", class_names=list("abcde"))
    loaded = load_pretrained(tmp_path / "ckpt").eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert loaded.cfg == model.cfg
    assert loaded.class_names == list("abcde")
    # the weights file alone opens too
    assert isinstance(load_pretrained(tmp_path / "ckpt" / "model.safetensors"), ViT)


@pytest.mark.parametrize(
    "cfg_kw, new_size",
    [
        (dict(img_size=224, patch_size=16), 384),  # the usual 224 -> 384 fine-tuning step
        (dict(img_size=224, patch_size=16), (224, 160)),  # non-square target
        (dict(img_size=(64, 32), patch_size=8), (96, 64)),  # non-square source
        (dict(img_size=224, patch_size=16, class_token=False, pool="mean"), 384),  # no prefix token
    ],
)
def test_loading_at_another_size_matches_timm_resampling(tmp_path, cfg_kw, new_size):
    cfg = small_cfg(**cfg_kw, depth=1)
    model = ViT(cfg)
    save_pretrained(model, tmp_path / "ckpt")
    loaded = load_pretrained(tmp_path / "ckpt", img_size=new_size)
    new_cfg = cfg.replace(img_size=new_size)
    assert loaded.cfg.img_size == new_cfg.img_size
    # timm's own resampler with the arguments its checkpoint filter passes: bicubic, antialias,
    # prefix tokens kept out of the interpolation.
    expected = resample_abs_pos_embed(
        model.patch_embed.positions.detach(), new_size=list(new_cfg.grid_size), old_size=list(cfg.grid_size),
        num_prefix_tokens=cfg.num_prefix_tokens, interpolation="bicubic", antialias=True,
    )
    torch.testing.assert_close(loaded.patch_embed.positions.detach(), expected, rtol=0, atol=1e-5)
    assert loaded.preprocess["img_size"] == list(new_cfg.img_size)
    with torch.no_grad():
        out = loaded.eval()(torch.randn(1, 3, *new_cfg.img_size))
    assert out.shape == (1, 5) and torch.isfinite(out).all()


def test_dynamic_img_size_override(tmp_path):
    model = ViT(small_cfg()).eval()
    save_pretrained(model, tmp_path / "ckpt")
    dyn = load_pretrained(tmp_path / "ckpt", dynamic_img_size=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dyn(x), model(x))  # at the native size nothing changes
        assert dyn(torch.randn(2, 3, 48, 40)).shape == (2, 5)
    with pytest.raises(ValueError, match="expected image size"):
        model(torch.randn(2, 3, 48, 40))


def test_num_classes_change_warns_and_reinitialises_the_head(tmp_path):
    model = ViT(small_cfg()).eval()
    save_pretrained(model, tmp_path / "ckpt", class_names=list("abcde"))
    with pytest.warns(UserWarning, match=r"5 classes, 3 were asked for.*re-initialised"):
        loaded = load_pretrained(tmp_path / "ckpt", num_classes=3).eval()
    assert loaded.head.fc.weight.shape == (3, 32)
    assert loaded.class_names is None  # the old names describe the old head
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # everything but the classifier is the checkpoint's
        torch.testing.assert_close(loaded.forward_features(x), model.forward_features(x))
    # re-initialised as init_weights does: truncated normal (std 0.02), zero bias
    assert loaded.head.fc.bias.abs().max() == 0 and 0.005 < loaded.head.fc.weight.std() < 0.05


def _evil_files(directory):
    """A .pth (torch.save, zip) and a .bin (raw pickle) whose unpickling would run a shell command."""
    marker = directory / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    pth = directory / "evil.pth"
    torch.save({"patch_embed.projection.weight": torch.zeros(1), "x": Evil()}, pth)
    binary = directory / "evil.bin"
    with open(binary, "wb") as f:
        pickle.dump({"w": Evil()}, f)
    return marker, [pth, binary]


def test_malicious_pickle_is_refused(tmp_path):
    marker, files = _evil_files(tmp_path)
    for path in files:
        with pytest.raises(CheckpointError, match="refused to load") as err:
            load_state_dict_file(path)
        assert str(path) in str(err.value)
        assert not marker.exists(), f"unpickling {path.name} ran code"
    # the same loader reads an honest .pth
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pth")
    assert torch.equal(load_state_dict_file(tmp_path / "ok.pth")["w"], torch.ones(2))


def test_mismatch_error_lists_missing_unexpected_and_misshaped_keys():
    cfg = small_cfg()
    state = ViT(cfg).state_dict()
    state.pop("encoder.blocks.1.norm2.bias")
    state["encoder.blocks.1.attn.qkv_extra"] = torch.zeros(1)
    state["head.fc.weight"] = torch.zeros(9, 32)
    with pytest.raises(CheckpointError) as err:
        build_with_state(cfg, state, "some/file.safetensors")
    msg = str(err.value)
    assert "some/file.safetensors" in msg
    assert "missing keys (1): ['encoder.blocks.1.norm2.bias']" in msg
    assert "unexpected keys (1): ['encoder.blocks.1.attn.qkv_extra']" in msg
    assert "head.fc.weight: expected (5, 32), found (9, 32)" in msg


def test_bad_files_are_named(tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_state_dict_file(tmp_path / "empty.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="junk.safetensors: not a readable safetensors"):
        load_state_dict_file(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained(tmp_path)


def test_a_run_folder_means_its_best_checkpoint(tmp_path):
    """Every command that takes a checkpoint also takes a training run folder (runs/NAME -> best/, else last/)."""
    model = create_model("vit_digits").eval()
    other = create_model("vit_digits").eval()
    run = tmp_path / "run"
    save_pretrained(other, run / "last")
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(load_pretrained(run).eval()(x), other(x))  # only last/ so far
    save_pretrained(model, run / "best")
    torch.testing.assert_close(load_pretrained(run).eval()(x), model(x))
    (run / "best" / "config.json").unlink()
    (run / "last" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="a run folder without a best/ or last/ checkpoint"):
        load_pretrained(run)
