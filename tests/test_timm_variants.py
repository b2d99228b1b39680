"""The variant table's timm families, with timm as the oracle: timm's model of a name, its random weights moved
into vitkit's model of the same name, gives timm's logits (fp32).

One name per family the table took from timm after its first 73 (test_model's
test_every_variant_timm_also_names_has_timms_defaults checks every name's sizes; this checks that the rest of
the architecture is timm's: activation, pooling, norms, LayerScale, registers, biases). Two blocks and a 4 x 4
patch grid keep it fast; the classifier is a new one of 7 classes on both sides, so that the pooled features
and their normalisation count too.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from vitkit import create_model, get_config

timm = pytest.importorskip("timm")

FAMILIES = {
    "deit": "deit_tiny_patch16_224",  # DeiT without distillation
    "deit3": "deit3_medium_patch16_224",  # DeiT-III's other sizes: LayerScale 1e-6, no class-token position
    "clip": "vit_xsmall_patch16_clip_224",  # CLIP's other sizes: pre-norm, no patch bias, eps 1e-5
    "clip_base_plus": "vit_base_patch16_plus_clip_240",
    "siglip_gap": "vit_base_patch16_siglip_gap_224",  # SigLIP's patch-token mean, normalised first
    "siglip2": "vit_base_patch32_siglip_256",  # SigLIP 2's sizes: GELU's tanh form, attention pooling
    "sbb_registers": "vit_little_patch16_reg4_gap_256",  # registers without positions, no class token, fc_norm
    "sbb_so150m2": "vit_so150m2_patch16_reg1_gap_256",  # no qkv bias, a register with a position
    "sbb_so150m_map": "vit_so150m_patch16_reg4_map_256",  # attention pooling of the patch tokens alone
    "gap": "vit_medium_patch16_gap_256",  # no class token, every token normalised, no qkv bias, LayerScale
    "gap_16_heads": "vit_base_patch16_gap_224",
    "base_plus": "vit_base_patch16_plus_240",
    "layer_scale_36x1": "vit_small_patch16_36x1_224",
    "miil": "vit_base_patch16_224_miil",
    "flexivit": "flexivit_small",
    "eva01": "eva_large_patch14_196",  # timm's VisionTransformer: the class token, the mean, fc_norm
    "eva01_giant": "eva_giant_patch14_224",  # timm's Eva class without rotations
    "intern300m": "vit_intern300m_patch14_448",  # LayerScale 0.1, no final norm
    "radio": "vit_base_patch16_radio_v3",  # 7 registers beside the class token, no final norm
    "tipsv2": "vit_base_patch14_reg1_tipsv2",  # LayerScale 1.0, a register
    "beit_512": "beit_large_patch16_512",
    "dinov3_tiny": "vit_tiny_patch16_dinov3_qkvb",
    "pe_spatial": "vit_pe_spatial_tiny_patch16_512",  # PE's rotations, the mean without a final norm
    "pe_lang": "vit_pe_lang_large_patch14_448",  # ... and LayerScale 0.1
}


@pytest.mark.parametrize("name", list(FAMILIES.values()), ids=list(FAMILIES))
def test_the_variant_tables_model_holds_timms_weights_with_timms_logits(tmp_path, name):
    from vitkit.convert.timm import read, to_vitkit

    img = get_config(name).patch_size * 4
    kw = dict(depth=2, img_size=img, num_classes=7)
    torch.manual_seed(0)
    theirs = timm.create_model(name, pretrained=False, **kw).eval()
    with torch.no_grad():  # every weight random (biases, tokens, positions and LayerScale too)
        for pname, p in theirs.named_parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1 if "norm" in pname and pname.endswith("weight") else 0))
    # a timm hub dir naming the architecture: how timm's own weights come (Eva's EVA-01 is read by that name)
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"architecture": name, "model_args": kw}))
    ours = create_model(name, **kw).eval()
    ours.load_state_dict(to_vitkit(read(tmp_path), ours.cfg), strict=True)
    x = torch.randn(2, 3, img, img)
    with torch.no_grad():
        mine, peer = ours(x), theirs(x)
    assert mine.shape == peer.shape == (2, 7)
    diff = (mine - peer).abs().max().item()
    assert diff <= 1e-4 * max(1.0, peer.abs().max().item()), f"{name}: max |diff| {diff:.2e}"


def test_every_family_is_a_name_of_the_table():
    import vitkit

    assert set(FAMILIES.values()) <= set(vitkit.list_models()) & set(timm.list_models())
