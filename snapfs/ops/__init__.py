"""The mounted tree: a pure model of names and contents, and its pyfuse3 adapter.

    model.Tree        what the tree looks like (DESIGN §4), testable without a mount
    fs.Operations     pyfuse3 requests -> Tree calls; errors -> errnos
    mount.mount       `snapfs mount`: lifecycle, signals, systemd readiness
"""

from .fs import Operations
from .model import Tree

__all__ = ["Operations", "Tree"]
