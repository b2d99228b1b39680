"""Hostile and damaged files: each gets an error naming the file, and nothing else is touched.

Images go through ``vitkit.images.load_image`` (``ImageError``), weights and checkpoints
through ``vitkit.checkpoint`` (``CheckpointError``); both are ValueErrors, so the CLI turns
them into a message and exit code 2.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
import time
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from vitkit import ViT, ViTConfig, load_pretrained, save_pretrained
from vitkit.checkpoint import CheckpointError, atomic_directory, atomic_file, load_state_dict_file, read_config
from vitkit.images import ImageError, load_image

CFG = ViTConfig(img_size=16, patch_size=4, emb_size=16, depth=2, num_heads=2, num_classes=3)


def tree_digest(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``root``: equal digests mean byte-identical trees."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture
def good_checkpoint(tmp_path) -> Path:
    """A loadable checkpoint that the failures beside it must leave byte-identical."""
    return save_pretrained(ViT(CFG), tmp_path / "good")


def image_bytes(fmt: str, size=(64, 48)) -> bytes:
    img = Image.linear_gradient("L").resize(size).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


PNG, JPEG = image_bytes("PNG"), image_bytes("JPEG")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


# --- images ----------------------------------------------------------------------------------
BAD_IMAGES = {
    "png_cut_in_half.png": lambda: PNG[: len(PNG) // 2],
    "jpeg_cut_in_half.jpg": lambda: JPEG[: len(JPEG) // 2],
    "jpeg_header_only.jpg": lambda: JPEG[:200],
    "random_bytes.png": lambda: os.urandom(4096),
    "text.jpg": lambda: b"this is a text file, not a photo\n" * 20,
    "empty.png": lambda: b"",
    "html.png": lambda: b"<!DOCTYPE html><html><body>404 Not Found</body></html>",
    "png_zeroed_data.png": lambda: PNG[:40] + b"\x00" * 8 + PNG[48:],  # IDAT bytes no longer match its CRC
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_damaged_images_raise_image_error_naming_the_file(tmp_path, good_checkpoint, name):
    before = tree_digest(good_checkpoint)
    path = tmp_path / name
    path.write_bytes(BAD_IMAGES[name]())
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)
    assert tree_digest(good_checkpoint) == before


def test_missing_and_directory_paths_are_image_errors(tmp_path):
    """A directory exists: it is named as one (it was 'no such image file'), with what is expected."""
    for path, expected in ((tmp_path / "nope.png", "no such image file"),
                           (tmp_path, "is a directory; expected an image file")):
        with pytest.raises(ImageError, match=expected) as info:
            load_image(path)
        assert str(path) in str(info.value)


def test_decompression_bomb_header_is_refused_without_allocating(tmp_path, monkeypatch):
    """A 100-byte PNG claiming 30000 x 30000 pixels (2.7 GB as RGB) is refused from its header."""
    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)  # width, height, 8-bit RGB
    idat = zlib.compress(b"\x00" * 64)
    path = tmp_path / "bomb.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat)
                     + png_chunk(b"IEND", b""))
    assert path.stat().st_size < 200
    with monkeypatch.context() as m:  # the file really does claim that size (header read, limit off)
        m.setattr(Image, "MAX_IMAGE_PIXELS", None)
        with Image.open(path) as img:
            assert img.size == (30000, 30000)
    assert Image.MAX_IMAGE_PIXELS is not None  # vitkit runs with Pillow's limit on
    start = time.perf_counter()
    with pytest.raises(ImageError, match="too large") as info:
        load_image(path)
    assert str(path) in str(info.value)
    assert time.perf_counter() - start < 2.0  # refused from the header, not after decoding 2.7 GB


@pytest.mark.parametrize("pixels", [1000, 1800])  # 1000: Pillow's warning zone; 1800: above 2x the limit
def test_pillow_pixel_limit_is_honoured(tmp_path, monkeypatch, pixels):
    """With MAX_IMAGE_PIXELS = 800, a real 40x25 (1000 px) or 60x30 (1800 px) image is refused."""
    path = tmp_path / "big.png"
    Image.new("RGB", (40, 25) if pixels == 1000 else (60, 30), "red").save(path)
    assert load_image(path).size in ((40, 25), (60, 30))  # fine under Pillow's default limit
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 800)
    with pytest.raises(ImageError, match="too large") as info:
        load_image(path)
    assert str(path) in str(info.value)
    small = tmp_path / "small.png"
    Image.new("RGB", (20, 20), "red").save(small)
    assert load_image(small).size == (20, 20)  # the limit refuses only what is over it


# --- weights files ---------------------------------------------------------------------------
class RunsCode:
    """Unpickling this calls os.system: the classic malicious-checkpoint payload."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_the_payload_really_runs_code_when_unpickled_unsafely(tmp_path):
    """Proves the payload of the next test is live: plain pickle.loads does create the marker."""
    marker = tmp_path / "pwned-control"
    pickle.loads(pickle.dumps(RunsCode(marker)))
    assert marker.exists()


@pytest.mark.parametrize("fmt", ["torch_zip", "raw_pickle"])
@pytest.mark.parametrize("suffix", [".pth", ".bin", ".pt"])
def test_pickle_that_runs_code_is_refused_and_never_runs(tmp_path, good_checkpoint, fmt, suffix):
    before = tree_digest(good_checkpoint)
    marker = tmp_path / "pwned"
    path = tmp_path / f"weights{suffix}"
    payload = {"patch_embed.projection.weight": torch.zeros(2), "evil": RunsCode(marker)}
    if fmt == "torch_zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(CheckpointError, match="refused") as info:
        load_state_dict_file(path)
    assert str(path) in str(info.value)
    assert not marker.exists()
    assert tree_digest(good_checkpoint) == before


def test_pickle_payload_inside_a_checkpoint_directory_is_never_run(tmp_path):
    """A checkpoint directory whose model.safetensors is really a pickle: refused, code not run."""
    ckpt = save_pretrained(ViT(CFG), tmp_path / "ckpt")
    marker = tmp_path / "pwned"
    torch.save({"x": RunsCode(marker)}, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_pretrained(ckpt)
    assert str(ckpt / "model.safetensors") in str(info.value)
    assert not marker.exists()


def test_plain_state_dict_pth_still_loads(tmp_path):
    """The control: what weights_only allows (a dict of tensors) does load."""
    state = ViT(CFG).state_dict()
    torch.save({"state_dict": state}, tmp_path / "ok.pth")
    loaded = load_state_dict_file(tmp_path / "ok.pth")
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def _corrupt_weights(ckpt: Path, how: str) -> None:
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "header_only":
        (header_len,) = struct.unpack("<Q", data[:8])
        path.write_bytes(data[: 8 + header_len])
    elif how == "garbage_header":
        path.write_bytes(data[:8] + b"\xff" * 64 + data[72:])
    elif how == "huge_header_length":
        path.write_bytes(struct.pack("<Q", 2**62) + data[8:])
    elif how == "random":
        path.write_bytes(os.urandom(len(data)))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "missing":
        path.unlink()
    elif how == "wrong_shapes":
        from safetensors.torch import save_file

        bad = ViT(CFG.replace(emb_size=32)).state_dict()
        save_file({k: v.contiguous() for k, v in bad.items()}, path)
    elif how == "missing_keys":
        from safetensors.torch import save_file

        state = {k: v for k, v in ViT(CFG).state_dict().items() if not k.startswith("head.")}
        save_file(state, path)
    else:
        raise AssertionError(how)


@pytest.mark.parametrize(
    "how", ["truncated", "header_only", "garbage_header", "huge_header_length", "random", "empty", "missing",
            "wrong_shapes", "missing_keys"],
)
def test_corrupt_safetensors_in_a_checkpoint_is_a_checkpoint_error(tmp_path, good_checkpoint, how):
    before = tree_digest(good_checkpoint)
    ckpt = save_pretrained(ViT(CFG), tmp_path / "bad")
    _corrupt_weights(ckpt, how)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(ckpt)
    assert str(ckpt / "model.safetensors") in str(info.value) or str(ckpt) in str(info.value)
    assert str(ckpt) in str(info.value)
    assert tree_digest(good_checkpoint) == before
    assert load_pretrained(good_checkpoint).cfg == CFG


BAD_CONFIGS = {
    "depth_float": lambda m: {**m, "model": {**m["model"], "depth": 2.0}},
    "emb_size_string": lambda m: {**m, "model": {**m["model"], "emb_size": "16"}},
    "img_size_string": lambda m: {**m, "model": {**m["model"], "img_size": "16"}},
    "bool_heads": lambda m: {**m, "model": {**m["model"], "num_heads": True}},
    "unknown_field": lambda m: {**m, "model": {**m["model"], "num_experts": 8}},
    "bad_pool": lambda m: {**m, "model": {**m["model"], "pool": "max"}},
    "model_not_object": lambda m: {**m, "model": [1, 2, 3]},
    "wrong_format": lambda m: {**m, "format": "timm"},
    "top_level_list": lambda m: [m],
    "class_names_not_strings": lambda m: {**m, "class_names": [1, 2, 3]},
    "class_names_wrong_count": lambda m: {**m, "class_names": ["a", "b"]},
    "preprocess_bad_interpolation": lambda m: {**m, "preprocess": {**m["preprocess"], "interpolation": "magic"}},
    "preprocess_zero_std": lambda m: {**m, "preprocess": {**m["preprocess"], "std": [0.0, 1.0, 1.0]}},
    "preprocess_zero_crop": lambda m: {**m, "preprocess": {**m["preprocess"], "crop_pct": 0}},
    "preprocess_bad_crop_mode": lambda m: {**m, "preprocess": {**m["preprocess"], "crop_mode": "border"}},
    "preprocess_bad_size": lambda m: {**m, "preprocess": {**m["preprocess"], "img_size": "big"}},
    "preprocess_mean_length": lambda m: {**m, "preprocess": {**m["preprocess"], "mean": [0.5, 0.5]}},
    "preprocess_not_object": lambda m: {**m, "preprocess": "imagenet"},
    # a config claiming a model of ~10^12 parameters must be refused before anything is allocated
    "huge_width": lambda m: {**m, "model": {**m["model"], "emb_size": 2**20, "num_heads": 1}},
    "huge_depth": lambda m: {**m, "model": {**m["model"], "depth": 10**4}},
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_config_json_is_a_checkpoint_error_naming_it(tmp_path, good_checkpoint, name):
    before = tree_digest(good_checkpoint)
    ckpt = save_pretrained(ViT(CFG), tmp_path / "bad", class_names=["a", "b", "c"])
    path = ckpt / "config.json"
    path.write_text(json.dumps(BAD_CONFIGS[name](json.loads(path.read_text()))))
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as info:
        load_pretrained(ckpt)
    assert str(ckpt) in str(info.value)
    assert time.perf_counter() - start < 5.0
    assert tree_digest(good_checkpoint) == before


@pytest.mark.parametrize("content", [b"", b"{not json", b"\xff\xfe\x00garbage", b"null", b"42"])
def test_unparseable_config_json_is_a_checkpoint_error(tmp_path, content):
    ckpt = save_pretrained(ViT(CFG), tmp_path / "bad")
    (ckpt / "config.json").write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        read_config(ckpt)
    assert str(ckpt / "config.json") in str(info.value)


def test_loading_paths_that_are_not_checkpoints(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty_dir").mkdir()
    for path in (tmp_path / "nope", tmp_path / "notes.txt", tmp_path / "empty_dir", tmp_path / "x.safetensors"):
        with pytest.raises(CheckpointError) as info:
            load_pretrained(path)
        assert str(path) in str(info.value)


# --- saving must not clobber what is there ----------------------------------------------------
def test_saving_over_a_regular_file_refuses_and_keeps_the_file(tmp_path):
    """atomic_directory must not swap a user's file for a checkpoint directory (and lose the file)."""
    target = tmp_path / "notes.txt"
    target.write_text("precious")
    with pytest.raises(FileExistsError, match="not a directory"):
        save_pretrained(ViT(CFG), target)
    assert target.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no temporary left behind


def test_failed_save_leaves_the_previous_checkpoint_byte_identical(tmp_path, good_checkpoint):
    before = tree_digest(good_checkpoint)
    bad = ViT(CFG)
    bad.cfg = "not a config"  # save_pretrained fails while preparing, before writing a byte
    with pytest.raises(AttributeError):
        save_pretrained(bad, good_checkpoint)
    assert tree_digest(good_checkpoint) == before
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(good_checkpoint) as tmp:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("boom")
    assert tree_digest(good_checkpoint) == before
    assert sorted(p.name for p in good_checkpoint.parent.iterdir()) == ["good"]  # temporaries removed


def test_atomic_outputs_get_normal_permissions(tmp_path):
    """mkdtemp/mkstemp create 0700/0600; a checkpoint or output file should obey the umask like open()."""
    old = os.umask(0o022)
    try:
        ckpt = save_pretrained(ViT(CFG), tmp_path / "ckpt")
        with atomic_file(tmp_path / "out.csv", "w") as f:
            f.write("a,b\n")
    finally:
        os.umask(old)
    assert (ckpt.stat().st_mode & 0o777) == 0o755
    assert ((tmp_path / "out.csv").stat().st_mode & 0o777) == 0o644
