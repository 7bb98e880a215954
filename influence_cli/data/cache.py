"""Decode a data source once: the built train/test splits, kept in the run directory.

Why: every command of a pipeline (train, fit-factors, self-influence, score, check, report)
needs the same decoded tensors, and decoding (parsing a 10,000-row CSV, decoding thousands
of images, importing scikit-learn for digits) costs seconds for milliseconds of work.

Validity, cheapest check first:
- the key: the config's data section (paths resolved), the seed (it seeds the split) and a
  hash of this package's data code, so a decoding fix never reads an old cache;
- every source file's size and modification time; a file whose stat changed is hashed
  and compared with the content hash stored at build time (a touched but unchanged file
  keeps the cache, an edited one rebuilds it);
- on load, the fingerprints of both splits are recomputed from the loaded tensors and
  compared with the stored ones, so a truncated or corrupted cache is rebuilt, never used.

Inputs decoded per batch (data.in_memory: false) are not cached: there is no tensor to
keep. Sources read from torchvision's folders (mnist, fashion_mnist, cifar10) and synthetic data
are not cached: the first are already fast binary formats, the second is generated.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from influence_cli.config import Config
from influence_cli.run import hash_file

from .dataset import Datasets, ExampleSet, LabelNoise
from .fingerprint import fingerprint_split

CACHE_FORMAT = 1
CACHED_SOURCES = ("digits", "table", "image_folder", "csv_manifest")


def _code_hash() -> str:
    digest = hashlib.sha256()
    folder = Path(__file__).parent
    for path in sorted(folder.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _tree_files(folder: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        out.extend(Path(dirpath) / name for name in sorted(filenames))
    return out


def _manifest_images(manifest: Path) -> list[Path]:
    """The image files a manifest lists (paths relative to its folder)."""
    import csv

    try:
        with open(manifest, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle, skipinitialspace=True))
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
    out = []
    for row in rows:
        rel = next((v for k, v in row.items() if k is not None and k.strip() == "path"), None)
        if rel and rel.strip():
            out.append(manifest.parent / rel.strip())
    return out


def source_files(config: Config) -> Optional[list[Path]]:
    """Every file the source reads, or None when the source is not cached."""
    data = config.data
    if data.source not in CACHED_SOURCES:
        return None
    if data.source == "digits":
        spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            return None
        base = Path(list(spec.submodule_search_locations)[0])
        return [base / "datasets" / "data" / "digits.csv.gz", base / "__init__.py"]
    given = [data.path] if data.path is not None else [data.train_path, data.test_path]
    paths = [config.resolve_path(p) for p in given if p is not None]
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(_tree_files(path))
        elif path.is_file():
            files.append(path)
            if data.source == "csv_manifest":
                files.extend(_manifest_images(path))
        else:
            return None  # let the builder report the missing path
    return files


def _stat(path: Path) -> Optional[list[int]]:
    try:
        st = path.stat()
    except OSError:
        return None
    return [int(st.st_size), int(st.st_mtime_ns)]


def cache_key(config: Config) -> str:
    dumped = config.resolved_dump()["data"]
    blob = json.dumps({"format": CACHE_FORMAT, "data": dumped, "seed": config.seed, "code": _code_hash()},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def files_unchanged(stored: dict[str, Any], files: list[Path]) -> bool:
    """True when the source files are the ones the cache was built from (stat, then content)."""
    if sorted(stored) != sorted(str(f) for f in files):
        return False
    for file in files:
        size, mtime, sha = stored[str(file)]
        now = _stat(file)
        if now is None:
            return False
        if now != [size, mtime] and (now[0] != size or hash_file(file) != sha):
            return False
    return True


# ----------------------------------------------------------------------------- (de)serialise


def _aux_hash(tensors: dict[str, torch.Tensor]) -> str:
    """Hash of the tensors the split fingerprints do not cover (scaling, raw values, noise)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        if name.endswith((".inputs", ".labels")):
            continue
        array = np.ascontiguousarray(tensors[name].numpy())
        digest.update(f"{name}{array.dtype.str}{array.shape}".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()[:16]

_SPLIT_TENSORS = ("inputs", "labels", "mean", "std")


def _pack(data: Datasets) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    info: dict[str, Any] = {"class_names": list(data.class_names), "input_shape": list(data.input_shape),
                            "kind": data.kind, "splits": {}}
    for name in ("train", "test"):
        part: ExampleSet = getattr(data, name)
        for field in _SPLIT_TENSORS:
            value = getattr(part, field)
            if value is not None:
                shared = name == "test" and value is getattr(data.train, field)
                tensors[f"{name}.{field}"] = value.clone() if shared else value.contiguous()
        if part.raw is not None:
            tensors[f"{name}.raw"] = torch.from_numpy(np.ascontiguousarray(part.raw, dtype=np.float64))
        info["splits"][name] = {"ids": part.ids, "kind": part.kind, "feature_names": part.feature_names,
                                "pixel_scale": part.pixel_scale, "raw": part.raw is not None,
                                "fingerprint": data.fingerprint(name)}
    if data.noise is not None:
        tensors["noise.flipped"] = data.noise.flipped.contiguous()
        tensors["noise.original_labels"] = data.noise.original_labels.contiguous()
        info["noise"] = {"fraction": data.noise.fraction, "kind": data.noise.kind, "seed": data.noise.seed}
    info["aux_hash"] = _aux_hash(tensors)
    return tensors, info


def _unpack(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> Optional[Datasets]:
    """The Datasets of a cache file, or None when its content does not hash as recorded."""
    if _aux_hash(tensors) != info.get("aux_hash"):
        return None
    parts = {}
    for name in ("train", "test"):
        meta = info["splits"][name]
        raw = tensors[f"{name}.raw"].numpy() if meta["raw"] else None
        part = ExampleSet(
            inputs=tensors[f"{name}.inputs"], labels=tensors[f"{name}.labels"], ids=meta["ids"], kind=meta["kind"],
            feature_names=meta["feature_names"], mean=tensors.get(f"{name}.mean"), std=tensors.get(f"{name}.std"),
            pixel_scale=meta["pixel_scale"], raw=raw,
        )
        if fingerprint_split(part.inputs, part.labels, part.ids, info["class_names"]) != meta["fingerprint"]:
            return None
        parts[name] = part
    noise = None
    if "noise" in info:
        noise = LabelNoise(flipped=tensors["noise.flipped"], original_labels=tensors["noise.original_labels"], **info["noise"])
    data = Datasets(train=parts["train"], test=parts["test"], class_names=info["class_names"],
                    input_shape=tuple(info["input_shape"]), kind=info["kind"], noise=noise)
    for name in ("train", "test"):
        data._fingerprints[name] = info["splits"][name]["fingerprint"]
    return data


def _read(path: Path) -> Optional[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            info = json.loads(handle.metadata()["infl"])
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception:  # noqa: BLE001 - truncated, corrupt or foreign: rebuild
        return None
    if not isinstance(info, dict) or info.get("format") != CACHE_FORMAT:
        return None
    return tensors, info


def _write(path: Path, data: Datasets, files: dict[str, list[Any]], replay: list[str]) -> None:
    from safetensors.torch import save_file

    from influence_cli.run import atomic_path

    tensors, info = _pack(data)
    info.update({"format": CACHE_FORMAT, "files": files, "warnings": replay})
    try:
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"infl": json.dumps(info)})
    except OSError:
        return  # a cache is an optimisation: a full or read-only disk must not fail the command
    for old in path.parent.glob("data-*.safetensors"):
        if old != path:
            old.unlink(missing_ok=True)


def load_datasets(config: Config, cache_dir: Optional[Path], build: Callable[[Config], Datasets], *,
                  write: bool = True) -> Datasets:
    """``build(config)``, or the cached result of an earlier identical build."""
    files = source_files(config) if cache_dir is not None and config.data.cache else None
    if files is None:
        return build(config)
    path = Path(cache_dir) / f"data-{cache_key(config)}.safetensors"
    if path.is_file():
        found = _read(path)
        if found is not None and files_unchanged(found[1].get("files", {}), files):
            try:
                data = _unpack(*found)
            except (KeyError, TypeError, ValueError):
                data = None  # written by another version or damaged: rebuild
            if data is not None:
                for message in found[1].get("warnings", []):
                    warnings.warn(message, stacklevel=2)
                return data
    # Record the files' state before decoding them, and write the cache only when nothing
    # changed meanwhile: a cache must never pair old tensors with a newer file state.
    before = {str(f): [*(_stat(f) or [0, 0]), hash_file(f)] for f in files if f.is_file()} if write else {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = build(config)
    replay = [str(w.message) for w in caught]
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    lazy = not isinstance(data.train.inputs, torch.Tensor)  # data.in_memory: false decodes per batch
    if write and not lazy and len(before) == len(files) and all(_stat(f) == before[str(f)][:2] for f in files):
        _write(path, data, before, replay)
    return data
