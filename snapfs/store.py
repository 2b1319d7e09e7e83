"""The snapshot store on disk (docs/design.md, Files on disk): info files, save images, configs.

    <state dir>/snapshots/<domain uuid>/snapshotdata-<name>.xl
    <state dir>/snapshots/<domain uuid>/<name>.save
    <state dir>/snapshots/<domain uuid>/<name>.config.toml
    <state dir>/snapshots/<domain uuid>/current          name of the last created/applied

Every file is written atomically and readable by root only: save images hold
guest memory. The info file is the proposal's ``key="value"`` format; its first
line is always ``snapshot_name``.
"""

import logging
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from .config import Dirs, check_snapshot_name
from .errors import ConfigError, NotFound, SnapfsError
from .files import atomic_write, make_dirs, read_text_nofollow

__all__ = ["VmSnapshot", "Store", "DAMAGED", "format_info", "parse_info"]

logger = logging.getLogger(__name__)

INFO_PREFIX, INFO_SUFFIX = "snapshotdata-", ".xl"
UNDO = ".undo"
UNDO_NEXT = ".undo.next"    # the state an apply in progress replaces; becomes .undo on success
DAMAGED = "damaged"         # the state of a snapshot whose info file or disk snapshots are broken
# Creation times localtime() can show (up to the year 9999).
LATEST_TIME = 253_402_300_799
_LINE = re.compile(r'([a-z_0-9]+)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class VmSnapshot:
    """One VM snapshot as its info file records it (xl's libxl_vm_snapshot)."""

    name: str
    creation_time: int
    save: Path | None           # None for a shut-off domain's disk-only snapshot
    state: str                  # running | paused | shutoff, as at snapshot time
    parent: str
    disks: tuple[str, ...]      # devs with an internal snapshot tagged ``tag``
    save_sha256: str = ""
    save_size: int = 0
    tag: str = ""               # internal disk snapshot tag; the name, except for .undo
    mode: str = ""              # live | paused: how memory was saved
    pause_ms: float = 0.0       # how long the vCPUs stood still, from QEMU's events
    extra: dict[str, str] = field(default_factory=dict)
    damage: str = ""            # why it cannot be applied (state "damaged"); not stored

    @property
    def disk_tag(self) -> str:
        return self.tag or self.name


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _unquote(value: str) -> str:
    return re.sub(r"\\(.)", r"\1", value)


def format_info(snap: VmSnapshot) -> str:
    pairs = [
        ("snapshot_name", snap.name),
        ("snapshot_creationtime", str(snap.creation_time)),
        ("snapshot_save", str(snap.save) if snap.save else ""),
        ("snapshot_state", snap.state),
        ("snapshot_parent", snap.parent),
        ("snapshot_disks", ",".join(snap.disks)),
        ("snapshot_save_sha256", snap.save_sha256),
        ("snapshot_save_size", str(snap.save_size)),
        ("snapshot_disk_tag", snap.disk_tag),
        ("snapshot_mode", snap.mode),
        ("snapshot_pause_ms", str(snap.pause_ms)),
    ]
    return "".join(f'{k}="{_quote(v)}"\n' for k, v in pairs)


def parse_info(text: str, source: str) -> VmSnapshot:
    """:raise ConfigError: when the file is malformed, naming the line or key."""
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _LINE.fullmatch(line.strip())
        if not match:
            raise ConfigError(f"{source}:{number}: not a key=\"value\" line")
        values[match[1]] = _unquote(match[2])
    try:
        name = values.pop("snapshot_name")
        created = int(values.pop("snapshot_creationtime"))
        save = values.pop("snapshot_save", "")
        state = values.pop("snapshot_state", "running" if save else "shutoff")
        if state not in ("running", "paused", "shutoff"):
            raise ValueError(f"snapshot_state {state!r}")
        disks = tuple(d for d in values.pop("snapshot_disks", "").split(",") if d)
        size = int(values.pop("snapshot_save_size", "0") or 0)
        pause_ms = float(values.pop("snapshot_pause_ms", "0") or 0)
        if not 0 <= created <= LATEST_TIME:
            raise ValueError(f"snapshot_creationtime {created} is not a time")
        if size < 0 or not math.isfinite(pause_ms):
            raise ValueError("snapshot_save_size or snapshot_pause_ms out of range")
    except KeyError as err:
        raise ConfigError(f"{source}: missing key {err.args[0]}") from None
    except ValueError as err:
        raise ConfigError(f"{source}: bad value: {err}") from None
    return VmSnapshot(
        name=name, creation_time=created, save=Path(save) if save else None, state=state,
        parent=values.pop("snapshot_parent", ""), disks=disks,
        save_sha256=values.pop("snapshot_save_sha256", ""), save_size=size,
        tag=values.pop("snapshot_disk_tag", ""), mode=values.pop("snapshot_mode", ""),
        pause_ms=pause_ms, extra=values,
    )


class Store:
    """One domain's snapshots on disk. Blocking file work: call from a thread."""

    def __init__(self, dirs: Dirs, uuid: str) -> None:
        self.dir = dirs.state / "snapshots" / uuid

    def ensure(self) -> None:
        make_dirs(self.dir, 0o700)

    def _check(self, name: str) -> str:
        return name if name in (UNDO, UNDO_NEXT) else check_snapshot_name(name)

    def info_path(self, name: str) -> Path:
        return self.dir / f"{INFO_PREFIX}{self._check(name)}{INFO_SUFFIX}"

    def save_path(self, name: str) -> Path:
        return self.dir / f"{self._check(name)}.save"

    def config_path(self, name: str) -> Path:
        return self.dir / f"{self._check(name)}.config.toml"

    def names(self) -> list[str]:
        """Names of the VM snapshots with an info file, in no particular order."""
        try:
            entries = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        names = [e[len(INFO_PREFIX):-len(INFO_SUFFIX)] for e in entries
                 if e.startswith(INFO_PREFIX) and e.endswith(INFO_SUFFIX)]
        return [n for n in names if n and (n == UNDO or not n.startswith("."))]

    def exists(self, name: str) -> bool:
        return self.info_path(name).exists()

    def read(self, name: str) -> VmSnapshot:
        """:raise NotFound: when there is no such snapshot."""
        path = self.info_path(name)
        try:
            text = read_text_nofollow(path, limit=64 << 10)
        except FileNotFoundError:
            raise NotFound(f"no VM snapshot named {name!r}") from None
        except (OSError, ValueError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: cannot read: {err}") from None
        snap = parse_info(text, str(path))
        if snap.name != name:
            raise ConfigError(f"{path}: snapshot_name {snap.name!r} does not match the file name")
        return snap

    def list(self) -> list[VmSnapshot]:
        """Every snapshot, oldest first; one whose info file cannot be read is listed
        as damaged, with the reason, so that it can be seen and deleted."""
        snaps = []
        for name in self.names():
            if name == UNDO:
                continue
            try:
                snaps.append(self.read(name))
            except NotFound:
                continue  # deleted since the directory was listed
            except ConfigError as err:
                snaps.append(self.damaged(name, str(err)))
        return sorted(snaps, key=lambda s: (s.creation_time, s.name))

    def damaged(self, name: str, reason: str) -> VmSnapshot:
        """What is known of snapshot ``name`` when its info file cannot be read: when it
        was written, whether a save image is there, and why it is damaged."""
        try:
            created = int(os.lstat(self.info_path(name)).st_mtime)
        except OSError:
            created = 0
        save = self.save_path(name)
        return VmSnapshot(name=name, creation_time=created,
                          save=save if os.path.lexists(save) else None, state=DAMAGED,
                          parent="", disks=(), damage=reason)

    def write(self, snap: VmSnapshot, config_toml: str) -> None:
        """Record a snapshot: config first, info file last (the info file makes it visible)."""
        self.ensure()
        atomic_write(self.config_path(snap.name), config_toml, mode=0o600)
        atomic_write(self.info_path(snap.name), format_info(snap), mode=0o600)

    def remove(self, name: str) -> None:
        """Forget a snapshot: info file first, so it vanishes at once, then its data."""
        for path in (self.info_path(name), self.save_path(name), self.config_path(name)):
            path.unlink(missing_ok=True)

    def discard_save(self, name: str) -> Path | None:
        """Move the save image of ``name`` out of the way, to be unlinked after the
        operation (None if there is none): unlinking a memory-sized file that is in
        the page cache takes as long as freeing its pages, ~0.3 s a GiB. Its new name
        is a temporary of this process, which the next operation removes if this
        one dies first (``files.remove_stale_temporaries``)."""
        save = self.save_path(name)
        gone = self.dir / f".{save.name}.tmp{os.getpid()}"
        try:
            os.replace(save, gone)
        except FileNotFoundError:
            return None
        return gone

    def save_tmp_path(self, name: str) -> Path:
        """Where a save image is written before it is complete."""
        return self.dir / f".{self.save_path(name).name}.tmp"

    def rename(self, src: str, dst: str, sha256: str = "") -> None:
        """Give snapshot ``src`` the name ``dst`` (and its save image's ``sha256`` if
        given); safe to repeat after an interruption."""
        snap = self.read(src)
        if sha256:
            snap = replace(snap, save_sha256=sha256)
        for old, new in ((self.save_path(src), self.save_path(dst)),
                         (self.config_path(src), self.config_path(dst))):
            if old.exists():  # else an interrupted rename already moved it, or it never was
                os.replace(old, new)
        renamed = replace(snap, name=dst, save=self.save_path(dst) if snap.save else None)
        atomic_write(self.info_path(dst), format_info(renamed), mode=0o600)
        self.info_path(src).unlink()

    def current(self) -> str:
        """The snapshot last created or applied, if it still exists: never a dangling name."""
        name = self._current_name()
        try:
            return name if name and self.exists(name) else ""
        except SnapfsError:
            return ""

    def _current_name(self) -> str:
        try:
            return read_text_nofollow(self.dir / "current", limit=256).strip()
        except (OSError, ValueError, UnicodeDecodeError):
            return ""

    def set_current(self, name: str) -> None:
        self.ensure()
        if name:
            atomic_write(self.dir / "current", name + "\n", mode=0o600)
        else:
            (self.dir / "current").unlink(missing_ok=True)

    def reparent(self, gone: str, parent: str) -> None:
        """Snapshot ``gone`` is being deleted: its children get its ``parent``, and if it
        was current, ``parent`` is (or none is). Safe to repeat after an interruption."""
        if parent == gone:
            parent = ""
        for name in self.names() + ([UNDO_NEXT] if self.exists(UNDO_NEXT) else []):
            if name == gone:
                continue
            try:
                snap = self.read(name)
            except SnapfsError:
                continue
            if snap.parent == gone:
                atomic_write(self.info_path(name), format_info(replace(snap, parent=parent)),
                             mode=0o600)
        if self._current_name() == gone:
            self.set_current(parent)
