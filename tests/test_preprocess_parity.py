"""vitkit's image pipeline against the peers' own, on real photos: the same pixels in, the same tensor out.

timm's eval transform (``timm.data.create_transform``, torchvision's Resize and CenterCrop inside) is the
oracle for ``images.preprocess_image``: every crop mode, crop percentage, interpolation and size, on
photos of both orientations, must give the very same tensor. Evaluation on a folder reads what predict reads.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.data import load_dataset, normalize
from vitkit.images import crop_mode, load_image, preprocess_image

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
skimage_data = pytest.importorskip("skimage.data")


def photos() -> dict[str, Image.Image]:
    """Real photos in both orientations and sizes that round differently: the cat 451x300, its portrait
    cut, the astronaut square, the coffee cup 600x400, and a small one that must grow."""
    cat = Image.fromarray(skimage_data.chelsea())
    return {"landscape": cat, "portrait": cat.transpose(Image.Transpose.ROTATE_90).crop((0, 0, 300, 447)),
            "square": Image.fromarray(skimage_data.astronaut()), "coffee": Image.fromarray(skimage_data.coffee()),
            "small": cat.resize((97, 61))}


CASES = [  # (img_size, crop_pct, crop_mode, interpolation): timm's defaults and its ViT weights' settings
    ((224, 224), 0.875, "center", "bicubic"),
    ((224, 224), 0.9, "center", "bicubic"),
    ((224, 224), 0.95, "center", "bilinear"),  # 235 - 224 = 11: the crop's half-pixel rounds to even
    ((384, 384), 1.0, "center", "bicubic"),  # not a squash: the shorter side to 384, the centre cut
    ((336, 336), 1.0, "squash", "bicubic"),  # CLIP/EVA at 336: the whole photo, squashed
    ((384, 384), 0.95, "squash", "bicubic"),  # squashed to 404, then cut
    ((224, 320), 0.9, "center", "bicubic"),  # a non-square size (timm's ResizeKeepRatio)
    ((224, 224), 1.1, "center", "bilinear"),  # above 1: padded with zeros, as torchvision pads
]


@pytest.mark.parametrize("img_size, crop_pct, mode, interpolation", CASES)
def test_preprocess_image_gives_timms_eval_tensor(img_size, crop_pct, mode, interpolation):
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    theirs = timm.data.create_transform(input_size=(3, *img_size), crop_pct=crop_pct, crop_mode=mode,
                                        interpolation=interpolation, mean=mean, std=std)
    preprocess = dict(img_size=list(img_size), crop_pct=crop_pct, crop_mode=mode, interpolation=interpolation,
                      mean=list(mean), std=list(std))
    for name, img in photos().items():
        ours = preprocess_image(img, preprocess)
        expected = theirs(img)
        assert ours.shape == expected.shape, name
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0, msg=f"{name}: {preprocess}")


def test_a_preprocess_without_crop_mode_reads_as_vitkit_wrote_it():
    """Checkpoints written before crop_mode squashed at crop_pct 1.0 (every training run on image files) and
    cropped the centre below it: they keep doing so."""
    assert crop_mode({"crop_pct": 1.0}) == "squash" and crop_mode({"crop_pct": 0.9}) == "center"
    assert crop_mode({"crop_pct": 1.0, "crop_mode": "center"}) == "center"
    img = photos()["landscape"]
    old = preprocess_image(img, dict(img_size=[64, 64], crop_pct=1.0, mean=[0.5] * 3, std=[0.5] * 3))
    squashed = np.asarray(img.resize((64, 64), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    torch.testing.assert_close(old, (torch.from_numpy(squashed).permute(2, 0, 1) - 0.5) / 0.5)


def test_evaluation_on_a_folder_reads_images_as_predict_does(tmp_path):
    """``vitkit eval`` of a converted model scores the inputs ``vitkit predict`` (and the peer) would see:
    the model's own crop, not training's squash; a training run's data squash, and say so."""
    for i, (name, img) in enumerate(photos().items()):
        for split in ("train", "val"):
            (tmp_path / split / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
            img.save(tmp_path / split / f"c{i % 2}" / f"{name}.png")
    preprocess = dict(img_size=[48, 48], crop_pct=0.9, crop_mode="center", interpolation="bicubic",
                      mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])
    data = load_dataset(f"folder:{tmp_path}", img_size=(48, 48), preprocess=preprocess, with_train=False)
    files = sorted((tmp_path / "val").glob("*/*.png"))
    expected = torch.stack([preprocess_image(load_image(f), preprocess) for f in files])
    order = sorted(range(len(files)), key=lambda i: (files[i].parent.name, files[i].name))
    got = normalize(data.val.images, data.preprocess)
    # uint8 storage rounds each pixel to 1/255 before normalising
    torch.testing.assert_close(got, expected[order], atol=0.5 / 255 / 0.2 + 1e-5, rtol=0)
    trained = load_dataset(f"folder:{tmp_path}", img_size=(48, 48), preprocess=preprocess)
    assert (trained.preprocess["crop_mode"], trained.preprocess["crop_pct"]) == ("squash", 1.0)


# Hugging Face processors (PIL backend: the one that resizes as PIL does) of each geometry the converter reads:
# ViT's squash, DINOv2's shorter side and centre (Bit), DeiT's squash and centre, CLIP's shorter side; and
# one whose rescale and normalisation differ (folded into the mean and std).
HF_PROCESSORS = {
    "ViTImageProcessorPil": dict(size={"height": 224, "width": 224}, resample=2, image_mean=[0.5] * 3,
                                 image_std=[0.5] * 3),
    "BitImageProcessorPil": dict(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                 do_center_crop=True, resample=3, image_mean=[0.485, 0.456, 0.406],
                                 image_std=[0.229, 0.224, 0.225]),
    "DeiTImageProcessorPil": dict(size={"height": 256, "width": 256}, crop_size={"height": 224, "width": 224},
                                  do_center_crop=True, resample=3, image_mean=[0.485, 0.456, 0.406],
                                  image_std=[0.229, 0.224, 0.225]),
    "CLIPImageProcessorPil": dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                  do_center_crop=True, resample=3, image_mean=[0.48145466, 0.4578275, 0.40821073],
                                  image_std=[0.26862954, 0.26130258, 0.27577711]),
    "rescaled": dict(size={"shortest_edge": 232}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
                     resample=2, do_normalize=False, rescale_factor=1 / 127.5, image_mean=[0.5] * 3,
                     image_std=[0.5] * 3),
}


@pytest.mark.parametrize("name", sorted(HF_PROCESSORS))
def test_a_hugging_face_processor_config_is_read_as_it_resizes(name):
    transformers = pytest.importorskip("transformers")
    from vitkit.convert.hf import read_image_processor

    cfg = HF_PROCESSORS[name]
    theirs = getattr(transformers, "BitImageProcessorPil" if name == "rescaled" else name)(**cfg)
    preprocess = dict(read_image_processor(dict(cfg), name), img_size=[224, 224])
    # not the small photo: HF cuts the centre at floor((W - w) / 2) where torchvision and timm round half to
    # even, one pixel apart when the remainder is odd (407 - 224 there); vitkit follows timm
    for photo, img in photos().items():
        if photo != "small":
            expected = torch.as_tensor(np.asarray(theirs(img, return_tensors="pt")["pixel_values"][0]))
            torch.testing.assert_close(preprocess_image(img, preprocess), expected, atol=1e-5, rtol=0, msg=photo)


def test_hugging_face_export_writes_the_processor_that_reads_as_the_model_does(tmp_path):
    """A vitkit model's crop survives the trip to a Hugging Face directory and back, in each mode."""
    import vitkit
    from vitkit.convert import export, load

    model = vitkit.create_model("vit_tiny_patch16_224", depth=1, img_size=32)
    for mode, crop_pct in (("center", 0.9), ("squash", 0.875), ("squash", 1.0), ("center", 1.0)):
        model.preprocess = dict(model.preprocess, crop_pct=crop_pct, crop_mode=mode, interpolation="bilinear")
        export(model, tmp_path / f"{mode}{crop_pct}", "hf")
        back = load(tmp_path / f"{mode}{crop_pct}", "hf").preprocess
        # HF keeps sizes, not a share: 32 / 0.9 resizes to 35, read back as 32 / 35
        assert (back["crop_mode"], math.floor(32 / back["crop_pct"]), back["interpolation"]) == (
            mode, math.floor(32 / crop_pct), "bilinear")
        img = photos()["landscape"]
        torch.testing.assert_close(preprocess_image(img, back), preprocess_image(img, model.preprocess))


# torchvision's ViT weights: (architecture's weights enum, width, patch), each with every weights it has
TORCHVISION_VITS = {"ViT_B_16": (768, 16), "ViT_B_32": (768, 32), "ViT_L_16": (1024, 16), "ViT_L_32": (1024, 32),
                    "ViT_H_14": (1280, 14)}
TORCHVISION_WEIGHTS = [(arch, w.name) for arch in TORCHVISION_VITS
                       for w in getattr(torchvision.models, f"{arch}_Weights") if "LINEAR" not in w.name]


@pytest.mark.parametrize("arch, weights", TORCHVISION_WEIGHTS)
def test_a_torchvision_checkpoint_reads_images_as_its_weights_transforms(tmp_path, arch, weights):
    """Each of torchvision's ViT weights but SWAG_LINEAR's (224 like V1, not told apart by the tensors): V1's
    resize before the centre 224 (256, bilinear; vit_l_16's 242), the SWAG fine-tunes' size itself, bicubic,
    told by width, patch and position table; the transforms and sizes come from torchvision, no download."""
    from torchvision.models.vision_transformer import VisionTransformer

    from vitkit.convert import load

    transform = getattr(getattr(torchvision.models, f"{arch}_Weights"), weights).transforms()
    width, patch = TORCHVISION_VITS[arch]
    theirs = VisionTransformer(image_size=transform.crop_size[0], patch_size=patch, num_layers=1, num_heads=2,
                               hidden_dim=width, mlp_dim=64)
    torch.save(theirs.state_dict(), tmp_path / "vit.pth")
    ours = load(tmp_path / "vit.pth", "torchvision", num_heads=2)
    for photo, img in photos().items():
        torch.testing.assert_close(preprocess_image(img, ours.preprocess), transform(img), atol=1e-5, rtol=0,
                                   msg=photo)


def test_convert_takes_the_resizing_the_file_cannot_say(tmp_path):
    """torchvision's SWAG_LINEAR weights are 224 like its ImageNet recipe's, but read images resized to 224,
    bicubic: `vitkit convert --interpolation bicubic --crop-pct 1.0` says so; a value it cannot follow is refused."""
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models.vision_transformer import VisionTransformer

    from vitkit import load_pretrained
    from vitkit.cli import main as cli

    theirs = VisionTransformer(image_size=224, patch_size=16, num_layers=1, num_heads=2, hidden_dim=64, mlp_dim=64)
    torch.save(theirs.state_dict(), tmp_path / "vit.pth")
    src = ["convert", str(tmp_path / "vit.pth"), "--from", "torchvision", "--num-heads", "2"]
    assert cli([*src, str(tmp_path / "swag"), "--interpolation", "bicubic", "--crop-pct", "1.0"]) == 0
    preprocess = load_pretrained(tmp_path / "swag").preprocess
    transform = torchvision.models.ViT_B_16_Weights.IMAGENET1K_SWAG_LINEAR_V1.transforms()
    for photo, img in photos().items():
        torch.testing.assert_close(preprocess_image(img, preprocess), transform(img), atol=1e-5, rtol=0, msg=photo)
    assert cli([*src, str(tmp_path / "bad"), "--crop-pct", "0"]) == 2
    assert not (tmp_path / "bad").exists()


def test_a_hugging_face_directory_without_its_processor_says_the_normalisation_is_a_guess(tmp_path):
    transformers = pytest.importorskip("transformers")
    import warnings

    from vitkit.convert import load

    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=16)
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="ImageNet's mean/std are assumed.*without preprocessor_config.json"):
        assert load(tmp_path, "hf").preprocess["mean"] == [0.485, 0.456, 0.406]
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # it says: 0.5, as HF's ViT processor does
        assert load(tmp_path, "hf").preprocess["mean"] == [0.5, 0.5, 0.5]


def test_a_sliver_of_an_image_is_not_blown_up_to_gigapixels(monkeypatch):
    """A 2 x 60000 image's shorter side resized to 256 would be 7.7 gigapixels (23 GB) before its crop, as in
    timm and torchvision: vitkit resizes only the crop there, within two levels of 255 of the whole resize
    on photos with bicubic (more on noise, or with nearest or lanczos)."""
    import time

    import vitkit.images

    sliver = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60000, 2, 3), dtype=np.uint8))
    preprocess = dict(img_size=[224, 224], crop_pct=0.875, crop_mode="center", mean=[0.5] * 3, std=[0.5] * 3)
    start = time.perf_counter()
    assert preprocess_image(sliver, preprocess).shape == (3, 224, 224)
    assert time.perf_counter() - start < 5.0
    monkeypatch.setattr(vitkit.images, "RESIZE_MAX_PIXELS", 0)  # the crop alone for every photo: near timm's
    theirs = timm.data.create_transform(input_size=(3, 224, 224), crop_pct=0.875, interpolation="bicubic",
                                        mean=(0.5,) * 3, std=(0.5,) * 3)
    for name, img in photos().items():
        torch.testing.assert_close(preprocess_image(img, preprocess), theirs(img), atol=2.01 / 255 / 0.5, rtol=0,
                                   msg=name)


def test_a_bare_number_size_is_read_as_each_processor_reads_it():
    """OpenAI's CLIP repos write "size": 224: the shorter side for CLIP's (and Bit's, SigLIP's) processor,
    a square for ViT's."""
    from vitkit.convert.hf import read_image_processor

    stats = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=3)
    clip = dict(stats, image_processor_type="CLIPImageProcessor", size=224, crop_size=224, do_center_crop=True)
    preprocess = dict(read_image_processor(clip, "clip"), img_size=[224, 224])
    theirs = transformers_pil("CLIPImageProcessorPil", clip)
    for photo, img in photos().items():
        if photo != "small":  # HF's floor against timm's rounding of the crop (above)
            torch.testing.assert_close(preprocess_image(img, preprocess), theirs(img), atol=1e-5, rtol=0, msg=photo)
    vit = read_image_processor(dict(stats, image_processor_type="ViTImageProcessor", size=224), "vit")
    assert (vit["crop_mode"], vit["crop_pct"]) == ("squash", 1.0)


def transformers_pil(name: str, config: dict):
    """HF's PIL-backend processor of ``config``, as a function of a PIL image -> (C, H, W) tensor."""
    transformers = pytest.importorskip("transformers")
    processor = getattr(transformers, name)(**{k: v for k, v in config.items() if k != "image_processor_type"})
    return lambda img: torch.as_tensor(np.asarray(processor(img, return_tensors="pt")["pixel_values"][0]))


def test_a_non_square_squash_survives_the_trip_to_hugging_face(tmp_path):
    """Each side resized to its own size before the cut: one crop_pct that gives both (35 and 53 for 32 x 48
    at 0.9), not the height's alone."""
    import vitkit
    from vitkit.convert import export, load

    model = vitkit.create_model("vit_tiny_patch16_224", depth=1, img_size=(32, 48))
    model.preprocess = dict(model.preprocess, crop_pct=0.9, crop_mode="squash")
    export(model, tmp_path / "hf", "hf")
    back = load(tmp_path / "hf", "hf").preprocess
    img = photos()["coffee"]
    torch.testing.assert_close(preprocess_image(img, back), preprocess_image(img, model.preprocess))


def test_convert_flags_change_what_they_name_and_refuse_what_cannot_be_read(tmp_path):
    """--crop-pct on a checkpoint written before crop_mode keeps its mode (it was implied by the old share);
    timm's "border" mode, which vitkit does not implement, and a percentage typed for a share are refused,
    naming the file or the flag."""
    import json

    import vitkit
    from vitkit.convert import load

    model = vitkit.create_model("vit_tiny_patch16_224", depth=1, img_size=32)
    model.preprocess = dict(img_size=[32, 32], mean=[0.5] * 3, std=[0.5] * 3, interpolation="bicubic", crop_pct=1.0)
    vitkit.save_pretrained(model, tmp_path / "old")  # as written before crop_mode: 1.0 squashed
    assert load(tmp_path / "old", "vitkit", preprocess={"crop_pct": 0.9}).preprocess["crop_mode"] == "squash"
    with pytest.raises(ValueError, match=r"--crop-pct: preprocess.crop_pct: expected a share between 0.01 and 4"):
        load(tmp_path / "old", "vitkit", preprocess={"crop_pct": 87.5})
    vitkit.convert.export(model, tmp_path / "hub", "timm")
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    config["pretrained_cfg"]["crop_mode"] = "border"
    (tmp_path / "hub" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"hub: preprocess.crop_mode: expected one of \['center', 'squash'\], got 'border'"):
        load(tmp_path / "hub", "timm")
    assert load(tmp_path / "hub", "timm", preprocess={"crop_mode": "center"}).preprocess["crop_mode"] == "center"


def test_a_config_without_mean_or_std_reads_with_the_defaults_preprocess_image_uses(tmp_path):
    import json

    import vitkit
    from vitkit.predict import predict_files

    vitkit.save_pretrained(vitkit.create_model("vit_tiny_patch16_224", depth=1, img_size=32, num_classes=3),
                           tmp_path / "ck")
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    config["preprocess"] = {"img_size": [32, 32]}  # hand-written
    (tmp_path / "ck" / "config.json").write_text(json.dumps(config))
    model = vitkit.load_pretrained(tmp_path / "ck")
    assert model.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)
    photos()["square"].save(tmp_path / "a.png")
    assert len(predict_files(tmp_path / "ck", [tmp_path / "a.png"])) == 1


def test_a_grey_model_beside_a_colour_processor_reads_its_resizing_and_averaged_statistics(tmp_path):
    transformers = pytest.importorskip("transformers")
    import warnings

    from vitkit.convert import load

    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=16, num_channels=1)
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}, resample=2, image_mean=[0.4, 0.5, 0.6],
                                   image_std=[0.2, 0.3, 0.4]).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the file says how: no guess to warn about
        pre = load(tmp_path, "hf").preprocess
    assert (pre["mean"], pre["std"], pre["interpolation"]) == ([pytest.approx(0.5)], [pytest.approx(0.3)], "bilinear")
