"""CUDA graphs: record a function's kernels once, then replay them with one launch.

A UNet step at small batch is mostly launch overhead (hundreds of kernels of a few microseconds each); a replayed
graph runs the same kernels back to back. The price: inputs and outputs live in fixed buffers, so a graph is
recorded per input shape, and whatever the function reads besides its tensor arguments (weights, constants) must
not move or change shape between replays. Off CUDA these wrappers call the function directly.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable

import torch


def _key(args: tuple[torch.Tensor, ...]) -> tuple:
    return tuple((tuple(a.shape), a.dtype, a.device) for a in args)


class GraphedFunction:
    """Inference: `f(*tensors) -> tensor`, replayed from a CUDA graph recorded per argument shape (eager off CUDA).

    The first call for a shape runs `warmup` times eagerly on a side stream (cuDNN / cuBLAS pick their kernels,
    lazy buffers get allocated), then records. The result is a copy, so callers may keep it across calls.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], warmup: int = 2):
        self.fn, self.warmup = fn, warmup
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, tuple, torch.Tensor]] = {}
        self.failed: str | None = None  # why recording failed; every call then runs eagerly

    def begin_run(self) -> None:
        """Sampling runs do not matter here: a graph is recorded on a shape's first call."""

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if not args or args[0].device.type != "cuda" or self.failed:
            return self.fn(*args)
        with torch.inference_mode():  # the buffers are inference tensors, whatever mode the caller is in
            key = _key(args)
            if key not in self.graphs:
                try:
                    self.graphs[key] = self._record(args)
                except RuntimeError as e:  # a host sync or an op graphs cannot hold: correct, just not faster
                    self.failed = f"{type(e).__name__}: {e}"[:300]
                    warnings.warn(f"CUDA graph recording failed, running eagerly: {self.failed}")
                    torch.cuda.synchronize()
                    return self.fn(*args)
            graph, static_in, static_out = self.graphs[key]
            for dst, src in zip(static_in, args):
                dst.copy_(src)
            graph.replay()
            return static_out.clone()

    def _record(self, args):
        static_in = tuple(a.clone() for a in args)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.fn(*static_in)
        return graph, static_in, static_out


class GraphedTrainStep:
    """A whole training step (forward, backward, optimizer) recorded as one CUDA graph (eager off CUDA).

    `step(*batch)` must compute the loss, call backward and step the optimizer, and return the loss tensor; the
    optimizer must be capturable (e.g. `torch.optim.AdamW(..., capturable=True)`) and the step must not read
    host values that change. The `warmup` first calls run eagerly (they are real training steps, on a side stream
    so the allocator's graph pool stays clean), the next one records and then replays, and every later call replays.
    Gradients are set to None before recording so that backward allocates them inside the graph's pool.
    No autograd graph from an earlier eager step may still be alive when recording starts (hold only detached
    losses): its gradient accumulators belong to another stream, and using them invalidates the capture. A failed
    capture falls back to eager steps, but leaves CUDA's random generator unusable in this process, so get it right.
    """

    def __init__(self, step: Callable[..., torch.Tensor], optimizer: torch.optim.Optimizer, warmup: int = 3):
        self.step, self.optimizer, self.warmup = step, optimizer, warmup
        self.calls = 0
        self.failed: str | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_in: tuple = ()
        self.static_loss: torch.Tensor | None = None

    def __call__(self, *batch: torch.Tensor) -> torch.Tensor:
        if not batch or batch[0].device.type != "cuda":
            self.optimizer.zero_grad(set_to_none=True)
            return self.step(*batch)
        self.calls += 1
        if self.graph is None and self.calls <= self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.optimizer.zero_grad(set_to_none=True)
                loss = self.step(*batch).detach()  # no autograd graph may outlive a step (see the class notes)
            torch.cuda.current_stream().wait_stream(side)
            return loss
        if self.failed:
            self.optimizer.zero_grad(set_to_none=True)
            return self.step(*batch)
        if self.graph is None:
            self.static_in = tuple(b.clone() for b in batch)
            self.optimizer.zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    self.static_loss = self.step(*self.static_in)
            except RuntimeError as e:  # nothing ran while recording, so this call's step is still to do
                self.failed = f"{type(e).__name__}: {e}"[:300]
                warnings.warn(f"CUDA graph recording of the training step failed, running eagerly: {self.failed}")
                torch.cuda.synchronize()
                self.optimizer.zero_grad(set_to_none=True)
                return self.step(*batch)
            self.graph = graph
        for dst, src in zip(self.static_in, batch):
            dst.copy_(src)
        self.graph.replay()
        return self.static_loss.clone()


class _Flat(torch.nn.Module):
    """`module(*args, **kwargs)` with the tensor arguments as positional inputs and the rest fixed: the form
    `make_graphed_callables` takes. Holds `module` as a child so that its parameters are the graph's too."""

    def __init__(self, module: torch.nn.Module, slots: list, fixed: dict):
        super().__init__()
        self.module, self.slots, self.fixed = module, slots, fixed

    def forward(self, *tensors: torch.Tensor):
        given = {**self.fixed, **dict(zip(self.slots, tensors))}
        args = [given[i] for i in range(sum(isinstance(k, int) for k in given))]
        out = self.module(*args, **{k: v for k, v in given.items() if isinstance(k, str)})
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)


class GraphedForwardBackward:
    """Training: a module's forward and its backward each replayed from a CUDA graph (eager off CUDA).

    A drop-in for `module(*args, **kwargs)` inside an ordinary autograd loop (`torch.cuda.make_graphed_callables`):
    gradients reach the module's parameters as usual, and the loss, the optimizer, gradient clipping and whatever
    the training framework does around the step stay eager. A pair of graphs is recorded per call signature (tensor
    shapes, dtypes and `requires_grad`, and the values of the other arguments), after `warmup` eager passes on a
    side stream that compute gradients without accumulating them. The call must return a tensor or a tuple of
    tensors (pass `return_dict=False` to diffusers models); the outputs are the graph's buffers, overwritten by the
    next call, so use them before calling again. Under autocast the recording runs with autocast's cache off, which
    graphs require. Only while the module is in training mode; in eval mode and off CUDA it is called directly.
    """

    def __init__(self, module: torch.nn.Module, warmup: int = 3):
        self.module, self.warmup = module, warmup
        self.graphed: dict[tuple, torch.nn.Module] = {}
        # make_graphed_callables warms up on a side stream by design; autograd then warns once per parameter node
        warnings.filterwarnings("ignore", "The AccumulateGrad node's stream does not match")
        self.failed: str | None = None  # why recording failed; every call then runs eagerly

    def __call__(self, *args, **kwargs):
        items = list(enumerate(args)) + list(kwargs.items())
        tensors = [(k, v) for k, v in items if isinstance(v, torch.Tensor)]
        if (self.failed or not tensors or tensors[0][1].device.type != "cuda" or not self.module.training
                or not torch.is_grad_enabled()):
            return self.module(*args, **kwargs)
        fixed = {k: v for k, v in items if not isinstance(v, torch.Tensor)}
        key = (tuple((k, tuple(v.shape), v.dtype, v.requires_grad) for k, v in tensors), repr(sorted(
            fixed.items(), key=lambda kv: str(kv[0]))))
        if key not in self.graphed:
            try:
                self.graphed[key] = self._record([k for k, _ in tensors], fixed, [v for _, v in tensors])
            except (RuntimeError, AssertionError) as e:  # correct, just not faster
                self.failed = f"{type(e).__name__}: {e}"[:300]
                warnings.warn(f"CUDA graph recording of the denoiser failed, training eagerly: {self.failed}")
                torch.cuda.synchronize()
                return self.module(*args, **kwargs)
        return self.graphed[key](*(v for _, v in tensors))

    def _record(self, slots: list, fixed: dict, tensors: list[torch.Tensor]) -> torch.nn.Module:
        sample = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in tensors)
        flat = _Flat(self.module, slots, fixed)
        dev = sample[0].device.type
        cast = (torch.autocast(dev, dtype=torch.get_autocast_dtype(dev), cache_enabled=False)
                if torch.is_autocast_enabled(dev) else contextlib.nullcontext())
        with cast:
            return torch.cuda.make_graphed_callables(flat, sample, num_warmup_iters=self.warmup,
                                                     allow_unused_input=True)
