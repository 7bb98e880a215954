"""Loading a config: bundled names or paths, YAML parsing, ``--set`` overrides, and
pydantic's errors turned into one line per problem (``<file>: <dotted.key>: <message>``)."""


from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import (
    ValidationError,
)

from influence_cli.errors import ConfigError


from influence_cli.config.schema import DEFAULT_CONFIG, Config, DataConfig, ModelConfig
from influence_cli.config.sections import config_model

# ----------------------------------------------------------------------------- loading


def bundled_configs() -> dict[str, Path]:
    """Name → path of the configs shipped inside the package."""
    folder = importlib.resources.files("influence_cli") / "configs"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".yaml")}


def bundled_summary(path: Path) -> tuple[str, str]:
    """(data.source, model.arch) of a bundled config, read without validating it (so that
    `infl config list` does not import torch; the tests validate every bundled config)."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    source = (raw.get("data") or {}).get("source", DataConfig.model_fields["source"].default)
    arch = (raw.get("model") or {}).get("arch", ModelConfig.model_fields["arch"].default)
    return str(source), str(arch)


def find_config(name_or_path: Optional[str]) -> tuple[Path, bool]:
    """Return (path, is_bundled) for a -c argument: an existing path or a bundled name."""
    if name_or_path is None:
        name_or_path = DEFAULT_CONFIG
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path, False
    bundled = bundled_configs()
    stem = name_or_path[:-5] if name_or_path.endswith(".yaml") else name_or_path
    if stem in bundled and not path.exists():
        return bundled[stem], True
    if path.is_dir():
        raise ConfigError([f"{path}: is a folder, not a YAML config file"])
    names = ", ".join(sorted(bundled))
    raise ConfigError([f"{name_or_path}: no such config file or bundled config (bundled: {names})"])


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``dotted.key=value``; the value is read as YAML (5 → int, true → bool)."""
    if "=" not in text:
        raise ConfigError([f"--set {text}: expected dotted.key=value, for example --set train.epochs=5"])
    key, raw = text.split("=", 1)
    keys = [k for k in key.strip().split(".")]
    if not key.strip() or any(not k for k in keys):
        raise ConfigError([f"--set {text}: the key must be dotted names, for example train.epochs"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return keys, value


def apply_overrides(data: dict[str, Any], overrides: list[str], label: str) -> dict[str, Any]:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise ConfigError([f"{label}: {'.'.join(keys)}: '{k}' is a value, not a section"])
            node = child
        node[keys[-1]] = value
    return data


_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="), "less_than": ("lt", "<"), "less_than_equal": ("le", "<=")}


def _shown(value: Any) -> str:
    """A config value as the user typed it (YAML-like), for messages."""
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool) or value is None:
        return yaml.safe_dump(value).split("\n")[0]
    return str(value)


def _message(item: Any) -> str:
    """One pydantic error in the config's terms: what is wrong; what to do."""
    kind, msg, ctx = item["type"], item["msg"], item.get("ctx") or {}
    if kind == "extra_forbidden":
        return "unknown key (check the spelling; see `infl config show` for valid keys)"
    if kind in _BOUNDS:
        key, op = _BOUNDS[kind]
        return f"{_shown(item['input'])} is out of range; use a number {op} {ctx[key]}"
    if kind == "finite_number":
        return f"{_shown(item['input'])} is not a finite number; use a finite number"
    if kind == "too_short":
        return f"needs at least {ctx['min_length']} entr{'y' if ctx['min_length'] == 1 else 'ies'}, got {ctx['actual_length']}"
    if msg.startswith("Value error, "):
        return msg[len("Value error, "):]
    return msg


def _format_errors(label: str, error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        loc = [x for x in item["loc"] if not str(x).startswith("function-")]
        # pydantic puts union branch names into loc; keep only real field names.
        loc = [x for x in loc if x not in ("float", "literal['auto']", "str", "int", "list[str]")]
        path = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc).lstrip(".") or "(top level)"
        problems.append(f"{label}: {path}: {_message(item)}")
    # Unions report one error per branch for the same path; keep the first per path.
    seen: set[str] = set()
    unique = []
    for p in problems:
        key = p.split(": ")[1]
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def config_from_dict(data: Any, label: str = "<config>", base_dir: Optional[Path] = None) -> Config:
    if not isinstance(data, dict):
        raise ConfigError([f"{label}: (top level): expected a mapping of sections (name, data, model, ...)"])
    try:
        config = config_model().model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_errors(label, error)) from None
    config.base_dir = base_dir or Path.cwd()
    config.source_file = label
    return config


def load_config(name_or_path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Load a config by path or bundled name, apply ``--set`` overrides, validate."""
    path, is_bundled = find_config(name_or_path)
    label = f"{path.stem} (bundled)" if is_bundled else str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{label}: cannot read: {exc}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([f"{label}: {where}invalid YAML: {problem}"]) from None
    if data is None:
        data = {}
    if isinstance(data, dict):
        data = apply_overrides(data, overrides or [], label)
    # Bundled configs resolve relative paths against the working directory.
    base = Path.cwd() if is_bundled else path.resolve().parent
    return config_from_dict(data, label, base)
