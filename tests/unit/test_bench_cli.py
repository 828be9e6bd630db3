"""``tuneloop bench``'s options reach only the benchmarks that take them."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from tuneloop.cli.main import app


@pytest.mark.parametrize("args", [
    ["bench", "ingest", "--seed", "1"],
    ["bench", "canary", "--task", "label", "--data", "."],
])
def test_options_a_benchmark_does_not_take_are_refused(tmp_path: Path, args: list[str]) -> None:
    result = CliRunner().invoke(app, ["--home", str(tmp_path), *args])
    assert result.exit_code != 0
    assert "is for bench canary --task json|text" in result.output
