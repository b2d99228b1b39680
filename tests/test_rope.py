"""DINOv3's rotary positions (``ViTConfig.rope="dinov3"``): the rotation, every attention path that
takes it, and DINOv3 weights from and to timm, checked against timm's own ``Eva`` with random weights."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vitkit import ViT, ViTConfig
from vitkit.attention import attention_rollout
from vitkit.bench import timm_twin
from vitkit.checkpoint import CheckpointError
from vitkit.convert import export, load
from vitkit.layers import rope_dinov3

timm = pytest.importorskip("timm")


def _randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Every weight random (LayerNorm scales around 1), LayerScale included: a rotation applied to the
    wrong tokens, or not at all, shows."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("grid, head_dim", [((14, 14), 64), ((10, 12), 64), ((3, 1), 16), ((1, 1), 32)])
def test_the_rotation_is_timms_dinov3(grid, head_dim):
    from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3

    theirs = RotaryEmbeddingDinoV3(head_dim, temperature=100, rotate_half=True).get_embed(shape=list(grid))
    sin, cos = rope_dinov3(grid, head_dim)
    assert torch.equal(torch.cat([sin, cos], -1), theirs)


@pytest.mark.parametrize("architecture", ["vit_small_patch16_dinov3", "vit_small_patch16_dinov3_qkvb",
                                          "vit_small_plus_patch16_dinov3", "vit_small_plus_patch16_dinov3_qkvb"])
def test_timm_dinov3_converts_both_ways_with_equal_logits_and_gradients(tmp_path, architecture):
    """S and S+ (SwiGLU: Eva's separate gate and value layers, packed into vitkit's fc1 and split back)."""
    theirs = _randomise(timm.create_model(architecture, pretrained=False, depth=2, num_classes=10)).eval()
    save_file(dict(theirs.state_dict()), tmp_path / "dinov3.safetensors")
    with pytest.warns(UserWarning, match="normalisation"):
        ours = load(tmp_path / "dinov3.safetensors", "timm", num_heads=6).eval()
    cfg = ours.cfg
    assert (cfg.rope, cfg.reg_tokens, cfg.layer_scale, cfg.norm_eps) == ("dinov3", 4, 1e-5, 1e-5)
    assert (cfg.pool, cfg.final_norm, cfg.dynamic_img_size, cfg.qkv_bias) == ("mean", "tokens", True,
                                                                              architecture.endswith("qkvb"))
    assert (cfg.mlp_act, cfg.mlp_hidden) == (("swiglu", 2 * 1536) if "plus" in architecture else ("gelu", 1536))
    assert not ours.cfg.abs_pos and ours.patch_embed.positions is None  # DINOv3 has no absolute positions
    # the tensors fit any size: named, the model takes timm's (256), else timm's default 224
    named = load(tmp_path / "dinov3.safetensors", "timm", model=architecture)
    assert (cfg.img_size, named.cfg.img_size, named.preprocess["img_size"]) == ((224, 224), (256, 256), [256, 256])
    for size in ((224, 224), (160, 192)):  # any image size: each has its own grid of rotations
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), theirs(x), atol=5e-5, rtol=1e-5)

    x, y = torch.randn(2, 3, 96, 128), torch.arange(2)
    for model in (ours.train(), theirs.train()):
        F.cross_entropy(model(x), y).backward()
    pairs = [(ours.encoder.blocks[1].attn.qkv.weight.grad, theirs.blocks[1].attn.qkv.weight.grad),
             (ours.patch_embed.reg_token.grad, theirs.reg_token.grad)]
    if "plus" in architecture:  # the gate's half of fc1 first, then the value's
        mlp = theirs.blocks[0].mlp
        pairs.append((ours.encoder.blocks[0].mlp.fc1.weight.grad, torch.cat([mlp.fc1_g.weight.grad, mlp.fc1_x.weight.grad])))
    for ours_grad, theirs_grad in pairs:
        torch.testing.assert_close(ours_grad, theirs_grad, atol=1e-5, rtol=1e-4)

    out = export(ours.eval(), tmp_path / "back", "timm")
    back = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert type(back).__name__ == "Eva"
    assert type(back.blocks[0].mlp).__name__ == type(theirs.blocks[0].mlp).__name__  # Mlp, or SwiGLU (split)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(back(x), theirs.eval()(x), atol=1e-6, rtol=1e-6)
    expected = dict(theirs.state_dict())
    got = back.state_dict()
    assert sorted(got) == sorted(expected)  # the same tensors under the same names: no pos_embed
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, msg=key)
    again = load(out, "timm").eval()  # the hub dir read back: heads, pooling and rotation from its config
    assert again.cfg == ours.cfg


def test_a_hub_dir_with_class_token_pooling_keeps_it(tmp_path):
    theirs = _randomise(timm.create_model("vit_small_patch16_dinov3", pretrained=False, depth=1, num_classes=0,
                                          global_pool="token")).eval()
    (tmp_path / "hub").mkdir()
    save_file(dict(theirs.state_dict()), tmp_path / "hub" / "model.safetensors")
    (tmp_path / "hub" / "config.json").write_text(json.dumps({
        "architecture": "vit_small_patch16_dinov3", "num_classes": 0, "global_pool": "token",
        "model_args": {"num_heads": 6, "global_pool": "token"}}))
    with pytest.warns(UserWarning, match="normalisation"):
        ours = load(tmp_path / "hub", "timm").eval()
    assert ours.cfg.pool == "cls"
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=5e-5, rtol=1e-5)


# --- EVA-02 (timm's Eva, rope_type "cat") ------------------------------------------------------------
@pytest.mark.parametrize("grid, head_dim, ref", [((16, 16), 64, 16), ((32, 32), 64, 16), ((10, 12), 32, 16),
                                                 ((5, 5), 16, 3)])
def test_the_rotation_is_timms_eva02_in_the_half_layout(grid, head_dim, ref):
    """timm lays each angle out twice side by side ([a0, a0, a1, a1, ...]), vitkit the angles then the
    angles again: the same values."""
    from timm.layers.pos_embed_sincos import RotaryEmbeddingCat

    from vitkit.layers import rope_eva02

    theirs = RotaryEmbeddingCat(head_dim, in_pixels=False, ref_feat_shape=(ref, ref)).get_embed(shape=list(grid))
    their_sin, their_cos = theirs.chunk(2, -1)
    sin, cos = rope_eva02(grid, head_dim, ref)
    for ours, their in ((sin, their_sin), (cos, their_cos)):
        assert torch.equal(ours[:, :head_dim // 2], their[:, 0::2]) and torch.equal(ours[:, head_dim // 2:], their[:, 1::2])


@pytest.mark.parametrize("architecture", ["eva02_tiny_patch14_224", "eva02_base_patch14_448",
                                          "eva02_base_patch16_clip_224"])
def test_timm_eva02_converts_both_ways_with_equal_logits_and_gradients(tmp_path, architecture):
    """T (one qkv projection, one packed SwiGLU fc1), B (q, k, v projections, SwiGLU's two layers with a
    LayerNorm before fc2) and B's CLIP tower (a LayerNorm before the attention's projection too, the class
    token pooled); vitkit's q and k channels are reordered for its rotation, and back."""
    theirs = _randomise(timm.create_model(architecture, pretrained=False, depth=2, num_classes=10,
                                          img_size=112)).eval()
    save_file(dict(theirs.state_dict()), tmp_path / "eva02.safetensors")
    heads = theirs.blocks[0].attn.num_heads
    with pytest.warns(UserWarning, match="normalisation"):
        ours = load(tmp_path / "eva02.safetensors", "timm", num_heads=heads).eval()
    cfg = ours.cfg
    assert (cfg.rope, cfg.rope_ref_grid, cfg.abs_pos, cfg.mlp_act, cfg.layer_scale) == ("eva02", 16, True, "swiglu", 0)
    clip = "clip" in architecture
    assert (cfg.mlp_norm, cfg.attn_norm, cfg.norm_eps) == ("base" in architecture, clip, 1e-6)
    assert (cfg.pool, cfg.final_norm) == (("cls", "tokens") if clip else ("mean", "pooled"))
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=5e-5, rtol=1e-5)

    for model in (ours.train(), theirs.train()):
        F.cross_entropy(model(x), torch.arange(2)).backward()
    pairs = [(ours.patch_embed.positions.grad, theirs.pos_embed.grad),
             (ours.encoder.blocks[1].mlp.fc2.weight.grad, theirs.blocks[1].mlp.fc2.weight.grad)]
    attn = theirs.blocks[1].attn
    their_v = attn.qkv.weight.grad.chunk(3)[2] if attn.qkv is not None else attn.v_proj.weight.grad
    pairs.append((ours.encoder.blocks[1].attn.qkv.weight.grad.chunk(3)[2], their_v))  # v: not reordered
    for ours_grad, theirs_grad in pairs:
        torch.testing.assert_close(ours_grad, theirs_grad, atol=1e-5, rtol=1e-4)

    out = export(ours.eval(), tmp_path / "back", "timm")
    back = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert type(back.blocks[0].mlp).__name__ == type(theirs.blocks[0].mlp).__name__  # GluMlp, or SwiGLU
    expected, got = dict(theirs.state_dict()), back.state_dict()
    assert sorted(got) == sorted(expected)  # q and k channels back in timm's order, under timm's names
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, msg=key)
    again = load(out, "timm").eval()  # the hub dir read back: heads, reference grid and pooling from its config
    assert again.cfg == ours.cfg


def test_an_eva02_fine_tuned_at_another_size_runs_as_timms_there(tmp_path):
    """A 112 x 112 EVA-02 loaded at 140 x 140: the positions resampled as timm's checkpoint filter does,
    the rotation's coordinates scaled to the same 16 x 16 reference grid as timm's."""
    from timm.models.eva import checkpoint_filter_fn

    small = _randomise(timm.create_model("eva02_tiny_patch14_224", pretrained=False, depth=2, num_classes=10,
                                         img_size=112)).eval()
    save_file(dict(small.state_dict()), tmp_path / "eva02.safetensors")
    with pytest.warns(UserWarning, match="normalisation"):
        ours = load(tmp_path / "eva02.safetensors", "timm", num_heads=3, img_size=140).eval()
    theirs = timm.create_model("eva02_tiny_patch14_224", pretrained=False, depth=2, num_classes=10, img_size=140)
    theirs.load_state_dict(checkpoint_filter_fn(small.state_dict(), theirs))
    x = torch.randn(2, 3, 140, 140)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs.eval()(x), atol=1e-4, rtol=1e-4)


EVA02_SMALL = dict(rope="eva02", rope_ref_grid=4, mlp_act="swiglu", mlp_ratio=4.0)  # T/S: one packed SwiGLU fc1
@pytest.mark.parametrize("grid, head_dim, ref, offset", [((14, 14), 64, 14, 1.0), ((24, 24), 64, 24, 1.0),
                                                         ((10, 12), 32, 24, 1.0), ((16, 16), 96, 32, 0.0)])
def test_the_rotation_is_timms_perception_encoder_in_the_half_layout(grid, head_dim, ref, offset):
    """PE's (timm's grid_indexing="xy", rope_grid_offset): the columns' angles first, each index offset."""
    from timm.layers.pos_embed_sincos import RotaryEmbeddingCat

    from vitkit.layers import rope_eva02

    theirs = RotaryEmbeddingCat(head_dim, in_pixels=False, ref_feat_shape=(ref, ref), grid_offset=offset,
                                grid_indexing="xy").get_embed(shape=list(grid))
    their_sin, their_cos = theirs.chunk(2, -1)
    sin, cos = rope_eva02(grid, head_dim, ref, offset, columns_first=True)
    for ours, their in ((sin, their_sin), (cos, their_cos)):
        assert torch.equal(ours[:, :head_dim // 2], their[:, 0::2]) and torch.equal(ours[:, head_dim // 2:], their[:, 1::2])


@pytest.mark.parametrize("architecture", ["vit_pe_core_tiny_patch16_384", "vit_pe_core_base_patch16_224",
                                          "vit_pe_core_gigantic_patch14_448"])
def test_timm_perception_encoder_converts_both_ways(tmp_path, architecture):
    """timm's own hub dir (its config names the architecture, no model_args): the reference grid (24, 14),
    the index offset, the pooling's 8 heads and the k bias (rotated, not masked) as timm builds them; back to
    timm under the same names, and read back to the same config. A bare file reads as PE when named."""
    img = 98 if "patch14" in architecture else 96  # a whole number of patches
    theirs = _randomise(timm.create_model(architecture, pretrained=False, depth=2, img_size=img)).eval()
    (tmp_path / "hub").mkdir()
    save_file(dict(theirs.state_dict()), tmp_path / "hub" / "model.safetensors")
    (tmp_path / "hub" / "config.json").write_text(json.dumps({"architecture": architecture, "global_pool": "map",
                                                              "model_args": {"img_size": img}}))
    with pytest.warns(UserWarning, match="normalisation"):
        ours = load(tmp_path / "hub", "timm").eval()
    cfg = ours.cfg
    giant = "gigantic" in architecture  # PE-G: no class token, no index offset, a narrower pooling MLP (ratio 4)
    assert (cfg.rope, cfg.pool, cfg.pool_heads, cfg.pre_norm) == ("pe", "map", 8, True)
    assert (cfg.rope_grid_offset, cfg.class_token, cfg.pool_mlp_ratio) == ((0.0, False, 4.0) if giant else (1.0, True, 0.0))
    assert cfg.rope_ref_grid == (14 if "base" in architecture else 32 if giant else 24)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    x = torch.randn(2, 3, img, img)
    with torch.no_grad():
        want = theirs(x)
        scale = want.abs().max().item()  # every weight random (0.3): large logits, compared relative to them
        torch.testing.assert_close(ours(x), want, atol=1e-5 * scale, rtol=0)
    out = export(ours, tmp_path / "back", "timm")
    back = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    expected, got = dict(theirs.state_dict()), back.state_dict()
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, msg=key)
    assert load(out, "timm").cfg == cfg
    save_file(dict(theirs.state_dict()), tmp_path / "pe.safetensors")  # the bare file: no config beside it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # named: PE's own normalisation (timm's pretrained_cfg), nothing assumed
        named = load(tmp_path / "pe.safetensors", "timm", model=architecture, img_size=img).eval()
    assert (named.preprocess["mean"], named.preprocess["crop_pct"]) == ([0.5] * 3, 1.0)
    with torch.no_grad():
        torch.testing.assert_close(named(x), want, atol=1e-5 * scale, rtol=0)
    with pytest.raises(CheckpointError, match="attn_pool"):  # told it pools otherwise: its pooling weights don't fit
        load(tmp_path / "hub", "timm", pool="mean")
    with pytest.warns(UserWarning, match="Perception Encoder"):  # unnamed: read as a plain ViT, with a warning
        load(tmp_path / "pe.safetensors", "timm", num_heads=theirs.blocks[0].attn.num_heads)


def test_a_perception_encoder_pooled_otherwise_has_no_pooling_heads(tmp_path):
    """pool_heads belongs to attention pooling: another pool (``--head-pool``, an override) drops it, and
    such a PE goes to timm (same logits) and back (same config)."""
    from vitkit import get_config

    pe = get_config("vit_pe_core_tiny_patch16_384")
    assert pe.pool_heads == 8 and pe.replace(pool="cls", final_norm="tokens").pool_heads == 0
    cfg = get_config("vit_pe_core_tiny_patch16_384", pool="mean", final_norm="pooled", depth=1, img_size=64)
    assert cfg.pool_heads == 0
    ours = _randomise(ViT(cfg)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = ours(x)
        torch.testing.assert_close(timm_twin(ours).eval()(x), want, atol=1e-5 * want.abs().max().item(), rtol=0)
    assert load(export(ours, tmp_path / "hub", "timm"), "timm").cfg == cfg


ROTARY_LAYOUTS = {  # what the published DINOv3s and EVA-02s lack, each a layout the tensors alone could mistake
    "eva02 without qkv bias": dict(EVA02_SMALL, qkv_bias=False),  # no q_bias: not even BEiT's names
    "eva02 with registers": dict(EVA02_SMALL, reg_tokens=2),
    "eva02 with LayerScale": dict(EVA02_SMALL, layer_scale=1e-5),
    "eva02 without absolute positions": dict(EVA02_SMALL, abs_pos=False),
    "eva02 without a class token": dict(EVA02_SMALL, class_token=False),
    "pe with LayerScale and registers": dict(rope="pe", rope_ref_grid=4, rope_grid_offset=1.0, pre_norm=True,
                                             layer_scale=0.1, reg_tokens=2, norm_eps=1e-5),  # Eva's gamma names
    "dinov3 without a class token": dict(rope="dinov3", abs_pos=False, reg_tokens=2, layer_scale=0.1,
                                         class_token=False, norm_eps=1e-5),  # timm's DINOv3 eps, which files omit
}


@pytest.mark.parametrize("fields", ROTARY_LAYOUTS.values(), ids=ROTARY_LAYOUTS.keys())
def test_rotary_models_beyond_the_published_layouts_go_to_timm_and_back(tmp_path, fields):
    """A hub dir vitkit writes loads in timm with the same logits, and vitkit reads it back as it was:
    its config.json names the rotation where the tensors could not."""
    ours = _randomise(ViT(ViTConfig(**{**dict(img_size=32, patch_size=8, emb_size=64, depth=2, num_heads=4,
                                                num_classes=5, pool="mean", final_norm="pooled", norm_eps=1e-6),
                                         **fields}))).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm's LayerNorm eps for DINOv3 (1e-5): told to timm_twin below
        out = export(ours, tmp_path / "hub", "timm")
        theirs = timm_twin(ours)
    x = torch.randn(2, 3, 32, 32)
    again = load(out, "timm").eval()
    assert again.cfg == ours.cfg
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(x), ours(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(again(x), ours(x), atol=0, rtol=0)


def test_rope_ref_grid_belongs_to_eva02_alone():
    with pytest.raises(ValueError, match="rope_ref_grid"):
        ViTConfig(rope="dinov3", rope_ref_grid=16)
    with pytest.raises(ValueError, match="rope_ref_grid"):
        ViTConfig(rope="eva02")


def _rope_model(**fields) -> ViT:
    cfg = ViTConfig(**{**dict(img_size=32, patch_size=8, emb_size=64, depth=2, num_heads=4, num_classes=5, rope="dinov3",
                              reg_tokens=2, layer_scale=0.1, pool="cls", final_norm="tokens", dynamic_img_size=True),
                       **fields})
    return _randomise(ViT(cfg)).eval()


# EVA-02's layout over _rope_model's: its rotation beside absolute positions, SwiGLU with the sub-LN
EVA02 = dict(rope="eva02", rope_ref_grid=4, reg_tokens=0, layer_scale=0.0, mlp_act="swiglu", mlp_norm=True)


@pytest.mark.parametrize("fields", [{}, EVA02], ids=["dinov3", "eva02"])
def test_the_rotation_reaches_every_attention_path(fields):
    model = _rope_model(**fields)
    x = torch.randn(2, 3, 24, 40)
    with torch.no_grad():
        fused = model(x)  # the class token alone through the last block
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), fused, atol=1e-5, rtol=1e-5)
        model.set_fused_attention(False)
        torch.testing.assert_close(model(x), fused, atol=1e-5, rtol=1e-5)
        model.set_fused_attention(True)
        out = model.forward_intermediates(x, return_attention=True)
        torch.testing.assert_close(out["logits"], fused, atol=1e-5, rtol=1e-5)
        assert attention_rollout(model, x).shape == (2, 3, 5)
        # without the rotation the model computes something else: the test above can fail
        assert not torch.allclose(model.encoder(model.patch_embed(x))[:, 0], model.forward_features(x)[:, 0])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_k_bias_stays_out_as_dinov3_masks_it(precision, monkeypatch):
    """Rotated with its key, a k bias would move the logits: DINOv3 masks it, and so does vitkit, on
    every path (the last block's class-token one too): any k bias changes nothing, its gradient is 0."""
    from vitkit import layers

    monkeypatch.setattr(layers, "LEAN_MIN_ELEMENTS", 0)  # bf16: the lean ops at this size too
    model = _rope_model(qkv_bias=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        for block in model.encoder.blocks:
            block.attn.qkv.bias[64:128] = torch.randn(64)  # emb_size 64: q | k | v
        torch.testing.assert_close(model(x), before)
        torch.testing.assert_close(model.forward_features(x), model.forward_features(x))
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = model(x).float().sum() + model.forward_features(x).float().sum()
    loss.backward()
    for block in model.encoder.blocks:
        grad = block.attn.qkv.bias.grad
        assert torch.all(grad[64:128] == 0) and grad[:64].abs().sum() > 0 and grad[128:].abs().sum() > 0


@pytest.mark.parametrize("first", [0, 3])
@pytest.mark.parametrize("queries", [None, 1, 2])
def test_the_rotation_and_its_gradient_are_the_textbook_formula(first, queries):
    """``_rotate_patches`` (a product and two in-place halves, its backward the rotation by -angle)
    against x·cos + rotate_half(x)·sin written out, in float64: values and gradients, with prefix
    tokens or none, and for only the first tokens (``num_queries``), where they may all be prefix."""
    from vitkit.layers import _rotate_patches, rope_eva02

    sin, cos = (t.double() for t in rope_eva02((3, 4), 16, ref_grid=4))
    tokens = first + 12
    x = torch.randn(2, 3, queries or tokens, 16, dtype=torch.float64, requires_grad=True)

    def textbook(x):
        patches = x[:, :, first:]
        n = patches.shape[2]
        rotated = torch.cat([-patches[..., 8:], patches[..., :8]], dim=-1)
        return torch.cat([x[:, :, :first], patches * cos[:n] + rotated * sin[:n]], dim=2)

    ours, theirs = _rotate_patches(x, (sin, cos), tokens), textbook(x)
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=0)
    grad = torch.randn_like(theirs)
    torch.testing.assert_close(torch.autograd.grad(ours, x, grad)[0], torch.autograd.grad(theirs, x, grad)[0],
                               atol=1e-12, rtol=0)
    with torch.no_grad():  # inference takes the plain function, not the autograd one
        torch.testing.assert_close(_rotate_patches(x, (sin, cos), tokens), theirs, atol=1e-12, rtol=0)
    if x.shape[2] > first + 1:  # the first patch sits at angle 0: a rotation that did nothing would pass above
        assert not torch.allclose(theirs[:, :, first:], x[:, :, first:])


def test_bf16_rotation_rounds_once():
    """In bf16 the rotation is computed in fp32 and rounded once: the float64 result rounded to bf16,
    to one unit in the last place at most (a rounding of each product would add up to two more)."""
    from vitkit.layers import _rotate_patches, rope_eva02

    rope = rope_eva02((8, 8), 64, ref_grid=8)
    x = torch.randn(4, 4, 65, 64).bfloat16()
    exact = _rotate_patches(x.double(), tuple(t.double() for t in rope), 65)
    ours = _rotate_patches(x, rope, 65)
    assert ours.dtype == torch.bfloat16
    ulp = torch.finfo(torch.bfloat16).eps * exact.abs().clamp_min(1e-3)  # at the value's own scale
    assert ((ours.double() - exact).abs() <= ulp).all()


def test_the_rotation_serves_torch_func_forward_ad_and_tracing():
    """The rotation's autograd Function takes part in what plain ops did: per-sample gradients
    (torch.func.vmap over grad), forward-mode AD, and TorchScript's tracer with autograd on."""
    model = _rope_model(**EVA02).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, one):
        return torch.func.functional_call(model, p, (one[None],)).square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    name = "encoder.blocks.0.attn.qkv.weight"
    for i in range(2):
        torch.testing.assert_close(per_sample[name][i], torch.func.grad(loss)(params, x[i])[name])

    import torch.autograd.forward_ad as fwAD

    model.set_fused_attention(False)  # the math path: SDPA on CPU has no forward-mode derivative
    tangent = torch.randn_like(x)
    with torch.no_grad(), fwAD.dual_level():
        jvp = fwAD.unpack_dual(model(fwAD.make_dual(x, tangent))).tangent
        eps = 1e-6
        central = (model(x + eps * tangent) - model(x - eps * tangent)) / (2 * eps)
    torch.testing.assert_close(jvp, central, atol=1e-6, rtol=1e-5)

    model.set_fused_attention(True)
    xg = x.clone().requires_grad_()
    traced = torch.jit.trace(model, (xg,), check_trace=False)
    torch.testing.assert_close(traced(x), model(x))


def test_a_compiled_rotary_model_trains_as_the_eager_one():
    """torch.compile traces the rotation's autograd function (its backward written out) in one graph:
    the same weight gradients as eager (EVA-02's layout: DINOv3's rotation is the same function)."""
    model = _rope_model(**EVA02).train()
    x, y = torch.randn(2, 3, 32, 32), torch.arange(2)
    grads = []
    for run in (model, torch.compile(model, fullgraph=True)):
        model.zero_grad()
        F.cross_entropy(run(x), y).backward()
        grads.append(model.encoder.blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)



@pytest.mark.parametrize("fields", [{}, EVA02], ids=["dinov3", "eva02"])
def test_compiled_graphs_read_the_kept_tables_at_the_configured_size(fields):
    """At the configured size the rotary tables are the model's buffers, so a compiled graph reads them
    (Inductor had folded sin and cos into the rotation kernels, evaluated for every element of q and k);
    another size computes its own. The buffers stay fp32 and right through a dtype cast and to_empty."""
    model = _rope_model(**fields).eval()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=record, fullgraph=True)
    with torch.no_grad():
        for size in ((32, 32), (24, 40)):
            x = torch.randn(2, 3, *size)
            torch.testing.assert_close(compiled(x), model(x))
    assert ".sin()" not in graphs[0] and ".cos()" not in graphs[0]
    assert ".sin()" in graphs[-1]  # the other grid's own tables
    want = model._rope_tables(model.cfg.grid_size, "cpu")
    model.to(torch.bfloat16)
    with torch.device("meta"):
        empty = ViT(model.cfg)
    empty.to_empty(device="cpu")
    for kept in (model, empty):
        assert kept.rope_sin.dtype == torch.float32
        torch.testing.assert_close((kept.rope_sin, kept.rope_cos), want, rtol=0, atol=0)
    assert not any(name.startswith("rope_") for name in model.state_dict())

@pytest.mark.parametrize("fields", [{}, EVA02], ids=["dinov3", "eva02"])
def test_bf16_cpu_training_rotates_on_the_lean_path(monkeypatch, fields):
    """bf16 CPU training (the lean attention, its backward written out) gives the math path's gradients,
    to bf16's precision, with the rotation in both."""
    from vitkit import layers

    monkeypatch.setattr(layers, "LEAN_MIN_ELEMENTS", 0)
    model = _rope_model(**fields).train()
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    grads = {}
    for fused in (True, False):
        model.set_fused_attention(fused)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            F.cross_entropy(model(x).float(), y).backward()
        grads[fused] = model.encoder.blocks[0].attn.qkv.weight.grad.clone()
    assert (grads[True] - grads[False]).abs().max() <= 0.02 * grads[False].abs().max()


@pytest.mark.parametrize("fields", [{}, EVA02], ids=["dinov3", "eva02"])
def test_exports_run_at_any_image_size(tmp_path, fields):
    import onnxruntime as ort

    from vitkit.export import save_onnx, save_torch_export

    model = _rope_model(**fields)
    program = torch.export.load(str(save_torch_export(model, tmp_path / "m.pt2"))).module()
    session = ort.InferenceSession(str(save_onnx(model, tmp_path / "m.onnx")), providers=["CPUExecutionProvider"])
    for size in ((32, 32), (24, 40)):
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            want = model(x)
            torch.testing.assert_close(program(x), want, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(session.run(["logits"], {"x": x.numpy()})[0], want.numpy(), atol=1e-4, rtol=0)


# --- Hugging Face ---------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")


def _hf_dinov3(tmp_path, **fields):
    config = transformers.DINOv3ViTConfig(**{**dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=128,
                                                    num_register_tokens=4, layerscale_value=0.1), **fields})
    model = _randomise(transformers.DINOv3ViTModel(config)).eval()
    model.save_pretrained(tmp_path / "hf")
    return model


@pytest.mark.parametrize("fields", [{}, dict(query_bias=False, value_bias=False),
                                    dict(use_gated_mlp=True, hidden_act="silu", intermediate_size=96)])
def test_hf_dinov3_converts_both_ways_with_equal_features(tmp_path, fields):
    """The plain MLP and the gated one (S+, H+, 7B: gate_proj and up_proj packed into vitkit's fc1)."""
    theirs = _hf_dinov3(tmp_path, **fields)
    with pytest.warns(UserWarning, match="mask_token"):  # masked image modelling's, which no forward pass reads
        ours = load(tmp_path / "hf", "hf").eval()
    assert (ours.cfg.rope, ours.cfg.reg_tokens, ours.cfg.pool, ours.cfg.layer_scale) == ("dinov3", 4, "cls", 0.1)
    assert ours.cfg.qkv_bias == fields.get("query_bias", True) and ours.cfg.dynamic_img_size
    gated = fields.get("use_gated_mlp", False)
    assert (ours.cfg.mlp_act, ours.cfg.mlp_hidden) == (("swiglu", 2 * 96) if gated else ("gelu", 128))
    for size in ((32, 32), (24, 40)):
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            out = theirs(pixel_values=x)
            torch.testing.assert_close(ours.forward_features(x), out.last_hidden_state, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ours(x), out.pooler_output, atol=1e-5, rtol=1e-5)
    back = transformers.AutoModel.from_pretrained(export(ours, tmp_path / "back", "hf")).eval()
    assert type(back).__name__ == "DINOv3ViTModel"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(pixel_values=x).last_hidden_state, theirs(pixel_values=x).last_hidden_state,
                                   atol=0, rtol=0)
    assert back.config.use_gated_mlp == gated and back.config.intermediate_size == theirs.config.intermediate_size


@pytest.mark.parametrize("architecture", ["vit_small_patch16_dinov3_qkvb", "vit_small_plus_patch16_dinov3"])
def test_timm_dinov3_goes_through_vitkit_into_transformers(tmp_path, architecture):
    theirs = _randomise(timm.create_model(architecture, pretrained=False, depth=2, num_classes=0)).eval()
    save_file(dict(theirs.state_dict()), tmp_path / "dinov3.safetensors")
    with pytest.warns(UserWarning, match="normalisation"):
        ours = load(tmp_path / "dinov3.safetensors", "timm", num_heads=6)
    hf = transformers.AutoModel.from_pretrained(export(ours, tmp_path / "hf", "hf")).eval()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():  # timm's and HF's rotations differ in the last bits (1/period against period)
        torch.testing.assert_close(hf(pixel_values=x).last_hidden_state, theirs.forward_features(x), atol=2e-4,
                                   rtol=1e-5)


def test_what_hf_dinov3_cannot_hold_is_refused_by_name(tmp_path):
    _hf_dinov3(tmp_path, use_gated_mlp=True)  # gated by GELU, not SiLU: not SwiGLU, which vitkit's gate is
    with pytest.raises(CheckpointError, match="'hidden_act': 'gelu'"):
        load(tmp_path / "hf", "hf")
    with pytest.raises(ValueError, match="DINOv3ViTModel has no classifier"):
        export(_rope_model(), tmp_path / "out", "hf")  # 5 classes
