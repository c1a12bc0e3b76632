"""hnswlib's saved-index format, read and checked before hnswlib's loader sees the bytes.

``hnswlib.Index.load_index`` trusts its file: the header's sizes decide how much it
copies and where, and the neighbour ids in the link lists are followed without bounds
checks during a search. A snapshot comes out of Redis, so before loading, its bytes are
parsed here and every value is compared with what the manifest and hnswlib's own layout
rules say it must be. Anything else is refused (:class:`HnswFileError`).

The layout (hnswlib 0.8, ``HierarchicalNSW::saveIndex``, little-endian, 64-bit ``size_t``)::

    header (96 bytes)   offsetLevel0 max_elements cur_element_count size_data_per_element
                        label_offset offsetData (size_t x6), maxlevel (int32),
                        enterpoint_node (uint32), maxM maxM0 M (size_t x3), mult (double),
                        ef_construction (size_t)
    level 0             cur_element_count x size_data_per_element bytes; per element:
                        link count (uint16; byte 2 holds the deleted mark) + pad, maxM0
                        neighbour ids (uint32), the vector (dim float32), the label (uint64)
    upper levels        per element: its byte length (uint32), then level x (count uint32 +
                        maxM neighbour ids uint32)
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from lookalike.errors import LookalikeError

HEADER = struct.Struct("<QQQQQQiIQQQdQ")  # 96 bytes
DELETE_MARK = 0x01  # hnswlib marks a deleted element in byte 2 of its level-0 link header


class HnswFileError(LookalikeError):
    """The bytes are not an hnswlib index this indexer may load."""


@dataclass(frozen=True)
class HnswHeader:
    offset_level0: int
    max_elements: int
    cur_element_count: int
    size_data_per_element: int
    label_offset: int
    offset_data: int
    maxlevel: int
    enterpoint_node: int
    max_m: int
    max_m0: int
    m: int
    mult: float
    ef_construction: int


@dataclass(frozen=True)
class HnswLayout:
    """What a checked file holds: its header, and each element's label and deleted mark."""

    header: HnswHeader
    labels: np.ndarray  # (cur_element_count,) uint64
    deleted: np.ndarray  # (cur_element_count,) bool

    def live_labels(self) -> set[int]:
        return {int(label) for label in self.labels[~self.deleted]}


def read_header(data: bytes) -> HnswHeader:
    if len(data) < HEADER.size:
        raise HnswFileError(f"{len(data)} bytes, shorter than hnswlib's {HEADER.size}-byte header")
    return HnswHeader(*HEADER.unpack_from(data, 0))


def check_file(data: bytes, *, dim: int, m: int, ef_construction: int, capacity: int, elements: int) -> HnswLayout:
    """Parse ``data`` and check it is the cosine index the manifest describes: ``dim``, ``m``,
    ``ef_construction``, ``capacity`` (max_elements) and ``elements`` (live + deleted slots),
    with every size, offset, level and neighbour id in range and the byte length exact."""
    h = read_header(data)
    links0 = 2 * m * 4 + 4  # level-0 link list: header word + maxM0 uint32 ids
    links_upper = m * 4 + 4  # an upper-level link list: header word + maxM uint32 ids
    expected = {
        "offsetLevel0": (h.offset_level0, 0),
        "max_elements": (h.max_elements, capacity),
        "cur_element_count": (h.cur_element_count, elements),
        "size_data_per_element": (h.size_data_per_element, links0 + dim * 4 + 8),
        "label_offset": (h.label_offset, links0 + dim * 4),
        "offsetData": (h.offset_data, links0),
        "maxM": (h.max_m, m),
        "maxM0": (h.max_m0, 2 * m),
        "M": (h.m, m),
        "ef_construction": (h.ef_construction, max(ef_construction, m)),
    }
    wrong = [f"{name} {found} (expected {want})" for name, (found, want) in expected.items() if found != want]
    if wrong:
        raise HnswFileError("header does not match the manifest: " + ", ".join(wrong))
    if not math.isclose(h.mult, 1 / math.log(m), rel_tol=1e-9):
        raise HnswFileError(f"header mult {h.mult} is not 1/ln(M) for M={m}")
    n = h.cur_element_count
    level0_end = HEADER.size + n * h.size_data_per_element
    if level0_end + 4 * n > len(data):
        raise HnswFileError(f"{len(data)} bytes cannot hold {n} elements of {h.size_data_per_element} bytes")
    if n == 0:
        if h.maxlevel not in (-1, 0) or len(data) != level0_end:
            raise HnswFileError("an empty index with levels or trailing bytes")
        return HnswLayout(h, np.zeros(0, np.uint64), np.zeros(0, bool))
    if not 0 <= h.maxlevel <= 64 or h.enterpoint_node >= n:
        raise HnswFileError(f"maxlevel {h.maxlevel} or entry point {h.enterpoint_node} out of range ({n} elements)")

    level0 = np.frombuffer(data, dtype=np.uint8, count=n * h.size_data_per_element, offset=HEADER.size)
    level0 = level0.reshape(n, h.size_data_per_element)
    words = level0[:, :links0].copy().view(np.uint32)  # (n, 1 + maxM0)
    counts = words[:, 0] & 0xFFFF
    flags = (words[:, 0] >> 16) & 0xFF
    if counts.max(initial=0) > h.max_m0 or np.any(flags & ~np.uint32(DELETE_MARK)):
        raise HnswFileError("a level-0 link list is longer than maxM0 or has unknown flags")
    _check_ids(words[:, 1:], counts, n, "level 0")
    labels = level0[:, h.label_offset : h.label_offset + 8].copy().view("<u8").reshape(n)
    deleted = (flags & DELETE_MARK).astype(bool)

    pos, top = level0_end, 0
    size_at = struct.Struct("<I")
    for element in range(n):
        if pos + 4 > len(data):
            raise HnswFileError(f"file ends inside element {element}'s upper links")
        (size,) = size_at.unpack_from(data, pos)
        pos += 4
        if size == 0:
            continue
        levels, rest = divmod(size, links_upper)
        if rest or levels > h.maxlevel or pos + size > len(data):
            raise HnswFileError(f"element {element}: {size} bytes of upper links for maxlevel {h.maxlevel}")
        upper = np.frombuffer(data, dtype="<u4", count=size // 4, offset=pos).reshape(levels, m + 1)
        if upper[:, 0].max() > h.max_m:
            raise HnswFileError(f"element {element}: an upper link list is longer than maxM")
        _check_ids(upper[:, 1:], upper[:, 0], n, f"element {element}'s upper levels")
        top = max(top, levels)
        pos += size
        if element == h.enterpoint_node and levels != h.maxlevel:
            raise HnswFileError(f"the entry point has {levels} levels, the header says {h.maxlevel}")
    if pos != len(data):
        raise HnswFileError(f"{len(data) - pos} bytes after the last element")
    if top != h.maxlevel:
        raise HnswFileError(f"the highest element level is {top}, the header says {h.maxlevel}")
    return HnswLayout(h, labels, deleted)


def _check_ids(ids: np.ndarray, counts: np.ndarray, n: int, where: str) -> None:
    """Neighbour ids in use (the first ``counts`` of each row) must name an element."""
    in_use = np.arange(ids.shape[1]) < counts[:, None].astype(np.int64)
    if np.any(ids[in_use] >= n):
        raise HnswFileError(f"{where}: a neighbour id is not below the element count {n}")
