"""``import infl``: the Python API of the infl CLI (``influence_cli.api``)."""

from influence_cli import __version__
from influence_cli.api import Auditor

__all__ = ["Auditor", "__version__"]
