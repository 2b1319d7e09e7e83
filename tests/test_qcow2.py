"""snapfs.qcow2 against qemu-img: every snapshot of images built at random reads as
``qemu-img convert -U -l snapshot.name=TAG`` does, takes the clusters that hold its
bytes, and its changes against another snapshot are where their bytes differ.

Images are built on closed files with qemu-io (writes of a pattern of their own,
discards) and qemu-img (snapshots, deletes of other snapshots), with cluster
sizes from 4 KiB to 2 MiB, with and without a backing file.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapfs import qcow2
from snapfs.errors import NotFound

for _tool in ("qemu-img", "qemu-io"):
    if shutil.which(_tool) is None:
        pytest.skip(f"{_tool} not installed", allow_module_level=True)

KiB, MiB = 1 << 10, 1 << 20
SIZE = 8 * MiB
BACKING_CLUSTER = 64 * KiB


def sh(*argv: str | Path) -> None:
    res = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    assert res.returncode == 0, f"{argv}: {res.stderr}"


def converted(img: Path, tag: str) -> bytes:
    out = img.with_name(f"{tag}.raw")
    sh("qemu-img", "convert", "-U", "-f", "qcow2", "-l", f"snapshot.name={tag}", "-O", "raw",
       img, out)
    data = out.read_bytes()
    out.unlink()
    return data


def clusters_where(size: int, cluster: int,
                   differs: list[bool]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for index, hit in enumerate(differs):
        if not hit:
            continue
        start = index * cluster
        length = min(cluster, size - start)
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((start, length))
    return out


def differing(a: bytes, b: bytes | None, cluster: int) -> list[bool]:
    """Per cluster: do ``a`` and ``b`` (None: zeros) differ there?"""
    zero = bytes(cluster)
    out = []
    for start in range(0, len(a), cluster):
        mine = a[start:start + cluster]
        theirs = zero[:len(mine)] if b is None else b[start:start + cluster]
        out.append(mine != theirs)
    return out


Write = tuple[str, int, int]
steps = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, SIZE // 512 - 1), st.integers(1, 3 * 128)),
    st.tuples(st.just("discard"), st.integers(0, SIZE // 512 - 1), st.integers(1, 6 * 128)),
    st.tuples(st.just("snapshot"), st.just(0), st.just(0)),
    st.tuples(st.just("delete"), st.integers(0, 5), st.just(0)),
), min_size=1, max_size=14)


def build(work: Path, cluster_bits: int, backing: bool, plan: list[Write]) -> tuple[Path, list[str]]:
    """The image and its snapshots' tags, oldest first."""
    img = work / "disk.qcow2"
    if backing:
        base = work / "base.qcow2"
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={BACKING_CLUSTER}",
           base, str(SIZE))
        # Whole backing clusters: a cluster holds its pattern throughout.
        sh("qemu-io", "-f", "qcow2", "-c", f"write -P 0xf1 {BACKING_CLUSTER} {BACKING_CLUSTER}",
           "-c", f"write -P 0xf2 {3 * MiB} {2 * MiB}", base)
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base.name,
           "-o", f"cluster_size={1 << cluster_bits}", img, str(SIZE))
    else:
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={1 << cluster_bits}",
           img, str(SIZE))
    tags: list[str] = []
    pending: list[str] = []
    made = 0

    def flush() -> None:
        if pending:
            sh("qemu-io", "-d", "unmap", "-f", "qcow2", *[a for c in pending for a in ("-c", c)],
               img)
            pending.clear()

    for number, (what, sector, count) in enumerate(plan, 1):
        offset, length = sector * 512, min(count * 512, SIZE - sector * 512)
        if what == "write":
            # A pattern of its own: a rewritten cluster never holds its old bytes.
            pending.append(f"write -P {number} {offset} {length}")
        elif what == "discard":
            pending.append(f"discard {offset} {length}")
        elif what == "snapshot":
            flush()
            made += 1
            tags.append(f"s{made}")
            sh("qemu-img", "snapshot", "-c", tags[-1], img)
        elif tags:
            flush()
            sh("qemu-img", "snapshot", "-d", tags.pop(sector % len(tags)), img)
    flush()
    made += 1
    tags.append(f"s{made}")     # every image has at least one snapshot, taken last
    sh("qemu-img", "snapshot", "-c", tags[-1], img)
    return img, tags


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cluster_bits=st.sampled_from([12, 13, 16, 21]), backing=st.booleans(), plan=steps)
def test_every_snapshot_reads_as_qemu_img_converts_it(cluster_bits: int, backing: bool,
                                                        plan: list[Write]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        img, tags = build(Path(tmp), cluster_bits, backing, plan)
        cluster = 1 << cluster_bits
        image = qcow2.Image(img)
        try:
            expected = {tag: converted(img, tag) for tag in tags}
            layers = {tag: image.layer(image.find(tag)) for tag in tags}
            previous = None
            for tag in tags:
                layer, data = layers[tag], expected[tag]
                assert layer.size == len(data) == SIZE
                assert layer.read(0, SIZE) == data, tag
                # Reads that start and end anywhere, past the end too.
                for offset, length in ((cluster - 1, 3 * cluster + 5), (SIZE - 700, 4096),
                                       (5 * MiB + 3, 1)):
                    assert layer.read(offset, length) == data[offset:offset + length]
                if not backing:
                    # The clusters it references are exactly those holding bytes.
                    assert layer.allocated() == cluster * sum(differing(data, None, cluster))
                assert qcow2.changed_ranges(layer, None) == clusters_where(
                    SIZE, cluster, differing(data, None, cluster))
                if previous is not None:
                    assert qcow2.changed_ranges(layer, layers[previous]) == clusters_where(
                        SIZE, cluster, differing(data, expected[previous], cluster)), \
                        (tag, previous)
                previous = tag
        finally:
            image.close()


def test_what_the_reader_refuses_says_why(tmp_path: Path) -> None:
    img = tmp_path / "c.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", img, "4M")
    sh("qemu-io", "-f", "qcow2", "-c", "write -c -P 7 0 64k", img)
    sh("qemu-img", "snapshot", "-c", "t", img)
    image = qcow2.Image(img)
    try:
        layer = image.layer(image.find("t"))
        with pytest.raises(qcow2.Unsupported, match="compressed clusters"):
            layer.allocated()
        with pytest.raises(NotFound):
            image.find("nosuch")
    finally:
        image.close()
    raw = tmp_path / "plain.img"
    raw.write_bytes(bytes(4096))
    with pytest.raises(qcow2.Unsupported, match="not in qcow2 format"):
        qcow2.Image(raw)
    ext = tmp_path / "ext.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'ext.data'}",
       ext, "4M")
    with pytest.raises(qcow2.Unsupported, match="external data file"):
        qcow2.Image(ext)
    sub = tmp_path / "sub.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", sub, "4M")
    with pytest.raises(qcow2.Unsupported, match="extended L2"):
        qcow2.Image(sub)


def test_a_snapshot_is_as_big_as_the_disk_was(tmp_path: Path) -> None:
    img = tmp_path / "grown.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", img, "4M")
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 9 0 4M", img)
    sh("qemu-img", "snapshot", "-c", "small", img)
    sh("qemu-img", "resize", "-q", img, "6M")
    image = qcow2.Image(img)
    try:
        layer = image.layer(image.find("small"))
        assert layer.size == 4 * MiB
        assert layer.read(0, 8 * MiB) == b"\x09" * (4 * MiB)
    finally:
        image.close()


def test_a_snapshot_deleted_while_read_is_gone_not_a_wrong_answer(tmp_path: Path) -> None:
    """The tree stats views (st_blocks) and reads .changes without holding a view, so
    a snapshot may be deleted while its tables are read: the answer is then
    ENOENT, never a figure or an error made of freed clusters."""
    from snapfs.diskview import local

    img = tmp_path / "d.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", img, "4M")
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 1M", img)
    sh("qemu-img", "snapshot", "-c", "s1", img)
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 2 0 2M", img)
    sh("qemu-img", "snapshot", "-c", "s2", img)
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 3 0 3M", img)
    sh("qemu-img", "snapshot", "-c", "s3", img)

    image = qcow2.Image(img)
    try:
        s1 = image.find("s1")

        def delete_then_count() -> int:
            sh("qemu-img", "snapshot", "-d", "s1", img)
            return image.layer(s1).allocated()

        with pytest.raises(NotFound):
            local._unchanged(image, [s1], delete_then_count)
        # A snapshot that stays is answered, whatever else changed meanwhile.
        s2 = image.find("s2")
        assert local._unchanged(image, [s2], lambda: image.layer(s2).allocated()) == 2 * MiB
    finally:
        image.close()
    # A parent gone when compared: the changes are then against nothing.
    parent, ranges = local._changes(img, "s3", "s1")
    assert parent is None and ranges == [(0, 3 * MiB)]
    assert local._changes(img, "s3", "s2") == ("s2", [(0, 3 * MiB)])
