"""``tuneloop demo``: the loop on the embedded stack, start to finish, with banking77 traffic.

Act 1, the service runs: customer queries from 20 intents arrive as feedback, land in
DuckDB, a golden set is pinned, a dataset version is curated and a LoRA adapter
trained on it and published as a candidate, then promoted by hand: the gateway loads it
into vLLM, flips the alias, and answers customer queries through the OpenAI-compatible
endpoint. Act 2, traffic changes: a fifth of the
queries now come from intents the bot has not seen, and the drift check says so,
naming the new intents. Each step is the same command an operator would type.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.rule import Rule

from services import banking77
from services.settings import Settings
from tuneloop.cli.common import console, fail, settings_of

REFERENCE_INTENTS = 20
NEW_INTENTS = 5


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


def _tuneloop(ctx: typer.Context, *args: str) -> None:
    """Run another tuneloop command in this process, with this invocation's root flags."""
    from tuneloop.cli.main import app

    root = ctx.find_root().params
    prefix: list[str] = []
    for flag, name in (("--config", "config"), ("--home", "home"),
                       ("--bootstrap-servers", "bootstrap_servers"), ("--log-level", "log_level")):
        if root.get(name) is not None:
            prefix += [flag, str(root[name])]
    try:
        app(prefix + list(args), standalone_mode=False)
    except SystemExit as exc:
        if exc.code:
            raise fail(f"`tuneloop {' '.join(args)}` failed (exit {exc.code})") from None


def demo(
    ctx: typer.Context,
    events: int = typer.Option(3000, "--events", help="Feedback events before the drift."),
    train_steps: int = typer.Option(40, "--train-steps", help="LoRA steps (CPU: a few s each)."),
) -> None:
    """Run the loop: stack up, feedback in, golden set, dataset, adapter, then a drift."""
    settings = settings_of(ctx)
    intents = banking77.intents()
    seen, unseen = intents[:REFERENCE_INTENTS], intents[REFERENCE_INTENTS:REFERENCE_INTENTS + NEW_INTENTS]

    console.print(Rule("1. embedded stack: tansu broker, Prefect server, worker, gateway + vLLM"))
    _tuneloop(ctx, "up")

    console.print(Rule(f"2. production feedback: {events:,} queries over {len(seen)} intents"))
    _tuneloop(ctx, "replay", "banking77", "--limit", str(events), "--intents", ",".join(seen),
              "--seed", "1")
    _tuneloop(ctx, "ingest")

    console.print(Rule("3. golden set, pinned and never trained on"))
    _tuneloop(ctx, "golden", "add", "--count", "200")

    console.print(Rule("4. curate a dataset version"))
    _tuneloop(ctx, "curate")
    version = _latest(settings.db_path, "datasets", "curation produced no dataset version")

    console.print(Rule(f"5. train a LoRA adapter on {version}"))
    import training

    config = Path(training.__file__).parent / "configs" / "demo.yaml"
    _tuneloop(ctx, "train", "--dataset", version, "--config", str(config),
              "--max-steps", str(train_steps))
    _tuneloop(ctx, "adapters", "list")

    adapter = _latest(settings.db_path, "adapters", "training published no adapter")
    console.print(Rule(f"6. serve {adapter}: hot-swap it in, answer customers through the gateway"))
    _tuneloop(ctx, "adapters", "promote", adapter, "--reason", "demo: first trained adapter")
    _ask_gateway(settings, [q.text for q in banking77.select(banking77.load("test"), seen, limit=4, seed=3)])

    console.print(Rule(f"7. traffic changes: {NEW_INTENTS} intents the adapter never saw arrive"))
    # Uniform over 25 intents: a fifth of the traffic comes from the 5 new ones.
    _tuneloop(ctx, "replay", "banking77", "--limit", "1000", "--intents", ",".join(seen + unseen),
              "--seed", "2", "--split", "test")
    _tuneloop(ctx, "ingest")

    console.print(Rule("8. drift check on the last 1,000 events"))
    _tuneloop(ctx, "drift", "--events", "1000")
    plot = Path(settings.home) / "drift.png"
    _tuneloop(ctx, "drift", "--plot", str(plot))
    console.print(f"new intents in this traffic: {', '.join(unseen)}")

    console.print(Rule("status"))
    _tuneloop(ctx, "status")
    console.print(f"Prefect UI: {settings.prefect.api_url.removesuffix('/api')} (flow runs); "
                  "`tuneloop down` stops the stack.")


def _ask_gateway(settings: Settings, queries: list[str]) -> None:
    """Customer queries through the OpenAI-compatible endpoint, as an app sends them."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{settings.serving.gateway_url}/v1", api_key="unused")
    for i, query in enumerate(queries):
        raw = client.chat.completions.with_raw_response.create(
            model=settings.serving.alias, messages=[{"role": "user", "content": query}],
            max_tokens=12, temperature=0, user=f"demo-customer-{i}")
        answer = raw.parse().choices[0].message.content
        console.print(f"  {query!r} -> {answer!r} "
                      f"[dim](adapter {raw.headers.get('x-tuneloop-adapter-version')})[/]")


def _latest(db_path: Path, table: str, missing: str) -> str:
    """The newest version in ``table`` (datasets or adapters); fails with ``missing``."""
    from services.store import Store

    with Store(db_path).connect() as con:
        rows = con.execute(f"SELECT version FROM {table} ORDER BY created_at DESC LIMIT 1").fetchall()
    if not rows:
        raise fail(missing)
    return str(rows[0][0])
