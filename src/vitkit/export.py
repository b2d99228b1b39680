"""Ship a model: ONNX and torch.export programs with a dynamic batch (and image size).

Both formats trace the model with ``torch.export`` (non-strict). ONNX goes through
torch's dynamo-based exporter (``torch.onnx.export(..., dynamo=True)``, via onnxscript),
which lowers the fused ``F.scaled_dot_product_attention`` to plain ONNX ops (MatMul,
Softmax), so the fused path exports as it is; no switch to the math path is needed.

Models built with ``dynamic_img_size=True`` export with a symbolic image size (any
multiple of the patch size); ``PatchEmbedding`` then resamples its position table inside
the graph (a bicubic, antialiased ONNX Resize, opset >= 18).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import atomic_file

FORMATS = ("onnx", "torch-export")
DEFAULT_OPSET = 18  # the first opset whose Resize has antialias (dynamic image size)
MAX_BATCH = 4096
MIN_GRID, MAX_GRID = 2, 256  # patches per side a dynamic-size export accepts
SINGLE_FILE_LIMIT = 1 << 30  # above 1 GiB of weights, ONNX weights go to FILE.data (protobuf caps at 2 GiB)


def example_input(model: nn.Module, batch_size: int = 2) -> Tensor:
    """A random input at the model's own size; batch 2 so that tracing does not specialise on 1."""
    cfg = model.cfg
    p = next(model.parameters())
    return torch.randn(batch_size, cfg.in_channels, *cfg.img_size, dtype=p.dtype, device=p.device)


def dynamic_shapes(model: nn.Module) -> dict:
    """The ``dynamic_shapes`` of the input ``x``: a free batch, and a free size with dynamic_img_size."""
    dims = {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}
    if model.cfg.dynamic_img_size:
        # height and width are multiples of the patch size: p * (patches per side)
        p = model.cfg.patch_size
        # from 2 patches a side: torch.export specialises a size of one (a stride check guards it out)
        dims[2] = p * torch.export.Dim("grid_h", min=MIN_GRID, max=MAX_GRID)
        dims[3] = p * torch.export.Dim("grid_w", min=MIN_GRID, max=MAX_GRID)
    return {"x": dims}


@contextmanager
def _evaluating(model: nn.Module):
    """The model in eval mode for an export, then back in the mode it was in (a model being trained stays so)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def export_program(model: nn.Module) -> torch.export.ExportedProgram:
    """``torch.export`` the model in eval mode, input ``x`` of shape (B, C, H, W)."""
    with _evaluating(model):
        return torch.export.export(model, (example_input(model),), dynamic_shapes=dynamic_shapes(model), strict=False)


def save_torch_export(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write a ``.pt2`` archive that ``torch.export.load(path).module()`` runs; atomic."""
    program = export_program(model)
    with atomic_file(path) as f:
        torch.export.save(program, f)
    return Path(path)


def save_onnx(
    model: nn.Module, path: str | os.PathLike, opset: int = DEFAULT_OPSET, external_data: bool | None = None
) -> Path:
    """Write an ONNX model (input ``x``, output ``logits``); atomic.

    ``external_data``: None decides by size: one self-contained file up to 1 GiB of
    weights, else the weights go to ``FILE.data`` beside it (protobuf's 2 GiB cap).
    """
    if opset < 17:
        raise ValueError(f"opset: expected 17 or newer (LayerNormalization), got {opset}")
    if opset < 18 and model.cfg.dynamic_img_size:
        raise ValueError(f"opset: a dynamic_img_size model needs opset >= 18 (antialiased Resize), got {opset}")
    with _evaluating(model):
        program = torch.onnx.export(
            model, (example_input(model),), dynamo=True, dynamic_shapes=dynamic_shapes(model), opset_version=opset,
            input_names=["x"], output_names=["logits"], verbose=False,
        )
    # the exporter writes its own opset when converting down fails, after printing why: refuse it
    written = max(o.version for o in program.model_proto.opset_import if o.domain in ("", "ai.onnx"))
    if written != opset:
        raise ValueError(f"opset: asked for {opset}, but torch.onnx could only write {written} for this model "
                           f"(its reasons are printed above); export with --opset {written}")
    path = Path(path)
    if external_data is None:
        external_data = sum(p.numel() * p.element_size() for p in model.parameters()) > SINGLE_FILE_LIMIT
    if not external_data:
        import onnx

        try:  # a node the opset does not define is caught here, not by the runtime that loads the file
            onnx.checker.check_model(program.model_proto)
        except onnx.checker.ValidationError as e:
            raise ValueError(f"opset {opset}: torch.onnx wrote a graph ONNX's checker refuses ({e}); "
                             f"export with --opset {DEFAULT_OPSET}") from e
        with atomic_file(path) as f:
            f.write(program.model_proto.SerializeToString())
        return path
    # Two files: write both in a temporary directory beside the target, then move the
    # weights into place before the graph that names them.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        program.save(tmp / path.name, external_data=True)
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == path.name):  # the .onnx last
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def export_model(model: nn.Module, path: str | os.PathLike, fmt: str, opset: int = DEFAULT_OPSET) -> Path:
    """``fmt`` is ``"onnx"`` or ``"torch-export"``."""
    if fmt == "onnx":
        return save_onnx(model, path, opset=opset)
    if fmt == "torch-export":
        return save_torch_export(model, path)
    raise ValueError(f"--format: expected one of {FORMATS}, got {fmt!r}")


__all__ = ["FORMATS", "export_model", "save_onnx", "save_torch_export", "export_program", "dynamic_shapes"]
