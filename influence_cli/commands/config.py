"""`infl config list` and `infl config show`: the bundled configs and a resolved config."""

from __future__ import annotations

from typing import List, Optional

import typer

from influence_cli.commands import command, group
from influence_cli.commands.common import ConfigOption, SetOption

group("config", help="List the bundled configs or show a resolved config.")


@command("list", group="config")
def config_list() -> None:
    """List the bundled configs (use them with -c NAME)."""
    from influence_cli.config import DEFAULT_CONFIG, bundled_configs, bundled_summary

    for name, path in sorted(bundled_configs().items()):
        source, arch = bundled_summary(path)
        mark = " (default)" if name == DEFAULT_CONFIG else ""
        typer.echo(f"{name}{mark}\t{source} / {arch}")


@command("show", group="config")
def config_show(config: Optional[str] = ConfigOption, set_: Optional[List[str]] = SetOption) -> None:
    """Print the resolved config (defaults filled in, overrides applied) as YAML."""
    from influence_cli.config import load_config

    typer.echo(load_config(config, set_ or []).to_yaml(), nl=False)
