"""The stack the fault benchmark injects into, and the counts each fault is judged by.

``Bench`` starts the real stack (broker, Prefect server, worker, ingest, gateway with
vLLM) in a temporary home and counts what landed; ``Outcome`` is what one fault cost.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tuneloop.infra.supervisor import read_state
from tuneloop.runtime.cpu import split_cores
from tuneloop.runtime.processes import free_port, wait_until
from tuneloop.runtime.settings import Settings, load_settings
from tuneloop.services.demo import banking77
from tuneloop.services.feedback.contract import FeedbackEvent
from tuneloop.services.feedback.topics import topic_offsets
from tuneloop.services.store.database import Store


def say(text: str) -> None:
    print(text, flush=True)  # noqa: T201 - the bench's report


@contextmanager
def in_threads(work: Callable[[threading.Event, int], None], workers: int,
               join_s: float) -> Iterator[None]:
    """``workers`` threads running ``work(stop, index)`` while the block runs; ``stop`` is
    set when it ends, and each thread gets ``join_s`` to finish."""
    stop = threading.Event()
    threads = [threading.Thread(target=work, args=(stop, i), daemon=True)
               for i in range(workers)]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join(join_s)


@dataclass
class Outcome:
    """What one fault cost."""

    fault: str
    sent: int = 0
    stored: int = 0
    dead_lettered: int = 0
    duplicated: int = 0
    requests: int = 0
    retried: int = 0
    failed: int = 0
    recovered: bool = True
    detail: str = ""
    failures: list[str] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return max(0, self.sent - self.stored - self.dead_lettered)

    @property
    def survived(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and self.failed == 0 and self.recovered


class Bench:
    """The stack in a temporary home, and the counts the faults are judged by."""

    def __init__(self) -> None:
        from tuneloop.infra.stack import Stack

        self.home = Path(tempfile.mkdtemp(prefix="tuneloop-bench-faults-"))
        prefect = free_port()
        self.env = {
            "TUNELOOP_HOME": str(self.home),
            "TUNELOOP_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
            "TUNELOOP_PREFECT__PORT": str(prefect),
            "TUNELOOP_PREFECT__API_URL": f"http://127.0.0.1:{prefect}/api",
            "TUNELOOP_SERVING__GATEWAY_PORT": str(free_port()),
            "TUNELOOP_SERVING__VLLM_PORT": str(free_port()),
            "TUNELOOP_SERVING__ADMIN_KEY": "bench-admin-key",
            # The outbox gives a send up after this long and keeps the event for later.
            "TUNELOOP_PRODUCER__DELIVERY_TIMEOUT_S": "3",
            # The worker runs what the bench starts, nothing on its own.
            "TUNELOOP_LOOP__RETRAIN_ON_DRIFT": "false",
            "TUNELOOP_LOOP__CANARY_NEW_CANDIDATES": "false",
            "TUNELOOP_DRIFT__INTERVAL_S": "86400",
            # Every answer becomes a served event: the gateway-kill fault counts them.
            "TUNELOOP_SERVING__SAMPLE_REQUESTS": "1.0",
            # A live window the forged-feedback fault reaches a verdict in.
            "TUNELOOP_CANARY__WINDOW_S": "5",
            "TUNELOOP_CANARY__MIN_REQUESTS": "10",
            "TUNELOOP_CANARY__MIN_RATINGS": "10",
        }
        split = split_cores(os.cpu_count() or 1)
        if split is not None:
            # As in the demo: vLLM and training each on their own cores; spinning OpenMP
            # threads of a CPU vLLM otherwise starve the worker (tuneloop/runtime/cpu.py).
            self.env["TUNELOOP_SERVING__ENGINE_CORES"] = split[0]
            self.env["TUNELOOP_TRAINING__CPU_CORES"] = split[1]
        os.environ.update(self.env)
        self.settings: Settings = load_settings()
        self.stack = Stack(self.settings)
        self.store = Store(self.settings.db_path)

    def up(self) -> None:
        self.stack.up()

    def down(self) -> None:
        self.stack.down()
        shutil.rmtree(self.home, ignore_errors=True)

    # ------------------------------------------------------------------ counts
    def feedback_ids(self) -> list[str]:
        from tuneloop.services.ingest.store import landed_event_ids

        with self.store.connect() as con:
            return landed_event_ids(con)

    def stored(self) -> int:
        return self.store.counts()["feedback"]

    def dead_letters(self) -> int:
        return self.store.counts()["dead_letters"]

    def ingest_restarts(self) -> int:
        return int((read_state(self.home, "ingest") or {}).get("restarts", 0))

    def caught_up(self, timeout_s: float) -> bool:
        """True once ingest has committed every record on the feedback topic."""
        kafka = self.settings.kafka
        try:
            wait_until(lambda: all(p.lag == 0 for p in topic_offsets(
                kafka, kafka.topic, kafka.group_id)), timeout_s, "ingest", interval_s=1.0)
        except TimeoutError:
            return False
        return True

    def count(self, outcome: Outcome, ids: set[str], dead_before: int) -> None:
        """Stored and duplicated of ``ids``; dead letters written since ``dead_before``."""
        stored = [i for i in self.feedback_ids() if i in ids]
        outcome.stored = len(set(stored))
        outcome.duplicated = len(stored) - len(set(stored))
        outcome.dead_lettered = self.dead_letters() - dead_before

    def send_raw(self, payloads: list[bytes]) -> None:
        from kafka import KafkaProducer

        producer = KafkaProducer(bootstrap_servers=self.settings.kafka.bootstrap_servers,
                                 acks="all", linger_ms=5, max_request_size=4 * 1024 * 1024)
        for value in payloads:
            producer.send(self.settings.kafka.topic, value=value)
        producer.flush()
        producer.close()


def fault_events(n: int, seed: int) -> list[FeedbackEvent]:
    """``n`` banking77 feedback events with fresh ids, picked by ``seed``."""
    queries = banking77.load("train")
    picked = [queries[(seed * 7919 + i) % len(queries)] for i in range(n)]
    # Fresh ids: each fault's events are its own.
    return [e.model_copy(update={"event_id": uuid.uuid4()})
            for e in banking77.to_events(picked, seed=seed)]
