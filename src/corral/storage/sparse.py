"""Walking a sparse file's data and holes, for copies that keep holes as holes."""

from __future__ import annotations

import os
from collections.abc import Iterator


def data_and_holes(fd: int, start: int, end: int) -> Iterator[tuple[bool, int, int]]:
    """(is_data, from, to) sections of ``[start, end)`` of ``fd``, by SEEK_DATA/SEEK_HOLE."""
    pos = start
    while pos < end:
        try:
            data = min(os.lseek(fd, pos, os.SEEK_DATA), end)
        except OSError:  # ENXIO: a hole from here to the end of the file
            data = end
        if data > pos:
            yield False, pos, data
            pos = data
            continue
        hole = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
        yield True, pos, hole
        pos = hole
