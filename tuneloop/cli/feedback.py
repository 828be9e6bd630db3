"""``tuneloop emit / replay / ingest``: feedback in, through the producer SDK and the ingest flow."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from tuneloop.cli.common import console, err_console, fail, settings_of
from tuneloop.runtime.settings import Settings
from tuneloop.services.demo import banking77
from tuneloop.services.feedback.contract import InvalidEvent, parse_event
from tuneloop.services.feedback.producer import FeedbackProducer, FlushReport
from tuneloop.services.store.database import Store


def register(app: typer.Typer) -> None:
    app.command("emit")(emit)
    app.command("replay")(replay)
    app.command("ingest")(ingest)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>7.0f} ev/s"), TimeRemainingColumn(), console=console,
    )


def _report(report: FlushReport, settings: Settings) -> None:
    if report.complete:
        console.print(f"[green]delivered[/] {report.delivered:,} events to {settings.kafka.topic}")
    else:
        console.print(
            f"[yellow]{report.pending:,} events wait in the outbox[/] ({settings.outbox_path}); "
            "the broker is unreachable. They are sent, in order, by the next emit/replay "
            "or `tuneloop emit --drain`."
        )


def emit(
    ctx: typer.Context,
    file: Path | None = typer.Argument(None, help="JSONL file, one feedback event v1 per line."),
    drain: bool = typer.Option(False, "--drain", help="Only deliver what the outbox holds."),
    no_validate: bool = typer.Option(
        False, "--no-validate", help="Send lines as they are (ingest dead-letters bad ones)."
    ),
    timeout_s: float = typer.Option(30.0, "--timeout", help="Seconds to keep trying delivery."),
) -> None:
    """Send feedback events from a JSONL file."""
    settings = settings_of(ctx)
    if file is None and not drain:
        raise fail("give a JSONL file, or --drain to deliver the outbox")
    with FeedbackProducer(settings) as producer:
        if file is not None:
            if not file.exists():
                raise fail(f"{file}: no such file")
            lines = [ln for ln in file.read_bytes().splitlines() if ln.strip()]
            good: list[bytes] = []
            bad = 0
            for number, line in enumerate(lines, 1):
                try:
                    parse_event(line, settings.ingest.max_event_bytes)
                    good.append(line)
                except InvalidEvent as exc:
                    if no_validate:
                        good.append(line)
                        continue
                    bad += 1
                    err_console.print(f"[red]{file}:{number}[/] {exc.reason}")
            if no_validate:
                _send_raw(settings, good)
            else:
                producer.send_many(good)
            console.print(f"accepted {len(good):,} events" + (f", rejected {bad}" if bad else ""))
        report = producer.flush(timeout_s)
    _report(report, settings)
    if file is not None and not no_validate and bad:
        raise typer.Exit(1)


def _send_raw(settings: Settings, payloads: list[bytes]) -> None:
    """Bypass the SDK's validation, as an app that does not use it would."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")
    for payload in payloads:
        producer.send(settings.kafka.topic, value=payload)
    producer.flush()
    producer.close()


def replay(
    ctx: typer.Context,
    dataset: str = typer.Argument("banking77", help="Only banking77 is bundled."),
    rate: float = typer.Option(0, "--rate", help="Events per second; 0 = as fast as possible."),
    intents: str | None = typer.Option(None, "--intents", help="Comma-separated intents (default all)."),
    limit: int = typer.Option(2000, "--limit", help="How many events."),
    split: str = typer.Option("train", "--split", help="train or test."),
    accuracy: float = typer.Option(0.7, "--accuracy", help="Share of answers the bot gets right."),
    seed: int = typer.Option(0, "--seed"),
    pii_share: float = typer.Option(
        0.02, "--pii-share", help="Share of queries carrying an email, phone, card or IBAN."
    ),
) -> None:
    """Replay banking77 queries as realistic feedback events through the producer SDK."""
    if dataset != "banking77":
        raise fail(f"dataset {dataset!r}: only 'banking77' is bundled")
    settings = settings_of(ctx)
    wanted = [i.strip() for i in intents.split(",")] if intents else None
    if wanted:
        unknown = sorted(set(wanted) - set(banking77.intents()))
        if unknown:
            raise fail(f"unknown intents {unknown}; see {banking77.data_dir() / 'categories.json'}")
    queries = banking77.select(banking77.load(split), wanted, limit, seed=seed)
    # Events occur as they are sent: at the replay rate, or within a second for a burst.
    spacing = 1 / rate if rate else 1 / max(len(queries), 1)
    events = list(banking77.to_events(queries, accuracy=accuracy, seed=seed, spacing_s=spacing,
                                      app=settings.serving.alias, pii_share=pii_share))
    chunk = max(1, int(rate // 10)) if rate else 500
    with FeedbackProducer(settings) as producer, _progress() as progress:
        task = progress.add_task("replay banking77", total=len(events), rate=0.0)
        started = time.monotonic()
        for i in range(0, len(events), chunk):
            producer.send_many(events[i : i + chunk])
            producer.flush(timeout_s=0.5 if rate else settings.producer.delivery_timeout_s)
            sent = min(i + chunk, len(events))
            elapsed = time.monotonic() - started
            progress.update(task, completed=sent, rate=sent / elapsed if elapsed else 0.0)
            if rate:
                time.sleep(max(0.0, sent / rate - elapsed))
        report = producer.flush(settings.producer.delivery_timeout_s)
    _report(FlushReport(len(events) - report.pending, report.pending), settings)


def ingest(
    ctx: typer.Context,
    follow: bool = typer.Option(
        False, "--follow", help="Run as the stack's long-running ingest (what `tuneloop up` "
        "starts): one group membership, figures in `tuneloop status`, until SIGTERM."),
    max_batches: int | None = typer.Option(None, "--max-batches"),
) -> None:
    """Run the ingest flow: feedback.v1 -> validate -> redact -> DuckDB, then commit offsets."""
    if follow:
        import signal
        import threading

        from tuneloop.services.ingest.service import follow as follow_topic

        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        follow_topic(settings_of(ctx), stop)
        return
    from tuneloop.flows.ingest import ingest as ingest_flow

    stats = ingest_flow(max_batches=max_batches)
    console.print(
        f"ingested [bold]{stats['inserted']:,}[/] new events "
        f"({stats['polled']:,} polled, {stats['duplicates']:,} duplicates, "
        f"{stats['dead_letters']:,} dead letters, {stats['redactions']:,} PII spans redacted) "
        f"at {stats['events_per_s']:,.0f} events/s"
    )
    # The stack's long-running ingest may have landed events before this run got to them.
    counts = Store.of(settings_of(ctx)).counts()
    console.print(f"feedback holds {counts['feedback']:,} events; "
                  f"{counts['dead_letters']:,} dead letters")
