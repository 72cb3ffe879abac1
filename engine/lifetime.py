"""No process outlives the command that started it: helper processes (DALI workers, process pools)
ask the kernel to SIGKILL them when their parent dies, whatever killed it (SIGKILL and the OOM killer
included, which no handler or `finally` sees). Standard library only: prep/ and dali_pipes/ use it.

multiprocessing's resource tracker (started for spawned pools) needs nothing of its own: it exits when
the last process holding its pipe (the parent and the pool's children) is gone.
"""

from __future__ import annotations

import os
import signal
from typing import Any

_ARMED_PID = 0  # the process that has asked the kernel to kill it with its parent


def die_with_parent(parent_pid: int, ignore_sigint: bool = False) -> None:
    """In a helper process: have the kernel SIGKILL it when its parent dies (Linux prctl
    PR_SET_PDEATHSIG). Once per process; a parent already gone (it died before this ran) ends it now.

    `ignore_sigint`: Ctrl-C reaches the whole foreground process group; a helper that only serves its
    parent leaves the decision to it (the trainer checkpoints first, a prep tool keeps finished work)
    instead of dying with a KeyboardInterrupt traceback of its own."""
    global _ARMED_PID
    if _ARMED_PID == os.getpid():
        return
    _ARMED_PID = os.getpid()
    if ignore_sigint:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: no such call; the helpers' own checks remain
        return
    if os.getppid() != parent_pid:
        os._exit(1)


def pool_options(ignore_sigint: bool = True) -> dict[str, Any]:
    """ProcessPoolExecutor keyword arguments that make its workers die with this process (and, by
    default, leave Ctrl-C to it)."""
    return {"initializer": die_with_parent, "initargs": (os.getpid(), ignore_sigint)}
