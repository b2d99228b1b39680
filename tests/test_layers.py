"""The seed's blocks: shapes of its walk-through, its bugs fixed, fused == math."""

import weakref

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import vitkit
from vitkit import (
    FeedForwardBlock,
    MultiHeadAttention,
    PatchEmbedding,
    ResidualAdd,
    TransformerEncoderBlock,
    layers,
)


def test_seed_walkthrough_shapes():
    """The tutorial's shapes: projection, class token, per-head queries, attention."""
    x = torch.randn(8, 3, 224, 224)
    pe = PatchEmbedding()
    projected = rearrange(pe.projection(x), "b e h w -> b (h w) e")
    assert projected.shape == (8, 196, 768)
    tokens = pe(x)
    assert tokens.shape == (8, 197, 768)
    mha = MultiHeadAttention(768, 8)
    qkv = rearrange(mha.qkv(tokens), "b n (qkv h d) -> qkv b h n d", qkv=3, h=8)
    assert qkv[0].shape == (8, 8, 197, 96)
    out, att = mha(tokens[:2], return_attention=True)
    assert att.shape == (2, 8, 197, 197)
    assert out.shape == (2, 197, 768)


def test_the_seeds_keyword_names_build_what_they_say():
    """The seed's calls, with its own keywords: TransformerEncoderBlock(forward_expansion, forward_drop_p,
    and MultiHeadAttention's dropout through **kwargs), TransformerEncoder(depth, **kwargs), ViT(**kwargs)."""
    block = TransformerEncoderBlock(64, num_heads=4, forward_expansion=2, forward_drop_p=0.1, dropout=0.2)
    assert (block.mlp.fc1.out_features, block.mlp.drop1.p, block.attn.att_drop.p) == (128, 0.1, 0.2)
    encoder = vitkit.TransformerEncoder(3, emb_size=64, num_heads=4, forward_expansion=2, drop_p=0.1)
    assert len(encoder.blocks) == 3 and encoder.blocks[2].mlp.fc1.out_features == 128
    assert encoder(torch.randn(2, 5, 64)).shape == (2, 5, 64)
    model = vitkit.ViT(img_size=32, depth=2, emb_size=64, num_heads=4, n_classes=3, forward_expansion=2,
                       drop_p=0.1, forward_drop_p=0.1, dropout=0.05)
    assert (model.cfg.num_classes, model.cfg.mlp_ratio, model.cfg.drop_rate, model.cfg.attn_drop_rate) == (3, 2, 0.1, 0.05)
    for build in (lambda: vitkit.ViT(drop_p=0.1, forward_drop_p=0.2),
                  lambda: TransformerEncoderBlock(64, num_heads=4, drop_p=0.1, forward_drop_p=0.2)):
        with pytest.raises(ValueError, match="one rate"):
            build()


def seed_attention_fixed(mha: MultiHeadAttention, x, mask=None):
    """The seed's einsum attention written out by hand, with the fixes applied."""
    q, k, v = rearrange(mha.qkv(x), "b n (qkv h d) -> qkv b h n d", qkv=3, h=mha.num_heads)
    energy = torch.einsum("bhqd, bhkd -> bhqk", q, k) / (mha.head_dim ** 0.5)
    if mask is not None:
        energy = energy.masked_fill(~mask, float("-inf"))
    att = F.softmax(energy, dim=-1)
    out = torch.einsum("bhal, bhlv -> bhav", att, v)
    return mha.projection(rearrange(out, "b h n d -> b n (h d)"))


def test_seed_blocks_composed_by_hand_equal_vitkit_model():
    """PatchEmbedding -> ResidualAdd(LN, MHA) -> ResidualAdd(LN, FFN) -> head, by hand, equals vitkit.ViT."""
    model = vitkit.ViT(emb_size=64, depth=2, num_heads=4, img_size=32, patch_size=8, num_classes=5).eval()
    x = torch.randn(3, 3, 32, 32)
    # the seed's composition, using vitkit's modules and weights
    tokens = model.patch_embed(x)
    cls = repeat(model.patch_embed.cls_token, "() n e -> b n e", b=3)
    by_hand = torch.cat([cls, rearrange(model.patch_embed.projection(x), "b e h w -> b (h w) e")], 1)
    by_hand = by_hand + model.patch_embed.positions
    torch.testing.assert_close(tokens, by_hand)
    for block in model.encoder.blocks:
        attn_branch = ResidualAdd(nn.Sequential(block.norm1, block.attn))
        mlp_branch = ResidualAdd(nn.Sequential(block.norm2, block.mlp))
        by_hand = mlp_branch(attn_branch(by_hand))
    pooled = by_hand[:, 1:].mean(1)  # seed: mean pooling (over patch tokens)
    logits = model.head.fc(model.head.norm(pooled))
    torch.testing.assert_close(model(x), logits, atol=1e-5, rtol=1e-5)


def test_attention_scaled_before_softmax_by_head_dim():
    mha = MultiHeadAttention(64, 4).eval()
    x = torch.randn(2, 10, 64)
    torch.testing.assert_close(mha(x), seed_attention_fixed(mha, x), atol=1e-5, rtol=1e-5)
    _, att = mha(x, return_attention=True)
    torch.testing.assert_close(att.sum(-1), torch.ones(2, 4, 10))  # probabilities, not divided after


@pytest.mark.parametrize("mask_kind", [None, "key", "full"])
def test_fused_equals_math(mask_kind):
    torch.manual_seed(1)
    mha = MultiHeadAttention(96, 6).eval()
    x = torch.randn(3, 17, 96)
    mask = None
    if mask_kind == "key":
        mask = torch.rand(3, 17) > 0.3
        mask[:, 0] = True
    elif mask_kind == "full":
        mask = torch.rand(3, 17, 17) > 0.5
    with torch.no_grad():  # inference: the fused kernel runs on every device
        mha.fused = True
        fused = mha(x, mask=mask)
        mha.fused = False
        math = mha(x, mask=mask)
    assert (fused - math).abs().max() <= 1e-5


def spy_on_sdpa(monkeypatch) -> list:
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


def test_cpu_bf16_training_takes_the_math_path_with_the_fused_kernels_gradients(monkeypatch):
    """On CPU, bf16 autocast training steers attention to the math path (faster backward); the
    gradients are those of the fused kernel. fp32 training and inference call the fused kernel."""
    torch.manual_seed(2)
    mha = MultiHeadAttention(48, 4)
    x = torch.randn(3, 13, 48, requires_grad=True)
    calls = spy_on_sdpa(monkeypatch)

    def grads(bf16: bool) -> list[Tensor]:
        x.grad = None
        mha.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = mha(x)
        (out.float() * torch.linspace(-1, 1, 48)).sum().backward()
        return [x.grad.clone()] + [p.grad.clone() for p in mha.parameters()]

    math_grads = grads(bf16=True)
    assert calls == []  # the math path ran
    grads(bf16=False)
    assert calls == [1]  # fp32: the fused kernel
    monkeypatch.setattr(layers, "fused_kernel_pays", lambda q: True)
    fused_grads = grads(bf16=True)
    assert calls == [1, 1]
    for g_math, g_fused in zip(math_grads, fused_grads):
        scale = g_fused.abs().max().item()
        assert (g_math - g_fused).abs().max().item() <= 0.03 * scale
    monkeypatch.undo()
    calls = spy_on_sdpa(monkeypatch)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mha(x)
    assert calls == [1]


def test_lean_backward_passes_match_numerical_gradients():
    """lean_attention and gelu_linear write their backward passes by hand: check them against
    finite differences (float64), the class-token case (fewer queries than keys) included."""
    torch.manual_seed(3)
    q = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)  # 4 queries
    k, v = (torch.randn(2, 3, 7, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))  # 7 keys
    bias = torch.randn(1, 3, 4, 7, dtype=torch.float64, requires_grad=True)  # BEiT's, the same for every image
    for keep in (True, False):
        assert torch.autograd.gradcheck(lambda q, k, v, keep=keep: layers.lean_attention(q, k, v, 0.3, keep), (q, k, v))
        assert torch.autograd.gradcheck(
            lambda q, k, v, bias, keep=keep: layers.lean_attention(q, k, v, 0.3, keep, bias=bias), (q, k, v, bias))
    h = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    for activation in layers.LEAN_ACTIVATIONS:
        assert torch.autograd.gradcheck(lambda h, w, b, a=activation: layers.lean_linear(h, w, b, a), (h, w, b))
    assert torch.autograd.gradcheck(lambda h, w: layers.lean_linear(h, w, None, "gelu"), (h, w))
    # torch.compile relies on each op's fake (shape and layout only) twin: check them, with q, k and v
    # as the strided views of one qkv tensor that MultiHeadAttention passes
    qkv = torch.randn(2, 7, 3, 3, 5, dtype=torch.float64).permute(2, 0, 3, 1, 4).requires_grad_()  # (3, B, h, N, d)
    for keep in (True, False):
        for logit_bias in (None, torch.randn(1, 3, 7, 7, dtype=torch.float64)):
            torch.library.opcheck(layers._lean_attention, (*qkv.unbind(0), logit_bias, 0.3, keep))
    q3, k3, v3 = (torch.randn(6, 7, 5, dtype=torch.float64) for _ in range(3))
    d_out = torch.randn(2, 3, 7, 5, dtype=torch.float64).transpose(1, 2).transpose(1, 2)
    for att in (None, torch.rand(6, 7, 7, dtype=torch.float64).softmax(-1)):
        for logit_bias in (None, torch.randn(1, 3, 7, 7, dtype=torch.float64)):
            torch.library.opcheck(layers._lean_attention_backward, (d_out, q3, k3, v3, att, logit_bias, 0.3))
    torch.library.opcheck(layers._lean_linear, (h, w, b, "gelu"))
    torch.library.opcheck(layers._lean_linear, (h.bfloat16(), w.float(), None, "identity"))  # bf16 x, fp32 weight
    torch.library.opcheck(layers._lean_linear_backward, (torch.randn(2, 3, 4, dtype=torch.float64), h.detach(),
                                                         w.detach(), "gelu_tanh"))


def saved_bytes(fn, parameters) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward pass of ``fn()``, not counting
    ``parameters`` (kept by the model anyway)."""
    storages = {}
    own = {p.untyped_storage().data_ptr() for p in parameters}

    def pack(t: Tensor):
        if t.untyped_storage().data_ptr() not in own:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_cpu_bf16_training_block_keeps_less_for_the_same_gradients(monkeypatch):
    """In lean_training a block (with enough tokens) keeps neither the attention probabilities, nor
    gelu(h), nor bf16 copies of its weights for the backward pass, and its gradients are those of
    plain autograd."""
    monkeypatch.setattr(layers, "LEAN_MIN_ELEMENTS", 0)  # lean at any size
    torch.manual_seed(4)
    b, n, e, heads = 2, layers.RECOMPUTE_MIN_TOKENS + 3, 64, 4  # head width 16: a scale of 1/4, exact in bf16
    block = TransformerEncoderBlock(e, heads)
    x = torch.randn(b, n, e, requires_grad=True)
    weights = torch.randn(b, n, e)
    calls = []
    for name in ("lean_attention", "lean_linear"):
        real = getattr(layers, name)
        monkeypatch.setattr(layers, name, lambda *a, real=real, name=name, **kw: calls.append(name) or real(*a, **kw))

    def step() -> list[Tensor]:
        x.grad = None
        block.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = block(x)
        (out.float() * weights).sum().backward()
        return [x.grad] + [p.grad for p in block.parameters()]

    lean_bytes = saved_bytes(step, block.parameters())
    lean = step()
    assert calls.count("lean_attention") == 2 and calls.count("lean_linear") == 8  # qkv, projection, fc1, fc2
    block.attn.fused = False  # plain autograd: the math path, and every Linear as it is
    monkeypatch.setattr(layers, "lean_linear_applies", lambda layer, x: False)
    plain_bytes = saved_bytes(step, block.parameters())
    plain = step()
    assert len(calls) == 10
    for g_lean, g_plain in zip(lean, plain):
        assert g_lean.dtype == g_plain.dtype
        torch.testing.assert_close(g_lean, g_plain, atol=1e-3 * g_plain.abs().max().item(), rtol=0)
    probabilities, gelu_out, bf16_weights = b * heads * n * n * 2, b * n * 4 * e * 2, 12 * e * e * 2
    assert plain_bytes - lean_bytes >= probabilities + gelu_out + bf16_weights


def test_lean_linear_leaves_small_hooked_and_swapped_layers_alone(monkeypatch):
    mlp = FeedForwardBlock(16)
    x = torch.randn(2, 3, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layers.lean_linear_applies(mlp.fc2, x)  # 96 elements: plain autograd is faster
    monkeypatch.setattr(layers, "LEAN_MIN_ELEMENTS", 0)
    seen = []
    mlp.fc1.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layers.lean_linear_applies(mlp.fc2, x) and not layers.lean_linear_applies(mlp.fc1, x)
        mlp(x)
    assert seen == [(2, 3, 64)]  # the hook saw fc1's call
    assert not layers.lean_linear_applies(nn.Identity(), x)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layers.lean_linear_applies(mlp.fc2, x)  # no autograd: nothing to keep
    assert not layers.lean_linear_applies(mlp.fc2, x)  # fp32: the usual Linear
    with pytest.raises(ValueError, match="activation"):
        layers.lean_linear(x, mlp.fc2.weight, None, "relu")


def _onednn_linear_calls(fn) -> int:
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return sum(e.name == "mkldnn::_linear_pointwise" for e in prof.events())


@pytest.mark.skipif(not layers.ONEDNN_LINEAR, reason="torch built without oneDNN")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_cpu_inference_runs_linears_through_onednn_with_the_same_logits(dtype, monkeypatch):
    monkeypatch.setattr(layers, "ONEDNN_LINEAR_MIN_MACS_FP32", 0)  # this tiny model's Linears too
    torch.manual_seed(0)
    model = vitkit.create_model("vit_digits").eval().to(dtype)
    x = torch.randn(4, 1, 8, 8, dtype=dtype)
    with torch.inference_mode():
        calls = _onednn_linear_calls(lambda: model(x))
        fast = model(x).float()
        monkeypatch.setattr(layers, "ONEDNN_LINEAR", False)
        assert _onednn_linear_calls(lambda: model(x)) == 0
        plain = model(x).float()
    assert calls >= 3 * model.cfg.depth  # qkv (but the last block's split one), projection, fc1, fc2
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: one rounding of the Linear outputs apart
    torch.testing.assert_close(fast, plain, rtol=tol, atol=tol)


@pytest.mark.skipif(not layers.ONEDNN_LINEAR, reason="torch built without oneDNN")
def test_onednn_linear_stays_out_of_autograd_autocast_hooks_and_compiling(monkeypatch):
    monkeypatch.setattr(layers, "ONEDNN_LINEAR_MIN_MACS_FP32", 0)
    mlp = FeedForwardBlock(16)
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        assert _onednn_linear_calls(lambda: mlp(x)) == 2
    assert _onednn_linear_calls(lambda: mlp(x).sum().backward()) == 0  # autograd records: nn.Linear
    assert mlp.fc1.weight.grad is not None
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert _onednn_linear_calls(lambda: mlp(x)) == 0  # autocast casts: nn.Linear
    mlp.fc2.register_forward_hook(lambda *args: None)
    with torch.no_grad():
        assert _onednn_linear_calls(lambda: mlp(x)) == 1  # the hooked fc2 runs as itself
    exported = torch.export.export(FeedForwardBlock(16).eval(), (x,), strict=False)
    assert not any("mkldnn" in str(node.target) for node in exported.graph.nodes)


@pytest.mark.skipif(not layers.ONEDNN_LINEAR, reason="torch built without oneDNN")
def test_onednn_linear_only_where_its_call_cost_pays():
    # fp32: oneDNN's primitive costs more per call than addmm, so small Linears stay addmm (a tiny
    # model's eager inference had run at 0.6x timm's); bf16 takes oneDNN at any size.
    mlp = FeedForwardBlock(16).eval()  # fc1 16 -> 64, fc2 64 -> 16
    small = torch.randn(2, 3, 16)
    rows = -(-layers.ONEDNN_LINEAR_MIN_MACS_FP32 // (16 * 64))  # just enough rows for both Linears
    large = torch.randn(1, rows, 16)
    with torch.inference_mode():
        assert _onednn_linear_calls(lambda: mlp(small)) == 0
        assert _onednn_linear_calls(lambda: mlp(large[:, :rows - 1])) == 0  # one row short
        assert _onednn_linear_calls(lambda: mlp(large)) == 2
        assert _onednn_linear_calls(lambda: mlp.to(torch.bfloat16)(small.bfloat16())) == 2


def test_lean_attention_keeps_probabilities_of_short_sequences_and_leaves_masks_and_dropout_to_math(monkeypatch):
    monkeypatch.setattr(layers, "LEAN_MIN_ELEMENTS", 0)
    calls = []
    real = layers.lean_attention
    monkeypatch.setattr(layers, "lean_attention",
                        lambda *a, keep_probabilities, bias=None:
                        calls.append(keep_probabilities) or real(*a, keep_probabilities, bias=bias))
    mha = MultiHeadAttention(32, 4)
    short = torch.randn(2, layers.RECOMPUTE_MIN_TOKENS - 1, 32, requires_grad=True)
    long = torch.randn(2, layers.RECOMPUTE_MIN_TOKENS, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mha(short)
        mha(long)
        assert calls == [True, False]  # short: keep the probabilities; long: recompute them
        mha(long, mask=torch.rand(2, layers.RECOMPUTE_MIN_TOKENS) > 0.5).sum().backward()
        MultiHeadAttention(32, 4, dropout=0.1).train()(long).sum().backward()
    assert calls == [True, False]


def test_masked_key_gets_zero_probability_and_matches_reference():
    mha = MultiHeadAttention(32, 4).eval()
    x = torch.randn(2, 6, 32)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 2] = False
    mask[1, 4:] = False
    out, att = mha(x, mask=mask, return_attention=True)
    assert att[0, :, :, 2].abs().max() == 0
    assert att[1, :, :, 4:].abs().max() == 0
    torch.testing.assert_close(att.sum(-1), torch.ones(2, 4, 6))
    ref = seed_attention_fixed(mha, x, mask[:, None, None, :])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fully_masked_row_gives_no_nan(fused, dtype, monkeypatch):
    monkeypatch.setattr(layers, "fused_kernel_pays", lambda q: True)  # the fused kernel's backward too
    mha = MultiHeadAttention(32, 4, fused=fused).to(dtype)
    x = torch.randn(2, 5, 32, dtype=dtype, requires_grad=True)
    mask = torch.ones(2, 5, 5, dtype=torch.bool)
    mask[0, 1, :] = False  # query 1 of image 0 may attend to nothing
    out = mha(x, mask=mask)
    assert torch.isfinite(out).all()
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all()
    # the fully masked query's attention output is zero: only the projection bias remains
    torch.testing.assert_close(out[0, 1], mha.projection.bias.expand(32).to(dtype))


def test_mask_with_wrong_shape_or_dtype_is_rejected():
    mha = MultiHeadAttention(32, 4)
    x = torch.randn(2, 5, 32)
    with pytest.raises(ValueError, match="mask: expected a boolean"):
        mha(x, mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"mask: expected shape .* got \(2, 7\)"):
        mha(x, mask=torch.ones(2, 7, dtype=torch.bool))


def test_a_key_mask_means_the_same_whatever_the_batch_size():
    """A (B, 1, N) key mask, batched, gives each image's own result; a 2-d mask with B = N, which could
    be a key mask or a query x key mask, is refused (it had been read as (N, N) at that one batch size)."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4).eval()
    n = 6
    x = torch.randn(n, n, 32)
    keep = torch.arange(n)[None] < (1 + torch.arange(n))[:, None]  # image i sees its first i + 1 tokens
    with torch.no_grad():
        batched = mha(x, mask=keep[:, None, :])
        one_by_one = torch.cat([mha(x[i:i + 1], mask=keep[i:i + 1]) for i in range(n)])
    torch.testing.assert_close(batched, one_by_one, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match=r"mask: shape \(6, 6\) is both \(B, N\) and \(N, N\) with B = N = 6"):
        mha(x, mask=keep)


def test_residual_add_is_out_of_place_and_differentiable():
    lin = nn.Linear(8, 8)
    res = ResidualAdd(lin)
    x = torch.randn(4, 8, requires_grad=True)
    before = x.detach().clone()
    y = res(x)
    torch.testing.assert_close(x.detach(), before)  # the caller's tensor is untouched
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(4, 8) + lin.weight.sum(0).expand(4, 8))


def test_patch_embedding_does_not_mutate_and_inits_like_timm():
    pe = PatchEmbedding(3, 4, 32, 16)
    assert pe.cls_token.std().item() < 0.05 and pe.positions.std().item() < 0.05  # not randn (std 1)
    assert pe.positions.abs().max().item() <= 2.0
    x = torch.randn(2, 3, 16, 16)
    x0 = x.clone()
    pe(x).sum().backward()
    torch.testing.assert_close(x, x0)
    assert pe.positions.grad is not None and pe.cls_token.grad is not None


@pytest.mark.parametrize("name", ["vit_fmnist", "vit_fmnist_convstem", "vit_digits"])
def test_token_stream_is_row_major_so_layer_norms_copy_nothing(name):
    # Without a class token the tokens are a transposed view of the conv's (B, E, N) output; a
    # residual stream left in that layout makes every LayerNorm copy it, forward and backward.
    model = vitkit.create_model(name).train()
    seen = []
    for norm in (m for m in model.modules() if isinstance(m, nn.LayerNorm)):
        norm.register_forward_pre_hook(lambda m, args: seen.append(("input", args[0].is_contiguous())))
        norm.register_full_backward_hook(lambda m, gi, go: seen.append(("grad", go[0].is_contiguous())))
    x = torch.randn(4, 1, *model.patch_embed.img_size)
    assert model.patch_embed(x).is_contiguous()
    seen.clear()
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    assert {kind for kind, _ in seen} == {"input", "grad"}
    assert all(contiguous for _, contiguous in seen), seen


def test_gradients_flow_to_every_parameter():
    model = vitkit.create_model("vit_digits", drop_path_rate=0.1, drop_rate=0.1).train()
    x = torch.randn(4, 1, 8, 8)
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_feed_forward_and_block_shapes():
    ffn = FeedForwardBlock(16, expansion=4)
    assert ffn(torch.randn(2, 3, 16)).shape == (2, 3, 16)
    assert ffn.fc1.out_features == 64
    block = TransformerEncoderBlock(16, 2)
    y, att = block(torch.randn(2, 3, 16), return_attention=True)
    assert y.shape == (2, 3, 16) and att.shape == (2, 2, 3, 3)


def test_bf16_autocast_training_keeps_no_fp32_attention_matrix():
    """Under bf16 autocast the math path saves its (B, h, N, N) probabilities once, in bf16, and its
    output stays within bf16 rounding of the fp32 computation."""
    torch.manual_seed(4)
    mha = MultiHeadAttention(64, 4)
    x = torch.randn(2, 37, 64, requires_grad=True)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        out = mha(x)
    square = [dtype for shape, dtype in saved if shape[-2:] == (37, 37)]
    assert square and torch.float32 not in square, saved
    out.float().sum().backward()
    with torch.no_grad():
        reference = mha(x)  # fp32, fused kernel
    assert (out.float() - reference).abs().max() < 0.05
    assert torch.isfinite(x.grad).all()


def test_compiled_lean_block_follows_the_eager_one(monkeypatch):
    """torch.compile sees the lean ops through their fake twins and runs their real kernels: the
    same outputs and gradients as eager."""
    monkeypatch.setattr(layers, "LEAN_MIN_ELEMENTS", 0)
    monkeypatch.setattr(layers, "RECOMPUTE_MIN_TOKENS", 8)  # recompute the probabilities too
    torch.manual_seed(5)
    block = TransformerEncoderBlock(32, 2)
    x = torch.randn(2, 9, 32, requires_grad=True)

    def run(fn) -> list[Tensor]:
        x.grad = None
        block.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(x)
        out.float().square().sum().backward()
        return [out.float(), x.grad] + [p.grad for p in block.parameters()]

    eager = run(block)
    compiled = run(torch.compile(block, fullgraph=True))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=2e-2 * b.abs().max().item(), rtol=0)


class LiveBytes(TorchDispatchMode):
    """The peak of the bytes held by tensors that ops created while active (inputs and weights
    excluded): a device-free measure of a forward pass's working memory. A storage is counted
    from the op that made it until torch frees it (its Python object lives exactly that long)."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = set(), 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor) and t.untyped_storage().data_ptr() not in self.live:
                storage = t.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
                self.live.add(key)
                self.now += size
                self.peak = max(self.peak, self.now)
                weakref.finalize(storage, self._freed, key, size)
        return out

    def _freed(self, key, size):
        self.live.discard(key)
        self.now -= size


def test_eager_inference_runs_gelu_in_place_for_a_lower_peak_than_timm_with_the_same_logits():
    from vitkit.bench import timm_twin

    torch.manual_seed(0)
    cfg = vitkit.get_config("vit_tiny_patch16_224", depth=2)
    ours = vitkit.ViT(cfg).eval()
    theirs = timm_twin(ours).eval()
    x = torch.randn(4, 3, 224, 224)
    with torch.enable_grad():
        reference = ours(x.requires_grad_())  # autograd records: GELU out of place
    x = x.detach()
    peaks = {}
    for name, model in (("vitkit", ours), ("timm", theirs)):
        with torch.inference_mode(), LiveBytes() as live:
            out = model(x)
        peaks[name] = live.peak
        torch.testing.assert_close(out, reference.detach(), rtol=1e-4, atol=1e-4)
    hidden = 4 * 197 * 4 * cfg.emb_size * 4  # one fp32 (B, N, hidden) tensor
    assert peaks["vitkit"] <= peaks["timm"] - 0.9 * hidden, peaks


def test_in_place_gelu_leaves_hooked_layers_their_own_outputs():
    mlp = FeedForwardBlock(16).eval()
    x = torch.randn(2, 3, 16)
    seen = {}
    mlp.fc1.register_forward_hook(lambda module, args, out: seen.setdefault("fc1", out))
    mlp.act.register_forward_hook(lambda module, args, out: seen.setdefault("act", out))
    with torch.no_grad():
        mlp(x)
    torch.testing.assert_close(seen["fc1"], F.linear(x, mlp.fc1.weight, mlp.fc1.bias))  # not overwritten by GELU
    torch.testing.assert_close(seen["act"], F.gelu(seen["fc1"]))  # the act's hook fired


def test_idle_dropouts_are_not_called_but_hooked_and_training_ones_are(monkeypatch):
    calls = []
    for cls in (nn.Dropout, vitkit.layers.DropPath):
        monkeypatch.setattr(cls, "forward", lambda self, x, f=cls.forward: calls.append(self) or f(self, x))
    cfg = vitkit.get_config("vit_digits", drop_rate=0.1, pos_drop_rate=0.1, drop_path_rate=0.1, head_drop_rate=0.1)
    model = vitkit.ViT(cfg)
    x = torch.randn(2, 1, 8, 8)
    model.train()(x)  # every Dropout and DropPath is live: each is called
    live = len(calls)
    assert live >= 3 * cfg.depth + 2, live
    calls.clear()
    with torch.no_grad():
        reference = model.eval()(x)
        assert calls == []  # eval: all of them are the identity, and none is called
        hooked = []
        model.encoder.blocks[0].mlp.drop1.register_forward_hook(lambda *args: hooked.append(1))
        torch.testing.assert_close(model(x), reference)
    assert hooked == [1] and calls == [model.encoder.blocks[0].mlp.drop1]  # a hooked one still runs
    calls.clear()
    zero = vitkit.ViT(vitkit.get_config("vit_digits")).train()  # p = 0 in training: the identity too
    zero(x).sum().backward()
    assert calls == []
