"""The terminal's log lines go to standard error: standard output is a command's own output
(``tuneloop status --json`` is read by programs), and a library's warning in the middle of
it once made that JSON unreadable."""

from __future__ import annotations

import subprocess
import sys


def test_log_lines_go_to_stderr_and_stdout_keeps_the_output() -> None:
    code = ("import json, logging; from tuneloop.runtime.logs import setup_logging; "
            "setup_logging('INFO'); logging.getLogger('kafka.net.selector').warning("
            "'Task ran for 0.110s'); logging.getLogger('tuneloop').info('started broker'); "
            "print(json.dumps({'counts': {'feedback': 400}}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env={"COLUMNS": "200", "PATH": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout == '{"counts": {"feedback": 400}}\n'
    assert "Task ran for 0.110s" in done.stderr and "started broker" in done.stderr
