"""Sparse data as pieces: data sections and holes, walked in files, hashed as bytes.

A volume travels between backends as :data:`Piece` values (the storage contract's
``read_range`` and ``write_range``), so a hole crosses as its length, never as zeros.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

from corral.errors import StorageError

PIECE_BYTES = 256 << 10
"""The most data in one piece: libvirt's RPC payload size for stream data."""


@dataclass(frozen=True, slots=True)
class Hole:
    """``length`` bytes that read as zeros and need not be stored."""

    length: int


Piece = bytes | Hole
"""A consecutive piece of a file's bytes: data as it is, or a hole by its length."""

_ZEROS = bytes(4 << 20)


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


def file_pieces(fd: int, start: int, end: int) -> Iterator[Piece]:
    """``[start, end)`` of the open file ``fd`` as pieces, data read with ``pread``.

    Raises StorageError if the file ends before ``end`` (it shrank while it was read).
    """
    for is_data, lo, hi in data_and_holes(fd, start, end):
        if not is_data:
            yield Hole(hi - lo)
            continue
        pos = lo
        while pos < hi:
            data = os.pread(fd, min(PIECE_BYTES, hi - pos), pos)
            if not data:
                raise StorageError(f"The file being read ended at byte {pos}, before byte {end}.")
            yield data
            pos += len(data)


def hash_piece(digest: hashlib._Hash, piece: Piece) -> int:
    """Feed ``piece`` to ``digest``, a hole as the zeros it reads as; its length."""
    if isinstance(piece, Hole):
        left = piece.length
        while left > 0:
            n = min(left, len(_ZEROS))
            digest.update(memoryview(_ZEROS)[:n])
            left -= n
        return piece.length
    digest.update(piece)
    return len(piece)
