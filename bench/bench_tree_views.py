#!/usr/bin/env python3
"""Benchmark a disk view read through the mounted tree against qemu-img convert.

A domain with a boot disk (the test guest, which counts) and a data disk of
random bytes (1 GiB by default). Snapshot ``bench`` is taken, a quarter of the
data disk is overwritten after it, then the domain is started: the view
``<mnt>/<dom>/bench/disks/vdb.raw`` is read while the VM runs.

Each round, in this order (the median of the rounds is reported):

    view cold       drop_caches (echo 3) and no qemu-nbd running: dd bs=1M
                    of the view, qemu-nbd's start included
    convert cold    drop_caches, then qemu-img convert -U -l snapshot.name=bench
                    into null-co (reads everything, writes nowhere)
    convert warm    the same again, the image now in the page cache
    view warm-nbd   the image in the page cache, its qemu-nbd running (a reader
                    holds the view open), the view's own pages evicted
                    (fadvise DONTNEED): FUSE + snapfs + NBD
    view warm       dd again: the tree opens views with keep_cache, so this is
                    the kernel's page cache

    /tmp/venv/bin/python bench/bench_tree_views.py [--size-mib 1024] [--repeat 3] [--dir /tmp]

Needs root (drop_caches, FUSE), fuse3, qemu-img, qemu-io, qemu-nbd and
python3-libnbd. Everything it starts is stopped and its work dir removed,
also when interrupted. drop_caches empties the page cache of the whole
machine: other benchmarks running at the same time see it.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from guestbuild import build_boot_sector, make_disk  # noqa: E402

MiB = 1 << 20
DOM = "tvbench"
TAG = "bench"
MOUNT_TIMEOUT = 15.0
SERVER_IDLE_WAIT = 15.0


class Bench:
    """The domain, its snapshot and the mounted tree, in a work dir of their own."""

    def __init__(self, workdir: Path, size: int) -> None:
        self.workdir = workdir
        self.size = size
        self.config, self.state, self.run_dir, self.images = (
            workdir / d for d in ("cfg", "st", "run", "img"))
        self.mnt = workdir / "mnt"
        for d in (self.config, self.state, self.run_dir, self.images, self.mnt):
            d.mkdir(parents=True)
        self.vdb = self.images / "vdb.qcow2"
        self.mount_proc: subprocess.Popen[bytes] | None = None
        self.started = False

    # -- set up and tear down ----------------------------------------------------

    def snapfs(self, *args: str) -> None:
        subprocess.run([sys.executable, "-m", "snapfs.cli", "--config-dir", str(self.config),
                        "--state-dir", str(self.state), "--run-dir", str(self.run_dir), *args],
                       check=True, stdout=subprocess.DEVNULL, cwd=REPO)

    def set_up(self) -> None:
        print(f"building a {self.size // MiB} MiB data disk of random bytes in {self.workdir} ...",
              flush=True)
        boot = build_boot_sector(self.workdir)
        vda = make_disk(self.images / "vda.qcow2", boot)
        raw = self.images / "vdb.raw"
        rng = random.Random(7)
        with open(raw, "wb") as f:
            for _ in range(self.size // (16 * MiB)):
                f.write(rng.randbytes(16 * MiB))
        run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(self.vdb))
        raw.unlink()
        accel = "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"
        toml = self.workdir / f"{DOM}.toml"
        toml.write_text(f'name = "{DOM}"\nmemory = "32M"\naccel = "{accel}"\n'
                        f'[[disks]]\ndev = "vda"\nfile = "{vda}"\n'
                        f'[[disks]]\ndev = "vdb"\nfile = "{self.vdb}"\n')
        self.snapfs("domain", "define", str(toml))
        self.snapfs("vm-snapshot-create", "-n", TAG, DOM)
        run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {self.size // 4}", str(self.vdb))
        self.snapfs("domain", "start", DOM)
        self.started = True
        log = open(self.workdir / "mount.log", "wb")
        self.mount_proc = subprocess.Popen(
            [sys.executable, "-m", "snapfs.cli", "--config-dir", str(self.config),
             "--state-dir", str(self.state), "--run-dir", str(self.run_dir),
             "mount", "--foreground", str(self.mnt)], stdout=log, stderr=log, cwd=REPO)
        log.close()
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not os.path.ismount(self.mnt):
            if self.mount_proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the tree did not mount: "
                                 f"{(self.workdir / 'mount.log').read_text()}")
            time.sleep(0.05)

    def tear_down(self) -> None:
        if self.mount_proc is not None and self.mount_proc.poll() is None:
            self.mount_proc.send_signal(signal.SIGTERM)
            try:
                self.mount_proc.wait(30)
            except subprocess.TimeoutExpired:
                self.mount_proc.kill()
                self.mount_proc.wait()
        if os.path.ismount(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], check=False)
        if self.started:
            try:
                self.snapfs("domain", "stop", "--force", DOM)
            except subprocess.CalledProcessError:
                print("warning: stopping the domain failed", file=sys.stderr)
        left = self.servers()
        if left:
            print(f"warning: qemu-nbd left running: {left}", file=sys.stderr)
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- measuring -------------------------------------------------------------------

    @property
    def view(self) -> Path:
        return self.mnt / DOM / TAG / "disks" / "vdb.raw"

    def servers(self) -> list[int]:
        out = subprocess.run(["pgrep", "-f", f"qemu-nbd.*{self.run_dir}"], capture_output=True,
                             text=True).stdout
        return [int(pid) for pid in out.split()]

    def wait_no_server(self) -> None:
        deadline = time.monotonic() + SERVER_IDLE_WAIT
        while self.servers():
            if time.monotonic() > deadline:
                raise SystemExit("qemu-nbd did not stop after its idle time")
            time.sleep(0.1)

    def dd_view(self) -> float:
        t0 = time.perf_counter()
        out = subprocess.run(["dd", f"if={self.view}", "of=/dev/null", "bs=1M"],
                             capture_output=True, text=True, check=True).stderr
        seconds = time.perf_counter() - t0
        copied = int(out.strip().splitlines()[-1].split()[0])
        if copied != self.size:
            raise SystemExit(f"dd read {copied} bytes of {self.size}")
        return seconds

    def convert(self) -> float:
        t0 = time.perf_counter()
        run("qemu-img", "convert", "-U", "-f", "qcow2", "-l", f"snapshot.name={TAG}", "-n",
            str(self.vdb), "--target-image-opts", f"driver=null-co,size={self.size}")
        return time.perf_counter() - t0

    def read_ahead_kb(self) -> str:
        st = os.stat(self.mnt)
        return Path(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/"
                    "read_ahead_kb").read_text().strip()

    def round(self) -> dict[str, float]:
        times: dict[str, float] = {}
        self.wait_no_server()
        drop_caches()
        times["view cold"] = self.dd_view()
        drop_caches()
        times["convert cold"] = self.convert()
        times["convert warm"] = self.convert()
        fd = os.open(self.view, os.O_RDONLY)      # keeps the view's qemu-nbd up
        try:
            os.pread(fd, 4096, 0)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            times["view warm-nbd"] = self.dd_view()
            times["view warm"] = self.dd_view()
        finally:
            os.close(fd)
        return times


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def rate(size: int, seconds: float) -> str:
    return f"{size / MiB / seconds:7.0f} MiB/s  {seconds:6.2f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--dir", default="/tmp", help="where the work dir goes (default /tmp; "
                    "its path must stay short for QEMU's sockets)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (drop_caches, FUSE)")
    for tool in ("qemu-img", "qemu-io", "qemu-nbd", "fusermount3", "dd"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found")
    size = args.size_mib * MiB
    bench = Bench(Path(tempfile.mkdtemp(prefix="sfbv", dir=args.dir)), size)
    try:
        bench.set_up()
        print(f"the tree's read-ahead: {bench.read_ahead_kb()} KiB", flush=True)
        rounds = []
        for i in range(args.repeat):
            rounds.append(bench.round())
            print(f"round {i + 1}: " + ", ".join(f"{k} {v:.2f} s" for k, v in rounds[-1].items()),
                  flush=True)
    finally:
        bench.tear_down()
    median = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    print(f"\n{size // MiB} MiB, median of {len(rounds)} rounds (VM running):")
    for key, seconds in median.items():
        print(f"  {key:14s} {rate(size, seconds)}")
    print("view throughput / qemu-img convert throughput:")
    print(f"  cold        {median['convert cold'] / median['view cold']:.2f}")
    print(f"  warm (NBD)  {median['convert warm'] / median['view warm-nbd']:.2f}")
    print(f"  warm (page cache kept) {median['convert warm'] / median['view warm']:.2f}")


if __name__ == "__main__":
    main()
