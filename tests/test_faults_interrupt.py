"""Interruptions: SIGINT and SIGKILL in the middle of fit-factors, self-influence and
evaluate --lds, delivered to real `infl` processes.

Each process runs a model (tests/fault_model.py) whose forward pass blocks at a chosen
stage and writes a marker file, so the signal lands in the middle of that stage however
loaded the machine is. After SIGINT the process must exit 130 with the one-line message
and leave no partial output; after SIGKILL nothing partial may be trusted; a final
uninterrupted run must give outputs identical to a run that was never interrupted.
The reference and the final runs go through typer's CliRunner in this process (cheaper
than a process start, and bit-for-bit the same outputs).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from influence_cli.cli import app

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
TIMEOUT = 180  # seconds; generous for a loaded machine, never reached when all is well
INTERRUPTED = "interrupted: finished stages are kept; partial outputs were discarded"

CONFIG = {
    "name": "gated",
    "seed": 0,
    "data": {"source": "synthetic", "synthetic": {"num_train": 300, "num_test": 40, "shape": [6], "num_classes": 3}},
    "model": {"arch": "factory", "factory": "fault_model:gated_mlp", "factory_path": str(TESTS)},
    "train": {"epochs": 3, "batch_size": 32, "device": "cpu"},
    "influence": {"batch_size": 16, "device": "cpu", "strategy": "ekfac"},  # interrupts the ekfac passes
}
LDS_ARGS = ["evaluate", "--lds", "--subsets", "3", "--test-rows", "10", "-s", "ekfac"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run: checkpoint, ekfac factors, self-influence CSVs, LDS."""
    root = tmp_path_factory.mktemp("reference")
    config = root / "gated.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "output": {"dir": str(root / "runs")}}))
    for args in (["self-influence"], LDS_ARGS):
        result = CliRunner().invoke(app, [*args, "-c", str(config)])
        assert result.exit_code == 0, result.output
    return root / "runs" / "gated"


def fresh_run(tmp_path: Path, reference: Path, *, factors: bool) -> tuple[Path, Path]:
    """A config and a run directory holding the reference checkpoint (and factors)."""
    run = tmp_path / "runs" / "gated"
    run.mkdir(parents=True)
    for name in ("checkpoint.safetensors", "train.json"):
        shutil.copy(reference / name, run / name)
    if factors:
        shutil.copytree(reference / "factors", run / "factors")
    config = tmp_path / "gated.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "output": {"dir": str(tmp_path / "runs")}}))
    return config, run


def start(args: list[str], config: Path, gate: dict | None = None) -> tuple[subprocess.Popen, Path]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("INFL_TEST_GATE", None)
    if gate is not None:
        env["INFL_TEST_GATE"] = json.dumps(gate)
    log = config.parent / f"stderr-{time.monotonic_ns()}.txt"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "influence_cli", *args, "-c", str(config)],
            cwd=config.parent, env=env, stdout=subprocess.DEVNULL, stderr=stderr,
        )
    return proc, log


def wait_for_marker(proc: subprocess.Popen, marker: Path, log: Path) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"infl exited ({proc.returncode}) before reaching the gate:\n{log.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"infl never reached the gate:\n{log.read_text()}")
        time.sleep(0.02)


def interrupted_run(args: list[str], config: Path, gate: dict, sig: int) -> str:
    """Start infl, wait until it blocks at the gate, send ``sig``; returns its stderr."""
    marker = config.parent / f"blocked-{time.monotonic_ns()}"
    proc, log = start(args, config, {**gate, "marker": str(marker)})
    wait_for_marker(proc, marker, log)
    proc.send_signal(sig)
    try:
        code = proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"infl did not stop after signal {sig}:\n{log.read_text()}")
    text = log.read_text()
    if sig == signal.SIGINT:
        assert code == 130, text
        lines = [line for line in text.splitlines() if line.strip()]
        assert lines[-1] == INTERRUPTED, text
        assert sum("interrupted" in line for line in lines) == 1
        assert "Traceback" not in text
    else:
        assert code == -sig, text
    return text


def finish(args: list[str], config: Path) -> str:
    """The rerun, in this process (the outputs are the same as in a subprocess; the
    reference run is made the same way)."""
    assert "INFL_TEST_GATE" not in os.environ
    result = CliRunner().invoke(app, [*args, "-c", str(config)])
    assert result.exit_code == 0, result.output
    return result.output


def temporaries(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if ".tmp" in p.name or ".old" in p.name)


def assert_same_factors(run: Path, reference: Path) -> None:
    from safetensors.torch import load_file

    ours = load_file(str(run / "factors" / "ekfac" / "factors.safetensors"))
    theirs = load_file(str(reference / "factors" / "ekfac" / "factors.safetensors"))
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    meta = json.loads((run / "factors" / "ekfac" / "meta.json").read_text())
    ref_meta = json.loads((reference / "factors" / "ekfac" / "meta.json").read_text())
    assert meta["tensors_sha256"] == ref_meta["tensors_sha256"]
    timing = {"fit_seconds", "meta_sha256"}
    assert {k: v for k, v in meta.items() if k not in timing} == {k: v for k, v in ref_meta.items() if k not in timing}


def test_fit_factors_survives_sigint_and_sigkill(tmp_path, reference):
    config, run = fresh_run(tmp_path, reference, factors=False)
    gate = {"stage": "influence", "after_calls": 3}  # a few batches into pass 1
    interrupted_run(["fit-factors"], config, gate, signal.SIGINT)
    assert not (run / "factors" / "ekfac").exists()
    assert temporaries(run) == []
    interrupted_run(["fit-factors"], config, gate, signal.SIGKILL)
    assert not (run / "factors" / "ekfac").exists()
    text = finish(["fit-factors"], config)
    assert "fitted ekfac" in text
    assert_same_factors(run, reference)
    assert temporaries(run) == []


def test_self_influence_survives_sigint_and_sigkill(tmp_path, reference):
    config, run = fresh_run(tmp_path, reference, factors=False)
    # Fitting the factors is a finished stage by the time scoring blocks: it is kept.
    gate = {"stage": "influence", "after_file": str(run / "factors" / "ekfac" / "meta.json"), "after_calls": 2}
    interrupted_run(["self-influence"], config, gate, signal.SIGINT)
    assert_same_factors(run, reference)
    assert not (run / "self_influence.csv").exists() and not (run / "mislabels.csv").exists()
    assert temporaries(run) == []
    interrupted_run(["self-influence"], config, gate, signal.SIGKILL)
    assert not (run / "self_influence.csv").exists()
    meta = (run / "factors" / "ekfac" / "meta.json").read_bytes()
    finish(["self-influence"], config)
    assert (run / "factors" / "ekfac" / "meta.json").read_bytes() == meta  # reused, not refitted
    for name in ("self_influence.csv", "mislabels.csv"):
        assert (run / name).read_bytes() == (reference / name).read_bytes(), name
    assert temporaries(run) == []


def lds_cache(run: Path) -> dict[str, list[float]]:
    out = {}
    for path in sorted((run / "lds").glob("*.json")):
        out[path.name] = json.loads(path.read_text())["values"]
    return out


def test_evaluate_lds_survives_sigint_and_sigkill(tmp_path, reference):
    config, run = fresh_run(tmp_path, reference, factors=True)
    cache = str(run / "lds" / "*.json")
    # SIGINT while the second retraining trains, SIGKILL while the third does.
    interrupted_run(LDS_ARGS, config, {"stage": "train", "after_file": cache, "count": 1}, signal.SIGINT)
    assert len(lds_cache(run)) == 1 and not (run / "lds.json").exists()
    interrupted_run(LDS_ARGS, config, {"stage": "train", "after_file": cache, "count": 2}, signal.SIGKILL)
    assert len(lds_cache(run)) == 2 and not (run / "lds.json").exists()
    finish(LDS_ARGS, config)
    ours, theirs = json.loads((run / "lds.json").read_text()), json.loads((reference / "lds.json").read_text())
    assert ours["retraining"]["reused"] == 2 and ours["retraining"]["trained_now"] == 1
    for key in ("mean", "stderr", "rows"):
        assert ours["strategies"]["ekfac"][key] == theirs["strategies"]["ekfac"][key]
    assert lds_cache(run) == lds_cache(reference)
    assert temporaries(run) == []

