"""`infl fix`: remove or relabel training examples by an influence step, without retraining.

Which examples: the flagged rows of runs/<name>/mislabels.csv with their suggested
labels (``--flagged``), or a CSV of ids with a ``new_label`` column (``--from``). The
stage corrects the run's model (engine.correction through app.correct), measures it
before and after, writes the corrected checkpoint, the label-override CSV (relabel) and
fix.json, and with ``verify`` retrains from scratch on the corrected data to compare.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from influence_cli import __version__
from influence_cli.app.correct import comparison, correct, corrected_train_set, retrain, split_metrics
from influence_cli.app.factors import ensure_factors, influence_device, stale_reason, train_loader
from influence_cli.app.model import ensure_model
from influence_cli.app.session import Session
from influence_cli.errors import DataError, FactorsError, InflError

ACTIONS = ("relabel", "remove")


@dataclass
class FixSet:
    rows: torch.Tensor  # training indices, int64
    new_labels: Optional[torch.Tensor]  # relabel targets (None for remove)
    source: str


@dataclass
class FixResult:
    summary: dict[str, Any]
    checkpoint: Path
    overrides: Optional[Path]
    json_path: Path
    examples: list[dict[str, Any]] = field(default_factory=list)


def _read_rows(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            header = list(reader.fieldnames or [])
    except OSError as exc:
        raise DataError(f"--from: cannot read {path}: {exc.strerror or exc}") from None
    except (csv.Error, UnicodeDecodeError) as exc:
        raise DataError(f"--from: {path} is not a readable CSV: {exc}") from None
    if "id" not in header:
        raise DataError(f"{path}: no 'id' column (use mislabels.csv or a CSV with id[,new_label])")
    return rows


def select_fix_set(session: Session, action: str, from_file: Optional[Path]) -> FixSet:
    """The examples to fix, every id and label checked against the current data."""
    from influence_cli.data.overrides import label_index

    data = session.data()
    names = list(data.class_names)
    position = {str(i): k for k, i in enumerate(data.train.ids)}
    path = Path(from_file) if from_file is not None else session.run.mislabels_csv
    if from_file is None and not path.is_file():
        raise InflError(f"{path} does not exist: run `infl self-influence` first (or give --from FILE.csv)")
    rows = _read_rows(path)
    if from_file is None:
        rows = [r for r in rows if str(r.get("flagged", "")).strip().lower() in ("true", "1")]
    # --from: new_label, else (an edited mislabels.csv) its suggested_label column
    column = "new_label" if from_file is not None and (not rows or "new_label" in rows[0]) else "suggested_label"
    chosen: list[int] = []
    targets: list[int] = []
    for line, row in enumerate(rows, start=2):
        key = str(row.get("id", "")).strip()
        where = f"{path} line {line}"
        if key not in position:
            raise DataError(f"{where}: id '{key}' is not a training example of {session.config.name}")
        k = position[key]
        if k in chosen:
            raise DataError(f"{where}: id '{key}' is listed twice")
        if from_file is None and str(row.get("label_name", "")) not in ("", names[int(data.train.labels[k])]):
            raise DataError(f"{path}: id '{key}' has another label now; rerun `infl self-influence`")
        if action == "relabel":
            if column not in row or not str(row[column]).strip():
                raise DataError(f"{where}: relabel needs a '{column}' for id '{key}'")
            target = label_index(row[column], names, where)
            if target == int(data.train.labels[k]):
                continue  # already has that label: nothing to change
            targets.append(target)
        chosen.append(k)
    if not chosen:
        raise InflError(f"{path}: no example to {action} (empty set)")
    if action == "remove" and len(chosen) >= len(data.train):
        raise InflError(f"{path}: removing every training example leaves nothing to train on")
    new = torch.tensor(targets, dtype=torch.long) if action == "relabel" else None
    return FixSet(torch.tensor(chosen, dtype=torch.long), new, str(path))


def fix_factors(session: Session, state: Any, strategy: str) -> Any:
    """Valid stored factors or a fresh fit; stale stored factors are refused (one line)."""
    directory = session.run.factors_dir(strategy)
    if directory.exists():
        problem = stale_reason(directory, session.factors_want(state, strategy))
        if problem is not None:
            raise FactorsError(f"{directory}: {problem}; refit them with `infl fit-factors -s {strategy} --overwrite`")
    return ensure_factors(session, state, strategy)


def _own_loss(model: Any, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    """Summed loss of the fixed examples under their target labels."""
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(inputs), labels, reduction="sum"))


def run_fix(session: Session, *, action: str, from_file: Optional[Path], out: Optional[Path],
            strategy: Optional[str], verify: bool, finetune_steps: int) -> FixResult:
    """Correct the run's model for the chosen examples; write the outputs; optionally verify."""
    config = session.config
    if session.dist.active:
        raise InflError("infl fix runs in one process; run it without torchrun")
    if action not in ACTIONS:
        raise InflError(f"--action: '{action}' is not one of {', '.join(ACTIONS)}")
    from influence_cli.app.choice import resolve_strategy

    strategy = resolve_strategy(session, strategy)  # auto → exact or ekfac, said once
    size = config.influence.ensemble_size()
    if size > 1:  # the flags come from the whole ensemble; the correction is of one model
        session.reporter.info(f"ensemble: infl fix corrects member 1 of {size} (the model a one-model run trains)")
    state = ensure_model(session)
    chosen = select_fix_set(session, action, from_file)
    fstate = fix_factors(session, state, strategy)
    data = session.data()
    train, rows = data.train, chosen.rows
    target = corrected_train_set(train, rows, action, chosen.new_labels)
    target_labels = train.labels[rows] if action == "remove" else chosen.new_labels
    loader = train_loader(session, int(config.influence.batch_size), (0, len(train)))
    fixed = correct(
        state.model, fstate.factors, train, rows, action=action, new_labels=chosen.new_labels, config=config,
        loader=loader, device=influence_device(config), finetune_steps=finetune_steps, seed=session.model_seed,
    )
    state.model.cpu()
    own_before = _own_loss(state.model, train.inputs[rows], target_labels)
    own_after = _own_loss(fixed.model, train.inputs[rows], target_labels)
    res = fixed.result
    summary: dict[str, Any] = {
        "name": config.name, "action": action, "strategy": strategy, "source": chosen.source,
        "examples_changed": int(len(rows)), "train_examples": int(len(train)),
        "step_scale": res.scale, "halvings": res.halvings, "objective_before": res.objective_before,
        "objective_after": res.objective_after, "tried": [list(t) for t in res.tried],
        "untracked_parameters": fixed.untracked, "finetune_steps": finetune_steps,
        "train": {"before": split_metrics(state.model, target), "after": split_metrics(fixed.model, target)},
        "test": {"before": split_metrics(state.model, data.test), "after": split_metrics(fixed.model, data.test)},
        "fixed_examples_loss": {
            "before": own_before / len(rows), "after": own_after / len(rows),
            "predicted_change": res.correction.predicted_loss_change(res.scale) / len(rows),
            "measured_change": (own_after - own_before) / len(rows),
        },
        "seconds": {"correction": fixed.seconds}, "version": __version__,
    }
    if verify:
        summary["verify"] = _verify(session, state.model, fixed.model, target, summary)
    return _write_outputs(session, summary, fixed.model, chosen, out)


def _verify(session: Session, original: Any, corrected: Any, target: Any, summary: dict[str, Any]) -> dict[str, Any]:
    """Retrain from scratch on the corrected data (same recipe and seed) and compare."""
    data = session.data()
    session.reporter.info("verify: retraining from scratch on the corrected data")
    model, seconds = retrain(data, target, session.config, seed=session.model_seed, reporter=session.reporter)
    summary["seconds"]["retraining"] = seconds
    return {"test": split_metrics(model, data.test), "train": split_metrics(model, target),
            **comparison(corrected, original, model, data.test)}


def _write_outputs(session: Session, summary: dict[str, Any], model: Any, chosen: FixSet,
                   out: Optional[Path]) -> FixResult:
    from influence_cli.data.overrides import read_label_overrides, write_label_overrides_text
    from influence_cli.models import save_checkpoint
    from influence_cli.render.files import write_json, write_text

    run, config, data = session.run, session.config, session.data()
    run.ensure()
    checkpoint = Path(out) if out is not None else run.root / "fixed.safetensors"
    save_checkpoint(model, checkpoint)
    ids, names = list(data.train.ids), list(data.class_names)
    examples = [{"id": ids[int(k)], "label": names[int(data.train.labels[k])]} for k in chosen.rows]
    overrides = None
    if chosen.new_labels is not None:
        merged: dict[int, int] = {}
        if config.data.label_overrides:  # keep the overrides the current labels already include
            merged.update(read_label_overrides(config.resolve_path(config.data.label_overrides), ids, names))
        for row, (k, new) in zip(examples, zip(chosen.rows.tolist(), chosen.new_labels.tolist())):
            merged[k] = new
            row["new_label"] = names[new]
        overrides = run.root / "label_overrides.csv"
        order = sorted(merged)
        write_text(overrides, write_label_overrides_text([ids[k] for k in order], [names[merged[k]] for k in order]))
    summary["outputs"] = {"checkpoint": str(checkpoint), "label_overrides": None if overrides is None else str(overrides)}
    summary["examples"] = examples
    json_path = run.root / "fix.json"
    write_json(summary, json_path)
    return FixResult(summary, checkpoint, overrides, json_path, examples)

