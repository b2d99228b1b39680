"""ONNX (run in onnxruntime) and torch.export (saved, loaded) give PyTorch's logits, at any batch size."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import vitkit
from vitkit.cli import main
from vitkit.export import save_onnx, save_torch_export


def tiny(dynamic=False, class_token=True, rel_pos_bias=False):
    cfg = vitkit.ViTConfig(
        img_size=16, patch_size=4, in_channels=3, emb_size=32, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=5,
        class_token=class_token, pool="cls" if class_token else "mean", final_norm="tokens" if class_token else "pooled",
        dynamic_img_size=dynamic, rel_pos_bias=rel_pos_bias,
    )
    model = vitkit.ViT(cfg).eval()
    with torch.no_grad():  # BEiT's tables start at zero: random ones, so a bias left out would show
        for block in model.encoder.blocks if rel_pos_bias else ():
            block.attn.rel_pos_bias_table.normal_()
    return model


def run_onnx(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x"]
    return session.run(["logits"], {"x": x.numpy()})[0]


# (dynamic image size, the input sizes to try): a fixed-size model and one that takes any multiple of 4
# (the ONNX exporter once failed on BEiT's float attention mask: "beit", a fixed-size model with its tables)
CASES = {"fixed": (False, [(1, 16, 16), (5, 16, 16)]), "dynamic": (True, [(1, 16, 16), (3, 12, 20), (2, 32, 8)]),
         "beit": (False, [(1, 16, 16), (5, 16, 16)])}


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    dynamic, sizes = CASES[request.param]
    torch.manual_seed(0)
    model = tiny(dynamic=dynamic, class_token=not dynamic, rel_pos_bias=request.param == "beit")
    tmp = tmp_path_factory.mktemp(request.param)
    return model, sizes, save_onnx(model, tmp / "model.onnx"), save_torch_export(model, tmp / "model.pt2")


def test_onnx_matches_pytorch(exported):
    model, sizes, onnx_path, _ = exported
    proto = onnx.load(str(onnx_path))
    onnx.checker.check_model(proto)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert len(list(onnx_path.parent.glob("*.data"))) == 0  # a small model is one self-contained file
    for b, h, w in sizes:
        x = torch.randn(b, 3, h, w)
        with torch.no_grad():
            want = model(x).numpy()
        got = run_onnx(onnx_path, x)
        assert got.shape == (b, 5)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    if not model.cfg.dynamic_img_size:
        with pytest.raises(Exception):  # noqa: B017 (onnxruntime raises its own error types)
            run_onnx(onnx_path, torch.randn(2, 3, 20, 20))


def test_torch_export_matches_pytorch(exported):
    model, sizes, _, pt2 = exported
    program = torch.export.load(str(pt2)).module()
    for b, h, w in sizes:
        x = torch.randn(b, 3, h, w)
        with torch.no_grad():
            torch.testing.assert_close(program(x), model(x), atol=1e-5, rtol=1e-5)
    if not model.cfg.dynamic_img_size:
        with pytest.raises(Exception):  # noqa: B017 (a guard error from the exported program)
            program(torch.randn(2, 3, 20, 20))


@pytest.mark.parametrize("class_token, mlp_act", [(True, "gelu"), (False, "gelu"), (True, "swiglu")],
                         ids=["cls", "mean-pooled", "swiglu"])
def test_onnx_opset_17_is_written_as_asked(tmp_path, class_token, mlp_act):
    """Opset 17 (older runtimes) for a fixed-size model, class-token or mean-pooled, or with a SwiGLU MLP:
    the file says 17, passes ONNX's checker and runs as the model does. (Mean pooling's ReduceMean once
    failed the exporter's conversion, which then wrote opset 18 and exited as if it had succeeded; SwiGLU's
    halves were a Split with num_outputs, which opset 17 lacks: a file onnxruntime refused.)"""
    model = tiny(class_token=class_token)
    if mlp_act == "swiglu":
        model = vitkit.ViT(model.cfg.replace(mlp_act="swiglu")).eval()
    path = save_onnx(model, tmp_path / "m.onnx", opset=17)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {17}
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        np.testing.assert_allclose(run_onnx(path, x), model(x).numpy(), atol=1e-4, rtol=0)


def test_onnx_external_data_and_opset_check(tmp_path):
    model = tiny()
    path = save_onnx(model, tmp_path / "big.onnx", opset=17, external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        np.testing.assert_allclose(run_onnx(path, x), model(x).numpy(), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="opset: expected 17 or newer"):
        save_onnx(model, tmp_path / "old.onnx", opset=13)
    with pytest.raises(ValueError, match="needs opset >= 18"):
        save_onnx(tiny(dynamic=True), tmp_path / "old.onnx", opset=17)
    assert not (tmp_path / "old.onnx").exists()


def test_cli_export(tmp_path, capsys):
    model = tiny(dynamic=True)
    ckpt = vitkit.save_pretrained(model, tmp_path / "ckpt")
    x = torch.randn(3, 3, 8, 24)
    with torch.no_grad():
        want = model(x)
    assert main(["export", str(ckpt), "--format", "torch-export", "--out", str(tmp_path / "m.pt2")]) == 0
    assert "any size divisible by the patch size" in capsys.readouterr().out
    torch.testing.assert_close(torch.export.load(str(tmp_path / "m.pt2")).module()(x), want, atol=1e-5, rtol=1e-5)
    assert main(["export", str(ckpt), "--out", str(tmp_path / "m.onnx")]) == 0
    np.testing.assert_allclose(run_onnx(tmp_path / "m.onnx", x), want.numpy(), atol=1e-4, rtol=0)
    assert main(["export", str(ckpt), "--opset", "12", "--out", str(tmp_path / "bad.onnx")]) == 2
    assert "opset" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "bad.onnx")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_exports_leave_a_training_model_training(tmp_path):
    """An export runs the model in eval mode (no dropout in the graph) and gives it back as it was: a
    checkpoint exported mid-training keeps training with its dropout on."""
    model = tiny()
    model.head.drop.p = 0.5
    model.train()
    program = torch.export.load(str(save_torch_export(model, tmp_path / "m.pt2"))).module()
    assert model.training and all(m.training for m in model.modules())
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(program(x), model(x))
    model.train()
    save_onnx(model, tmp_path / "m.onnx")
    assert model.training and all(m.training for m in model.modules())
