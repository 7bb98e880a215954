"""Two commands on one run directory at once take turns through runs/<name>/.lock.

Real concurrent processes: A takes the lock and is then stopped (SIGSTOP) so that the
overlap does not depend on timing; B and C start, say once that they wait for A's pid;
C is interrupted while waiting (exit 130, one line); A resumes; A and B both finish and
the outputs are complete and equal to those of a single run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fault_helpers import invoke, table_config, write_table

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 180


def start(config: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "influence_cli", "self-influence", "-c", str(config)],
            cwd=config.parent, env=env, stdout=subprocess.DEVNULL, stderr=stderr,
        )


def wait_until(condition, procs: list[subprocess.Popen], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        for proc in procs:
            if proc.poll() is not None:
                pytest.fail(f"a process exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_concurrent_commands_take_turns(tmp_path):
    table = write_table(tmp_path / "rows.csv")
    config = table_config(tmp_path, table, tmp_path / "runs")
    ref_config = table_config(tmp_path / "ref", table, tmp_path / "ref-runs")
    run = tmp_path / "runs" / "tiny"
    lock = run / ".lock"
    logs = {name: tmp_path / f"{name}.txt" for name in "abc"}
    a = start(config, logs["a"])
    procs = [a]
    try:
        wait_until(lambda: lock.is_file() and lock.read_text().strip() == str(a.pid), procs, "A takes the lock")
        os.kill(a.pid, signal.SIGSTOP)
        b, c = start(config, logs["b"]), start(config, logs["c"])
        procs += [b, c]
        waiting = f"waiting for another infl command using {run} (pid {a.pid}) ..."
        for name in "bc":
            wait_until(lambda: waiting in logs[name].read_text(), procs[1:], f"{name.upper()} says it waits")
        c.send_signal(signal.SIGINT)
        assert c.wait(timeout=TIMEOUT) == 130
        lines = [line for line in logs["c"].read_text().splitlines() if line.strip()]
        assert lines == [waiting, "interrupted: finished stages are kept; partial outputs were discarded"]
        assert b.poll() is None  # still waiting for A
        os.kill(a.pid, signal.SIGCONT)
        assert a.wait(timeout=TIMEOUT) == 0, logs["a"].read_text()
        assert b.wait(timeout=TIMEOUT) == 0, logs["b"].read_text()
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
    assert "waiting" not in logs["a"].read_text()
    b_text = logs["b"].read_text()
    assert b_text.count("waiting for another infl command") == 1 and "model: loaded checkpoint" in b_text
    # Complete and valid: the same files as one run on its own, nothing temporary left.
    assert invoke("self-influence", "-c", ref_config).exit_code == 0
    ref = tmp_path / "ref-runs" / "tiny"
    for name in ("checkpoint.safetensors", "self_influence.csv", "mislabels.csv", "factors/ekfac/factors.safetensors"):
        assert (run / name).read_bytes() == (ref / name).read_bytes(), name
    assert sorted(p.name for p in run.rglob(".*") if p.name != ".lock") == []
    again = invoke("fit-factors", "-c", config)
    assert again.exit_code == 0 and "reusing" in again.output


def test_lock_is_released_and_leftovers_of_killed_writers_are_swept(tmp_path):
    table = write_table(tmp_path / "rows.csv")
    config = table_config(tmp_path, table, tmp_path / "runs")
    run = tmp_path / "runs" / "tiny"
    (run / "factors").mkdir(parents=True)
    leftovers = [
        run / ".train.json.k2j4_x9a.tmp",  # run.atomic_path / report writers (mkstemp)
        run / ".tmpAb12Cd",  # safetensors' own temporary file
        run / "factors" / ".ekfac.tmp-4242-0123abcd",  # an unfinished factors directory
        run / "factors" / ".ekfac.old-89abcdef",
    ]
    for path in leftovers:
        if "factors" in path.parts:
            path.mkdir()
            (path / "factors.safetensors").write_bytes(b"partial")
        else:
            path.write_bytes(b"partial")
    kept = run / "notes.tmp.txt"
    kept.write_text("not ours")
    first = invoke("train", "-c", config)
    assert first.exit_code == 0, first.output
    assert [p for p in leftovers if p.exists()] == [] and kept.is_file()
    second = invoke("train", "-c", config)  # the same process again: the lock was released
    assert second.exit_code == 0 and "loaded checkpoint" in second.output


def test_config_commands_take_no_lock(tmp_path):
    runs = tmp_path / "runs"
    result = invoke("config", "show", "--set", f"output.dir={runs}")
    assert result.exit_code == 0, result.output
    assert not runs.exists()
