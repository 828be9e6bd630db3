"""The root :class:`Settings` and :func:`load_settings`, which builds it from the
defaults, the TOML file, the environment and the CLI's overrides, and names any
unknown key with the nearest valid one.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from tuneloop.runtime.cache import user_cache_dir
from tuneloop.runtime.settings.lifecycle import (
    CanarySettings,
    LoopSettings,
    ServingSettings,
    TrainingSettings,
)
from tuneloop.runtime.settings.object_store import ObjectStoreSettings
from tuneloop.runtime.settings.sections import (
    CurationSettings,
    DriftSettings,
    EmbeddingSettings,
    IngestSettings,
    KafkaSettings,
    PrefectSettings,
    ProducerSettings,
    StoreSettings,
)
from tuneloop.runtime.settings.tasks import TaskSpec

CONFIG_ENV = "TUNELOOP_CONFIG"
DEFAULT_CONFIG_FILE = "tuneloop.toml"
ENV_PREFIX = "TUNELOOP_"
# Environment variables with tuneloop's prefix that are not settings.
NOT_SETTINGS = frozenset({CONFIG_ENV, "TUNELOOP_VLLM_GROUPED_LORA"})


class SettingsError(ValueError):
    """Unknown settings keys, each named with where it came from and the nearest valid key."""


class Settings(BaseSettings):
    """Everything a tuneloop process can be told."""

    model_config = SettingsConfigDict(
        env_prefix="TUNELOOP_", env_nested_delimiter="__", extra="forbid"
    )

    home: Path = Field(Path(".tuneloop"), description="State directory: DuckDB, logs, adapters.")
    log_level: str = "INFO"
    kafka: KafkaSettings = KafkaSettings()
    object_store: ObjectStoreSettings = ObjectStoreSettings()
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
    tasks: dict[str, TaskSpec] = Field(
        default_factory=dict, description="The task of each served alias ([tasks.<alias>]); "
        "an alias without one is a label task.")

    @field_validator("log_level")
    @classmethod
    def _check_level(cls, value: str) -> str:
        upper = value.upper()
        if upper not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError(f"log_level={value!r}: use DEBUG, INFO, WARNING or ERROR")
        return upper

    @model_validator(mode="after")
    def _resolve_broker_storage(self) -> Settings:
        """An unset kafka.storage_engine: the embedded broker keeps its log in the object
        store's bucket (nothing it acknowledged is lost when it stops); an external
        cluster keeps its own."""
        if self.kafka.storage_engine is None:
            self.kafka.storage_engine = (f"s3://{self.object_store.bucket}/"
                                         if self.kafka.embedded else "memory")
            self.kafka._engine_defaulted = True
        return self

    @model_validator(mode="after")
    def _check_tasks(self) -> Settings:
        unserved = sorted(set(self.tasks) - {self.serving.alias})
        if unserved:
            raise ValueError(
                f"tasks.{unserved[0]}: no alias of that name is served (serving.alias is "
                f"{self.serving.alias!r}); name the task after the served alias")
        return self

    @property
    def task(self) -> TaskSpec:
        """The served alias's task spec (a label task when none is given)."""
        return self.tasks.get(self.serving.alias) or TaskSpec()

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
    def object_store_dir(self) -> Path:
        """Where the embedded object store keeps its files."""
        return self.object_store.data_dir or self.home / "object-store"

    @property
    def adapters_dir(self) -> Path:
        return self.home / "adapters"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def models_dir(self) -> Path:
        return self.training.models_dir or user_cache_dir("models")


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
        made = Settings()
        base = made.model_dump()
        if made.kafka._engine_defaulted:  # resolved again from the merged settings
            base["kafka"]["storage_engine"] = None
        return Settings(**_deep_merge(base, nested))
    except ValidationError as exc:
        extra = [tuple(str(p) for p in e["loc"]) for e in exc.errors()
                 if e["type"] == "extra_forbidden"]
        if not extra:
            raise _without_secrets(exc) from None
        where = f"{os.environ.get(CONFIG_ENV, DEFAULT_CONFIG_FILE)} or the overrides"
        raise SettingsError("\n".join(_describe_unknown(path, where) for path in extra)) from None


# Sections whose input holds secrets: an error in them is shown without pydantic's copy
# of the input (the messages name the key and the fix).
_SECRET_SECTIONS = frozenset({"object_store", "store"})


def _without_secrets(exc: ValidationError) -> ValidationError:
    """``exc`` as it is, or with every error's message but no input when an error is in a
    section with secrets or is the whole model's (its input is every section). Each
    message is kept as pydantic wrote it, whatever its type."""
    from pydantic_core import PydanticCustomError

    errors = exc.errors()
    if not any(not e["loc"] or e["loc"][0] in _SECRET_SECTIONS for e in errors):
        return exc
    details: list[Any] = [{"type": PydanticCustomError(e["type"], e["msg"]), "loc": e["loc"],
                           "input": None} for e in errors]
    return ValidationError.from_exception_data(exc.title, details, hide_input=True)


def _environment_paths() -> list[tuple[str, tuple[str, ...]]]:
    """Every ``TUNELOOP_A__B`` variable as the settings path ``("a", "b")``."""
    return [(name, tuple(name[len(ENV_PREFIX):].lower().split("__")))
            for name in os.environ
            if name.startswith(ENV_PREFIX) and name not in NOT_SETTINGS]


# Sections keyed by a name of the user's (``tasks.<alias>``): the part after them is a key.
_KEYED: dict[tuple[str, ...], type[BaseModel]] = {("tasks",): TaskSpec}


def _section(path: tuple[str, ...]) -> type[BaseModel] | None:
    """The settings model at ``path`` (``()`` is the root), or None if there is none."""
    model: type[BaseModel] = Settings
    for depth, part in enumerate(path):
        keyed = _KEYED.get(path[:depth])
        if keyed is not None:  # ``part`` is the user's key
            model = keyed
            continue
        if path[: depth + 1] in _KEYED:  # the next part is a key
            continue
        field = model.model_fields.get(part)
        annotation = _model_of(field.annotation if field is not None else None)
        if annotation is None:
            return None
        model = annotation
    return model


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The settings model a field holds (``Section`` or ``Section | None``), or None."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


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
