"""The mounted tree: a pure model of names and contents, and its pyfuse3 adapter.

    queries.Queries   everything the tree may ask of the engine
    model.Tree        what the tree looks like and its verbs, testable without a mount
    kinds.TABLE       every path of the tree: how each kind is stat'ed, listed, opened
    nodes             the records that table is made of, and fitting paths to its rows
    render            the generated files' bytes
    fs.Operations     pyfuse3 requests -> Tree calls; errors -> errnos
    mount.mount       `snapfs mount`: lifecycle, signals, systemd readiness
"""

from .fs import Operations
from .model import Tree

__all__ = ["Operations", "Tree"]
