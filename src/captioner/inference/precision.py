"""Inference with bfloat16 weights in the decoder's matrix products.

Captioning one photo multiplies a handful of vectors (the beams) by every weight matrix at each
word, so the time goes into reading the weights from memory, not into arithmetic. Stored as
bfloat16 they are half the bytes, and CPUs with native bfloat16 (AVX512-BF16, AMX) multiply
them directly: the decoder's step runs about twice as fast here (`benchmarks/latency.py`). Only
the matrix products change; inputs are rounded to bfloat16 on the way in, results come back as
float32, and everything else (attention softmax, LSTM state, log-probabilities, the search)
stays float32. On CPUs without native bfloat16 it would be emulated and slower, so `auto` keeps
float32 there.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PRECISIONS = ("fp32", "bf16")


def native_bf16() -> bool:
    """Does this CPU multiply bfloat16 natively (oneDNN's check)?"""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class Bf16Linear(nn.Module):
    """`nn.Linear` for inference with its weight kept in bfloat16; float32 in and out.
    Keeps the `weight`/`bias` names, so the module's state dict reads as before."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", linear.weight.detach().to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.to(torch.bfloat16), self.weight).to(x.dtype)
        return y if self.bias is None else y + self.bias


def bf16_linears(module: nn.Module) -> int:
    """Replace every `nn.Linear` inside `module` by a `Bf16Linear` (in place) and let modules
    with other matrix products (a tied output layer) switch them through their own
    `bf16_inference()`; how many weight matrices now run in bfloat16.
    For inference only: the bfloat16 weights take no gradients."""
    count = 0
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, Bf16Linear(child))
            count += 1
        else:
            count += bf16_linears(child)
    hook = getattr(module, "bf16_inference", None)
    return count + (hook() if callable(hook) else 0)


def resolve_precision(requested: str | None, preferred: str, device: str | torch.device) -> str:
    """The precision to caption with: `requested` "fp32" or "bf16" as asked, or None/"auto"
    for the model's `preferred` one, which becomes fp32 unless on a CPU with native bf16."""
    if requested in (None, "auto"):
        if preferred not in PRECISIONS:
            raise ValueError(f"the model's precision must be {' or '.join(PRECISIONS)}, not {preferred!r}")
        native = torch.device(device).type == "cpu" and native_bf16()
        return preferred if preferred == "fp32" or native else "fp32"
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be auto, {' or '.join(PRECISIONS)}, not {requested!r}")
    return requested
