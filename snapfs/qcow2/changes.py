"""What changed between two snapshots of one image, from their L2 entries alone."""

from __future__ import annotations

from collections.abc import Iterator

from .image import Layer

__all__ = ["changed_ranges", "merge"]


def merge(ranges: Iterator[tuple[int, int]]) -> list[tuple[int, int]]:
    """(start, length) pairs in order, adjacent ones joined."""
    out: list[tuple[int, int]] = []
    for start, length in ranges:
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((start, length))
    return out


def changed_ranges(layer: Layer, parent: Layer | None) -> list[tuple[int, int]]:
    """The byte ranges of ``layer`` that may differ from ``parent`` (both of one image),
    or from an empty disk when there is none; cluster-aligned, merged, cut at the size.

    Two clusters with the same L2 entry hold the same bytes (a snapshot's clusters
    are copied on write, never changed in place); zeros match zeros, and clusters
    both reading the backing file match. A disk that grew since ``parent`` differs
    from it past its old end wherever it may read anything but zeros.
    """
    if parent is None:
        return merge(layer.extents())
    size, bits = layer.size, layer.bits
    return merge((c << bits, min(1 << bits, size - (c << bits)))
                 for c in range(layer.clusters) if _differs(layer, parent, c))


def _differs(layer: Layer, parent: Layer, cluster: int) -> bool:
    per_table_bits = layer.bits - 3
    index = cluster >> per_table_bits
    mine = layer.l1[index] if index < len(layer.l1) else 0
    theirs = parent.l1[index] if index < len(parent.l1) else 0
    start = cluster << layer.bits
    if mine == theirs and start + layer.cluster_size <= parent.size:
        return False    # one L2 table: every cluster under it is the same
    if start >= parent.size:
        return layer.token(cluster) != 0
    return (layer.entry(cluster) & ~(1 << 63)) != (parent.entry(cluster) & ~(1 << 63)) and \
        layer.token(cluster) != parent.token(cluster)
