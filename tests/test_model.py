"""Every variant in the table builds and runs; published sizes; clear errors for bad input."""

import copy

import pytest
import torch

import vitkit
from vitkit import ViT, ViTConfig, create_model, list_models
from vitkit.checkpoint import default_preprocess

PUBLISHED_PARAMS = {
    "vit_tiny_patch16_224": 5_717_416,
    "vit_small_patch16_224": 22_050_664,
    "vit_base_patch16_224": 86_567_656,
    "vit_large_patch16_224": 304_326_632,
    "vit_seed_patch16_224": 86_567_656,
    # DeiT's distilled models (timm's counts): a second token and a second classifier
    "deit_tiny_distilled_patch16_224": 5_910_800,
    "deit_small_distilled_patch16_224": 22_436_432,
    "deit_base_distilled_patch16_224": 87_338_192,
    # BEiT: timm's 86,530,984 and 304,430,568, plus what vitkit holds at zero where BEiT has none: each
    # block's k bias (12 x 768, 24 x 1024). No position table: abs_pos=False, as timm's use_abs_pos_emb=False
    "beit_base_patch16_224": 86_530_984 + 12 * 768,
    "beitv2_large_patch16_224": 304_430_568 + 24 * 1024,
    # DINOv3: timm's, plus the zero k biases of the _qkvb ones (timm counts its k bias as a buffer)
    "vit_small_patch16_dinov3": 21_586_944,
    "vit_base_patch16_dinov3_qkvb": 85_659_648 + 12 * 768,
    # DINOv3's SwiGLU models (timm's counts; the 7B's 6.7 billion as published)
    "vit_small_plus_patch16_dinov3": 28_683_264,
    "vit_huge_plus_patch16_dinov3": 840_509_440,
    "vit_7b_patch16_dinov3": 6_716_030_976,
    # EVA-02 (timm's counts, plus each block's zero k bias, which timm keeps as a buffer)
    "eva02_tiny_patch14_224": 5_502_144 + 12 * 192,
    "eva02_base_patch14_448": 87_117_544 + 12 * 768,
    "eva02_large_patch14_448": 305_080_232 + 24 * 1024,
    "eva02_base_patch16_clip_224": 86_263_040 + 12 * 768,
    # the Perception Encoder: timm's exactly (its k bias is a real one)
    "vit_pe_core_base_patch16_224": 93_673_984,
    "vit_pe_core_gigantic_patch14_448": 1_882_033_920,
    # The families taken from timm later: timm's counts, plus what vitkit holds at zero where timm has none: the
    # prefix tokens' positions (no_embed_class: DeiT-III, FlexiViT, the SBB registers, RADIO, TIPSv2), the k bias
    # of timm's Eva and Beit classes (EVA-01, BEiT, DINOv3)
    "deit_base_patch16_384": 86_859_496,
    "deit3_large_patch16_384": 304_763_880 + 1024,
    "deit3_huge_patch14_224": 632_126_440 + 1280,
    "vit_huge_patch14_clip_378": 632_683_264,
    "vit_gigantic_patch14_clip_224": 1_844_908_544,
    "vit_giant_patch14_224": 1_012_611_432,
    "vit_gigantic_patch14_224": 1_844_440_680,
    "vit_so400m_patch16_siglip_384": 428_256_704,
    "vit_giantopt_patch16_siglip_256": 1_163_168_256,
    "vit_large_patch16_siglip_gap_512": 304_147_456,
    "vit_little_patch16_reg4_gap_256": 22_516_008 + 4 * 320,
    "vit_mediumd_patch16_reg4_gap_384": 64_272_872 + 4 * 512,
    "vit_so150m_patch16_reg4_map_256": 141_481_064,
    "vit_so150m2_patch16_reg1_gap_448": 136_498_856,
    "vit_medium_patch16_gap_240": 44_396_589,
    "vit_base_patch16_224_miil": 94_399_957,
    "flexivit_large": 304_355_304 + 1024,
    "eva_large_patch14_336": 304_531_432,
    "eva_giant_patch14_560": 1_014_447_464 + 40 * 1408,
    "vit_intern300m_patch14_448": 304_012_288,
    "vit_giant_patch16_radio_v3": 1_136_027_136 + 8 * 1536,
    "vit_so400m_patch16_radio_v4": 413_543_664 + 10 * 1152,
    "vit_so400m_patch14_reg1_tipsv2": 413_391_600 + 2 * 1152,
    "beit_large_patch16_512": 305_674_728 + 24 * 1024,
    "vit_tiny_patch16_dinov3_qkvb": 5_489_664 + 12 * 192,
    "vit_pe_spatial_gigantic_patch14_448": 1_851_887_104,
    "vit_pe_lang_large_patch14_448": 291_415_040,
}


def expected_params(cfg: ViTConfig) -> int:
    """Parameter count from the architecture alone (an independent formula)."""
    e, p, c, h = cfg.emb_size, cfg.patch_size, cfg.in_channels, cfg.mlp_hidden
    if cfg.stem == "conv":  # 3x3 convs from e/p channels doubling up to e, then a 1x1 conv to e
        widths = [e * 2**i // p for i in range(p.bit_length())]  # e/p, ..., e/2, e (>= 8 for these models)
        stem = sum(9 * a * b + b for a, b in zip([c] + widths[:-1], widths)) + widths[-1] * e + e
    else:
        stem = c * p * p * e + (0 if cfg.pre_norm else e)  # CLIP's projection has no bias...
    stem += 2 * e if cfg.pre_norm else 0  # ...and a LayerNorm after it
    embed = stem + (cfg.num_patches + cfg.num_prefix_tokens) * e * cfg.abs_pos + cfg.num_prefix_tokens * e
    fc2_in = h // 2 if cfg.mlp_act == "swiglu" else h  # SwiGLU: fc2 reads half of fc1
    mlp = (e * h + h) + (fc2_in * e + e) + (2 * fc2_in if cfg.mlp_norm else 0)  # EVA-02's LayerNorm before fc2
    block = 2 * 2 * e + (3 * e * e + (3 * e if cfg.qkv_bias else 0)) + (e * e + e) + mlp
    block += 2 * e if cfg.layer_scale else 0  # LayerScale's two gammas
    block += 2 * e if cfg.attn_norm else 0  # EVA-02 CLIP's LayerNorm before the attention's projection
    gh, gw = cfg.grid_size
    block += ((2 * gh - 1) * (2 * gw - 1) + 3) * cfg.num_heads if cfg.rel_pos_bias else 0  # BEiT's table
    final_norm = 2 * e if cfg.final_norm != "none" else 0
    features = 2 * e if cfg.pool == "cls_mean" else e  # the class token and the patch mean, side by side
    head = (cfg.num_classes * features + cfg.num_classes if cfg.num_classes else 0) * (2 if cfg.dist_token else 1)
    if cfg.pool == "map":  # latent, q, kv, proj, LayerNorm, MLP (of its own width: PE-G's)
        ph = int(e * cfg.pool_mlp_ratio) if cfg.pool_mlp_ratio else h
        pool_mlp = (e * ph + ph) + ((ph // 2 if cfg.mlp_act == "swiglu" else ph) * e + e)
        head += e + (e * e + e) + (2 * e * e + 2 * e) + (e * e + e) + 2 * e + pool_mlp
    return embed + cfg.depth * block + final_norm + head


@pytest.mark.parametrize("name", list_models())
def test_every_variant_builds_with_the_right_shapes(name):
    with torch.device("meta"):
        model = create_model(name)
        cfg = model.cfg
        x = torch.empty(2, cfg.in_channels, *cfg.img_size)
        tokens = model.forward_features(x)
        logits = model.forward_head(tokens)
        pooled = model.forward_head(tokens, pre_logits=True)
    assert tokens.shape == (2, cfg.num_prefix_tokens + cfg.num_patches, cfg.emb_size)
    assert logits.shape == (2, cfg.num_classes or cfg.num_features)  # no classifier: the pooled features
    assert pooled.shape == (2, cfg.num_features)
    assert sum(p.numel() for p in model.parameters()) == expected_params(cfg)


@pytest.mark.parametrize("name,count", sorted(PUBLISHED_PARAMS.items()))
def test_published_parameter_counts(name, count):
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == count


def test_default_vit_is_the_seed_model():
    cfg = ViT().cfg
    assert (cfg.patch_size, cfg.emb_size, cfg.depth, cfg.num_heads, cfg.num_classes) == (16, 768, 12, 8, 1000)
    assert cfg.pool == "mean" and cfg.class_token and cfg.img_size == (224, 224)
    assert ViT(n_classes=7, depth=1).cfg.num_classes == 7  # the seed's argument name still works


def test_tiny_forward_is_finite_and_batch_independent():
    model = create_model("vit_digits").eval()
    x = torch.randn(5, 1, 8, 8)
    full = model(x)
    assert torch.isfinite(full).all()
    torch.testing.assert_close(model(x[:2]), full[:2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.randn(2, 3, 8, 8), r"input: expected 1 channel\(s\), got 3"),
        (torch.randn(1, 8, 8), r"input: expected a 4-d tensor \(B, C, H, W\), got 3-d"),
        (torch.randn(2, 1, 10, 10), r"input: expected image size 8x8, got 10x10"),
        (torch.zeros(2, 1, 8, 8, dtype=torch.long), r"input: expected a floating-point tensor, got dtype torch.int64"),
    ],
)
def test_bad_input_gets_a_clear_error(x, message):
    model = create_model("vit_digits")
    with pytest.raises(ValueError, match=message):
        model(x)


def test_dynamic_img_size_accepts_any_divisible_size():
    model = create_model("vit_digits", dynamic_img_size=True).eval()
    assert model(torch.randn(2, 1, 12, 6)).shape == (2, 10)
    with pytest.raises(ValueError, match="image size 9x8 is not divisible by patch size 2"):
        model(torch.randn(2, 1, 9, 8))
    # at the native size, dynamic and static agree
    static = create_model("vit_digits").eval()
    static.load_state_dict(model.state_dict())
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(model(x), static(x))


@pytest.mark.parametrize(
    "fields, field",
    [
        (dict(emb_size=100, num_heads=3), "num_heads"),
        (dict(img_size=8, patch_size=16), "img_size"),
        (dict(img_size=30, patch_size=16), "img_size"),
        (dict(depth=0), "depth"),
        (dict(drop_rate=-0.1), "drop_rate"),
        (dict(pool="max"), "pool"),
        (dict(class_token=False, pool="cls"), "pool"),
        (dict(final_norm="post"), "final_norm"),
        (dict(num_classes=-1), "num_classes"),
    ],
)
def test_invalid_config_names_the_field(fields, field):
    with pytest.raises(ValueError, match=rf"ViTConfig\.{field}"):
        ViTConfig(**fields)


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(ValueError, match="did you mean vit_base_patch16_224"):
        create_model("vit_base_patch16_244")
    with pytest.raises(ValueError, match="unknown ViTConfig field"):
        create_model("vit_digits", width=3)


def test_no_class_token_mean_pool():
    model = create_model("vit_digits", class_token=False, pool="mean").eval()
    assert model.patch_embed.cls_token is None
    assert model.forward_features(torch.randn(2, 1, 8, 8)).shape == (2, 16, 64)


def test_forward_intermediates_by_name():
    model = create_model("vit_digits").eval()
    x = torch.randn(2, 1, 8, 8)
    out = model.forward_intermediates(x, layers=[0, -1], return_attention=True, output_fmt="NCHW")
    assert set(out) == {"block0", "block3", "attn0", "attn3", "features", "logits"}
    assert out["block3"].shape == (2, 64, 4, 4)
    assert out["attn0"].shape == (2, 4, 17, 17)
    torch.testing.assert_close(out["logits"], model(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="block index 9 is out of range"):
        model.forward_intermediates(x, layers=[9])
    assert {k for k in model.forward_intermediates(x, layers=4) if k.startswith("block")} == {f"block{i}" for i in range(4)}
    for n in (0, -1, 5):  # a count of last blocks: 1 to depth, as timm asks (0 and -1 had returned none, 5 all)
        with pytest.raises(ValueError, match=f"layers: expected the number of last blocks, 1 to 4, .* got {n}"):
            model.forward_intermediates(x, layers=n)


def test_public_api():
    for name in ("PatchEmbedding", "MultiHeadAttention", "ResidualAdd", "FeedForwardBlock",
                 "TransformerEncoderBlock", "TransformerEncoder", "ClassificationHead", "ViT",
                 "create_model", "list_models", "summary", "save_pretrained", "load_pretrained"):
        assert hasattr(vitkit, name), name


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_class_token_head_computes_one_token_in_the_last_block_with_equal_logits_and_gradients(grad_checkpointing):
    """``forward`` of a class-token model runs the last block on the class token alone; the logits
    and every gradient equal those of the full path (all tokens, then pool). A hook on the last block
    (a feature extractor's) sees every token, as on timm's model: the shortcut is off while one watches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class GeluRows(TorchDispatchMode):  # the tokens each MLP ran on (FlopCounterMode's global hooks would watch)
        def __init__(self):
            super().__init__()
            self.rows = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.gelu, torch.ops.aten.gelu_):
                self.rows.append(args[0].shape[1])
            return func(*args, **(kwargs or {}))

    torch.manual_seed(3)
    model = create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, num_classes=7)
    model.set_grad_checkpointing(grad_checkpointing)
    x = torch.randn(4, 3, 32, 32)

    def logits_and_grads(full: bool):
        model.zero_grad(set_to_none=True)
        with GeluRows() as mlp:
            logits = model.forward_head(model.forward_features(x)) if full else model(x)
        (logits * torch.arange(7.0)).sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, mlp.rows[:3]

    fast_logits, fast_grads, fast_rows = logits_and_grads(full=False)
    full_logits, full_grads, full_rows = logits_and_grads(full=True)
    assert fast_rows == [17, 17, 1] and full_rows == [17, 17, 17]  # the last block's MLP on the class token
    torch.testing.assert_close(fast_logits, full_logits, atol=1e-5, rtol=1e-5)
    assert fast_grads.keys() == full_grads.keys()
    for name in full_grads:
        torch.testing.assert_close(fast_grads[name], full_grads[name], atol=1e-5, rtol=1e-4, msg=name)

    seen = []
    for watched in (model.encoder.blocks[-1], model.encoder.blocks[-1].mlp.fc2, model.encoder.norm):
        hook = watched.register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape)))
        hooked_logits, _, hooked_rows = logits_and_grads(full=False)
        hook.remove()
        assert seen.pop() == (4, 17, 192) and hooked_rows == full_rows
        torch.testing.assert_close(hooked_logits, full_logits, atol=1e-5, rtol=1e-5)


class _LoRALinear(torch.nn.Linear):
    """A Linear with a low-rank update, as LoRA libraries subclass it: only its own forward knows it."""

    def __init__(self, linear: torch.nn.Linear, rank: int = 2):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        self.load_state_dict(linear.state_dict())
        self.down = torch.nn.Parameter(torch.randn(rank, linear.in_features) * 0.3)
        self.up = torch.nn.Parameter(torch.randn(linear.out_features, rank) * 0.3)

    def forward(self, x):
        return super().forward(x) + x @ self.down.t() @ self.up.t()

    def merged(self) -> torch.nn.Linear:
        plain = torch.nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        plain.load_state_dict({"weight": self.weight + self.up @ self.down, **({"bias": self.bias} if self.bias is not None else {})})
        return plain


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "eva02_tiny_patch14_224", "vit_small_patch16_dinov3_qkvb"])
def test_a_hooked_or_subclassed_qkv_runs_as_itself(name):
    """The class token's last block and the rotary models' masked k bias project q, k and v with the
    qkv weight directly; a qkv with hooks, or a subclass (LoRA), must still run as itself: every hook
    fires, and the logits are those of the same model with the update merged into plain weights."""
    torch.manual_seed(0)
    model = create_model(name, img_size=28 if "patch14" in name else 32, depth=2, num_classes=5).eval()
    with torch.no_grad():  # every weight random: a k bias masked out shows if it is not, LayerScale no longer hides
        for pname, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if pname.endswith("norm.weight") else 0.3 * torch.randn_like(p))
    x = torch.randn(2, 3, *model.cfg.img_size)
    calls = []
    hooks = [block.attn.qkv.register_forward_hook(lambda *args, i=i: calls.append(i))
             for i, block in enumerate(model.encoder.blocks)]
    with torch.no_grad():
        want = model(x)
    assert calls == [0, 1]
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(model(x), want)

    lora = copy.deepcopy(model)
    for block in lora.encoder.blocks:
        block.attn.qkv = _LoRALinear(block.attn.qkv)
    merged = copy.deepcopy(lora)
    for block in merged.encoder.blocks:
        block.attn.qkv = block.attn.qkv.merged()
    with torch.no_grad():
        torch.testing.assert_close(lora(x), merged(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lora(x), lora.forward_head(lora.forward_features(x)), atol=1e-5, rtol=1e-5)
    assert (merged(x) - model(x)).abs().max() > 1e-3  # the update changes the logits

    # torch's pruning recomputes the weight in a forward pre-hook: two training steps must run
    from torch.nn.utils import prune

    prune.l1_unstructured(model.encoder.blocks[-1].attn.qkv, "weight", amount=0.5)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def test_convolutional_stem_makes_the_same_tokens_and_refuses_foreign_export(tmp_path):
    model = create_model("vit_fmnist_convstem")
    x = torch.randn(2, 1, 28, 28)
    assert model.forward_features(x).shape == create_model("vit_fmnist").forward_features(x).shape
    with pytest.raises(ValueError, match="target format timm: this model has a convolutional stem"):
        vitkit.convert.export(model, tmp_path / "t", "timm")
    with pytest.raises(ValueError, match="ViTConfig.stem: .*power of 2"):
        ViTConfig(img_size=24, patch_size=6, stem="conv")
    with pytest.raises(ValueError, match="ViTConfig.stem: expected one of"):
        ViTConfig(stem="resnet")


def test_conv_stem_runs_channels_last_on_request_with_the_same_outputs_gradients_and_checkpoints(tmp_path):
    nchw = create_model("vit_fmnist_convstem")
    assert not nchw.patch_embed.channels_last  # opt-in
    assert all(c.weight.is_contiguous() for c in nchw.patch_embed.projection if isinstance(c, torch.nn.Conv2d))
    nhwc = copy.deepcopy(nchw)
    nhwc.patch_embed.set_channels_last(True)
    convs = [m for m in nhwc.patch_embed.projection if isinstance(m, torch.nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert not all(c.weight.is_contiguous() for c in convs)
    x = torch.randn(4, 1, 28, 28)
    logits = {}
    for name, model in (("nhwc", nhwc), ("nchw", nchw)):
        logits[name] = model(x)
        logits[name].square().sum().backward()
    torch.testing.assert_close(logits["nhwc"], logits["nchw"], atol=1e-5, rtol=1e-5)
    for (name, a), b in zip(nhwc.named_parameters(), nchw.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)
    # A checkpoint holds plain contiguous tensors and loads into either layout.
    vitkit.save_pretrained(nhwc, tmp_path / "ckpt")
    loaded = vitkit.load_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), nhwc.eval()(x))


@pytest.mark.parametrize("layer_decay", [None, 0.65])
def test_timms_optimizer_factory_groups_a_vitkit_model_as_vitkit_trains_it(layer_decay):
    """Code written for timm's ViT: timm's create_optimizer_v2 reads no_weight_decay() and group_matcher()
    and gives every parameter the weight decay and lr scale of vitkit's own param_groups (tokens and
    positions undecayed; the stem, each block, the head as BEiT's layer decay numbers them)."""
    pytest.importorskip("timm")
    from timm.optim import create_optimizer_v2

    from vitkit.train import param_groups

    model = create_model("vit_tiny_patch16_224", depth=3, reg_tokens=2)
    opt = create_optimizer_v2(model, "adamw", lr=1.0, weight_decay=0.05, layer_decay=layer_decay)
    theirs = {id(p): (g["weight_decay"], g.get("lr_scale", 1.0)) for g in opt.param_groups for p in g["params"]}
    ours = {id(p): (g["weight_decay"], g.get("lr_scale", 1.0))
            for g in param_groups(model, 0.05, layer_decay or 1.0) for p in g["params"]}
    assert theirs.keys() == ours.keys()
    for name, p in model.named_parameters():
        assert theirs[id(p)] == pytest.approx(ours[id(p)]), name
    assert model.no_weight_decay() == {"patch_embed.cls_token", "patch_embed.reg_token", "patch_embed.positions"}
    assert len({scale for _, scale in ours.values()}) == (5 if layer_decay else 1)  # stem, 3 blocks, head


def test_timms_model_level_names_and_input_description():
    timm = pytest.importorskip("timm")
    from timm.data import resolve_data_config

    ours, theirs = create_model("vit_tiny_patch16_224", depth=1), timm.create_model("vit_tiny_patch16_224", depth=1)
    for name in ("num_features", "embed_dim", "num_prefix_tokens", "num_classes"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.get_classifier() is ours.head.fc
    # timm reads the size, resizing and normalisation from vitkit's model: its augreg weights' 0.5, cropped 0.9
    assert resolve_data_config(model=ours) == resolve_data_config(model=theirs)
    # a model of a bare config, of a name timm has no weights for, or grey, keeps vitkit's defaults
    for model in (create_model(ours.cfg), create_model("vit_seed_patch16_224"), create_model("vit_tiny_patch16_224",
                                                                                             depth=1, in_channels=1)):
        assert model.pretrained_cfg["crop_pct"] == (1.0 if model.cfg.in_channels == 1 else 0.875)
        assert model.pretrained_cfg["mean"] == ((0.5,) if model.cfg.in_channels == 1 else (0.485, 0.456, 0.406))
    digits = create_model("vit_digits")  # a grey 8x8 model: not ImageNet's 3x224x224
    assert resolve_data_config(model=digits) == {"input_size": (1, 8, 8), "interpolation": "bicubic", "mean": (0.5,),
                                                 "std": (0.5,), "crop_pct": 1.0, "crop_mode": "squash"}
    digits.preprocess = dict(img_size=[8, 8], mean=[0.25], std=[0.75], interpolation="bilinear", crop_pct=1.0)
    assert resolve_data_config(model=digits)["mean"] == (0.25,)  # a checkpoint's own normalisation
    assert digits.default_cfg == digits.pretrained_cfg
    # timm's spellings of "no weights" and of the pooling the model has
    assert isinstance(create_model("vit_digits", pretrained=False), ViT)
    with pytest.raises(ValueError, match="no weight hub"):
        create_model("vit_digits", pretrained=True)
    ours.reset_classifier(7, global_pool="token")
    assert ours.get_classifier().out_features == 7 and ours.num_classes == 7
    with pytest.raises(ValueError, match="global_pool='avg', but this model pools with 'cls'"):
        ours.reset_classifier(7, global_pool="avg")
    half = create_model("deit_tiny_distilled_patch16_224", img_size=32, depth=1).to(torch.bfloat16)
    half.reset_classifier(4)  # the new classifiers take the model's dtype, as timm's do
    assert half(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_the_names_whose_timm_weights_read_images_differently_are_the_ones_flagged():
    """config.MIXED_NORMALISATION: the table's names under which timm holds weights of more than one mean/std
    (by tag), so that converting a bare file under one still warns."""
    timm = pytest.importorskip("timm")
    from timm.models import get_pretrained_cfg

    from vitkit.config import MIXED_NORMALISATION

    mixed = set()
    for name in set(vitkit.list_models()) & set(timm.list_models()):
        stats = {tuple(round(x, 4) for x in (*cfg.mean, *cfg.std)) for tag in timm.list_pretrained(f"{name}.*")
                 if (cfg := get_pretrained_cfg(tag)) is not None}
        if len(stats) > 1:
            mixed.add(name)
    assert mixed == set(MIXED_NORMALISATION)


def test_every_variant_timm_also_names_has_timms_defaults():
    """Each variant whose name timm knows is built as timm builds it by default: image size, classes (0
    where the weights were published without a classifier, CLIP's embedding width), width, depth, heads,
    prefix tokens, the MLP's width (a SwiGLU's two layers together); and LayerScale's first value (timm's init)
    where the model has it."""
    timm = pytest.importorskip("timm")
    names = sorted(set(vitkit.list_models()) & set(timm.list_models()))
    assert len(names) >= 190
    for name in names:
        with torch.device("meta"):
            theirs, ours = timm.create_model(name), create_model(name)
        mlp = theirs.blocks[0].mlp  # Eva's SwiGLU: two layers, fc1_g and fc1_x, where vitkit packs one fc1
        hidden = mlp.fc1.out_features if hasattr(mlp, "fc1") else mlp.fc1_g.out_features + mlp.fc1_x.out_features
        assert (tuple(theirs.patch_embed.img_size), theirs.num_classes, theirs.embed_dim, len(theirs.blocks),
                theirs.blocks[0].attn.num_heads, theirs.num_prefix_tokens, hidden) == (
            ours.cfg.img_size, ours.cfg.num_classes, ours.cfg.emb_size, ours.cfg.depth, ours.cfg.num_heads,
            ours.cfg.num_prefix_tokens, ours.cfg.mlp_hidden), name
        if ours.cfg.layer_scale and ours.cfg.emb_size <= 1024:  # one real block of each: LayerScale's init
            block = dict(timm.create_model(name, depth=1).blocks[0].named_parameters())
            gamma = next(p for n, p in block.items() if n in ("ls1.gamma", "gamma_1"))
            assert gamma[0].item() == pytest.approx(create_model(name, depth=1).encoder.blocks[0].ls1.gamma[0].item()), name


def test_every_variant_timm_also_names_reads_images_as_timms_weights_do(tmp_path):
    """A variant's model reads images (pretrained_cfg, predict, its checkpoints) as the weights timm names it for:
    their mean, std, interpolation and crop (CLIP's statistics, SigLIP's 0.5, DINOv2's uncropped...), at the
    model's size, an override's too; a name timm does not know keeps vitkit's defaults (ImageNet's, 0.875)."""
    timm = pytest.importorskip("timm")
    names = set(vitkit.list_models()) & set(timm.list_models())
    assert len(names) >= 70
    for name in sorted(names):
        with torch.device("meta"):
            theirs, ours = timm.create_model(name, pretrained=False).pretrained_cfg, create_model(name).pretrained_cfg
        assert (ours["mean"], ours["std"]) == (pytest.approx(theirs["mean"]), pytest.approx(theirs["std"])), name
        assert (ours["interpolation"], ours["crop_pct"], ours["crop_mode"], ours["input_size"]) == (
            theirs["interpolation"], theirs["crop_pct"], theirs["crop_mode"], theirs["input_size"]), name
    for name in sorted(set(vitkit.list_models()) - names):
        with torch.device("meta"):
            model = create_model(name)
        assert model.preprocess == default_preprocess(model.cfg), name
    with torch.device("meta"):
        clip = create_model("vit_base_patch16_clip_224", img_size=112)
    assert clip.pretrained_cfg["input_size"] == (3, 112, 112) and clip.pretrained_cfg["crop_pct"] == 0.95
    assert clip.preprocess["mean"] == list(timm.data.OPENAI_CLIP_MEAN)
    small = create_model("vit_base_patch16_siglip_224", img_size=32, depth=1)
    vitkit.save_pretrained(small, tmp_path / "siglip")
    assert vitkit.load_pretrained(tmp_path / "siglip").preprocess == dict(img_size=[32, 32], mean=[0.5] * 3, std=[0.5] * 3,
                                                                   interpolation="bicubic", crop_pct=0.9,
                                                                   crop_mode="center")
