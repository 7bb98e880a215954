"""The built-in strategies, one file each; importing this package registers them.

A file here declares its strategy class (name, description, options, flags, hooks) and
imports its numerical code only when it fits or loads, so that listing strategies (the
CLI's --help, config validation) does not import torch.
"""

from influence_cli.engine.strategies import ekfac, kfac, diagonal, identity, exact, lissa  # noqa: F401  (registration order = CLI order)

__all__ = ["ekfac", "kfac", "diagonal", "identity", "exact", "lissa"]
