"""vitkit predict: any image file gives the probabilities the model gives the matching test tensor."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit import load_pretrained
from vitkit.cli import main
from vitkit.data import load_digits, normalize
from vitkit.predict import predict, predict_files
from vitkit.train import resolve_config, train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("predict") / "run"
    threads = torch.get_num_threads()
    train(resolve_config(None, dict(train_subset=512, batch_size=64, epochs=2, warmup_epochs=1, threads=1,
                                    progress="off", precision="fp32", out=str(out))))
    torch.set_num_threads(threads)
    return out


def digit_files(tmp_path, n=4):
    """The first n test digits saved as L, RGB and RGBA PNGs; returns (paths by mode, test images)."""
    data = load_digits()
    files = {"L": [], "RGB": [], "RGBA": []}
    for i in range(n):
        img = Image.fromarray(data.val.images[i, 0].numpy(), mode="L")
        for mode in files:
            path = tmp_path / f"digit{i}-{mode}.png"
            img.convert(mode).save(path)  # RGBA: fully opaque, so compositing on white changes nothing
            files[mode].append(path)
    return files, data


def test_files_in_any_mode_match_the_test_tensor(run, tmp_path):
    files, data = digit_files(tmp_path)
    model = load_pretrained(run / "best").eval()
    with torch.no_grad():
        expected = model(normalize(data.val.images[:4], model.preprocess)).softmax(-1)
    for mode, paths in files.items():
        results = predict(model, paths, topk=10)
        for r, p in zip(results, expected):
            got = torch.zeros(10)
            for pred in r["predictions"]:
                got[pred["index"]] = pred["probability"]
            torch.testing.assert_close(got, p, atol=1e-6, rtol=0, msg=f"{mode} {r['image']}")
            assert r["predictions"][0]["label"] == model.class_names[int(p.argmax())]


def test_odd_sizes_grayscale_16bit_and_transparency(run, tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for name, img in {
        "odd.png": Image.fromarray(rng.integers(0, 256, (13, 21, 3), dtype=np.uint8)),
        "gray.jpg": Image.fromarray(rng.integers(0, 256, (40, 30), dtype=np.uint8)),
        "deep.png": Image.fromarray(rng.integers(0, 65535, (9, 9), dtype=np.uint16)),
        "clear.png": Image.new("RGBA", (16, 16), (0, 0, 0, 0)),
        "palette.gif": Image.new("P", (5, 7), 3),
    }.items():
        img.save(tmp_path / name)
        paths.append(tmp_path / name)
    results = predict_files(run, paths, topk=3)
    assert [r["image"] for r in results] == [str(p) for p in paths]
    for r in results:
        probs = [p["probability"] for p in r["predictions"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert all(p["label"] in [str(d) for d in range(10)] for p in r["predictions"])


def test_predict_cli_json_text_and_errors(run, tmp_path, capsys):
    files, _ = digit_files(tmp_path, n=2)
    assert main(["predict", str(run / "best"), *map(str, files["L"]), "--topk", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out) == 2 and all(len(r["predictions"]) == 2 for r in out)
    assert main(["predict", str(run), str(files["RGB"][0])]) == 0
    assert f"{files['RGB'][0]}: " in capsys.readouterr().out
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    assert main(["predict", str(run), str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err


def test_predict_on_a_directory_skipping_bad_files(run, tmp_path, capsys):
    (tmp_path / "pics" / "deeper").mkdir(parents=True)
    digit_files(tmp_path / "pics", n=3)
    bad = tmp_path / "pics" / "deeper" / "bad.png"
    bad.write_bytes(b"not a png")
    (tmp_path / "pics" / "notes.txt").write_text("not an image, and not one by its name either")
    assert main(["predict", str(run), str(tmp_path / "pics"), "--json"]) == 2  # the bad file stops it, named
    assert str(bad) in capsys.readouterr().err
    assert main(["predict", str(run), str(tmp_path / "pics"), "--json", "--skip-bad-images"]) == 1
    out = json.loads(capsys.readouterr().out)
    every = sorted(p for p in (tmp_path / "pics").rglob("*.png"))
    assert [r["image"] for r in out] == [str(p) for p in every]  # the directory's images, in order
    assert str(bad) in next(r for r in out if r["image"] == str(bad))["error"]
    one_by_one = {r["image"]: r for r in predict_files(run, [p for p in every if p != bad], topk=5)}
    for r in out:
        if r["image"] != str(bad):
            assert r == one_by_one[r["image"]]  # a bad neighbour changes nothing
    assert main(["predict", str(run), str(tmp_path / "pics"), "--skip-bad-images"]) == 1
    text = capsys.readouterr()
    assert f"{bad}: unreadable" in text.out and "1 of" in text.err
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(run), str(tmp_path / "empty")]) == 2
    assert "a directory with no image files" in capsys.readouterr().err


def test_a_reader_that_stops_early_is_not_an_error(run, tmp_path):
    """`vitkit predict DIR | head -1`: the pipe closes before the output is written. The command exits
    quietly with 141 (128 + SIGPIPE, as a shell tool stopped by the pipe), without a traceback."""
    import os
    import subprocess
    import sys

    (tmp_path / "pics").mkdir()
    digit_files(tmp_path / "pics", n=4)
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    try:
        done = subprocess.run([sys.executable, "-m", "vitkit", "predict", str(run), str(tmp_path / "pics")],
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert done.returncode == 141 and done.stderr == "", done.stderr


def digit_folder(root, names=None):
    """The digits' 360 test images as a folder dataset ``root/{train,val}/CLASS/i.png`` (only val/ is
    scored by `vitkit eval`); ``names``: the folder of each digit, "0".."9" unless given."""
    data = load_digits()
    names = names or [str(d) for d in range(10)]
    for split in ("train", "val"):
        for i, (img, label) in enumerate(zip(data.val.images, data.val.labels)):
            folder = root / split / names[int(label)]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img[0].numpy(), mode="L").save(folder / f"{i}.png")
    return root


def test_eval_on_a_folder_matches_its_classes_by_name(run, tmp_path, capsys):
    """A folder's classes are matched to the model's by name: the same names in another order have their
    labels mapped (the scores are those of the same images in the model's order); other names are refused."""
    from vitkit.checkpoint import save_pretrained
    from vitkit.evaluate import evaluate_checkpoint

    folder = digit_folder(tmp_path / "digits")
    reference = evaluate_checkpoint(run, confusion_png=tmp_path / "ref.png")  # the built-in digits
    on_folder = evaluate_checkpoint(run, f"folder:{folder}", confusion_png=tmp_path / "folder.png")
    assert on_folder["images"] == reference["images"] == 360
    assert on_folder["top1"] == pytest.approx(reference["top1"]) and on_folder["loss"] == pytest.approx(reference["loss"])
    # the same model with its classes numbered in another order: each name keeps its own weights
    model = load_pretrained(run / "best")
    order = [3, 7, 0, 9, 1, 8, 2, 6, 4, 5]
    with torch.no_grad():
        model.head.fc.weight.copy_(model.head.fc.weight[order].clone())
        model.head.fc.bias.copy_(model.head.fc.bias[order].clone())
    names = [model.class_names[i] for i in order]
    save_pretrained(model, tmp_path / "shuffled", class_names=names,
                    extra={"train": json.loads((run / "best" / "config.json").read_text()).get("train")})
    capsys.readouterr()
    shuffled = evaluate_checkpoint(tmp_path / "shuffled", f"folder:{folder}", confusion_png=tmp_path / "s.png")
    assert "are the model's ['3', '7', '0'" in capsys.readouterr().err  # said, not silent
    assert shuffled["top1"] == pytest.approx(reference["top1"]) and shuffled["loss"] == pytest.approx(reference["loss"])
    assert list(shuffled["per_class"]) == names
    assert shuffled["per_class"] == pytest.approx(reference["per_class"])  # a dict: each class's own accuracy
    # other names: refused, both lists named
    other = digit_folder(tmp_path / "letters", names=list("abcdefghij"))
    assert main(["eval", str(run), "--dataset", f"folder:{other}"]) == 2
    err = capsys.readouterr().err
    assert "['0', '1', '2'" in err and "['a', 'b', 'c'" in err and "trained on the classes" in err


def test_a_16bit_image_reads_as_the_8bit_image_of_the_same_picture(tmp_path):
    """16-bit samples are scaled by the mode's full range: v * 257 reads back as v (the 8-bit file of the
    same picture), a uniform white 16-bit image is white, a dim one stays dim; mode I (32-bit ints) the same,
    its values outside 0..65535 clipped."""
    from vitkit.images import load_image

    rng = np.random.default_rng(0)
    eight = rng.integers(0, 256, (12, 10), dtype=np.uint8)
    Image.fromarray(eight).save(tmp_path / "eight.png")
    Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "deep.tif")
    Image.fromarray((eight.astype(np.uint16) * 257).astype(">u2")).save(tmp_path / "deep-big-endian.tif")
    Image.fromarray(eight.astype(np.int32) * 257).save(tmp_path / "wide.tif")  # mode I
    want = np.asarray(load_image(tmp_path / "eight.png", 1))
    assert np.array_equal(want, eight)
    for name in ("deep.png", "deep.tif", "deep-big-endian.tif", "wide.tif"):
        for channels in (1, 3):
            got = np.asarray(load_image(tmp_path / name, channels))
            assert np.array_equal(got if channels == 1 else got[..., 0], eight), name
    for value, expected in ((65535, 255), (1000, 4), (0, 0)):  # uniform: no stretch to black or white
        Image.fromarray(np.full((5, 5), value, dtype=np.uint16)).save(tmp_path / f"u{value}.png")
        assert np.unique(np.asarray(load_image(tmp_path / f"u{value}.png", 1))).tolist() == [expected]
    Image.fromarray(np.array([[-5, 70000, 32768]], dtype=np.int32)).save(tmp_path / "out-of-range.tif")
    assert np.asarray(load_image(tmp_path / "out-of-range.tif", 1)).tolist() == [[0, 255, 128]]


def test_bad_device_batch_size_and_topk_are_named_and_eval_takes_the_weights_file(run, tmp_path, capsys):
    """predict and eval resolve --device as train does (an error naming it, no traceback), eval takes a
    checkpoint's model.safetensors as predict does, and a batch size or top-k below 1 is refused."""
    files, _ = digit_files(tmp_path, n=1)
    image = str(files["L"][0])
    cases = [(["predict", str(run), image, "--device", "gpu"], "--device gpu: expected auto, cpu, cuda or cuda:N"),
             (["eval", str(run), "--device", "gpu"], "--device gpu: expected auto, cpu, cuda or cuda:N"),
             (["eval", str(run), "--batch-size", "0"], "--batch-size: expected a positive number"),
             (["eval", str(run), "--batch-size", "-1"], "--batch-size: expected a positive number"),
             (["predict", str(run), image, "--topk", "0"], "--topk: expected a positive number"),
             (["predict", str(run), image, "--topk", "-2"], "--topk: expected a positive number")]
    if not torch.cuda.is_available():
        cases += [([command, str(run), *extra, "--device", "cuda"], "--device cuda: CUDA is not available")
                  for command, extra in (("predict", [image]), ("eval", []))]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"vitkit {argv[0]}: error: {message}" in err and "Traceback" not in err, (argv, err)
    assert main(["eval", str(run), "--json"]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert main(["eval", str(run / "best" / "model.safetensors"), "--json", "--device", "auto"]) == 0
    weights_file = json.loads(capsys.readouterr().out)
    assert weights_file["checkpoint"] == str(run / "best") and weights_file["confusion_png"] == str(run / "confusion-best.png")
    assert (weights_file["top1"], weights_file["loss"], weights_file["images"]) == (whole["top1"], whole["loss"], 360)
    assert main(["predict", str(run), image, "--topk", "1", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["predictions"]) == 1


def test_a_features_only_model_is_refused_naming_the_checkpoint(tmp_path, capsys):
    """A converted DINOv2 or CLIP tower has no classifier: predict says so (it crashed, or printed nothing)."""
    import vitkit

    vitkit.save_pretrained(vitkit.create_model("vit_digits_gap", num_classes=0), tmp_path / "features")
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="features.*no classifier.*vitkit embed"):
        predict_files(tmp_path / "features", [tmp_path / "a.png"])
    assert main(["predict", str(tmp_path / "features"), str(tmp_path / "a.png"), "--json"]) == 2
    assert "no classifier" in capsys.readouterr().err
