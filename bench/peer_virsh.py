"""``bench/run --peer virsh``: snapfs and libvirt (virsh) side by side, on the same guest.

Both sides run the bench's counter guest from copies of the same disk, with
guest RAM a private mapping of the same random file on tmpfs (snapfs: the
domain's ``extra_args``; libvirt: ``<qemu:commandline>``), so every save and
restore moves a memory-sized image on both. Each row alternates the two
sides, snapfs first, and compares medians. snapfs is timed through its CLI
and, where the tree has a verb for it, through the mounted tree (``mkdir``,
``rmdir``, ``ls``, ``echo running > apply``), with the same workspace and
mount as the rest of the bench.

The libvirt daemons the peer needs (``virtlogd`` and ``virtqemud`` or
``libvirtd``) are started by the bench if they are not running, and only
those it started are stopped at the end; the domains it defined are
destroyed and undefined (their snapshots' metadata with them).

The pause of a virsh create is read as snapfs's is: QEMU's STOP and RESUME
event times (``virsh qemu-monitor-event --timestamp``, which prints QEMU's
own event time), cross-checked by the gap in the guest's tick counter
(read with HMP ``xp`` through ``virsh qemu-monitor-command``).
"""

from __future__ import annotations

import contextlib
import grp
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from guestbuild import COUNTER_ADDR, MAGIC, MAGIC_ADDR

MiB = 1 << 20
URI = "qemu:///system"


def median(values: list[float]) -> float:
    return statistics.median(values)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the table -------------------------------------------------------------------


@dataclass
class PeerRow:
    operation: str
    ram: str
    path: str               # "CLI" or "tree"
    snapfs: list[float]     # seconds (or ms for the pause)
    virsh: list[float]
    unit: str = "s"
    target: float = 0.0     # virsh ÷ snapfs at least this; 0: none
    note: str = ""          # why a row is missing, or what the virsh side ran

    def cells(self) -> list[str]:
        if not self.snapfs or not self.virsh:
            return [self.operation, self.ram, self.path, self.note or "n/a", "", "", "", ""]
        s, v = median(self.snapfs), median(self.virsh)
        fmt = (lambda x: f"{x:.1f} ms") if self.unit == "ms" else (lambda x: f"{x:.3f} s")
        ratio = v / s if s > 0 else float("inf")
        target = f"≥ {self.target:g}" if self.target else ""
        verdict = ("ok" if ratio >= self.target else "MISS") if self.target else ""
        return [self.operation, self.ram, self.path, fmt(s), fmt(v), f"{ratio:.2f}", target,
                verdict]


@dataclass
class PeerTable:
    rows: list[PeerRow] = field(default_factory=list)

    def add(self, row: PeerRow) -> None:
        self.rows.append(row)
        log("  " + " | ".join(row.cells()))

    def missing(self, operation: str, ram: str, path: str, why: str) -> None:
        self.add(PeerRow(operation, ram, path, [], [], note=why))

    def render(self) -> str:
        header = ["operation", "RAM", "path", "snapfs", "virsh", "virsh ÷ snapfs", "target", ""]
        rows = [header] + [r.cells() for r in self.rows]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = []
        for i, r in enumerate(rows):
            lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + " |")
            if i == 0:
                lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        notes = dict.fromkeys(f"{r.operation}: {r.note}" for r in self.rows
                              if r.note and r.snapfs and r.virsh)
        return "\n".join(lines + [""] * bool(notes) + list(notes))


# -- libvirt: daemons, domains --------------------------------------------------------


def virsh(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["virsh", "-q", "-c", URI, *args], capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"virsh {' '.join(args[:2])} failed: "
                           f"{(proc.stderr or proc.stdout).strip()[-300:]}")
    return proc


def timed(argv: list[str], **kw: Any) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        said = proc.stderr.decode(errors="replace").strip().splitlines()
        raise RuntimeError(f"{' '.join(argv[:3])} exited {proc.returncode}"
                           + (f": {said[-1]}" if said else ""))
    return elapsed


def timed_virsh(*args: str) -> float:
    return timed(["virsh", "-q", "-c", URI, *args])


def missing_libvirt() -> str:
    """"" when libvirt can be used, else why not."""
    for tool in ("virsh",):
        if shutil.which(tool) is None:
            return f"n/a: {tool} not installed (apt-get install libvirt-daemon-system libvirt-clients)"
    if not any(shutil.which(d) or Path(f"/usr/sbin/{d}").exists()
               for d in ("virtqemud", "libvirtd")):
        return "n/a: no libvirt daemon (virtqemud or libvirtd) installed"
    return ""


class Daemons:
    """The libvirt daemons the peer needs; those this run started are stopped by ``stop``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[tuple[str, int]] = []
        self.kvm: tuple[int, int] | None = None   # /dev/kvm's group and mode, if changed

    def open_kvm(self) -> None:
        """QEMU under libvirt runs as libvirt-qemu, of group kvm: where /dev/kvm is
        root's alone (no udev here), it is given to group kvm for the run."""
        st = os.stat("/dev/kvm")
        kvm = grp.getgrnam("kvm").gr_gid
        if st.st_gid == kvm and st.st_mode & 0o060 == 0o060:
            return
        self.kvm = (st.st_gid, st.st_mode & 0o7777)
        os.chown("/dev/kvm", -1, kvm)
        os.chmod("/dev/kvm", self.kvm[1] | 0o060)
        log(f"  /dev/kvm given to group kvm for the run (was gid {st.st_gid}, "
            f"mode {self.kvm[1]:o})")

    @staticmethod
    def _answers() -> bool:
        return subprocess.run(["virsh", "-c", URI, "version"], capture_output=True,
                              timeout=30).returncode == 0

    def start(self) -> None:
        self.open_kvm()
        if self._answers():
            log("  libvirt already answers: using the running daemons")
            return
        for name in ("virtlogd", "libvirtd"):
            if subprocess.run(["pgrep", "-x", name], capture_output=True).returncode == 0:
                continue
            binary = shutil.which(name) or f"/usr/sbin/{name}"
            pidfile = self.workdir / f"{name}.pid"
            subprocess.run([binary, "--daemon", "--pid-file", str(pidfile)], check=True,
                           capture_output=True, timeout=60)
            deadline = time.monotonic() + 10
            while not pidfile.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            self.started.append((name, int(pidfile.read_text())))
            log(f"  started {name} (pid {self.started[-1][1]})")
        deadline = time.monotonic() + 30
        while not self._answers():
            if time.monotonic() > deadline:
                raise RuntimeError("libvirtd did not answer within 30 s")
            time.sleep(0.1)

    def stop(self) -> None:
        for name, pid in reversed(self.started):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            log(f"  stopped {name} (pid {pid})")
        self.started.clear()
        if self.kvm is not None:
            os.chown("/dev/kvm", -1, self.kvm[0])
            os.chmod("/dev/kvm", self.kvm[1])
            self.kvm = None


def domain_xml(name: str, mem: int, disk: Path, ram: Path) -> str:
    """The bench guest as libvirt runs it: snapfs's command line as near as libvirt
    allows (one vCPU, virtio disk, no default devices), RAM a private mapping of ``ram``."""
    return f"""<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>{mem}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-object'/>
    <qemu:arg value='memory-backend-file,id=peer-ram,size={mem}M,mem-path={ram},share=off'/>
    <qemu:arg value='-machine'/>
    <qemu:arg value='memory-backend=peer-ram'/>
  </qemu:commandline>
</domain>
"""


def reach(directory: Path) -> None:
    """Let QEMU run by libvirt (user libvirt-qemu) pass through the bench's dirs to
    its own files (they list nothing to it: 0711)."""
    os.chmod(directory, 0o711)


class Peer:
    """The libvirt side: its domains, defined from copies of the bench's images."""

    def __init__(self, root: Path) -> None:
        # QEMU runs as libvirt-qemu under libvirt: its files live where it can reach.
        self.root = root
        self.root.mkdir(mode=0o700, exist_ok=True)
        shutil.chown(self.root, "libvirt-qemu", "kvm")
        reach(self.root.parent)
        self.defined: list[str] = []

    def define(self, name: str, mem: int, image: Path, ram: Path) -> None:
        """Domain ``name``: a copy of ``image`` (its active layer), RAM the same file as
        the snapfs domain's (a private mapping on both sides: neither writes it)."""
        disk = self.root / f"{name}.qcow2"
        subprocess.run(["qemu-img", "convert", "-U", "-O", "qcow2", str(image), str(disk)],
                       check=True)
        for path in (disk, ram):
            shutil.chown(path, "libvirt-qemu", "kvm")
            os.chmod(path, 0o600)
        reach(ram.parent)
        xml = self.root / f"{name}.xml"
        xml.write_text(domain_xml(name, mem, disk, ram))
        virsh("define", str(xml))
        self.defined.append(name)

    def define_off(self, name: str) -> None:
        """A never-started domain with an empty 16 MiB disk, for the listing rows."""
        disk = self.root / f"{name}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
        shutil.chown(disk, "libvirt-qemu", "kvm")
        xml = self.root / f"{name}.xml"
        xml.write_text(domain_xml(name, 16, disk, self.root / "none.ram").split(
            "  <qemu:commandline>")[0] + "</domain>\n")
        virsh("define", str(xml))
        self.defined.append(name)

    def snapshots(self, name: str) -> list[str]:
        out = virsh("snapshot-list", name, "--name", check=False).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]

    def counter(self, name: str) -> tuple[float, int] | None:
        """(host time, the guest's tick counter), None before the guest has set it up."""
        t0 = time.monotonic()
        out = virsh("qemu-monitor-command", name, "--hmp", f"xp /2wx {MAGIC_ADDR:#x}").stdout
        t1 = time.monotonic()
        words = [int(w, 16) for w in out.split(":", 1)[1].split()]
        if words[0] != int.from_bytes(MAGIC, "little"):
            return None
        return (t0 + t1) / 2, words[1]

    def cleanup(self) -> None:
        for name in reversed(self.defined):
            virsh("destroy", name, check=False)
            for snap in self.snapshots(name):
                virsh("snapshot-delete", name, snap, "--metadata", check=False)
            virsh("undefine", name, "--snapshots-metadata", check=False)
            # libvirt keeps a log per domain name, which the domain's undefine leaves.
            Path(f"/var/log/libvirt/qemu/{name}.log").unlink(missing_ok=True)
        self.defined.clear()


@contextlib.contextmanager
def events(name: str) -> Iterator[Callable[[], list[tuple[str, float]]]]:
    """QEMU's events of domain ``name`` while the block runs, as (event, time): the time
    libvirt received each (``--timestamp``, in ms: QEMU's own stamp is not printed)."""
    proc = subprocess.Popen(["virsh", "-c", URI, "qemu-monitor-event", name, "--loop",
                             "--timestamp"], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    time.sleep(0.3)  # subscribed before the operation starts
    seen: list[tuple[str, float]] = []
    try:
        yield lambda: seen
    finally:
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        # "2026-12-03 06:39:58.340+0000: event STOP for domain 'x': <null>"
        for match in re.finditer(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)\+0000: "
                                 r"event (\w+) for domain", out):
            when = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S.%f")
            seen.append((match[2], when.replace(tzinfo=UTC).timestamp()))


def pause_ms(seen: list[tuple[str, float]]) -> float:
    stops = [t for e, t in seen if e == "STOP"]
    resumes = [t for e, t in seen if e == "RESUME"]
    if not stops or not resumes:
        return -1.0
    return (max(resumes) - min(stops)) * 1000


# -- the rows -----------------------------------------------------------------------


@dataclass
class Side:
    """What the bench hands the peer: its workspace and how it runs snapfs."""

    ws: Any                                 # bench/run's Workspace
    start_domain: Callable[[str], None]     # start a snapfs domain and wait for its guest
    tree: str                               # "" when the tree is mounted, else why not
    reps: int
    pause_of: Callable[[str, str], float]   # snapfs pause_ms of (domain, snapshot)
    make_listed: Callable[[str, int], None]  # a shut-off domain with N disk-only snapshots

    def cli(self, *args: str) -> float:
        return float(self.ws.run_cli(*args).wall)

    @property
    def mnt(self) -> Path:
        return Path(self.ws.mnt)


def write_apply(path: Path) -> float:
    t0 = time.perf_counter()
    with open(path, "w") as f:
        f.write("running\n")
    return time.perf_counter() - t0


def peer_rows(side: Side, table: PeerTable, peer: Peer, mem: int, dom: str) -> None:
    """The rows of one guest size: pause and wall of a create with memory, revert, delete."""
    vdom = f"sfb-v{mem}"
    ram = f"{mem} MiB"
    ws = side.ws
    peer.define(vdom, mem, ws.images / f"{dom}.qcow2", ws.shm / f"{dom}.ram")
    side.start_domain(dom)
    virsh("start", vdom)
    wait_virsh_guest(peer, vdom)
    tree = side.tree == ""
    pause: dict[str, list[float]] = {"CLI": [], "tree": [], "virsh": [], "paused": []}
    wall: dict[str, list[float]] = {"CLI": [], "tree": [], "virsh": [], "paused": []}
    for i in range(side.reps):
        os.sync()
        wall["CLI"].append(side.cli("vm-snapshot-create", "-n", f"pc{i}", "--mode", "live", dom))
        pause["CLI"].append(side.pause_of(dom, f"pc{i}"))
        os.sync()
        wall["paused"].append(side.cli("vm-snapshot-create", "-n", f"pp{i}", "--mode", "paused",
                                       dom))
        pause["paused"].append(side.pause_of(dom, f"pp{i}"))
        side.ws.snapfs("vm-snapshot-delete", "-n", f"pp{i}", dom)
        os.sync()
        with events(vdom) as seen:
            wall["virsh"].append(timed_virsh("snapshot-create-as", vdom, f"vs{i}"))
        pause["virsh"].append(pause_ms(seen()))
        if tree:
            os.sync()
            t0 = time.perf_counter()
            os.mkdir(side.mnt / dom / f"pt{i}")
            wall["tree"].append(time.perf_counter() - t0)
            pause["tree"].append(side.pause_of(dom, f"pt{i}"))
    log(f"  pauses: snapfs CLI {pause['CLI']}, tree {pause['tree']}, virsh {pause['virsh']} ms")
    for path in ("CLI", "tree"):
        if path == "tree" and not tree:
            table.missing("guest pause while creating (live)", ram, path, side.tree)
            table.missing("create with memory, wall", ram, path, side.tree)
            continue
        table.add(PeerRow("guest pause while creating (live)", ram, path, pause[path],
                          pause["virsh"], unit="ms", target=50))
        table.add(PeerRow("create with memory, wall", ram, path, wall[path], wall["virsh"],
                          target=1.0))
    # libvirt 9.0 saves a running guest stopped: the same as snapfs's stop-and-save.
    table.add(PeerRow("guest pause while creating (--mode paused)", ram, "CLI", pause["paused"],
                      pause["virsh"], unit="ms"))
    table.add(PeerRow("create with memory, wall (--mode paused)", ram, "CLI", wall["paused"],
                      wall["virsh"]))

    apply: dict[str, list[float]] = {"CLI .undo": [], "CLI --no-undo": [], "tree": [],
                                     "virsh": []}
    for _ in range(side.reps):
        apply["CLI .undo"].append(side.cli("vm-snapshot-apply", "-n", "pc0", dom))
        apply["virsh"].append(timed_virsh("snapshot-revert", vdom, "vs0"))
        apply["CLI --no-undo"].append(side.cli("vm-snapshot-apply", "-n", "pc0", dom,
                                               "--no-undo"))
        if tree:
            apply["tree"].append(write_apply(side.mnt / dom / "pc0" / "apply"))
    table.add(PeerRow("revert / apply, wall (.undo)", ram, "CLI", apply["CLI .undo"],
                      apply["virsh"], target=1.0))
    table.add(PeerRow("revert / apply, wall (--no-undo)", ram, "CLI", apply["CLI --no-undo"],
                      apply["virsh"], target=2.0))
    if tree:
        table.add(PeerRow("revert / apply, wall (.undo)", ram, "tree", apply["tree"],
                          apply["virsh"], target=1.0))
    else:
        table.missing("revert / apply, wall (.undo)", ram, "tree", side.tree)

    delete: dict[str, list[float]] = {"CLI": [], "tree": [], "virsh": []}
    for i in range(side.reps):
        delete["CLI"].append(side.cli("vm-snapshot-delete", "-n", f"pc{i}", dom))
        delete["virsh"].append(timed_virsh("snapshot-delete", vdom, f"vs{i}"))
        if tree:
            t0 = time.perf_counter()
            os.rmdir(side.mnt / dom / f"pt{i}")
            delete["tree"].append(time.perf_counter() - t0)
    for path in ("CLI", "tree"):
        if path == "tree" and not tree:
            table.missing("delete a snapshot with memory", ram, path, side.tree)
            continue
        table.add(PeerRow("delete a snapshot with memory", ram, path, delete[path],
                          delete["virsh"], target=0.5 if path == "CLI" else 1.0))
    virsh("destroy", vdom, check=False)
    side.ws.snapfs("domain", "stop", "--force", dom)


def wait_virsh_guest(peer: Peer, name: str, timeout: float = 120) -> None:
    assert MAGIC_ADDR + len(MAGIC) == COUNTER_ADDR
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(RuntimeError, ValueError, IndexError):
            if peer.counter(name) is not None:
                return
        time.sleep(0.2)
    raise RuntimeError(f"the guest of {name} did not start counting within {timeout:.0f} s")


def listing_rows(side: Side, table: PeerTable, peer: Peer, count: int) -> None:
    """``vm-snapshot-list`` / ``ls`` of a shut-off domain's ``count`` disk-only
    snapshots against ``virsh snapshot-list`` of as many internal snapshots."""
    dom, vdom = "plist", "sfb-vlist"
    side.make_listed(dom, count)
    peer.define_off(vdom)
    for i in range(count):
        virsh("snapshot-create-as", vdom, f"s{i:04d}")
    reps = max(side.reps, 5)
    cli: list[float] = []
    ls: list[float] = []
    vs: list[float] = []
    # One of each first, untimed: the tables' copy, the page cache, the tree's caches.
    side.cli("vm-snapshot-list", dom)
    timed_virsh("snapshot-list", vdom)
    if side.tree == "":
        timed(["ls", str(side.mnt / dom)])
    for _ in range(reps):
        cli.append(side.cli("vm-snapshot-list", dom))
        vs.append(timed_virsh("snapshot-list", vdom))
        if side.tree == "":
            ls.append(timed(["ls", str(side.mnt / dom)]))
    what = f"list {count} snapshots"
    table.add(PeerRow(what, "–", "CLI", cli, vs, target=0.5))
    if side.tree == "":
        table.add(PeerRow(what, "–", "tree", ls, vs, target=1.0))
    else:
        table.missing(what, "–", "tree", side.tree)


def startup_row(side: Side, table: PeerTable) -> None:
    snapfs_list = side.ws.cli_argv("domain", "list")
    side.ws.snapfs("domain", "list")
    timed_virsh("list", "--all")
    ours: list[float] = []
    theirs: list[float] = []
    for _ in range(max(side.reps, 5)):
        ours.append(timed(snapfs_list, cwd=side.ws.root, env=side.ws.env))
        theirs.append(timed_virsh("list", "--all"))
    table.add(PeerRow("CLI start-up (domain list vs virsh list --all)", "–", "CLI", ours,
                      theirs, target=0.5))


def run_peer(side: Side, sizes: list[int], count: int) -> PeerTable:
    """Every row, for each guest size; libvirt's daemons and domains undone at the end."""
    table = PeerTable()
    why = missing_libvirt()
    if why:
        for operation in ("guest pause while creating (live)", "create with memory, wall",
                          "revert / apply, wall", "delete a snapshot with memory",
                          f"list {count} snapshots", "disk-only create, running domain",
                          "disk-only delete", "CLI start-up"):
            table.missing(operation, "", "", why)
        return table
    daemons = Daemons(side.ws.root)
    peer = Peer(side.ws.root / "virsh")
    try:
        daemons.start()
        startup_row(side, table)
        for mem in sizes:
            peer_rows(side, table, peer, mem, f"b{mem}")
        disk_only_rows(side, table, peer, f"b{sizes[0]}")
        listing_rows(side, table, peer, count)
    finally:
        try:
            peer.cleanup()
        finally:
            daemons.stop()
    return table


def disk_only_rows(side: Side, table: PeerTable, peer: Peer, dom: str) -> None:
    """Disk-only snapshots of a running domain: snapfs's internal ones (one QMP
    transaction) against the only kind libvirt 9.0 takes of a running domain, an
    external overlay (``--disk-only``); and their deletion, where libvirt 9.0
    refuses to delete an external snapshot ("not supported") and can only forget
    its metadata (``--metadata``: the overlay stays the disk)."""
    mem = int(dom[1:])
    vdom = f"sfb-vdisk{mem}"
    peer.define(vdom, mem, side.ws.images / f"{dom}.qcow2", side.ws.shm / f"{dom}.ram")
    side.start_domain(dom)
    virsh("start", vdom)
    wait_virsh_guest(peer, vdom)
    tree = side.tree == ""
    reps = max(side.reps, 5)
    made: dict[str, list[float]] = {"CLI": [], "tree": [], "virsh": []}
    gone: dict[str, list[float]] = {"CLI": [], "tree": [], "virsh": []}
    for i in range(reps):
        made["CLI"].append(side.cli("disk-snapshot-create", "-n", f"dc{i}", dom))
        made["virsh"].append(timed_virsh("snapshot-create-as", vdom, f"vd{i}", "--disk-only",
                                         "--atomic"))
        if tree:
            t0 = time.perf_counter()
            os.mkdir(side.mnt / dom / ".disk" / f"dt{i}")
            made["tree"].append(time.perf_counter() - t0)
    for i in range(reps):
        gone["CLI"].append(side.cli("disk-snapshot-delete", "-n", f"dc{i}", dom))
        gone["virsh"].append(timed_virsh("snapshot-delete", vdom, f"vd{i}", "--metadata"))
        if tree:
            t0 = time.perf_counter()
            os.rmdir(side.mnt / dom / ".disk" / f"dt{i}")
            gone["tree"].append(time.perf_counter() - t0)
    for path in ("CLI", "tree"):
        if path == "tree" and not tree:
            table.missing("disk-only create, running domain", "–", path, side.tree)
            table.missing("disk-only delete", "–", path, side.tree)
            continue
        table.add(PeerRow("disk-only create, running domain", "–", path, made[path],
                          made["virsh"], target=0.5 if path == "CLI" else 1.0,
                          note="virsh: --disk-only (an external overlay)"))
        table.add(PeerRow("disk-only delete", "–", path, gone[path], gone["virsh"],
                          target=0.5 if path == "CLI" else 1.0,
                          note="virsh: --metadata (9.0 cannot delete an external snapshot)"))
    virsh("destroy", vdom, check=False)
    side.ws.snapfs("domain", "stop", "--force", dom)
