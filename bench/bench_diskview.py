#!/usr/bin/env python3
"""Benchmark disk views (snapfs.diskview) against qemu-img convert.

Builds a qcow2 image full of random bytes (1 GiB by default), takes an
internal snapshot, overwrites part of the active layer, then times reading the
whole snapshot:

- through DiskViews with 1 MiB reads: a cold pass (includes starting qemu-nbd)
  and a warm pass (server reused);
- the same with 128 KiB reads (the size FUSE usually asks for);
- 4 concurrent readers, each reading a quarter, with 1, 2 and 4 NBD
  connections per server;
- ``qemu-img convert -U -l snapshot.name=TAG`` into a null-co target (reads
  everything, writes nowhere): the reference.

Most passes read the image from the page cache (this measures the
NBD/Python path, not the disk); a last pair evicts the image's pages before
each pass (posix_fadvise DONTNEED) to compare disk-bound reads.

    /tmp/venv/bin/python bench/bench_diskview.py [--size-mib 1024] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from snapfs.diskview import DEFAULT_HANDLES, DiskViews  # noqa: E402

MiB = 1 << 20
TAG = "bench"


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def build_image(workdir: Path, size: int) -> Path:
    raw = workdir / "random.raw"
    img = workdir / "disk.qcow2"
    with open(raw, "wb") as f:
        for _ in range(size // (16 * MiB)):
            f.write(os.urandom(16 * MiB))
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(img))
    raw.unlink()
    run("qemu-img", "snapshot", "-c", TAG, str(img))
    # The active layer moves on: a quarter of the disk is rewritten.
    run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {size // 4}", str(img))
    return img


def evict(path: Path) -> None:
    """Drop this file's pages from the page cache (reads then hit the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / MiB / seconds:8.0f} MiB/s  ({seconds:6.2f} s)"


async def read_all(
    views: DiskViews, img: Path, block: int, digest: bool = False
) -> tuple[float, int, str]:
    """Open, read the whole view sequentially, close: (seconds, bytes, sha256 or "")."""
    t0 = time.perf_counter()
    view = await views.open(img, TAG)
    h = hashlib.sha256() if digest else None
    total = 0
    try:
        off = 0
        while off < view.size:
            data = await view.read(off, block)
            if h is not None:
                h.update(data)
            total += len(data)
            off += len(data)
    finally:
        await views.close(view)
    return time.perf_counter() - t0, total, h.hexdigest() if h else ""


async def read_concurrently(
    views: DiskViews, img: Path, readers: int, block: int
) -> tuple[float, int]:
    views_open = [await views.open(img, TAG) for _ in range(readers)]
    size = views_open[0].size
    part = -(-size // readers)
    total = 0

    async def reader(i: int) -> None:
        nonlocal total
        v = views_open[i]
        off, end = i * part, min((i + 1) * part, size)
        while off < end:
            data = await v.read(off, min(block, end - off))
            total += len(data)
            off += len(data)

    t0 = time.perf_counter()
    async with trio.open_nursery() as n:
        for i in range(readers):
            n.start_soon(reader, i)
    dt = time.perf_counter() - t0
    for v in views_open:
        await views.close(v)
    return dt, total


def qemu_img_convert(img: Path, size: int) -> float:
    t0 = time.perf_counter()
    run(
        "qemu-img", "convert", "-U", "-f", "qcow2", "-l", f"snapshot.name={TAG}", "-n",
        str(img), "--target-image-opts", f"driver=null-co,size={size}",
    )
    return time.perf_counter() - t0


def qemu_img_convert_sha(img: Path, workdir: Path) -> str:
    out = workdir / "convert.raw"
    run("qemu-img", "convert", "-U", "-f", "qcow2", "-l", f"snapshot.name={TAG}",
        "-O", "raw", str(img), str(out))
    h = hashlib.sha256()
    with open(out, "rb") as f:
        while chunk := f.read(16 * MiB):
            h.update(chunk)
    out.unlink()
    return h.hexdigest()


async def bench(workdir: Path, size: int, repeat: int) -> None:
    print(f"building a {size // MiB} MiB qcow2 of random bytes in {workdir} ...", flush=True)
    img = build_image(workdir, size)
    run_dir = workdir / "run"
    with open(img, "rb") as f:  # warm the page cache: measure NBD, not the disk
        while f.read(16 * MiB):
            pass
    print(f"(warm passes: best of {repeat})", flush=True)

    convert_s = min(qemu_img_convert(img, size) for _ in range(repeat))
    print(f"qemu-img convert -> null-co                      {rate(size, convert_s)}")

    async with DiskViews(run_dir, idle=0) as views:
        opens = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            view = await views.open(img, TAG)  # starts qemu-nbd (idle=0: stops on close)
            opens.append(time.perf_counter() - t0)
            await views.close(view)
        print(f"open() with qemu-nbd start, median               {statistics.median(opens) * 1000:8.1f} ms")

    async with DiskViews(run_dir, idle=30) as views:
        cold_s, n, _ = await read_all(views, img, MiB)
        print(f"view, 1 MiB reads, cold (incl. qemu-nbd start)   {rate(n, cold_s)}")
        warm_s = min([(await read_all(views, img, MiB))[0] for _ in range(repeat)])
        print(f"view, 1 MiB reads, warm                          {rate(size, warm_s)}")
        s128 = min([(await read_all(views, img, 128 * 1024))[0] for _ in range(repeat)])
        print(f"view, 128 KiB reads, warm                        {rate(size, s128)}")
        _, _, digest = await read_all(views, img, MiB, digest=True)

    async with DiskViews(run_dir, idle=30, readahead=0) as views:
        await read_all(views, img, MiB)
        s = min([(await read_all(views, img, 128 * 1024))[0] for _ in range(repeat)])
        print(f"view, 128 KiB reads, no read-ahead               {rate(size, s)}")

    async with DiskViews(run_dir, idle=30, max_handles=1) as views:
        await read_all(views, img, MiB)
        s = min([(await read_all(views, img, MiB))[0] for _ in range(repeat)])
        print(f"view, 1 MiB reads, 1 connection                  {rate(size, s)}")
        s = min([(await read_all(views, img, 32 * MiB))[0] for _ in range(repeat)])
        print(f"view, 32 MiB reads, 1 connection                 {rate(size, s)}")

    async with DiskViews(run_dir, idle=30) as views:
        s = min([(await read_all(views, img, 32 * MiB))[0] for _ in range(repeat)])
        print(f"view, 32 MiB reads, default connections (split) {rate(size, s)}")

    # Connections per server, 4 concurrent readers: rounds interleave the
    # settings (this machine's speed drifts); the median counts.
    conc: dict[tuple[int, int], list[float]] = {}
    for _ in range(repeat):
        for handles in (1, 2, 4):
            async with DiskViews(run_dir, idle=30, max_handles=handles) as views:
                await read_all(views, img, MiB)  # start the server, warm up
                for block in (MiB, 128 * 1024):
                    dt, n = await read_concurrently(views, img, 4, block)
                    conc.setdefault((handles, block), []).append(dt)
    for (handles, block), times in sorted(conc.items()):
        print(
            f"4 readers x {block // 1024:4d} KiB, {handles} connection(s), median "
            f"{rate(size, statistics.median(times))}"
        )
    print(f"(default connections per server here: {DEFAULT_HANDLES})")

    # The same with the image's pages evicted before each pass: disk-bound.
    cold_convert = []
    for _ in range(repeat):
        evict(img)
        cold_convert.append(qemu_img_convert(img, size))
    cold_view = []
    async with DiskViews(run_dir, idle=30) as views:
        for _ in range(repeat):
            evict(img)
            cold_view.append((await read_all(views, img, MiB))[0])
    cc, cv = statistics.median(cold_convert), statistics.median(cold_view)
    print(f"page cache evicted: qemu-img convert, median      {rate(size, cc)}")
    print(f"page cache evicted: view 1 MiB reads, median      {rate(size, cv)}")

    ref = qemu_img_convert_sha(img, workdir)
    print(f"sha256 of view == qemu-img convert -O raw output: {digest == ref}")
    print(
        f"ratio view/convert throughput: warm {convert_s / warm_s:.3f}, "
        f"first pass {convert_s / cold_s:.3f}, page cache evicted {cc / cv:.2f}"
    )
    for handles in (2, 4):
        gain = statistics.median(conc[(1, MiB)]) / statistics.median(conc[(handles, MiB)])
        print(f"4 readers x 1 MiB, {handles} connections vs 1: {gain:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    ap.add_argument("--repeat", type=int, default=5, help="passes per measurement")
    args = ap.parse_args()
    for tool in ("qemu-img", "qemu-io", "qemu-nbd"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found")
    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory(prefix="snapfs-bench-", dir=args.dir) as d:
        trio.run(bench, Path(d), size, args.repeat)


if __name__ == "__main__":
    main()
