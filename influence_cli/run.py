"""The run directory: where each stage's outputs live, atomic writes, content hashes.

Every stage reads what the one before wrote under ``runs/<name>/`` and recomputes nothing
that is still valid. Validity is decided by content hashes: the training hash covers
everything that shapes the trained weights (seed, data, model, train sections); the
checkpoint hash is the SHA-256 of the weights file itself.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from influence_cli.config import PATH_KEYS, Config
from influence_cli.errors import OutputError, output_error


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def hash_object(obj: Any) -> str:
    return hashlib.sha256(_canonical(obj)).hexdigest()[:16]


def hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def hash_folder(folder: str | Path) -> str:
    """Content hash of every file below ``folder`` (names and bytes), e.g. a saved
    Hugging Face model: weights, config and tokenizer."""
    folder = Path(folder)
    parts = [f"{p.relative_to(folder)}:{hash_file(p)}" for p in sorted(folder.rglob("*")) if p.is_file()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


# Where the data and the code live is not what they are: the content fingerprint covers
# the data, so a checkout in another folder (a CI runner) or a replayed config with
# resolved paths reuses the same cache.
_LOCATION_KEYS = {"data": (*PATH_KEYS["data"], "download", "cache"), "model": PATH_KEYS["model"]}


def _hashed_sections(config: Config) -> dict[str, Any]:
    dumped = config.model_dump(mode="json")
    for section, keys in _LOCATION_KEYS.items():
        dumped[section] = {k: v for k, v in dumped[section].items() if k not in keys}
    return dumped


def training_hash(config: Config, data_fingerprint: str) -> str:
    """Hash of everything that determines the trained weights: the config's seed, data,
    model and train sections, and the content fingerprint of the training split."""
    dumped = _hashed_sections(config)
    relevant = {k: dumped[k] for k in ("seed", "data", "model", "train")}
    if config.model.arch == "hf":  # the folder's place is not hashed (a location key): its content is
        from influence_cli.hf import model_location

        relevant["pretrained"] = hash_folder(model_location(config.model, config.base_dir))
    return hash_object({**relevant, "data_fingerprint": data_fingerprint})


def influence_hash(config: Config, strategy: str, data_fingerprint: str) -> str:
    """Hash of what determines fitted factors besides the checkpoint: the influence
    settings, the data section and the training split's content fingerprint."""
    dumped = _hashed_sections(config)
    inf = dumped["influence"]
    relevant = {k: inf[k] for k in ("damping", "damping_factor", "damping_scope", "fisher", "modules", "dtype")}
    if isinstance(inf.get(strategy), dict):  # the strategy's own options: it says which shape its state
        from influence_cli.engine import stored_options

        relevant[strategy] = stored_options(strategy, inf[strategy])
    if inf.get("amp"):
        relevant["amp"] = inf["amp"]
    return hash_object(
        {
            "seed": dumped["seed"], "data": dumped["data"], "influence": relevant, "strategy": strategy,
            "data_fingerprint": data_fingerprint,
        }
    )


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only on success.

    An interrupted write leaves at most a ``.tmp`` file that nothing ever reads (and that
    the next command holding the run's lock sweeps away). A write the environment refuses
    (disk full, read-only, permissions, a folder in the way) raises OutputError naming
    ``path``; the old file, if any, is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise output_error(exc.filename if exc.filename else path, exc) from None
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    try:
        try:
            yield tmp
            if tmp.exists():
                os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
            os.replace(tmp, path)
        except Exception as exc:  # noqa: BLE001 - only the environment's write errors are mapped
            error = output_error(path, exc)
            if error is None:
                raise
            raise error from None
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


SEAL_KEY = "content_sha256"


def seal(obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` plus the SHA-256 of its canonical JSON, so a damaged file (a flipped byte
    that still parses) is caught by :func:`is_sealed`."""
    plain = json.loads(json.dumps({k: v for k, v in obj.items() if k != SEAL_KEY}, default=str))
    return {**plain, SEAL_KEY: hashlib.sha256(_canonical(plain)).hexdigest()}


def is_sealed(obj: Any) -> bool:
    """True when ``obj`` carries a seal that matches its content."""
    if not isinstance(obj, dict) or not isinstance(obj.get(SEAL_KEY), str):
        return False
    plain = {k: v for k, v in obj.items() if k != SEAL_KEY}
    return hashlib.sha256(_canonical(plain)).hexdigest() == obj[SEAL_KEY]


def read_json(path: Path) -> dict[str, Any] | None:
    """Read a JSON file the tool wrote; None when missing or unreadable (treated as absent)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def replace_directory(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written directory into place, replacing an older one."""
    try:
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        if final_dir.exists():
            old = final_dir.with_name(f".{final_dir.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(final_dir, old)
            os.replace(tmp_dir, final_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_dir, final_dir)
    except OSError as exc:
        raise output_error(final_dir, exc) from None


def check_output_file(path: Path, option: str, example: str = "ranking.csv") -> None:
    """Refuse an output file path that cannot be written, before any work is done: a
    folder, a file where a folder is needed, or an unwritable folder (OutputError)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(path, f"is a folder, not a file ({option}); give a file path, e.g. {path / example}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(path, f"cannot write: {parent} is a file, not a folder ({option}); choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(path, f"cannot write: {parent} is read-only or not writable ({option}); choose another path")


# ----------------------------------------------------------------------------- run lock

#: Temporary names this tool's writers use (atomic_path/mkstemp, safetensors' own temp
#: file, factors' temp and old directories, replace_directory's old directory).
_TEMPORARY_FILE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$|^\.tmp[A-Za-z0-9]{6}$")
_TEMPORARY_DIR = re.compile(r"^\..+\.tmp-\d+-[0-9a-f]{8}$|^\..+\.old-[0-9a-f]{8}$|^\..+\.old$")


def sweep_temporaries(root: Path) -> int:
    """Remove what interrupted writers left under ``root``; call only while holding the
    run lock (no other infl command is writing there). Returns how many were removed."""
    removed = 0
    for folder, dirs, files in os.walk(root):
        for name in list(dirs):
            if _TEMPORARY_DIR.match(name):
                dirs.remove(name)
                shutil.rmtree(Path(folder) / name, ignore_errors=True)
                removed += 1
        for name in files:
            if _TEMPORARY_FILE.match(name):
                with contextlib.suppress(OSError):
                    (Path(folder) / name).unlink()
                    removed += 1
    return removed


class RunLock:
    """An exclusive ``fcntl.flock`` on ``<run>/.lock`` for the duration of a command that
    writes into the run, so two commands on one run directory take turns.

    The holder writes its pid into the file; a command that has to wait says so once
    (``on_wait(pid)``) and blocks until the holder exits (a killed holder releases it
    too: the kernel drops the lock with the process).
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.path = self.root / ".lock"
        self.fd: int | None = None

    def acquire(self, on_wait: Callable[[str], None] | None = None) -> "RunLock":
        import fcntl

        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise output_error(exc.filename if exc.filename else self.path, exc) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait(_read_pid(fd))
                fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return self  # a file system without locks: run unlocked, as before
            raise output_error(self.path, exc) from None
        except BaseException:  # interrupted while waiting
            os.close(fd)
            raise
        self.fd = fd
        sweep_temporaries(self.root)
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        import fcntl

        with contextlib.suppress(OSError):
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return "?"
    return text if text.isdigit() else "?"


class RunDir:
    """Paths of one run: ``<output.dir>/<name>/``."""

    def __init__(self, config: Config, member: int = 0):
        """member k >= 1 of an ensemble lives in ``<run>/ensemble/member-<k>/``."""
        self.config = config
        self.member = member
        base = Path(config.output.dir) / config.name
        self.root = base if member == 0 else base / "ensemble" / f"member-{member}"

    def ensure(self) -> Path:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise output_error(exc.filename if exc.filename else self.root, exc) from None
        return self.root

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint.safetensors"

    @property
    def train_meta(self) -> Path:
        return self.root / "train.json"

    @property
    def resolved_config(self) -> Path:
        return self.root / "config.yaml"

    def factors_dir(self, strategy: str) -> Path:
        return self.root / "factors" / strategy

    @property
    def self_influence_csv(self) -> Path:
        return self.root / "self_influence.csv"

    @property
    def mislabels_csv(self) -> Path:
        return self.root / "mislabels.csv"

    @property
    def summary_json(self) -> Path:
        return self.root / "summary.json"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    def scores_csv(self, stem: str) -> Path:
        return self.root / "scores" / f"{stem}.csv"

    def shard_dir(self, stage: str) -> Path:
        """``--shard i/n`` partial results of one stage: runs/<name>/shards/<stage>/."""
        return self.root / "shards" / stage

    def self_influence_cache(self, strategy: str) -> Path:
        return self.root / "cache" / f"self_influence-{strategy}.safetensors"
