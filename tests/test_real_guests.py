"""Real guests (issue 12): a Linux guest booted with ``kernel =``, a UEFI guest with
its NVRAM, and the definition verbs (``define --replace``, ``undefine``).

The Linux guest is Debian's kernel (``apt-get download`` + ``dpkg-deb -x``, no
install) with a busybox initramfs whose init counts once a second to the serial
console ("count N MAC") and in place into ``/count`` on an ext4 data disk
(``guestbuild.build_linux_guest``, cached in ``guestbuild.LINUX_CACHE``). One
boot of it, and one of OVMF, are shared by the module's tests, with one mounted
tree. Boot time and live-snapshot time are printed (``pytest -s``), not
asserted.
"""

from __future__ import annotations

import re
import subprocess
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Env
from guestbuild import COUNT_FILE, GuestBuildError, build_linux_guest, make_disk, make_ext4_disk
from qmpsync import QMP
from test_tree_mount import Tree, mounted, sh

LINUX_BOOT_TIMEOUT = 300.0
UEFI_BOOT_TIMEOUT = 180.0
COUNT = re.compile(r"^count (\d+) ([0-9a-f:]{17})$", re.M)
# OVMF's prompt on the serial console: with nothing to boot it ends in its shell,
# where it sits idle (its NVRAM no longer changes).
OVMF_PROMPT = "Shell> "
# The Linux guest needs TCG here: this host's paravirtual KVM cannot run it reliably.
LINUX_ACCEL = "tcg"


@dataclass
class Guest:
    name: str
    serial: Path
    definition: Path    # the installed one, with its uuid and MACs

    def text(self) -> str:
        return self.serial.read_text(errors="replace")

    def counts(self, since: int = 0) -> list[tuple[int, str]]:
        """(count, MAC) of every line the guest printed after byte ``since``."""
        return [(int(n), mac) for n, mac in COUNT.findall(self.text()[since:])]

    def wait_count(self, at_least: int, since: int = 0,
                   timeout: float = LINUX_BOOT_TIMEOUT) -> list[tuple[int, str]]:
        deadline = time.monotonic() + timeout
        while True:
            counts = self.counts(since)
            if counts and counts[-1][0] >= at_least:
                return counts
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name}: no count {at_least} after {timeout}s; serial:\n"
                            + self.text()[-3000:])
            time.sleep(0.2)

    def macs(self) -> list[str]:
        return [nic["mac"] for nic in tomllib.loads(self.definition.read_text())["nics"]]


def serial_args(path: Path) -> str:
    """extra_args for a serial console appended to ``path`` (kept across applies)."""
    return f'extra_args = ["-chardev", "file,id=ser,path={path},append=on", ' \
           f'"-serial", "chardev:ser"]'


def debugfs_cat(image: Path, path: str) -> str:
    return sh(f"debugfs -R 'cat {path}' {image} 2>/dev/null")


def e2fsck(image: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["e2fsck", "-f", "-n", str(image)], capture_output=True, text=True)


def snapshot_bytes(image: Path, tag: str, out: Path) -> bytes:
    """The bytes of internal snapshot ``tag`` of ``image``, read by qemu-img."""
    sh(f"qemu-img convert -U -O raw -l snapshot.name={tag} {image} {out}")
    return out.read_bytes()


def current_bytes(image: Path, out: Path) -> bytes:
    sh(f"qemu-img convert -U -O raw {image} {out}")
    return out.read_bytes()


# -- the shared guests ---------------------------------------------------------------


@pytest.fixture(scope="module")
def guests(module_env: Env) -> Iterator[tuple[Tree, Guest, Guest]]:
    """A booted Linux guest ("lx") and a booted UEFI guest ("uf"), and a mounted tree."""
    env = module_env
    try:
        kernel, initrd = build_linux_guest()
    except GuestBuildError as err:
        pytest.fail(f"cannot build the Linux guest: {err}")
    data = make_ext4_disk(env.images / "lx-vda.qcow2")
    lx_serial, uf_serial = env.root / "lx.serial", env.root / "uf.serial"
    (env.root / "lx.toml").write_text(f"""
name = "lx"
memory = "128M"
accel = "{LINUX_ACCEL}"
kernel = "{kernel}"
initrd = "{initrd}"
cmdline = "console=ttyS0 quiet panic=-1"
{serial_args(lx_serial)}

[[disks]]
dev = "vda"
file = "{data}"

[[nics]]
net = "user"
""")
    blank = make_disk(env.images / "uf-vda.qcow2", None)
    (env.root / "uf.toml").write_text(f"""
name = "uf"
memory = "128M"
accel = "tcg"
firmware = "uefi"
{serial_args(uf_serial)}

[[disks]]
dev = "vda"
file = "{blank}"
""")
    for name in ("lx", "uf"):
        env.snapfs("domain", "define", str(env.root / f"{name}.toml"))
    lx = Guest("lx", lx_serial, env.config / "domains" / "lx.toml")
    uf = Guest("uf", uf_serial, env.config / "domains" / "uf.toml")
    started = time.monotonic()
    env.snapfs("domain", "start", "lx")
    env.snapfs("domain", "start", "uf")
    lx.wait_count(1)
    print(f"\nLinux guest ({LINUX_ACCEL}): first count {time.monotonic() - started:.1f} s "
          "after `domain start` (UEFI guest booting beside it)")
    with mounted(env) as tree:
        yield tree, lx, uf


# -- the Linux guest -------------------------------------------------------------------


def test_linux_guest_comes_back_from_a_live_snapshot(guests: tuple[Tree, Guest, Guest],
                                                     tmp_path: Path) -> None:
    tree, lx, _ = guests
    env = tree.env
    mac = lx.macs()[0]
    before = lx.wait_count(lx.counts()[-1][0] + 2)
    assert {m for _, m in before} == {mac}, "the guest sees the MAC its definition holds"
    started = time.monotonic()
    env.snapfs("vm-snapshot-create", "-n", "s1", "lx")
    print(f"\nlive vm-snapshot-create of the Linux guest: {time.monotonic() - started:.2f} s")
    view = tree / "lx" / "s1" / "disks" / "vda.img"
    check = e2fsck(view)
    assert check.returncode == 0, check.stdout + check.stderr
    at_snapshot = int(debugfs_cat(view, COUNT_FILE))
    assert at_snapshot >= before[-1][0]
    counted = lx.wait_count(at_snapshot + 3)[-1][0]
    offset = len(lx.text())
    env.snapfs("vm-snapshot-apply", "-n", "s1", "lx")
    after = lx.wait_count(at_snapshot + 3, since=offset, timeout=60)
    # The disk holds N once its write is fsynced, and the console shows N right
    # after: a snapshot between the two comes back printing N itself.
    assert after[0][0] in (at_snapshot, at_snapshot + 1), (at_snapshot, after, counted)
    assert after[0][0] < counted
    assert [n for n, _ in after] == list(range(after[0][0], after[0][0] + len(after)))
    assert {m for _, m in after} == {mac}, "the NIC keeps its MAC across the apply"
    with QMP(env.qmp_path("lx")) as qmp:
        assert qmp.cmd("query-status")["status"] == "running"
        nics = [d for d in qmp.cmd("qom-list", path="/machine/peripheral")
                if d["name"] == "net0"]
        assert nics, "the restored QEMU has the definition's NIC"


def test_linux_guest_disk_is_at_the_snapshot_after_a_paused_apply(
        guests: tuple[Tree, Guest, Guest], tmp_path: Path) -> None:
    tree, lx, _ = guests
    env = tree.env
    lx.wait_count(lx.counts()[-1][0] + 1)
    env.snapfs("vm-snapshot-create", "-n", "s2", "lx")
    at_snapshot = int(debugfs_cat(tree / "lx" / "s2" / "disks" / "vda.img", COUNT_FILE))
    lx.wait_count(at_snapshot + 3)
    env.snapfs("vm-snapshot-apply", "--paused", "-n", "s2", "lx")
    env.snapfs("domain", "stop", "--force", "lx")
    disk = tmp_path / "vda.raw"
    sh(f"qemu-img convert -O raw {env.images / 'lx-vda.qcow2'} {disk}")
    assert int(debugfs_cat(disk, COUNT_FILE)) == at_snapshot
    check = e2fsck(disk)
    assert check.returncode == 0, check.stdout + check.stderr


# -- the UEFI guest --------------------------------------------------------------------


def test_uefi_nvram_comes_back_with_its_snapshot(guests: tuple[Tree, Guest, Guest],
                                                 tmp_path: Path) -> None:
    tree, _, uf = guests
    env = tree.env
    deadline = time.monotonic() + UEFI_BOOT_TIMEOUT
    while OVMF_PROMPT not in uf.text():
        assert time.monotonic() < deadline, f"OVMF printed nothing:\n{uf.text()[-2000:]}"
        time.sleep(0.5)
    with QMP(env.qmp_path("uf")) as qmp:
        assert qmp.cmd("query-status")["status"] == "running"
    nvram = Path(tomllib.loads(uf.definition.read_text())["nvram"])
    assert nvram.parent == env.state / "nvram" and nvram.stat().st_mode & 0o777 == 0o600
    env.snapfs("vm-snapshot-create", "-n", "u1", "uf")
    listing = env.snapfs("disk-snapshot-list", "uf").stdout
    assert re.search(r"^nvram\s+\d+\s+u1\s", listing, re.M), listing
    at_snapshot = snapshot_bytes(nvram, "u1", tmp_path / "u1.raw")
    assert (tree / "uf" / "u1" / "disks" / "nvram.img").read_bytes() == at_snapshot
    assert at_snapshot.rstrip(b"\xff\x00"), "the NVRAM holds OVMF's variable store"

    # Every other transaction of a running domain takes the NVRAM along too.
    env.snapfs("vm-snapshot-create", "--mode", "paused", "-n", "p1", "uf")
    env.snapfs("disk-snapshot-create", "-n", "d0", "uf")
    tags = sh(f"qemu-img snapshot -U -l {nvram}")
    assert all(f" {tag} " in tags for tag in ("u1", "p1", "d0")), tags

    env.snapfs("domain", "stop", "--force", "uf")
    # A replaced definition keeps the NVRAM (and what it holds).
    held = current_bytes(nvram, tmp_path / "held.raw")
    env.snapfs("domain", "define", "--replace", str(env.root / "uf.toml"))
    assert Path(tomllib.loads(uf.definition.read_text())["nvram"]) == nvram
    assert current_bytes(nvram, tmp_path / "kept.raw") == held
    sh(f"qemu-io -f qcow2 -c 'write -P 0xab 0 64k' {nvram}")
    assert current_bytes(nvram, tmp_path / "changed.raw") != at_snapshot
    env.snapfs("vm-snapshot-apply", "-n", "u1", "uf")
    with QMP(env.qmp_path("uf")) as qmp:
        assert qmp.cmd("query-status")["status"] == "running"
    env.snapfs("domain", "stop", "--force", "uf")
    assert current_bytes(nvram, tmp_path / "applied.raw") == at_snapshot

    # Shut off: the NVRAM goes through qemu-img with the disks.
    env.snapfs("disk-snapshot-create", "-n", "d1", "uf")
    sh(f"qemu-io -f qcow2 -c 'write -P 0xcd 4k 4k' {nvram}")
    env.snapfs("vm-snapshot-create", "-n", "off", "uf")
    sh(f"qemu-io -f qcow2 -c 'write -P 0xef 0 8k' {nvram}")
    env.snapfs("vm-snapshot-apply", "-n", "off", "uf")
    assert current_bytes(nvram, tmp_path / "off.raw") == snapshot_bytes(
        nvram, "off", tmp_path / "off-snap.raw")
    assert (tree / "uf" / ".disk" / "d1" / "nvram.img").read_bytes() == snapshot_bytes(
        nvram, "d1", tmp_path / "d1.raw")

    env.snapfs("vm-snapshot-delete", "-n", "u1", "uf")
    tags = sh(f"qemu-img snapshot -l {nvram}")
    assert " u1 " not in tags and " off " in tags
    assert "uf undefined" in env.snapfs("domain", "undefine", "--with-snapshots", "uf").stdout
    assert not nvram.exists()


# -- define --replace, undefine ----------------------------------------------------------


def test_replace_keeps_uuid_and_macs_and_refuses_a_running_domain(env: Env) -> None:
    source = env.write_definition("rp", extra='[[nics]]\nnet = "user"\n'
                                  '[[nics]]\nmodel = "e1000"\nnet = "user"')
    env.snapfs("domain", "define", str(source))
    installed = env.config / "domains" / "rp.toml"
    first = tomllib.loads(installed.read_text())
    macs = [nic["mac"] for nic in first["nics"]]
    assert all(re.fullmatch(r"52:54:00(:[0-9a-f]{2}){3}", m) for m in macs) and len(set(macs)) == 2
    assert "already defined" in env.fails("domain", "define", str(source))

    env.start("rp")
    assert env.fails("domain", "define", "--replace", str(source)) == (
        "snapfs: domain define: domain 'rp' is running: stop it to replace its definition; "
        "the definition was left as it was")
    assert tomllib.loads(installed.read_text()) == first
    env.snapfs("domain", "stop", "--force", "rp")

    source.write_text(source.read_text().replace('memory = "32M"', 'memory = "48M"'))
    out = env.snapfs("domain", "define", "--replace", str(source)).stdout
    assert out.strip() == f"domain rp defined (uuid {first['uuid']})"
    second = tomllib.loads(installed.read_text())
    assert second["memory"] == "48M" and second["uuid"] == first["uuid"]
    assert [nic["mac"] for nic in second["nics"]] == macs
    env.start("rp")     # the replaced definition boots
    env.snapfs("domain", "stop", "--force", "rp")

    source.write_text('uuid = "00000000-0000-0000-0000-000000000001"\n' + source.read_text())
    assert "keeps its uuid" in env.fails("domain", "define", "--replace", str(source))


def test_undefine_refuses_until_asked_then_removes_the_snapshots(env: Env) -> None:
    env.define("ud", devs=("vda", "vdb"))
    env.start("ud")
    env.snapfs("vm-snapshot-create", "-n", "s1", "ud")
    env.snapfs("vm-snapshot-create", "-n", "s2", "ud")
    store = next((env.state / "snapshots").iterdir())
    assert (store / "s1.save").exists()
    assert env.fails("domain", "undefine", "ud") == (
        "snapfs: domain undefine: domain 'ud' is running: stop it first; nothing was removed")
    env.snapfs("vm-snapshot-apply", "-n", "s1", "ud")   # leaves an .undo as well
    env.snapfs("domain", "stop", "--force", "ud")
    assert env.fails("domain", "undefine", "ud") == (
        "snapfs: domain undefine: domain 'ud' has 3 VM snapshots (.undo, s1, s2): "
        "`domain undefine --with-snapshots` deletes them too; nothing was removed")
    assert (env.config / "domains" / "ud.toml").exists() and (store / "s1.save").exists()

    # Killed while deleting the first snapshot: the next process finishes that
    # delete, and the domain and its other snapshots are as they were.
    killed = env.snapfs("domain", "undefine", "--with-snapshots", "ud", check=False,
                        env={"SNAPFS_DIE_AT": "vm-snapshot-delete:forget"})
    assert killed.returncode == -9, killed.stderr
    listed = env.snapfs("vm-snapshot-list", "ud").stdout
    assert "s1" in listed and "s2" in listed
    assert not (store / "snapshotdata-.undo.xl").exists()
    out = env.snapfs("domain", "undefine", "--with-snapshots", "ud").stdout
    assert out.strip() == "domain ud undefined, with its 2 VM snapshot(s)"
    assert not (env.config / "domains" / "ud.toml").exists() and not store.exists()
    for dev in ("vda", "vdb"):
        image = env.images / f"ud-{dev}.qcow2"
        assert image.exists(), "the disks are the user's"
        assert sh(f"qemu-img snapshot -l {image}").strip() == ""
    assert "ud" not in env.snapfs("domain", "list").stdout
    assert "no domain named 'ud'" in env.fails("domain", "status", "ud")
    assert "no domain named 'ud'" in env.fails("domain", "undefine", "ud")


def test_undefine_without_snapshots_needs_no_flag(env: Env) -> None:
    env.define("plain")
    assert env.snapfs("domain", "undefine", "plain").stdout.strip() == "domain plain undefined"
    env.define("plain")     # the name is free again: a new domain, a new uuid


def test_definition_errors_name_their_key(env: Env, tmp_path: Path) -> None:
    def refused(extra: str) -> str:
        return env.fails("domain", "define", str(env.write_definition("bad", extra=extra)))

    assert "'net' = 'tap:a,b' must be" in refused('[[nics]]\nnet = "tap:a,b"')
    assert "'mac' = '01:00:00:00:00:01' must be a unicast MAC" in refused(
        '[[nics]]\nmac = "01:00:00:00:00:01"')
    assert f"kernel {tmp_path}/none does not exist" in refused(f'kernel = "{tmp_path}/none"')
    assert "'initrd' and 'cmdline' need a 'kernel'" in refused('cmdline = "quiet"')
    assert "'firmware' = 'coreboot' must be" in refused('firmware = "coreboot"')
    assert "'nvram' is only for firmware = \"uefi\"" in refused('nvram = "/x.qcow2"')
    assert "two NICs share the MAC" in refused(
        '[[nics]]\nmac = "52:54:00:00:00:01"\n[[nics]]\nmac = "52:54:00:00:00:01"')


def test_kernel_boot_gives_no_disk_a_bootindex(env: Env) -> None:
    from snapfs.config import Dirs, load_domain
    from snapfs.qemu import qemu_command

    kernel = env.root / "vmlinuz"
    kernel.write_bytes(b"not run")
    env.define("kb", devs=("vda", "vdb"), extra=f'kernel = "{kernel}"\ncmdline = "a,b c"')
    dirs = Dirs(env.config, env.state, env.run)
    dom = load_domain(dirs, "kb")
    cmd = qemu_command(dom, dirs.of("kb"), {"vda": "qcow2", "vdb": "qcow2"})
    assert not any("bootindex" in arg for arg in cmd)
    assert cmd[cmd.index("-kernel") + 1] == str(kernel)
    assert cmd[cmd.index("-append") + 1] == "a,b c"


def test_a_written_definition_reads_back_the_same() -> None:
    from snapfs.config import parse_domain

    text = """name = "all"
uuid = "5c84adcc-0000-4000-8000-000000000001"
memory = "1G"
firmware = "uefi"
nvram = "/var/lib/snapfs/nvram/x.qcow2"
kernel = "/boot/vmlinuz"
initrd = "/boot/initrd.img"
cmdline = "console=ttyS0 \\"quoted\\""
[[disks]]
dev = "vda"
file = "/images/a.qcow2"
[[nics]]
net = "bridge:br0"
mac = "52:54:00:AB:CD:EF"
[[nics]]
model = "e1000"
net = "tap:tap7"
mac = "52:54:00:00:00:01"
"""
    dom = parse_domain(text)
    assert [d.dev for d in dom.disks] == ["vda", "nvram"]
    assert dom.nics[0].mac == "52:54:00:ab:cd:ef" and dom.cmdline == 'console=ttyS0 "quoted"'
    assert parse_domain(dom.to_toml()) == dom
