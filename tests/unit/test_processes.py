"""Pid files name one process: a live process that merely has the recorded pid is not it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tuneloop.runtime.processes import ManagedProcess

SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]


def _bystander() -> subprocess.Popen[bytes]:
    """An unrelated process in a session of its own, as the stack's services run."""
    return subprocess.Popen(SLEEP, start_new_session=True)


def test_a_started_process_is_recognised_and_stopped(tmp_path: Path) -> None:
    proc = ManagedProcess("svc", tmp_path)
    pid = proc.start(SLEEP)
    record = json.loads(proc.pid_file.read_text())
    assert record["pid"] == pid and record["started"] > 0 and record["cmdline"] == SLEEP
    assert proc.pid() == pid
    assert proc.start(SLEEP) == pid  # already running: not started twice
    assert proc.stop(timeout_s=5)
    assert proc.pid() is None and not proc.pid_file.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's /proc/stat boot time")
def test_a_step_of_the_wall_clock_leaves_a_service_itself(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A virtual machine's clock synchronised by a second: psutil gives every process's
    start on the wall clock (the kernel's ticks since boot plus ``/proc/stat``'s boot
    time), so that start moves with the clock. The service is the same process and must
    not be taken for gone (the gateway would start a second vLLM beside it)."""
    import psutil
    from psutil import _pslinux

    proc = ManagedProcess("svc", tmp_path)
    pid = proc.start(SLEEP)
    try:
        started = psutil.Process(pid).create_time()
        booted = _pslinux.boot_time()
        monkeypatch.setattr(_pslinux, "boot_time", lambda: booted + 1.0)  # the clock stepped
        assert psutil.Process(pid).create_time() == pytest.approx(started + 1.0)
        assert proc.pid() == pid
        assert proc.start(SLEEP) == pid  # not started twice
    finally:
        monkeypatch.undo()
        proc.stop(timeout_s=5)


def test_a_pid_reused_by_another_process_is_neither_trusted_nor_signalled(tmp_path: Path) -> None:
    """After a reboot the recorded pid can belong to anything: ``up`` must not skip the
    service and ``down`` must not signal that process's group."""
    bystander = _bystander()
    try:
        proc = ManagedProcess("svc", tmp_path)
        proc.pid_file.parent.mkdir(parents=True)
        # The pid file of a process that started an hour before this one, same pid.
        proc.pid_file.write_text(json.dumps({"pid": bystander.pid, "started": time.time() - 3600,
                                             "exe": sys.executable, "cmdline": SLEEP}))
        assert proc.pid() is None
        assert proc.stop(timeout_s=1) is False
        assert bystander.poll() is None, "the unrelated process was signalled"
        if sys.platform.startswith("linux"):
            # The form Linux writes: the start counted from boot, and the boot's id.
            from tuneloop.runtime.processes import _boot_id, _since_boot

            since_boot = _since_boot(bystander.pid)
            assert since_boot is not None
            import psutil

            record = {"pid": bystander.pid, "started": time.time(),
                      "exe": psutil.Process(bystander.pid).exe(),
                      "cmdline": SLEEP, "boot_id": _boot_id()}
            for other in ({"since_boot": since_boot - 3600},  # an earlier start
                          {"since_boot": since_boot, "boot_id": "another-boot"}):
                proc.pid_file.write_text(json.dumps(record | other))
                assert proc.pid() is None, other
            proc.pid_file.write_text(json.dumps(record | {"since_boot": since_boot}))
            assert proc.pid() == bystander.pid  # the very process: trusted
            proc.pid_file.unlink()
        new_pid = proc.start(SLEEP)
        assert new_pid != bystander.pid and proc.pid() == new_pid
        proc.stop(timeout_s=5)
    finally:
        bystander.kill()
        bystander.wait()


def test_a_bare_pid_file_from_before_the_process_is_stale(tmp_path: Path) -> None:
    """The older pid file (the pid alone) is trusted only for a process that started
    before it was written."""
    bystander = _bystander()
    try:
        proc = ManagedProcess("svc", tmp_path)
        proc.pid_file.parent.mkdir(parents=True)
        proc.pid_file.write_text(str(bystander.pid))
        assert proc.pid() == bystander.pid  # written after the process started
        an_hour_ago = time.time() - 3600
        os.utime(proc.pid_file, (an_hour_ago, an_hour_ago))  # as if written before a reboot
        assert proc.pid() is None
        assert proc.stop(timeout_s=1) is False
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_a_process_bound_to_cores_keeps_them_and_its_children_inherit_them(tmp_path: Path) -> None:
    """A CPU vLLM's engine-core process spins between steps: started with ``cpus``, the
    process and whatever it starts stay on those cores."""
    one = {min(os.sched_getaffinity(0))}
    script = ("import os, subprocess, sys, time; "
              "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              "print(sorted(os.sched_getaffinity(c.pid)), flush=True); time.sleep(60)")
    proc = ManagedProcess("bound", tmp_path)
    pid = proc.start([sys.executable, "-c", script], cpus=one)
    try:
        assert os.sched_getaffinity(pid) == one
        deadline = time.monotonic() + 30
        while not proc.tail().strip() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.tail().strip() == str(sorted(one))  # the child it started
    finally:
        proc.stop(timeout_s=5)


def test_work_pinned_to_cores_gives_them_back_afterwards() -> None:
    """Training in a long-lived process (a test session, an in-process flow) is bound to
    training.cpu_cores while it runs, and the process has all its cores back after."""
    from tuneloop.runtime.cpu import pinned

    before = os.sched_getaffinity(0)
    one = min(before)
    with pinned(str(one)) as n:
        assert n == 1 and os.sched_getaffinity(0) == {one}
    assert os.sched_getaffinity(0) == before


def test_a_cpu_machine_is_split_between_vllm_and_the_loop() -> None:
    from tuneloop.runtime.cpu import split_cores

    assert split_cores(1) is None
    assert split_cores(2) == ("0", "1")
    assert split_cores(3) == ("0", "1-2")
    assert split_cores(16) == ("0-7", "8-15")
