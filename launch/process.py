"""What every dinrec process does at its start and its end, whatever launched it."""

from __future__ import annotations

import logging
import os
import sys
import warnings


def quiet_libraries() -> None:
    """Keep library chatter (planner tables, deprecation notes) off the user's terminal."""
    warnings.filterwarnings("ignore")
    for name in ("torchrec", "torch.distributed", "torch.fx", "fbgemm_gpu", ""):
        logging.getLogger(name).setLevel(logging.ERROR)


def exit_now(code: int) -> None:
    """Exit with `code` without the interpreter's finalization. A process that used a gloo
    process group can abort there ("terminate called without an active exception"): gloo's
    threads may still hold tensors when the interpreter tears down, even after
    destroy_process_group. Everything is written and closed by then; only stdout and stderr need
    flushing."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
