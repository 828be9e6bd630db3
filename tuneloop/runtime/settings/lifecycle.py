"""The settings sections of the model's lifecycle: training, serving (the gateway and
its vLLM replicas), the canary and the unattended loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from tuneloop.runtime.settings.sections import Section


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
        "defaults to tuneloop/training/configs/smollm2_lora.yaml.",
    )
    models_dir: Path | None = Field(
        None,
        description="Where converted base models are kept, shared by every home on the "
        "machine (named by the hash of their source); default: ~/.cache/tuneloop/models.",
    )
    device: str = Field("auto", description="'auto' (CUDA when present, else CPU), 'cpu', 'cuda'.")
    objective: Literal["sft", "dpo", "sft+dpo"] | None = Field(
        None, description="sft (the examples), dpo (the dataset's preference pairs: each "
        "correction over the answer it corrected) or sft+dpo (SFT, then DPO on the same "
        "adapter); None: the recipe config's (sft unless it says otherwise).")
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
        None, description="CPU only, one replica: the cores its model threads bind "
        "(VLLM_CPU_OMP_THREADS_BIND, e.g. '0-1'), and its own processes with them; "
        "default: vLLM's choice, which leaves one core to its API server and the gateway."
    )
    grouped_lora: bool = Field(
        True, description="CPU only: tuneloop's vLLM plugin multiplies each adapter's tokens "
        "at once instead of copying a weight matrix per token."
    )
    start_timeout_s: float = Field(300.0, gt=0, description="A replica not healthy by then is restarted.")
    health_interval_s: float = Field(1.0, gt=0)
    upstream_timeout_s: float = Field(
        300.0, gt=0, description="Longest wait for vLLM's first byte (a whole answer, unless "
        "streamed); past it the client gets a 504 and the replica stays in rotation.")
    upstream_connect_timeout_s: float = Field(
        2.0, gt=0, description="Connecting to a replica; a replica not reached is taken out "
        "of rotation and the request goes to another (nothing was done yet).")
    upstream_idle_timeout_s: float = Field(
        60.0, gt=0, description="Longest silence inside a streamed answer before it ends "
        "with an error event.")
    # A secret: it prints as '**********' (repr, str, logs, JSON dumps); only
    # serving.control.admin_key reads its value, for the gateway and its clients.
    admin_key: SecretStr | None = Field(
        None, description="API key of the admin routes; default: a random key in <home>/gateway.key."
    )
    vllm_api_key: SecretStr | None = Field(
        None, description="API key of the vLLM replicas' /v1 routes (runtime LoRA load and "
        "unload among them); default: a random key in <home>/vllm.key, which managed replicas "
        "get; start external replicas (serving.replica_urls) with the same key.")
    event_key: SecretStr | None = Field(
        None, description="Key the gateway signs the feedback events it makes with, and the "
        "canary checks them by (only signed verdicts are counted); default: a random key in "
        "<home>/event.key.")
    feedback_per_minute: int = Field(
        60, ge=1, description="Verdicts a user may post to /v1/feedback a minute; more: 429.")
    user_id_key: SecretStr | None = Field(
        None, description="Key of the keyed hash (HMAC-SHA256) that stands for a client's "
        "'user' in feedback; default: a random key in <home>/user-id.key."
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
    reconcile_s: float = Field(
        60.0, ge=0, description="How often the gateway checks its route against the registry "
        "(the source of truth) and swaps to it when they differ; a route set by hand stands "
        "this long first. 0: never.")
    response_cache_bytes: int = Field(
        256 * 2**20, ge=2**20, description="...and at most this many bytes of them (request "
        "and answer), the oldest dropped first.")
    max_body_bytes: int = Field(
        2**20, ge=1024, description="Largest request body the public routes read; larger: 413.")
    max_json_depth: int = Field(
        32, ge=4, le=500, description="Deepest nesting of a request's JSON; deeper: 400.")
    max_tokens: int = Field(
        4096, ge=1, description="Largest max_tokens / max_completion_tokens a request may ask.")
    max_n: int = Field(4, ge=1, description="Most choices (n, best_of) a request may ask.")
    cors_origins: list[str] = Field(
        default_factory=list, description="Origins a browser may call the public routes from "
        "(CORS); none by default, so other sites' pages cannot read the answers.")
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


class JudgeSettings(Section):
    """A model that compares two answers side by side (``[canary.judge]``)."""

    url: str = Field(..., min_length=1, description="Base URL of an OpenAI-compatible API "
                     "(e.g. http://judge:8000/v1).")
    model: str = Field(..., min_length=1, description="The judge model's name there.")
    api_key: SecretStr | None = Field(None, description="Its API key, if it wants one.")
    max_pairs: int = Field(200, ge=1, description="Pairs judged per look at most (each asked "
                           "twice, the order swapped).")
    concurrency: int = Field(8, ge=1, description="Judge requests in flight.")
    timeout_s: float = Field(120.0, gt=0)


class CanarySettings(Section):
    """How a candidate adapter earns production traffic (``tuneloop canary``)."""

    alpha: float = Field(0.05, gt=0, lt=1, description="Significance level of every gate test.")
    golden_margin: float = Field(
        0.05, ge=0, le=1,
        description="Largest drop of the task's golden score (macro-F1, field F1 or chrF, "
        "all on 0-1) that is not a regression.",
    )
    label_margin: float = Field(
        0.2, ge=0, le=1, description="A label whose golden F1 drops more is tested on its own."
    )
    bootstrap_resamples: int = Field(2000, ge=100)
    seed: int = 0
    judge: JudgeSettings | None = Field(
        None, description="text tasks: a judge model that compares the candidate's and the "
        "incumbent's answers side by side; its wins decide the improvement (sign test). "
        "None: the reference scores decide.")
    eval_concurrency: int = Field(16, ge=1, description="Offline-gate requests in flight.")
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
    max_ratings_per_user: int = Field(
        1, ge=0, description="Ratings one user adds to the live window at most (0: no cap). "
        "Users are what the canary splits (sticky buckets), so each is one voice: one client "
        "rating everything cannot outweigh the others.")
    bad_rating_below: float = Field(
        0.0, ge=-1, le=1, description="A rating below this counts as a bad answer."
    )
    max_p95_ratio: float = Field(
        1.5, ge=1, description="Candidate p95 latency over production's that fails the gate "
        "(a text alias must also be slower per output token)."
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
        description="Freeze promotions when production's golden score (the task's) falls "
        "this far below its value at promotion.",
    )
    freeze_min_score: float | None = Field(
        None, ge=0, le=1, description="Also freeze below this golden score (the task's)."
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
