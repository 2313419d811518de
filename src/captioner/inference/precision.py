"""Inference with bfloat16 or int8 weights in the decoder's matrix products.

Captioning one photo multiplies a handful of vectors (the beams) by every weight matrix at each
word, so the time goes into reading the weights from memory, not into arithmetic. Stored as
bfloat16 they are half the bytes, and CPUs with native bfloat16 (AVX512-BF16, AMX) multiply
them directly: the decoder's step runs about twice as fast here (`benchmarks/latency.py`). Only
the matrix products change; inputs are rounded to bfloat16 on the way in, results come back as
float32, and everything else (attention softmax, LSTM state, log-probabilities, the search)
stays float32. On CPUs without native bfloat16 it would be emulated and slower, so there `auto`
takes int8 instead: each Linear (and LSTM) weight of the decoder stored as 8-bit integers with
one scale per output row (per-channel; torch's default one scale per matrix lost CIDEr-D on
Flickr8k test), the inputs quantized per call (dynamic quantization). A quarter of the bytes,
and AVX2's integer products are fast. `fp32` is there on request.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from captioner.errors import OptionError

PRECISIONS = ("fp32", "bf16", "int8")


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
    count += hook() if callable(hook) else 0
    return count + sum(bf16_linears(m) for m in _held_apart(module))


def _held_apart(module: nn.Module) -> list[nn.Module]:
    """Inference-only modules a module keeps outside its module tree (so outside its state
    dict), e.g. a decoder's fused step weights; precision conversion reaches them here."""
    extra = getattr(module, "inference_modules", None)
    return list(extra()) if callable(extra) else []


# torch's quantized kernels: those with per-channel weights for Linear, LSTM and LSTMCell
_INT8_TYPES = (nn.Linear, nn.LSTM, nn.LSTMCell)


def int8_linears(module: nn.Module) -> int:
    """Dynamic int8 (in place): every `nn.Linear`, `nn.LSTM` and `nn.LSTMCell` inside `module`
    (and inside its `inference_modules()`) with per-channel int8 weights
    (`torch.ao.quantization.per_channel_dynamic_qconfig`); how many modules were quantized.
    For inference only, on CPU: quantized modules take no gradients."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    parts = [module]
    for m in module.modules():
        parts += _held_apart(m)
    count = 0
    for part in parts:
        before = sum(1 for m in part.modules() if type(m) in _INT8_TYPES)
        with warnings.catch_warnings():  # torch.ao's deprecation notices, not the user's concern
            warnings.simplefilter("ignore")
            quantize_dynamic(part, {t: per_channel_dynamic_qconfig for t in _INT8_TYPES}, inplace=True)
        count += before - sum(1 for m in part.modules() if type(m) in _INT8_TYPES)
    return count


def apply_precision(module: nn.Module, precision: str) -> int:
    """Switch a decoder (in place) to `precision` ("fp32", "bf16" or "int8"); how many weight
    matrices changed."""
    if precision == "bf16":
        return bf16_linears(module)
    if precision == "int8":
        return int8_linears(module)
    if precision != "fp32":
        raise ValueError(f"precision must be {', '.join(PRECISIONS)}, not {precision!r}")
    return 0


def resolve_precision(requested: str | None, preferred: str, device: str | torch.device) -> str:
    """The precision to caption with: `requested` "fp32", "bf16" or "int8" as asked, or
    None/"auto" to follow the model: one that prefers fp32 (`model.precision`, as exported)
    gets fp32; one scored in reduced precision (bf16 or int8) gets bf16 on a CPU with native
    bfloat16, int8 on any other CPU, fp32 on other devices."""
    if requested in (None, "auto"):
        if preferred not in PRECISIONS:
            raise ValueError(f"the model's precision must be {', '.join(PRECISIONS)}, not {preferred!r}")
        if preferred == "fp32" or torch.device(device).type != "cpu":
            return "fp32"
        return "bf16" if native_bf16() else "int8"
    if requested not in PRECISIONS:
        raise OptionError(f"precision must be auto, {', '.join(PRECISIONS)}, not {requested!r}")
    if requested == "int8" and torch.device(device).type != "cpu":
        raise OptionError(f"precision int8 runs on CPU only, not on {torch.device(device).type}")
    return requested
