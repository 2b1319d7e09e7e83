"""snapfs: QEMU/KVM virtual machine snapshots, managed like files.

The package is layered; arrows point one way:

    cli, ops (the FUSE tree)  ->  engine  ->  domain, qmp, store, diskview  ->  config, errors
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
