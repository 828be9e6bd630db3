"""One typed settings object for every tuneloop process.

Precedence, lowest to highest: defaults, the TOML file (``tuneloop.toml`` in the
working directory, or the path in ``TUNELOOP_CONFIG``), environment variables
(``TUNELOOP_<SECTION>__<FIELD>``, e.g. ``TUNELOOP_KAFKA__BOOTSTRAP_SERVERS``),
then CLI flags passed to :func:`load_settings` as overrides. Each knob has one
name in all three places: ``kafka.bootstrap_servers`` in the file is
``TUNELOOP_KAFKA__BOOTSTRAP_SERVERS`` in the environment.

Settings are loaded once at the entry point and passed down; nothing else in the
code base reads ``os.environ`` for configuration. The sections live in
:mod:`.sections` (the data path) and :mod:`.lifecycle` (training, serving, the
canary, the loop); the root object and its loading in :mod:`.loader`.
"""

from tuneloop.runtime.settings.lifecycle import (
    CanarySettings,
    JudgeSettings,
    LoopSettings,
    ServingSettings,
    TrainingSettings,
)
from tuneloop.runtime.settings.loader import (
    CONFIG_ENV,
    DEFAULT_CONFIG_FILE,
    Settings,
    SettingsError,
    load_settings,
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
    Section,
    StoreSettings,
)
from tuneloop.runtime.settings.tasks import KINDS, TaskSpec, load_schema

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG_FILE",
    "CanarySettings",
    "CurationSettings",
    "DriftSettings",
    "EmbeddingSettings",
    "IngestSettings",
    "JudgeSettings",
    "KINDS",
    "KafkaSettings",
    "LoopSettings",
    "ObjectStoreSettings",
    "PrefectSettings",
    "ProducerSettings",
    "Section",
    "ServingSettings",
    "Settings",
    "SettingsError",
    "StoreSettings",
    "TaskSpec",
    "TrainingSettings",
    "load_schema",
    "load_settings",
]
