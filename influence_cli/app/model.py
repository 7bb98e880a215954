"""The model stage: reuse a valid checkpoint, load the user's, or train; every ensemble member."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from influence_cli import __version__
from influence_cli.app.session import (
    ModelState,
    Session,
    ensemble_sessions,
    member_checkpoint,
    member_training_hash,
)
from influence_cli.models import (
    build_model,
    check_model_fits,
    load_checkpoint,
    save_checkpoint,
)
from influence_cli.run import (
    RunDir,
    atomic_write_json,
    atomic_write_text,
    hash_file,
    read_json,
)
from influence_cli.training import accuracy, predict_probs, resolve_device, train_model


def ensure_model(session: Session, *, retrain: bool = False) -> ModelState:
    """Load the user's checkpoint, reuse a valid trained one, or train and save a new one.

    Under torchrun rank 0 trains (or verifies) first while the others wait, then they
    load the checkpoint it wrote: one training, one file.
    """
    dist = session.dist
    if dist.active and not dist.is_main:
        dist.barrier()
        return _ensure_model(session, retrain=False)
    state = _ensure_model(session, retrain=retrain)
    if dist.active:
        dist.barrier()
    return state


def _ensure_model(session: Session, *, retrain: bool = False) -> ModelState:
    config, run, reporter = session.config, session.run, session.reporter
    data = session.data()
    num_classes = len(data.class_names)
    model = build_model(config.model, tuple(data.input_shape), num_classes, seed=session.model_seed, base_dir=config.base_dir)
    check_model_fits(model, config.model, data.train.inputs[:2], num_classes)
    device = resolve_device(config.train.device)
    trained_now = False
    info: dict[str, Any] = {}
    user_checkpoint = member_checkpoint(config, session.member)
    if user_checkpoint:
        path = config.resolve_path(user_checkpoint)
        load_checkpoint(model, path)
        checkpoint_hash = hash_file(path)
        info["checkpoint"] = str(path)
    elif config.model.arch == "hf" and not config.model.fine_tune:
        from influence_cli.hf import model_location
        from influence_cli.run import hash_folder

        location = model_location(config.model, config.base_dir)
        checkpoint_hash = hash_folder(location)  # the folder's weights, audited as they are
        info["checkpoint"] = location
    else:
        meta = read_json(run.train_meta)
        want = member_training_hash(config, session.member, data.fingerprint("train"))
        problem = None if retrain else checkpoint_problem(run, meta, want, data.data_identity())
        if problem is None and not retrain:
            load_checkpoint(model, run.checkpoint)
            checkpoint_hash = meta["checkpoint_hash"]  # type: ignore[index]
            info = dict(meta)  # type: ignore[arg-type]
        else:
            if not retrain and meta is not None and meta.get("training_hash") == want:
                what = "is missing" if not run.checkpoint.is_file() else (
                    f"is truncated, damaged or replaced (its hash does not match {run.train_meta.name})"
                )
                reporter.info(f"{run.checkpoint} {what}; training again")
            run.ensure()
            if problem is not None and meta is not None:
                reporter.info(f"checkpoint in {run.root}: {problem}; retraining")
            if config.influence.ensemble_size() > 1:
                reporter.info(f"ensemble: training member {session.member + 1} of {config.influence.ensemble_size()}")
            stats = train_model(
                model, data.train, config.train, seed=session.model_seed, device=device, reporter=reporter
            )
            model.cpu()
            save_checkpoint(model, run.checkpoint)
            checkpoint_hash = hash_file(run.checkpoint)
            trained_now = True
            info = {"training_hash": want, "checkpoint_hash": checkpoint_hash, "data": data.data_identity(), **stats}
    state = ready_state(session, model, checkpoint_hash, trained_now, info)
    if trained_now:
        info.update({"train_accuracy": state.train_accuracy, "test_accuracy": state.test_accuracy, "version": __version__})
        atomic_write_json(run.train_meta, info)
        atomic_write_text(run.resolved_config, config.to_replay_yaml())
    return state


def ready_state(
    session: Session, model: Any, checkpoint_hash: str, trained_now: bool = False, info: Optional[dict[str, Any]] = None,
) -> ModelState:
    """The ModelState of a model in eval mode: its predictions on both splits (kept for
    the ranking) and accuracies.

    A reused checkpoint (``info`` from train.json, whose data fingerprint and checkpoint
    hash were just verified) keeps the accuracies stored when it was trained and predicts
    nothing now: the stage that needs the probabilities computes them (the mislabel loop
    already runs every training example forward), so a command pays one pass, not two.
    """
    data = session.data()
    model.eval()
    info = info or {}
    stored = (info.get("train_accuracy"), info.get("test_accuracy"))
    if not trained_now and info.get("checkpoint_hash") == checkpoint_hash and None not in stored:
        return ModelState(model, checkpoint_hash, False, float(stored[0]), float(stored[1]), info)
    train_probs = predict_probs(model, data.train)
    test_probs = predict_probs(model, data.test)
    train_acc = accuracy(train_probs, data.train.labels)
    test_acc = accuracy(test_probs, data.test.labels)
    return ModelState(model, checkpoint_hash, trained_now, train_acc, test_acc, info,
                      probs={"train": train_probs, "test": test_probs})


def checkpoint_problem(run: RunDir, meta: Optional[dict[str, Any]], want: str, data: dict[str, Any]) -> Optional[str]:
    """Why the stored checkpoint cannot be reused, or None when it is valid."""
    from influence_cli.data.fingerprint import describe_change

    if meta is None or not run.checkpoint.is_file():
        return "no trained checkpoint"
    stored = meta.get("data") if isinstance(meta.get("data"), dict) else None
    if stored is None or stored.get("fingerprint") != data["fingerprint"]:
        return describe_change(stored, data)
    if meta.get("training_hash") != want:
        return "the data, model or train settings of the config changed"
    if meta.get("checkpoint_hash") != hash_file(run.checkpoint):
        return "the checkpoint file does not match train.json (edited or half-written)"
    return None


@dataclass
class Member:
    """One model of the ensemble (a plain run has exactly one)."""

    session: Session
    state: ModelState


def ensure_members(session: Session) -> list[Member]:
    """Every ensemble member's ready model (trained, reused or loaded), or the model the
    session was given (the Python API)."""
    if session.model_state is not None:
        return [Member(session, session.model_state)]
    return [Member(s, ensure_model(s)) for s in ensemble_sessions(session)]
