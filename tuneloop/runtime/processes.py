"""Background processes of the embedded stack: start detached, record a pid file, stop.

Each component runs in its own session (``start_new_session``) so it outlives
the ``tuneloop up`` that started it, with stdout/stderr in ``<home>/logs``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from tuneloop.runtime.cpu import bind
from tuneloop.runtime.files import write_json_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ManagedProcess:
    """A named background process with its pid file and log under ``home``."""

    name: str
    home: Path

    @property
    def pid_file(self) -> Path:
        return self.home / "run" / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.home / "logs" / f"{self.name}.log"

    def pid(self) -> int | None:
        """The recorded pid if that very process is still alive: the pid file records the
        process's start time and executable, and a live process with the same pid but
        another start time (the pid reused after a reboot, say) is not it. The start time
        compared is the one counted from the machine's boot: the same process's start on
        the wall clock moves when that clock is stepped (a virtual machine's clock
        synchronised), and a service taken for gone would be started a second time beside
        itself. A pid file of the older form (the pid alone) is trusted only for a process
        that started before the file was written."""
        record = self._record()
        if record is None:
            return None
        pid = int(record["pid"])
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                _reap(pid)
                return None
            started, exe = proc.create_time(), _exe(proc)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return None
        except psutil.AccessDenied:
            return None
        if "started" not in record:  # the pid alone
            if started > self.pid_file.stat().st_mtime + 1.0:
                log.warning("%s: pid %d in %s belongs to a process started after the file "
                            "was written; not %s", self.name, pid, self.pid_file, self.name)
                return None
            return pid
        if not _alive(proc):  # ended (a zombie) since the first look
            _reap(pid)
            return None
        since_boot = _since_boot(pid)
        if "since_boot" in record and since_boot is not None:
            # Another boot (the pid reused after a reboot) or another start is another one.
            boot = _boot_id()
            moved = (float("inf") if record.get("boot_id", boot) != boot
                     else abs(since_boot - float(record["since_boot"])))
        else:  # not Linux, or a file of the form before
            moved = abs(started - float(record["started"]))
        # An executable that cannot be read (a process on its way out) is not another one:
        # the start time tells them apart.
        if moved > 0.05 or (exe and exe != record.get("exe", exe)):
            log.warning("%s: pid %d in %s is now another process (%s); the file is stale",
                        self.name, pid, self.pid_file, " ".join(_cmdline(proc))[:120])
            return None
        return pid

    def _record(self) -> dict[str, Any] | None:
        try:
            text = self.pid_file.read_text().strip()
        except FileNotFoundError:
            return None
        try:
            record = json.loads(text)
        except ValueError:
            return None
        if isinstance(record, int):
            return {"pid": record}
        if isinstance(record, dict) and isinstance(record.get("pid"), int):
            return record
        return None

    def start(self, argv: Sequence[str], env: Mapping[str, str] | None = None,
              cpus: Collection[int] | None = None, cwd: Path | None = None) -> int:
        """Start detached unless already running; returns the pid. ``cpus``: the cores the
        process, and every thread and process it starts, may run on (None: any); ``cwd``:
        its working directory (None: this one's)."""
        running = self.pid()
        if running is not None:
            return running
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as out:
            proc = subprocess.Popen(
                list(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                cwd=cwd,
                start_new_session=True,
            )
        if cpus:
            # Right after the start, before the new interpreter has started anything.
            bind(cpus, proc.pid)
        self._write_record(proc.pid)
        log.info("started %s pid=%d (log %s)", self.name, proc.pid, self.log_file)
        return proc.pid

    def _write_record(self, pid: int) -> None:
        """The pid file: the pid, and who that process is (start time, executable, command
        line), so that a later reader can tell it from another process with the same pid."""
        record: dict[str, Any] = {"pid": pid}
        try:
            proc = psutil.Process(pid)
            record.update(started=proc.create_time(), exe=_exe(proc), cmdline=_cmdline(proc))
            # Popen returns once the exec has begun, and the new program's command line
            # can read empty for a moment after (the exec is still setting it up).
            deadline = time.monotonic() + 1.0
            while not record["cmdline"] and time.monotonic() < deadline and _alive(proc):
                time.sleep(0.01)
                record["cmdline"] = _cmdline(proc)
            since_boot = _since_boot(pid)
            if since_boot is not None:
                record["since_boot"] = since_boot
                if (boot := _boot_id()) is not None:
                    record["boot_id"] = boot
        except psutil.Error:
            pass  # already gone: the record holds the pid alone, and pid() finds it dead
        write_json_atomic(self.pid_file, record)

    def stop(self, timeout_s: float = 15.0, sig: int = signal.SIGTERM) -> bool:
        """Stop the process group; SIGKILL after ``timeout_s``. True if one was running."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        _signal_group(pid, sig)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.pid() is not None:
            time.sleep(0.1)
        if self.pid() is not None:
            _signal_group(pid, signal.SIGKILL)
            while self.pid() is not None:
                time.sleep(0.05)
        self.pid_file.unlink(missing_ok=True)
        log.info("stopped %s pid=%d", self.name, pid)
        return True

    def tail(self, lines: int = 20) -> str:
        return log_tail(self.log_file, lines)


def log_tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of the log at ``path`` ("" when there is none)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


def _since_boot(pid: int) -> float | None:
    """When process ``pid`` started, in seconds since the machine booted, on Linux (None
    elsewhere, or when it cannot be read). The kernel counts it in clock ticks since boot
    (``/proc/<pid>/stat``, field 22); psutil's start time adds the boot time on the wall
    clock, which moves with every step of that clock (a virtual machine's clock set
    right), and this does not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        # Fields 3 onwards follow the command name, which may hold spaces and brackets.
        return int(stat[stat.rindex(")") + 2:].split()[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _boot_id() -> str | None:
    """This boot's random id (Linux): a pid file from another boot names nothing alive."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _exe(proc: psutil.Process) -> str:
    try:
        return str(proc.exe())
    except psutil.AccessDenied:
        return ""


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return list(proc.cmdline())
    except psutil.Error:  # not ours to read, or it just ended
        return []


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _reap(pid: int) -> None:
    """Collect a zombie child of this process, if it is one."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def wait_until(check: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.2) -> None:
    """Poll ``check`` until true; raises TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval_s)
    raise TimeoutError(f"{what} not ready after {timeout_s:.0f}s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(pid: int) -> list[psutil.Process]:
    """Every process below ``pid`` now (children, theirs, ...), whatever their session."""
    try:
        return list(psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        return []


def processes_of_home(home: Path) -> list[psutil.Process]:
    """Processes started for the tuneloop home ``home`` (``TUNELOOP_HOME`` in their
    environment), other than this process and its ancestors."""
    want = str(Path(home).resolve())
    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found = []
    for proc in psutil.process_iter():
        if proc.pid in mine:
            continue
        try:
            if proc.environ().get("TUNELOOP_HOME") == want:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def end_processes(procs: Sequence[psutil.Process], timeout_s: float = 10.0) -> int:
    """SIGTERM each of ``procs`` still alive, SIGKILL those left after ``timeout_s``;
    returns how many were alive."""
    alive = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                proc.terminate()
                alive.append(proc)
    _, left = psutil.wait_procs(alive, timeout=timeout_s)
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(left, timeout=5)
    return len(alive)
