"""TorchScript traces of the denoiser call on CPU: the same kernels without the Python between them.

A small UNet on a CPU spends a third or more of each forward in Python: diffusers' module bookkeeping, argument
handling and the dispatcher call per op. A trace records the ops once and replays them from C++; the output is
bit-identical (it runs the same aten kernels), and the trace reads the module's own parameters, so a LoRA fused in
place afterwards is still seen. Measured on the tests' tiny SD UNet: 6.7 -> 4.2 ms per forward at one thread
(bench/cpu_generate.py has the end-to-end numbers). torch.compile was slower here (7.3 ms after a 47 s compile),
torch.export's module 5.9 ms.

A trace costs about 0.3 s on a tiny UNet, more than one short run saves, so a shape is traced only when a second
sampling run uses it (`begin_run` marks the runs): one-shot generation stays eager, repeated generation (batches of
a prompts file, a server, a benchmark) gets the trace from its second batch on. `torch.jit.trace` is deprecated
in torch 2.x; if it fails or disappears, calls run eagerly (one warning).
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from .graphs import _key  # one trace per argument shape, keyed as CUDA graphs are


class _Call(torch.nn.Module):
    """`fn` as a module that owns `module`, so the trace reaches its parameters by reference, not as constants."""

    def __init__(self, module: torch.nn.Module, fn: Callable[..., torch.Tensor]):
        super().__init__()
        self.module, self.fn = module, fn

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.fn(*args)


class TracedFunction:
    """Inference: `fn(*tensors) -> tensor` over `module`, replayed from a trace per argument shape once repeated."""

    def __init__(self, module: torch.nn.Module, fn: Callable[..., torch.Tensor]):
        self.call = _Call(module, fn)
        self.traces: dict[tuple, torch.jit.ScriptModule] = {}
        self.first_run: dict[tuple, int] = {}  # the run in which each shape was first seen
        self.run = 0
        self.failed: str | None = None

    def begin_run(self) -> None:
        """A new sampling run starts: shapes seen in earlier runs are worth tracing now."""
        self.run += 1

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        key = _key(args)
        traced = self.traces.get(key)
        if traced is not None:
            return traced(*args)
        if self.failed or self.first_run.setdefault(key, self.run) == self.run:
            return self.call(*args)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TracerWarnings about Python-side shape checks, the deprecation
                traced = torch.jit.trace(self.call, args, check_trace=False)
        except Exception as e:  # noqa: BLE001 - anything the tracer cannot hold: correct, just not faster
            self.failed = f"{type(e).__name__}: {e}"[:300]
            warnings.warn(f"tracing the denoiser failed, running it eagerly: {self.failed}")
            return self.call(*args)
        self.traces[key] = traced
        return traced(*args)
