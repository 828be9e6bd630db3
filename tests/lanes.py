"""``make test``: the suite in two lanes that run at once, then one exit status.

The end-to-end demo (tests marked ``own_lane``) runs its own stack and spends most of its
time waiting on simulated traffic, so it runs beside every other test instead of after
them. Every other test runs in one pytest session, in order, sharing that session's one
stack and one set of trained adapters. The demo lane's output is kept in
``.test-own-lane.log`` and printed after the main lane's.

    python -m tests.lanes [pytest arguments]
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

LOG = Path(".test-own-lane.log")


def main(args: list[str]) -> int:
    pytest = [sys.executable, "-m", "pytest", *args]
    with LOG.open("w") as log:
        own = subprocess.Popen([*pytest, "-m", "own_lane"], stdout=log, stderr=subprocess.STDOUT)
        try:
            main_lane = subprocess.run([*pytest, "-m", "not own_lane"]).returncode
        finally:
            own_lane = own.wait()
    print(f"\n{'=' * 30} the own lane (tests marked own_lane) {'=' * 30}", flush=True)
    print(LOG.read_text(errors="replace"), flush=True)
    # 5: no test selected (a run of paths without a demo test, say) is not a failure.
    failed = [(name, rc) for name, rc in (("main", main_lane), ("own", own_lane))
              if rc not in (0, 5)]
    for name, rc in failed:
        print(f"the {name} lane failed (pytest exit status {rc})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
