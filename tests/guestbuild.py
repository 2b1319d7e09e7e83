"""Build the test guest (tests/guest/counter.S) and disk images that boot it.

Everything is made at test time from source with GNU binutils and qemu-img;
nothing is downloaded.  Standard library only.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

GUEST_SOURCE = Path(__file__).with_name("guest") / "counter.S"

COUNTER_ADDR = 0x7000
MAGIC_ADDR = 0x6FFC
MAGIC = b"SNPF"
PIT_HZ = 1_193_182
PIT_DIVISOR = 11_932
TICK_HZ = PIT_HZ / PIT_DIVISOR  # ~100 Hz

SECTOR_SIZE = 512

_DEFSYMS: dict[str, int] = {
    "COUNTER_ADDR": COUNTER_ADDR,
    "MAGIC_ADDR": MAGIC_ADDR,
    "MAGIC_VALUE": int.from_bytes(MAGIC, "little"),
    "PIT_DIVISOR": PIT_DIVISOR,
}


class GuestBuildError(RuntimeError):
    """The guest or a disk image could not be built."""


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise GuestBuildError(
            f"`{name}` not found in PATH; install {package} to build the test guest"
        )
    return path


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise GuestBuildError(
            f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr.strip()}"
        )


def build_boot_sector(workdir: Path) -> Path:
    """Assemble counter.S into a 512-byte raw boot sector inside workdir.

    The result is cached under a name derived from the source and the
    constants, so repeated calls (and concurrent test processes) are cheap.
    """
    source = GUEST_SOURCE.read_bytes()
    defsyms = sorted(_DEFSYMS.items())
    key = hashlib.sha256(source + repr(defsyms).encode()).hexdigest()[:16]
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / f"counter-{key}.bin"
    if out.exists():
        return out

    as_ = _tool("as", "binutils")
    ld = _tool("ld", "binutils")
    with tempfile.TemporaryDirectory(dir=workdir, prefix=".guestbuild-") as tmp:
        obj = Path(tmp) / "counter.o"
        binary = Path(tmp) / "counter.bin"
        argv = [as_, "--32"]
        for name, value in defsyms:
            argv += ["--defsym", f"{name}={value}"]
        _run(argv + ["-o", str(obj), str(GUEST_SOURCE)])
        _run([ld, "-m", "elf_i386", "-Ttext", "0x7c00", "--oformat", "binary",
              "-o", str(binary), str(obj)])
        data = binary.read_bytes()
        if len(data) != SECTOR_SIZE or data[-2:] != b"\x55\xaa":
            raise GuestBuildError(
                f"{GUEST_SOURCE.name} produced {len(data)} bytes, "
                "expected one sector ending in 55 AA"
            )
        # Rename is atomic, so a concurrent builder never sees a partial file.
        os.replace(binary, out)
    return out


def make_disk(path: Path, boot: Path | None, size: str = "16M",
              fmt: str = "qcow2") -> Path:
    """Create a disk image at path; with boot, its sector 0 is that boot sector."""
    qemu_img = _tool("qemu-img", "qemu-utils")
    path.parent.mkdir(parents=True, exist_ok=True)
    if boot is None:
        _run([qemu_img, "create", "-q", "-f", fmt, str(path), size])
        return path

    sector = boot.read_bytes()
    if len(sector) != SECTOR_SIZE:
        raise GuestBuildError(f"{boot} is {len(sector)} bytes, not one sector")
    raw = path if fmt == "raw" else path.with_name(path.name + ".raw.tmp")
    try:
        _run([qemu_img, "create", "-q", "-f", "raw", str(raw), size])
        with raw.open("r+b") as f:
            f.write(sector)
        if raw != path:
            _run([qemu_img, "convert", "-q", "-f", "raw", "-O", fmt,
                  str(raw), str(path)])
    finally:
        if raw != path:
            raw.unlink(missing_ok=True)
    return path


# -- a Linux guest: Debian's kernel and a busybox initramfs -------------------------

# Debian 12's kernel for virtual machines: smaller than linux-image-amd64 (26 MB
# against 70 MB to download) and with ext4 built in; virtio comes as modules.
KERNEL_META = "linux-image-cloud-amd64"
BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static
GUEST_MODULES = ("virtio_pci", "virtio_blk", "virtio_net")
LINUX_CACHE = Path(os.environ.get("SNAPFS_TEST_CACHE", "/var/cache/snapfs-tests"))
DATA_DEV = "/dev/vda"
COUNT_FILE = "/count"
COUNT_WIDTH = 12

# /init: loads the virtio modules, mounts the ext4 data disk and counts once a
# second, from the count the disk holds, to the serial console ("count N MAC")
# and in place into /count on the disk (a fixed-size file overwritten without
# truncation, fsynced: no block is allocated or freed, so the file system is
# consistent at every instant a snapshot may catch).
INIT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /lib/modules/$m.ko; done
mkdir -p /data
while [ ! -b {DATA_DEV} ]; do sleep 0.1; done
mount -t ext4 {DATA_DEV} /data
n=$(cat /data{COUNT_FILE})
n=$((n + 0))
while true; do
  n=$((n + 1))
  printf '%0{COUNT_WIDTH}d\\n' $n | dd of=/data{COUNT_FILE} conv=notrunc,fsync 2>/dev/null
  echo "count $n $(cat /sys/class/net/eth0/address)"
  sleep 1
done
"""


def _newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A cpio archive in the kernel's "newc" format: (path, mode, data) entries."""
    out = bytearray()

    def add(name: str, mode: int, data: bytes, ino: int) -> None:
        raw = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0]
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + raw)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, mode, data) in enumerate(entries, 1):
        add(name, mode, data, ino)
    add("TRAILER!!!", 0, b"", 0)
    return bytes(out)


def _kernel_package() -> str:
    """The kernel package the meta-package depends on now (its ABI changes with updates)."""
    proc = subprocess.run(["apt-cache", "depends", "--important", KERNEL_META],
                          capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        name = line.strip().removeprefix("Depends: ")
        if name.startswith("linux-image-") and name != KERNEL_META:
            return name
    raise GuestBuildError(f"apt-cache does not know {KERNEL_META} (run apt-get update): "
                          f"{proc.stderr.strip()}")


def _module_order(root: Path, wanted: tuple[str, ...]) -> list[Path]:
    """The .ko files of ``wanted`` and what they depend on, dependencies first
    (read from each module's .modinfo: the package ships no modules.dep)."""
    files = {p.name.removesuffix(".ko").replace("-", "_"): p for p in root.rglob("*.ko")}
    order: list[Path] = []

    def visit(name: str) -> None:
        path = files.get(name)
        if path is None:
            raise GuestBuildError(f"module {name} is not in the kernel package")
        if path in order:
            return
        data = path.read_bytes()
        start = data.find(b"\0depends=")
        deps = data[start + 9:data.index(b"\0", start + 9)].decode() if start >= 0 else ""
        for dep in filter(None, deps.split(",")):
            visit(dep.replace("-", "_"))
        order.append(path)

    for name in wanted:
        visit(name)
    return order


def build_linux_guest(cache: Path = LINUX_CACHE) -> tuple[Path, Path]:
    """Debian's kernel (``apt-get download`` + ``dpkg-deb -x``, nothing installed) and
    a busybox initramfs running INIT, cached in ``cache`` by kernel package and
    initramfs contents: (kernel, initrd)."""
    package = _kernel_package()
    if not BUSYBOX.exists():
        raise GuestBuildError(f"{BUSYBOX} not found: install busybox-static")
    busybox = BUSYBOX.read_bytes()
    key = hashlib.sha256(INIT.encode() + busybox + repr(GUEST_MODULES).encode()
                         ).hexdigest()[:16]
    kernel, initrd = cache / f"{package}.vmlinuz", cache / f"{package}-{key}.cpio"
    if kernel.exists() and initrd.exists():
        return kernel, initrd
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".linux-") as tmp:
        _run_in(["apt-get", "download", "-q", package], Path(tmp))
        deb = next(Path(tmp).glob("*.deb"))
        tree = Path(tmp) / "x"
        _run(["dpkg-deb", "-x", str(deb), str(tree)])
        vmlinuz = next((tree / "boot").glob("vmlinuz-*"))
        modules = _module_order(tree / "lib" / "modules", GUEST_MODULES)
        entries = [(d, 0o040755, b"") for d in ("bin", "dev", "proc", "sys", "lib",
                                                 "lib/modules")]
        entries += [("bin/busybox", 0o100755, busybox), ("init", 0o100755, INIT.encode()),
                    ("modules.order", 0o100644,
                     "".join(p.stem + "\n" for p in modules).encode())]
        entries += [(f"lib/modules/{p.name}", 0o100644, p.read_bytes()) for p in modules]
        staged = Path(tmp) / "initrd"
        staged.write_bytes(_newc(entries))
        os.replace(staged, initrd)
        os.replace(vmlinuz, kernel)
    return kernel, initrd


def _run_in(argv: list[str], cwd: Path) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        raise GuestBuildError(f"{' '.join(argv)} failed ({proc.returncode}):\n"
                              f"{proc.stderr.strip()}")


def make_ext4_disk(path: Path, size: str = "64M") -> Path:
    """A qcow2 image of a fresh ext4 file system holding COUNT_FILE at 0 (made raw
    with mkfs.ext4 -d, then converted)."""
    raw = path.with_name(path.name + ".raw.tmp")
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".ext4-") as tmp:
        (Path(tmp) / COUNT_FILE.lstrip("/")).write_text("0".zfill(COUNT_WIDTH) + "\n")
        try:
            _run([_tool("qemu-img", "qemu-utils"), "create", "-q", "-f", "raw", str(raw), size])
            _run([_tool("mkfs.ext4", "e2fsprogs"), "-q", "-F", "-d", tmp, str(raw)])
            _run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path)])
        finally:
            raw.unlink(missing_ok=True)
    return path
