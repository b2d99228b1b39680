"""Property tests (hypothesis): every valid config works, every invalid one is refused by name.

Two settings profiles: ``ci`` (the default, bounded for the test suite) and ``fuzz``
(``HYPOTHESIS_PROFILE=fuzz``, run by ``make fuzz`` with ``--hypothesis-show-statistics``).
The byte-level fuzzers at the end feed mutated images and safetensors files to the loaders:
they must either load or raise the loader's own error naming the file, never anything else.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from vitkit import ViT, ViTConfig, load_pretrained, save_pretrained
from vitkit.checkpoint import CheckpointError, load_state_dict_file
from vitkit.config import MLP_ACTS, POOLS, ROPES
from vitkit.images import ImageError, load_image, preprocess_image

settings.register_profile(
    "ci", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile(
    "fuzz", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DROPOUTS = ("drop_rate", "attn_drop_rate", "pos_drop_rate", "head_drop_rate", "drop_path_rate")
probability = st.floats(min_value=0.0, max_value=0.95)


# --- valid configs ------------------------------------------------------------------------
@st.composite
def valid_configs(draw) -> ViTConfig:
    """Small configs (width <= 64, depth <= 3, image <= 32) covering every architectural switch."""
    patch = draw(st.integers(1, 8))
    grid_h = draw(st.integers(1, min(16, 32 // patch)))  # <= 256 tokens keeps an example under a second
    grid_w = draw(st.integers(1, min(16, 32 // patch)))
    img_size = patch * grid_h if (grid_h == grid_w and draw(st.booleans())) else (patch * grid_h, patch * grid_w)
    heads = draw(st.integers(1, 8))
    width = heads * draw(st.integers(1, 64 // heads))
    class_token = draw(st.booleans())
    pool = draw(st.sampled_from(["cls", "mean", "cls_mean"] if class_token else ["mean"]))
    mlp_ratio = draw(st.sampled_from([1.0, 2.0, 4.0, 1.5]))
    mlp_act = draw(st.sampled_from([a for a in MLP_ACTS if a != "swiglu" or int(width * mlp_ratio) % 2 == 0]))
    dist_token = pool == "cls" and draw(st.booleans())  # DeiT's second token goes with class pooling
    dynamic_img_size = draw(st.booleans())
    # BEiT's table: one class token, one grid
    rel_pos_bias = class_token and not dist_token and not dynamic_img_size and draw(st.booleans())
    rope = draw(st.sampled_from(["none", "dinov3", "eva02", "pe"])) if not rel_pos_bias and (width // heads) % 4 == 0 \
        else "none"
    return ViTConfig(
        img_size=img_size,
        patch_size=patch,
        in_channels=draw(st.integers(1, 4)),
        emb_size=width,
        depth=draw(st.integers(1, 3)),
        num_heads=heads,
        mlp_ratio=mlp_ratio,
        mlp_act=mlp_act,
        qkv_bias=draw(st.booleans()),
        class_token=class_token,
        dist_token=dist_token,
        rel_pos_bias=rel_pos_bias,
        rope=rope,
        rope_ref_grid=draw(st.integers(1, 16)) if rope in ("eva02", "pe") else 0,
        rope_grid_offset=draw(st.sampled_from([0.0, 1.0, 0.5])) if rope in ("eva02", "pe") else 0.0,
        abs_pos=draw(st.booleans()),
        mlp_norm=draw(st.booleans()),
        attn_norm=draw(st.booleans()),
        pool=pool,
        final_norm=draw(st.sampled_from(["tokens", "none"] if pool == "cls_mean" else ["tokens", "pooled", "none"])),
        norm_eps=draw(st.sampled_from([1e-5, 1e-6, 1e-12])),
        num_classes=draw(st.integers(0, 5)),
        dynamic_img_size=dynamic_img_size,
        **{name: draw(probability) for name in DROPOUTS},
    )


def expected_tokens(cfg: ViTConfig, h: int, w: int) -> int:
    return cfg.num_prefix_tokens + (h // cfg.patch_size) * (w // cfg.patch_size)


@given(cfg=valid_configs(), batch=st.integers(1, 3), data=st.data())
def test_any_valid_config_runs_forward_and_backward(cfg, batch, data):
    model = ViT(cfg).train()  # dropouts on: the training path is the one with the most branches
    h, w = cfg.img_size
    if cfg.dynamic_img_size:  # any multiple of the patch size, not only the configured one
        h = cfg.patch_size * data.draw(st.integers(1, min(16, 32 // cfg.patch_size)), label="grid_h")
        w = cfg.patch_size * data.draw(st.integers(1, min(16, 32 // cfg.patch_size)), label="grid_w")
    x = torch.randn(batch, cfg.in_channels, h, w, requires_grad=True)

    tokens = model.forward_features(x)
    out = model.forward_head(tokens)
    assert tokens.shape == (batch, expected_tokens(cfg, h, w), cfg.emb_size)
    assert out.shape == (batch, cfg.num_classes or cfg.num_features)
    assert torch.isfinite(tokens).all() and torch.isfinite(out).all()

    out.square().mean().backward()
    assert x.grad is not None and x.grad.shape == x.shape and torch.isfinite(x.grad).all()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"


@given(cfg=valid_configs())
def test_eval_mode_is_deterministic_and_batch_independent(cfg):
    model = ViT(cfg).eval()
    x = torch.randn(3, cfg.in_channels, *cfg.img_size)
    with torch.no_grad():
        both = model(x)
        again = model(x)
        alone = model(x[1:2])
    torch.testing.assert_close(both, again, rtol=0, atol=0)
    # each sample is computed on its own: no leakage across the batch (1e-5: kernels may block differently)
    torch.testing.assert_close(alone, both[1:2], rtol=1e-4, atol=1e-5)


@given(cfg=valid_configs())
def test_config_survives_a_json_round_trip(cfg):
    again = ViTConfig.from_dict(json.loads(json.dumps(cfg.to_dict())), source="roundtrip")
    assert again == cfg


@settings(max_examples=max(5, settings().max_examples // 5))  # each example writes and reads a checkpoint
@given(cfg=valid_configs())
def test_save_then_load_gives_the_same_model(cfg):
    model = ViT(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, Path(tmp) / "ckpt")
        loaded = load_pretrained(Path(tmp) / "ckpt").eval()
    assert loaded.cfg == cfg
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2
        assert torch.equal(a, b), k
    x = torch.randn(2, cfg.in_channels, *cfg.img_size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), loaded(x), rtol=0, atol=0)


# --- invalid configs ----------------------------------------------------------------------
BASE = dict(img_size=16, patch_size=4, in_channels=3, emb_size=32, depth=2, num_heads=4, num_classes=5)

not_an_int = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3),
    st.booleans(),
    st.none(),
    st.just([4]),
)
not_a_probability = st.one_of(
    st.floats(max_value=-1e-9, allow_infinity=True),
    st.floats(min_value=1.0, allow_infinity=True),
    st.just(math.nan),
    st.booleans(),
    st.text(max_size=3),
    st.none(),
)
not_a_bool = st.one_of(st.integers(0, 1), st.text(max_size=3), st.none(), st.floats(0, 1))
not_a_positive_number = st.one_of(
    st.floats(max_value=0.0, allow_infinity=True), st.just(math.nan), st.just(math.inf),
    st.booleans(), st.text(max_size=3), st.none(),
)


@st.composite
def invalid_fields(draw) -> tuple[str, dict, str]:
    """(field that is wrong, the overrides, a second word the message must contain or "")."""
    kind = draw(st.sampled_from([
        "int_type", "int_nonpositive", "heads", "patch_too_big", "not_divisible", "dropout", "pool",
        "final_norm", "cls_without_token", "dist_without_cls", "bool_type", "img_size_type", "mlp_ratio", "norm_eps",
        "num_classes", "cls_mean_pooled", "swiglu_odd", "rel_pos_tokens", "rel_pos_dynamic", "rope",
    ]))
    int_fields = ["patch_size", "in_channels", "emb_size", "depth", "num_heads"]
    if kind == "int_type":
        field = draw(st.sampled_from(int_fields))
        value = draw(st.one_of(not_an_int, st.integers(1, 64).map(float), st.integers(1, 64).map(str)))
        return field, {field: value}, ""
    if kind == "int_nonpositive":
        field = draw(st.sampled_from(int_fields))
        return field, {field: draw(st.integers(-1000, 0))}, ""
    if kind == "heads":  # 32 wide: any head count that does not divide it
        heads = draw(st.integers(1, 64).filter(lambda n: 32 % n))
        return "num_heads", {"num_heads": heads}, "divisible"
    if kind == "patch_too_big":
        patch = draw(st.integers(17, 64))
        return "img_size", {"patch_size": patch}, "patch_size"
    if kind == "not_divisible":
        patch = draw(st.integers(2, 16))
        size = draw(st.integers(patch + 1, 64).filter(lambda s: s % patch))
        img = draw(st.sampled_from([size, (size, patch), (patch, size)]))
        return "img_size", {"patch_size": patch, "img_size": img}, "divisible"
    if kind == "dropout":
        field = draw(st.sampled_from(DROPOUTS))
        return field, {field: draw(not_a_probability)}, ""
    if kind == "pool":
        value = draw(st.one_of(st.text(max_size=5).filter(lambda s: s not in POOLS), st.none(), st.integers()))
        return "pool", {"pool": value}, ""
    if kind == "final_norm":
        bad = st.text(max_size=6).filter(lambda s: s not in ("tokens", "pooled", "none"))
        return "final_norm", {"final_norm": draw(st.one_of(bad, st.none(), st.booleans()))}, ""
    if kind == "cls_without_token":
        return "pool", {"pool": draw(st.sampled_from(["cls", "cls_mean"])), "class_token": False}, "class_token"
    if kind == "swiglu_odd":  # SwiGLU halves fc1's output: its width (32 * ratio) must be even
        return "mlp_act", {"mlp_act": "swiglu", "mlp_ratio": draw(st.sampled_from([1 / 32, 3 / 32, 33 / 32]))}, "odd"
    if kind == "rel_pos_tokens":  # BEiT's table has entries for one class token and the patches, no others
        extra = draw(st.sampled_from([dict(class_token=False), dict(reg_tokens=2), dict(dist_token=True, pool="cls")]))
        return "rel_pos_bias", {"rel_pos_bias": True, **extra}, next(iter(extra))
    if kind == "rope":  # a kind vitkit lacks, a head width (32 / heads) not a multiple of 4, or with BEiT's bias
        case = draw(st.sampled_from(["kind", "width", "bias", "ref_grid", "grid_offset", "pool_heads",
                                     "pool_mlp_ratio"]))
        if case == "kind":
            return "rope", {"rope": draw(st.one_of(st.text(max_size=6).filter(lambda r: r not in ROPES),
                                                   st.none(), st.booleans()))}, ""
        if case == "ref_grid":  # EVA-02's reference grid: with rope="eva02" (> 0) and only with it
            wrong = draw(st.sampled_from([{"rope": "eva02"}, {"rope": "dinov3", "rope_ref_grid": 16},
                                          {"rope_ref_grid": 16}, {"rope": "eva02", "rope_ref_grid": -1},
                                          {"rope": "pe", "rope_ref_grid": 1.5}, {"rope": "pe"}]))
            return "rope_ref_grid", wrong, ""
        if case == "grid_offset":  # PE's index offset: a number >= 0, with rope="eva02" or "pe" only
            wrong = draw(st.sampled_from([{"rope_grid_offset": 1.0}, {"rope": "dinov3", "rope_grid_offset": 1.0},
                                          {"rope": "pe", "rope_ref_grid": 4, "rope_grid_offset": -1.0},
                                          {"rope": "pe", "rope_ref_grid": 4, "rope_grid_offset": math.inf},
                                          {"rope": "pe", "rope_ref_grid": 4, "rope_grid_offset": True}]))
            return "rope_grid_offset", wrong, ""
        if case == "pool_heads":  # attention pooling's own heads: with pool="map", dividing the width
            wrong = draw(st.sampled_from([{"pool_heads": 2}, {"pool": "map", "pool_heads": 3},
                                          {"pool": "map", "pool_heads": -1}, {"pool": "map", "pool_heads": True}]))
            return "pool_heads", wrong, ""
        if case == "pool_mlp_ratio":  # attention pooling's own MLP width: with pool="map", a number >= 0
            wrong = draw(st.sampled_from([{"pool_mlp_ratio": 4.0}, {"pool": "map", "pool_mlp_ratio": -1.0},
                                          {"pool": "map", "pool_mlp_ratio": math.nan},
                                          {"pool": "map", "pool_mlp_ratio": True}]))
            return "pool_mlp_ratio", wrong, ""
        if case == "width":
            return "rope", {"rope": "dinov3", "num_heads": draw(st.sampled_from([16, 32]))}, "multiple of 4"
        return "rope", {"rope": "dinov3", "rel_pos_bias": True}, "relative position bias"
    if kind == "rel_pos_dynamic":  # the table is laid out for one grid
        return "rel_pos_bias", {"rel_pos_bias": True, "dynamic_img_size": True}, "dynamic_img_size"
    if kind == "cls_mean_pooled":  # two features side by side: no one place for a norm after pooling
        return "final_norm", {"pool": "cls_mean", "final_norm": "pooled", "class_token": True}, "cls_mean"
    if kind == "dist_without_cls":  # a distillation token with mean pooling, or without a class token
        if draw(st.booleans()):
            return "dist_token", {"dist_token": True, "pool": "mean"}, "pool"
        return "dist_token", {"dist_token": True, "class_token": False, "pool": "mean"}, "class_token"
    if kind == "bool_type":
        field = draw(st.sampled_from(["qkv_bias", "class_token", "dist_token", "dynamic_img_size", "rel_pos_bias",
                                      "abs_pos", "mlp_norm", "attn_norm", "pool_prefix"]))
        return field, {field: draw(not_a_bool)}, ""
    if kind == "img_size_type":
        value = draw(st.one_of(
            st.floats(allow_nan=True), st.text(min_size=1, max_size=3), st.booleans(), st.none(),
            st.tuples(st.integers(1, 64)), st.tuples(st.integers(1, 64), st.integers(1, 64), st.integers(1, 64)),
            st.tuples(st.floats(1, 64).filter(lambda f: f != int(f)), st.integers(1, 64)),
            st.tuples(st.booleans(), st.booleans()),
        ))
        return "img_size", {"img_size": value, "patch_size": 1}, ""
    if kind == "mlp_ratio":
        return "mlp_ratio", {"mlp_ratio": draw(not_a_positive_number)}, ""
    if kind == "norm_eps":
        return "norm_eps", {"norm_eps": draw(not_a_positive_number)}, ""
    value = draw(st.one_of(st.integers(max_value=-1), st.floats(), st.booleans(), st.text(max_size=3), st.none()))
    return "num_classes", {"num_classes": value}, ""


@given(case=invalid_fields())
def test_any_invalid_config_is_refused_naming_the_field(case):
    field, overrides, also = case
    with pytest.raises(ValueError) as info:
        ViTConfig(**{**BASE, **overrides})
    assert f"ViTConfig.{field}" in str(info.value)
    assert also in str(info.value)
    # the same through the paths users take: ViT(**overrides) and a config.json's fields. ViT also reads timm's
    # keyword names (config.TIMM_NAMES), where a bool final_norm is timm's (a final LayerNorm, or none): valid
    if not (field == "final_norm" and isinstance(overrides["final_norm"], bool)):
        with pytest.raises(ValueError, match=f"ViTConfig.{field}"):
            ViT(ViTConfig(**BASE), **overrides)
    else:
        assert (ViT(ViTConfig(**BASE), **overrides).cfg.final_norm != "none") == overrides["final_norm"]
    with pytest.raises(ValueError) as info:
        ViTConfig.from_dict({**BASE, **overrides}, source="my/config.json")
    assert "my/config.json" in str(info.value) and f"ViTConfig.{field}" in str(info.value)


@given(extra=st.text(min_size=1, max_size=12).filter(lambda s: s not in ViTConfig.__dataclass_fields__))
def test_unknown_config_fields_are_refused_by_name(extra):
    with pytest.raises(ValueError) as info:
        ViTConfig.from_dict({**BASE, extra: 1}, source="my/config.json")
    assert "my/config.json" in str(info.value) and repr(extra) in str(info.value)


# --- wrong inputs ---------------------------------------------------------------------------
SMALL = ViTConfig(img_size=(16, 8), patch_size=4, in_channels=3, emb_size=16, depth=1, num_heads=2, num_classes=3)


@st.composite
def wrong_inputs(draw):
    """(dynamic_img_size, a bad input, the word the error must contain)."""
    dynamic = draw(st.booleans())
    kind = draw(st.sampled_from(["rank", "channels", "int_dtype", "float_dtype", "size", "not_tensor"]))
    if kind == "rank":
        shape = draw(st.lists(st.integers(1, 4), max_size=6).filter(lambda s: len(s) != 4))
        return dynamic, torch.zeros(shape), "4-d"
    if kind == "channels":
        c = draw(st.integers(0, 6).filter(lambda c: c != 3))
        return dynamic, torch.zeros(1, c, 16, 8), "channel"
    if kind == "int_dtype":
        dtype = draw(st.sampled_from([torch.uint8, torch.int32, torch.int64, torch.bool]))
        return dynamic, torch.zeros(1, 3, 16, 8, dtype=dtype), "floating-point"
    if kind == "float_dtype":
        dtype = draw(st.sampled_from([torch.float64, torch.float16, torch.bfloat16]))
        return dynamic, torch.zeros(1, 3, 16, 8, dtype=dtype), "dtype"
    if kind == "size":
        h, w = draw(st.integers(0, 40)), draw(st.integers(0, 40))
        if dynamic:
            assume(h == 0 or w == 0 or h % 4 or w % 4)
        else:
            assume((h, w) != (16, 8))
        return dynamic, torch.zeros(1, 3, h, w), "image size"
    value = draw(st.sampled_from([[[0.0]], 1.0, None, "image.png"]))
    return dynamic, value, "torch.Tensor"


@given(case=wrong_inputs())
@example(case=(True, torch.zeros(1, 3, 0, 8), "image size"))  # an empty image is divisible by anything
@example(case=(False, torch.zeros(1, 3, 16, 8, dtype=torch.float64), "dtype"))
def test_wrong_inputs_get_a_clear_error_before_any_kernel_runs(case):
    dynamic, x, word = case
    model = ViT(SMALL.replace(dynamic_img_size=dynamic)).eval()
    with pytest.raises((ValueError, TypeError)) as info:
        model(x)
    message = str(info.value)
    assert message.startswith("input:"), message  # raised by PatchEmbedding.check_input, not deep inside
    assert word in message


# --- byte-level fuzzing of the file loaders --------------------------------------------------
def _image_bytes(fmt: str, mode: str = "RGB", **save_args) -> bytes:
    img = Image.new("RGB", (24, 16))
    img.putdata([(x * 10 % 256, y * 15 % 256, (x * y) % 256) for y in range(16) for x in range(24)])
    img = img.convert(mode) if mode != "I;16" else Image.fromarray(
        (torch.arange(16 * 24).reshape(16, 24) * 150).to(torch.int32).numpy().astype("uint16"))
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_args)
    return buf.getvalue()


# every format and pixel mode load_image converts from: each decoder and each conversion gets damaged input
SEED_IMAGES = {
    **{fmt: _image_bytes(fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")},
    "PNG-RGBA": _image_bytes("PNG", "RGBA"),
    "PNG-P": _image_bytes("PNG", "P"),
    "PNG-16bit": _image_bytes("PNG", "I;16"),
    "JPEG-gray": _image_bytes("JPEG", "L"),
    "JPEG-progressive": _image_bytes("JPEG", progressive=True),
    "TIFF-LZW": _image_bytes("TIFF", compression="tiff_lzw"),
}


@st.composite
def mutated(draw, seed: bytes) -> bytes:
    """Truncate, overwrite bytes, or insert junk: the ways a file gets damaged."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["truncate", "flip", "insert", "zero_run"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if op == "truncate":
            del data[at:]
        elif op == "flip":
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            data[at:at + draw(st.integers(1, 64))] = bytes(min(64, len(data) - at))
    return bytes(data)


@st.composite
def damaged_images(draw) -> tuple[str, bytes]:
    fmt = draw(st.sampled_from(sorted(SEED_IMAGES)))
    return fmt, draw(mutated(SEED_IMAGES[fmt]))


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt EXIF it skips
@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=damaged_images(), channels=st.sampled_from([1, 3]))
def test_damaged_images_load_or_raise_image_error_naming_the_file(tmp_path, case, channels):
    fmt, data = case
    path = tmp_path / f"photo.{fmt.lower().split('-')[0]}"
    path.write_bytes(data)
    try:
        img = load_image(path, channels=channels)
    except ImageError as e:
        assert str(path) in str(e)
    else:  # damage Pillow can decode through: a real image of the mode asked for, that preprocesses
        assert img.mode == ("L" if channels == 1 else "RGB") and img.width > 0 and img.height > 0
        x = preprocess_image(img, {"img_size": [8, 8], "crop_pct": 0.875})
        assert x.shape == (channels, 8, 8) and torch.isfinite(x).all()


def _safetensors_bytes() -> bytes:
    from safetensors.torch import save

    return save({"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5, dtype=torch.int64)})


SEED_SAFETENSORS = _safetensors_bytes()


@st.composite
def damaged_safetensors(draw) -> bytes:
    if draw(st.booleans()):
        return draw(mutated(SEED_SAFETENSORS))
    # a hand-written header: any length prefix, any JSON, any payload
    header = draw(st.one_of(
        st.binary(max_size=64),
        st.dictionaries(st.text(max_size=4), st.dictionaries(
            st.sampled_from(["dtype", "shape", "data_offsets"]),
            st.one_of(st.sampled_from(["F32", "I64", "X"]), st.lists(st.integers(-2, 2**40), max_size=3)),
        ), max_size=3).map(lambda d: json.dumps(d).encode()),
    ))
    length = draw(st.one_of(st.just(len(header)), st.integers(0, 2**64 - 1)))
    return struct.pack("<Q", length) + header + draw(st.binary(max_size=64))


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=damaged_safetensors())
def test_damaged_safetensors_load_or_raise_checkpoint_error_naming_the_file(tmp_path, data):
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    try:
        state = load_state_dict_file(path)
    except CheckpointError as e:
        assert str(path) in str(e)
    else:
        assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
