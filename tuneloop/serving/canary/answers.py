"""Both versions' answers for the offline gate, cached in DuckDB by weights."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence

from tuneloop.runtime.settings import Settings
from tuneloop.services.canary import store as canary_store
from tuneloop.services.canary.core import Paired
from tuneloop.services.curation.core import Example
from tuneloop.services.registry.artifacts import MANIFEST, WEIGHTS
from tuneloop.services.registry.core import Adapter
from tuneloop.services.registry.remote import local_files
from tuneloop.services.registry.store import get_adapter
from tuneloop.services.store.database import Store
from tuneloop.serving.admin_chat import ask, model_name

log = logging.getLogger(__name__)


def model_key(settings: Settings, adapter: Adapter | None) -> str:
    """What decides a version's answers: its weights' and config's sha256, or the base model.

    Raises ``OSError`` or ``KeyError`` when the adapter's manifest is missing or lacks
    its weights.
    """
    if adapter is None:
        return f"base:{settings.training.base_model}"
    manifest = json.loads((local_files(adapter, settings) / MANIFEST).read_text())
    files = manifest["files"]
    return f"lora:{files[WEIGHTS]}:{files.get('adapter_config.json', '')}"


def answers(settings: Settings, version: str | None, examples: Sequence[Example]) -> list[str]:
    """``version``'s greedy answers to each example's prompt (None: the base model).

    Answers already given by the same weights are read from the cache, the rest asked
    through the gateway and cached. The version must be loaded on the gateway
    (``GatewayAdmin.load``) unless it is the base model. Raises
    :class:`tuneloop.serving.control.GatewayError` when the gateway fails.
    """
    store = Store.of(settings)
    max_tokens = settings.task.max_answer_tokens
    prompts = [ex.messages[:-1] for ex in examples]
    keys = [canary_store.example_key(p, max_tokens) for p in prompts]
    with store.connect() as con:
        key = model_key(settings, get_adapter(con, version) if version is not None else None)
        if (fmt := settings.task.response_format()) is not None:
            # Answers decoded under a schema are another model's: a new schema asks again.
            key += ":schema:" + hashlib.sha256(json.dumps(fmt, sort_keys=True).encode()
                                               ).hexdigest()[:16]
        known = canary_store.cached_answers(con, key, keys)
    missing = {k: p for k, p in zip(keys, prompts, strict=True) if k not in known}
    if missing:
        started = time.perf_counter()
        fresh = ask(settings, model_name(settings, version), missing)
        log.info("evaluated %s on %d prompts in %.1fs (%d cached)", version or "base",
                 len(missing), time.perf_counter() - started, len(known))
        with store.connect() as con:
            canary_store.save_answers(con, key, fresh)
        known.update(fresh)
    return [known[k] for k in keys]


def paired(settings: Settings, candidate: str, incumbent: str | None,
           examples: Sequence[Example]) -> Paired:
    """Both versions' answers to ``examples``, to be judged as the served alias's task
    asks; nothing is asked when there are none."""
    task = settings.task
    if not examples:
        return Paired([], [], [], [], task.kind, task.schema_document)
    return Paired(references=[ex.completion for ex in examples],
                  labels=[ex.label for ex in examples],
                  incumbent=answers(settings, incumbent, examples),
                  candidate=answers(settings, candidate, examples),
                  kind=task.kind, schema=task.schema_document)
