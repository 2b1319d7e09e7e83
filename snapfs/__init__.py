"""snapfs: QEMU/KVM virtual machine snapshots, managed like files.

The package is layered; imports point one way, down (docs/design.md draws it):

    cli, ops (the FUSE tree)
      -> engine (the facade; catalog: the caches, watch: what changed)
      -> recovery -> apply -> save (the protocols)
      -> operation (lock, journal, progress, trace) -> vm (one domain at run time)
      -> qemu, qmp, images, store, diskview
      -> config, files, procfs, trace, tasks, status, errors
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
