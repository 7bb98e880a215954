#!/usr/bin/env python
"""Benchmark the influence engine on the workloads of ARCHITECTURE.md.

    python scripts/benchmark.py {fit-factors,self-influence,score,value} [--workload mlp784|cnn32|all]
                                [--kronfluence] [--repeat N]
    python scripts/benchmark.py --whole-process [--workload ...] [--repeat N]   (CLI commands)
    python scripts/benchmark.py lowrank [--workload mlp784] [--rank 32]   (exact vs query_rank)
    python scripts/benchmark.py all --workload resnet18 --memory          (the real-size model)

Each workload: synthetic seeded data, the model trained ~1 epoch with Adam, CPU,
torch.set_num_threads(2), float32. Every measured stage runs in its own subprocess so
its peak RSS is its own; times are reported in-process and as a whole process, and as
a ratio to one forward+backward epoch (summed CE, weight grads, no optimizer step,
median of 3 after a warm-up epoch) measured in the same run. ``value``: value_scores of
the first VALUE_QUERY_ROWS training rows as the query set (one summed query gradient,
one solve, one pass over the training set). Each stage process first
runs one warm-up forward+backward batch (not timed), then the stage once.

More workloads (e.g. ``digits-mlp``) plug in as entries of ``WORKLOADS``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

THREADS = 2
SEED = 0
VALUE_QUERY_ROWS = 1_000
RANK = [32]  # query_rank of the "score-rank" stage (--rank)


# ------------------------------------------------------------------ workloads
@dataclass
class Workload:
    name: str
    build_model: Callable[[], nn.Module]
    make_data: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
    batch_size: int


def _mlp784() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def _cnn32() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    )


def _resnet18() -> nn.Module:
    """torchvision's ResNet-18 with a 10-class head (11.2 M weights; BatchNorm untracked)."""
    from torchvision.models import resnet18

    return resnet18(num_classes=10)


def _teacher_labels(features: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Labels from a random linear teacher plus noise: learnable but not trivial."""
    w = torch.randn(features.shape[1], 10, generator=gen)
    logits = features @ w / features.shape[1] ** 0.5
    return (logits + 0.5 * torch.randn(logits.shape, generator=gen)).argmax(1)


def _mlp784_data():
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(10_100, 784, generator=gen)
    y = _teacher_labels(x, gen)
    return x[:10_000], y[:10_000], x[10_000:], y[10_000:]


def _cnn32_data():
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(5_050, 3, 32, 32, generator=gen)
    y = _teacher_labels(F.avg_pool2d(x, 8).flatten(1), gen)
    return x[:5_000], y[:5_000], x[5_000:], y[5_000:]


def _resnet18_data():
    """2,000 generated 3×32×32 images (no download) and 10 test rows: the per-row test
    side of ResNet-18 is 11.2 M weights, so a few rows already fill a 128 Mi group."""
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(2_010, 3, 32, 32, generator=gen)
    y = _teacher_labels(F.avg_pool2d(x, 8).flatten(1), gen)
    return x[:2_000], y[:2_000], x[2_000:], y[2_000:]


WORKLOADS: dict[str, Workload] = {
    "mlp784": Workload("mlp784", _mlp784, _mlp784_data, 512),
    "cnn32": Workload("cnn32", _cnn32, _cnn32_data, 256),
    "resnet18": Workload("resnet18", _resnet18, _resnet18_data, 128),
}
# "--workload all": the small workloads; resnet18 (minutes of CPU) only when named.
SMALL_WORKLOADS = ("mlp784", "cnn32")


class Batches:
    """Minimal in-memory loader: contiguous slices, fixed order, knows its dataset size."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.dataset = x  # len() = number of examples

    def __iter__(self):
        for i in range(0, len(self.x), self.batch_size):
            yield self.x[i : i + self.batch_size], self.y[i : i + self.batch_size]

    def __len__(self) -> int:
        return (len(self.x) + self.batch_size - 1) // self.batch_size


def prepare(workload: Workload, directory: Path) -> None:
    """Make the data, train ~1 epoch with Adam, save both for the stage processes."""
    torch.manual_seed(SEED)
    x, y, xt, yt = workload.make_data()
    model = workload.build_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(SEED)
    order = torch.randperm(len(x), generator=gen)
    model.train()
    for i in range(0, len(x), workload.batch_size):
        idx = order[i : i + workload.batch_size]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
    torch.save({"x": x, "y": y, "xt": xt, "yt": yt, "state": model.state_dict(), "acc": acc},
               directory / f"{workload.name}.pt")


def load(workload: Workload, directory: Path):
    blob = torch.load(directory / f"{workload.name}.pt")
    model = workload.build_model()
    model.load_state_dict(blob["state"])
    model.eval()
    return model, blob


# ------------------------------------------------------------- stage bodies
def _epoch(model: nn.Module, loader: Batches) -> None:
    for xb, yb in loader:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), yb, reduction="sum").backward()


def _warmup(model: nn.Module, loader: Batches) -> None:
    """One forward+backward batch, as the epoch measurement also runs warm: starts the
    thread pools and the allocator so neither side pays process start-up costs."""
    xb, yb = next(iter(loader))
    F.cross_entropy(model(xb), yb, reduction="sum").backward()
    model.zero_grad(set_to_none=True)


def run_stage(stage: str, workload: Workload, directory: Path) -> dict:
    """Body of one measured subprocess; returns its timings."""
    torch.set_num_threads(THREADS)
    from influence_cli.engine import Factors, fit_factors, pairwise_scores, self_influence

    model, blob = load(workload, directory)
    loader = Batches(blob["x"], blob["y"], workload.batch_size)
    factors_dir = directory / f"{workload.name}-factors"
    result: dict = {}
    if stage != "epoch":
        _warmup(model, loader)
    result["rss_before_mb"] = _reset_peak_rss()
    if stage == "baseline":  # torch, data, model and one warm batch: what every stage starts from
        result["seconds"] = 0.0
    elif stage == "epoch":
        _epoch(model, loader)  # warm-up
        times, cpu = [], []
        for _ in range(3):
            t0, c0 = time.perf_counter(), time.process_time()
            _epoch(model, loader)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        result["seconds"] = statistics.median(times)
        result["cpu_seconds"] = statistics.median(cpu)
    elif stage == "fit-factors":
        t0 = time.perf_counter()
        factors = fit_factors(model, loader, "ekfac")
        result["seconds"] = time.perf_counter() - t0
        factors.save(factors_dir)
    elif stage == "self-influence":
        factors = Factors.load(factors_dir)
        t0 = time.perf_counter()
        scores = self_influence(model, factors, loader)
        result["seconds"] = time.perf_counter() - t0
        result["note"] = f"N={len(scores)}"
    elif stage in ("score-top10", "score-full", "score-rank"):
        factors = Factors.load(factors_dir)
        rank = RANK[0] if stage == "score-rank" else 0
        t0 = time.perf_counter()
        out = pairwise_scores(
            model, factors, loader, blob["xt"], blob["yt"],
            top=10 if stage == "score-top10" else None, query_rank=rank,
        )
        result["seconds"] = time.perf_counter() - t0
        if stage != "score-top10":
            result["note"] = f"T×N={tuple(out.shape)}" + (f", query_rank={rank}" if rank else "")
            torch.save(out, directory / f"{workload.name}-{stage}.pt")
    elif stage == "value":
        from influence_cli.engine import value_scores

        factors = Factors.load(factors_dir)
        qx, qy = blob["x"][:VALUE_QUERY_ROWS], blob["y"][:VALUE_QUERY_ROWS]
        t0, c0 = time.perf_counter(), time.process_time()
        out = value_scores(model, factors, loader, qx, qy)
        result["seconds"] = time.perf_counter() - t0
        result["cpu_seconds"] = time.process_time() - c0  # CPU time: less hit by other processes
        result["note"] = f"T={len(qx)} N={len(out)}"
    elif stage.startswith("kronfluence-"):
        result.update(_kronfluence(stage.split("-", 1)[1], model, blob, workload, directory))
    else:
        raise SystemExit(f"unknown stage {stage}")
    result["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["stage_peak_mb"] = _status_mb("VmHWM")  # peak since _reset_peak_rss (Linux)
    return result


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> float | None:
    """Reset the kernel's peak-RSS mark (VmHWM) so a stage's own peak can be read; returns
    the current RSS in MB (None off Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status_mb("VmRSS")


def _kronfluence(what: str, model: nn.Module, blob: dict, workload: Workload, directory: Path) -> dict:
    """kronfluence's EK-FAC on the same model/data (only when it is importable)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.task import Task
    from torch.utils.data import TensorDataset

    class ClassificationTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(batch[0])
            if not sample:
                return F.cross_entropy(logits, batch[1], reduction="sum")
            with torch.no_grad():
                labels = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")

    task = ClassificationTask()
    model = prepare_model(model, task)
    analyzer = Analyzer(analysis_name=workload.name, model=model, task=task, cpu=True,
                        output_dir=str(directory / "kronfluence"))
    train = TensorDataset(blob["x"], blob["y"])
    test = TensorDataset(blob["xt"], blob["yt"])
    bs = workload.batch_size
    t0 = time.perf_counter()
    if what == "fit":
        analyzer.fit_all_factors(factors_name="ekfac", dataset=train, per_device_batch_size=bs,
                                 factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
    elif what == "self":
        analyzer.compute_self_scores(scores_name="self", factors_name="ekfac", train_dataset=train,
                                     per_device_train_batch_size=bs, overwrite_output_dir=True)
    elif what == "score":
        analyzer.compute_pairwise_scores(scores_name="pair", factors_name="ekfac", query_dataset=test,
                                         train_dataset=train, per_device_query_batch_size=len(test),
                                         per_device_train_batch_size=bs, overwrite_output_dir=True)
    return {"seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------- driver
def measure(stage: str, workload: Workload, directory: Path) -> dict:
    """Run one stage in a fresh interpreter; add its whole-process wall time."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_stage", stage,
           "--workload", workload.name, "--_dir", str(directory), "--rank", str(RANK[0])]
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_seconds"] = wall
    return result


STAGES = {
    "fit-factors": ["fit-factors"],
    "self-influence": ["self-influence"],
    "score": ["score-top10", "score-full"],
    "value": ["value"],
    "all": ["fit-factors", "self-influence", "score-top10"],  # the resnet18 rows
    "lowrank": ["score-full", "score-rank"],  # exact vs query_rank, with their agreement
}
KRONFLUENCE = {"fit-factors": "kronfluence-fit", "self-influence": "kronfluence-self", "score": "kronfluence-score"}
TARGETS = {
    ("mlp784", "fit-factors"): 4, ("cnn32", "fit-factors"): 4,
    ("mlp784", "self-influence"): 3, ("cnn32", "self-influence"): 6,
    ("cnn32", "score-top10"): 2, ("cnn32", "score-full"): 2,
    ("mlp784", "score-rank"): 10,
    ("resnet18", "fit-factors"): 6, ("resnet18", "self-influence"): 6, ("resnet18", "score-top10"): 6,
    ("mlp784", "value"): 2, ("cnn32", "value"): 3,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--whole-process" in argv:  # each infl command in its own process: scripts/benchmark_cli.py
        from benchmark_cli import main as whole_process

        return whole_process([a for a in argv if a != "--whole-process"])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", nargs="?", choices=sorted(STAGES))
    parser.add_argument("--workload", default="all", choices=[*WORKLOADS, "all"])
    parser.add_argument("--kronfluence", action="store_true", help="also run kronfluence's ekfac if importable")
    parser.add_argument("--repeat", type=int, default=1,
                        help="repeat epoch + stage measurements and report medians (noisy machines)")
    parser.add_argument("--memory", action="store_true",
                        help="add each stage's peak RSS over its start and the docs/memory.md formula")
    parser.add_argument("--rank", type=int, default=32, help="query_rank of the lowrank mode (default 32)")
    parser.add_argument("--_stage", help=argparse.SUPPRESS)
    parser.add_argument("--_dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    RANK[0] = args.rank

    if args._stage:  # inside a measured subprocess
        print(json.dumps(run_stage(args._stage, WORKLOADS[args.workload], Path(args._dir))))
        return 0
    if not args.stage:
        parser.error("a stage is required")

    torch.set_num_threads(THREADS)
    names = list(SMALL_WORKLOADS) if args.workload == "all" else [args.workload]
    use_kron = False
    if args.kronfluence:
        try:
            import kronfluence  # noqa: F401

            use_kron = True
        except ImportError:
            print("kronfluence is not importable here; skipping the side-by-side run.")
    rows, agreement = [], []
    with tempfile.TemporaryDirectory(prefix="infl-bench-") as tmp:
        directory = Path(tmp)
        for name in names:
            workload = WORKLOADS[name]
            prepare(workload, directory)
            formula = _formulas(workload, directory) if args.memory else {}
            stages = list(STAGES[args.stage])
            if use_kron and args.stage in KRONFLUENCE:
                stages.append(KRONFLUENCE[args.stage])
            if "fit-factors" not in stages:
                prep = measure("fit-factors", workload, directory)  # factors for the later stages
                if "error" in prep:
                    print(f"{name}: fitting factors failed: {prep['error']}")
                    continue
            # Each repetition re-measures the epoch next to the stages, so every ratio
            # pairs measurements taken under the same machine load.
            epochs: list[dict] = []
            results: dict[str, list[dict]] = {stage: [] for stage in stages}
            for _ in range(args.repeat):
                epoch = measure("epoch", workload, directory)
                if "error" in epoch:
                    print(f"{name}: epoch failed: {epoch['error']}")
                    break
                epochs.append(epoch)
                for stage in stages:
                    res = measure(stage, workload, directory)
                    if "error" not in res:
                        res["ratio"] = res["seconds"] / epoch["seconds"]
                        if "cpu_seconds" in res and "cpu_seconds" in epoch:
                            res["cpu_ratio"] = res["cpu_seconds"] / epoch["cpu_seconds"]
                        if stage in formula and res.get("stage_peak_mb") and res.get("rss_before_mb"):
                            grown = res["stage_peak_mb"] - res["rss_before_mb"]
                            res["note"] = " ".join(filter(None, [res.get("note"), (
                                f"peak {grown:.0f} MB over start, formula {formula[stage]:.0f} MB"
                                f" ({grown / formula[stage]:.2f}×)")]))
                    results[stage].append(res)
            if not epochs:
                continue
            rows.append(_row(name, "fwd+bwd epoch", [dict(e, ratio=1.0) for e in epochs], None))
            for stage in stages:
                rows.append(_row(name, stage, results[stage], TARGETS.get((name, stage))))
            if args.stage == "lowrank":
                agreement.append((name, _agreement(directory, name)))
    if args.repeat > 1:
        print(f"medians of {args.repeat} repetitions; × epoch pairs each stage with the epoch "
              "measured just before it")
    _print_table(rows)
    for name, text in agreement:
        print(f"{name}: query_rank={RANK[0]} against exact: {text}")
    return 0


def _agreement(directory: Path, name: str) -> str:
    """Top-10 proponent overlap and Spearman rank correlation per test row (means, and
    the worst row), low-rank against exact scores of the same run."""
    paths = [directory / f"{name}-{stage}.pt" for stage in ("score-full", "score-rank")]
    if not all(p.is_file() for p in paths):
        return "not measured (a stage failed)"
    exact, approx = (torch.load(p).double() for p in paths)
    top_e, top_a = exact.topk(10, dim=1).indices, approx.topk(10, dim=1).indices
    overlap = torch.tensor([len(set(e.tolist()) & set(a.tolist())) / 10 for e, a in zip(top_e, top_a)])

    def ranks(x: torch.Tensor) -> torch.Tensor:
        return x.argsort(dim=1).argsort(dim=1).double()

    re, ra = ranks(exact), ranks(approx)
    re, ra = re - re.mean(1, keepdim=True), ra - ra.mean(1, keepdim=True)
    rho = (re * ra).sum(1) / (re.norm(dim=1) * ra.norm(dim=1))
    rel = float((approx - exact).norm() / exact.norm())
    return (f"top-10 proponent overlap mean {overlap.mean():.3f} (worst row {overlap.min():.1f}), "
            f"Spearman mean {rho.mean():.4f} (worst row {rho.min():.4f}), "
            f"relative Frobenius error {rel:.3g}")


def _formulas(workload: Workload, directory: Path) -> dict[str, float]:
    """docs/memory.md's bytes beyond the start of each stage, in MB (scripts/memory_check.py)."""
    from memory_check import MB, formulas, layer_sizes

    model, blob = load(workload, directory)
    layers, acts = layer_sizes(model, blob["x"])
    values = formulas(layers, acts, len(blob["x"]), workload.batch_size, len(blob["xt"]))
    return {stage: value / MB for stage, value in values.items()}


def _row(name: str, stage: str, runs: list[dict], target: float | None) -> tuple:
    """One table row: medians over repetitions, peak RSS max, notes."""
    errors = [r["error"] for r in runs if "error" in r]
    good = [r for r in runs if "error" not in r]
    if not good:
        return (name, stage, None, None, None, None, (errors or ["not run"])[0][:60])
    med = statistics.median
    ratio = med(r["ratio"] for r in good)
    notes = [good[0]["note"]] if good[0].get("note") else []
    if len(good) > 1 and stage == "fwd+bwd epoch":
        secs = sorted(r["seconds"] for r in good)
        notes.append(f"range {secs[0]:.3f}-{secs[-1]:.3f} s")
    elif len(good) > 1:
        ratios = sorted(r["ratio"] for r in good)
        notes.append(f"range {ratios[0]:.2f}-{ratios[-1]:.2f}")
    if all("cpu_ratio" in r for r in good):
        notes.append(f"CPU-time × epoch {med(r['cpu_ratio'] for r in good):.2f}")
    if target is not None:
        notes.append(f"target ≤ {target}: {'ok' if ratio <= target else 'MISSED'}")
    return (
        name, stage, med(r["seconds"] for r in good), med(r["process_seconds"] for r in good),
        ratio, max(r["max_rss_mb"] for r in good), " ".join(notes),
    )


def _print_table(rows: list[tuple]) -> None:
    header = ("workload", "stage", "in-proc s", "process s", "× epoch", "peak RSS MB", "note")
    cells = [header]
    for name, stage, sec, proc, ratio, rss, note in rows:
        cells.append((
            name, stage,
            "-" if sec is None else f"{sec:.3f}",
            "-" if proc is None else f"{proc:.2f}",
            "-" if ratio is None else f"{ratio:.2f}",
            "-" if rss is None else f"{rss:.0f}",
            note,
        ))
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(header))]
    for i, row in enumerate(cells):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


if __name__ == "__main__":
    sys.exit(main())
