"""timm's keyword names in vitkit.create_model (config.TIMM_NAMES): timm.create_model(name, **kw) and
vitkit.create_model(name, **kw) build the same network.

The oracle is timm's own model: its weights (random, every parameter drawn again so that no part, a
LayerScale of 1e-5 say, is negligible) are moved into vitkit's model, built from the kwargs alone, by the
timm key map, strictly (no tensor left over on either side), and the two models' logits compared in fp32.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

import vitkit
from vitkit import ViT, create_model, load_pretrained, save_pretrained
from vitkit.config import get_config
from vitkit.convert.timm import read, to_vitkit

# tiny models: two blocks at width 64 on 32 x 32 images of 8 x 8 patches
TINY = dict(depth=2, img_size=32, patch_size=8, embed_dim=64, num_heads=4, num_classes=10)

CASES = [
    ("vit_tiny_patch16_224", dict(in_chans=1, global_pool="avg")),  # fc_norm follows global_pool='avg'
    ("vit_tiny_patch16_224", dict(global_pool="avg", fc_norm=False)),
    ("vit_tiny_patch16_224", dict(global_pool="token", fc_norm=True, qkv_bias=False, mlp_ratio=2.0)),
    ("vit_tiny_patch16_224", dict(class_token=False, reg_tokens=4, no_embed_class=True, global_pool="avg",
                                  init_values=1e-5)),
    ("vit_tiny_patch16_224", dict(reg_tokens=2, no_embed_class=True, init_values=0.1, global_pool="map")),
    ("vit_tiny_patch16_224", dict(reg_tokens=2, global_pool="map", pool_include_prefix=True)),
    ("vit_tiny_patch16_224", dict(pre_norm=True, final_norm=False, img_size=(32, 48))),
    ("vit_tiny_patch16_224", dict(pos_embed="none", act_layer="quick_gelu", scale_mlp_norm=True,
                                  scale_attn_norm=True, patch_size=(8, 8))),
    ("vit_tiny_patch16_224", dict(dynamic_img_size=True, class_token=False, global_pool="avg", fc_norm=False)),
    ("vit_tiny_patch16_224", dict(drop_rate=0.0, proj_drop_rate=0.1, attn_drop_rate=0.2, pos_drop_rate=0.05,
                                  drop_path_rate=0.1, init_values=None, fc_norm=None)),
    ("deit3_small_patch16_224", dict(global_pool="avg")),  # the variant's LayerScale, and timm's no_embed_class
    ("vit_small_patch14_reg4_dinov2", dict(img_size=28, patch_size=14, global_pool="avg")),
    ("vit_base_patch16_siglip_224", dict(class_token=True, global_pool="map")),  # the patch tokens pooled alone
    ("vit_base_patch16_siglip_224", dict(global_pool="avg")),
    # prefix tokens added to a model pooled by attention: timm's VisionTransformer (SigLIP) leaves them out of its
    # pool, its Eva (PE-G) reads them; without them, the so150m's own pool_prefix=False has nothing to leave out
    ("vit_base_patch16_siglip_224", dict(class_token=True)),
    ("vit_base_patch16_siglip_224", dict(reg_tokens=2)),
    ("vit_pe_core_gigantic_patch14_448", dict(class_token=True, patch_size=14, img_size=28)),
    ("vit_so150m_patch16_reg4_map_256", dict(reg_tokens=0)),
    # EVA-01's L is timm's VisionTransformer (its giant alone is Eva's): attention pooling of the patch tokens alone
    ("eva_large_patch14_196", dict(global_pool="map", patch_size=14, img_size=28)),
    # PE's pooling MLP keeps timm's ratio 4 (attn_pool_mlp_ratio) whatever the blocks' (PE-G's too)
    ("vit_pe_core_tiny_patch16_384", dict(mlp_ratio=2.0)),
    ("vit_pe_core_gigantic_patch14_448", dict(mlp_ratio=3.0, patch_size=14, img_size=28)),
    # timm's Eva builds SwiGLU as two layers of int(embed_dim * mlp_ratio) each (rounded up to swiglu_align_to: 8
    # in DINOv3's S+ and H+, 64 in its 7B), at any width: vitkit's packed fc1 holds both
    ("eva02_tiny_patch14_224", dict(patch_size=14, img_size=28)),  # T/S: one packed layer (GluMlp)
    ("eva02_tiny_patch14_224", dict(mlp_ratio=2.0, patch_size=14, img_size=28)),
    ("eva02_base_patch14_224", dict(mlp_ratio=3.0, patch_size=14, img_size=28)),  # B/L: two, and sub-LN
    ("eva02_large_patch14_clip_224", dict(patch_size=14, img_size=28)),
    ("vit_small_plus_patch16_dinov3", dict(mlp_ratio=3.0)),
    ("vit_huge_plus_patch16_dinov3", dict(embed_dim=68, num_heads=1, mlp_ratio=3.0)),  # 204 rounded up to 208
    ("vit_7b_patch16_dinov3", dict(mlp_ratio=3.0)),
    ("vit_7b_patch16_dinov3", dict(embed_dim=80)),  # 160 rounded up to 192
    # ... where timm's VisionTransformer (SwiGLUPacked) takes mlp_ratio for both layers together, as vitkit does
    ("vit_giant_patch14_dinov2", dict(mlp_ratio=3.0, patch_size=14, img_size=28)),
    # DeiT's distilled head without a final norm, what timm's fc_norm=True computes there (refused: below)
    ("deit_tiny_distilled_patch16_224", dict(final_norm=False)),
    # timm's Eva and Beit classes take these names too: DINOv3 keeps its own final norm on the tokens
    # (timm's use_fc_norm=False) under its own pooling, BEiT moves its norm to the tokens for the class token
    ("vit_small_patch16_dinov3", dict(global_pool="avg", in_chans=1, init_values=0.5)),
    ("vit_small_patch16_dinov3", dict(global_pool="token")),
    ("beit_base_patch16_224", dict(global_pool="token", init_values=0.5)),
    ("eva02_tiny_patch14_336", dict(global_pool="token", img_size=28, patch_size=14, embed_dim=192, num_heads=3)),
]


def timm_model(name: str, kw: dict) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **{**TINY, **kw}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # every part matters: no LayerScale of 1e-5, no zero bias
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model


def moved(theirs: nn.Module, ours: ViT, tmp_path: Path) -> ViT:
    """``ours`` holding ``theirs``' weights, read as vitkit reads a timm file; strict both ways."""
    save_file(dict(theirs.state_dict()), tmp_path / "timm.safetensors")
    ours.load_state_dict(to_vitkit(read(tmp_path / "timm.safetensors"), ours.cfg), strict=True)
    return ours.eval()


def dropouts(model: nn.Module) -> tuple[list[float], list[float]]:
    """Every dropout rate above 0, sorted, and each block's stochastic depth rate (timm has a DropPath for
    each branch of a block, drop_path1 and drop_path2 at one rate, vitkit one for both)."""
    rates = sorted(round(m.p, 6) for m in model.modules() if isinstance(m, nn.Dropout) and m.p)
    blocks = model.encoder.blocks if isinstance(model, ViT) else model.blocks
    layers = [getattr(b, "drop_path", None) or b.drop_path1 for b in blocks]  # timm's: DropPath, or Identity at 0
    return rates, [round(getattr(m, "p", getattr(m, "drop_prob", 0.0)), 6) for m in layers]


@pytest.mark.parametrize("name, kw", CASES, ids=lambda c: str(c))
def test_timm_kwargs_build_timms_network(tmp_path, name, kw):
    theirs = timm_model(name, kw)
    ours = moved(theirs, create_model(name, **{**TINY, **kw}), tmp_path)
    size = theirs.patch_embed.img_size
    x = torch.randn(2, theirs.patch_embed.proj.in_channels, *size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-4, rtol=1e-4)
        # the tokens too: the final norm's place, the prefix tokens
        torch.testing.assert_close(ours.forward_features(x), theirs.forward_features(x), atol=1e-4, rtol=1e-4)
    assert dropouts(ours) == dropouts(theirs)


def test_the_dropouts_land_where_timms_do():
    cfg = create_model("vit_tiny_patch16_224", **TINY, drop_rate=0.0, proj_drop_rate=0.1, attn_drop_rate=0.2,
                       pos_drop_rate=0.05, drop_path_rate=0.3).cfg
    assert (cfg.drop_rate, cfg.attn_drop_rate, cfg.pos_drop_rate, cfg.head_drop_rate, cfg.drop_path_rate) == \
        (0.1, 0.2, 0.05, 0.0, 0.3)
    # without timm's own names, drop_rate is ViTConfig's (the projections'), as it always was; for a name timm
    # has, where the call may have been ported from timm.create_model (the head's dropout there), with a warning
    with pytest.warns(UserWarning, match="drop_rate=0.1: vitkit's drop_rate is the dropout after the attention"):
        assert create_model("vit_tiny_patch16_224", depth=1, drop_rate=0.1).cfg.drop_rate == 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert create_model("vit_digits", depth=1, drop_rate=0.1).cfg.drop_rate == 0.1  # not a timm name
        assert create_model("vit_tiny_patch16_224", depth=1, proj_drop_rate=0.1).cfg.drop_rate == 0.1


def test_what_attention_pooling_reads_does_not_hang_on_unrelated_names():
    """vitkit's pool="map" keeps vitkit's pool_prefix whatever else the call names (a do-nothing in_chans=3
    once changed it); timm's global_pool="map" pools as timm's class for the name does."""
    for kw in (dict(), dict(in_chans=3), dict(drop_path_rate=0.1)):
        assert create_model("vit_tiny_patch16_224", depth=1, pool="map", **kw).cfg.pool_prefix, kw
        assert not create_model("vit_tiny_patch16_224", depth=1, global_pool="map", **kw).cfg.pool_prefix, kw
    assert create_model("eva_giant_patch14_224", depth=1, global_pool="map").cfg.pool_prefix  # timm's Eva


def test_what_attention_pooling_reads_follows_timms_class_for_each_name():
    """timm's global_pool='map' pools every token in its Eva (EVA-01's giant, the rotary models) and the patch
    tokens alone in its VisionTransformer (EVA-01's L among them): for every name both have that takes it, with
    a class token, vitkit's model reads what timm's class for the name does."""
    from timm.models.beit import Beit
    from timm.models.eva import Eva

    read = {}
    for name in sorted(set(vitkit.list_models()) & set(timm.list_models())):
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = timm.create_model(name, depth=1)
        if isinstance(theirs, Beit):  # timm's Beit has no attention pooling
            continue
        try:
            cfg = get_config(name, depth=1, global_pool="map", class_token=True)
        except ValueError:  # refused: SwiGLU models (another MLP in timm's pool), DeiT's distillation token
            continue
        read[name] = (cfg.pool_prefix, isinstance(theirs, Eva))
    assert {name: ours for name, (ours, eva) in read.items() if ours != eva} == {}
    assert {eva for _, eva in read.values()} == {True, False}  # both classes seen
    assert not read["eva_large_patch14_336"][0] and read["eva_giant_patch14_336"][0]


@pytest.mark.parametrize("kw, why", [(dict(act_layer="gelu"), "timm keeps the gated MLP"),
                                     (dict(global_pool="map"), "timm's attention pool has a plain MLP")])
@pytest.mark.parametrize("name", ["vit_giant_patch14_dinov2", "eva02_tiny_patch14_224"])
def test_timm_names_that_would_build_another_mlp_on_swiglu_models_are_refused(name, kw, why):
    with pytest.raises(ValueError, match=why):
        create_model(name, depth=1, **kw)


def test_final_norm_and_fc_norm_place_the_norm():
    """timm's final_norm (a bool: whether) and fc_norm (where) as vitkit's final_norm; a pooling left as it
    is keeps the model's own place, and vitkit's own final_norm (a str) stands against global_pool's default."""
    assert get_config("vit_seed_patch16_224", final_norm=True).final_norm == "pooled"  # mean, after pooling
    assert get_config("vit_seed_patch16_224", final_norm=False).final_norm == "none"
    assert get_config("vit_seed_patch16_224", fc_norm=False).final_norm == "tokens"
    assert get_config("vit_small_patch16_dinov3", final_norm=True).final_norm == "tokens"  # mean, on the tokens
    assert get_config("vit_tiny_patch16_224", fc_norm=True).final_norm == "pooled"
    assert get_config("vit_tiny_patch16_224", global_pool="avg", final_norm="tokens").final_norm == "tokens"
    assert get_config("vit_tiny_patch16_224", global_pool="avg", final_norm="none").final_norm == "none"
    assert get_config("vit_tiny_patch16_224", global_pool="avg", final_norm=False, fc_norm=True).final_norm == "none"


def test_none_is_the_models_own_as_in_timm():
    """timm.create_model drops None arguments (train scripts pass unset options as None): timm's own names
    do here too; ViTConfig's fields refuse None, as they always did."""
    cfg = get_config("deit3_small_patch16_224", init_values=None, global_pool=None, fc_norm=None, in_chans=None,
                     embed_dim=None, proj_drop_rate=None)
    assert cfg == get_config("deit3_small_patch16_224")
    # drop_rate, beside timm's names, is timm's (their train script passes its --drop, unset: None)
    assert get_config("deit3_small_patch16_224", in_chans=3, drop_rate=None) == cfg
    with pytest.raises(ValueError, match=r"ViTConfig\.num_classes: expected an int >= 0, got None"):
        get_config("deit3_small_patch16_224", num_classes=None, in_chans=1)


def test_vit_and_load_pretrained_take_timms_names_too(tmp_path):
    model = ViT(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=4, in_chans=1, global_pool="token",
                init_values=1e-4, class_token=True)
    assert (model.cfg.emb_size, model.cfg.in_channels, model.cfg.pool, model.cfg.final_norm,
            model.cfg.layer_scale) == (64, 1, "cls", "tokens", 1e-4)
    save_pretrained(model, tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m", in_chans=3, global_pool="avg")
    assert (loaded.cfg.in_channels, loaded.cfg.pool, loaded.cfg.final_norm) == (3, "mean", "pooled")
    same = create_model(vitkit.ViTConfig(img_size=32, patch_size=8, emb_size=64, depth=1, num_heads=4),
                        embed_dim=128, global_pool="avg", fc_norm=False)
    assert (same.cfg.emb_size, same.cfg.pool, same.cfg.final_norm) == (128, "mean", "tokens")


def test_fc_norm_on_a_distilled_model_is_refused():
    """timm's VisionTransformerDistilled reads its two tokens unnormalised: its forward_head skips fc_norm, and
    fc_norm=True takes the norm off the tokens, so neither normalises; vitkit's would normalise both."""
    with pytest.raises(ValueError, match=r"fc_norm=True on a model with a distillation token .*final_norm=False"):
        create_model("deit_tiny_distilled_patch16_224", depth=1, fc_norm=True)
    assert create_model("deit_tiny_distilled_patch16_224", depth=1, fc_norm=False).cfg.final_norm == "tokens"


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(embed_dim=384, emb_size=768), r"emb_size=768 and embed_dim=384: both set ViTConfig\.emb_size"),
        (dict(in_chans=1, in_channels=3), r"both set ViTConfig\.in_channels"),
        (dict(global_pool="avg", pool="cls"), r"pool='cls' and global_pool='avg': both set ViTConfig\.pool"),
        (dict(global_pool=""), r"global_pool='': timm's global_pool='' pools nothing"),
        (dict(global_pool="avgmax"), r"global_pool='avgmax': vitkit has no max pooling"),
        (dict(global_pool="max"), r"global_pool='max': vitkit has no max pooling"),
        (dict(global_pool="prr"), r"global_pool='prr': vitkit has no PRR"),
        (dict(global_pool="token", class_token=False), r"ViTConfig\.pool: 'cls' pooling needs class_token=True"),
        (dict(in_chans=1, drop_rate=0.1), r"drop_rate=0\.1 beside timm's names: .*head_drop_rate.*proj_drop_rate"),
        (dict(fc_norm=True, final_norm="tokens"), r"fc_norm=True \(final_norm='pooled', timm's names\) and "
                                                   r"final_norm='tokens' disagree"),
        (dict(global_pool="avg", pool_include_prefix=True), r"pool_include_prefix=True with average pooling"),
        (dict(init_values=-1.0), r"init_values: ViTConfig\.layer_scale: expected a number >= 0"),
        (dict(qk_norm=True), r"qk_norm=True: vitkit's attention has no q/k LayerNorm; vitkit accepts only False"),
        (dict(proj_bias=False), r"proj_bias=False: .*accepts only True"),
        (dict(patch_drop_rate=0.1), r"patch_drop_rate=0\.1: vitkit has no patch dropout"),
        (dict(dynamic_img_pad=True), r"dynamic_img_pad=True"),
        (dict(weight_init="jax"), r"weight_init='jax'"),
        (dict(fix_init=True), r"fix_init=True"),
        (dict(norm_layer="rmsnorm"), r"norm_layer='rmsnorm': vitkit builds its own layers"),
        (dict(act_layer="silu"), r"act_layer='silu': vitkit's MLP activations by timm's names are"),
        (dict(pos_embed="sincos"), r"pos_embed='sincos'"),
        (dict(patch_size=(8, 4)), r"patch_size=\(8, 4\): vitkit's patches are square"),
        (dict(no_embed_class=1), r"no_embed_class: expected a bool, got 1"),
        (dict(device="cuda"), r"device='cuda': .*\.to\(device, dtype\)"),
    ],
)
def test_what_vitkit_cannot_build_is_refused(kw, message):
    build = dict(TINY, embed_dim=None, emb_size=64)  # ViT's seed defaults: 8 heads would not divide 64
    build.update(kw)
    for make in (lambda: create_model("vit_tiny_patch16_224", **build), lambda: ViT(**build)):
        with pytest.raises(ValueError, match=message):
            make()


def test_every_timm_name_is_an_argument_of_timms_vision_transformer():
    """The table names timm's own arguments (a misspelt one would never be read)."""
    import inspect

    from timm.models.vision_transformer import VisionTransformer

    assert set(vitkit.config.TIMM_NAMES) <= set(inspect.signature(VisionTransformer).parameters)


def test_eva01_attention_pooling_reads_every_token_as_timms_eva(tmp_path):
    """timm builds EVA-01 with its Eva class, whose attention pooling reads the class token too (TIMM_EVA);
    its weights, read through a hub dir naming the architecture, give timm's logits (float64: the pooling's
    softmax over tokens of width 1408 leaves float32 noise of the order of the tolerance)."""
    name, kw = "eva_giant_patch14_224", dict(depth=1, img_size=28, num_classes=7, global_pool="map")
    torch.manual_seed(0)
    theirs = timm.create_model(name, pretrained=False, **kw).eval()
    with torch.no_grad():
        for pname, p in theirs.named_parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1 if "norm" in pname and pname.endswith("weight") else 0))
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"architecture": name, "model_args": kw}))
    ours = create_model(name, **kw).eval()
    assert ours.cfg.pool_prefix
    ours.load_state_dict(to_vitkit(read(tmp_path), ours.cfg), strict=True)
    x = torch.randn(2, 3, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        mine, peer = ours.double()(x), theirs.double()(x)
    torch.testing.assert_close(mine, peer, atol=1e-6 * peer.abs().max().item(), rtol=1e-6)
