"""Run measured training steps of one model on one batch, and put everything back afterwards.

NOTE [ Side effects of measuring ]
  A measured step changes parameters and optimizer state (the optimizer steps), gradients, buffers (batch
  norm statistics) and the random number generators (dropout). ``StepRunner.restoring`` snapshots all of
  them and restores them on exit, the RNG of every device the model's parameters live on included
  (``tightfit._rng.forked_rng``), so training after planning gives the results it would have given
  without planning.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch._subclasses.fake_tensor import is_fake

from tightfit._rng import forked_rng
from tightfit._step import LossFn, call_model, loss_of, training_step, wait_for_device
from tightfit._tree import same_tensors
from tightfit.memory import LiveTracker
from tightfit.memory.profile import ensure_optimizer_state
from tightfit.remat import execute
from tightfit.remat.blocks import Blocks, find_blocks
from tightfit.remat.measure import accelerator_key, step_cost
from tightfit.remat.options import Option
from tightfit.remat.segments import SegmentError

GRAD_SEED = 1234  # RNG seed of the steps whose gradients are compared (segment plans, compiler budgets)


class _Snapshot:
    """Parameters and buffers (values), gradients (objects) and optimizer state of one model."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        self.grads = [(p, p.grad) for p in model.parameters()]
        self.model = model
        self.optimizer = optimizer
        self.state = None
        if optimizer is not None:
            self.state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
            self.opt_state = copy.deepcopy(optimizer.state_dict())
        else:
            self.buffers = [(b, b.detach().clone()) for b in model.buffers()]

    def restore(self) -> None:
        with torch.no_grad():
            if self.state is not None:
                for k, v in self.model.state_dict(keep_vars=True).items():
                    v.copy_(self.state[k])
                assert self.optimizer is not None
                self.optimizer.load_state_dict(self.opt_state)
            else:
                for b, saved in self.buffers:
                    b.copy_(saved)
        for p, g in self.grads:
            p.grad = g


class StepRunner:
    """Measured training steps (peak by the ruler, time by the clock or by FLOP counts) of ``model`` on
    ``batch``, each under a plan applied for the step and removed after it, with the model restored.

    ``keep_output``: the model output stays alive until the step ends (as ``tightfit.profile`` counts).
    ``compile_backend``: each step runs ``torch.compile(model)`` compiled afresh with the plan applied.
    ``timing_reps``: timed steps per measurement, their median. ``flop_rate``: times from FLOP counts.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        batch: Any,
        loss_fn: LossFn | None,
        optimizer: torch.optim.Optimizer | None,
        *,
        keep_output: bool,
        compile_backend: str | Callable[..., Any] | None,
        timing_reps: int,
        flop_rate: float | None,
    ) -> None:
        self.model, self.batch, self.loss_fn, self.optimizer = model, batch, loss_fn, optimizer
        self.keep_output = keep_output
        self.compile_backend = compile_backend
        self.timing_reps = timing_reps
        self.flop_rate = flop_rate
        self.reference_grads: list[torch.Tensor | None] | None = None  # of the no-remat step, GRAD_SEED
        self.last_grads: list[torch.Tensor | None] | None = None  # of the last step measured with "keep"
        self._runner: torch.nn.Module = model  # what the steps call (the compiled model, or it)

    @property
    def on_accelerator(self) -> bool:
        return any(p.device.type != "cpu" for p in self.model.parameters())

    def device_peak(self, tracker: LiveTracker) -> int:
        """The step's peak as budgets count it: on the model's accelerator alone when it has one (what
        offload moves to the host leaves the device's budget), in total on the CPU."""
        device = accelerator_key(list(self.model.parameters()))
        return tracker.peak if device is None else tracker.peak_by_device.get(device, tracker.peak)

    @property
    def fake(self) -> bool:
        """Whether the model lives under FakeTensorMode (estimation: no values to compare)."""
        return any(is_fake(p) for p in self.model.parameters())

    @contextlib.contextmanager
    def restoring(self) -> Iterator[None]:
        """Whatever runs inside leaves the model, optimizer, gradients and RNGs as they were."""
        snap = _Snapshot(self.model, self.optimizer)
        with forked_rng([*self.model.parameters(), *self.model.buffers()]):
            try:
                yield
            finally:
                snap.restore()

    def step(self) -> None:
        training_step(self._runner, self.batch, self.loss_fn, self.optimizer)

    def _compiled(self) -> torch.nn.Module:
        """The model (with the plan applied) compiled afresh, and compiled already: one step outside the
        ruler traces it, so that the measured steps run the compiled graphs."""
        torch._dynamo.reset()
        compiled = torch.compile(self.model, backend=self.compile_backend)
        training_step(compiled, self.batch, self.loss_fn, None)
        for p in self.model.parameters():
            p.grad = None
        return compiled

    def tracked_step(self, timeline: bool = False) -> LiveTracker:
        """One step measured as ``tightfit.profile`` measures it (the output stays alive until the step
        ends unless ``keep_output`` is False; optimizer state is created first by a step on zero
        gradients); returns the tracker."""
        if self.optimizer is not None:
            ensure_optimizer_state(self.optimizer)
            self.optimizer.zero_grad(set_to_none=True)
        for p in self.model.parameters():  # also those the optimizer does not hold (backward adds into .grad)
            p.grad = None
        with LiveTracker(track=[self.model, self.optimizer, self.batch], timeline=timeline) as t:
            t.phase = "forward"
            output = call_model(self._runner, self.batch)
            loss = loss_of(output, self.loss_fn)
            if not self.keep_output:
                del output
                output = None
            t.phase = "backward"
            loss.backward()
            if self.optimizer is not None:
                t.phase = "optimizer"
                self.optimizer.step()
            del output, loss
        return t

    def timeline(self, options: Mapping[str, Sequence[Option]] | None = None) -> list[Any]:
        """Live bytes after every op of one training step (``TimelinePoint``s) with ``options`` applied."""
        with self.restoring(), execute.strict_op_sequences():
            try:
                if options:
                    execute.apply(self.model, options)
                return list(self.tracked_step(timeline=True).timeline)
            finally:
                execute.undo(self.model)

    def measure(
        self,
        options: Mapping[str, Sequence[Option]] | None = None,
        *,
        timed: bool = True,
        tracked: bool = True,
        grads: str | None = None,
        compile_budget: float | None = None,
    ) -> tuple[int, float]:
        """(peak bytes, step seconds) of one training step with ``options`` applied (None: no remat) and
        the compiler budget ``compile_budget`` (``execute.apply``); -1 / nan for what was not asked.

        ``grads="capture"`` keeps the step's gradients as the reference, ``grads="check"`` raises
        ``SegmentError`` unless they equal it bit for bit, ``grads="keep"`` keeps them in ``last_grads``
        (all three seed the RNG alike). The model is
        restored afterwards (parameters, optimizer state, RNGs, grads).
        """
        with self.restoring(), execute.strict_op_sequences():  # a measured cost must describe the call
            try:
                if options or compile_budget is not None:
                    execute.apply(self.model, options or {}, compile_budget=compile_budget)
                if self.compile_backend is not None:
                    self._runner = self._compiled()
                if grads is not None:
                    torch.manual_seed(GRAD_SEED)
                peak = self.device_peak(self.tracked_step()) if tracked or grads else -1
                if grads == "capture":
                    self.reference_grads = [
                        None if p.grad is None else p.grad.clone() for p in self.model.parameters()
                    ]
                elif grads == "keep":
                    self.last_grads = [
                        None if p.grad is None else p.grad.clone() for p in self.model.parameters()
                    ]
                elif grads == "check":
                    assert self.reference_grads is not None, "no reference gradients captured"
                    if not same_tensors(self.reference_grads, [p.grad for p in self.model.parameters()]):
                        raise SegmentError("the plan gave other gradients than the model without remat")
                seconds = float("nan")
                if timed and self.flop_rate is not None:
                    seconds = step_cost(self.step, self.flop_rate, self.flop_rate / 50)
                elif timed:
                    runs = []
                    for _ in range(max(1, self.timing_reps)):
                        wait_for_device()
                        t0 = time.perf_counter()
                        self.step()
                        wait_for_device()
                        runs.append(time.perf_counter() - t0)
                    seconds = sorted(runs)[len(runs) // 2]
            finally:
                self._runner = self.model
                execute.undo(self.model)
        return peak, seconds

    def find_blocks_timed(self) -> tuple[Blocks, float]:
        """The blocks, recorded during a timed no-remat training step (one step instead of a probe forward
        and a step), and that step's seconds. The recording hooks cost time per module call, which matters
        for models with thousands of block calls (the Planner retimes those)."""
        seconds: list[float] = []

        def run() -> None:
            wait_for_device()
            started = time.perf_counter()
            self.step()
            wait_for_device()
            seconds.append(time.perf_counter() - started)

        with self.restoring():
            blocks = find_blocks(self.model, self.batch, self.loss_fn, run=run)
        return blocks, seconds[0]
