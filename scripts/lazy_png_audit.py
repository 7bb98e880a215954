"""Peak memory of `infl self-influence` on generated 32x32 PNG folders decoded per batch.

    python scripts/lazy_png_audit.py --dir /tmp/lazy_png --sizes 5000 20000 --compare 2000

Writes N seeded 32x32 RGB PNGs (10 classes: a class colour plus noise, 3% of the files in
a wrong class folder) under <dir>/train-<N> and one shared test folder, then runs each
audit in its own process under /usr/bin/time -v (falls back to getrusage) and prints the
peak resident set size: `data.in_memory: false` for every size, `true` for the largest for
contrast, and `--compare M`: the first M images of the same seeded stream audited both
ways, whose self_influence.csv files must be equal.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def write_pngs(folder: Path, count: int, seed: int) -> None:
    """count PNGs in folder/<class>/<i>.png (skipped when already complete)."""
    from PIL import Image

    marker = folder / ".complete"
    if marker.is_file():
        return
    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 216, size=(10, 3))
    for i in range(count):
        label = i % 10
        shown = (label + 1) % 10 if rng.random() < 0.03 else label
        pixels = np.clip(colours[label] + rng.normal(0, 40, size=(32, 32, 3)), 0, 255).astype(np.uint8)
        target = folder / f"c{shown}"
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(target / f"{i:06d}.png")
    marker.write_text(str(count))


def run(config: Path, name: str, overrides: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of one `infl self-influence` process."""
    command = [sys.executable, "-m", "influence_cli", "-q", "self-influence", "-c", str(config), "--set", f"name={name}"]
    for item in overrides:
        command += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if Path("/usr/bin/time").is_file():
        done = subprocess.run(["/usr/bin/time", "-v", *command], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        peak = float(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1)) / 1024
        wall = re.search(r"Elapsed \(wall clock\) time.*: (\S+)", done.stderr).group(1)
        parts = [float(p) for p in wall.split(":")]
        seconds = sum(p * 60 ** k for k, p in enumerate(reversed(parts)))
        return peak, seconds
    done = subprocess.run(command, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed")
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/lazy_png"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000])
    parser.add_argument("--compare", type=int, default=2000, help="first N images audited both ways (0: skip)")
    parser.add_argument("--workers", type=int, default=1, help="influence.num_workers (DataLoader workers)")
    args = parser.parse_args()
    base = args.dir.resolve()
    write_pngs(base / "test", 500, seed=1)
    for size in args.sizes:
        write_pngs(base / f"train-{size}", size, seed=0)
    config = base / "audit.yaml"
    config.write_text(
        "name: lazy\ndata: {source: image_folder, test_path: test}\nmodel: {arch: cnn, channels: [8, 16]}\n"
        "train: {epochs: 1, batch_size: 128}\ninfluence: {batch_size: 256}\n"
        f"output: {{dir: {base / 'runs'}}}\n"
    )
    rows = []
    common = [f"influence.num_workers={args.workers}"]
    for size in args.sizes:
        peak, seconds = run(config, f"lazy-{size}", [f"data.train_path=train-{size}", "data.in_memory=false", *common])
        rows.append({"images": size, "in_memory": False, "peak_rss_mb": round(peak, 1), "seconds": round(seconds, 1)})
        print(json.dumps(rows[-1]), flush=True)
    largest = max(args.sizes)
    peak, seconds = run(config, f"eager-{largest}", [f"data.train_path=train-{largest}", "data.in_memory=true", *common])
    rows.append({"images": largest, "in_memory": True, "peak_rss_mb": round(peak, 1), "seconds": round(seconds, 1)})
    print(json.dumps(rows[-1]), flush=True)
    if args.compare:
        # the first N images of the same seeded stream (data.limit would cut by sorted path, i.e. by class)
        write_pngs(base / f"train-{args.compare}", args.compare, seed=0)
        limit = [f"data.train_path=train-{args.compare}", *common]
        run(config, f"cmp-lazy-{args.compare}", [*limit, "data.in_memory=false"])
        run(config, f"cmp-eager-{args.compare}", [*limit, "data.in_memory=true"])
        a = (base / "runs" / f"cmp-lazy-{args.compare}" / "self_influence.csv").read_bytes()
        b = (base / "runs" / f"cmp-eager-{args.compare}" / "self_influence.csv").read_bytes()
        print(json.dumps({"compare_first": args.compare, "self_influence_csv_identical": a == b}), flush=True)


if __name__ == "__main__":
    main()
