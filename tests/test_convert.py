"""Weights from and to timm, Hugging Face, torchvision and JAX .npz.

Every check runs the foreign library's own model (random weights, nothing downloaded) as
the oracle and compares logits on the same batch: fp32, max |diff| <= 1e-4.
"""

from __future__ import annotations

import json
import os
import re
import warnings

import numpy as np
import pytest
import timm
import torch
import torchvision
import transformers
from safetensors.torch import save_file
from timm.models.vision_transformer import checkpoint_filter_fn

import vitkit.convert as vc
from vitkit import ViT, ViTConfig, create_model, load_pretrained
from vitkit.bench import timm_twin
from vitkit.checkpoint import CheckpointError, load_state_dict_file
from vitkit.cli import main as cli
from vitkit.config import VARIANTS

ATOL = 1e-4


def assert_same_logits(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    diff = (ours - theirs).abs().max().item()
    assert diff <= ATOL, f"max |diff| {diff:.2e} > {ATOL}"


def run(model, x):
    with torch.no_grad():
        out = model.eval()(x)
    return getattr(out, "logits", out)  # transformers returns an output object


def timm_vit(name: str, **kw):
    # The named architectures' width, heads, patch and image size; two blocks keep it fast.
    return timm.create_model(name, pretrained=False, depth=2, **kw).eval()


def save_timm(model, path):
    if path.suffix == ".safetensors":
        save_file(model.state_dict(), path)
    else:
        torch.save(model.state_dict(), path)
    return path


# --- timm --------------------------------------------------------------------------------------
TIMM_CASES = [
    ("vit_tiny_patch16_224", {}),
    ("vit_small_patch32_224", {}),
    ("vit_base_patch16_384", {}),
    ("vit_tiny_patch16_224", dict(global_pool="avg", fc_norm=True)),
    ("vit_tiny_patch16_224", dict(class_token=False, global_pool="avg")),
]


@pytest.mark.parametrize("name, kw", TIMM_CASES, ids=lambda c: str(c))
def test_timm_both_ways(tmp_path, name, kw):
    theirs = timm_vit(name, **kw)
    size = theirs.patch_embed.img_size
    x = torch.randn(1 if size[0] > 224 else 2, 3, *size)
    expected = run(theirs, x)

    ours = vc.load(save_timm(theirs, tmp_path / "w.safetensors"), "timm", model=name)
    assert ours.cfg.img_size == tuple(size) and ours.cfg.num_heads == theirs.blocks[0].attn.num_heads
    assert_same_logits(run(ours, x), expected)

    # vitkit -> timm: a state dict timm loads strictly, and a hub directory timm opens by itself
    file = vc.export(ours, tmp_path / "back.safetensors", "timm")
    fresh = timm_vit(name, **kw)
    fresh.load_state_dict(load_state_dict_file(file), strict=True)
    assert_same_logits(run(fresh, x), expected)
    if size[0] == 224:  # the hub directory (config.json + weights) once per image size is enough
        vc.export(ours, tmp_path / "hubdir", "timm")
        assert_same_logits(run(timm.create_model(f"local-dir:{tmp_path / 'hubdir'}", pretrained=True), x), expected)


def test_timm_heads_are_not_in_the_file(tmp_path):
    # width 64 with 4 heads: the width/64 convention says 1 head, which gives other logits
    theirs = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, embed_dim=64, num_heads=4,
                               img_size=32, patch_size=8, num_classes=3).eval()
    path = save_timm(theirs, tmp_path / "w.pth")
    x = torch.randn(2, 3, 32, 32)
    with pytest.warns(UserWarning, match=r"heads = width / 64 = 1\b"):
        guessed = vc.load(path, "timm")
    assert (run(guessed, x) - run(theirs, x)).abs().max() > 1e-3  # the comparison can fail
    assert_same_logits(run(vc.load(path, "timm", num_heads=4), x), run(theirs, x))
    with pytest.raises(CheckpointError, match="not a vit_small_patch16_224: emb_size"):
        vc.load(path, "timm", model="vit_small_patch16_224")


def test_timm_distilled_deit_both_ways(tmp_path):
    """timm's distilled DeiT (a distillation token after the class token, and a second classifier):
    its averaged logits, its pooled features, and in distilled training its two heads' logits apart."""
    theirs = timm_vit("deit_tiny_distilled_patch16_224")
    x = torch.randn(2, 3, 224, 224)
    expected = run(theirs, x)
    ours = vc.load(save_timm(theirs, tmp_path / "w.safetensors"), "timm", num_heads=3)
    assert ours.cfg.dist_token and ours.cfg.num_prefix_tokens == 2
    assert_same_logits(run(ours, x), expected)
    with torch.no_grad():
        assert_same_logits(ours.forward_head(ours.forward_features(x), pre_logits=True),
                           theirs.forward_head(theirs.forward_features(x), pre_logits=True))
        theirs.set_distilled_training(True)
        ours.head.distilled_training = True
        for a, b in zip(ours.train()(x), theirs.train()(x), strict=True):  # (class head, distillation head)
            assert_same_logits(a, b)
    assert (ours.eval()(x) - ours.head.fc(ours.forward_features(x)[:, 0])).abs().max() > 1e-3  # both heads count
    file = vc.export(ours, tmp_path / "back.safetensors", "timm")
    fresh = timm_vit("deit_tiny_distilled_patch16_224")
    fresh.load_state_dict(load_state_dict_file(file), strict=True)
    assert_same_logits(run(fresh, x), expected)
    vc.export(ours, tmp_path / "hubdir", "timm")
    assert_same_logits(run(timm.create_model(f"local-dir:{tmp_path / 'hubdir'}", pretrained=True), x), expected)
    vc.export(ours, tmp_path / "hf", "hf")  # timm's weights, through vitkit, in transformers' DeiT
    assert_same_logits(run(transformers.DeiTForImageClassificationWithTeacher.from_pretrained(tmp_path / "hf"), x),
                       expected)
    for fmt in ("torchvision", "jax"):
        with pytest.raises(ValueError, match=f"target format {fmt}: this model has DeiT's distillation token"):
            vc.export(ours, tmp_path / f"out-{fmt}.npz", fmt)


@pytest.mark.parametrize("name", ["deit3_small_patch16_224", "vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2",
                                  "vit_giant_patch14_dinov2"])
def test_timm_layer_scale_and_registers_both_ways(tmp_path, name):
    """DeiT-III (LayerScale; positions for the patches only), DINOv2 (LayerScale), DINOv2 with
    registers (all three) and DINOv2's giant (a SwiGLU MLP, fc1's halves gate and value): timm's logits
    and features from its file, and back into timm."""
    img = {} if name.startswith("deit3") else {"img_size": 56}  # 4x4 patches of 14
    theirs = timm_vit(name, num_classes=7, **img)
    with torch.no_grad():  # away from their init, so that a missing or swapped gamma or register shows
        for block in theirs.blocks:
            block.ls1.gamma.normal_()
            block.ls2.gamma.normal_()
        if theirs.reg_token is not None:
            theirs.reg_token.normal_()
    x = torch.randn(2, 3, *theirs.patch_embed.img_size)
    expected = run(theirs, x)
    ours = vc.load(save_timm(theirs, tmp_path / "w.safetensors"), "timm", model=name)
    assert ours.cfg.layer_scale > 0 and ours.cfg.reg_tokens == (4 if "reg4" in name else 0)
    assert_same_logits(run(ours, x), expected)
    with torch.no_grad():
        assert_same_logits(ours.forward_features(x), theirs.forward_features(x))
    # the new parts learn as timm's do: their gradients agree (fp32)
    ours.train()(x).square().sum().backward()
    theirs.train()(x).square().sum().backward()
    grads = {"encoder.blocks.1.ls2.gamma": "blocks.1.ls2.gamma", "encoder.blocks.0.ls1.gamma": "blocks.0.ls1.gamma",
             **({"patch_embed.reg_token": "reg_token"} if theirs.reg_token is not None else {})}
    for mine, peer in grads.items():
        a, b = ours.get_parameter(mine).grad, theirs.get_parameter(peer).grad
        assert (a - b).abs().max() <= 1e-4 * b.abs().max(), mine
    # the variant table's architecture is timm's: the same parameters, plus zero positions for the
    # prefix tokens where timm has none (no_embed_class)
    with torch.device("meta"):
        count = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
        table = sum(p.numel() for p in create_model(name).parameters())
    assert table == count + (ours.cfg.num_prefix_tokens * ours.cfg.emb_size if theirs.no_embed_class else 0)
    vc.export(ours, tmp_path / "hubdir", "timm")
    assert_same_logits(run(timm.create_model(f"local-dir:{tmp_path / 'hubdir'}", pretrained=True), x), expected)
    if ours.cfg.mlp_act == "swiglu":  # the same packed shapes with GELU's gate (GeGLU) are not SwiGLU: refused
        hub = json.loads((tmp_path / "hubdir" / "config.json").read_text())
        hub["model_args"]["act_layer"] = "gelu"
        (tmp_path / "hubdir" / "config.json").write_text(json.dumps(hub))
        with pytest.raises(CheckpointError, match="a gated MLP with act_layer 'gelu'"):
            vc.load(tmp_path / "hubdir", "timm")
    if "dinov2" in name:  # timm's DINOv2, through vitkit, in transformers' DINOv2 (features: no classifier)
        ours.reset_classifier(0)
        vc.export(ours, tmp_path / "hf", "hf")
        hf = (transformers.Dinov2WithRegistersModel if "reg4" in name else transformers.Dinov2Model)
        with torch.no_grad():
            assert_same_logits(hf.from_pretrained(tmp_path / "hf").eval()(x).last_hidden_state,
                               theirs.eval().forward_features(x))
    for fmt in ("torchvision", "jax"):
        with pytest.raises(ValueError, match=f"target format {fmt}: this model has (LayerScale|register tokens)"):
            vc.export(ours, tmp_path / f"out-{fmt}", fmt)


@pytest.mark.parametrize("name", ["deit3_small_patch16_224", "vit_small_patch14_reg4_dinov2"])
def test_positions_without_prefix_rows_go_back_into_timms_own_architecture(tmp_path, name):
    """timm's no_embed_class=True (DeiT-III, DINOv2 reg4): positions for the patches only, which vitkit reads as
    zero rows for the prefix tokens. Written back while they are zero, the table goes without them, so that
    the bare file loads strictly into the architecture it came from (it failed: 17 rows, not 16), and a hub
    dir says no_embed_class; the same logits. Rows that training moved are written (no_embed_class=False)."""
    img = {} if name.startswith("deit3") else {"img_size": 56}
    theirs = timm_vit(name, num_classes=7, **img)
    x = torch.randn(2, 3, *theirs.patch_embed.img_size)
    expected = run(theirs, x)
    ours = vc.load(save_timm(theirs, tmp_path / "w.safetensors"), "timm", model=name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the LayerNorm eps of vitkit's table: not this test's concern
        vc.export(ours, tmp_path / "back.safetensors", "timm")
        vc.export(ours, tmp_path / "hub", "timm")
    fresh = timm_vit(name, num_classes=7, **img)
    fresh.load_state_dict(load_state_dict_file(tmp_path / "back.safetensors"), strict=True)
    assert_same_logits(run(fresh, x), expected)
    assert json.loads((tmp_path / "hub" / "config.json").read_text())["model_args"]["no_embed_class"] is True
    assert_same_logits(run(timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True), x), expected)
    back = vc.load(tmp_path / "back.safetensors", "timm", model=name)
    assert_same_logits(run(back, x), expected)
    with torch.no_grad():
        ours.patch_embed.positions[:, :1].normal_()  # as training would move them: a table timm's class holds
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vc.export(ours, tmp_path / "trained", "timm")
    assert json.loads((tmp_path / "trained" / "config.json").read_text())["model_args"]["no_embed_class"] is False
    assert_same_logits(run(timm.create_model(f"local-dir:{tmp_path / 'trained'}", pretrained=True), x),
                       run(ours, x))


def test_timm_clip_image_tower_both_ways(tmp_path):
    """CLIP's tower (timm's pre_norm: a LayerNorm before the blocks, no patch bias, LayerNorm eps 1e-5):
    timm's logits from a bare file and back through a hub dir and into transformers; a QuickGELU tower
    (OpenAI's weights, timm's *_quickgelu_*) from a hub dir that says so, or a bare file and
    mlp_act="quick_gelu"; torchvision and JAX refuse both."""
    theirs = timm_vit("vit_base_patch16_clip_224", num_classes=5)
    x = torch.randn(2, 3, 224, 224)
    expected = run(theirs, x)
    with pytest.warns(UserWarning, match="a CLIP image tower"):
        ours = vc.load(save_timm(theirs, tmp_path / "w.safetensors"), "timm", model="vit_base_patch16_clip_224")
    assert ours.cfg.pre_norm and ours.cfg.norm_eps == 1e-5 and ours.patch_embed.projection.bias is None
    assert_same_logits(run(ours, x), expected)
    with torch.device("meta"):  # the variant table's CLIP towers are timm's
        for name in ("vit_base_patch32_clip_224", "vit_large_patch14_clip_224"):
            assert (sum(p.numel() for p in create_model(name).parameters())
                    == sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters()))
    vc.export(ours, tmp_path / "hubdir", "timm")
    assert_same_logits(run(timm.create_model(f"local-dir:{tmp_path / 'hubdir'}", pretrained=True), x), expected)
    openai = timm_vit("vit_base_patch16_clip_quickgelu_224", num_classes=5)
    with torch.no_grad():
        openai.load_state_dict(theirs.state_dict())  # the same weights: only the activation differs
    quick_expected = run(openai, x)
    assert (quick_expected - expected).abs().max() > 1e-3
    quick = vc.load(tmp_path / "w.safetensors", "timm", model="vit_base_patch16_clip_224", mlp_act="quick_gelu")
    assert_same_logits(run(quick, x), quick_expected)
    with warnings.catch_warnings(record=True) as caught:  # the bare file, its variant named: QuickGELU, no guess
        warnings.simplefilter("always")
        named = vc.load(tmp_path / "w.safetensors", "timm", model="vit_base_patch16_clip_quickgelu_224")
    assert not any("QuickGELU" in str(w.message) for w in caught)
    assert_same_logits(run(named, x), quick_expected)
    vc.export(quick, tmp_path / "quick", "timm")
    config = json.loads((tmp_path / "quick" / "config.json").read_text())
    assert config["model_args"]["act_layer"] == "quick_gelu"
    assert_same_logits(run(timm.create_model(f"local-dir:{tmp_path / 'quick'}", pretrained=True), x), quick_expected)
    (tmp_path / "quick" / "config.json").write_text(json.dumps(dict(  # as timm's own hub config names it
        config, architecture="vit_base_patch16_clip_quickgelu_224", model_args={"num_classes": 5})))
    assert vc.load(tmp_path / "quick", "timm").cfg.mlp_act == "quick_gelu"
    # timm's CLIP through vitkit into transformers' (its head, whose bias timm starts at zero, as the projection)
    assert not ours.head.fc.bias.any()
    vc.export(ours, tmp_path / "hf", "hf")
    hf = transformers.CLIPVisionModelWithProjection.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert_same_logits(hf(x).image_embeds, expected)
    for fmt in ("torchvision", "jax"):
        with pytest.raises(ValueError, match=f"target format {fmt}: this model has CLIP's pre-norm"):
            vc.export(ours, tmp_path / f"out-{fmt}", fmt)
        with pytest.raises(ValueError, match=rf"target format {fmt}: this model has .*\(mlp_act='quick_gelu'\)"):
            vc.export(create_model("vit_tiny_patch16_224", mlp_act="quick_gelu"), tmp_path / f"out-{fmt}", fmt)


BARE_POOLINGS = {
    "cls-pooled": dict(pool="cls", final_norm="pooled"),
    "mean-tokens": dict(pool="mean", final_norm="tokens"),
    "mean-none": dict(pool="mean", final_norm="none"),
    "dinov3-cls": dict(pool="cls", final_norm="tokens", rope="dinov3", abs_pos=False, reg_tokens=2, layer_scale=0.1,
                       norm_eps=1e-5, dynamic_img_size=True),
}


@pytest.mark.parametrize("fields", list(BARE_POOLINGS.values()), ids=list(BARE_POOLINGS))
def test_a_bare_timm_file_that_cannot_say_its_pooling_is_exported_with_a_warning(tmp_path, fields):
    """A bare state dict holds no global_pool: its reader takes the mean where there is an fc_norm (or, for
    DINOv3, always), else the class token. A model pooled otherwise is written with a warning saying so;
    load(..., pool=) reads it as timm's model of that pooling (model_args) runs it. A hub dir keeps it."""
    from vitkit.convert.timm import TIMM_ARCHITECTURE, architecture_key, model_args

    cfg = ViTConfig(**{**dict(img_size=32, patch_size=8, emb_size=64, depth=1, num_heads=4, num_classes=5,
                              norm_eps=1e-6), **fields})
    ours = create_model(cfg).eval()
    with torch.no_grad():  # LayerNorms off their init, so that a norm read in the wrong place would show
        for name, p in ours.named_parameters():
            if "norm" in name:
                p.normal_()
    x = torch.randn(2, 3, 32, 32)
    file = tmp_path / "bare.safetensors"
    with pytest.warns(UserWarning, match=rf"does not hold the pooling.*pool={cfg.pool!r}"):
        vc.export(ours, file, "timm")
    theirs = timm.create_model(TIMM_ARCHITECTURE[architecture_key(cfg)][0], pretrained=False,
                               **model_args(cfg)).eval()
    theirs.load_state_dict(load_state_dict_file(file), strict=True)
    assert_same_logits(run(theirs, x), run(ours, x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the normalisation, the heads: not this test's concern
        back = vc.load(file, "timm", num_heads=4, pool=cfg.pool)
    assert (back.cfg.pool, back.cfg.final_norm) == (cfg.pool, cfg.final_norm)
    assert_same_logits(run(back, x), run(theirs, x))
    # the same through `vitkit convert --pool`
    assert cli(["convert", str(file), str(tmp_path / "cli"), "--from", "timm", "--num-heads", "4",
                 "--pool", cfg.pool]) == 0
    assert_same_logits(run(load_pretrained(tmp_path / "cli"), x), run(theirs, x))
    vc.export(ours, tmp_path / "hub", "timm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a hub dir says its pooling: no warning
        assert vc.load(tmp_path / "hub", "timm").cfg.pool == cfg.pool
    with warnings.catch_warnings():  # a bare file whose pooling its reader infers: no warning either
        warnings.simplefilter("error")
        plain = cfg.replace(pool="mean" if cfg.rope == "dinov3" or cfg.final_norm == "pooled" else "cls")
        vc.export(create_model(plain), tmp_path / "plain.safetensors", "timm")


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "beit_base_patch16_224", "vit_small_patch16_dinov3"])
def test_a_timm_hub_dir_at_a_non_square_size_is_read_at_its_configs_size(tmp_path, name):
    """A timm hub dir written by timm's own save_for_hf at 32x48: its config's model_args.img_size gives the
    grid that neither a position table (6 patches: not a square), BEiT's relative position tables
    ((2h-1)(2w-1)+3 entries) nor DINOv3's rotary positions (none) can tell; timm's logits."""
    from timm.models._hub import save_for_hf

    theirs = timm.create_model(name, pretrained=False, img_size=(32, 48), patch_size=8, embed_dim=64, depth=1,
                               num_heads=4, num_classes=5).eval()
    save_for_hf(theirs, tmp_path / "hub", safe_serialization=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm's config names a normalisation, heads: nothing to warn, but be quiet
        ours = vc.load(tmp_path / "hub", "timm").eval()
    assert ours.cfg.img_size == (32, 48)
    x = torch.randn(2, 3, 32, 48)
    assert_same_logits(run(ours, x), run(theirs, x))


def test_timm_at_another_resolution_matches_timms_own_resampling(tmp_path):
    theirs = timm_vit("vit_tiny_patch16_224", num_classes=10)
    path = save_timm(theirs, tmp_path / "w.safetensors")
    # timm's way to 384: build at 384 and let its checkpoint filter resample the positions
    timm384 = timm_vit("vit_tiny_patch16_224", num_classes=10, img_size=384)
    timm384.load_state_dict(checkpoint_filter_fn(theirs.state_dict(), timm384))
    x = torch.randn(2, 3, 384, 384)
    tiny = "vit_tiny_patch16_224"
    assert_same_logits(run(vc.load(path, "timm", model=tiny, img_size=384), x), run(timm384, x))
    # dynamic_img_size as an override: positions resampled on the fly, as timm does
    timm_dyn = timm_vit("vit_tiny_patch16_224", num_classes=10, dynamic_img_size=True)
    timm_dyn.load_state_dict(theirs.state_dict())
    ours_dyn = vc.load(path, "timm", model=tiny, dynamic_img_size=True)
    x = torch.randn(2, 3, 160, 224)
    assert_same_logits(run(ours_dyn, x), run(timm_dyn, x))
    # a new head: warned about, everything else kept
    with pytest.warns(UserWarning, match="re-initialised"):
        ours5 = vc.load(path, "timm", model=tiny, num_classes=5)
    assert ours5.head.fc.out_features == 5


def test_timm_bad_state_dict_names_the_keys_in_timms_terms(tmp_path):
    state = timm_vit("vit_tiny_patch16_224").state_dict()
    state.pop("blocks.1.mlp.fc2.bias")
    state["blocks.0.attn.q_norm.weight"] = torch.ones(64)  # qk-norm: not a vitkit part
    save_file(state, tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError) as err:
        vc.load(tmp_path / "w.safetensors", "timm", num_heads=3)
    msg = str(err.value)
    assert "timm layout" in msg and "['blocks.1.mlp.fc2.bias']" in msg and "['blocks.0.attn.q_norm.weight']" in msg


# --- Hugging Face ---------------------------------------------------------------------------------
def hf_vit(num_channels=3, **kw):
    cfg = transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
        patch_size=8, num_channels=num_channels, num_labels=3, id2label={0: "cat", 1: "dog", 2: "fox"}, **kw,
    )
    return transformers.ViTForImageClassification(cfg).eval()


@pytest.mark.parametrize("num_channels", [3, 1])
def test_hf_both_ways(tmp_path, num_channels):
    theirs = hf_vit(num_channels)
    theirs.save_pretrained(tmp_path / "hf")
    x = torch.randn(2, num_channels, 32, 32)
    expected = run(theirs, x)

    ours = vc.load(tmp_path / "hf", "hf")
    assert (ours.cfg.num_heads, ours.cfg.norm_eps, ours.cfg.in_channels) == (4, 1e-12, num_channels)
    assert ours.class_names == ["cat", "dog", "fox"]
    assert_same_logits(run(ours, x), expected)

    vc.export(ours, tmp_path / "vitkit", "vitkit")  # and as a vitkit checkpoint, class names kept
    reopened = load_pretrained(tmp_path / "vitkit")
    assert reopened.class_names == ["cat", "dog", "fox"]
    assert_same_logits(run(reopened, x), expected)

    vc.export(ours, tmp_path / "back", "hf")
    again = transformers.ViTForImageClassification.from_pretrained(tmp_path / "back")
    assert again.config.id2label == {0: "cat", 1: "dog", 2: "fox"}
    assert_same_logits(run(again, x), expected)


def hf_deit(cls=None):
    cfg = transformers.DeiTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
        patch_size=8, num_labels=3, id2label={0: "cat", 1: "dog", 2: "fox"},
    )
    return (cls or transformers.DeiTForImageClassificationWithTeacher)(cfg).eval()


def test_hf_distilled_deit_both_ways(tmp_path):
    """transformers' DeiT with its teacher's head (the Hub's distilled DeiT weights, model_type "deit"):
    the averaged logits, each head's apart, and back into transformers."""
    theirs = hf_deit()
    theirs.save_pretrained(tmp_path / "hf")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = theirs(x)
    ours = vc.load(tmp_path / "hf", "hf")
    assert ours.cfg.dist_token and ours.class_names == ["cat", "dog", "fox"]
    assert_same_logits(run(ours, x), out.logits)
    ours.head.distilled_training = True
    with torch.no_grad():
        cls_logits, dist_logits = ours.train()(x)
    assert_same_logits(cls_logits, out.cls_logits)
    assert_same_logits(dist_logits, out.distillation_logits)
    assert (out.cls_logits - out.distillation_logits).abs().max() > 1e-3  # the two heads differ
    ours.head.distilled_training = False
    vc.export(ours, tmp_path / "back", "hf")
    again = transformers.DeiTForImageClassificationWithTeacher.from_pretrained(tmp_path / "back")
    assert again.config.id2label == {0: "cat", 1: "dog", 2: "fox"}
    assert_same_logits(run(again, x), out.logits)


def test_hf_deit_base_model_and_the_one_head_classifier(tmp_path):
    """A DeiTModel (no head, a pooler) loads as features; a DeiTForImageClassification, whose one
    classifier ignores the distillation token, is refused by name rather than loaded wrongly."""
    base = hf_deit(transformers.DeiTModel)
    base.save_pretrained(tmp_path / "base")
    with pytest.warns(UserWarning, match="pooler"):
        ours = vc.load(tmp_path / "base", "hf").eval()
    assert ours.cfg.num_classes == 0 and ours.cfg.dist_token
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_same_logits(ours.forward_features(x), base(x).last_hidden_state)
    hf_deit(transformers.DeiTForImageClassification).save_pretrained(tmp_path / "one-head")
    with pytest.raises(CheckpointError, match="a DeiTForImageClassification, whose one classifier"):
        vc.load(tmp_path / "one-head", "hf")


@pytest.mark.parametrize("registers, swiglu", [(0, False), (4, False), (0, True)],
                         ids=["dinov2", "dinov2-with-registers", "dinov2-giant-swiglu"])
def test_hf_dinov2_both_ways(tmp_path, registers, swiglu):
    """transformers' DINOv2 backbone (LayerScale; with registers, which HF gives no positions; the
    giant's SwiGLU MLP, whose width HF rounds from its mlp_ratio): its
    features and pooled output; back into transformers after the registers' zero position rows have
    learned something (folded into the register tokens on export); its image classifier (vitkit's
    pool="cls_mean") both ways; what either side lacks refused by name."""
    kw = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14,
              layerscale_value=0.5, use_swiglu_ffn=swiglu)
    if registers:
        cls, cfg = transformers.Dinov2WithRegistersModel, transformers.Dinov2WithRegistersConfig(
            num_register_tokens=registers, **kw)
    else:
        cls, cfg = transformers.Dinov2Model, transformers.Dinov2Config(**kw)
    theirs = cls(cfg).eval()
    with torch.no_grad():  # away from their init, so that a missing or swapped gamma or register shows
        for layer in theirs.encoder.layer:
            layer.layer_scale1.lambda1.normal_()
            layer.layer_scale2.lambda1.normal_()
        if registers:
            theirs.embeddings.register_tokens.normal_()
    theirs.save_pretrained(tmp_path / "hf")
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        out = theirs(x)
    with pytest.warns(UserWarning, match="mask_token"):
        ours = vc.load(tmp_path / "hf", "hf").eval()
    assert (ours.cfg.reg_tokens, ours.cfg.layer_scale, ours.cfg.num_classes) == (registers, 0.5, 0)
    assert ours.cfg.mlp_act == ("swiglu" if swiglu else "gelu")
    with torch.no_grad():
        assert_same_logits(ours.forward_features(x), out.last_hidden_state)
        assert_same_logits(ours(x), out.pooler_output)  # the class token after the final norm
        ours.patch_embed.positions[:, 1:1 + registers].normal_()  # as training would move them
        expected = ours.forward_features(x)
    vc.export(ours, tmp_path / "back", "hf")
    again = cls.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert_same_logits(again(x).last_hidden_state, expected)
        with pytest.warns(UserWarning, match="mask_token"):
            assert_same_logits(vc.load(tmp_path / "back", "hf").forward_features(x), expected)
    with pytest.raises(ValueError, match="HF's DINOv2 classifier reads the class token and the patch tokens' mean"):
        vc.export(create_model(ours.cfg.replace(num_classes=3)), tmp_path / "head", "hf")

    # transformers' own DINOv2 classifier: the class token and the patch tokens' mean, concatenated
    head = (transformers.Dinov2WithRegistersForImageClassification if registers
            else transformers.Dinov2ForImageClassification)(cfg.__class__.from_dict(cfg.to_dict(), num_labels=3)).eval()
    getattr(head, head.base_model_prefix).load_state_dict(theirs.state_dict())  # the randomised backbone
    head.save_pretrained(tmp_path / "classifier")
    expected = run(head, x)
    with pytest.warns(UserWarning, match="mask_token"):
        ours = vc.load(tmp_path / "classifier", "hf")
    assert (ours.cfg.pool, ours.cfg.num_features, ours.cfg.num_classes) == ("cls_mean", 128, 3)
    assert_same_logits(run(ours, x), expected)
    vc.export(ours, tmp_path / "classifier-back", "hf")
    assert_same_logits(run(type(head).from_pretrained(tmp_path / "classifier-back"), x), expected)
    with pytest.raises(ValueError, match="no timm ViT pools"):
        vc.export(ours, tmp_path / "timm", "timm")


def hf_clip_vision(cls):
    cfg = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=32, patch_size=8, hidden_act="gelu",
                                        projection_dim=16)
    return cls(cfg).eval()


def test_hf_clip_vision_tower_both_ways(tmp_path):
    """transformers' CLIP vision tower (pre-norm, no patch bias, post_layernorm on the pooled token):
    its hidden states and pooled output; with its projection, the image embeddings as vitkit's logits;
    a whole CLIPModel's vision half; back into transformers; OpenAI's QuickGELU refused."""
    x = torch.randn(2, 3, 32, 32)
    tower = hf_clip_vision(transformers.CLIPVisionModel)
    tower.save_pretrained(tmp_path / "tower")
    ours = vc.load(tmp_path / "tower", "hf").eval()
    assert ours.cfg.pre_norm and ours.cfg.final_norm == "pooled" and ours.cfg.num_classes == 0
    with torch.no_grad():
        out = tower(x)
        assert_same_logits(ours.forward_features(x), out.last_hidden_state)
        assert_same_logits(ours(x), out.pooler_output)
    vc.export(ours, tmp_path / "tower-back", "hf")
    with torch.no_grad():
        assert_same_logits(transformers.CLIPVisionModel.from_pretrained(tmp_path / "tower-back").eval()(x)
                           .pooler_output, out.pooler_output)

    projected = hf_clip_vision(transformers.CLIPVisionModelWithProjection)
    projected.save_pretrained(tmp_path / "projected")
    ours = vc.load(tmp_path / "projected", "hf").eval()
    with torch.no_grad():
        embeds = projected(x).image_embeds
    assert ours.cfg.num_classes == 16
    assert_same_logits(run(ours, x), embeds)
    vc.export(ours, tmp_path / "projected-back", "hf")
    with torch.no_grad():
        again = transformers.CLIPVisionModelWithProjection.from_pretrained(tmp_path / "projected-back").eval()
        assert_same_logits(again(x).image_embeds, embeds)
        ours.head.fc.bias.add_(1.0)  # as fine-tuning would: HF's projection has no bias to hold it
    with pytest.raises(ValueError, match="HF's CLIP projection has no bias"):
        vc.export(ours, tmp_path / "biased", "hf")

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    whole = transformers.CLIPModel(transformers.CLIPConfig(vision_config=projected.config.to_dict(),
                                                           text_config=text, projection_dim=16)).eval()
    whole.save_pretrained(tmp_path / "whole")
    with pytest.warns(UserWarning, match="its text tower and logit scale"):
        ours = vc.load(tmp_path / "whole", "hf").eval()
    with torch.no_grad():  # transformers 5: the projected image embeddings as the pooler output
        assert_same_logits(run(ours, x), whole.get_image_features(pixel_values=x).pooler_output)

    # OpenAI's CLIP (QuickGELU): the same weights give other outputs, which vitkit reproduces
    openai = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**dict(tower.config.to_dict(),
                                                                             hidden_act="quick_gelu"))).eval()
    openai.load_state_dict(tower.state_dict())
    openai.save_pretrained(tmp_path / "openai")
    ours = vc.load(tmp_path / "openai", "hf").eval()
    with torch.no_grad():
        quick = openai(x).pooler_output
        assert (quick - out.pooler_output).abs().max() > 1e-3  # the activation alone moves the output
        assert ours.cfg.mlp_act == "quick_gelu"
        assert_same_logits(ours(x), quick)
    vc.export(ours, tmp_path / "openai-back", "hf")
    assert json.loads((tmp_path / "openai-back" / "config.json").read_text())["hidden_act"] == "quick_gelu"


def test_siglip_towers_between_timm_and_hf(tmp_path):
    """SigLIP's tower: no class token, attention pooling (a learned query over every token, then an
    MLP; vitkit's pool="map"), GELU's tanh form in transformers. transformers' SiglipVisionModel:
    hidden states and pooled output, back into transformers (its pooling head's fused in_proj split
    and fused again); timm's SigLIP with a classifier after the pooling, both ways; timm's through
    vitkit into transformers."""
    cfg = transformers.SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, image_size=32, patch_size=8)
    theirs = transformers.SiglipVisionModel(cfg).eval()
    theirs.save_pretrained(tmp_path / "hf")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = theirs(x)
    ours = vc.load(tmp_path / "hf", "hf").eval()
    assert (ours.cfg.class_token, ours.cfg.pool, ours.cfg.mlp_act) == (False, "map", "gelu_tanh")
    with torch.no_grad():
        assert_same_logits(ours.forward_features(x), out.last_hidden_state)
        assert_same_logits(ours(x), out.pooler_output)
    vc.export(ours, tmp_path / "back", "hf")
    with torch.no_grad():
        again = transformers.SiglipVisionModel.from_pretrained(tmp_path / "back").eval()
        assert_same_logits(again(x).pooler_output, out.pooler_output)

    peer = timm_vit("vit_base_patch16_siglip_224", num_classes=5)
    x = torch.randn(2, 3, 224, 224)
    expected = run(peer, x)
    mine = vc.load(save_timm(peer, tmp_path / "w.safetensors"), "timm", model="vit_base_patch16_siglip_224")
    assert mine.cfg.pool == "map" and mine.cfg.mlp_act == "gelu"  # timm runs SigLIP with exact GELU
    with torch.device("meta"):  # the variant table's SigLIP towers are timm's
        for name in ("vit_base_patch16_siglip_224", "vit_so400m_patch14_siglip_224"):
            assert (sum(p.numel() for p in create_model(name).parameters())
                    == sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters()))
    assert_same_logits(run(mine, x), expected)
    vc.export(mine, tmp_path / "hubdir", "timm")
    assert_same_logits(run(timm.create_model(f"local-dir:{tmp_path / 'hubdir'}", pretrained=True), x), expected)
    with pytest.raises(ValueError, match="HF's SigLIP tower pools by attention .* and has no classifier"):
        vc.export(mine, tmp_path / "classifier", "hf")
    mine.reset_classifier(0)
    vc.export(mine, tmp_path / "features", "hf")
    with torch.no_grad():
        hf = transformers.SiglipVisionModel.from_pretrained(tmp_path / "features").eval()
        assert hf.config.hidden_act == "gelu"
        assert_same_logits(hf(x).pooler_output, peer.forward_head(peer.forward_features(x), pre_logits=True))


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_hf_clip_and_siglip_image_classifiers_both_ways(tmp_path, family):
    """transformers' CLIPForImageClassification and SiglipForImageClassification: the tower, and a
    classifier on the mean of the patch tokens, which CLIP takes before its post_layernorm and SigLIP
    after it (SigLIP's attention-pooling head goes unread). Logits and class names into vitkit, back
    into transformers, and on into timm. The LayerNorms are randomised first, so that a norm applied where the
    classifier skips it (or skipped where it applies) would show."""
    cls, config_cls = {"clip": (transformers.CLIPForImageClassification, transformers.CLIPConfig),
                       "siglip": (transformers.SiglipForImageClassification, transformers.SiglipConfig)}[family]
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8, hidden_act="quick_gelu" if family == "clip" else "gelu_pytorch_tanh")
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    names = ["cat", "dog", "fox"]
    theirs = cls(config_cls(vision_config=vision, text_config=text, id2label=dict(enumerate(names)),
                            label2id={n: i for i, n in enumerate(names)})).eval()
    with torch.no_grad():
        for module in theirs.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_()
                module.bias.normal_()
    theirs.save_pretrained(tmp_path / "hf")
    x = torch.randn(2, 3, 32, 32)
    expected = run(theirs, x)
    with pytest.warns(UserWarning, match="does not use"):  # CLIP's post_layernorm, SigLIP's pooling head
        ours = vc.load(tmp_path / "hf", "hf").eval()
    assert (ours.cfg.pool, ours.cfg.num_classes, ours.class_names) == ("mean", 3, names)
    assert ours.cfg.final_norm == ("none" if family == "clip" else "tokens")
    assert_same_logits(run(ours, x), expected)
    vc.export(ours, tmp_path / "back", "hf")
    again = cls.from_pretrained(tmp_path / "back").eval()
    assert again.config.id2label == dict(enumerate(names))
    assert_same_logits(run(again, x), expected)
    vc.export(ours, tmp_path / "timm", "timm")  # CLIP's: timm's final_norm=False, no norm at all
    assert_same_logits(run(timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True), x), expected)
    # what neither class holds: SigLIP's attention pooling under a classifier, CLIP's mean without a class token
    refused = ours.cfg.replace(**({"pool": "map"} if family == "siglip" else {"class_token": False}))
    with pytest.raises(ValueError, match="HF's SigLIP tower pools by attention" if family == "siglip"
                       else "HF's CLIPForImageClassification averages"):
        vc.export(create_model(refused), tmp_path / "refused", "hf")


def test_hf_mae_encoder_is_read_without_its_decoder(tmp_path):
    """A ViTMAEForPreTraining directory (model_type vit_mae): its encoder, a plain ViT, as features;
    the pixel decoder left out with one warning. The oracle is transformers' ViTMAEModel with
    nothing masked and the tokens in order."""
    cfg = transformers.ViTMAEConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                    image_size=32, patch_size=8, decoder_hidden_size=32, decoder_num_hidden_layers=1,
                                    decoder_num_attention_heads=2, decoder_intermediate_size=64)
    transformers.ViTMAEForPreTraining(cfg).save_pretrained(tmp_path / "mae")
    with pytest.warns(UserWarning, match="MAE's pixel decoder"):
        ours = vc.load(tmp_path / "mae", "hf").eval()
    assert ours.cfg.num_classes == 0
    encoder = transformers.ViTMAEModel.from_pretrained(tmp_path / "mae", mask_ratio=0.0).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        theirs = encoder(x, noise=torch.arange(16.0).expand(2, 16)).last_hidden_state  # no shuffle
        assert_same_logits(ours.forward_features(x), theirs)


@pytest.mark.parametrize("family", ["vit_msn", "ijepa"])
def test_hf_vit_msn_and_ijepa_are_read(tmp_path, family):
    """Meta's ViT-MSN (ViT's layout under its own model_type) and I-JEPA (ViT's layout without a class
    token; its classifier on the mean of every token): the classifier's logits, and the base model's
    features. An I-JEPA model goes back out as SigLIP's classes, which hold the same network."""
    kw = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
              patch_size=8, num_labels=3)
    if family == "vit_msn":
        config, classifier, base = (transformers.ViTMSNConfig(**kw), transformers.ViTMSNForImageClassification,
                                    transformers.ViTMSNModel)
    else:
        config, classifier, base = (transformers.IJepaConfig(**kw), transformers.IJepaForImageClassification,
                                    transformers.IJepaModel)
    theirs = classifier(config).eval()
    with torch.no_grad():  # their init zeroes some of these: a token or norm read wrongly would not show
        for name, p in theirs.named_parameters():
            if "layernorm" in name or "embeddings" in name:
                p.normal_()
    theirs.save_pretrained(tmp_path / "classifier")
    x = torch.randn(2, 3, 32, 32)
    ours = vc.load(tmp_path / "classifier", "hf").eval()
    assert (ours.cfg.class_token, ours.cfg.pool) == ((True, "cls") if family == "vit_msn" else (False, "mean"))
    assert_same_logits(run(ours, x), run(theirs, x))
    if family == "vit_msn":  # the Hub's files (transformers 4) hold the blocks under "vit.", as ViT's do
        hub = {("vit." + k if k.startswith("encoder.") else k): v
               for k, v in load_state_dict_file(tmp_path / "classifier" / "model.safetensors").items()}
        save_file(hub, tmp_path / "classifier" / "model.safetensors")
        assert_same_logits(run(vc.load(tmp_path / "classifier", "hf"), x), run(theirs, x))
    backbone = base(config).eval()
    backbone.load_state_dict(getattr(theirs, theirs.base_model_prefix).state_dict())  # the same weights
    backbone.save_pretrained(tmp_path / "base")
    features = vc.load(tmp_path / "base", "hf").eval()
    with torch.no_grad():
        assert_same_logits(features.forward_features(x), backbone(x).last_hidden_state)
    if family == "ijepa":
        vc.export(ours, tmp_path / "back", "hf")
        assert_same_logits(run(transformers.SiglipForImageClassification.from_pretrained(tmp_path / "back"), x),
                           run(theirs, x))


HF_FAMILY_DEFAULTS = {  # a tiny model of each family, and what its config class fills where config.json is silent
    "clip": (transformers.CLIPModel, lambda v, t: transformers.CLIPConfig(vision_config=v, text_config=t),
             dict(patch_size=32, image_size=64)),
    "siglip": (transformers.SiglipModel, lambda v, t: transformers.SiglipConfig(vision_config=v, text_config=t),
               dict(patch_size=16, image_size=32)),
    "dinov2": (transformers.Dinov2Model, lambda v, t: transformers.Dinov2Config(**v), dict(patch_size=14, image_size=28)),
    "vit_msn": (transformers.ViTMSNModel, lambda v, t: transformers.ViTMSNConfig(**v),
                dict(patch_size=16, image_size=32, intermediate_size=128)),
}


@pytest.mark.parametrize("family", list(HF_FAMILY_DEFAULTS))
def test_hf_config_without_act_or_eps_is_read_with_the_familys_defaults(tmp_path, family):
    """A config.json (or a whole model's vision_config) without hidden_act, layer_norm_eps or patch_size:
    transformers builds the family's defaults (CLIP QuickGELU, 1e-5, patch 32; SigLIP GELU-tanh, 1e-6;
    DINOv2 1e-6, patch 14; ViT-MSN 1e-6), and so does vitkit, not ViT's GELU, 1e-12 and 16. The
    embeddings are scaled down so that the LayerNorms' eps shows in the outputs."""
    cls, make_config, sizes = HF_FAMILY_DEFAULTS[family]
    vision = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, **sizes)
    if family in ("clip", "siglip"):
        vision["intermediate_size"] = 128
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    theirs = cls(make_config(vision, text)).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "embedding" in name:
                p.mul_(1e-3)
    theirs.save_pretrained(tmp_path / "hf")
    config_file = tmp_path / "hf" / "config.json"
    config = json.loads(config_file.read_text())
    vision_config = config.get("vision_config", config)
    for name in ("hidden_act", "layer_norm_eps", "patch_size"):
        del vision_config[name]
    config_file.write_text(json.dumps(config))
    x = torch.randn(2, 3, sizes["image_size"], sizes["image_size"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the text tower, the pooler, the mask token: not read
        ours = vc.load(tmp_path / "hf", "hf").eval()
    again = cls.from_pretrained(tmp_path / "hf").eval()  # transformers' own reading of the same directory
    vision_cfg = getattr(again.config, "vision_config", again.config)
    assert ours.cfg.norm_eps == vision_cfg.layer_norm_eps and ours.cfg.patch_size == vision_cfg.patch_size
    with torch.no_grad():
        if family in ("clip", "siglip"):
            expected = again.get_image_features(pixel_values=x).pooler_output
            assert_same_logits(ours(x), expected)
        else:
            assert_same_logits(ours.forward_features(x), again(x).last_hidden_state)


@pytest.mark.parametrize("family", ["dinov2", "beit"])
def test_hf_export_refuses_a_non_square_dinov2_or_beit(tmp_path, family):
    """transformers' DINOv2 reads its position table as a square grid in every forward pass (a 32x48 model's
    directory was written, then failed in transformers' forward), and its BEiT lays a non-square grid's
    relative positions out transposed (other logits): refused by name. timm holds them, with timm's logits."""
    fields = dict(img_size=(32, 48), patch_size=8, emb_size=64, depth=1, num_heads=4, layer_scale=0.1, norm_eps=1e-6)
    fields.update(dict(num_classes=0, pool="cls", final_norm="tokens") if family == "dinov2" else
                  dict(num_classes=5, pool="mean", final_norm="pooled", rel_pos_bias=True))
    ours = create_model(ViTConfig(**fields)).eval()
    with pytest.raises(ValueError, match=r"hf export: HF's .* takes square images only .*this model is 32x48"):
        vc.export(ours, tmp_path / "hf", "hf")
    assert not (tmp_path / "hf").exists()
    vc.export(ours, tmp_path / "timm", "timm")
    x = torch.randn(2, 3, 32, 48)
    theirs = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    assert_same_logits(run(theirs, x), run(ours, x))


def test_hf_vitmodel_pooler_is_dropped_and_features_match(tmp_path):
    base = transformers.ViTModel(hf_vit().config).eval()  # has a pooler, no classifier
    base.save_pretrained(tmp_path / "base")
    with pytest.warns(UserWarning, match="pooler"):
        ours = vc.load(tmp_path / "base", "hf").eval()
    assert ours.cfg.num_classes == 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_same_logits(ours.forward_features(x), base(x).last_hidden_state)


# --- torchvision ------------------------------------------------------------------------------------
def test_torchvision_vit_b_32(tmp_path):
    # vit_b_32's patch, width, heads and MLP; two layers to stay fast (a full vit_b_32 takes ~20 s here)
    theirs = torchvision.models.VisionTransformer(
        image_size=224, patch_size=32, num_layers=2, num_heads=12, hidden_dim=768, mlp_dim=3072, num_classes=10
    ).eval()
    torch.save(theirs.state_dict(), tmp_path / "vit_b_32.pth")
    x = torch.randn(2, 3, 224, 224)
    ours = vc.load(tmp_path / "vit_b_32.pth", "torchvision", model="vit_base_patch32_224")
    assert_same_logits(run(ours, x), run(theirs, x))
    # and back into torchvision, strictly
    vc.export(ours, tmp_path / "back.pth", "torchvision")
    fresh = torchvision.models.VisionTransformer(
        image_size=224, patch_size=32, num_layers=2, num_heads=12, hidden_dim=768, mlp_dim=3072, num_classes=10
    )
    fresh.load_state_dict(torch.load(tmp_path / "back.pth", weights_only=True), strict=True)
    assert_same_logits(run(fresh, x), run(theirs, x))


def test_torchvision_heads_by_width_are_torchvisions_own(tmp_path):
    """Heads are not in a torchvision file: without --model, torchvision's own ViTs' heads at that width
    (vit_h_14: 16 at width 1280, where width / 64 says 20), checked against torchvision's builders, and
    vit_h_14's width and heads (one block, a small MLP, to stay fast) give torchvision's logits."""
    theirs = torchvision.models.VisionTransformer(image_size=28, patch_size=14, num_layers=1, num_heads=16,
                                                  hidden_dim=1280, mlp_dim=256, num_classes=5).eval()
    torch.save(theirs.state_dict(), tmp_path / "vit_h.pth")
    with pytest.warns(UserWarning, match="torchvision's own ViTs' 16 heads at width 1280"):
        ours = vc.load(tmp_path / "vit_h.pth", "torchvision")
    assert ours.cfg.num_heads == 16
    x = torch.randn(2, 3, 28, 28)
    assert_same_logits(run(ours, x), run(theirs, x))
    from vitkit.convert.torchvision import TORCHVISION_HEADS

    with torch.device("meta"):
        for build in (torchvision.models.vit_b_16, torchvision.models.vit_l_16, torchvision.models.vit_h_14):
            model = build()
            assert TORCHVISION_HEADS[model.hidden_dim] == model.encoder.layers[0].self_attention.num_heads


def test_torchvision_full_vit_b_32(tmp_path):
    """The real torchvision.models.vit_b_32() (12 layers, 1000 classes), random weights, into vitkit."""
    theirs = torchvision.models.vit_b_32().eval()
    torch.save(theirs.state_dict(), tmp_path / "vit_b_32.pth")
    x = torch.randn(2, 3, 224, 224)
    ours = vc.load(tmp_path / "vit_b_32.pth", "torchvision", model="vit_base_patch32_224")
    assert ours.cfg.depth == 12 and ours.cfg.num_classes == 1000
    assert_same_logits(run(ours, x), run(theirs, x))


def test_a_vit_without_absolute_positions_goes_to_timm_and_back(tmp_path):
    """abs_pos=False: timm's pos_embed='none' (no pos_embed tensor), both ways, the same logits; a bare file
    is read without positions too, and vitkit's model has nothing to train where timm's has nothing."""
    theirs = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64,
                               depth=2, num_heads=4, num_classes=7, pos_embed="none").eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.3)
    assert "pos_embed" not in theirs.state_dict()
    with pytest.warns(UserWarning, match="normalisation"):
        ours = vc.load(save_timm(theirs, tmp_path / "w.safetensors"), "timm", num_heads=4, img_size=32)
    assert not ours.cfg.abs_pos and ours.patch_embed.positions is None
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    x = torch.randn(2, 3, 32, 32)
    assert_same_logits(run(ours, x), run(theirs, x))
    back = timm.create_model(f"local-dir:{vc.export(ours, tmp_path / 'hub', 'timm')}", pretrained=True).eval()
    assert back.pos_embed is None
    assert_same_logits(run(back, x), run(theirs, x))
    with pytest.raises(ValueError, match="abs_pos=False"):  # HF's ViT always adds positions
        vc.export(ours, tmp_path / "hf", "hf")


@pytest.mark.parametrize("pool_prefix", [True, False])
def test_attention_pooling_with_or_without_the_prefix_tokens_goes_to_timm(tmp_path, pool_prefix):
    """A class token and registers beside pool='map': timm's VisionTransformer pools the patch tokens alone
    unless pool_include_prefix; vitkit's export says which, and timm computes the same logits."""
    cfg = ViTConfig(img_size=32, patch_size=8, emb_size=64, depth=1, num_heads=4, num_classes=3, reg_tokens=2,
                    pool="map", pool_prefix=pool_prefix, final_norm="tokens", norm_eps=1e-6)
    model = ViT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 3, 32, 32)
    assert_same_logits(run(timm_twin(model), x), run(model, x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert vc.load(vc.export(model, tmp_path / "hub", "timm"), "timm").cfg.pool_prefix == pool_prefix


@pytest.mark.parametrize("include", [True, False])
def test_a_bare_file_pooled_by_attention_beside_prefix_tokens_says_what_it_assumed(tmp_path, include):
    """A bare file cannot say whether its model pooled the class token too (pool_include_prefix): read as
    timm's default builds it, with a warning, and exactly with pool_prefix given. A hub config that averages
    the prefix tokens in, which vitkit's mean does not, is refused."""
    theirs = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, patch_size=8,
                               num_classes=3, global_pool="map", pool_include_prefix=include).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.3)
    path = save_timm(theirs, tmp_path / "w.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with pytest.warns(UserWarning, match="pool_include_prefix=True"):
        assumed = vc.load(path, "timm", num_heads=3)
    assert assumed.cfg.pool_prefix is False
    told = vc.load(path, "timm", num_heads=3, pool_prefix=include)
    assert_same_logits(run(told, x), run(theirs, x))
    if include:
        assert (run(assumed, x) - run(theirs, x)).abs().max() > 1e-2
    (tmp_path / "avg").mkdir()
    averaged = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, patch_size=8,
                                 num_classes=3, global_pool="avg", pool_include_prefix=True)
    save_timm(averaged, tmp_path / "avg" / "model.safetensors")
    (tmp_path / "avg" / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "model_args": {
        "global_pool": "avg", "pool_include_prefix": True}}))
    with pytest.raises(CheckpointError, match="pool_include_prefix=True with average pooling"):
        vc.load(tmp_path / "avg", "timm")
    with pytest.raises(ValueError, match="pool_prefix"):  # only attention pooling beside prefix tokens leaves them out
        ViTConfig(img_size=32, patch_size=8, emb_size=64, num_heads=4, pool="mean", pool_prefix=False)
    assert told.cfg.replace(pool="cls", final_norm="tokens").pool_prefix is True  # a new pool: the field's default


def test_attention_pooling_with_heads_of_its_own_goes_to_timm_alone(tmp_path):
    """pool_heads (the Perception Encoder's 8): timm's Eva holds it (attn_pool_num_heads), the same logits;
    the formats and classes whose pooling has the blocks' heads, or none, refuse it by name."""
    cfg = ViTConfig(img_size=32, patch_size=8, emb_size=64, depth=1, num_heads=4, num_classes=3, pre_norm=True,
                    rope="pe", rope_ref_grid=4, rope_grid_offset=1.0, pool="map", pool_heads=2, final_norm="tokens",
                    norm_eps=1e-5)
    model = ViT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        four_heads = ViT(cfg.replace(pool_heads=0)).eval()
        four_heads.load_state_dict(model.state_dict())
        assert not torch.allclose(four_heads(x), model(x), atol=1e-4)  # the heads matter at these weights
    assert_same_logits(run(timm_twin(model), x), run(model, x))
    with pytest.raises(ValueError, match="pool_heads=2"):  # HF holds a pre-norm and rotations, not this
        vc.export(model, tmp_path / "hf", "hf")
    plain = ViT(cfg.replace(pre_norm=False, rope="none", rope_ref_grid=0, rope_grid_offset=0.0))
    with pytest.raises(ValueError, match="VisionTransformer pools with its blocks' heads"):
        vc.export(plain, tmp_path / "plain.safetensors", "timm")


@pytest.mark.parametrize("architecture, img", [("vit_so400m_patch16_siglip_256", 64), ("eva_giant_patch14_224", 56),
                                               ("vit_so150m_patch16_reg4_map_256", 64)])
def test_a_hub_dir_naming_only_an_architecture_vitkit_lacks_is_read_as_timm_builds_it(tmp_path, monkeypatch,
                                                                                       architecture, img):
    """timm's own hub configs name the architecture and give no model_args. For one not in vitkit's table,
    timm's registry tells the heads (16 for the first two, where the width / 64 convention says 18 and 22) and the MLP's
    activation (SigLIP's newer towers: GELU's tanh form; 2e-3 apart from exact GELU at these weights).
    EVA-01 (timm's Eva, BEiT's names, no rotation) is read as the plain ViT it is; so150m's attention pooling
    reads the patch tokens alone, not its 4 registers (pool_prefix=False). The table now names all three: they are
    taken out of it here, and read with it, the same model."""
    theirs = timm.create_model(architecture, pretrained=False, depth=2, img_size=img).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1 if name.endswith("norm.weight") else 0))
    (tmp_path / "hub").mkdir()
    save_file(dict(theirs.state_dict()), tmp_path / "hub" / "model.safetensors")
    (tmp_path / "hub" / "config.json").write_text(json.dumps({"architecture": f"{architecture}.some_tag",
                                                              "model_args": {"img_size": img}}))
    with pytest.warns(UserWarning, match="normalisation"):
        named = vc.load(tmp_path / "hub", "timm")  # the variant table's entry
    monkeypatch.delitem(VARIANTS, architecture)
    with pytest.warns(UserWarning, match="normalisation"):
        ours = vc.load(tmp_path / "hub", "timm")  # timm's registry
    assert ours.cfg == named.cfg
    assert ours.cfg.num_heads == theirs.blocks[0].attn.num_heads
    assert ours.cfg.pool_prefix == ("reg4_map" not in architecture)
    x = torch.randn(2, 3, img, img)
    assert_same_logits(run(ours, x), run(theirs, x))


# --- JAX .npz ----------------------------------------------------------------------------------------
def tiny_vitkit(**kw) -> ViT:
    fields = dict(img_size=32, patch_size=8, emb_size=64, depth=2, num_heads=4, num_classes=7,
                  class_token=True, pool="cls", final_norm="tokens", norm_eps=1e-6)
    fields.update(kw)
    return ViT(ViTConfig(**fields)).eval()


def timm_like(model: ViT, **kw):
    c = model.cfg
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
        num_classes=7, class_token=c.class_token, global_pool="token" if c.pool == "cls" else "avg", fc_norm=False,
        **kw,
    ).eval()


@pytest.mark.parametrize("kw", [{}, dict(class_token=False, pool="mean")], ids=["token", "gap"])
def test_jax_npz_written_by_vitkit_loads_in_timm_and_back(tmp_path, kw):
    ours = tiny_vitkit(**kw)
    npz = vc.export(ours, tmp_path / "vit.npz", "jax")
    x = torch.randn(2, 3, 32, 32)
    theirs = timm_like(ours)
    theirs.load_pretrained(str(npz))  # timm's own JAX loader (_load_weights) is the oracle
    assert_same_logits(run(theirs, x), run(ours, x))
    back = vc.load(npz, "jax")
    assert back.cfg.num_heads == 4  # JAX stores q/k/v kernels as (E, h, d): heads are read
    assert_same_logits(run(back, x), run(ours, x))



def test_jax_export_refuses_mean_pooling_beside_a_class_token(tmp_path):
    """Google's layout pools the class token ("token") or, without one, the tokens' mean ("gap"): a model
    with a class token and pool="mean" would be read back (by vitkit and by timm's npz loader, which
    reads the file into a class-token model) as one that classifies the class token. Refused by name."""
    ours = tiny_vitkit(pool="mean")
    with pytest.raises(ValueError, match=r"class_token=True and pool='mean'.*export to timm, hf or vitkit"):
        vc.export(ours, tmp_path / "vit.npz", "jax")
    assert not (tmp_path / "vit.npz").exists()


def test_jax_export_refuses_a_non_square_model(tmp_path):
    """An .npz holds no image size, and vitkit's reader takes its positions for a square grid: a 32x48 model
    was written, then refused by vitkit's own reader. Refused at export, by name; at a square size it goes."""
    ours = tiny_vitkit(img_size=(32, 48))
    with pytest.raises(ValueError, match=r"jax export: an .npz holds no image size.*this model is 32x48"):
        vc.export(ours, tmp_path / "vit.npz", "jax")
    assert not (tmp_path / "vit.npz").exists()
    square = tiny_vitkit()
    x = torch.randn(2, 3, 32, 32)
    assert_same_logits(run(vc.load(vc.export(square, tmp_path / "square.npz", "jax"), "jax"), x), run(square, x))


def test_jax_export_without_qkv_bias_writes_zero_biases_that_timm_reads(tmp_path):
    """Google's attention always has q, k and v biases, and timm's npz loader reads them: a model without
    (qkv_bias=False) is written with zero biases (it crashed timm's loader), the same network."""
    ours = tiny_vitkit(qkv_bias=False)
    npz = vc.export(ours, tmp_path / "vit.npz", "jax")
    x = torch.randn(2, 3, 32, 32)
    theirs = timm_like(ours)
    theirs.load_pretrained(str(npz))
    assert_same_logits(run(theirs, x), run(ours, x))
    assert_same_logits(run(vc.load(npz, "jax"), x), run(ours, x))


def test_a_file_of_another_format_read_as_jax_or_torchvision_says_what_it_is(tmp_path, capsys):
    """A torchvision .pth read as JAX (np.load opens any zip: it ended in a TypeError) and a directory read
    as torchvision (it said 'no such file') are named for what they are and what was expected."""
    theirs = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2,
                                                  hidden_dim=32, mlp_dim=64, num_classes=3)
    torch.save(theirs.state_dict(), tmp_path / "tv.pth")
    assert cli(["convert", str(tmp_path / "tv.pth"), str(tmp_path / "o"), "--from", "jax"]) == 2
    err = capsys.readouterr().err
    assert "not a JAX .npz" in err and "a PyTorch checkpoint" in err and "--from torchvision" in err
    np.savez(tmp_path / "text.npz", labels=np.array([b"cat", b"dog"]))
    with pytest.raises(CheckpointError, match=r"not a JAX .npz: expected numeric arrays, found 1 .*'labels'"):
        vc.load(tmp_path / "text.npz", "jax")
    (tmp_path / "somedir").mkdir()
    assert cli(["convert", str(tmp_path / "somedir"), str(tmp_path / "o"), "--from", "torchvision"]) == 2
    err = capsys.readouterr().err
    assert "a directory; a torchvision checkpoint is one .pth file" in err
    assert not (tmp_path / "o").exists()


def test_jax_weights_run_as_jax_did_with_gelu_tanh(tmp_path):
    """mlp_act="gelu_tanh" (--mlp-act): GELU's tanh form, which Google's JAX ViTs were trained with;
    the oracle is timm with act_layer="gelu_tanh", through its own npz loader."""
    ours = tiny_vitkit()
    with torch.no_grad():  # an MLP of weight, on pre-activations of order 1, where the two forms part
        for block in ours.encoder.blocks:
            block.mlp.fc1.weight.mul_(50)
            block.mlp.fc2.weight.mul_(50)
    npz = vc.export(ours, tmp_path / "vit.npz", "jax")
    x = torch.randn(2, 3, 32, 32)
    tanh = timm_like(ours, act_layer="gelu_tanh")
    tanh.load_pretrained(str(npz))
    mine = vc.load(npz, "jax", mlp_act="gelu_tanh").eval()
    with torch.no_grad():  # the two forms differ by at most ~1e-3 per activation: compared tightly
        gap = (tanh.forward_features(x) - ours.forward_features(x)).abs().max().item()
        same = (tanh.forward_features(x) - mine.forward_features(x)).abs().max().item()
    assert same < 1e-6 < 2e-5 < gap, (same, gap)


@pytest.mark.parametrize("fmt", ["torchvision", "jax"])
def test_torchvision_and_jax_exports_warn_of_another_layernorm_eps(tmp_path, fmt):
    """torchvision's and Google's ViTs fix LayerNorm's eps at 1e-6; a model of another (vitkit's default 1e-5)
    is written with timm's export's warning, which says how to tell the reader: so told, the peer gives the
    model's logits. The LayerNorms' inputs are scaled down so that eps shows. At 1e-6, no warning."""
    from functools import partial

    ours = create_model(tiny_vitkit(norm_eps=1e-5).cfg).eval()
    with torch.no_grad():
        ours.patch_embed.projection.weight.mul_(1e-3)
        ours.patch_embed.projection.bias.mul_(1e-3)
        ours.patch_embed.cls_token.mul_(1e-3)
        ours.patch_embed.positions.mul_(1e-3)
    out = tmp_path / ("vit.npz" if fmt == "jax" else "vit.pth")
    with pytest.warns(UserWarning, match=rf"{fmt} export: the model's LayerNorm eps is 1e-05, {fmt}'s uses 1e-06"):
        vc.export(ours, out, fmt)
    x = torch.randn(2, 3, 32, 32)
    norm = partial(torch.nn.LayerNorm, eps=1e-5)
    if fmt == "jax":
        told = timm_like(ours, norm_layer=norm)
        told.load_pretrained(str(out))
        untold = vc.load(out, "jax")
        assert_same_logits(run(vc.load(out, "jax", norm_eps=1e-5), x), run(ours, x))
    else:
        kw = dict(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=256, num_classes=7)
        told = torchvision.models.VisionTransformer(**kw, norm_layer=norm).eval()
        told.load_state_dict(torch.load(out, weights_only=True))
        untold = torchvision.models.VisionTransformer(**kw).eval()
        untold.load_state_dict(torch.load(out, weights_only=True))
    assert_same_logits(run(told, x), run(ours, x))
    assert (run(untold, x) - run(ours, x)).abs().max() > 1e-3  # what the warning is about
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vc.export(create_model(ours.cfg.replace(norm_eps=1e-6)), tmp_path / ("same" + out.suffix), fmt)


def to_big_vision(npz_in, npz_out, scanned=False, keep_class_position=False):
    """Rename a vision_transformer-layout npz into big_vision's layout (big_vision/models/vit.py):
    ``params/`` prefix; block parts LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1,
    MlpBlock_0; ``pos_embedding`` at the top, added before the class token is prepended, so the
    class token's own position is folded into ``cls`` (big_vision's fix_old_checkpoints)."""
    with np.load(npz_in) as f:
        src = {k: f[k] for k in f.files}
    out = {}
    pe = src.pop("Transformer/posembed_input/pos_embedding")
    if "cls" in src and not keep_class_position:
        src["cls"] = src["cls"] + pe[:, :1]
        pe = pe[:, 1:]
    out["params/pos_embedding"] = pe
    renames = [("MultiHeadDotProductAttention_1", "MultiHeadDotProductAttention_0"), ("LayerNorm_2", "LayerNorm_1"),
               ("MlpBlock_3", "MlpBlock_0")]
    blocks: dict[str, list] = {}
    for k, v in src.items():
        for old, new in renames:
            k = k.replace(old, new)
        m = re.match(r"Transformer/encoderblock_(\d+)/(.*)", k)
        if scanned and m:  # nn.scan stacks the blocks on a leading axis
            blocks.setdefault(m.group(2), []).append((int(m.group(1)), v))
        else:
            out[f"params/{k}"] = v
    for name, parts in blocks.items():
        out[f"params/Transformer/encoderblock/{name}"] = np.stack([v for _, v in sorted(parts, key=lambda p: p[0])])
    np.savez(npz_out, **out)
    return npz_out


@pytest.mark.parametrize(
    "kw, scanned, keep_class_position",
    [({}, False, False), ({}, True, False), ({}, False, True), (dict(class_token=False, pool="mean"), False, False)],
    ids=["token", "scanned", "old-class-position", "gap"],
)
def test_jax_big_vision_layout(tmp_path, kw, scanned, keep_class_position):
    ours = tiny_vitkit(**kw)
    bv = to_big_vision(vc.export(ours, tmp_path / "vt.npz", "jax"), tmp_path / "bv.npz", scanned, keep_class_position)
    x = torch.randn(2, 3, 32, 32)
    if not keep_class_position:
        # timm reads big_vision files into a model whose class token has no position: the same network
        theirs = timm_like(ours, no_embed_class=True)
        theirs.load_pretrained(str(bv))
        assert_same_logits(run(theirs, x), run(ours, x))
    assert_same_logits(run(vc.load(bv, "jax"), x), run(ours, x))


BEYOND_PLAIN = [("dist_token", True, "DeiT's distillation token"), ("reg_tokens", 2, "register tokens"),
                ("layer_scale", 0.1, "LayerScale"), ("pre_norm", True, "CLIP's pre-norm"),
                ("mlp_act", "quick_gelu", "mlp_act='quick_gelu'"), ("mlp_act", "gelu_tanh", "mlp_act='gelu_tanh'"),
                ("rel_pos_bias", True, "BEiT's relative position bias"), ("rope", "dinov3", "rope='dinov3'"),
                ("abs_pos", False, "no absolute positions"), ("mlp_norm", True, "LayerNorm before fc2"),
                ("attn_norm", True, "LayerNorm before the attention's projection")]


@pytest.mark.parametrize("field, value, named", BEYOND_PLAIN, ids=[f"{f}={v}" for f, v, _ in BEYOND_PLAIN])
@pytest.mark.parametrize("fmt", ["jax", "torchvision"])
def test_export_refuses_what_the_format_cannot_hold_by_name(tmp_path, field, value, named, fmt):
    """Every field of convert.BEYOND_PLAIN_VIT, set, refused by the formats that lack it, naming the
    part (and the activation the model has) and the formats that hold it; timm holds them all."""
    assert field in vc.BEYOND_PLAIN_VIT
    cfg = ViTConfig(img_size=32, patch_size=8, emb_size=32, depth=1, num_heads=2, num_classes=3, pool="cls",
                    final_norm="tokens", **{field: value})
    model = create_model(cfg)
    holders = " or ".join(("vitkit", *vc.BEYOND_PLAIN_VIT[field][1]))
    with pytest.raises(ValueError, match=rf"target format {fmt}: this model has .*{re.escape(named)}.*"
                                         rf"save it in {holders} format instead"):
        vc.export(model, tmp_path / ("w.npz" if fmt == "jax" else "w.pth"), fmt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm's LayerNorm eps for the architecture: not this test's concern
        assert vc.export(model, tmp_path / "timm.safetensors", "timm").is_file()
        theirs = timm_twin(model)  # timm's model of the same architecture (its eps told), holding those tensors
    x = torch.randn(2, 3, 32, 32)
    assert_same_logits(run(theirs, x), run(model, x))


# --- the CLI --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_cli_timm_to_vitkit(tmp_path, capsys, suffix):
    theirs = timm_vit("vit_tiny_patch16_224", num_classes=10)
    src = save_timm(theirs, tmp_path / f"w{suffix}")
    assert cli(["convert", str(src), str(tmp_path / "out"), "--from", "timm", "--model", "vit_tiny_patch16_224"]) == 0
    assert "wrote" in capsys.readouterr().out
    x = torch.randn(2, 3, 224, 224)
    assert_same_logits(run(load_pretrained(tmp_path / "out"), x), run(theirs, x))
    if suffix == ".pth":
        return
    assert cli(["convert", str(src), str(tmp_path / "out384"), "--from", "timm", "--img-size", "384",
                "--num-heads", "3"]) == 0
    loaded = load_pretrained(tmp_path / "out384")
    assert loaded.cfg.img_size == (384, 384)
    timm384 = timm_vit("vit_tiny_patch16_224", num_classes=10, img_size=384)
    timm384.load_state_dict(checkpoint_filter_fn(theirs.state_dict(), timm384))
    x = torch.randn(2, 3, 384, 384)
    assert_same_logits(run(loaded, x), run(timm384, x))


def test_cli_vitkit_to_hf_and_errors(tmp_path, capsys):
    ours = tiny_vitkit(norm_eps=1e-12)
    vc.export(ours, tmp_path / "ckpt", "vitkit")
    assert cli(["convert", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--from", "vitkit", "--to", "hf"]) == 0
    x = torch.randn(2, 3, 32, 32)
    assert_same_logits(run(transformers.ViTForImageClassification.from_pretrained(tmp_path / "hf"), x), run(ours, x))
    # the source format is what the user says: a vitkit directory read as timm is an error naming the file
    assert cli(["convert", str(tmp_path / "ckpt"), str(tmp_path / "x"), "--from", "timm"]) == 2
    err = capsys.readouterr().err
    assert "patch_embed.proj.weight" in err and "timm" in err
    assert not (tmp_path / "x").exists()


def test_a_foreign_directory_opened_as_vitkits_says_how_to_convert_it(tmp_path):
    """load_pretrained (what predict, eval, attention and embed call) on a transformers or timm
    directory: the error names the library and the `vitkit convert` command that brings it over."""
    hf_vit().save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match=r"a Hugging Face model \(model_type 'vit'\): convert it first, "
                                              r"`vitkit convert .*hf OUT --from hf`"):
        load_pretrained(tmp_path / "hf")
    vc.export(create_model("vit_tiny_patch16_224", img_size=32, patch_size=8), tmp_path / "timm", "timm")
    with pytest.raises(CheckpointError, match=r"a timm model \(architecture 'vit_base_patch16_224'\): convert it "
                                              r"first, `vitkit convert .*timm OUT --from timm`"):
        load_pretrained(tmp_path / "timm")


def test_cli_refuses_a_malicious_pickle(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"patch_embed.proj.weight": torch.zeros(1), "evil": Evil()}, tmp_path / "evil.pth")
    assert cli(["convert", str(tmp_path / "evil.pth"), str(tmp_path / "out"), "--from", "timm"]) == 2
    assert "refused to load" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_bare_timm_state_dict_takes_its_normalisation_from_the_command(tmp_path, capsys):
    """A timm state dict does not hold its mean/std: the converter takes --mean/--std, else those of the weights
    timm names the --model for (its pretrained_cfg), else assumes ImageNet's and says so."""
    peer = timm.create_model("vit_tiny_patch16_224", depth=1, num_classes=3)
    save_file(peer.state_dict(), tmp_path / "w.safetensors")
    src, named = ["convert", str(tmp_path / "w.safetensors")], ["--from", "timm", "--model", "vit_tiny_patch16_224"]
    assert cli([*src, str(tmp_path / "guessed"), "--from", "timm"]) == 0
    assert "holds no input normalisation; ImageNet's mean/std are assumed" in capsys.readouterr().err
    assert load_pretrained(tmp_path / "guessed").preprocess["mean"] == [0.485, 0.456, 0.406]
    mean, std = (list(peer.pretrained_cfg[k]) for k in ("mean", "std"))
    assert mean != [0.485, 0.456, 0.406]  # these weights are not normalised like ImageNet's
    assert cli([*src, str(tmp_path / "named"), *named]) == 0
    assert "normalisation" not in capsys.readouterr().err
    pre = load_pretrained(tmp_path / "named").preprocess
    assert (pre["mean"], pre["std"], pre["crop_pct"]) == (mean, std, peer.pretrained_cfg["crop_pct"])
    given = ["--mean", "0.485", "0.456", "0.406", "--std", "0.229", "0.224", "0.225"]  # the command's win over the name's
    assert cli([*src, str(tmp_path / "given"), *named, *given]) == 0
    assert "normalisation" not in capsys.readouterr().err
    pre = load_pretrained(tmp_path / "given").preprocess
    assert (pre["mean"], pre["std"]) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert cli([*src, str(tmp_path / "bad"), *named, "--mean", "0.5", "0.5"]) == 2
    assert "--mean: preprocess.mean: expected 1 or 3 numbers, got [0.5, 0.5]" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_a_bare_clip_state_dict_named_converts_with_clips_normalisation(tmp_path):
    """A bare timm state dict of a CLIP tower read as the variant named: OpenAI's mean and std and the crop timm's
    pretrained_cfg gives the name, nothing assumed and nothing warned of; unnamed, ImageNet's, with the warning."""
    peer = timm.create_model("vit_base_patch16_clip_224", pretrained=False, depth=1, img_size=32)
    save_file(peer.state_dict(), tmp_path / "clip.safetensors")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = vc.load(tmp_path / "clip.safetensors", "timm", model="vit_base_patch16_clip_224")
    # (the one warning left: a bare CLIP tower's activation, which the name does not settle)
    assert not [w for w in caught if "normalisation" in str(w.message)]
    assert ours.preprocess == dict(img_size=[32, 32], mean=list(timm.data.OPENAI_CLIP_MEAN),
                                   std=list(timm.data.OPENAI_CLIP_STD), interpolation="bicubic",
                                   crop_pct=peer.pretrained_cfg["crop_pct"], crop_mode=peer.pretrained_cfg["crop_mode"])
    with pytest.warns(UserWarning, match="ImageNet's mean/std are assumed"):
        unnamed = vc.load(tmp_path / "clip.safetensors", "timm", num_heads=12)
    assert unnamed.preprocess["mean"] == list(timm.data.IMAGENET_DEFAULT_MEAN)


def test_a_name_whose_timm_weights_read_images_differently_still_warns(tmp_path):
    """Under vit_large_patch14_clip_224 timm holds LAION's weights (0.5, its default) and OpenAI's (CLIP's
    statistics): a bare file converted under that name takes the default's, and says which others there are."""
    peer = timm.create_model("vit_large_patch14_clip_224", pretrained=False, depth=1, img_size=28)
    save_file(peer.state_dict(), tmp_path / "l14.safetensors")
    with pytest.warns(UserWarning, match=r"vit_large_patch14_clip_224's default weights' mean/std in timm are "
                                         r"assumed \(\[0.5, 0.5, 0.5\].*\.openai.*pass --mean/--std"):
        ours = vc.load(tmp_path / "l14.safetensors", "timm", model="vit_large_patch14_clip_224")
    assert ours.preprocess["mean"] == [0.5, 0.5, 0.5] == list(peer.pretrained_cfg["mean"])
    with warnings.catch_warnings(record=True) as caught:  # told: no guess left to warn of
        warnings.simplefilter("always")
        told = vc.load(tmp_path / "l14.safetensors", "timm", model="vit_large_patch14_clip_224",
                       mean=list(timm.data.OPENAI_CLIP_MEAN), std=list(timm.data.OPENAI_CLIP_STD))
    assert told.preprocess["mean"] == list(timm.data.OPENAI_CLIP_MEAN)
    assert not [w for w in caught if "normalisation" in str(w.message)]


@pytest.mark.parametrize("patch, img", [(4, 32), (16, 64), (4, 24)], ids=["smaller", "larger", "smaller-at-24"])
def test_another_patch_size_resamples_the_kernels_as_timm_does(tmp_path, patch, img, capsys):
    """``--patch-size`` (FlexiViT's pseudo-inverse resize of the kernels, the positions to the new grid):
    vitkit's model gives the logits of timm's at that patch and image size through its checkpoint filter."""
    torch.manual_seed(0)
    theirs = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=5).eval()
    save_file(theirs.state_dict(), tmp_path / "p8.safetensors")
    at = timm.create_model("vit_tiny_patch16_224", img_size=img, patch_size=patch, depth=2, num_classes=5).eval()
    at.load_state_dict(checkpoint_filter_fn(theirs.state_dict(), at))
    out = tmp_path / f"p{patch}"
    assert cli(["convert", str(tmp_path / "p8.safetensors"), str(out), "--from", "timm", "--num-heads", "3",
                "--patch-size", str(patch), "--img-size", str(img)]) == 0
    ours = load_pretrained(out).eval()
    assert (ours.cfg.patch_size, ours.cfg.img_size) == (patch, (img, img))
    x = torch.randn(2, 3, img, img)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), at(x), atol=1e-5, rtol=1e-5)


def test_a_conv_stem_is_not_resampled_to_another_patch_size(tmp_path):
    model = create_model("vit_fmnist_convstem")
    vitkit_dir = tmp_path / "convstem"
    from vitkit import save_pretrained

    save_pretrained(model, vitkit_dir)
    with pytest.raises(ValueError, match="'conv' stem's convolutions cannot be resampled"):
        load_pretrained(vitkit_dir, img_size=32, patch_size=model.cfg.patch_size * 2)
