"""``infl evaluate --lds``: the linear datamodeling score (LDS) against real retraining.

Recipe:

1. The model and factors come from the normal pipeline (``ensure_model`` /
   ``ensure_factors``) on the full training set, in the run's own directory. (With
   ``model.checkpoint`` the scores come from the user's weights while the subsets are
   retrained with the config's ``train`` settings: the LDS is only meaningful when those
   settings match how the checkpoint was trained.)
2. Test rows: the FIRST ``test_rows`` rows of the test split (deterministic; every
   source's test split is already in a seeded shuffled or stratified order).
3. Subsets: ``subsets`` random subsets of the training set, each of size
   round(fraction·N), drawn without replacement. Subset r comes from its own generator
   seeded by (config.seed, r), so it does not depend on how many subsets are asked for:
   asking for 6 after 4 reuses the first 4.
4. For each subset r and seed s (0 ≤ s < ``seeds``) a fresh model is built and trained with
   the config's training settings on ``train.subset(indices)`` with seed
   ``config.seed + 1000·(r+1) + s``. The measurement of each test row is cached in
   ``runs/<name>/lds/<key>.json``, written atomically, where key is a hash of
   (training hash of the config, subset indices, seed, measurement, test rows), so an
   interrupted run resumes and every finished retraining is reused. The measurements
   are averaged over seeds.
5. Predictions. score(t, i) = g_tᵀ (H + λI)⁻¹ g_i from ``pairwise_scores(..., top=None)``;
   positive ⇒ up-weighting i lowers the test loss. Training on subset S instead of the
   whole set removes the other examples, so to first order
   loss_t(S) ≈ loss_t(all) + (1/N)·Σ_{i∉S} score(t, i) = const − (1/N)·Σ_{i∈S} score(t, i).
   Hence predicted loss = −Σ_{i∈S} score. With measurement="margin" the engine's test
   objective is −margin, so the same argument gives −margin(S) ≈ const − Σ score, i.e.
   predicted margin = +Σ_{i∈S} score. (``prediction_sign``.)
6. LDS: Spearman correlation, per test row, between the measured and the predicted
   values across the subsets; reported as the mean over rows and its standard error
   (std/√rows). Rows whose measurement or prediction is constant across the subsets have
   no correlation and are left out (``rows`` counts the rows used).

Output: ``runs/<name>/lds.json`` (the returned dict), written atomically.
"""

from __future__ import annotations

import math
import time
from typing import Any, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from influence_cli import __version__
from influence_cli.config import Config
from influence_cli.errors import InflError
from influence_cli.models import build_model
from influence_cli.progress import Reporter
from influence_cli.run import atomic_write_json, hash_object, is_sealed, read_json, seal, training_hash
from influence_cli.training import resolve_device, train_model

from .common import Stopwatch, clean_number, fmt, fmt_seconds, json_safe, resolve_strategies, timed_factors
from .metrics import spearman

__all__ = [
    "MEASUREMENTS",
    "prediction_sign",
    "subset_indices",
    "retrain_seed",
    "measure",
    "lds_per_row",
    "evaluate_lds",
    "render_lds_table",
]

MEASUREMENTS = ("loss", "margin")


def prediction_sign(measurement: str) -> float:
    """Predicted measurement of a subset = sign · Σ_{i∈S} score(t, i) (see module doc)."""
    if measurement == "loss":
        return -1.0
    if measurement == "margin":
        return 1.0
    raise InflError(f"evaluate --lds: measurement must be one of {MEASUREMENTS}, not {measurement!r}")


def subset_indices(seed: int, r: int, n: int, size: int) -> np.ndarray:
    """Sorted indices of subset r (independent of how many subsets are drawn)."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x1D5, int(r)])
    return np.sort(rng.permutation(n)[:size]).astype(np.int64)


def retrain_seed(seed: int, r: int, s: int) -> int:
    return int(seed) + 1000 * (int(r) + 1) + int(s)


@torch.no_grad()
def measure(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor, measurement: str) -> np.ndarray:
    """Per-row loss (cross-entropy) or margin (logit_y − logsumexp of the other logits)."""
    model.eval()
    device = next(model.parameters()).device
    logits = torch.cat([model(inputs[i : i + 512].to(device)).double().cpu() for i in range(0, len(inputs), 512)])
    labels = labels.long()
    if measurement == "loss":
        return F.cross_entropy(logits, labels, reduction="none").numpy()
    correct = logits.gather(1, labels[:, None]).squeeze(1)
    is_label = torch.arange(logits.shape[1]) == labels[:, None]
    others = logits.masked_fill(is_label, float("-inf"))
    return (correct - torch.logsumexp(others, dim=1)).numpy()


def lds_per_row(measured: np.ndarray, scores: np.ndarray, membership: np.ndarray, measurement: str) -> np.ndarray:
    """Spearman correlation per test row between measured (T, R) values and the
    predictions sign · scores (T, N) @ membership (R, N)ᵀ; NaN for constant rows."""
    predicted = prediction_sign(measurement) * (np.asarray(scores, np.float64) @ np.asarray(membership, np.float64).T)
    out = np.full(measured.shape[0], np.nan)
    for t in range(measured.shape[0]):
        out[t] = spearman(measured[t], predicted[t])
    return out


def _summary(per_row: np.ndarray) -> dict[str, Any]:
    valid = per_row[np.isfinite(per_row)]
    rows = int(valid.size)
    mean = float(valid.mean()) if rows else float("nan")
    stderr = float(valid.std(ddof=1) / math.sqrt(rows)) if rows > 1 else float("nan")
    return {"mean": mean, "stderr": stderr, "rows": rows}


def evaluate_lds(
    config: Config,
    *,
    subsets: int = 100,
    fraction: float = 0.5,
    seeds: int = 1,
    test_rows: int = 100,
    measurement: str = "loss",
    strategies: Optional[Iterable[str]] = None,
    reporter: Optional[Reporter] = None,
) -> dict[str, Any]:
    """Linear datamodeling score of each strategy against retraining on random subsets.

    Returns the JSON-serialisable result that is also written to ``runs/<name>/lds.json``.
    A strategy that raises an InflError/InfluenceError (other than stale stored factors,
    which need ``--overwrite`` like everywhere else) is recorded as ``{"skipped": reason}``.
    """
    from influence_cli.errors import FactorsError
    from influence_cli.pipeline import Session, ensure_members, members_pairwise

    prediction_sign(measurement)  # validates
    if subsets < 2:
        raise InflError(f"evaluate --lds: needs at least 2 subsets to rank, not {subsets}")
    if seeds < 1:
        raise InflError(f"evaluate --lds: seeds must be at least 1, not {seeds}")
    if not 0.0 < float(fraction) < 1.0:
        raise InflError(f"evaluate --lds: the subset fraction must lie in (0, 1), not {fraction}")
    if test_rows < 1:
        raise InflError(f"evaluate --lds: test_rows must be at least 1, not {test_rows}")
    names = resolve_strategies(strategies)
    reporter = reporter or Reporter()
    total = Stopwatch()

    session = Session(config, reporter)
    data = session.data()
    members = ensure_members(session)
    state = members[0].state
    n = len(data.train)
    size = int(round(float(fraction) * n))
    if not 1 <= size < n:
        raise InflError(f"evaluate --lds: fraction {fraction} of {n} training examples gives subsets of {size}")
    t_count = min(int(test_rows), len(data.test))
    if t_count < 1:
        raise InflError("evaluate --lds: the test split is empty")
    test_x = data.test.inputs[:t_count]
    test_y = data.test.labels[:t_count]
    test_ids = list(data.test.ids[:t_count])

    # ---------------------------------------------------------------- retraining
    run = session.run
    cache_dir = run.root / "lds"
    from influence_cli.data.fingerprint import fingerprint_split

    base_hash = training_hash(config, session.data_fingerprint())
    test_rows_hash = fingerprint_split(test_x, test_y, test_ids, data.class_names)
    device = resolve_device(config.train.device)
    membership = np.zeros((subsets, n), dtype=bool)
    measured = np.zeros((subsets, seeds, t_count), dtype=np.float64)
    retrained = reused = 0
    seconds_now = 0.0
    seconds_recorded = 0.0
    quiet = Reporter()  # train_model's own bar would nest inside ours
    def cache_path(r: int, s: int, idx: np.ndarray) -> Any:
        key = hash_object(
            {
                "training_hash": base_hash,
                "subset": idx.tolist(),
                "seed": retrain_seed(config.seed, r, s),
                "measurement": measurement,
                "test_rows": test_ids,
                "test_rows_hash": test_rows_hash,
            }
        )
        return cache_dir / f"{key}.json"

    def cached_values(path: Any, *, say: bool = False) -> tuple[Optional[np.ndarray], float]:
        """A finished retraining's measurements; None when missing, truncated or damaged
        (the file is sealed with its content hash)."""
        cached = read_json(path)
        values = cached.get("values") if cached and is_sealed(cached) else None
        if isinstance(values, list) and len(values) == t_count and all(isinstance(v, (int, float)) for v in values):
            return np.asarray(values, dtype=np.float64), float(cached.get("train_seconds") or 0.0)
        if say and path.exists():
            reporter.info(f"{path}: cached retraining is truncated or damaged; retraining it")
        return None, 0.0

    # Under torchrun the retrainings are dealt out to the ranks (job j on rank j mod world);
    # each writes its results to the cache, and after a barrier every rank reads them all.
    dist = session.dist
    jobs = [(r, s) for r in range(subsets) for s in range(seeds)]
    subset_idx = [subset_indices(config.seed, r, n, size) for r in range(subsets)]
    for r, idx in enumerate(subset_idx):
        membership[r, idx] = True
    done = np.zeros((subsets, seeds), dtype=bool)
    with reporter.task("retraining subsets", len(jobs)) as advance:
        for j, (r, s) in enumerate(jobs):
            if dist.active and j % dist.world_size != dist.rank:
                continue
            idx = subset_idx[r]
            path = cache_path(r, s, idx)
            values_np, recorded = cached_values(path, say=True)
            if values_np is not None:
                measured[r, s] = values_np
                seconds_recorded += recorded
                reused += 1
            else:
                seed = retrain_seed(config.seed, r, s)
                start = time.perf_counter()
                model = build_model(config.model, tuple(data.input_shape), len(data.class_names), seed=seed)
                train_model(model, data.train.subset(idx), config.train, seed=seed, device=device, reporter=quiet)
                model.cpu()
                values_np = measure(model, test_x, test_y, measurement)
                elapsed = time.perf_counter() - start
                if not np.all(np.isfinite(values_np)):
                    raise InflError(f"evaluate --lds: retraining on subset {r} gave non-finite {measurement}es; lower train.lr")
                atomic_write_json(
                    path,
                    seal(
                        {
                            "subset": r,
                            "seed": seed,
                            "measurement": measurement,
                            "training_hash": base_hash,
                            "subset_size": size,
                            "train_seconds": elapsed,
                            "values": values_np.tolist(),
                        }
                    ),
                )
                measured[r, s] = values_np
                seconds_now += elapsed
                seconds_recorded += elapsed
                retrained += 1
            done[r, s] = True
            advance(dist.world_size if dist.active else 1)
    if dist.active:
        dist.barrier()
        for r, s in jobs:
            if not done[r, s]:
                values_np, _ = cached_values(cache_path(r, s, subset_idx[r]))
                if values_np is None:
                    raise InflError(f"evaluate --lds: another rank's retraining of subset {r} is missing from {cache_dir}")
                measured[r, s] = values_np
        totals = dist.all_reduce_sum(torch.tensor([retrained, reused, seconds_now, seconds_recorded], dtype=torch.float64))
        retrained, reused = int(round(float(totals[0]))), int(round(float(totals[1])))
        seconds_now, seconds_recorded = float(totals[2]), float(totals[3])
    mean_measured = measured.mean(axis=1).T  # (T, R)

    # ---------------------------------------------------------------- scoring
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        try:
            fit_seconds, factors_reused, fstates = 0.0, True, []
            for member in members:
                tf = timed_factors(member.session, member.state, name)
                fit_seconds += tf.fit_seconds
                factors_reused = factors_reused and tf.reused
                fstates.append(tf.state)
            start = time.perf_counter()
            matrix = members_pairwise(members, name, test_x, test_y, measurement=measurement, top=None, fstates=fstates)
            score_seconds = time.perf_counter() - start
        except FactorsError:
            raise
        except InflError as exc:
            results[name] = {"skipped": str(exc)}
            reporter.warn(f"{name}: skipped: {exc}")
            continue
        except (MemoryError, RuntimeError) as exc:
            if not (isinstance(exc, MemoryError) or "out of memory" in str(exc).lower() or "can't allocate" in str(exc).lower()):
                raise
            results[name] = {"skipped": f"out of memory: {exc}".strip()}
            continue
        finally:
            for member in members:
                member.state.model.cpu()
        scores = matrix.detach().cpu().double().numpy()
        per_row = lds_per_row(mean_measured, scores, membership, measurement)
        results[name] = {
            **_summary(per_row),
            "seconds": fit_seconds + score_seconds,
            "fit_seconds": fit_seconds,
            "score_seconds": score_seconds,
            "factors_reused": factors_reused,
        }

    spread = mean_measured.std(axis=1)
    result = {
        "evaluation": "lds",
        "config": config.name,
        "run_dir": str(run.root),
        "measurement": measurement,
        "subsets": int(subsets),
        "fraction": float(fraction),
        "subset_size": size,
        "seeds": int(seeds),
        "ensemble": len(members),
        "examples": n,
        "test_rows": t_count,
        "test_row_selection": "first rows of the test split",
        "full_model": {
            "train_accuracy": clean_number(state.train_accuracy, 6),
            "test_accuracy": clean_number(state.test_accuracy, 6),
        },
        "retraining": {
            "models": subsets * seeds,
            "trained_now": retrained,
            "reused": reused,
            "seconds_now": seconds_now,
            "seconds_total": seconds_recorded,
            "cache_dir": str(cache_dir),
            "mean_spread_across_subsets": float(spread.mean()),
        },
        "strategies": {k: _round_entry(v) for k, v in results.items()},
        "seconds": total(),
        "version": __version__,
    }
    result["retraining"] = {
        k: (clean_number(v, 3) if isinstance(v, float) else v) for k, v in result["retraining"].items()
    }
    result["seconds"] = clean_number(result["seconds"], 3)
    result = json_safe(result)
    if session.dist.is_main:
        run.ensure()
        atomic_write_json(run.root / "lds.json", result)
    return result


def _round_entry(entry: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in entry.items():
        if key in ("mean", "stderr"):
            out[key] = clean_number(value, 6)
        elif key.endswith("seconds"):
            out[key] = clean_number(value, 3)
        else:
            out[key] = value
    return out


def render_lds_table(result: dict[str, Any], console: Any) -> None:
    """Print the LDS result as a rich table (one row per strategy)."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    title = (
        f"Linear datamodeling score — {result['config']}: {result['test_rows']} test rows ({result['measurement']}), "
        f"{result['subsets']} subsets of {result['subset_size']}/{result['examples']}"
        + (f", {result['seeds']} seeds each" if result.get("seeds", 1) > 1 else "")
    )
    table = Table(title=title, box=box.SIMPLE_HEAD, header_style="bold", title_style="bold")
    for header, justify in (("strategy", "left"), ("LDS (mean)", "right"), ("± stderr", "right"),
                            ("rows", "right"), ("fit", "right"), ("scores", "right")):
        table.add_column(header, justify=justify)  # type: ignore[arg-type]
    skipped = []
    for name, entry in result["strategies"].items():
        if "skipped" in entry:
            skipped.append((name, entry["skipped"]))
            table.add_row(escape(name), "[yellow]skipped[/]", "—", "—", "—", "—")
            continue
        table.add_row(
            escape(name), fmt(entry.get("mean")), fmt(entry.get("stderr")), str(entry.get("rows", "—")),
            fmt_seconds(entry.get("fit_seconds")), fmt_seconds(entry.get("score_seconds")),
        )
    console.print(table)
    rt = result["retraining"]
    console.print(
        f"retraining: {rt['models']} models ({rt['trained_now']} trained now in {fmt_seconds(rt['seconds_now'])}, "
        f"{rt['reused']} reused); total retraining time {fmt_seconds(rt['seconds_total'])}",
        highlight=False,
    )
    for name, reason in skipped:
        console.print(f"[yellow]{escape(name)} skipped:[/] {escape(str(reason))}", highlight=False)
