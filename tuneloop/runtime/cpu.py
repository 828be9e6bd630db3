"""Keep tuneloop's own compute off the cores a CPU vLLM replica spins on.

On a CPU-only machine vLLM binds its OpenMP threads to some cores
(``serving.engine_cores``) and keeps them spinning while it serves. A training step
or an embedding batch whose threads share those cores waits at every parallel
barrier for a thread that barely runs: measured here, a 20-step LoRA run next to a
serving vLLM took minutes instead of about a minute. ``training.cpu_cores`` names the
cores tuneloop's training and embeddings use instead; :func:`pin` moves the whole
process (every thread) onto them and sizes torch's thread pool to match.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Collection, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


def parse_cores(spec: str) -> set[int]:
    """``"0-3,6"`` -> {0, 1, 2, 3, 6}; raises ``ValueError`` on anything else."""
    cores: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        first, _, last = part.partition("-")
        lo, hi = int(first), int(last or first)
        if lo < 0 or hi < lo:
            raise ValueError(f"bad core range {part!r} in {spec!r}")
        cores.update(range(lo, hi + 1))
    if not cores:
        raise ValueError(f"no cores in {spec!r}")
    return cores


def split_cores(cores: int) -> tuple[str, str] | None:
    """How a CPU machine of ``cores`` cores is shared when vLLM runs on it beside the loop:
    (``serving.engine_cores``, ``training.cpu_cores``), the first half and the rest; None
    for a single core."""
    if cores < 2:
        return None
    half = cores // 2

    def span(first: int, end: int) -> str:
        return str(first) if end - first == 1 else f"{first}-{end - 1}"

    return span(0, half), span(half, cores)


def bind(cpus: Collection[int], pid: int | None = None) -> None:
    """Bind every thread of process ``pid`` (None: this one) to ``cpus``; the threads and
    processes it starts later inherit that. A thread that ends meanwhile is passed over;
    any other refusal is logged and left."""
    if not hasattr(os, "sched_setaffinity"):
        return
    try:
        tasks = [int(t) for t in os.listdir(f"/proc/{'self' if pid is None else pid}/task")]
    except OSError:
        tasks = [0 if pid is None else pid]
    for task in tasks:
        try:
            os.sched_setaffinity(task, set(cpus))
        except ProcessLookupError:
            continue
        except OSError as exc:
            log.warning("could not bind thread %d to cores %s: %s", task, sorted(cpus), exc)


def pin(spec: str | None) -> int:
    """Bind this process to the cores in ``spec`` (None: leave it); returns how many it has."""
    if spec is None or not hasattr(os, "sched_setaffinity"):
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
    wanted = parse_cores(spec) & set(range(os.cpu_count() or 1))
    if not wanted:
        log.warning("training.cpu_cores=%r names no core of this machine; not pinning", spec)
        return len(os.sched_getaffinity(0))
    bind(wanted)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(len(wanted))
    return len(wanted)


@contextmanager
def pinned(spec: str | None) -> Iterator[int]:
    """:func:`pin` for the duration of the block; yields how many cores the process has.
    Afterwards the process has its cores (and torch its thread count) back: work that runs
    in a long-lived process (a test session, an in-process flow) is bound only while it
    runs."""
    if spec is None or not hasattr(os, "sched_getaffinity"):
        yield pin(spec)
        return
    before = os.sched_getaffinity(0)
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    try:
        yield pin(spec)
    finally:
        bind(before)
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(threads or len(before))
