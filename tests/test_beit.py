"""BEiT's relative position bias (``ViTConfig.rel_pos_bias``): the layer on every attention path, and
BEiT weights from and to timm, checked against timm's own ``Beit`` holding random weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vitkit import ViT, ViTConfig
from vitkit.checkpoint import CheckpointError
from vitkit.convert import export, load
from vitkit.layers import MultiHeadAttention, relative_position_index

timm = pytest.importorskip("timm")
from timm.models.beit import Beit, gen_relative_position_index  # noqa: E402

SMALL = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)


def _randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Every weight random (LayerNorm scales around 1): a table or bias applied in the wrong place shows."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("grid", [(1, 1), (3, 3), (2, 5), (4, 3)])
def test_relative_position_index_is_beits(grid):
    assert torch.equal(relative_position_index(grid), gen_relative_position_index(grid))


def _timm_file(tmp_path, theirs: torch.nn.Module):
    state = {k: v for k, v in theirs.state_dict().items() if not k.endswith("relative_position_index")}
    save_file(state, tmp_path / "beit.safetensors")
    return tmp_path / "beit.safetensors"


@pytest.mark.parametrize("abs_pos, shared, pool", [
    (False, False, "avg"),  # beit_*/beitv2_* fine-tuned: a table in every block, no absolute positions
    (True, False, "token"),  # absolute positions too, class-token pooling
    (False, True, "avg"),  # BEiT's pretraining layout: one table shared by all blocks
])
def test_timm_beit_converts_both_ways_with_equal_logits_and_gradients(tmp_path, abs_pos, shared, pool):
    theirs = _randomise(Beit(**SMALL, init_values=0.1, use_abs_pos_emb=abs_pos, use_rel_pos_bias=not shared,
                             use_shared_rel_pos_bias=shared, global_pool=pool))
    with pytest.warns(UserWarning, match="normalisation"):  # no num_heads: BEiT's tables have a column per head
        ours = load(_timm_file(tmp_path, theirs), "timm")
    assert ours.cfg.rel_pos_bias and ours.cfg.layer_scale and ours.cfg.norm_eps == 1e-6 and ours.cfg.num_heads == 4
    assert (ours.cfg.pool, ours.cfg.final_norm) == (("mean", "pooled") if pool == "avg" else ("cls", "tokens"))
    assert ours.cfg.abs_pos == abs_pos and (ours.patch_embed.positions is not None) == abs_pos
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x), atol=1e-5, rtol=1e-5)

    # the backward pass: the same loss gives each table (and the weights beside it) the same gradient;
    # a shared table's gradient is the sum of its copies'
    for model in (ours.train(), theirs.train()):
        F.cross_entropy(model(x), torch.arange(3)).backward()
    tables = [b.attn.rel_pos_bias_table.grad for b in ours.encoder.blocks]
    if shared:
        torch.testing.assert_close(sum(tables), theirs.rel_pos_bias.relative_position_bias_table.grad)
    else:
        for table, block in zip(tables, theirs.blocks):
            torch.testing.assert_close(table, block.attn.relative_position_bias_table.grad)
    torch.testing.assert_close(ours.encoder.blocks[1].attn.qkv.weight.grad, theirs.blocks[1].attn.qkv.weight.grad)
    # vitkit's qkv bias has a k part, which BEiT lacks: it shifts each query's logits alike, so its gradient is 0
    k_bias_grad = ours.encoder.blocks[0].attn.qkv.bias.grad.chunk(3)[1]
    assert k_bias_grad.abs().max() < 1e-5 < ours.encoder.blocks[0].attn.qkv.bias.grad.abs().max()

    out = export(ours.eval(), tmp_path / "back", "timm")
    back = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert type(back) is Beit
    with torch.no_grad():
        torch.testing.assert_close(back(x), theirs.eval()(x), atol=1e-5, rtol=1e-5)
    again = load(out, "timm").eval()  # the hub dir read back by vitkit: heads and pooling from its config
    assert again.cfg == ours.cfg
    with torch.no_grad():
        torch.testing.assert_close(again(x), ours.eval()(x), atol=0, rtol=0)
    if not shared:  # the same tensors under the same names (no pos_embed where BEiT had none)
        expected = {k: v for k, v in theirs.state_dict().items() if not k.endswith("relative_position_index")}
        got = back.state_dict()
        assert sorted(k for k in got if not k.endswith("k_bias")) == sorted(expected)
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, msg=key)


@pytest.mark.parametrize("architecture", ["vit_base_patch16_rope_ape_224", "vit_base_patch16_rope_mixed_224",
                                          "vit_base_patch16_rope_reg1_gap_256"])
def test_rotary_position_models_are_refused_not_read_without_their_positions(tmp_path, architecture):
    """timm's Eva shares BEiT's names but rotates q and k by position: RoPE-ViT's axial and mixed
    rotations (LayerScale, a GELU MLP; the mixed one's learned frequencies) read as a plain ViT or a
    BEiT would run without them, so they are refused, bare file or hub dir (DINOv3's and EVA-02's
    layouts are read: tests/test_rope.py)."""
    import json

    peer = timm.create_model(architecture, pretrained=False, depth=1)
    save_file(dict(peer.state_dict()), tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="rotary positions"):
        load(tmp_path / "model.safetensors", "timm", num_heads=12)
    (tmp_path / "config.json").write_text(json.dumps({"architecture": architecture, "num_classes": 0}))
    with pytest.raises(CheckpointError, match="rotary positions"):
        load(tmp_path, "timm")


def _bias_model(**fields) -> ViT:
    cfg = ViTConfig(img_size=32, patch_size=8, emb_size=64, depth=2, num_heads=4, num_classes=10, rel_pos_bias=True,
                    pool="cls", final_norm="tokens", norm_eps=1e-6, **fields)
    return _randomise(ViT(cfg)).eval()


def _reference_attention(attn: MultiHeadAttention, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v, written out: the attention BEiT computes."""
    b, n, e = x.shape
    q, k, v = attn.qkv(x).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-2, -1) * attn.head_dim**-0.5 + attn.relative_position_bias()
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, e)
    return attn.projection(out)


def test_the_bias_reaches_every_attention_path():
    model = _bias_model()
    attn = model.encoder.blocks[0].attn
    x = torch.randn(2, attn.rel_pos_index.shape[0], 64)
    mask = torch.rand(2, 1, x.shape[1], x.shape[1]) > 0.3
    mask[..., 0] = True  # every query may see the class token
    with torch.no_grad():
        for m in (None, mask):
            expected = _reference_attention(attn, x, m)
            for fused in (True, False):  # SDPA with the bias as a float mask; the math path adding it
                attn.fused = fused
                torch.testing.assert_close(attn(x, mask=m), expected, atol=1e-5, rtol=1e-5)
        attn.fused = True
        # the probabilities that attention maps read include it
        out, probabilities = attn(x, return_attention=True)
        q, k, _ = attn.qkv(x).reshape(2, x.shape[1], 3, 4, 16).permute(2, 0, 3, 1, 4)
        logits = q @ k.transpose(-2, -1) * 0.25 + attn.relative_position_bias()
        torch.testing.assert_close(probabilities, logits.softmax(-1), atol=1e-6, rtol=1e-5)
        # a class-token head computes the last block for the class token alone: the bias's first row
        images = torch.randn(2, 3, 32, 32)
        tokens = model.forward_features(images)  # every token through every block
        torch.testing.assert_close(model(images), model.forward_head(tokens), atol=1e-5, rtol=1e-5)


def test_bf16_autocast_training_step_trains_the_tables():
    model = _bias_model().train()
    tables = [b.attn.rel_pos_bias_table for b in model.encoder.blocks]
    before = [t.detach().clone() for t in tables]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    assert torch.isfinite(loss) and all(t.grad is not None and t.grad.abs().sum() > 0 for t in tables)
    opt.step()
    assert all(not torch.equal(a, t) for a, t in zip(before, tables))


@pytest.mark.parametrize("fields", [dict(layer_scale=0.1), dict(pool="cls", final_norm="tokens")])
def test_the_benchmarks_timm_twin_is_timms_beit_with_the_same_logits(fields):
    """bench.timm_twin (the peer of `vitkit bench` and the GPU checks), LayerScale or none (timm's BEiT
    architecture has it: an init_values of None was dropped by timm.create_model, and it built one)."""
    from vitkit.bench import timm_twin

    cfg = ViTConfig(img_size=32, patch_size=8, emb_size=64, depth=2, num_heads=4, num_classes=10, norm_eps=1e-6,
                    rel_pos_bias=True, **fields)
    ours = _randomise(ViT(cfg)).eval()
    theirs = timm_twin(ours).eval()
    assert type(theirs) is Beit
    # BEiT's own two heads are told by global_pool alone: no use_fc_norm, which timm < 1.0.31 refuses
    from vitkit.convert.timm import model_args

    assert "use_fc_norm" not in model_args(cfg)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_fine_tuning_groups_are_timms_for_beit():
    """Weight decay and layer-wise lr scale of every parameter, against timm's own BEiT groups
    (param_groups_layer_decay with Beit.no_weight_decay: the tables are not decayed)."""
    from timm.optim import param_groups_layer_decay

    from vitkit.convert.timm import KEYS, _to_beit
    from vitkit.train import param_groups

    theirs = Beit(**SMALL, init_values=0.1, use_abs_pos_emb=True, use_rel_pos_bias=True)
    ours = ViT(ViTConfig(img_size=32, patch_size=8, emb_size=64, depth=2, num_heads=4, num_classes=10, norm_eps=1e-6,
                         rel_pos_bias=True, layer_scale=0.1))
    expected = {}
    names = {id(p): n for n, p in theirs.named_parameters()}
    for group in param_groups_layer_decay(theirs, 0.05, theirs.no_weight_decay(), layer_decay=0.65):
        expected.update({names[id(p)]: (group["lr_scale"], group["weight_decay"]) for p in group["params"]})
    got = {}
    names = {id(p): n for n, p in ours.named_parameters()}
    for group in param_groups(ours, 0.05, layer_decay=0.65):
        for p in group["params"]:
            foreign = _to_beit({k: torch.zeros(3) for k in KEYS.foreign_names(names[id(p)])[1]}, abs_pos=True)
            got.update({k: (pytest.approx(group["lr_scale"]), group["weight_decay"]) for k in foreign})
    assert got == expected
    assert expected["blocks.1.attn.relative_position_bias_table"][1] == 0.0


def test_bf16_cpu_training_takes_the_lean_attention_with_the_bias(monkeypatch):
    """bf16 CPU training runs vitkit's lean attention (its backward written out), the bias included:
    the tables' gradients are the math path's, to bf16's precision."""
    from vitkit import layers

    monkeypatch.setattr(layers, "LEAN_MIN_ELEMENTS", 0)  # the lean ops at this small size too
    biases = []
    real = layers.lean_attention
    monkeypatch.setattr(layers, "lean_attention", lambda *a, bias=None, **kw: biases.append(bias) or real(*a, bias=bias, **kw))
    model = _bias_model().train()
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    grads = {}
    for fused in (True, False):  # fused=True: the lean op (in bf16 CPU training); False: the math path
        model.set_fused_attention(fused)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            F.cross_entropy(model(x).float(), y).backward()
        grads[fused] = [b.attn.rel_pos_bias_table.grad.clone() for b in model.encoder.blocks]
    assert len(biases) == 2 and all(b is not None and b.dtype == torch.bfloat16 for b in biases)
    for lean, math in zip(grads[True], grads[False]):
        assert (lean - math).abs().max() <= 0.02 * math.abs().max()


def test_exports_without_a_bias_table_refuse_a_beit_model_by_name(tmp_path):
    model = _bias_model()
    for fmt in ("jax", "torchvision"):
        with pytest.raises(ValueError, match=f"target format {fmt}: this model has BEiT's relative position bias"):
            export(model, tmp_path / f"out-{fmt}", fmt)
    with pytest.raises(ValueError, match="timm's BEiT .* exact GELU"):
        export(_bias_model(mlp_act="quick_gelu"), tmp_path / "out.safetensors", "timm")


# --- Hugging Face ---------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")

HF_SMALL = dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=128, layer_scale_init_value=0.1, hidden_dropout_prob=0.0, drop_path_rate=0.0,
                attention_probs_dropout_prob=0.0)


def _hf_beit(tmp_path, cls_name: str = "BeitForImageClassification", config_name: str = "BeitConfig", **fields):
    config = getattr(transformers, config_name)(**{**HF_SMALL, **fields})
    model = _randomise(getattr(transformers, cls_name)(config)).eval()
    model.save_pretrained(tmp_path / "hf")
    return model


def _hf_logits(model, x: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        out = model(pixel_values=x, **kwargs)
    return out.logits if hasattr(out, "logits") else out.pooler_output


@pytest.mark.parametrize("cls_name, config_name, fields", [
    # the Hub's fine-tuned BEiT (microsoft/beit-*-patch16-224): a table a block, no absolute positions
    ("BeitForImageClassification", "BeitConfig", dict(use_relative_position_bias=True, num_labels=10)),
    # class-token pooling, absolute positions too
    ("BeitForImageClassification", "BeitConfig", dict(use_relative_position_bias=True, use_mean_pooling=False,
                                                       use_absolute_position_embeddings=True, num_labels=10)),
    # a pretraining checkpoint's one shared table, as features
    ("BeitModel", "BeitConfig", dict(use_shared_relative_position_bias=True)),
    ("Data2VecVisionForImageClassification", "Data2VecVisionConfig",
     dict(use_relative_position_bias=True, num_labels=10)),
])
def test_hf_beit_converts_both_ways_with_equal_logits(tmp_path, cls_name, config_name, fields):
    theirs = _hf_beit(tmp_path, cls_name, config_name, **fields)
    ours = load(tmp_path / "hf", "hf").eval()
    assert ours.cfg.rel_pos_bias and ours.cfg.layer_scale == 0.1 and ours.cfg.norm_eps == 1e-12
    assert ours.cfg.abs_pos == fields.get("use_absolute_position_embeddings", False)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), _hf_logits(theirs, x), atol=1e-5, rtol=1e-5)
    out = export(ours, tmp_path / "back", "hf")  # written as BEiT's classes (Data2Vec's hold the same network)
    back = transformers.AutoModel.from_pretrained(out) if cls_name == "BeitModel" else \
        transformers.AutoModelForImageClassification.from_pretrained(out)
    assert type(back).__name__ == ("BeitModel" if cls_name == "BeitModel" else "BeitForImageClassification")
    torch.testing.assert_close(_hf_logits(back.eval(), x), _hf_logits(theirs, x), atol=1e-5, rtol=1e-5)
    assert back.config.use_absolute_position_embeddings == ours.cfg.abs_pos


def test_a_beit_checkpoint_from_before_abs_pos_keeps_its_zero_table_and_exports_without_it(tmp_path):
    """vitkit read BEiT into a table of zero positions before ViTConfig.abs_pos: such a checkpoint (its
    config.json without the field) loads as it was saved, and goes to timm and HF without the table."""
    import json

    from vitkit import load_pretrained, save_pretrained

    theirs = _randomise(Beit(**SMALL, init_values=0.1, use_abs_pos_emb=False, use_rel_pos_bias=True))
    with pytest.warns(UserWarning, match="normalisation"):
        new = load(_timm_file(tmp_path, theirs), "timm", num_heads=4)
    model = ViT(new.cfg.replace(abs_pos=True))  # the old layout: the same weights and a table of zeros
    model.load_state_dict({**new.state_dict(), "patch_embed.positions": torch.zeros_like(model.patch_embed.positions)})
    save_pretrained(model, tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    model_fields = config["model"]
    del model_fields["abs_pos"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    old = load_pretrained(tmp_path / "old").eval()
    assert old.cfg.abs_pos and old.patch_embed.positions is not None
    x = torch.randn(2, 3, 32, 32)
    back = timm.create_model(f"local-dir:{export(old, tmp_path / 'timm', 'timm')}", pretrained=True).eval()
    assert back.pos_embed is None
    hf = transformers.BeitForImageClassification.from_pretrained(export(old, tmp_path / "hf", "hf")).eval()
    assert not hf.config.use_absolute_position_embeddings
    with torch.no_grad():
        torch.testing.assert_close(back(x), theirs.eval()(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_hf_logits(hf, x), theirs(x), atol=1e-5, rtol=1e-5)


def test_timm_beit_goes_through_vitkit_into_transformers(tmp_path):
    theirs = _randomise(Beit(**SMALL, init_values=0.1, use_abs_pos_emb=False, use_rel_pos_bias=True))
    with pytest.warns(UserWarning, match="normalisation"):
        ours = load(_timm_file(tmp_path, theirs), "timm", num_heads=4)
    out = export(ours, tmp_path / "hf-out", "hf")
    hf = transformers.BeitForImageClassification.from_pretrained(out).eval()
    assert not hf.config.use_absolute_position_embeddings
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(_hf_logits(hf, x), theirs.eval()(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [48, 24, (48, 32)], ids=["up", "down", "non-square"])
def test_a_beit_fine_tuned_at_another_size_resamples_its_tables_as_timm_and_beit_do(tmp_path, size):
    """Loaded at another size (32 -> 48, 24, 48x32: a 4x4 grid to 6x6, 3x3, 6x4), vitkit's tables and
    absolute positions are the ones timm's checkpoint filter makes, BEiT's own fine-tuning recipe (the near
    offsets keep their biases): the same logits as timm's model at that size. (Plain bilinear resizing of
    the tables, Hugging Face's interpolate_pos_encoding at run time and vitkit's before, fails this.)"""
    from timm.models.beit import checkpoint_filter_fn

    theirs = _randomise(Beit(**SMALL, init_values=0.1, use_abs_pos_emb=True, use_rel_pos_bias=True))
    with pytest.warns(UserWarning, match="normalisation"):
        ours = load(_timm_file(tmp_path, theirs), "timm", num_heads=4, img_size=size).eval()
    at_size = Beit(**{**SMALL, "img_size": size}, init_values=0.1, use_abs_pos_emb=True, use_rel_pos_bias=True)
    at_size.load_state_dict(checkpoint_filter_fn(theirs.state_dict(), at_size))
    grid = (size // 8, size // 8) if isinstance(size, int) else (size[0] // 8, size[1] // 8)
    assert ours.encoder.blocks[0].attn.rel_pos_bias_table.shape == ((2 * grid[0] - 1) * (2 * grid[1] - 1) + 3, 4)
    x = torch.randn(2, 3, *((size, size) if isinstance(size, int) else size))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), at_size.eval()(x), atol=1e-5, rtol=1e-5)
