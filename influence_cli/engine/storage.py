"""The stored form of every strategy: ``factors.safetensors`` + ``meta.json``, atomic.

One directory per fitted strategy. Files go to a temporary sibling directory that is
renamed into place, ``meta.json`` last, so an interrupted run never leaves a directory
that a later run would trust. Loading refuses missing or corrupt files with one line.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from torch import Tensor

from influence_cli.errors import CorruptFactorsError, FactorsError, output_error

__all__ = [
    "FACTORS_FILE",
    "META_FILE",
    "FORMAT_VERSION",
    "atomic_save",
    "read_meta",
    "read_stored",
    "merge_extra_meta",
    "inconsistent_factors",
    "package_version",
    "file_sha256",
    "meta_digest",
    "TENSORS_HASH",
    "META_HASH",
]

#: meta.json carries the sha256 of factors.safetensors and of its own content; both are
#: checked on every load, so a truncated, damaged or edited file is refused, never used.
TENSORS_HASH = "tensors_sha256"
META_HASH = "meta_sha256"

FACTORS_FILE = "factors.safetensors"
META_FILE = "meta.json"
FORMAT_VERSION = 1


def package_version() -> str:
    try:
        from influence_cli import __version__ as version
    except ImportError:  # pragma: no cover
        version = "0"
    return str(version)


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``meta.json`` of a factors directory (FactorsError if absent/corrupt)."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise FactorsError(f"no fitted factors at {Path(directory)} ({META_FILE} missing); run fit-factors")
    try:
        meta = json.loads(path.read_text())
    except OSError as exc:
        raise FactorsError(f"cannot read factors metadata {path}: {exc.strerror or exc}; re-run fit-factors") from None
    except ValueError as exc:
        raise CorruptFactorsError(
            f"corrupt factors metadata {path}: {exc}; re-run fit-factors", f"{META_FILE} is truncated or not valid JSON"
        ) from None
    if not isinstance(meta, dict):
        raise FactorsError(f"corrupt factors metadata {path}: not a JSON object; re-run fit-factors")
    if meta.get(META_HASH) != meta_digest(meta):
        if META_HASH in meta:
            why = "damaged or edited (its content hash does not match)"
        else:
            why = "without a content hash (written by an older infl)"
        raise CorruptFactorsError(f"corrupt factors metadata {path}: {why}; re-run fit-factors", f"{META_FILE} is {why}")
    return meta


def read_stored(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(meta.json, tensors) of a stored strategy directory; FactorsError with one line
    when either is missing or corrupt."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = read_meta(directory)
    path = directory / FACTORS_FILE
    if not path.is_file():
        raise FactorsError(f"no fitted factors at {directory} ({FACTORS_FILE} missing); run fit-factors")
    try:
        digest = file_sha256(path)
    except OSError as exc:
        raise FactorsError(f"cannot read factors file {path}: {exc.strerror or exc}") from None
    if digest != meta.get(TENSORS_HASH):
        raise CorruptFactorsError(
            f"corrupt factors file {path}: truncated or damaged (its sha256 does not match {META_FILE}); re-run fit-factors",
            f"{FACTORS_FILE} is truncated or damaged (its sha256 does not match {META_FILE})",
        )
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise FactorsError(f"corrupt factors file {path}: {exc}; re-run fit-factors") from None
    return meta, tensors


def inconsistent_factors(directory: str | os.PathLike, exc: BaseException) -> FactorsError:
    """The one-line error for a stored directory whose files load but do not fit together."""
    return FactorsError(f"factors at {directory} are incomplete or inconsistent ({exc}); re-run fit-factors")


def merge_extra_meta(meta: dict[str, Any], extra_meta: dict[str, Any] | None) -> dict[str, Any]:
    """meta with the caller's keys added; a clash with a reserved key is refused."""
    for key, value in (extra_meta or {}).items():
        if key in meta:
            raise ValueError(f"extra_meta key {key!r} clashes with a reserved meta key")
        meta[key] = value
    return meta


def atomic_save(target: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Write ``FACTORS_FILE`` then ``META_FILE`` into ``target`` atomically.

    Files go to a temporary sibling directory that is renamed into place, so an
    interrupted run never leaves a directory that a later run would trust. Shared by
    every strategy so callers treat all alike.
    """
    from safetensors.torch import save_file

    target = Path(target)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        raise output_error(target, exc) or exc from None
    try:
        save_file(tensors, str(tmp / FACTORS_FILE), metadata={"format": "infl-factors"})
        os.chmod(tmp / FACTORS_FILE, 0o666 & ~_umask())  # the temp file safetensors renames is 0600
        # meta.json last (its presence marks a complete write), carrying the sha256 of the
        # tensors and of itself: a truncated or damaged file is refused on load.
        meta[TENSORS_HASH] = file_sha256(tmp / FACTORS_FILE)
        meta[META_HASH] = meta_digest(meta)
        _write_json(tmp / META_FILE, meta)
        _fsync_dir(tmp)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        error = output_error(target, exc) if isinstance(exc, Exception) else None
        if error is None:
            raise
        raise error from None


def file_sha256(path: Path) -> str:
    """Full SHA-256 hex digest of a file (streamed; the pages stay cached for the load)."""
    import hashlib

    with open(path, "rb") as handle:
        if hasattr(hashlib, "file_digest"):  # Python >= 3.11
            return hashlib.file_digest(handle, "sha256").hexdigest()
        digest = hashlib.sha256()
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
        return digest.hexdigest()


def meta_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of meta.json's content without its own hash (canonical JSON)."""
    import hashlib

    plain = {k: v for k, v in meta.items() if k != META_HASH}
    return hashlib.sha256(json.dumps(plain, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
