"""The datasets are real and split as documented; batches depend on (seed, epoch) only; augmentation is sane."""

import gzip
import re
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_photo_folder
from vitkit.cli import main
from vitkit.data import (
    FASHION_MNIST_DIR,
    BatchAugment,
    FileImages,
    epoch_permutation,
    global_batches,
    hold_out,
    load_dataset,
    load_digits,
    normalize,
    resize_dataset,
    save_samples,
)
from vitkit.images import ImageError, load_image, preprocess_image


def test_digits_split_is_fixed_stratified_and_real():
    from sklearn.datasets import load_digits as sk_digits

    a, b = load_digits(), load_digits()
    assert (len(a.train), len(a.val)) == (1437, 360)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.val.labels, b.val.labels)
    assert a.image_shape == (1, 8, 8) and a.train.images.dtype == torch.uint8
    # stratified: every class has 36 +- 1 test images
    counts = torch.bincount(a.val.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    # the pixels are sklearn's 0..16 ink scaled to 0..255: the multiset of images is the original one
    ref = torch.from_numpy(sk_digits().images).float()
    ours = torch.cat([a.train.images, a.val.images]).squeeze(1).float() * 16 / 255
    assert torch.allclose(ours.sum(), ref.sum(), rtol=1e-3)
    assert torch.allclose(ours.sort(0).values, ref.sort(0).values, atol=16 / 255 / 2 + 1e-6)


def test_a_saved_digit_png_preprocesses_to_exactly_the_training_tensor(tmp_path):
    data = load_digits()
    img = data.val.images[0, 0].numpy()
    Image.fromarray(img, mode="L").save(tmp_path / "d.png")
    from_file = preprocess_image(load_image(tmp_path / "d.png", channels=1), data.preprocess)
    assert torch.equal(from_file, normalize(data.val.images[:1], data.preprocess)[0])


def test_a_resized_builtin_set_holds_what_predict_makes_of_its_files(tmp_path):
    """`vitkit train --img-size` on the 8x8 digits: each image resized once, and a PNG of the original
    (what a user would predict on) preprocesses to exactly the tensor trained on."""
    native = load_digits()
    for interpolation in ("bilinear", "bicubic"):
        data = load_dataset("digits", img_size=(20, 20), preprocess={"interpolation": interpolation})
        assert data.image_shape == (1, 20, 20) and data.train.images.dtype == torch.uint8
        assert data.preprocess == dict(native.preprocess, img_size=[20, 20], interpolation=interpolation)
        assert torch.equal(data.train.labels, native.train.labels) and len(data.val) == len(native.val)
        for path in save_samples(native, tmp_path / interpolation, n=4):  # 8x8 files
            i = int(path.name.split("-")[0])
            from_file = preprocess_image(load_image(path, channels=1), data.preprocess)
            assert torch.equal(from_file, normalize(data.val.images[i:i + 1], data.preprocess)[0])
    # a real resize: bilinear upsampling (PIL's, antialiased) agrees with torch's plain bilinear when enlarging
    ref = torch.nn.functional.interpolate(native.val.images[:16].float(), size=(20, 20), mode="bilinear",
                                          align_corners=False)
    ours = load_dataset("digits", img_size=20).val.images[:16].float()
    assert (ours - ref).abs().max() <= 1.0 and (ours - ref).abs().mean() < 0.3
    assert resize_dataset(native, (8, 8), "bicubic") is native  # the same size: nothing to do
    assert len(load_dataset("digits", img_size=(12, 12), with_train=False).train) == 0  # eval resizes val only


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_reads_the_debian_idx_files():
    data = load_dataset("fashion-mnist")
    assert (len(data.train), len(data.val)) == (60000, 10000)
    assert data.image_shape == (1, 28, 28) and data.num_classes == 10
    assert torch.bincount(data.val.labels).tolist() == [1000] * 10


def _write_idx(path, magic, array):
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


def test_fashion_mnist_data_dir_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 4)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", 2051, rng.integers(0, 256, (n, 28, 28), np.uint8))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", 2049, rng.integers(0, 10, (n,), np.uint8))
    data = load_dataset("fashion-mnist", data_dir=str(tmp_path))
    assert (len(data.train), len(data.val)) == (6, 4)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path / "nowhere"))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03rubbish"))
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz: not an idx file"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path))


def _folder(root: Path, corrupt: bool):
    for split, n in (("train", 3), ("val", 2)):
        for c, color in (("cat", 40), ("dog", 200)):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (20 + i, 12), (color, color, color)).save(d / f"{i}.png")
    if corrupt:
        (root / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")


def test_folder_dataset_loads_resizes_and_reports_a_corrupt_image(tmp_path, capsys):
    _folder(tmp_path, corrupt=True)
    bad = tmp_path / "train" / "dog" / "broken.png"
    with pytest.raises(ImageError, match=f"{bad}.*--skip-bad-images"):
        load_dataset(f"folder:{tmp_path}", img_size=(8, 8), channels=3)
    data = load_dataset(f"folder:{tmp_path}", img_size=(8, 8), channels=3, skip_bad_images=True)
    assert data.class_names == ["cat", "dog"]
    assert (len(data.train), len(data.val)) == (6, 4) and data.image_shape == (3, 8, 8)
    assert len(data.skipped) == 1 and str(bad) in data.skipped[0]
    assert "skipped 1 unreadable image" in capsys.readouterr().err
    # grey 40 stays grey 40 through resize and the uint8 round trip
    assert data.train.images[data.train.labels == 0].unique().tolist() == [40]


def test_a_folder_named_like_an_image_is_not_read_as_one(tmp_path):
    _folder(tmp_path, corrupt=False)
    (tmp_path / "train" / "cat" / "album.png").mkdir()  # a folder, however it is named
    (tmp_path / "train" / "cat" / "album.png" / "inside.png").write_bytes((tmp_path / "train" / "cat" / "0.png").read_bytes())
    data = load_dataset(f"folder:{tmp_path}", img_size=(8, 8), channels=3)
    assert (len(data.train), len(data.val)) == (7, 4)  # the image inside it counts, the folder does not


def test_a_streamed_folder_decodes_the_pixels_held_in_memory(tmp_path):
    root = write_photo_folder(tmp_path / "photos", {"train": 7, "val": 3}, sizes=(40, 200))
    spec = dict(img_size=(24, 24), channels=3)
    held = load_dataset(f"folder:{root}", folder_loading="memory", **spec)
    streamed = load_dataset(f"folder:{root}", folder_loading="stream", **spec)
    images = streamed.train.images
    assert isinstance(images, FileImages) and isinstance(held.train.images, torch.Tensor)
    assert streamed.image_shape == held.image_shape == (3, 24, 24) and streamed.preprocess == held.preprocess
    assert torch.equal(streamed.train.labels, held.train.labels) and len(streamed.val) == len(held.val) == 9
    idx = torch.randperm(len(held.train), generator=torch.Generator().manual_seed(0))[:8]
    assert torch.equal(images[idx], held.train.images[idx])
    later = idx.flip(0)[:5]
    images.prefetch(later)  # decoded in the background, then handed over when asked for
    assert len(images._pending) == 1 and torch.equal(images[later], held.train.images[later])
    assert not images._pending
    assert torch.equal(images[3], held.train.images[3])  # one image, (C, H, W)
    assert torch.equal(streamed.train.subset(4).images[torch.arange(4)], held.train.images[:4])
    assert images[torch.zeros(0, dtype=torch.long)].shape == (0, 3, 24, 24)
    assert torch.equal(streamed.val.images[torch.arange(9)], held.val.images)


def test_a_streamed_folder_checks_each_file_up_front_and_names_one_that_fails_later(tmp_path, capsys):
    _folder(tmp_path / "bad", corrupt=True)  # a PNG signature and then junk: caught when listing the files
    bad = tmp_path / "bad" / "train" / "dog" / "broken.png"
    with pytest.raises(ImageError, match=f"{bad}.*--skip-bad-images"):
        load_dataset(f"folder:{tmp_path / 'bad'}", img_size=(8, 8), channels=3, folder_loading="stream")
    data = load_dataset(f"folder:{tmp_path / 'bad'}", img_size=(8, 8), channels=3, folder_loading="stream",
                        skip_bad_images=True)
    assert (len(data.train), len(data.skipped)) == (6, 1) and "skipped 1 unreadable image" in capsys.readouterr().err
    _folder(tmp_path / "cut", corrupt=False)  # a whole header, half the pixels: found when its batch is decoded
    cut = tmp_path / "cut" / "train" / "cat" / "1.png"
    Image.new("RGB", (64, 64)).save(cut, compress_level=0)
    cut.write_bytes(cut.read_bytes()[:3000])
    data = load_dataset(f"folder:{tmp_path / 'cut'}", img_size=(8, 8), channels=3, folder_loading="stream")
    assert data.train.images[torch.tensor([0])].shape == (1, 3, 8, 8)
    with pytest.raises(ImageError, match=f"{cut}: corrupt or truncated image"):
        data.train.images[torch.tensor([0, 1, 2])]


def test_auto_folder_loading_streams_a_folder_too_large_for_the_ram(tmp_path, monkeypatch, capsys):
    import vitkit.data

    _folder(tmp_path, corrupt=False)
    spec = dict(img_size=(8, 8), channels=3)
    assert isinstance(load_dataset(f"folder:{tmp_path}", **spec).train.images, torch.Tensor)
    monkeypatch.setattr(vitkit.data, "STREAM_ABOVE_RAM_FRACTION", 0.0)
    assert isinstance(load_dataset(f"folder:{tmp_path}", **spec).train.images, FileImages)
    assert "10 images would take" in capsys.readouterr().err
    assert isinstance(load_dataset(f"folder:{tmp_path}", folder_loading="memory", **spec).train.images, torch.Tensor)
    with pytest.raises(ValueError, match="--folder-loading: expected one of"):
        load_dataset(f"folder:{tmp_path}", folder_loading="lazy", **spec)


def test_folder_dataset_needs_train_and_val(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="val: missing.*or only class folders"):
        load_dataset(f"folder:{tmp_path}", img_size=(8, 8), channels=3)
    (tmp_path / "bare").mkdir()
    with pytest.raises(ValueError, match="no class subfolders"):
        load_dataset(f"folder:{tmp_path / 'bare'}", img_size=(8, 8), channels=3)


def test_a_folder_of_class_folders_holds_out_the_same_share_of_each_class(tmp_path, capsys):
    root = write_photo_folder(tmp_path, {"photos": 9}) / "photos"  # photos/CLASS/*.png, nothing else
    spec = dict(img_size=(16, 16), channels=3, val_fraction=0.25)
    data = load_dataset(f"folder:{root}", **spec)
    assert "6 of its 27 images (25% of each class) held out" in capsys.readouterr().err  # round(9 / 4) each
    assert data.class_names == ["astronaut", "cat", "coffee"]
    assert torch.bincount(data.val.labels).tolist() == [2, 2, 2]
    assert len(data.train) + len(data.val) == 27
    every = load_dataset(f"folder:{root}", **spec, folder_loading="stream")  # the same split, every time
    assert torch.equal(every.val.labels, data.val.labels) and torch.equal(every.val.images[torch.arange(len(data.val))],
                                                                          data.val.images)
    held = {img.numpy().tobytes() for img in data.val.images}
    assert not held & {img.numpy().tobytes() for img in data.train.images}  # disjoint
    # what `vitkit eval` reads, with the preprocess the run's checkpoints hold (training's squash)
    val_only = load_dataset(f"folder:{root}", **spec, preprocess=data.preprocess, with_train=False)
    assert len(val_only.train) == 0 and torch.equal(val_only.val.images, data.val.images)
    with pytest.raises(ValueError, match="--val-fraction: expected a share in"):
        load_dataset(f"folder:{root}", img_size=(16, 16), channels=3, val_fraction=1.0)
    files = [(Path(f"{c}/{i}.png"), c) for c, n in enumerate((1, 2, 10, 40)) for i in range(n)]
    train, val = hold_out(files, 0.1)
    assert sorted(train + val) == sorted(files) and not set(train) & set(val)
    assert [sum(label == c for _, label in val) for c in range(4)] == [0, 1, 1, 4]  # never a whole class
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("cifar")


def test_batch_order_depends_on_seed_and_epoch_only():
    torch.manual_seed(1)
    a = epoch_permutation(100, seed=3, epoch=2)
    torch.manual_seed(2)  # the global RNG's history does not matter
    assert torch.equal(a, epoch_permutation(100, seed=3, epoch=2))
    assert not torch.equal(a, epoch_permutation(100, seed=3, epoch=3))
    assert not torch.equal(a, epoch_permutation(100, seed=4, epoch=2))
    batches = global_batches(100, 32, seed=3, epoch=2)
    assert [len(b) for b in batches] == [32, 32, 32]  # ragged tail dropped
    assert len(torch.cat(batches).unique()) == 96


def test_shift_moves_pixels_and_fills_with_zero():
    aug = BatchAugment({"mean": [0.0], "std": [1.0]}, 10, translate=2)
    x = torch.zeros(64, 1, 8, 8, dtype=torch.uint8)
    x[:, :, 3, 4] = 255  # one lit pixel
    torch.manual_seed(0)
    y = aug.shift(x)
    assert y.shape == x.shape and y.dtype == torch.uint8
    assert (y.flatten(1).sum(1) == 255).all()  # the pixel is never lost with |shift| <= 2 from (3, 4)
    pos = y.flatten(1).argmax(1)
    rows, cols = pos // 8, pos % 8
    assert (rows - 3).abs().max() <= 2 and (cols - 4).abs().max() <= 2
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 10  # each image gets its own shift


def test_full_augment_gives_soft_targets_and_is_fast():
    data = load_digits()
    aug = BatchAugment(data.preprocess, 10, translate=1, hflip=0.5, auto_augment="trivialaugment",
                       random_erasing=0.25, mixup_alpha=0.8, cutmix_alpha=1.0, crop_scale=0.5)
    x, t = aug(data.train.images[:128], data.train.labels[:128])
    assert x.shape == (128, 1, 8, 8) and x.dtype == torch.float32
    assert t.shape == (128, 10) and torch.allclose(t.sum(1), torch.ones(128))
    plain = BatchAugment(data.preprocess, 10, translate=1)
    start, n = time.perf_counter(), 0
    while n < 20000:
        plain(data.train.images[:512], data.train.labels[:512])
        n += 512
    rate = n / (time.perf_counter() - start)
    print(f"digits loader (translate only): {rate:.0f} images/s")
    assert rate > 5000  # far above the ~1-2k images/s the model trains at on this CPU


def test_random_erasing_fills_with_noise_as_timm_or_with_the_mean_colour():
    """erasing_mode="pixel" (the default) fills each erased box with standard normal noise, as timm's
    RandomErasing(mode="pixel") does after normalising; "const" with 0, the mean colour."""
    from timm.data.random_erasing import RandomErasing

    images = torch.full((64, 3, 32, 32), 200, dtype=torch.uint8)
    pre = dict(mean=[0.5] * 3, std=[0.25] * 3)
    flat = normalize(images, pre)  # (200/255 - 0.5) / 0.25 everywhere
    for mode, want_std in (("pixel", 1.0), ("const", 0.0)):
        x, _ = BatchAugment(pre, 10, random_erasing=1.0, erasing_mode=mode)(images, torch.zeros(64, dtype=torch.long))
        erased = x != flat
        assert erased.any(), mode
        if mode == "const":
            erased = x == 0
            assert erased.any() and ((x == flat) | erased).all()
        assert x[erased].std().item() == pytest.approx(want_std, abs=0.05), mode
    theirs = RandomErasing(probability=1.0, mode="pixel", device="cpu")(flat.clone())
    assert theirs[theirs != flat].std().item() == pytest.approx(1.0, abs=0.05)  # the oracle's fill, the same law
    with pytest.raises(ValueError, match=r"erasing_mode: expected one of \('pixel', 'const'\), got 'noise'"):
        BatchAugment(pre, 10, random_erasing=0.5, erasing_mode="noise")


def _photo_batch(size: int = 48) -> torch.Tensor:
    """Three real photos (scikit-image) as a uint8 (3, 3, size, size) batch."""
    from skimage import data as photos

    return torch.stack([torch.from_numpy(np.array(Image.fromarray(img).resize((size, size), Image.BILINEAR)))
                        .permute(2, 0, 1) for img in (photos.astronaut(), photos.chelsea(), photos.coffee())])


def test_random_resized_crop_is_torchvisions_resized_crop_of_each_box():
    from torchvision.transforms.v2 import functional as TF

    x = _photo_batch()
    aug = BatchAugment(dict(mean=[0.5] * 3, std=[0.5] * 3), 3, crop_scale=0.08)
    torch.manual_seed(0)
    for boxes in (aug.crop_boxes(3, 48, 48), torch.tensor([[0.0, 0, 48, 48], [5, 7, 11, 30], [40, 0, 8, 8]])):
        out = aug.resized_crop(x, boxes)
        assert out.shape == x.shape and out.dtype == torch.uint8
        for img, got, (top, left, h, w) in zip(x, out, boxes.long().tolist()):
            ref = TF.resized_crop(img.float(), top, left, h, w, [48, 48], antialias=True)
            assert (got.float() - ref).abs().max() <= 1.0  # rounding to uint8
    assert torch.equal(aug.resized_crop(x, torch.tensor([[0.0, 0, 48, 48]] * 3)), x)  # the whole image: as it was


def test_random_resized_crop_boxes_follow_torchvisions_draw():
    """The vectorised draw against torchvision's RandomResizedCrop.get_params, one image at a time:
    the same fallback exactly, and the same distribution of areas and aspect ratios."""
    from torchvision.transforms import RandomResizedCrop

    aug = BatchAugment(dict(mean=[0.5], std=[0.5]), 10, crop_scale=1.0)  # a 16x40 image: no try fits
    ref = RandomResizedCrop.get_params(torch.zeros(1, 16, 40), scale=(1.0, 1.0), ratio=(3 / 4, 4 / 3))
    assert aug.crop_boxes(4, 16, 40).long().tolist() == [list(ref)] * 4
    aug = BatchAugment(dict(mean=[0.5], std=[0.5]), 10, crop_scale=0.08)
    torch.manual_seed(0)
    ours = aug.crop_boxes(4000, 24, 32)
    theirs = torch.tensor([RandomResizedCrop.get_params(torch.zeros(1, 24, 32), scale=(0.08, 1.0),
                                                        ratio=(3 / 4, 4 / 3)) for _ in range(4000)], dtype=torch.float32)
    for boxes in (ours, theirs):
        top, left, h, w = boxes.T
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= 24).all() and (left + w <= 32).all()
    def stats(b):
        share, log_aspect = b[:, 2] * b[:, 3] / (24 * 32), torch.log(b[:, 3] / b[:, 2])
        return torch.stack([share.mean(), share.std(), log_aspect.mean(), log_aspect.std(),
                            b[:, 0].mean() / 24, b[:, 1].mean() / 32])

    assert (stats(ours) - stats(theirs)).abs().max() < 0.03, (stats(ours), stats(theirs))
    larger = BatchAugment(dict(mean=[0.5], std=[0.5]), 10, crop_scale=0.5).crop_boxes(4000, 24, 32)
    assert stats(larger)[0] > stats(ours)[0] + 0.15  # the scale is obeyed: larger crops on average
    from vitkit.train import make_augment, resolve_config

    made = make_augment(resolve_config(None, {"crop_scale": 0.08, "crop_ratio": 1.5}), load_digits())
    assert (made.crop_scale, made.crop_ratio) == (0.08, 1.5)
    for bad, expected in (({"crop_scale": 1.5}, "--crop-scale: expected a value in [0, 1]"),
                          ({"crop_ratio": 0.9}, "--crop-ratio: expected R >= 1")):
        with pytest.raises(ValueError, match=re.escape(expected)):
            resolve_config(None, bad)
    with pytest.raises(ValueError, match="crop_ratio: expected R >= 1"):
        BatchAugment(dict(mean=[0.5], std=[0.5]), 10, crop_scale=0.5, crop_ratio=0.5)


def test_a_streamed_folder_crops_the_full_resolution_file(tmp_path):
    """FileImages.load(idx, boxes): each box is cut from the original file (timm's RandomResizedCrop
    order), then resized to the model's size, not cut from the image already shrunk to it."""
    root = write_photo_folder(tmp_path / "photos", {"train": 3, "val": 1}, sizes=(120, 300))
    data = load_dataset(f"folder:{root}", img_size=(24, 24), channels=3, folder_loading="stream")
    images = data.train.images
    idx = torch.arange(len(images))
    paths = [images.paths[i] for i in idx]
    assert images.sizes[idx].tolist() == [[Image.open(p).height, Image.open(p).width] for p in paths]
    aug = BatchAugment(data.preprocess, 3, crop_scale=0.1)
    boxes = aug.crop_boxes(len(idx), images.sizes[idx, 0], images.sizes[idx, 1], torch.Generator().manual_seed(0))
    images.prefetch(idx, boxes)
    got = images.load(idx, boxes)
    assert not images._pending  # the prefetched crops were the ones asked for
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[data.preprocess["interpolation"]]
    for img, path, (top, left, h, w) in zip(got, paths, boxes.long().tolist()):
        assert 0 <= top and 0 <= left and top + h <= Image.open(path).height and left + w <= Image.open(path).width
        ref = Image.open(path).convert("RGB").crop((left, top, left + w, top + h)).resize((24, 24), resample)
        assert torch.equal(img, torch.from_numpy(np.array(ref)).permute(2, 0, 1))
    # the same boxes, scaled onto the 24x24 images in memory: a blurrier, different picture
    small = aug.resized_crop(images[idx], boxes * 24 / images.sizes[idx].repeat(1, 2))
    assert (small.float() - got.float()).abs().mean() > 2


def test_crop_boxes_for_images_of_many_sizes_at_once():
    aug = BatchAugment(dict(mean=[0.5], std=[0.5]), 10, crop_scale=0.08)
    one = aug.crop_boxes(6, 30, 50, torch.Generator().manual_seed(1))
    same = aug.crop_boxes(6, torch.full((6,), 30.0), torch.full((6,), 50.0), torch.Generator().manual_seed(1))
    assert torch.equal(one, same)  # per-image sizes draw exactly as one shared size
    from torchvision.transforms import RandomResizedCrop

    strict = BatchAugment(dict(mean=[0.5], std=[0.5]), 10, crop_scale=1.0)  # no try fits these: the fallback
    heights, widths = torch.tensor([16.0, 40.0, 33.0]), torch.tensor([40.0, 16.0, 33.0])
    boxes = strict.crop_boxes(3, heights, widths)
    for box, h, w in zip(boxes.long().tolist(), heights.long().tolist(), widths.long().tolist()):
        if h != w:  # a square image fits at share 1 within the ratio range: the whole image
            assert box == list(RandomResizedCrop.get_params(torch.zeros(1, h, w), (1.0, 1.0), (3 / 4, 4 / 3)))
        else:
            assert box == [0, 0, h, w]


def _csv(path: Path, rows: list[tuple], header: str = "image,label,split") -> Path:
    path.write_text("\n".join([header, *(",".join(map(str, row)) for row in rows)]) + "\n")
    return path


@pytest.mark.parametrize("loading", ["memory", "stream"])
def test_a_csv_table_reads_as_the_folder_of_the_same_files(tmp_path, loading):
    """csv:FILE, one image a row (path relative to the table, class, split), against the folder
    dataset of the same real photos: the same classes, images and labels, in both loading modes."""
    root = write_photo_folder(tmp_path / "photos", {"train": 4, "val": 2}, sizes=(40, 120))
    rows = [(p.relative_to(tmp_path), p.parent.name, split) for split in ("train", "val")
            for p in sorted((root / split).rglob("*.png"))]
    rows = rows[::-1]  # the table's order is kept (classes sort): here, the folder's order reversed
    table = _csv(tmp_path / "labels.csv", rows, header="Path,Class,Split")  # any case; path/class are synonyms
    spec = dict(img_size=(16, 16), channels=3, folder_loading=loading)
    folder = load_dataset(f"folder:{root}", **spec)
    data = load_dataset(f"csv:{table}", **spec)
    assert data.class_names == folder.class_names == ["astronaut", "cat", "coffee"] and data.name == f"csv:{table}"
    for mine, theirs in ((data.train, folder.train), (data.val, folder.val)):
        every = torch.arange(len(theirs))
        assert torch.equal(mine.labels.flip(0), theirs.labels)
        assert torch.equal(mine.images[every.flip(0)], theirs.images[every])


def test_a_csv_table_holds_out_sorts_numbers_and_names_what_is_wrong(tmp_path, capsys):
    root = write_photo_folder(tmp_path / "photos", {"all": 6})
    files = sorted((root / "all").rglob("*.png"))
    names = {"astronaut": 10, "cat": 2, "coffee": 1}  # numeric classes sort as numbers: 1, 2, 10
    table = _csv(tmp_path / "t.csv", [(p.resolve(), names[p.parent.name]) for p in files], header="file,target")
    data = load_dataset(f"csv:{table}", img_size=(8, 8), channels=3, val_fraction=0.5)
    assert data.class_names == ["1", "2", "10"] and torch.bincount(data.val.labels).tolist() == [3, 3, 3]
    assert "no split column: 9 of its 18 images (50% of each class) held out" in capsys.readouterr().err
    spec = dict(img_size=(8, 8), channels=3)
    with pytest.raises(ValueError, match=r"expected a header naming an image column .*found \['name', 'label'\]"):
        load_dataset(f"csv:{_csv(tmp_path / 'a.csv', [('x.png', 'cat')], header='name,label')}", **spec)
    with pytest.raises(ValueError, match=r"b.csv, line 3: split 'test'; expected one of \('train', 'val'\)"):
        load_dataset(f"csv:{_csv(tmp_path / 'b.csv', [(files[0], 'a', 'train'), (files[1], 'a', 'test')])}", **spec)
    with pytest.raises(ValueError, match=r"c.csv, line 2: expected an image path and a class, got '' and 'a'"):
        load_dataset(f"csv:{_csv(tmp_path / 'c.csv', [('', 'a', 'train')])}", **spec)
    with pytest.raises(ValueError, match=r"classes \['b'\] of val rows appear in no train row"):
        load_dataset(f"csv:{_csv(tmp_path / 'd.csv', [(files[0], 'a', 'train'), (files[1], 'b', 'val')])}", **spec)
    missing = _csv(tmp_path / "e.csv", [(files[0], "a", "train"), ("gone.png", "a", "train"), (files[1], "a", "val"),
                                        (files[2], "b", "train"), (files[3], "b", "val")])
    for loading in ("memory", "stream"):
        with pytest.raises(ImageError, match=f"{tmp_path / 'gone.png'}: no such image file.*--skip-bad-images"):
            load_dataset(f"csv:{missing}", folder_loading=loading, **spec)
        kept = load_dataset(f"csv:{missing}", folder_loading=loading, skip_bad_images=True, **spec)
        assert (len(kept.train), len(kept.val), len(kept.skipped)) == (2, 2, 1)
    lone = _csv(tmp_path / "f.csv", [(files[0], "a", "train"), (files[1], "a", "val")])
    with pytest.raises(ValueError, match=r"f.csv: one class, 'a', in its train rows; training needs two or more"):
        load_dataset(f"csv:{lone}", **spec)
    assert load_dataset(f"csv:{lone}", with_train=False, **spec).class_names == ["a"]  # `vitkit eval` reads it
    with pytest.raises(FileNotFoundError, match="nope.csv: no such file"):
        load_dataset(f"csv:{tmp_path / 'nope.csv'}", **spec)


def test_folder_classes_skip_hidden_folders_and_refuse_empty_or_lone_ones(tmp_path, capsys):
    """A hidden folder (a notebook's .ipynb_checkpoints) is no class; an empty class folder is named; a
    lone class (a wrapper DIR/images/CLASS/*) cannot be trained on, and the message names the inner
    folders; `vitkit eval` (val only) still reads a folder of one class."""
    root = write_photo_folder(tmp_path / "w", {"images": 3}) / "images"  # images/{astronaut,cat,coffee}/*.png
    (root / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (8, 8)).save(root / ".ipynb_checkpoints" / "scratch.png")
    spec = dict(img_size=(8, 8), channels=3)
    # ... nor are hidden folders and files inside a class: a notebook's copies, macOS's ._NAME files
    (root / "cat" / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (8, 8)).save(root / "cat" / ".ipynb_checkpoints" / "copy-checkpoint.png")
    (root / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble, no image")
    data = load_dataset(f"folder:{root}", **spec)
    assert data.class_names == ["astronaut", "cat", "coffee"] and len(data.train) + len(data.val) == 9
    (root / "dog").mkdir()  # a class folder with nothing in it (a notes file is no image)
    (root / "dog" / "notes.txt").write_text("todo")
    with pytest.raises(ValueError, match=r"class folder\(s\) .*/images/dog hold no image files"):
        load_dataset(f"folder:{root}", **spec)
    (root / "dog" / "notes.txt").unlink()
    (root / "dog").rmdir()
    wrapper = tmp_path / "w"  # w/images/CLASS/*: one class, "images", of every photo
    with pytest.raises(ValueError, match=r"one class folder, 'images'; training needs two or more.*"
                                         r"subfolders \['astronaut', 'cat', 'coffee'\].*--dataset folder:.*/w/images"):
        load_dataset(f"folder:{wrapper}", **spec)
    assert main(["train", "--dataset", f"folder:{wrapper}", "--model", "vit_digits", "--img-size", "8",
                 "--out", str(tmp_path / "run"), "--threads", "1", "--progress", "off"]) == 2
    assert "one class folder, 'images'" in capsys.readouterr().err
    assert not (tmp_path / "run" / "last").exists()
    assert load_dataset(f"folder:{wrapper}", **spec, with_train=False).class_names == ["images"]  # eval's read
    split = tmp_path / "split"  # the train/ val/ layout: the same checks on train/
    for part in ("train", "val"):
        (split / part / "only").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(split / part / "only" / "0.png")
    (split / "train" / ".hidden").mkdir()
    with pytest.raises(ValueError, match="one class folder, 'only'"):
        load_dataset(f"folder:{split}", **spec)
    (split / "train" / "empty").mkdir()
    with pytest.raises(ValueError, match=r"train/empty hold no image files"):
        load_dataset(f"folder:{split}", **spec)


def test_symlinked_folders_are_read_once_and_a_link_loop_ends(tmp_path):
    """A class folder's symlinked subfolder is read (Python 3.11's rglob skipped it), by a folder dataset
    and by `vitkit predict DIR`; a link back up the tree is read once, not forever."""
    from vitkit.predict import image_paths

    root = write_photo_folder(tmp_path / "w", {"photos": 2}) / "photos"  # photos/{astronaut,cat,coffee}/*.png
    extra = write_photo_folder(tmp_path / "x", {"more": 3}) / "more"
    (root / "cat" / "linked").symlink_to(extra / "cat", target_is_directory=True)
    (root / "cat" / "loop").symlink_to(root / "cat", target_is_directory=True)  # photos/cat/loop -> photos/cat
    (root / "coffee" / "dangling").symlink_to(tmp_path / "gone", target_is_directory=True)
    data = load_dataset(f"folder:{root}", img_size=(8, 8), channels=3, val_fraction=0.5)
    labels = torch.cat([data.train.labels, data.val.labels])
    assert torch.bincount(labels).tolist() == [2, 5, 2]  # cat: its own 2 and the linked folder's 3, once each
    found = image_paths([root / "cat"])
    assert found == sorted([root / "cat" / f"{i}.png" for i in range(2)]
                           + [root / "cat" / "linked" / f"{i}.png" for i in range(3)])


def test_a_colour_keyed_png_is_composited_on_white(tmp_path):
    """An L, RGB or 16-bit PNG whose tRNS chunk makes one colour transparent reads as that colour on white,
    as an RGBA or palette image with the same transparent pixels does."""
    ink = load_digits().val.images[0, 0].numpy()  # white ink on a black (0) ground
    on_white = np.where(ink == 0, 255, ink).astype(np.uint8)
    Image.fromarray(ink).save(tmp_path / "l.png", transparency=0)
    Image.fromarray(ink).convert("RGB").save(tmp_path / "rgb.png", transparency=(0, 0, 0))
    Image.fromarray(ink.astype(np.uint16) * 257).save(tmp_path / "deep.png", transparency=0)
    rgba = np.stack([ink] * 3 + [np.where(ink == 0, 0, 255).astype(np.uint8)], axis=-1)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    for name in ("l.png", "rgb.png", "deep.png", "rgba.png"):
        assert Image.open(tmp_path / name).info.get("transparency") is not None or name == "rgba.png"
        assert np.array_equal(np.asarray(load_image(tmp_path / name, 1)), on_white), name
        assert np.array_equal(np.asarray(load_image(tmp_path / name, 3))[..., 1], on_white), name
    Image.fromarray(ink).save(tmp_path / "opaque.png")  # no key: black stays black
    assert np.array_equal(np.asarray(load_image(tmp_path / "opaque.png", 1)), ink)
