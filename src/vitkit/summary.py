"""The seed's torchsummary table, with true totals and GMACs.

torchsummary counts only ``module.weight`` and ``module.bias`` of the modules it hooks,
so it misses the class token and the position table (152,064 parameters in ViT-B/16).
Here every row counts the module's own parameters, whatever their names, and the
totals are summed over ``model.parameters()``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from .layers import AttentionPool, MultiHeadAttention


@dataclass
class SummaryRow:
    name: str  # e.g. "Linear-5"
    path: str  # dotted module path
    output_shape: list[int]
    params: int


@dataclass
class Summary:
    rows: list[SummaryRow]
    total_params: int
    trainable_params: int
    input_mb: float
    activations_mb: float  # forward + backward pass, as torchsummary estimates it
    params_mb: float
    macs: int  # multiply-accumulates of one image, attention matmuls included

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    def __str__(self) -> str:
        line, bar = "-" * 72, "=" * 72
        out = [line, f"{'Layer (type)':>28}  {'Output Shape':>25}  {'Param #':>13}", bar]
        for r in self.rows:
            shape = str([-1] + r.output_shape[1:])
            out.append(f"{r.name:>28}  {shape:>25}  {r.params:>13,}")
        total_mb = self.input_mb + self.activations_mb + self.params_mb
        out += [
            bar,
            f"Total params: {self.total_params:,}",
            f"Trainable params: {self.trainable_params:,}",
            f"Non-trainable params: {self.total_params - self.trainable_params:,}",
            line,
            f"Input size (MB): {self.input_mb:.2f}",
            f"Forward/backward pass size (MB): {self.activations_mb:.2f}",
            f"Params size (MB): {self.params_mb:.2f}",
            f"Estimated Total Size (MB): {total_mb:.2f}",
            f"GMACs (attention matmuls included): {self.gmacs:.4g}",
            line,
        ]
        return "\n".join(out)


@contextmanager
def _math_attention(model: nn.Module):
    """Count attention matmuls: the fused CPU kernel is invisible to FlopCounterMode."""
    attns = [m for m in model.modules() if isinstance(m, (MultiHeadAttention, AttentionPool))]
    saved = [m.fused for m in attns]
    for m in attns:
        m.fused = False
    try:
        yield
    finally:
        for m, fused in zip(attns, saved):
            m.fused = fused


def summary(model: nn.Module, input_size: tuple[int, ...] | None = None, batch_size: int = 1,
            print_table: bool = True) -> Summary:
    """Table of every layer (type, output shape, own parameters) plus true totals and GMACs.

    ``input_size`` is (C, H, W); by default the model's own config.
    """
    if input_size is None:
        cfg = model.cfg
        input_size = (cfg.in_channels, *cfg.img_size)
    if len(input_size) != 3:
        raise ValueError(f"input_size: expected (C, H, W), got {tuple(input_size)}")
    param = next(model.parameters())
    x = torch.zeros(batch_size, *input_size, device=param.device, dtype=param.dtype)

    rows: list[SummaryRow] = []
    hooks = []
    names = {m: n for n, m in model.named_modules()}
    counted: set[nn.Module] = set()  # a module called twice (DeiT's head norm) owns its parameters once

    def hook(module: nn.Module, _inputs, output) -> None:
        out = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(out, Tensor):
            return
        own = 0 if module in counted else sum(p.numel() for p in module.parameters(recurse=False))
        counted.add(module)
        rows.append(SummaryRow(f"{type(module).__name__}-{len(rows) + 1}", names[module], list(out.shape), own))

    for module in model.modules():
        # Like torchsummary: containers only route tensors, so they get no row.
        if module is model or isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            continue
        hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _math_attention(model), FlopCounterMode(display=False) as counter:
            if hasattr(model, "forward_features"):
                # every token through every block, as the table shows it (ViT.forward would run the
                # last block on the class token alone, and its rows would say (1, 1, E))
                model.forward_head(model.forward_features(x))
            else:
                model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)

    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # Rows cover parameters owned by hooked modules; anything owned by a container or the
    # model itself gets its own row so the rows add up to the total.
    hooked = sum(r.params for r in rows)
    if hooked != total:
        rows.append(SummaryRow("(other parameters)", "", [batch_size], total - hooked))
    mb = 1024**2
    elem = x.element_size()
    activations = sum(torch.Size(r.output_shape).numel() for r in rows if r.name != "(other parameters)")
    result = Summary(
        rows=rows,
        total_params=total,
        trainable_params=trainable,
        input_mb=x.numel() * elem / mb,
        activations_mb=2 * activations * elem / mb,
        params_mb=sum(p.numel() * p.element_size() for p in model.parameters()) / mb,
        macs=counter.get_total_flops() // 2 // batch_size,
    )
    if print_table:
        print(result)
    return result


__all__ = ["summary", "Summary", "SummaryRow"]
