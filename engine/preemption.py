"""Preemption: SIGTERM (a scheduler) and SIGINT (Ctrl-C) become a checkpoint at the next step boundary,
agreed by every rank.

The signal handler only sets a flag (a checkpoint is never written from inside a handler, and a write in
progress is never interrupted). At each step boundary every rank calls `StopRequest.agreed`, which is a
max over ranks of the flags: all ranks call it at the same steps, so they stop at the same step whichever
of them got the signal (torchrun forwards it to all; a scheduler may signal only some). The reduction
runs on a CPU (gloo) group, so it never waits for the GPU: one tiny host-side message per step.
A second signal leaves at once (SystemExit, one line), for a user who does not want to wait. Outside the
training steps (setup, the end) `exit_on_signals` turns either signal into a plain exit with one line.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

import torch
import torch.distributed as dist


class StopRequest:
    """Context manager: install the handler on enter (all ranks at once: it may create a gloo group),
    restore the previous handlers on exit."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = signals
        self.signum = 0  # the signal that asked to stop (here or on another rank), 0: none
        self._previous: dict[int, object] = {}
        self._group = None
        self._distributed = False
        self._flag = torch.zeros(1, dtype=torch.int32)

    def __enter__(self) -> StopRequest:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self._distributed = True
            if dist.get_backend() != "gloo":  # NCCL: a CPU side group, so the check needs no GPU sync
                self._group = dist.new_group(backend="gloo")
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum:
            print(f"second {signal.Signals(signum).name}: leaving now, without a checkpoint", file=sys.stderr)
            raise SystemExit(128 + signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def agreed(self) -> bool:
        """True on every rank when any rank got a stop signal (call it on all ranks at the same steps)."""
        if not self._distributed:
            return self.signum != 0
        self._flag.fill_(self.signum)
        dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group)
        got = int(self._flag.item())
        if got and not self.signum:
            self.signum = got
        return got != 0


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_on_signals() -> dict[int, object]:
    """Outside the training steps: SIGTERM / SIGINT exit (128 + signal) with one line instead of a
    KeyboardInterrupt traceback, unwinding normally (loaders shut down). Processes forked from this one
    (DALI workers) inherit the handler and ignore it: their trainer decides. Returns the previous
    handlers for `restore_signals`."""
    owner = os.getpid()

    def leave(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != owner:
            return
        name = signal.Signals(signum).name
        print(f"stopped by {name} outside the training steps (no checkpoint written now)", file=sys.stderr)
        sys.exit(128 + signum)

    return {s: signal.signal(s, leave) for s in STOP_SIGNALS}


def restore_signals(previous: dict[int, object]) -> None:
    for s, handler in previous.items():
        signal.signal(s, handler)


def _measure(calls: int = 2000) -> None:
    """`torchrun --nproc_per_node=2 -m engine.preemption`: wall and CPU time of one `agreed()` per step."""
    import time

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    with StopRequest() as stop:
        for _ in range(50):
            stop.agreed()
        t, c = time.perf_counter(), time.process_time()
        for _ in range(calls):
            stop.agreed()
        wall, cpu = (time.perf_counter() - t) / calls, (time.process_time() - c) / calls
    if dist.get_rank() == 0:
        print(f"StopRequest.agreed: {wall * 1e6:.0f} us wall, {cpu * 1e6:.0f} us CPU per step "
              f"({dist.get_world_size()} ranks, {backend} job, {calls} calls)")  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    _measure()
