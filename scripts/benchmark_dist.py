#!/usr/bin/env python
"""1 process vs N processes (torchrun, gloo, CPU) on the benchmark workloads.

    python scripts/benchmark_dist.py [--workload cnn32] [--nproc 2] [--repeat 1]

Prepares the workload exactly like scripts/benchmark.py (same data, same ~1-epoch
training), then times fit-factors (ekfac) and self-influence (all training examples)
with the library: 1 process × THREADS threads, and N processes × THREADS/N threads
under torchrun (each rank a contiguous block; sums all-reduced, scores gathered). The
in-process time is the slowest rank's; the process time is the whole torchrun launch
(interpreter start-up, process-group set-up). Both results are checked against each
other (max relative difference of the self-influence).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402

import benchmark  # noqa: E402


class IndexedBatches:
    def __init__(self, x, y, batch_size, start, stop):
        self.x, self.y, self.batch_size, self.start, self.stop = x, y, batch_size, start, stop
        self.num_examples = stop - start

    def __iter__(self):
        for i in range(self.start, self.stop, self.batch_size):
            j = min(i + self.batch_size, self.stop)
            yield self.x[i:j], self.y[i:j], torch.arange(i, j)


def worker(workload_name: str, directory: Path, threads: int) -> None:
    from influence_cli.distributed import init_from_env, shard_range
    from influence_cli.engine import fit_factors, self_influence

    torch.set_num_threads(threads)
    dist = init_from_env("cpu")
    workload = benchmark.WORKLOADS[workload_name]
    model, blob = benchmark.load(workload, directory)
    start, stop = shard_range(len(blob["x"]), dist.rank, dist.world_size)
    loader = IndexedBatches(blob["x"], blob["y"], workload.batch_size, start, stop)
    benchmark._warmup(model, benchmark.Batches(blob["x"][start:stop], blob["y"][start:stop], workload.batch_size))
    dist.barrier()
    t0 = time.perf_counter()
    factors = fit_factors(model, loader, "ekfac", dist=dist if dist.active else None)
    fit = time.perf_counter() - t0
    dist.barrier()
    t0 = time.perf_counter()
    scores = dist.gather_cat(self_influence(model, factors, loader))
    si = time.perf_counter() - t0
    times = dist.all_gather_object((fit, si, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    if dist.is_main:
        torch.save(scores, directory / f"scores-{dist.world_size}.pt")
        print(json.dumps({
            "fit": max(t[0] for t in times), "self": max(t[1] for t in times),
            "rss_mb": [round(t[2]) for t in times],
        }))
    dist.destroy()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(nproc: int, workload: str, directory: Path, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), GLOO_SOCKET_IFNAME="lo",
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    args = ["--_worker", "--workload", workload, "--_dir", str(directory), "--_threads", str(threads)]
    if nproc == 1:
        cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    else:
        torchrun = Path(sys.executable).with_name("torchrun")
        cmd = [str(torchrun), "--nproc_per_node", str(nproc), "--nnodes", "1", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(Path(__file__).resolve()), *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process"] = wall
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="cnn32", choices=list(benchmark.WORKLOADS))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--threads", type=int, default=benchmark.THREADS, help="total threads (split over processes)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--_dir", help=argparse.SUPPRESS)
    parser.add_argument("--_threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._worker:
        worker(args.workload, Path(args._dir), args._threads)
        return 0
    with tempfile.TemporaryDirectory(prefix="infl-dist-bench-") as tmp:
        directory = Path(tmp)
        benchmark.prepare(benchmark.WORKLOADS[args.workload], directory)
        rows = []
        for _ in range(args.repeat):
            for nproc in (1, args.nproc):
                res = launch(nproc, args.workload, directory, max(1, args.threads // nproc))
                rows.append((nproc, max(1, args.threads // nproc), res))
        a = torch.load(directory / "scores-1.pt")
        b = torch.load(directory / f"scores-{args.nproc}.pt")
        ratio = (a - b).abs() / a.abs()
        diff, median = float(ratio.max()), float(ratio.median())
    print(f"{args.workload}: 1 process vs {args.nproc} (torchrun, gloo), CPU, {args.threads} threads in total")
    print(f"{'processes':>9}  {'threads each':>12}  {'fit-factors s':>13}  {'self-influence s':>16}  {'process s':>9}  peak RSS MB per rank")
    for nproc, threads, res in rows:
        print(f"{nproc:>9}  {threads:>12}  {res['fit']:>13.2f}  {res['self']:>16.2f}  {res['process']:>9.2f}  {res['rss_mb']}")
    print(f"self-influence relative difference 1 vs {args.nproc} processes: max {diff:.2e}, median {median:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
