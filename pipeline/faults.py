"""Fault injection for the crash tests: a process kills itself at a named event of a stage run.

Inert unless :data:`FAULT_ENV` is set; the executor and the stage context call :func:`fault_point`.
"""
from __future__ import annotations

import os
import signal
import sys

FAULT_ENV = "STEGOPIPE_FAULT_KILL_AT"
"""Fault-injection tests only (inert when unset): ``STAGE:EVENT:N[:SIGNAL]`` makes a process send itself
SIGKILL (or SIG<SIGNAL>, e.g. STOP) at the N-th ``EVENT`` of ``STAGE`` runs in it; events: ``start`` (the
stage begins, after its ``[run]`` line), ``shard`` (a shard marker was written) and ``publish`` (the files
are staged, the manifest is not yet written)."""
FAULT_ONCE_ENV = "STEGOPIPE_FAULT_ONCE"
"""With :data:`FAULT_ENV`: a file path; only the process that creates it fires (one fault per cluster)."""
_fault_counts: dict[tuple[str, str], int] = {}


def fault_point(stage: str, event: str) -> None:
    """Count an ``event`` of ``stage`` for the fault-injection hook (:data:`FAULT_ENV`); no-op when unset."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    want_stage, want_event, n, *sig = spec.split(":")
    if (want_stage, want_event) != (stage, event):
        return
    count = _fault_counts[stage, event] = _fault_counts.get((stage, event), 0) + 1
    if count != int(n):
        return
    once = os.environ.get(FAULT_ONCE_ENV)
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    name = f"SIG{sig[0] if sig else 'KILL'}"
    print(f"[fault] {name} at {spec} (pid {os.getpid()})", file=sys.stderr, flush=True)
    os.kill(os.getpid(), getattr(signal, name))
