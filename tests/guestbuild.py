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
