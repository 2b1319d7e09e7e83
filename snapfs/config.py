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

from .errors import ConfigError, InvalidName, NameTooLong, NotFound
from .files import make_dirs, read_text_nofollow

__all__ = [
    "Dirs", "RunPaths", "Disk", "Nic", "DomainDef", "parse_domain", "load_domain",
    "list_domains", "definition_path", "read_definition", "check_snapshot_name",
    "check_domain_name", "parse_size",
    "random_mac", "NVRAM_DEV", "qemu_opt",
]

DOMAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
DEV_NAME = re.compile(r"[a-z][a-z0-9]{0,15}")
# What `domain define` writes; the uuid module (and its libuuid) is loaded only for
# another form, so that reading a definition costs no more than its parsing.
CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
BUSES = ("virtio", "ide", "scsi")
ACCELS = ("kvm", "tcg")
FIRMWARES = ("bios", "uefi")
NVRAM_DEV = "nvram"         # the dev name of a UEFI domain's NVRAM; no disk may take it
NVRAM_BUS = "pflash"
MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")
NIC_MODEL = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_NICS = 8
MAX_NAME_BYTES = 64
MAX_MEMORY_MIB = 1 << 20
MAX_CPUS = 256
MAX_DISKS = 16
_KEYS = {"name", "uuid", "memory", "cpus", "accel", "machine", "extra_args", "disks",
         "keep_undo", "firmware", "nvram", "kernel", "initrd", "cmdline", "nics"}
_DISK_KEYS = {"dev", "file", "bus"}
_NIC_KEYS = {"model", "net", "mac"}


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

    def records(self) -> tuple[Path, ...]:
        """What a domain leaves in the run dir once its QEMU is gone (an undefine
        removes them; the lock stays, as another process may be waiting on it)."""
        return (self.qmp, self.pid, self.log, self.op, self.error, self.state, self.checked,
                self.disks)


@dataclass(frozen=True)
class Disk:
    dev: str
    file: Path
    bus: str = "virtio"         # or "pflash": the UEFI NVRAM


@dataclass(frozen=True)
class Nic:
    net: str                    # "user", "tap:<ifname>" or "bridge:<bridge>"
    mac: str                    # "" until `domain define` writes one
    model: str = "virtio-net-pci"


@dataclass(frozen=True)
class DomainDef:
    """A validated definition. ``disks`` is every image snapfs snapshots together:
    the ``[[disks]]``, then, with UEFI firmware, the NVRAM (dev ``nvram``), so that
    every transaction, apply, delete and listing takes it along."""

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
    firmware: str = "bios"
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str | None = None
    nics: tuple[Nic, ...] = field(default_factory=tuple)

    @property
    def nvram(self) -> Path | None:
        """The UEFI NVRAM's image: None with BIOS, or before `domain define` made it."""
        return next((d.file for d in self.disks if d.bus == NVRAM_BUS), None)

    @property
    def user_disks(self) -> tuple[Disk, ...]:
        """The ``[[disks]]`` of the definition file."""
        return tuple(d for d in self.disks if d.bus != NVRAM_BUS)

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
        if self.firmware != "bios":
            lines.append(f"firmware = {q(self.firmware)}")
        if self.nvram is not None:
            lines.append(f"nvram = {q(str(self.nvram))}")
        for key in ("kernel", "initrd", "cmdline"):
            value = getattr(self, key)
            if value is not None:
                lines.append(f"{key} = {q(str(value))}")
        if self.extra_args:
            lines.append(f"extra_args = [{', '.join(q(a) for a in self.extra_args)}]")
        for disk in self.user_disks:
            lines += ["", "[[disks]]", f"dev = {q(disk.dev)}", f"file = {q(str(disk.file))}",
                      f"bus = {q(disk.bus)}"]
        for nic in self.nics:
            lines += ["", "[[nics]]", f"model = {q(nic.model)}", f"net = {q(nic.net)}"]
            if nic.mac:
                lines.append(f"mac = {q(nic.mac)}")
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


def _check_table(table: Any, where: str, keys: set[str],
                 holding: str = "") -> None:
    """``table`` is a TOML table of no key but ``keys`` (``holding`` names them)."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table with {holding}")
    unknown = set(table) - keys
    if unknown:
        raise ConfigError(f"{where}: unknown key '{sorted(unknown)[0]}'")


def _parse_disk(table: Any, index: int, source: str) -> Disk:
    where = f"{source}: disks[{index}]"
    _check_table(table, where, _DISK_KEYS, "dev, file and bus")
    dev = _get(table, "dev", str, where, required=True)
    if not DEV_NAME.fullmatch(dev):
        raise ConfigError(f"{where}: 'dev' = {dev!r} must be 1-16 of a-z 0-9 "
                          "starting with a letter")
    if dev == NVRAM_DEV:
        raise ConfigError(f"{where}: 'dev' = {dev!r} is the UEFI NVRAM's name; choose another")
    path = _path(table, "file", where, required=True)
    assert path is not None
    bus = _get(table, "bus", str, where, default="virtio")
    if bus not in BUSES:
        raise ConfigError(f"{where}: 'bus' = {bus!r} must be one of {', '.join(BUSES)}")
    return Disk(dev=dev, file=path, bus=bus)


def _path(table: dict[str, Any], key: str, where: str, required: bool = False) -> Path | None:
    value = _get(table, key, str, where, required=required)
    if value is None:
        return None
    path = Path(value)
    if not path.is_absolute() or ".." in path.parts or "\0" in value or len(value) > 4096:
        raise ConfigError(f"{where}: '{key}' = {value!r} must be an absolute path without '..'")
    return path


def _parse_nic(table: Any, index: int, source: str) -> Nic:
    where = f"{source}: nics[{index}]"
    _check_table(table, where, _NIC_KEYS, "model, net and mac")
    model = _get(table, "model", str, where, default="virtio-net-pci")
    if not NIC_MODEL.fullmatch(model):
        raise ConfigError(f"{where}: 'model' = {model!r} is not a QEMU device name")
    net = _get(table, "net", str, where, default="user")
    kind, colon, arg = net.partition(":")
    if not ((kind == "user" and not colon)
            or (kind in ("tap", "bridge") and IFNAME.fullmatch(arg))):
        raise ConfigError(f"{where}: 'net' = {net!r} must be \"user\", \"tap:<ifname>\" or "
                          "\"bridge:<bridge>\" (interface names: 1-15 of A-Z a-z 0-9 _ . -)")
    mac = _get(table, "mac", str, where, default="").lower()
    if mac and (not MAC.fullmatch(mac) or int(mac[:2], 16) & 1):
        raise ConfigError(f"{where}: 'mac' = {mac!r} must be a unicast MAC like "
                          "\"52:54:00:12:34:56\"")
    return Nic(net=net, mac=mac, model=model)


def random_mac() -> str:
    """A MAC in QEMU's locally administered range 52:54:00:xx:xx:xx."""
    return "52:54:00:" + ":".join(f"{b:02x}" for b in os.urandom(3))


def parse_domain(text: str, source: str = "definition") -> DomainDef:
    """Validate a TOML definition; every error names the key at fault."""
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source}: not valid TOML: {err}") from None
    _check_table(table, source, _KEYS)
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
    firmware = _get(table, "firmware", str, source, default="bios")
    if firmware not in FIRMWARES:
        raise ConfigError(f"{source}: 'firmware' = {firmware!r} must be \"bios\" or \"uefi\"")
    nvram = _path(table, "nvram", source)
    if nvram is not None:
        if firmware != "uefi":
            raise ConfigError(f"{source}: 'nvram' is only for firmware = \"uefi\"")
        disks += (Disk(dev=NVRAM_DEV, file=nvram, bus=NVRAM_BUS),)
    kernel, initrd = _path(table, "kernel", source), _path(table, "initrd", source)
    cmdline = _get(table, "cmdline", str, source)
    if kernel is None and (initrd is not None or cmdline is not None):
        raise ConfigError(f"{source}: 'initrd' and 'cmdline' need a 'kernel'")
    if cmdline is not None and ("\0" in cmdline or len(cmdline) > 4096):
        raise ConfigError(f"{source}: 'cmdline' must be a string of at most 4096 characters")
    nics_raw = _get(table, "nics", list, source, default=[])
    if len(nics_raw) > MAX_NICS:
        raise ConfigError(f"{source}: 'nics' may list up to {MAX_NICS} NICs")
    nics = tuple(_parse_nic(n, i, source) for i, n in enumerate(nics_raw))
    macs = [n.mac for n in nics if n.mac]
    if len(set(macs)) != len(macs):
        raise ConfigError(f"{source}: 'nics': two NICs share the MAC "
                          f"{next(m for m in macs if macs.count(m) > 1)}")
    return DomainDef(name=name, uuid=uuid, memory_mib=_memory(memory, source), cpus=cpus,
                     accel=accel, disks=disks, machine=machine, extra_args=tuple(extra),
                     keep_undo=keep_undo,
                     memory=str(memory) if isinstance(memory, str) else f"{memory}M",
                     firmware=firmware, kernel=kernel, initrd=initrd, cmdline=cmdline,
                     nics=nics)


def _memory(value: Any, source: str) -> int:
    try:
        return parse_size(value)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def definition_path(dirs: Dirs, name: str) -> Path:
    return dirs.domains / f"{check_domain_name(name)}.toml"


def read_definition(path: Path, missing: str) -> DomainDef:
    """Parse the definition file ``path`` (never through a symlink).

    :raise NotFound: with ``missing`` when there is no such file. :raise ConfigError:
    """
    try:
        text = read_text_nofollow(path)
    except FileNotFoundError:
        raise NotFound(missing) from None
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read: {err}") from None
    return parse_domain(text, str(path))


def load_domain(dirs: Dirs, name: str) -> DomainDef:
    """:raise NotFound: when no definition has that name."""
    path = definition_path(dirs, name)
    domain = read_definition(path, f"no domain named {name!r} (looked for {path})")
    if domain.name != name:
        raise ConfigError(f"{path}: 'name' = {domain.name!r} does not match the file name")
    missing = ("uuid" if not domain.uuid else
               "nvram" if domain.firmware == "uefi" and domain.nvram is None else
               "mac" if any(not nic.mac for nic in domain.nics) else "")
    if missing:
        raise ConfigError(f"{path}: missing '{missing}' (define domains with "
                          "`snapfs domain define`)")
    return domain


def list_domains(dirs: Dirs) -> list[str]:
    try:
        names = [p.stem for p in dirs.domains.glob("*.toml")]
    except OSError:
        return []
    return sorted(n for n in names if DOMAIN_NAME.fullmatch(n))
