"""02 on the CPU in fp32: a model's Linear layers through oneDNN's matrix product instead of MKL's sgemm.

A CLIP forward pass on a CPU spends nearly all its time in Linear layers. torch computes them with
MKL's sgemm, which on some x86 CPUs (AMD's with AVX-512, among them) runs at half the speed that
oneDNN, also in torch, reaches on the same layers; the two agree to float32 rounding
(benchmarks/onednn_linear.py measures both).
"""

from __future__ import annotations

import platform

import torch


class OneDnnLinear(torch.nn.Module):
    """An nn.Linear whose product runs on oneDNN: its weights kept in oneDNN's layout, in float32."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        bias = linear.bias if linear.bias is not None else torch.zeros(linear.out_features)
        self.weight = linear.weight.detach().float().to_mkldnn()
        self.bias = bias.detach().float().to_mkldnn()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.mkldnn_linear(
            features.contiguous().to_mkldnn(), self.weight, self.bias
        ).to_dense()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def with_onednn_linears(model: torch.nn.Module) -> torch.nn.Module:
    """The model (on the CPU, in float32), each of its nn.Linear layers replaced by a OneDnnLinear."""
    for name, child in model.named_children():
        if isinstance(child, torch.nn.Linear):
            setattr(model, name, OneDnnLinear(child))
        else:
            with_onednn_linears(child)
    return model


def uses_onednn(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a model on this device in this dtype gets oneDNN's Linear layers: fp32 on an x86-64 CPU.

    Only x86-64 was measured; elsewhere (Arm) torch's own Linear layers stay.
    """
    on_x86 = platform.machine().lower() in ("x86_64", "amd64")
    return device.type == "cpu" and dtype == torch.float32 and on_x86 and torch.backends.mkldnn.is_available()
