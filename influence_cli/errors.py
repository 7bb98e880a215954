"""Typed errors of the core.

The core raises these; only the CLI turns them into one-line messages and exit codes.
Every message should name the file or field at fault and say what to do.
"""

from __future__ import annotations

import errno
import os
import re


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


class CorruptFactorsError(FactorsError):
    """Stored factors whose files fail their content hashes (truncated, damaged, edited).

    ``reason`` says what is wrong without the fix, for callers that refit instead.
    """

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class InfluenceError(InflError):
    """A numerical problem in the influence engine (nothing tracked, non-finite curvature)."""


class ShardError(InflError):
    """A ``--shard`` partial result is missing, stale or inconsistent (``infl merge``)."""


class OutputError(InflError):
    """An output could not be written: disk full, read-only, no permission, a folder in the way."""

    def __init__(self, path: object, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


_WRITE_HINTS = {
    errno.ENOSPC: "no space left on the device; free some space or write elsewhere (--set output.dir=...)",
    errno.EDQUOT: "disk quota exceeded; free some space or write elsewhere (--set output.dir=...)",
    errno.EFBIG: "file too large for this file system; write elsewhere (--set output.dir=...)",
    errno.EROFS: "read-only file system; write elsewhere (--set output.dir=...)",
    errno.EACCES: "permission denied; fix the permissions or write elsewhere (--set output.dir=...)",
    errno.EPERM: "operation not permitted; fix the permissions or write elsewhere (--set output.dir=...)",
    errno.EISDIR: "a folder is in the way; remove it or give a file path",
    errno.ENOTDIR: "a file is in the way where a folder is needed; remove it or choose another path",
    errno.EEXIST: "a file is in the way where a folder is needed; remove it or choose another path",
    errno.ENOTEMPTY: "a folder is in the way; remove it or give a file path",
}

#: errno values that mean "the environment refused the write", not a bug.
WRITE_ERRNOS = frozenset(_WRITE_HINTS)

_OS_ERROR_CODE = re.compile(r"os error (\d+)|code: (\d+)")


def write_error_errno(exc: BaseException) -> int | None:
    """The errno behind an OSError or a safetensors write error (which only says it in text)."""
    if isinstance(exc, OSError):
        return exc.errno
    if type(exc).__name__ == "SafetensorError":
        match = _OS_ERROR_CODE.search(str(exc))
        if match:
            return int(match.group(1) or match.group(2))
    return None


def output_error(path: object, exc: BaseException) -> OutputError | None:
    """An OutputError naming ``path`` for an environment write failure, else None (a bug:
    let it propagate)."""
    code = write_error_errno(exc)
    if code is None:
        return None
    hint = _WRITE_HINTS.get(code)
    if hint is None:
        text = os.strerror(code) if code else (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        hint = f"{text[:1].lower()}{text[1:]}; check the path and the disk"
    return OutputError(path, f"cannot write: {hint}")
