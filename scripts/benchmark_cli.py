#!/usr/bin/env python
"""Whole-process benchmark: each `infl` command of a pipeline in its own process.

    python scripts/benchmark.py --whole-process [--workload mlp784|cnn32|all] [--repeat N]

What a user pays per command, start-up included. The workloads of ARCHITECTURE.md are
written as real inputs (mlp784: a 10,000 × 784 table CSV; cnn32: 5,000 32×32 PNGs in an
image folder) with a config. `infl train` runs first (it decodes the data and trains one
epoch, not timed); then `fit-factors`, `self-influence`, `score --matrix` and `score --matrix --query-rank 32`
(the low-rank approximation) each run as a separate process, as in a pipeline, with the data already decoded by the earlier
command. Reported next to them, measured in the same run: `python -c "import torch"`
(the floor of any torch program) and one forward+backward epoch in-process (the floor of
anything that needs every example's gradient). Ratios are process seconds ÷ epoch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from benchmark import THREADS, WORKLOADS, Batches, _epoch  # noqa: E402

COMMANDS = ("fit-factors", "self-influence", "score --matrix", "score --matrix --query-rank 32")


def cnn32_factory(input_shape=None, num_classes=10):
    """The benchmark's cnn32 model, for model.arch: factory."""
    return WORKLOADS["cnn32"].build_model()


def write_mlp784(folder: Path) -> tuple[dict, int]:
    import pandas as pd

    x, y, xt, yt = WORKLOADS["mlp784"].make_data()
    columns = [f"f{j}" for j in range(x.shape[1])]
    for name, xs, ys in (("train", x, y), ("test", xt, yt)):
        frame = pd.DataFrame(xs.numpy(), columns=columns)
        frame.insert(0, "id", [f"{name}-{i}" for i in range(len(xs))])
        frame["label"] = ys.numpy()
        frame.to_csv(folder / f"{name}.csv", index=False, float_format="%.6g")
    data = {"source": "table", "train_path": str(folder / "train.csv"), "test_path": str(folder / "test.csv"),
            "id_column": "id", "standardize": False}
    model = {"arch": "mlp", "hidden_sizes": [512, 256]}
    return {"data": data, "model": model, "batch": 512}, len(xt)


def write_cnn32(folder: Path) -> tuple[dict, int]:
    from PIL import Image

    x, y, xt, yt = WORKLOADS["cnn32"].make_data()
    for name, xs, ys in (("train", x, y), ("test", xt, yt)):
        pixels = ((xs.clamp(-2.5, 2.5) + 2.5) / 5 * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for i, (img, label) in enumerate(zip(pixels, ys.tolist())):
            target = folder / name / str(label)
            target.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(target / f"{i:05d}.png")
    data = {"source": "image_folder", "train_path": str(folder / "train"), "test_path": str(folder / "test")}
    model = {"arch": "factory", "factory": "benchmark_cli:cnn32_factory", "factory_path": str(ROOT / "scripts")}
    return {"data": data, "model": model, "batch": 256}, len(xt)


WRITERS = {"mlp784": write_mlp784, "cnn32": write_cnn32}


def timed(args: list[str], cwd: Path) -> float:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(THREADS))
    start = time.perf_counter()
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return seconds


def epoch_seconds(folder: Path, workload: str) -> float:
    """One forward+backward epoch over the decoded training split, median of 3 (warm)."""
    torch.set_num_threads(THREADS)
    from influence_cli.config import load_config
    from influence_cli.data import build_datasets
    from influence_cli.models import build_model

    config = load_config(str(folder / "bench.yaml"))
    data = build_datasets(config)
    model = build_model(config.model, tuple(data.input_shape), len(data.class_names))
    loader = Batches(data.train.inputs, data.train.labels, WORKLOADS[workload].batch_size)
    _epoch(model, loader)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        _epoch(model, loader)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(workload: str, repeat: int) -> list[tuple]:
    rows = []
    with tempfile.TemporaryDirectory(prefix=f"infl-cli-{workload}-") as tmp:
        folder = Path(tmp)
        spec, n_test = WRITERS[workload](folder)
        config = {
            "name": workload, "seed": 0, "data": spec["data"], "model": spec["model"],
            "train": {"epochs": 1, "batch_size": spec["batch"], "lr": 1e-3},
            "influence": {"batch_size": spec["batch"]}, "output": {"dir": str(folder / "runs")},
        }
        (folder / "bench.yaml").write_text(yaml.safe_dump(config))
        (folder / "rows.csv").write_text("index\n" + "\n".join(str(i) for i in range(n_test)) + "\n")
        infl = [sys.executable, "-m", "influence_cli"]
        first = timed([*infl, "train", "-c", "bench.yaml"], folder)
        per: dict[str, list[float]] = {name: [] for name in ("import torch", "epoch (in-process)", *COMMANDS)}
        for _ in range(repeat):
            per["import torch"].append(timed([sys.executable, "-c", "import torch"], folder))
            per["epoch (in-process)"].append(epoch_seconds(folder, workload))
            for command in COMMANDS:
                words = command.split()
                extra = ["rows.csv", "--matrix", "matrix.safetensors", *words[2:]] if words[0] == "score" else []
                overwrite = ["--overwrite"] if words[0] == "fit-factors" else []
                per[command].append(timed([*infl, words[0], *extra, "-c", "bench.yaml", *overwrite], folder))
        epoch = statistics.median(per["epoch (in-process)"])
        torch_floor = statistics.median(per["import torch"])
        rows.append((workload, "first `infl train` (decode + 1 epoch)", first, first / epoch, ""))
        for name, values in per.items():
            med = statistics.median(values)
            note = f"range {min(values):.2f}-{max(values):.2f} s" if len(values) > 1 else ""
            if name in COMMANDS:
                note = f"{note}; {med - torch_floor:.2f} s over import torch".lstrip("; ")
            rows.append((workload, name, med, med / epoch, note))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="all", choices=[*WRITERS, "all"])
    parser.add_argument("--repeat", type=int, default=1, help="repetitions; medians are reported")
    args = parser.parse_args(argv)
    names = list(WRITERS) if args.workload == "all" else [args.workload]
    rows = [row for name in names for row in run(name, args.repeat)]
    header = ("workload", "what", "seconds", "× epoch", "note")
    cells = [header] + [(w, what, f"{s:.2f}", f"{r:.1f}", n) for w, what, s, r, n in rows]
    widths = [max(len(str(c[i])) for c in cells) for i in range(len(header))]
    for i, row in enumerate(cells):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
