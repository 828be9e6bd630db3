"""``tuneloop bench scale``: the loop as separate machines run it, with no shared disk.

It runs ``tuneloop demo --split`` (the default scenario: bootstrap, steady traffic, a
shift to intents the adapter never saw) in a process of its own, where every role has a
home of its own (``tuneloop.infra.split``): the control worker, a training worker on its
own work pool, two ingest workers, the gateway with two vLLM replicas, and the operator
(the demo's driver), meeting only through Kafka, Postgres, the object store and HTTP.
Meanwhile this process:

- sends a numbered stream of feedback events of its own (the producer SDK) from the
  shift on, and SIGKILLs one ingest worker (its supervisor with it: the machine is gone)
  in the middle of it; at the end it counts those events in the store, exactly:
  ``scale_lost_events`` (sent and acknowledged, not stored) and
  ``scale_duplicated_events`` (stored more than once);
- SIGKILLs the training worker once the shift's retrain has a checkpoint in the object
  store, and starts a replacement training worker in a new, empty home (another
  machine): the run is marked Crashed when its heartbeats stop, submitted again, and
  goes on from the checkpoint in the object store;
- lists every open file of every role's processes every two seconds:
  ``scale_shared_paths`` counts the files two roles both opened. The installation
  (the virtualenvs, the checkout's code, the system's files) is left out: each machine
  has its own copy of it.

``scale_promoted`` is 1 when the loop promoted a new version after the shift and both
vLLM replicas serve it, loaded from the object store through their own caches. There is
no baseline: the figures are counts, judged against zero and one.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import psutil
import pyarrow as pa

from tuneloop.bench.ingest import machine
from tuneloop.infra.split import Split
from tuneloop.runtime.settings import CONFIG_ENV, Settings, load_settings
from tuneloop.services.demo import banking77

STREAM_RATE = 20.0  # events/s of the numbered stream
STREAM_S = 90.0  # how long it runs; the kill comes a third of the way in
DEMO_TIMEOUT_S = 3 * 3600


def say(text: str) -> None:
    print(text, flush=True)  # noqa: T201 - the bench's report


class OpenFiles:
    """Which role opened which file, sampled from /proc every ``interval_s``."""

    def __init__(self, roles_dir: Path, operator_home: Path, interval_s: float = 2.0) -> None:
        self.roles_dir = roles_dir.resolve()
        self.operator_home = operator_home.resolve()
        self.interval_s = interval_s
        self.opened: dict[str, set[str]] = defaultdict(set)
        self.samples = 0
        self.stop = threading.Event()
        self.installed = tuple(str(Path(p).resolve()) for p in (
            sys.prefix, Path(sys.prefix).parent / ".venv-vllm",
            Path(__file__).resolve().parents[1], "/usr", "/lib", "/etc", "/opt", "/bin",
            "/proc", "/sys", "/dev", "/run/postgresql", "/var/lib/postgresql"))

    def role_of(self, proc: psutil.Process) -> str | None:
        try:
            home = proc.environ().get("TUNELOOP_HOME")
            name = " ".join(proc.cmdline()[:3])
        except psutil.Error:
            return None
        if home is None:
            return None
        path = Path(home).resolve()
        if path.parent == self.roles_dir:
            return path.name
        if path == self.operator_home:
            # The external services were started from the operator's process, with its
            # environment: they are not a role.
            if any(s in name for s in ("postgres", "weed", "tansu", "prefect server",
                                      "uvicorn", "prefect.server")):
                return None
            return "operator"
        return None

    def run(self) -> None:
        while not self.stop.wait(self.interval_s):
            self.samples += 1
            for proc in psutil.process_iter():
                role = self.role_of(proc)
                if role is None:
                    continue
                try:
                    files = [f.path for f in proc.open_files()]
                except psutil.Error:
                    continue
                for path in files:
                    if not path.startswith(self.installed):
                        self.opened[path].add(role)

    def shared(self) -> dict[str, list[str]]:
        """Every file two roles opened (a replaced training worker's two homes count as
        one role: ``train`` and ``train-2`` are the same role on two machines)."""
        out = {}
        for path, roles in self.opened.items():
            kinds = {r.split("-")[0] if r.startswith("train") else r for r in roles}
            if len(kinds) > 1:
                out[path] = sorted(roles)
        return out


class NumberedStream:
    """Feedback events with known ids, sent through the producer SDK from a home of its
    own (the production app)."""

    def __init__(self, settings: Settings, home: Path) -> None:
        from tuneloop.services.demo.scenario import SMALL, plan

        self.settings = load_settings({"home": home})
        self.sent: list[str] = []
        self.stop = threading.Event()
        # The demo's own shifted traffic (its default plan, seed 0), as the app's labelled
        # feedback: more of what the shift sends, not other intents the loop would learn.
        self.queries = plan(SMALL, banking77.intents(), banking77.load("train"),
                            banking77.load("test"), 0).shifted

    def run(self) -> None:
        from tuneloop.services.feedback.producer import FeedbackProducer

        events = banking77.to_events(self.queries * 20, app=self.settings.serving.alias,
                                     seed=7, accuracy=0.0, spacing_s=0.05)
        with FeedbackProducer(self.settings) as producer:
            for event in events:
                if self.stop.wait(1.0 / STREAM_RATE):
                    break
                self.sent.append(producer.send(event))
            report = producer.flush(300)
        if not report.complete:
            say(f"the stream's producer still holds {report.pending} events in its outbox")


def _pids_of(role_home: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("TUNELOOP_HOME") == str(role_home):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def kill_role(role_home: Path) -> int:
    """SIGKILL every process of a role (its machine is gone); returns how many."""
    procs = _pids_of(role_home)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGKILL)
    return len(procs)


def main(settings: Settings | None = None, quick: bool = False) -> None:
    base = Path(tempfile.mkdtemp(prefix="tuneloop-scale-"))
    base.chmod(0o755)  # the postgres user runs the store's server when the bench runs as root
    operator = base / "demo"
    say(f"bench scale: {machine()}; homes under {base}")
    env = {**os.environ, "XDG_CACHE_HOME": str(base / "operator-cache")}
    env.pop(CONFIG_ENV, None)
    env.pop("TUNELOOP_HOME", None)
    with (base / "demo.log").open("w") as log:  # the demo holds its own copy
        demo = subprocess.Popen([sys.executable, "-m", "tuneloop.cli.main", "--home", str(base),
                                 "demo", "--split"], stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    files = OpenFiles(operator / "roles", operator)
    threading.Thread(target=files.run, daemon=True).start()
    notes: dict[str, Any] = {}
    try:
        _drive(base, operator, demo, notes)
        code = demo.wait(timeout=DEMO_TIMEOUT_S)
        notes["demo_exit"] = code
        promoted = _promoted_on_both(operator, notes)
    finally:
        files.stop.set()
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGINT)
            demo.wait(120)
        down_env = {**env, CONFIG_ENV: str(operator / "demo.toml")}
        subprocess.run([sys.executable, "-m", "tuneloop.cli.main", "--home", str(operator),
                        "down"], env=down_env, check=False, timeout=300)
    shared = files.shared()
    (base / "shared-paths.json").write_text(json.dumps(shared, indent=2))
    say(f"open files sampled {files.samples} times over {len(files.opened)} paths; shared: "
        f"{len(shared)}" + "".join(f"\n  {p}: {r}" for p, r in list(shared.items())[:20]))
    say(json.dumps(notes, indent=2, default=str))
    say(f"FIGURE scale_promoted={int(promoted)}")
    say(f"FIGURE scale_lost_events={notes.get('lost', 'nan')}")
    say(f"FIGURE scale_duplicated_events={notes.get('duplicated', 'nan')}")
    say(f"FIGURE scale_shared_paths={len(shared)}")


def _drive(base: Path, operator: Path, demo: subprocess.Popen[bytes],
           notes: dict[str, Any]) -> None:
    """Wait for the shift, then the stream and its ingest kill, and the training kill."""
    log = base / "demo.log"
    if not _wait_for_line(log, "3. shift", demo):
        raise RuntimeError(f"the demo ended before its shift; see {log}")
    os.environ[CONFIG_ENV] = str(operator / "demo.toml")
    settings = load_settings({"home": operator})
    split = Split(settings)
    stream = NumberedStream(settings, base / "app")
    sender = threading.Thread(target=stream.run)
    trainer = threading.Thread(target=_kill_training, args=(split, settings, notes))
    sender.start()
    trainer.start()
    time.sleep(STREAM_S / 3)
    notes["ingest_killed_processes"] = kill_role(split.role_home("ingest-1"))
    notes["ingest_killed_after_events"] = len(stream.sent)
    say(f"killed ingest-1 after {len(stream.sent)} events of the stream")
    time.sleep(2 * STREAM_S / 3)
    stream.stop.set()
    sender.join()
    _count(settings, stream.sent, notes)
    trainer.join()


def _kill_training(split: Split, settings: Settings, notes: dict[str, Any]) -> None:
    """Once the shift's retrain has a checkpoint in the object store, kill the training
    worker and start a replacement in a new home. A failure here is kept in the notes
    printed before the figures (``training_kill_error``; the run goes on)."""
    try:
        _kill_training_once_checkpointed(split, settings, notes)
    except Exception as exc:  # noqa: BLE001 - reported in the figures' notes
        notes["training_kill_error"] = f"{type(exc).__name__}: {exc}"
        say(f"the training worker's kill failed: {notes['training_kill_error']}")


def _kill_training_once_checkpointed(split: Split, settings: Settings,
                                     notes: dict[str, Any]) -> None:
    from tuneloop.runtime.s3 import s3_client

    client = s3_client(settings.object_store)
    bucket = settings.object_store.bucket
    known = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="runs/").get(
        "Contents", []) if o["Key"].endswith("LATEST.json")}
    deadline = time.monotonic() + 3600
    while time.monotonic() < deadline:
        latest = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="runs/").get(
            "Contents", []) if o["Key"].endswith("LATEST.json") and o["Key"] not in known]
        if latest:
            record = json.loads(client.get_object(Bucket=bucket, Key=latest[0])["Body"].read())
            notes["training_killed_at_step"] = record["step"]
            notes["training_run"] = latest[0].split("/")[1]
            notes["training_killed_processes"] = kill_role(split.role_home("train"))
            say(f"killed the training worker at step {record['step']} of "
                f"{notes['training_run']}; a replacement starts in a new home")
            split.start_train_worker("train-2")
            return
        time.sleep(2)
    notes["training_killed_at_step"] = None


def _count(settings: Settings, sent: list[str], notes: dict[str, Any],
           timeout_s: float = 600) -> None:
    """The stream's events in the store, once the remaining ingest worker landed them."""
    from tuneloop.services.store.database import Store

    store = Store.of(settings, 60)
    deadline = time.monotonic() + timeout_s
    found = rows = dead = 0
    while time.monotonic() < deadline:
        with store.connect() as con:
            con.register("stream_ids", pa.table({"event_id": sent}))
            rows, found = con.execute(
                "SELECT count(*), count(DISTINCT f.event_id) FROM feedback f "
                "JOIN stream_ids s USING (event_id)").fetchone() or (0, 0)
            dead = (con.execute("SELECT count(*) FROM dead_letters d JOIN stream_ids s "
                                "ON d.event_id = s.event_id").fetchone() or (0,))[0]
        if found + dead >= len(set(sent)):
            break
        time.sleep(5)
    notes |= {"stream_sent": len(sent), "stream_stored": found, "stream_dead_letters": dead,
              "lost": len(set(sent)) - found - dead, "duplicated": rows - found}


def _promoted_on_both(operator: Path, notes: dict[str, Any]) -> bool:
    """The demo promoted after the shift, and both replicas serve that version."""
    report = operator / "reports" / "demo.json"
    if not report.exists():
        notes["promoted"] = "no demo report"
        return False
    result = json.loads(report.read_text())
    version = result.get("promoted_version")
    notes |= {"promoted_version": version, "shift_to_promotion_s":
              result.get("shift_to_promotion_s"), "new_macro_f1":
              (result.get("after") or {}).get("new intents", {}).get("macro_f1"),
              "served_failures": result.get("served_failures")}
    if not version:
        return False
    table = tomllib.loads((operator / "demo.toml").read_text())
    key = table["serving"]["vllm_api_key"]
    gateway = load_settings({"home": operator / "roles" / "gateway"})
    alias = gateway.serving.alias
    roots = []
    for url in gateway.serving.upstream_urls():
        models = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"},
                           timeout=30).json()["data"]
        roots.append(next((m["root"] for m in models if m["id"] == f"{alias}-{version}"), None))
    notes["replica_roots"] = roots
    return len(roots) == 2 and all(r is not None and r.startswith("s3://") for r in roots)


def _wait_for_line(log: Path, text: str, demo: subprocess.Popen[bytes]) -> bool:
    while demo.poll() is None:
        if text in log.read_text(errors="replace"):
            return True
        time.sleep(2)
    return False
