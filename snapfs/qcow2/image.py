"""One qcow2 image file: its header, its snapshot table, the layers of its L1 tables.

``Image`` reads the header and the snapshot table; ``Layer`` the bytes of one
L1 table (a snapshot's, or a backing file's active layer), its allocation and
its holes; ``RawFile`` a raw backing file. See the package for why.
"""

from __future__ import annotations

import errno as _errno
import os
import struct
import sys
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..errors import NotFound, SnapfsError

__all__ = ["Image", "Layer", "Qcow2Error", "RawFile", "SnapshotEntry", "Unsupported"]

MAGIC = b"QFI\xfb"
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00     # host offset bits of an L1 or L2 entry
COMPRESSED = 1 << 62
ZERO_FLAG = 1
# Incompatible feature bits: dirty (refcounts may be stale: the tables are
# not) and the compression type (only compressed clusters use it) are read.
DIRTY, CORRUPT, DATA_FILE, COMPRESSION_TYPE, EXTENDED_L2 = 1, 2, 4, 8, 16
READABLE_INCOMPATIBLE = DIRTY | COMPRESSION_TYPE
EXT_END, EXT_BACKING_FORMAT, EXT_ENCRYPTION, EXT_DATA_FILE = 0, 0xE2792ACA, 0x0537BE77, 0x44415441
MAX_BACKING_DEPTH = 16
TORN_READ_TRIES = 20
L2_CACHE_BYTES = 32 << 20
"""L2 tables kept per layer (the tables of a 256 GiB disk with 64 KiB clusters)."""

# The last snapshot table parsed per image file, with its bytes: (offset, count), bytes, entries.
_TABLES: dict[tuple[int, int], tuple[tuple[int, int], bytes, list[SnapshotEntry]]] = {}
# Per byte: nonzero when the compressed bit (62, in an entry's first byte) is set.
_COMPRESSED_BYTE = bytes(1 if b & 0x40 else 0 for b in range(256))
_LOW_BIT = bytes(b & 1 for b in range(256))


class Qcow2Error(SnapfsError):
    """The image's tables could not be read or make no sense."""


class Unsupported(Qcow2Error):
    """The image uses a feature this reader does not; ``str()`` says which."""

    errno = _errno.EOPNOTSUPP


@dataclass(frozen=True)
class SnapshotEntry:
    """One entry of the snapshot table. ``key`` names its bytes: an entry with the
    same key in the same file is the same snapshot."""

    id: str
    name: str
    l1_offset: int
    l1_size: int
    disk_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int

    @property
    def key(self) -> tuple[str, int, int, int, int]:
        return (self.id, self.l1_offset, self.date_sec, self.date_nsec, self.vm_clock_nsec)


def _pread(fd: int, buf: memoryview, offset: int, nowait: bool) -> None:
    """Fill ``buf`` from ``offset``; past the end of the file it stays zero."""
    while buf:
        n = os.preadv(fd, [buf], offset, os.RWF_NOWAIT if nowait else 0)
        if n == 0:
            return      # past the end of the file (a file shorter than its last cluster)
        if nowait and n < len(buf):
            raise BlockingIOError(_errno.EAGAIN, "not all in the page cache")
        buf, offset = buf[n:], offset + n


def _read(fd: int, size: int, offset: int) -> bytes:
    buf = bytearray(size)
    _pread(fd, memoryview(buf), offset, False)
    return bytes(buf)


class Source(Protocol):
    """What an unallocated cluster reads from: a backing file's active layer."""

    size: int

    def read_into(self, buf: memoryview, offset: int, nowait: bool = False) -> None: ...

    def has_data(self, start: int, end: int) -> bool: ...  # may [start, end) hold non-zeros?

    def close(self) -> None: ...


class RawFile:
    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = os.fstat(self.fd).st_size

    def read_into(self, buf: memoryview, offset: int, nowait: bool = False) -> None:
        if offset < self.size:
            _pread(self.fd, buf[:self.size - offset], offset, nowait)

    def has_data(self, start: int, end: int) -> bool:
        if start >= self.size:
            return False
        try:
            return os.lseek(self.fd, start, os.SEEK_DATA) < end
        except OSError:     # ENXIO: only a hole from start to the end
            return False

    def close(self) -> None:
        os.close(self.fd)


class Image:
    """One open qcow2 file: its header, its snapshot table, its backing file."""

    version: int
    cluster_bits: int
    size: int
    l1_size: int
    l1_offset: int
    nb_snapshots: int
    snapshots_offset: int

    def __init__(self, path: Path, depth: int = 0) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"no image {path}") from None
        except OSError as err:
            raise Qcow2Error(f"cannot open {path}: {err.strerror}") from None
        self.backing: Source | None = None
        try:
            self._read_header(depth)
        except BaseException:
            self.close()
            raise

    def _read_header(self, depth: int) -> None:
        head = _read(self.fd, 112, 0)
        if head[:4] != MAGIC:
            raise Unsupported(f"{self.path} is not in qcow2 format")
        (self.version, backing_offset, backing_len, self.cluster_bits, self.size,
         crypt, self.l1_size, self.l1_offset, _, _, self.nb_snapshots,
         self.snapshots_offset) = struct.unpack_from(">IQIIQIIQQIIQ", head, 4)
        incompatible, header_len = 0, 72
        if self.version >= 3:
            incompatible, = struct.unpack_from(">Q", head, 72)
            header_len, = struct.unpack_from(">I", head, 100)
        elif self.version != 2:
            raise Unsupported(f"{self.path}: qcow2 version {self.version}")
        if not 9 <= self.cluster_bits <= 21:
            raise Qcow2Error(f"{self.path}: cluster bits {self.cluster_bits} out of range")
        self.cluster_size = 1 << self.cluster_bits
        self.l2_bits = self.cluster_bits - 3
        if crypt:
            raise Unsupported(f"{self.path} is encrypted")
        for bit, what in ((CORRUPT, "is marked corrupt"), (DATA_FILE, "has an external data file"),
                          (EXTENDED_L2, "has extended L2 entries (subclusters)")):
            if incompatible & bit:
                raise Unsupported(f"{self.path} {what}")
        if incompatible & ~READABLE_INCOMPATIBLE:
            raise Unsupported(f"{self.path} has unknown incompatible features "
                              f"{incompatible & ~READABLE_INCOMPATIBLE:#x}")
        backing_format = self._extensions(header_len, backing_offset)
        if backing_offset:
            name = _read(self.fd, backing_len, backing_offset).decode(errors="surrogateescape")
            self.backing = self._open_backing(name, backing_format, depth)

    def _extensions(self, start: int, stop: int) -> str:
        """The backing format named in the header extensions ("" if none)."""
        data = _read(self.fd, min(self.cluster_size, stop or self.cluster_size) - start, start)
        pos, backing_format = 0, ""
        while pos + 8 <= len(data):
            kind, length = struct.unpack_from(">II", data, pos)
            body = data[pos + 8:pos + 8 + length]
            if kind == EXT_END:
                break
            if kind == EXT_BACKING_FORMAT:
                backing_format = body.decode(errors="replace")
            elif kind == EXT_ENCRYPTION:
                raise Unsupported(f"{self.path} is encrypted")
            elif kind == EXT_DATA_FILE:
                raise Unsupported(f"{self.path} has an external data file")
            pos += 8 + (length + 7) // 8 * 8
        return backing_format

    def _open_backing(self, name: str, fmt: str, depth: int) -> Source:
        if depth >= MAX_BACKING_DEPTH:
            raise Unsupported(f"{self.path}: backing chain deeper than {MAX_BACKING_DEPTH}")
        if ":" in name.split("/", 1)[0]:
            raise Unsupported(f"{self.path}: backing file {name!r} is not a plain file name")
        path = Path(name) if os.path.isabs(name) else self.path.parent / name
        try:
            if not fmt:
                with open(path, "rb") as f:
                    fmt = "qcow2" if f.read(4) == MAGIC else "raw"
            if fmt == "raw":
                return RawFile(path)
            if fmt == "qcow2":
                return Image(path, depth + 1).layer(None)
        except (OSError, SnapfsError) as err:
            why = err.strerror if isinstance(err, OSError) else str(err)
            raise Unsupported(f"{self.path}: cannot open backing file {path}: {why}") from None
        raise Unsupported(f"{self.path}: backing file {path} is {fmt}")

    def snapshots(self) -> list[SnapshotEntry]:
        """The snapshot table as it is now on disk. QEMU writes a new table elsewhere
        and then points the header at it: a table read between two equal headers is
        whole. Parsed again only when its bytes changed (listings stat every view)."""
        st = os.fstat(self.fd)
        for attempt in range(TORN_READ_TRIES):
            nb, offset = struct.unpack(">IQ", _read(self.fd, 12, 60))
            kept = _TABLES.get((st.st_dev, st.st_ino))
            try:
                if kept is not None and kept[0] == (offset, nb) and \
                        _read(self.fd, len(kept[1]), offset) == kept[1]:
                    raw, out = kept[1], kept[2]
                else:
                    raw, out = self._parse_table(offset, nb)
            except (struct.error, Qcow2Error):
                raw, out = b"", None    # a table freed and overwritten as it was read
            if out is not None and struct.unpack(">IQ", _read(self.fd, 12, 60)) == (nb, offset):
                if len(_TABLES) >= 64:
                    _TABLES.clear()
                _TABLES[(st.st_dev, st.st_ino)] = ((offset, nb), raw, out)
                self.snapshots_offset, self.nb_snapshots = offset, nb
                return out
            time.sleep(0.005 * (attempt + 1))
        raise Qcow2Error(f"the snapshot table of {self.path} kept changing while it was read")

    def _parse_table(self, offset: int, count: int) -> tuple[bytes, list[SnapshotEntry]]:
        data, out, pos = b"", [], 0
        for _ in range(count):
            if len(data) < pos + 40:
                data += _read(self.fd, 1 << 16, offset + len(data))
            (l1_offset, l1_size, id_len, name_len, date_sec, date_nsec, vm_clock,
             _, extra_len) = struct.unpack_from(">QIHHIIQII", data, pos)
            if extra_len > 1 << 16:
                raise Qcow2Error(f"{self.path}: a snapshot with {extra_len} bytes of extra data")
            body, end = pos + 40, pos + 40 + extra_len + id_len + name_len
            while len(data) < end:
                data += _read(self.fd, 1 << 16, offset + len(data))
            disk_size = self.size   # entries without extra data: the image's size
            if extra_len >= 16:
                disk_size, = struct.unpack_from(">Q", data, body + 8)
            ident = data[body + extra_len:body + extra_len + id_len].decode(errors="replace")
            name = data[body + extra_len + id_len:end].decode(errors="surrogateescape")
            out.append(SnapshotEntry(ident, name, l1_offset, l1_size, disk_size,
                                     date_sec, date_nsec, vm_clock))
            pos = (end + 7) // 8 * 8
        return data[:pos], out

    def find(self, name: str) -> SnapshotEntry:
        """The first snapshot named ``name``, as QEMU picks. :raise NotFound:"""
        for entry in self.snapshots():
            if entry.name == name:
                return entry
        raise NotFound(f"no snapshot {name!r} on {self.path}")

    def layer(self, entry: SnapshotEntry | None) -> Layer:
        """The disk as ``entry`` recorded it, or the active layer (None)."""
        if entry is None:
            return Layer(self, self.l1_offset, self.l1_size, self.size)
        return Layer(self, entry.l1_offset, entry.l1_size, entry.disk_size)

    def close(self) -> None:
        if self.backing is not None:
            self.backing.close()
            self.backing = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Layer:
    """The bytes of one L1 table (a snapshot's, or a backing file's active layer).

    Owns its image: ``close`` closes it. L2 tables are cached (bounded), each
    read once; safe to read from several threads at once.
    """

    def __init__(self, image: Image, l1_offset: int, l1_size: int, size: int) -> None:
        self.image = image
        self.size = size
        self.cluster_size = image.cluster_size
        self.bits = image.cluster_bits
        if l1_size > (1 << 28):
            raise Qcow2Error(f"{image.path}: L1 table of {l1_size} entries")
        l1 = array("Q", _read(image.fd, l1_size * 8, l1_offset))
        if sys.byteorder == "little":
            l1.byteswap()
        self.l1 = [e & OFFSET_MASK for e in l1]
        self._cache: OrderedDict[int, array[int]] = OrderedDict()
        self._cache_max = max(4, L2_CACHE_BYTES >> self.bits)
        self._lock = threading.Lock()

    @property
    def clusters(self) -> int:
        return -(-self.size // self.cluster_size)

    def _table(self, offset: int, nowait: bool = False) -> array[int]:
        with self._lock:
            table = self._cache.get(offset)
            if table is not None:
                self._cache.move_to_end(offset)
                return table
        buf = bytearray(self.cluster_size)
        _pread(self.image.fd, memoryview(buf), offset, nowait)
        if buf[0::8].translate(_COMPRESSED_BYTE).count(0) != len(buf) // 8:
            raise Unsupported(f"{self.image.path} has compressed clusters")
        table = array("Q", buf)
        if sys.byteorder == "little":
            table.byteswap()
        with self._lock:
            self._cache[offset] = table
            if len(self._cache) > self._cache_max:
                self._cache.popitem(last=False)
        return table

    def entry(self, cluster: int, nowait: bool = False) -> int:
        """The L2 entry of cluster number ``cluster`` (0: unallocated)."""
        index = cluster >> (self.bits - 3)
        if index >= len(self.l1) or not self.l1[index]:
            return 0
        return self._table(self.l1[index], nowait)[cluster & ((1 << (self.bits - 3)) - 1)]

    def read(self, offset: int, size: int, nowait: bool = False) -> bytearray:
        """Up to ``size`` bytes at ``offset``, short at the end of the disk."""
        buf = bytearray(max(0, min(offset + size, self.size) - offset))
        self.read_into(memoryview(buf), offset, nowait)
        return buf

    def read_into(self, buf: memoryview, offset: int, nowait: bool = False) -> None:
        """Fill ``buf`` (zeroed by the caller) with the bytes at ``offset``."""
        end = min(offset + len(buf), self.size)
        run_at, run_host, run_len = 0, -1, 0    # host bytes to read in one pread
        pos, mask = offset, self.cluster_size - 1
        while pos < end:
            length = min(self.cluster_size - (pos & mask), end - pos)
            entry = self.entry(pos >> self.bits, nowait)
            host = entry & OFFSET_MASK
            if host and not entry & ZERO_FLAG:
                host += pos & mask
                if run_host + run_len == host and run_len:
                    run_len += length
                else:
                    if run_len:
                        _pread(self.image.fd, buf[run_at:run_at + run_len], run_host, nowait)
                    run_at, run_host, run_len = pos - offset, host, length
            else:
                if run_len:     # a run is contiguous in the disk as in the file
                    _pread(self.image.fd, buf[run_at:run_at + run_len], run_host, nowait)
                    run_len = 0
                if not entry & ZERO_FLAG and self.image.backing is not None:
                    self.image.backing.read_into(buf[pos - offset:pos - offset + length], pos,
                                                 nowait)
            pos += length
        if run_len:
            _pread(self.image.fd, buf[run_at:run_at + run_len], run_host, nowait)

    def _tables(self) -> Iterator[tuple[int, array[int]]]:
        """Each L2 table with the number of its first cluster."""
        per_table = 1 << (self.bits - 3)
        for index, offset in enumerate(self.l1):
            if offset and index * per_table < self.clusters:
                yield index * per_table, self._table(offset)

    def allocated(self) -> int:
        """Bytes of data clusters this layer references (its share for ``du``); reading
        every L2 table also finds what it cannot read (:raise Unsupported:)."""
        clusters, total = self.clusters, 0
        for first, table in self._tables():
            entries = table[:clusters - first]
            raw = entries.tobytes()
            low = raw[0::8] if sys.byteorder == "little" else raw[7::8]
            total += len(entries) - entries.count(0) - low.translate(_LOW_BIT).count(1)
        return total * self.cluster_size

    def token(self, cluster: int) -> int:
        """What cluster ``cluster`` reads: its host offset, or 0 for zeros, or -1 for
        the backing file's bytes. Equal tokens in two layers of one image: same bytes."""
        entry = self.entry(cluster)
        host = entry & OFFSET_MASK
        if entry & ZERO_FLAG:
            return 0
        if host:
            return host
        start = cluster << self.bits
        backing = self.image.backing
        if backing is not None and backing.has_data(start, min(start + self.cluster_size,
                                                               self.size)):
            return -1
        return 0

    def has_data(self, start: int, end: int) -> bool:
        end = min(end, self.size)
        return any(self.token(c) for c in range(start >> self.bits,
                                                  (end + self.cluster_size - 1) >> self.bits))

    def seek(self, offset: int, whence: int) -> int:
        """``lseek`` with SEEK_DATA or SEEK_HOLE, by cluster: where the next cluster
        that may hold data (or the next that reads as zeros) starts, at or after
        ``offset``; the end of the disk is a hole. :raise OSError: ENXIO past the
        end, or with no data after ``offset``."""
        if not 0 <= offset < self.size:
            raise OSError(_errno.ENXIO, "past the end of the disk")
        want_data = whence == os.SEEK_DATA
        per_table_bits = self.bits - 3
        backing = self.image.backing is not None
        cluster, end = offset >> self.bits, self.clusters
        while cluster < end:
            index = cluster >> per_table_bits
            if not backing and (index >= len(self.l1) or not self.l1[index]):
                if not want_data:   # a whole table of unallocated clusters: zeros
                    break
                cluster = (index + 1) << per_table_bits
                continue
            if bool(self.token(cluster)) == want_data:
                break
            cluster += 1
        if cluster >= end:
            if want_data:
                raise OSError(_errno.ENXIO, "no data after this offset")
            return self.size
        return max(offset, cluster << self.bits)

    def extents(self) -> Iterator[tuple[int, int]]:
        """(start, length) of each stretch that may hold anything but zeros."""
        pos = 0
        while pos < self.size:
            try:
                start = self.seek(pos, os.SEEK_DATA)
            except OSError:     # ENXIO: zeros to the end
                return
            pos = self.seek(start, os.SEEK_HOLE)
            yield start, pos - start

    def close(self) -> None:
        self.image.close()
