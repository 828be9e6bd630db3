"""The answers the gateway served, kept on disk: what feedback and shadowing need of
them survives a gateway restart.

Each answer is written (SQLite, WAL, synchronous) before its client gets the last of it,
with the candidate that is to shadow it, if any. ``POST /v1/feedback`` finds an answer
here when the in-memory cache lost it (a restart); a new gateway runs again the shadow
comparisons its predecessor had not finished. Bounded like the cache, in answers and
bytes (``serving.response_cache``, ``serving.response_cache_bytes``), oldest first.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

from tuneloop.runtime.files import private_sqlite
from tuneloop.serving.gateway.answers import Served

_TRIM_EVERY = 500  # answers between two trims to the bounds


class ResponseStore:
    """Served answers by response id (and vLLM's own id), with pending shadow work."""

    def __init__(self, path: Path, max_answers: int, max_bytes: int) -> None:
        self._db = private_sqlite(path)  # users' words: the owner's alone
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS responses (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
            "response_id TEXT UNIQUE NOT NULL, upstream_id TEXT, served TEXT NOT NULL, "
            "nbytes INTEGER NOT NULL, shadow_candidate TEXT)")
        self._db.execute("CREATE INDEX IF NOT EXISTS responses_upstream ON responses(upstream_id)")
        # What each answer's user last said of it, and how many times they changed it.
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS verdicts (response_id TEXT NOT NULL, source TEXT NOT "
            "NULL, said TEXT NOT NULL, change INTEGER NOT NULL, PRIMARY KEY (response_id, "
            "source))")
        self._lock = threading.Lock()
        self.max_answers, self.max_bytes = max_answers, max_bytes
        self._since_trim = 0

    def put(self, served: Served, upstream_id: str | None, shadow_candidate: str | None) -> None:
        """Keep ``served`` (durable when this returns), and the candidate to shadow it."""
        record = asdict(served)
        record["occurred_at"] = served.occurred_at.isoformat()
        text = json.dumps(record)
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO responses (response_id, upstream_id, served, nbytes, "
                "shadow_candidate) VALUES (?, ?, ?, ?, ?)",
                (served.response_id, upstream_id, text, len(text), shadow_candidate))
            self._since_trim += 1
            if self._since_trim >= _TRIM_EVERY:
                self._trim()

    def get(self, key: str) -> Served | None:
        """The answer whose response id (or vLLM id) is ``key``; None when not kept."""
        with self._lock:
            row = self._db.execute(
                "SELECT served FROM responses WHERE response_id = ? OR upstream_id = ? "
                "ORDER BY seq DESC LIMIT 1", (key, key)).fetchone()
        return _served(row[0]) if row else None

    def shadow_done(self, response_id: str) -> None:
        with self._lock:
            self._db.execute("UPDATE responses SET shadow_candidate = NULL WHERE response_id = ?",
                             (response_id,))

    def last_verdict(self, response_id: str, source: str) -> tuple[str, int] | None:
        """What the user last said of ``response_id`` (``source``: a rating or correction,
        or a preference), and how many times they had changed it; None when never."""
        with self._lock:
            row = self._db.execute("SELECT said, change FROM verdicts WHERE response_id = ? AND "
                                   "source = ?", (response_id, source)).fetchone()
        return (str(row[0]), int(row[1])) if row else None

    def set_verdict(self, response_id: str, source: str, said: str, change: int) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO verdicts (response_id, source, said, change) "
                             "VALUES (?, ?, ?, ?)", (response_id, source, said, change))

    def pending_shadows(self) -> list[tuple[Served, str]]:
        """Answers whose shadow comparison never finished, oldest first, with the candidate."""
        with self._lock:
            rows = self._db.execute("SELECT served, shadow_candidate FROM responses WHERE "
                                    "shadow_candidate IS NOT NULL ORDER BY seq").fetchall()
        return [(_served(text), str(candidate)) for text, candidate in rows]

    def _trim(self) -> None:
        self._since_trim = 0
        self._db.execute("DELETE FROM responses WHERE seq <= (SELECT max(seq) FROM responses) - ?",
                         (self.max_answers,))
        total = self._db.execute("SELECT coalesce(sum(nbytes), 0) FROM responses").fetchone()[0]
        if total > self.max_bytes:
            # The oldest first, until what is left fits.
            self._db.execute(
                "DELETE FROM responses WHERE seq IN (SELECT seq FROM (SELECT seq, sum(nbytes) "
                "OVER (ORDER BY seq DESC) AS kept FROM responses) WHERE kept > ?)",
                (self.max_bytes,))
        self._db.execute("DELETE FROM verdicts WHERE response_id NOT IN (SELECT response_id "
                         "FROM responses)")

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _served(text: str) -> Served:
    record = json.loads(text)
    record["occurred_at"] = datetime.fromisoformat(record["occurred_at"])
    return Served(**record)
