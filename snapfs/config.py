"""Where snapfs keeps things, and domain definitions: load, validate, write.

A domain is defined by ``<config dir>/domains/<name>.toml`` (docs/design.md, Domains). Every
value is checked here, once, so the rest of the code can trust a ``DomainDef``.
"""

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AlreadyExists, ConfigError, InvalidName, NameTooLong, NotFound
from .files import atomic_write, make_dirs, read_text_nofollow

__all__ = [
    "Dirs", "RunPaths", "Disk", "DomainDef", "parse_domain", "load_domain", "list_domains",
    "define_domain", "check_snapshot_name", "check_domain_name", "parse_size", "qemu_opt",
]

DOMAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
DEV_NAME = re.compile(r"[a-z][a-z0-9]{0,15}")
# What `domain define` writes; the uuid module (and its libuuid) is loaded only for
# another form, so that reading a definition costs no more than its parsing.
CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
BUSES = ("virtio", "ide", "scsi")
ACCELS = ("kvm", "tcg")
MAX_NAME_BYTES = 64
MAX_MEMORY_MIB = 1 << 20
MAX_CPUS = 256
MAX_DISKS = 16
_KEYS = {"name", "uuid", "memory", "cpus", "accel", "machine", "extra_args", "disks",
         "keep_undo"}
_DISK_KEYS = {"dev", "file", "bus"}


@dataclass(frozen=True)
class Dirs:
    """The config, state and run directories."""

    config: Path
    state: Path
    run: Path

    @classmethod
    def from_env(cls, config: str | None = None, state: str | None = None,
                 run: str | None = None) -> "Dirs":
        """Explicit arguments win over ``SNAPFS_*_DIR`` variables, which win over defaults."""
        return cls(
            config=Path(config or os.environ.get("SNAPFS_CONFIG_DIR") or "/etc/snapfs").absolute(),
            state=Path(state or os.environ.get("SNAPFS_STATE_DIR") or "/var/lib/snapfs").absolute(),
            run=Path(run or os.environ.get("SNAPFS_RUN_DIR") or "/run/snapfs").absolute(),
        )

    @property
    def domains(self) -> Path:
        return self.config / "domains"

    def of(self, name: str) -> "RunPaths":
        """The run-dir files of domain ``name``."""
        return RunPaths(self.run, name)

    @property
    def nbd(self) -> Path:
        """Where disk views keep their qemu-nbd sockets and records."""
        return nbd_dir(self.run)

    @property
    def mount_log(self) -> Path:
        """Where a daemonized tree logs."""
        return self.run / "mount.log"

    @property
    def journals(self) -> Path:
        return self.state / "journal"

    def ensure(self) -> None:
        """Create the state and run dirs root-only: they hold guest memory and sockets."""
        for path in (self.state, self.run, self.state / "snapshots"):
            make_dirs(path, 0o700)


def qemu_opt(value: str) -> str:
    """``value`` inside QEMU's ``key=value,...`` option syntax: a doubled comma is a
    literal one. The only escaping snapfs does (never an HMP command string)."""
    return value.replace(",", ",,")


def nbd_dir(run: Path | str) -> Path:
    """``<run dir>/nbd``, resolved: qemu-nbd's socket paths are compared as strings."""
    return Path(os.path.realpath(run)) / "nbd"


class RunPaths:
    """Every file one domain has in the run dir: the only place that names them.

        <run dir>/<name>.qmp     QEMU's QMP socket
        <run dir>/<name>.pid     QEMU's pidfile
        <run dir>/<name>.log     QEMU's -D log (its error messages)
        <run dir>/<name>.lock    flock serializing operations on the domain
        <run dir>/<name>.op      the operation in progress and how far it got (JSON)
        <run dir>/<name>.error   last_error: "<ISO 8601 local time> <message>"
        <run dir>/<name>.state   the run state last seen, for when QMP is busy
        <run dir>/<name>.checked save images whose sha256 was checked since boot (JSON)
        <run dir>/<name>.disks   the disks' snapshot tables as last read (JSON)
    """

    def __init__(self, run: Path, name: str) -> None:
        self.run = run
        self.qmp = run / f"{name}.qmp"
        self.pid = run / f"{name}.pid"
        self.log = run / f"{name}.log"
        self.lock = run / f"{name}.lock"
        self.op = run / f"{name}.op"
        self.error = run / f"{name}.error"
        self.state = run / f"{name}.state"
        self.checked = run / f"{name}.checked"
        self.disks = run / f"{name}.disks"

    @property
    def qmp_argument(self) -> str:
        """QEMU's ``-qmp`` argument: how the domain's QEMU is told from other processes."""
        return f"unix:{qemu_opt(str(self.qmp))},server=on,wait=off"


@dataclass(frozen=True)
class Disk:
    dev: str
    file: Path
    bus: str = "virtio"


@dataclass(frozen=True)
class DomainDef:
    name: str
    uuid: str
    memory_mib: int
    cpus: int
    accel: str
    disks: tuple[Disk, ...]
    machine: str | None = None
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    memory: str = ""
    keep_undo: bool = True      # false: an apply keeps no .undo

    def to_toml(self) -> str:
        q = _toml_string
        lines = [
            f"name = {q(self.name)}",
            f"uuid = {q(self.uuid)}",
            f"memory = {q(self.memory or f'{self.memory_mib}M')}",
            f"cpus = {self.cpus}",
            f"accel = {q(self.accel)}",
        ]
        if self.machine:
            lines.append(f"machine = {q(self.machine)}")
        if not self.keep_undo:
            lines.append("keep_undo = false")
        if self.extra_args:
            lines.append(f"extra_args = [{', '.join(q(a) for a in self.extra_args)}]")
        for disk in self.disks:
            lines += ["", "[[disks]]", f"dev = {q(disk.dev)}", f"file = {q(str(disk.file))}",
                      f"bus = {q(disk.bus)}"]
        return "\n".join(lines) + "\n"


def _toml_string(value: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\u{ord(m[0]):04x}", escaped) + '"'


def check_domain_name(name: str) -> str:
    if not DOMAIN_NAME.fullmatch(name):
        raise InvalidName(f"invalid domain name {name!r}: use 1-64 of A-Z a-z 0-9 _ . - "
                          "starting with a letter or digit")
    return name


def check_snapshot_name(name: str | bytes) -> str:
    """Return ``name`` as str if it may name a snapshot, else raise (the errors of the
    tree's errno table in docs/design.md)."""
    if isinstance(name, bytes):
        try:
            name = name.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidName(f"snapshot name {name!r} is not UTF-8") from None
    raw = name.encode("utf-8", "surrogateescape")
    if not name:
        raise InvalidName("snapshot name is empty")
    if len(raw) > MAX_NAME_BYTES:
        raise NameTooLong(f"snapshot name is {len(raw)} bytes long, the limit is {MAX_NAME_BYTES}")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidName(f"snapshot name {name!r} is not UTF-8") from None
    if name.startswith("."):
        raise InvalidName(f"snapshot name {name!r} starts with '.', reserved for snapfs")
    if "/" in name or any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in name):
        raise InvalidName(f"snapshot name {name!r} contains '/' or a control character")
    return name


def parse_size(text: Any, key: str = "memory") -> int:
    """A size like "512M", "1G" or a plain number of MiB, in MiB."""
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise ConfigError(f"'{key}' must be a size like \"512M\", got {text!r}")
    match = re.fullmatch(r"\s*(\d{1,9})\s*([KMGT]?)i?B?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ConfigError(f"'{key}' must be a size like \"512M\" or \"2G\", got {text!r}")
    number, unit = int(match[1]), match[2].upper()
    kib = number * {"K": 1, "": 1024, "M": 1024, "G": 1 << 20, "T": 1 << 30}[unit]
    if kib % 1024 or not 0 < kib // 1024 <= MAX_MEMORY_MIB:
        raise ConfigError(f"'{key}' = {text!r} must be a whole number of MiB between 1M and 1T")
    return kib // 1024


def _get(table: dict[str, Any], key: str, kind: type, source: str, default: Any = None,
         required: bool = False) -> Any:
    if key not in table:
        if required:
            raise ConfigError(f"{source}: missing required key '{key}'")
        return default
    value = table[key]
    if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
        raise ConfigError(f"{source}: '{key}' must be a {kind.__name__}, got {value!r}")
    return value


def _parse_disk(table: Any, index: int, source: str) -> Disk:
    where = f"{source}: disks[{index}]"
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table with dev, file and bus")
    unknown = set(table) - _DISK_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key '{sorted(unknown)[0]}'")
    dev = _get(table, "dev", str, where, required=True)
    if not DEV_NAME.fullmatch(dev):
        raise ConfigError(f"{where}: 'dev' = {dev!r} must be 1-16 of a-z 0-9 "
                          "starting with a letter")
    file = _get(table, "file", str, where, required=True)
    path = Path(file)
    if not path.is_absolute() or ".." in path.parts or "\0" in file or len(file) > 4096:
        raise ConfigError(f"{where}: 'file' = {file!r} must be an absolute path without '..'")
    bus = _get(table, "bus", str, where, default="virtio")
    if bus not in BUSES:
        raise ConfigError(f"{where}: 'bus' = {bus!r} must be one of {', '.join(BUSES)}")
    return Disk(dev=dev, file=path, bus=bus)


def parse_domain(text: str, source: str = "definition") -> DomainDef:
    """Validate a TOML definition; every error names the key at fault."""
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source}: not valid TOML: {err}") from None
    unknown = set(table) - _KEYS
    if unknown:
        raise ConfigError(f"{source}: unknown key '{sorted(unknown)[0]}'")
    name = _get(table, "name", str, source, required=True)
    try:
        check_domain_name(name)
    except InvalidName as err:
        raise ConfigError(f"{source}: 'name': {err}") from None
    uuid = _get(table, "uuid", str, source, default="")
    if uuid and not CANONICAL_UUID.fullmatch(uuid):
        # Written by hand in another form (upper case, braces, no dashes): made canonical.
        import uuid as uuidlib
        try:
            uuid = str(uuidlib.UUID(uuid))
        except ValueError:
            raise ConfigError(f"{source}: 'uuid' = {uuid!r} is not a UUID") from None
    if "memory" not in table:
        raise ConfigError(f"{source}: missing required key 'memory'")
    memory = table["memory"]
    cpus = _get(table, "cpus", int, source, default=1)
    if not 1 <= cpus <= MAX_CPUS:
        raise ConfigError(f"{source}: 'cpus' = {cpus} must be between 1 and {MAX_CPUS}")
    accel = _get(table, "accel", str, source, default="kvm")
    if accel not in ACCELS:
        raise ConfigError(f"{source}: 'accel' = {accel!r} must be \"kvm\" or \"tcg\"")
    machine = _get(table, "machine", str, source)
    if machine is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", machine):
        raise ConfigError(f"{source}: 'machine' = {machine!r} is not a machine type name")
    keep_undo = _get(table, "keep_undo", bool, source, default=True)
    extra = _get(table, "extra_args", list, source, default=[])
    if not all(isinstance(a, str) and "\0" not in a for a in extra):
        raise ConfigError(f"{source}: 'extra_args' must be a list of strings")
    disks_raw = _get(table, "disks", list, source, required=True)
    if not 1 <= len(disks_raw) <= MAX_DISKS:
        raise ConfigError(f"{source}: 'disks' must list 1 to {MAX_DISKS} disks")
    disks = tuple(_parse_disk(d, i, source) for i, d in enumerate(disks_raw))
    devs = [d.dev for d in disks]
    if len(set(devs)) != len(devs):
        raise ConfigError(f"{source}: 'disks': two disks share the dev name "
                          f"{next(d for d in devs if devs.count(d) > 1)!r}")
    return DomainDef(name=name, uuid=uuid, memory_mib=_memory(memory, source), cpus=cpus,
                     accel=accel, disks=disks, machine=machine, extra_args=tuple(extra),
                     keep_undo=keep_undo,
                     memory=str(memory) if isinstance(memory, str) else f"{memory}M")


def _memory(value: Any, source: str) -> int:
    try:
        return parse_size(value)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def _definition_path(dirs: Dirs, name: str) -> Path:
    return dirs.domains / f"{check_domain_name(name)}.toml"


def load_domain(dirs: Dirs, name: str) -> DomainDef:
    """:raise NotFound: when no definition has that name."""
    path = _definition_path(dirs, name)
    try:
        text = read_text_nofollow(path)
    except FileNotFoundError:
        raise NotFound(f"no domain named {name!r} (looked for {path})") from None
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read: {err}") from None
    domain = parse_domain(text, str(path))
    if domain.name != name:
        raise ConfigError(f"{path}: 'name' = {domain.name!r} does not match the file name")
    if not domain.uuid:
        raise ConfigError(f"{path}: missing 'uuid' (define domains with `snapfs domain define`)")
    return domain


def list_domains(dirs: Dirs) -> list[str]:
    try:
        names = [p.stem for p in dirs.domains.glob("*.toml")]
    except OSError:
        return []
    return sorted(n for n in names if DOMAIN_NAME.fullmatch(n))


def define_domain(dirs: Dirs, source: Path) -> DomainDef:
    """Validate ``source`` and install it under the config dir, adding a uuid if absent.

    :raise AlreadyExists: when another definition already has that name.
    """
    try:
        text = read_text_nofollow(source)
    except FileNotFoundError:
        raise NotFound(f"definition file {source} does not exist") from None
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{source}: cannot read: {err}") from None
    domain = parse_domain(text, str(source))
    for disk in domain.disks:
        if not disk.file.exists():
            raise ConfigError(f"{source}: disk {disk.dev}: file {disk.file} does not exist")
    path = _definition_path(dirs, domain.name)
    if path.exists() or path.is_symlink():
        raise AlreadyExists(f"a domain named {domain.name!r} is already defined ({path})")
    if not domain.uuid:
        import uuid as uuidlib
        domain = DomainDef(**{**domain.__dict__, "uuid": str(uuidlib.uuid4())})
    make_dirs(dirs.domains, 0o755)
    atomic_write(path, domain.to_toml(), mode=0o644)
    return domain
