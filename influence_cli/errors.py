"""Typed errors of the core.

The core raises these; only the CLI turns them into one-line messages and exit codes.
Every message should name the file or field at fault and say what to do.
"""

from __future__ import annotations


class InflError(Exception):
    """Base class: a problem with the user's input, config, data or cached state (exit 2)."""

    exit_code = 2


class ConfigError(InflError):
    """The experiment config is invalid; carries every problem found, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class DataError(InflError):
    """A data source could not be read or is malformed."""


class ModelError(InflError):
    """The model could not be built (unknown architecture, bad factory)."""


class CheckpointError(InflError):
    """A checkpoint is missing, corrupt, or does not match the model."""


class FactorsError(InflError):
    """Stored curvature factors are missing, stale or incompatible."""


class InfluenceError(InflError):
    """A numerical problem in the influence engine (nothing tracked, non-finite curvature)."""


class ShardError(InflError):
    """A ``--shard`` partial result is missing, stale or inconsistent (``infl merge``)."""
