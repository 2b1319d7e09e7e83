"""The command line: the xl-style snapshot subcommands (docs/design.md), the domain
verbs and ``mount``.

Parses arguments, calls the engine, prints for humans or ``--json``. A failure
is one line on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .config import Dirs, list_domains
from .errors import SnapfsError
from .status import printable

if TYPE_CHECKING:
    from .engine import Engine
    from .status import DomainStatus
    from .store import VmSnapshot
    from .tables import DiskSnapshot

__all__ = ["main"]

logger = logging.getLogger("snapfs")

T = TypeVar("T")
EXIT_FAILURE = 1
EXIT_INTERNAL = 70


def _human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _time(sec: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sec))


def _clock(sec: int, nsec: int) -> str:
    return f"{sec // 3600:04d}:{sec // 60 % 60:02d}:{sec % 60:02d}.{nsec // 1_000_000:03d}"


def _print_table(rows: list[list[str]], header: list[str]) -> None:
    rows = [[printable(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str, allow_nan=False))


async def cmd_domain(engine: Engine, args: argparse.Namespace) -> None:
    if args.verb == "define":
        dom = await engine.domain_define(Path(args.file), replace=args.replace)
        print(f"domain {dom.name} defined (uuid {dom.uuid})")
    elif args.verb == "undefine":
        gone = await engine.domain_undefine(args.domain, with_snapshots=args.with_snapshots)
        print(f"domain {args.domain} undefined" + (f", with its {gone} VM snapshot(s)"
                                                  if gone else ""))
    elif args.verb == "start":
        await engine.domain_start(args.domain, paused=args.paused)
        print(f"domain {args.domain} started{' paused' if args.paused else ''}")
    elif args.verb == "stop":
        clean = await engine.domain_stop(args.domain, force=args.force, timeout=args.timeout)
        how = "shut down" if clean else "stopped (QEMU quit" + ("" if args.force else
                                                                  " after the ACPI timeout") + ")"
        print(f"domain {args.domain} {how}")
    elif args.verb in ("list", "status"):
        _show_statuses([await engine.domain_status(n) for n in _domains(engine.dirs, args)], args)


def _domains(dirs: Dirs, args: argparse.Namespace) -> list[str]:
    return list_domains(dirs) if args.verb == "list" else [args.domain]


def _show_statuses(statuses: list[DomainStatus], args: argparse.Namespace) -> None:
    if args.json:
        _json([asdict(s) for s in statuses] if args.verb == "list" else asdict(statuses[0]))
        return
    rows = [[s.name, s.state, s.current or "-",
             s.operation.operation if s.operation else "-"] for s in statuses]
    _print_table(rows, ["NAME", "STATE", "CURRENT", "OPERATION"])
    if args.verb == "status" and statuses[0].reason:
        print(f"crashed: {printable(statuses[0].reason)}; `snapfs domain start "
              f"{args.domain}` starts it again (its running state is lost: "
              "vm-snapshot-apply brings one back)")
    if args.verb == "status" and statuses[0].last_error:
        print(f"last error: {printable(statuses[0].last_error)}")


async def _show_progress(engine: Engine, domain: str) -> None:
    """Draw the operation's progress on stderr until cancelled (only on a terminal)."""
    import trio

    shown = False
    try:
        while True:
            await trio.sleep(0.2)
            progress = engine.progress(domain)
            if progress is None or not progress.phase:
                continue
            line = progress.phase
            if progress.total:
                share = min(progress.done / progress.total, 1.0)
                bar = "#" * int(share * 30)
                line += (f" [{bar:<30}] {share:4.0%} {_human_size(progress.done)}"
                         f" of {_human_size(progress.total)}")
            sys.stderr.write(f"\r\033[K{line}")
            sys.stderr.flush()
            shown = True
    finally:
        if shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


async def _with_progress(engine: Engine, domain: str, operation: Awaitable[T]) -> T:
    if not sys.stderr.isatty():
        return await operation
    import trio

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_show_progress, engine, domain)
        try:
            return await operation
        finally:
            nursery.cancel_scope.cancel()


async def cmd_vm_snapshot(engine: Engine, args: argparse.Namespace) -> None:
    if args.verb == "create":
        snap = await _with_progress(engine, args.domain, engine.vm_snapshot_create(
            args.domain, args.name, mode=args.mode))
        print(f"VM snapshot {snap.name} of {args.domain} created ({snap.state})")
    elif args.verb == "delete":
        await engine.vm_snapshot_delete(args.domain, args.name)
        print(f"VM snapshot {args.name} of {args.domain} deleted")
    elif args.verb == "apply":
        await _with_progress(engine, args.domain, engine.vm_snapshot_apply(
            args.domain, args.name, paused=args.paused, undo=not args.no_undo))
        print(f"domain {args.domain} reverted to VM snapshot {args.name}"
              f"{' (paused)' if args.paused else ''}")
    elif args.verb == "list":
        _show_vm_snapshots(await engine.vm_snapshot_list(args.domain), args)


def _show_vm_snapshots(snaps: list[VmSnapshot], args: argparse.Namespace) -> None:
    if args.tree:
        print("\n".join(printable(line) for line in _lineage(snaps)))
        return
    if args.json:
        _json([{**asdict(s), "save": str(s.save) if s.save else None} for s in snaps])
        return
    _print_table([[s.name, _time(s.creation_time), s.state,
                   _human_size(s.save_size) if s.save else "-", s.parent or "-"]
                  for s in snaps], ["NAME", "CREATED", "STATE", "SAVE SIZE", "PARENT"])
    for snap in snaps:
        if snap.damage:
            print(f"{printable(snap.name)} is damaged: {printable(snap.damage)} "
                  f"(vm-snapshot-delete removes what is left of it)")


def _lineage(snaps: list[VmSnapshot]) -> list[str]:
    """The snapshots as a tree of parents and children, drawn as ``virsh snapshot-list
    --tree`` draws it; a snapshot whose parent is not listed is a root."""
    names = {s.name for s in snaps}
    children: dict[str, list[str]] = {}
    for snap in snaps:
        parent = snap.parent if snap.parent in names and snap.parent != snap.name else ""
        children.setdefault(parent, []).append(snap.name)
    lines: list[str] = []

    def draw(name: str, prefix: str, last: bool, root: bool) -> None:
        lines.append(name if root else f"{prefix}+- {name}")
        below = children.get(name, [])
        inner = prefix if root else prefix + ("    " if last else "|   ")
        for index, child in enumerate(below):
            lines.append(f"{inner}|")
            draw(child, inner, index == len(below) - 1, False)

    for root in children.get("", []):
        draw(root, "", True, True)
        lines.append("")
    return lines[:-1]


async def cmd_disk_snapshot(engine: Engine, args: argparse.Namespace) -> None:
    if args.verb == "create":
        tag = await engine.disk_snapshot_create(args.domain, args.name)
        print(f"disk snapshot {tag} of {args.domain} created")
    elif args.verb == "delete":
        await engine.disk_snapshot_delete(args.domain, id=args.id, tag=args.name)
        print(f"disk snapshot {args.name or 'id ' + args.id} of {args.domain} deleted")
    elif args.verb == "list":
        _show_disk_snapshots(await engine.disk_snapshot_list(args.domain), args)


def _show_disk_snapshots(snaps: list[DiskSnapshot], args: argparse.Namespace) -> None:
    if args.json:
        _json([asdict(s) for s in snaps])
        return
    _print_table([[s.dev, s.id, s.tag, _human_size(s.vm_state_size), _time(s.date_sec),
                   _clock(s.vm_clock_sec, s.vm_clock_nsec)] for s in snaps],
                 ["DISK", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK"])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="snapfs", description=__doc__.splitlines()[0])
    parser.add_argument("--config-dir", help="domain definitions (default /etc/snapfs, "
                        "or $SNAPFS_CONFIG_DIR)")
    parser.add_argument("--state-dir", help="snapshots (default /var/lib/snapfs, "
                        "or $SNAPFS_STATE_DIR)")
    parser.add_argument("--run-dir", help="sockets, pidfiles, locks (default /run/snapfs, "
                        "or $SNAPFS_RUN_DIR)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    dom = sub.add_parser("domain", help="define, start, stop, list domains")
    dsub = dom.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = dsub.add_parser("define", help="install a TOML definition")
    p.add_argument("file")
    p.add_argument("--replace", action="store_true",
                   help="replace a shut-off domain's definition (keeps its uuid, NVRAM, MACs)")
    p = dsub.add_parser("undefine", help="remove a shut-off domain's definition and NVRAM")
    p.add_argument("domain")
    p.add_argument("--with-snapshots", action="store_true",
                   help="delete its VM snapshots too (the disk images stay)")
    p = dsub.add_parser("start", help="start a domain's QEMU")
    p.add_argument("domain")
    p.add_argument("--paused", action="store_true", help="start with vCPUs stopped")
    p = dsub.add_parser("stop", help="ACPI power-down, then quit after a timeout")
    p.add_argument("domain")
    p.add_argument("--force", action="store_true", help="quit QEMU at once")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (default 60)")
    p = dsub.add_parser("list", help="every defined domain and its state")
    p.add_argument("--json", action="store_true")
    p = dsub.add_parser("status", help="one domain's state")
    p.add_argument("domain")
    p.add_argument("--json", action="store_true")
    dom.set_defaults(run=cmd_domain)

    def add(name: str, run: Callable[..., Awaitable[None]], verb: str, helptext: str,
            name_opt: str = "optional", json_opt: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=helptext)
        if name_opt == "optional":
            p.add_argument("-n", "--name", dest="name", metavar="NAME",
                           help="default: epoch seconds")
        elif name_opt == "required":
            p.add_argument("-n", "--name", dest="name", metavar="NAME", required=True)
        p.add_argument("domain", metavar="DOMAIN")
        if json_opt:
            p.add_argument("--json", action="store_true", help="print JSON")
        p.set_defaults(run=run, verb=verb)
        return p

    p = add("vm-snapshot-create", cmd_vm_snapshot, "create", "snapshot memory, disks, definition")
    p.add_argument("--mode", choices=("live", "paused"), default="live",
                   help="live: memory written while the VM runs (default); paused: stop-and-save")
    add("vm-snapshot-delete", cmd_vm_snapshot, "delete", "delete a VM snapshot", "required")
    p = add("vm-snapshot-list", cmd_vm_snapshot, "list", "list VM snapshots", "none",
            json_opt=True)
    p.add_argument("--tree", action="store_true", help="draw the snapshots' lineage")
    p = add("vm-snapshot-apply", cmd_vm_snapshot, "apply", "revert the domain", "required")
    p.add_argument("--paused", action="store_true", help="leave the restored domain paused")
    p.add_argument("--no-undo", action="store_true",
                   help="keep no .undo of the state it replaces (faster; no way back)")
    add("disk-snapshot-create", cmd_disk_snapshot, "create", "snapshot every disk at once")
    p = add("disk-snapshot-delete", cmd_disk_snapshot, "delete", "delete a disk snapshot", "none")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("-i", dest="id", metavar="ID")
    which.add_argument("-n", "--name", dest="name", metavar="NAME")
    add("disk-snapshot-list", cmd_disk_snapshot, "list", "list disk snapshots", "none",
        json_opt=True)

    p = sub.add_parser("mount", help="mount the snapshot tree")
    p.add_argument("mountpoint")
    p.add_argument("--foreground", "-f", action="store_true", help="do not daemonize")
    p.add_argument("--allow-other", action="store_true",
                   help="let other users list and read metadata (permissions still apply)")
    p.set_defaults(run=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # A command's failure is the one line main() prints, so it logs only with -v;
    # the tree's log is where the reasons of failed verbs go.
    quiet = logging.INFO if args.command == "mount" else logging.CRITICAL
    logging.basicConfig(level=logging.DEBUG if args.verbose else quiet,
                        format="snapfs: %(levelname)s: %(name)s: %(message)s")
    if not args.verbose:
        # qemu.qmp logs connection failures itself; snapfs reports them in its own words.
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    dirs = Dirs.from_env(args.config_dir, args.state_dir, args.run_dir)
    what = args.command + (f" {args.verb}" if args.command == "domain" else "")
    try:
        if args.command == "mount":
            from .ops.mount import mount
            return mount(dirs, Path(args.mountpoint), foreground=args.foreground,
                         allow_other=args.allow_other)
        if _from_files(dirs, args):
            return 0
        # Imported here: `--help`, a usage error and what files can answer need
        # neither trio nor the engine.
        import trio

        from .engine import Engine
        trio.run(args.run, Engine(dirs), args)
    except BaseExceptionGroup as group:
        from .tasks import cause
        return _failed(what, cause(group))
    except BaseException as err:
        return _failed(what, err)
    return 0


def _from_files(dirs: Dirs, args: argparse.Namespace) -> bool:
    """Answer a read-only command from files (``glance``), without trio and the engine;
    false when files cannot tell, or to say why not: the engine then answers, and
    words a failure as it always does."""
    from . import glance
    try:
        if args.command == "domain" and args.verb in ("list", "status"):
            statuses = glance.statuses(dirs, _domains(dirs, args))
            if statuses is not None:
                _show_statuses(statuses, args)
            return statuses is not None
        if args.command == "vm-snapshot-list":
            snaps = glance.vm_snapshots(dirs, args.domain)
            if snaps is not None:
                _show_vm_snapshots(snaps, args)
            return snaps is not None
        if args.command == "disk-snapshot-list":
            tags = glance.disk_snapshots(dirs, args.domain)
            if tags is not None:
                _show_disk_snapshots(tags, args)
            return tags is not None
    except SnapfsError:
        pass
    return False


def _failed(what: str, err: BaseException) -> int:
    """Print one line for a failure; return the exit status it calls for."""
    if isinstance(err, SnapfsError):
        message, status = str(err), EXIT_FAILURE
    elif isinstance(err, OSError):
        where = f" ({err.filename})" if err.filename else ""
        message, status = f"{err.strerror or err}{where}", EXIT_FAILURE
    elif isinstance(err, KeyboardInterrupt):
        message, status = "interrupted", 130
    elif isinstance(err, Exception):
        logger.debug("internal error", exc_info=err)
        message = f"internal error: {type(err).__name__}: {err} (run with -v for details)"
        status = EXIT_INTERNAL
    else:
        raise err
    print(f"snapfs: {what}: {printable(message)}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
