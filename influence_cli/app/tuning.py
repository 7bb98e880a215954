"""``influence.damping: tuned``: the damping factor measured best by ``infl evaluate --lds
--tune-damping``, read back from ``runs/<name>/damping.json``.

The file holds one entry per strategy, each keyed to the checkpoint it was tuned on (its
content hash) and the training data's fingerprint. A later command with ``damping: tuned``
uses the entry's best factor as ``damping: auto`` with ``damping_factor`` = that factor;
when the model or the data changed since (retrained, another checkpoint, edited labels)
the entry is refused with one line saying how to re-tune, never silently reused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from influence_cli.errors import InflError

TUNED = "tuned"
DAMPING_FILE = "damping.json"

__all__ = ["TUNED", "DAMPING_FILE", "damping_path", "tuned_entry", "damping_settings", "hashed_config"]


def damping_path(session: Any) -> Path:
    return session.run.root / DAMPING_FILE


def _tune_hint(strategy: str) -> str:
    return f"run `infl evaluate --lds --tune-damping -s {strategy}` (or set influence.damping: auto)"


def tuned_entry(session: Any, strategy: str, checkpoint_hash: Optional[str] = None) -> dict[str, Any]:
    """The damping.json entry of ``strategy``, checked against the checkpoint (when given)
    and the training data; a one-line InflError when missing or stale."""
    from influence_cli.run import read_json

    path = damping_path(session)
    entries = read_json(path) if path.is_file() else None
    entry = entries.get(strategy) if isinstance(entries, dict) else None
    if not isinstance(entry, dict) or not isinstance(entry.get("best_factor"), (int, float)):
        raise InflError(f"influence.damping: tuned, but {path} holds no tuned damping for {strategy}; {_tune_hint(strategy)}")
    if checkpoint_hash is not None and entry.get("checkpoint_hash") != checkpoint_hash:
        raise InflError(
            f"influence.damping: tuned: {path} was tuned on another model (the checkpoint changed since); {_tune_hint(strategy)}"
        )
    if entry.get("data_fingerprint") != session.data_fingerprint():
        raise InflError(
            f"influence.damping: tuned: {path} was tuned on other training data (it changed since); {_tune_hint(strategy)}"
        )
    return entry


def damping_settings(session: Any, strategy: str, checkpoint_hash: Optional[str] = None) -> tuple[Any, Optional[float]]:
    """(damping, damping_factor) to fit ``strategy`` with: the config's, or for ``tuned``
    ("auto", the tuned factor)."""
    influence = session.config.influence
    if influence.damping != TUNED:
        return influence.damping, influence.damping_factor
    return "auto", float(tuned_entry(session, strategy, checkpoint_hash)["best_factor"])


def hashed_config(session: Any, strategy: str) -> Any:
    """The config as the factors' cache hash must see it: ``tuned`` replaced by the factor
    it stands for, so re-tuning to another factor makes stored factors stale."""
    config = session.config
    if config.influence.damping != TUNED:
        return config
    damping, factor = damping_settings(session, strategy)
    influence = config.influence.model_copy(update={"damping": damping, "damping_factor": factor})
    return config.model_copy(update={"influence": influence})
