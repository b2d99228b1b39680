"""Every script in benchmarks/ still runs, on the smallest inputs it takes: a benchmark that rots
silently cannot back a figure in the README. No timings are checked (CI never fails on speed);
the tables must hold a row for every contestant, with numbers in it."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

from vitkit import fast

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
NUMBER = r"[0-9][0-9,]*\.?[0-9]*"


def run_script(name: str, argv: list[str], capsys) -> str:
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look modules up by name
    threads = torch.get_num_threads()  # some scripts set their own: not for the tests after them
    try:
        spec.loader.exec_module(module)
        module.main(argv)
    finally:
        sys.modules.pop(spec.name, None)
        fast.set_num_threads(threads)  # no call (and no side effect) when the script left it as it was
    return capsys.readouterr().out


def rows(out: str, first_words: list[str]) -> None:
    for word in first_words:
        assert re.search(rf"^{re.escape(word)}\s+.*{NUMBER}", out, re.M), f"no row for {word!r} in:\n{out}"


def test_loader(capsys):
    out = run_script("loader", ["configs/digits.yaml", "--batches", "3"], capsys)
    rows(out, ["configs/digits.yaml"])


def test_folder_stream(capsys):
    out = run_script("folder_stream", ["--images", "9", "--batch-size", "3", "--steps", "1"], capsys)
    rows(out, ["memory:", "stream:", "train:", "stream + train,"])
    assert re.search(rf"streaming costs the run -?{NUMBER}%", out)


def test_freeze(capsys):
    out = run_script("freeze", ["--model", "vit_digits_gap", "--batch-size", "4", "--frozen", "0", "2", "4",
                                "--runs", "2"], capsys)
    rows(out, ["0", "2", "4"])


def test_distill(tmp_path, capsys):  # its own one-epoch teacher
    out = run_script("distill", ["--teacher-epochs", "1", "--epochs", "1", "--images", "64",
                                 "--out", str(tmp_path)], capsys)
    rows(out, ["alone", "hard", "soft"])


def test_adamw(capsys):
    out = run_script("adamw", ["vit_digits_gap", "--runs", "2", "--batch-size", "4"], capsys)
    rows(out, ["vit_digits_gap"])


def test_threads(capsys):  # two fresh processes, one per setting
    out = run_script("threads", ["--rounds", "1", "--steps", "1"], capsys)
    rows(out, ["flash attention fwd+bwd", "flash attention forward", "timm vit_fmnist fp32 train step",
               "vitkit vit_fmnist fp32 train step"])


def test_ema(capsys):
    out = run_script("ema", ["vit_digits_gap", "--runs", "2"], capsys)
    rows(out, ["vit_digits_gap"])


def test_channels_last(capsys):
    out = run_script("channels_last", ["--model", "vit_digits", "--batch-size", "2", "--runs", "1", "--device", "cpu"],
                     capsys)
    rows(out, ["vitkit NHWC", "vitkit NCHW", "vitkit plain", "timm NHWC", "timm NCHW", "timm plain"])


def test_conv_stem(capsys):
    out = run_script("conv_stem", ["--batch-size", "2", "--runs", "1", "--device", "cpu"], capsys)
    assert out.count("vitkit NHWC") == 2, out  # one table per precision
    rows(out, ["vitkit NHWC", "vitkit NCHW", "timm"])


def test_rotation_against_timms(capsys):
    out = run_script("rotation", ["--model", "eva02_tiny_patch14_224", "--batch-size", "1", "--runs", "1",
                                  "--no-compile"], capsys)
    rows(out, ["eager"])
    assert float(re.search(r"largest \|vitkit - timm\| (\S+)", out).group(1)) < 0.02  # bf16: an ulp or two


def test_gpu_checks_on_cpu(capsys):
    out = run_script("gpu_checks", ["--model", "vit_digits", "--batch-size", "4"], capsys)
    assert re.search(r"parity vit_digits fp32: max \|vitkit - timm\| = \S+, .* same top-1 for 100%", out), out
    assert "parity vit_digits fp16-autocast: max |vitkit - timm|" in out, out
    assert "forward and backward ran with only MATH allowed" in out, out
    assert "-- vitkit:" in out and "-- timm:" in out


@pytest.mark.parametrize("name, first_words", [("onednn_linear", ["infer", "train"])])
def test_ab_scripts(name, first_words, capsys):
    out = run_script(name, ["--model", "vit_digits", "--batch-size", "4", "--runs", "1"], capsys)
    rows(out, first_words)


def test_lean_ops_with_profiles_of_both_libraries(capsys):  # one run of the script covers both
    out = run_script("lean_ops", ["--model", "vit_digits", "--batch-size", "4", "--runs", "1", "--profile"], capsys)
    rows(out, ["lean", "plain", "timm"])
    for name in ("lean", "timm"):
        assert re.search(rf"^one '{name}' step: the Linear layers' matmuls .* take \d+% of its CPU time", out, re.M), out


def test_onednn_linear_sizes(capsys):
    out = run_script("onednn_linear", ["--sizes", "--runs", "1"], capsys)
    rows(out, ["float32", "bfloat16"])


def test_throughput_suite_runs_only_the_chosen_configuration(capsys):
    out = run_script("throughput", ["--suite", "--only", "digits train fp32 eager", "--runs", "1", "--warmup", "0"],
                     capsys)
    rows(out, ["vitkit", "timm", "vitkit-math"])
    assert "== digits train fp32 eager" in out and "== B/16" not in out, out
    assert re.search(rf"^digits train, best vs best\s+\[wall\] vitkit {NUMBER} img/s", out, re.M), out
    assert "nan" not in out.lower(), out  # no summary line for the groups the filter left out


def test_finetune_on_a_run_of_its_own(tmp_path, capsys):  # its own source run: no Fashion-MNIST needed
    from vitkit.train import resolve_config, train

    spec = importlib.util.spec_from_file_location("benchmarks_finetune_data", BENCHMARKS / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    source = dict(dataset="digits", model="vit_fmnist", train_subset=64, batch_size=32, epochs=1, threads=1,
                  progress="off", out=str(tmp_path / "source"))
    train(resolve_config(None, source), data=module.digits_at(28))
    out = run_script("finetune", ["--pretrained", str(tmp_path / "source"), "--subsets", "20", "--steps", "2",
                                  "--threads", "1", "--out", str(tmp_path / "runs")], capsys)
    rows(out, ["20"])


def test_compiled_profile(capsys):  # both libraries compiled, on the CPU: ops rather than kernels
    out = run_script("compiled_profile", ["--model", "vit_digits_gap", "--batch-size", "4", "--contestants",
                                          "vitkit,timm", "--runs", "1", "--top", "3"], capsys)
    rows(out, ["vitkit", "timm"])
    assert out.count("-- vitkit: 2 steps") == 1 and out.count("-- timm: 2 steps") == 1
