#!/usr/bin/env python3
"""The cost of snapfs's trio → asyncio bridge (snapfs/qmp.py) on a QMP round trip.

Times N `query-status` round trips to a real QEMU (started here with -S, no guest)
through snapfs.qmp from trio, against the baseline of the same calls made with
qemu.qmp natively in an asyncio loop, in the same run. Prints medians per call
and their ratio. Usage: bench/bench_qmp.py [N]
"""

import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio
from qemu.qmp import QMPClient

from snapfs import qmp

N = int(sys.argv[1]) if len(sys.argv) > 1 else 500


async def bridged(sock: Path) -> list[float]:
    times = []
    async with qmp.connect(sock) as mon:
        for _ in range(N):
            start = time.perf_counter()
            await mon.execute("query-status")
            times.append(time.perf_counter() - start)
    return times


async def native(sock: Path) -> list[float]:
    client = QMPClient("bench")
    await client.connect(str(sock))
    times = []
    for _ in range(N):
        start = time.perf_counter()
        await client.execute("query-status")
        times.append(time.perf_counter() - start)
    await client.disconnect()
    return times


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="sfq", dir="/tmp"))
    sock, pid = work / "q.sock", work / "q.pid"
    subprocess.run(["qemu-system-x86_64", "-S", "-display", "none", "-nodefaults", "-m", "16",
                    "-daemonize", "-pidfile", str(pid), "-qmp", f"unix:{sock},server=on,wait=off"],
                   check=True)
    try:
        base = statistics.median(asyncio.run(native(sock))) * 1e6
        ours = statistics.median(trio.run(bridged, sock)) * 1e6
        print(f"query-status round trip, median of {N}: qemu.qmp in asyncio {base:.0f} µs, "
              f"snapfs.qmp from trio {ours:.0f} µs, ratio {ours / base:.2f}×")
    finally:
        subprocess.run(["kill", pid.read_text().strip()], check=False)
        time.sleep(0.2)
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
