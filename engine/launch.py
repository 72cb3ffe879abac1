"""`python -m engine.launch [torchrun options] train.py CONFIG ...`: torchrun, quiet on preemption.

torchrun forwards SIGTERM to its workers (train.py then checkpoints at the next step and exits 0) but
ends itself with a SignalException traceback, which reads like a crash in the job log. This entry point
runs torchrun's own `main` unchanged and turns that exception into one line and rc 128 + signal. It also
gives the workers 120 s (not torchrun's 30) to reach the step boundary and write the checkpoint before
torchrun SIGKILLs them; TORCH_ELASTIC_SHUTDOWN_TIMEOUT overrides it.
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "120")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main()
    except SignalException as e:
        print(
            f"launcher: got signal {int(e.sigval)}; the workers were told to checkpoint at their next step "
            "(continue with --resume auto)",
            file=sys.stderr,
        )
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
