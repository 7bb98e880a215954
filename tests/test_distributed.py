"""Scale-out: torchrun with 2 gloo CPU processes, --shard i/n + infl merge, OOM back-off, amp.

The torchrun runs are real subprocesses on 127.0.0.1 (a free port chosen here); they
reuse the single run's checkpoint so both fit factors for the very same weights.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from influence_cli.cli import app
from influence_cli.distributed import parse_shard, shard_range

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).with_name("torchrun")
TOL = 1e-5

CONFIG = {
    "name": "tiny-dist",
    "seed": 0,
    "data": {"source": "synthetic", "synthetic": {"num_train": 203, "num_test": 20, "shape": [12], "num_classes": 4}},
    "model": {"arch": "mlp", "hidden_sizes": [16]},
    "train": {"epochs": 3, "batch_size": 32},
    "influence": {"batch_size": 32},
}


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(a)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli(*args: str) -> object:
    result = CliRunner().invoke(app, list(args))
    return result


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One single-process run: trained checkpoint, factors, self-influence, scores."""
    root = tmp_path_factory.mktemp("dist")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    (root / "rows.csv").write_text("index\n" + "\n".join(str(i) for i in range(6)) + "\n")
    out = root / "single"
    for args in (["self-influence"], ["score", str(root / "rows.csv"), "--top", "5"]):
        result = cli(*args, "-c", str(config), "--set", f"output.dir={out}")
        assert result.exit_code == 0, result.output
    return root


def copy_model(root: Path, name: str) -> str:
    """A fresh run directory holding only the single run's checkpoint."""
    target = root / name / "tiny-dist"
    target.mkdir(parents=True)
    for f in ("checkpoint.safetensors", "train.json"):
        shutil.copy(root / "single" / "tiny-dist" / f, target / f)
    return str(root / name)


def eigenvalues(run: Path) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    tensors = load_file(str(run / "factors" / "ekfac" / "factors.safetensors"))
    return {k: v.double().numpy() for k, v in tensors.items() if k.endswith("::eigenvalues")}


def compare_runs(a: Path, b: Path) -> None:
    ea, eb = eigenvalues(a), eigenvalues(b)
    assert ea.keys() == eb.keys()
    for key in ea:
        assert rel(ea[key], eb[key]) <= TOL, key
    meta_a = json.loads((a / "factors" / "ekfac" / "meta.json").read_text())
    meta_b = json.loads((b / "factors" / "ekfac" / "meta.json").read_text())
    assert meta_a["num_examples"] == meta_b["num_examples"] == 203
    si_a = pd.read_csv(a / "self_influence.csv").sort_values("index")
    si_b = pd.read_csv(b / "self_influence.csv").sort_values("index")
    assert list(si_a["id"]) == list(si_b["id"])
    values_a, values_b = si_a["self_influence"].to_numpy(), si_b["self_influence"].to_numpy()
    assert np.max(np.abs(values_a - values_b) / np.abs(values_a)) <= TOL
    assert list(si_a["flagged"]) == list(si_b["flagged"])


def compare_scores(a: Path, b: Path) -> None:
    sa = pd.read_csv(a / "scores" / "rows.csv")
    sb = pd.read_csv(b / "scores" / "rows.csv")
    assert len(sa) == len(sb) > 0
    key = ["test_id", "role", "rank"]
    sa, sb = sa.sort_values(key).reset_index(drop=True), sb.sort_values(key).reset_index(drop=True)
    assert list(sa["train_index"]) == list(sb["train_index"])
    assert rel(sa["influence"].to_numpy(), sb["influence"].to_numpy()) <= TOL


def test_shard_range_is_a_disjoint_cover():
    for n in (1, 7, 203):
        for world in range(1, min(n, 5) + 1):
            blocks = [shard_range(n, r, world) for r in range(world)]
            assert blocks[0][0] == 0 and blocks[-1][1] == n
            assert all(b[0][1] == b[1][0] for b in zip(blocks, blocks[1:]))
            sizes = [hi - lo for lo, hi in blocks]
            assert max(sizes) - min(sizes) <= 1
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "x", "-1/2", "1/0"):
        with pytest.raises(ValueError):
            parse_shard(bad)


def test_fisher_labels_do_not_depend_on_batching():
    """Labels are drawn per (seed, example index): any batching/sharding gives one fit."""
    from influence_cli.engine import fit_factors

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    x = torch.randn(30, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (30,))

    def loader(size):
        return [(x[i : i + size], y[i : i + size], torch.arange(i, min(i + size, 30))) for i in range(0, 30, size)]

    a = fit_factors(model, loader(4), "ekfac", dtype=torch.float64, seed=3)
    b = fit_factors(model, loader(11), "ekfac", dtype=torch.float64, seed=3)
    for name in a.layers:
        torch.testing.assert_close(a.layers[name].eigenvalues, b.layers[name].eigenvalues, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to this python")
def test_torchrun_two_gloo_processes_match_single_process(single):
    root = single
    out = copy_model(root, "torchrun")
    env = dict(os.environ, PYTHONPATH=str(ROOT), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    for args in (["self-influence"], ["score", str(root / "rows.csv"), "--top", "5"]):
        cmd = [
            str(TORCHRUN), "--nproc_per_node", "2", "--nnodes", "1", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), "-m", "influence_cli", *args,
            "-c", str(root / "tiny.yaml"), "--set", f"output.dir={out}",
        ]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        # Only rank 0 prints its summary line.
        assert proc.stderr.count("203 examples" if args[0] == "self-influence" else "test rows scored") == 1
    compare_runs(root / "single" / "tiny-dist", Path(out) / "tiny-dist")
    compare_scores(root / "single" / "tiny-dist", Path(out) / "tiny-dist")


def test_shards_and_merge_equal_the_single_run_and_refuse_missing_or_stale(single):
    root = single
    out = copy_model(root, "shards")
    common = ["-c", str(root / "tiny.yaml"), "--set", f"output.dir={out}"]
    run = Path(out) / "tiny-dist"

    # Factors: pass-1 shards, merge (bases), pass-2 shards, merge (factors).
    for _round in range(2):
        for i in (0, 1):
            result = cli("fit-factors", "--shard", f"{i}/2", *common)
            assert result.exit_code == 0, result.output
        result = cli("merge", *common)
        assert result.exit_code == 0, result.output
    assert (run / "factors" / "ekfac" / "meta.json").is_file()
    for i in (0, 1):
        assert cli("self-influence", "--shard", f"{i}/2", *common).exit_code == 0
        result = cli("score", str(root / "rows.csv"), "--top", "5", "--shard", f"{i}/2", *common)
        assert result.exit_code == 0, result.output
    result = cli("merge", *common)
    assert result.exit_code == 0, result.output
    compare_runs(root / "single" / "tiny-dist", run)
    compare_scores(root / "single" / "tiny-dist", run)

    # A missing shard: one line naming the file and the command to run.
    missing = run / "shards" / "self-influence-ekfac" / "1-of-2.safetensors"
    saved = missing.read_bytes()
    missing.unlink()
    result = cli("merge", "--stage", "self-influence-ekfac", *common)
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "missing shard" in lines[0] and "1-of-2.safetensors" in lines[0]
    assert "--shard 1/2" in lines[0]
    missing.write_bytes(saved)

    # A stale shard: the model was retrained after the shards were written.
    result = cli("merge", "--stage", "self-influence-ekfac", *common, "--set", "train.epochs=4")
    assert result.exit_code == 2
    assert "the data, model or train settings of the config changed; retraining" in " ".join(result.output.split())
    lines = [line for line in result.output.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "stale shard" in lines[0] and "0-of-2.safetensors" in lines[0], result.output


def test_a_shard_session_runs_the_normal_stages_on_its_block(single):
    """Session.shard: the library calls the same stages as a single run; each shard job
    scores only its block, writes a shard file and no final output, and refuses ensembles."""
    from safetensors.torch import load_file

    from influence_cli.app import Session, Shard, run_score, run_self_influence
    from influence_cli.app.shards import ShardResult
    from influence_cli.config import load_config
    from influence_cli.errors import ShardError
    from influence_cli.progress import Reporter

    out = copy_model(single, "session-shard")
    shutil.copytree(single / "single" / "tiny-dist" / "factors", Path(out) / "tiny-dist" / "factors")
    config = load_config(str(single / "tiny.yaml"), [f"output.dir={out}"])
    blocks = []
    for i in range(3):
        lo, hi = shard_range(203, i, 3)
        result = run_self_influence(Session(config, Reporter(), shard=Shard(i, 3)))
        assert isinstance(result, ShardResult) and result.path.parent.name == "self-influence-ekfac"
        blocks.append(load_file(str(result.path))["self_influence"])
        assert len(blocks[-1]) == hi - lo
        result = run_score(Session(config, Reporter(), shard=Shard(i, 3)), single / "rows.csv", top=5)
        indices = load_file(str(result.path))["proponent_indices"]
        assert bool(((indices >= lo) & (indices < hi)).all())  # global indices of this block only
    run = Path(out) / "tiny-dist"
    assert not (run / "self_influence.csv").exists() and not (run / "scores").exists()
    reference = pd.read_csv(single / "single" / "tiny-dist" / "self_influence.csv").sort_values("index")
    assert rel(torch.cat(blocks).numpy(), reference["self_influence"].to_numpy()) <= TOL
    ensemble = load_config(str(single / "tiny.yaml"), [f"output.dir={out}", "influence.ensemble=2"])
    with pytest.raises(ShardError, match="cannot be combined with --shard"):
        Session(ensemble, Reporter(), shard=Shard(0, 2))


def test_out_of_memory_halves_the_batch_and_retries(single, monkeypatch):
    from influence_cli.config import load_config
    from influence_cli.engine import scoring as scores_module
    from influence_cli.app import Session, run_self_influence
    from influence_cli.progress import Reporter

    class Recorder(Reporter):
        def __init__(self):
            self.warnings = []

        def warn(self, message):
            self.warnings.append(message)

    real = scores_module.self_influence
    sizes = []

    def flaky(model, factors, loader, **kwargs):
        sizes.append(loader.batch_size)
        if loader.batch_size > 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, factors, loader, **kwargs)

    monkeypatch.setattr(scores_module, "self_influence", flaky)
    out = copy_model(single, "oom")
    shutil.copytree(single / "single" / "tiny-dist" / "factors", Path(out) / "tiny-dist" / "factors")
    reporter = Recorder()
    config = load_config(str(single / "tiny.yaml"), [f"output.dir={out}"])
    result = run_self_influence(Session(config, reporter))
    assert sizes == [32, 16, 8]
    assert reporter.warnings == [
        "self-influence: out of memory; retrying with batch size 16",
        "self-influence: out of memory; retrying with batch size 8",
    ]
    reference = pd.read_csv(single / "single" / "tiny-dist" / "self_influence.csv").sort_values("index")
    values = result.table.sort_values("index")["self_influence"].to_numpy()
    assert np.max(np.abs(values - reference["self_influence"].to_numpy()) / values) <= TOL


def test_amp_autocast_runs_on_cpu_and_is_part_of_the_hash():
    from influence_cli.config import load_config
    from influence_cli.engine import fit_factors, self_influence
    from influence_cli.run import influence_hash

    plain = load_config(None, [])
    amp = load_config(None, ["influence.amp=bfloat16"])
    assert influence_hash(plain, "ekfac", "f") != influence_hash(amp, "ekfac", "f")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    loader = [(x[i : i + 10], y[i : i + 10], torch.arange(i, i + 10)) for i in range(0, 40, 10)]
    full = fit_factors(model, loader, "ekfac")
    half = fit_factors(model, loader, "ekfac", amp="bfloat16")
    for name, layer in half.layers.items():
        assert layer.eigenvalues.dtype == torch.float32
        assert rel(full.layers[name].eigenvalues.numpy(), layer.eigenvalues.numpy()) < 0.1
    s_full = self_influence(model, full, loader)
    s_half = self_influence(model, half, loader, amp="bfloat16")
    assert s_half.dtype == torch.float32
    assert np.corrcoef(s_full.numpy(), s_half.numpy())[0, 1] > 0.95


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to this python")
def test_torchrun_ensemble_and_exact_match_single_process(tmp_path):
    """Ensemble members and the dense solver under torchrun: each member's scores are
    gathered over the ranks; exact is fitted once on rank 0 and loaded by the others."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "influence": {"batch_size": 32, "ensemble": 2}}))
    env = dict(os.environ, PYTHONPATH=str(ROOT), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    for strategy in ("ekfac", "exact"):
        single = tmp_path / f"single-{strategy}"
        result = cli("self-influence", "-c", str(config), "-s", strategy, "--set", f"output.dir={single}")
        assert result.exit_code == 0, result.output
        dist = tmp_path / f"dist-{strategy}"
        for member in ("", "ensemble/member-1/"):  # the same trained weights for both runs
            target = dist / "tiny-dist" / member
            target.mkdir(parents=True, exist_ok=True)
            for name in ("checkpoint.safetensors", "train.json"):
                shutil.copy(single / "tiny-dist" / member / name, target / name)
        cmd = [
            str(TORCHRUN), "--nproc_per_node", "2", "--nnodes", "1", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), "-m", "influence_cli", "self-influence", "-s", strategy,
            "-c", str(config), "--set", f"output.dir={dist}",
        ]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        a = pd.read_csv(single / "tiny-dist" / "self_influence.csv").sort_values("index")
        b = pd.read_csv(dist / "tiny-dist" / "self_influence.csv").sort_values("index")
        assert rel(a["self_influence"].to_numpy(), b["self_influence"].to_numpy()) <= TOL, strategy
        assert list(a["predicted"]) == list(b["predicted"])


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to this python")
def test_torchrun_lds_deals_out_the_retrainings(tmp_path):
    """evaluate --lds under torchrun: every retraining runs once, on one rank; the result
    equals the single-process one."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    args = ["evaluate", "--lds", "--subsets", "6", "--test-rows", "5", "-s", "ekfac", "-c", str(config)]
    single = tmp_path / "single"
    result = cli(*args, "--set", f"output.dir={single}")
    assert result.exit_code == 0, result.output
    dist = tmp_path / "dist"
    target = dist / "tiny-dist"
    target.mkdir(parents=True)
    for name in ("checkpoint.safetensors", "train.json"):
        shutil.copy(single / "tiny-dist" / name, target / name)
    env = dict(os.environ, PYTHONPATH=str(ROOT), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    cmd = [
        str(TORCHRUN), "--nproc_per_node", "2", "--nnodes", "1", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), "-m", "influence_cli", *args, "--set", f"output.dir={dist}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = json.loads((single / "tiny-dist" / "lds.json").read_text())
    b = json.loads((target / "lds.json").read_text())
    assert b["retraining"]["trained_now"] == 6 and b["retraining"]["reused"] == 0
    assert len(list((target / "lds").glob("*.json"))) == 6
    assert b["strategies"]["ekfac"]["mean"] == pytest.approx(a["strategies"]["ekfac"]["mean"], abs=1e-5)
