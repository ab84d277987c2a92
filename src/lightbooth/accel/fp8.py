"""FP8 (e4m3) linear layers: half the weight memory of bf16, and on Hopper GPUs about twice the matrix rate.

Weights are quantized once per output row (a float32 scale per row, chosen so the row's largest magnitude maps to
e4m3's largest value, 448). Two ways to compute:
- "fp8": activations are quantized per token on the fly and the product runs in fp8 with both scales applied by
  `torch._scaled_mm` (rowwise scaling), output in the activations' dtype;
- "dequant": the weight is expanded back to the activations' dtype for an ordinary matrix product, so the only
  error is the weight rounding. Training uses it for the input gradient either way.

Error model: e4m3 keeps 3 mantissa bits, a relative rounding error of at most 2^-4 per element and about 2^-5.6
RMS for well-spread values, so one product's output is off by about 2-4% relative in "fp8" mode (weights and
activations rounded) and 1.5-3% in "dequant" mode; bench/gpu.py measures what that does end to end.
`quantize_rowwise` is the reference the tests hold the fast paths to.
"""

from __future__ import annotations

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., K) -> (e4m3 values (..., K), float32 scales (..., 1)) with x ~= values * scales."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


_compiled: dict[str, object] = {}


def _quantize_fn(device: torch.device):
    """On CUDA, the quantizer compiled into one fused kernel (eager it is five passes over the activations).

    Compiled once for any number of rows (dynamic shapes); if compiling fails, the eager quantizer is used.
    """
    if device.type != "cuda" or not Fp8Linear.compile_quantizer or torch.compiler.is_compiling():
        return quantize_rowwise  # (inside a compiled region the compiler fuses it with its neighbours anyway)
    if "fn" not in _compiled:
        compiled = torch.compile(quantize_rowwise, dynamic=True)

        def quantize(x):
            try:
                return compiled(x)
            except Exception as e:  # no working compiler here: fall back for good, once, loudly
                import warnings

                warnings.warn(f"fp8: compiling the activation quantizer failed ({type(e).__name__}); using eager")
                _compiled["fn"] = quantize_rowwise
                return quantize_rowwise(x)
        _compiled["fn"] = quantize
    return _compiled["fn"]


def fp8_matmul(x: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (M, K) @ W^T with W (N, K) in e4m3 and per-row scales (N,): rowwise-scaled fp8 product, x's dtype out."""
    xq, x_scale = _quantize_fn(x.device)(x)
    out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    out = torch._scaled_mm(xq, w8.t(), scale_a=x_scale, scale_b=w_scale.view(1, -1),
                           bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype)
    return out.to(x.dtype)


def dequantize(w8: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (w8.to(dtype) * w_scale.to(dtype)[:, None])


class _Fp8LinearFn(torch.autograd.Function):
    """A frozen fp8 weight: forward in the chosen mode, input gradient through the dequantized weight.

    Saves nothing of the input (the weight gets no gradient), so activation memory is the same as nn.Linear's.
    """

    @staticmethod
    def forward(ctx, x, w8, w_scale, bias, mode):
        ctx.save_for_backward(w8, w_scale)
        x2 = x.reshape(-1, x.shape[-1])
        if mode == "fp8":
            out = fp8_matmul(x2, w8, w_scale, bias)
        else:
            out = torch.nn.functional.linear(x2, dequantize(w8, w_scale, x.dtype), None if bias is None
                                             else bias.to(x.dtype))
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        w8, w_scale = ctx.saved_tensors
        return grad @ dequantize(w8, w_scale, grad.dtype), None, None, None, None


class Fp8Linear(nn.Linear):
    """An nn.Linear whose frozen weight is stored in e4m3 with per-row scales.

    It stays an nn.Linear (same in/out features, bias, `compute_dtype` for peft), so peft can put a LoRA on it and
    diffusers' gradient checkpointing works unchanged; the LoRA adapters get `compute_dtype`, not fp8.
    """

    compile_quantizer = True  # fuse activation quantization on CUDA (set False to debug eagerly)

    def __init__(self, linear: nn.Linear, mode: str = "fp8"):
        nn.Module.__init__(self)
        if mode not in ("fp8", "dequant"):
            raise ValueError(f"Fp8Linear mode must be 'fp8' or 'dequant', not {mode!r}")
        self.in_features, self.out_features, self.mode = linear.in_features, linear.out_features, mode
        self.compute_dtype = linear.weight.dtype
        w8, scale = quantize_rowwise(linear.weight.detach())
        self.weight = nn.Parameter(w8, requires_grad=False)
        self.register_buffer("weight_scale", scale.view(-1))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        if torch.is_autocast_enabled(dev):  # answer in autocast's dtype, as nn.Linear does: a float32 answer here
            x = x.to(torch.get_autocast_dtype(dev))  # turns everything downstream float32 (twice the activations)
        return _Fp8LinearFn.apply(x, self.weight, self.weight_scale, self.bias, self.mode)

    def dequantized(self) -> torch.Tensor:
        return dequantize(self.weight, self.weight_scale, self.compute_dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"


def convertible(linear: nn.Module) -> bool:
    """fp8 products need both dimensions to be multiples of 16 (cuBLASLt's alignment for 1-byte types)."""
    return type(linear) is nn.Linear and linear.in_features % 16 == 0 and linear.out_features % 16 == 0


def to_fp8(model: nn.Module, mode: str = "fp8", skip: tuple[str, ...] = ()) -> int:
    """Replace `model`'s nn.Linear layers in place by Fp8Linear (freeing their bf16 weights); returns how many.

    `skip`: name substrings to leave in full precision. Layer by layer, so peak memory grows by one layer only.
    """
    count = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if convertible(child) and not any(s in full for s in skip):
                setattr(module, child_name, Fp8Linear(child, mode))
                count += 1
    return count
