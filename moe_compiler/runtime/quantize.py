"""int8 copies of expert weights for the offload store's fast tier (option offload["quantize"] = "int8").

Off by default: an int8 copy changes the layer's results. Each weight matrix of an expert ([R, C],
either layout) is stored as int8 with one fp32 scale per row (symmetric, absmax / 127); biases and
1-d tensors stay as they are. A cached fp32 expert takes about a quarter of its bytes, so a budget
holds about four times as many experts (twice as many for fp16/bf16). Layers dequantize the expert
they are about to compute with (one expert's full-precision copy at a time, outside the budget).

    q, scale = quantize_rows(w)                  # w [R, C] float -> int8 [R, C], fp32 [R, 1]
    w_hat = dequantize_rows(q, scale, w.dtype)   # |w_hat - w| <= scale / 2 per row
"""
from __future__ import annotations

import torch

MODES = (None, "int8")


def quantizable(shape) -> bool:
    """Weight matrices (2-d per expert) are quantized; biases are not."""
    return len(shape) == 2


def int8_bytes(shape, element_size: int) -> int:
    """Bytes the fast tier holds for one tensor of ``shape`` (per expert) under int8 quantization."""
    numel = 1
    for s in shape:
        numel *= s
    return numel + 4 * shape[0] if quantizable(shape) else numel * element_size


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [R, C] (finite floats) -> (int8 [R, C], fp32 scales [R, 1]); an all-zero row gets scale 0."""
    w = w.float()
    scale = w.abs().amax(dim=-1, keepdim=True) / 127.0
    q = torch.where(scale > 0, torch.round(w / scale.clamp_min(torch.finfo(torch.float32).tiny)), 0.0)
    return q.clamp_(-127, 127).to(torch.int8), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale).to(dtype)
