"""End to end on the bundled digits: the default gate passes clean data, fails 10 % noise,
a baseline accepts the noisy run, and one more flipped label fails it again."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from typer.testing import CliRunner

from influence_cli.cli import app


def test_digits_gate_end_to_end(tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["--set", f"output.dir={tmp_path / 'runs'}"]
    clean = runner.invoke(app, ["check", *base])
    assert clean.exit_code == 0, clean.output
    noisy_args = ["check", *base, "--set", "data.label_noise.fraction=0.1"]
    noisy = runner.invoke(app, [*noisy_args, "--write-baseline", str(tmp_path / "base.csv")])
    assert noisy.exit_code == 1, noisy.output
    flagged = pd.read_csv(tmp_path / "base.csv", dtype={"id": str})
    assert len(flagged) > 0.05 * 1437
    accepted = runner.invoke(app, [*noisy_args, "--baseline", str(tmp_path / "base.csv"), "--max-flagged", "0"])
    assert accepted.exit_code == 0, accepted.output
    # 145 of 1437 instead of 144: the same flips plus one more (training example id 591).
    one_more = ["check", *base, "--set", "data.label_noise.fraction=0.1009"]
    again = runner.invoke(app, [*one_more, "--baseline", str(tmp_path / "base.csv"), "--max-flagged", "0"])
    assert again.exit_code == 1, again.output
    offenders = pd.read_csv(tmp_path / "runs" / "digits-mlp" / "check.csv", dtype={"id": str})
    assert "591" in set(offenders["id"])
