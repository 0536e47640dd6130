"""Sending a file to a host's pool, or a volume from pool to pool: sparse, verified.

:func:`send_file` sends a local file (a library base image), resumably;
:func:`copy_volume` copies a volume between two backends (a stopped machine's disk,
host to host), pipelined. Both follow the protocol below.

The protocol, and why it is shaped so
-------------------------------------
libvirt has no volume rename, and its one server-side copy (``createXMLFrom``) is not a
byte copy: a dir pool probes each file's format on refresh, so a half-sent qcow2 is
seen as qcow2 and "copying" it runs ``qemu-img convert``, which re-encodes the image
(its sha256 changes). Uploading to a temporary name and copying it to the final name
would thus either break the checksum or cost a second transfer.

So the bytes are written in place, at ``dest_path``, and a zero-byte *marker* volume
``<dest_path>.partial`` exists for as long as they may be incomplete:

1. the marker is created before the first byte is written;
2. the data goes to ``dest_path`` in chunks; after each, ``on_progress(bytes_done)``;
3. the whole file is read back from the host and its sha256 compared;
4. only then is the marker removed (a mismatch removes both, and raises).

A base on a host is whole if and only if ``dest_path`` exists and its marker does not
(:func:`transfer_complete`); a crash at any instant leaves the marker in place, or a
whole base. The caller should also record "verified" in its store only after
:func:`send_file` returns.

Resuming: ``offset`` is the last ``bytes_done`` the caller recorded. Bytes before it are
kept; everything from it on is written again. Holes are sent as holes, except over
the part of the destination that a cut-off chunk may have written (from ``offset`` to
the destination's current end), where zeros are sent: a libvirt sparse upload does not
zero bytes already there. ``offset=0`` starts afresh, unless the destination is
already whole and verifies, in which case nothing is sent.

Two transfers to the same destination at once are not supported: the caller's job
holds the lock.

Copying a volume, pipelined
---------------------------
:func:`copy_volume` verifies chunk by chunk instead of reading the whole file back at
the end: each chunk is read from the source and hashed, written to the destination,
then read back from it and compared. Three stages run at once, each in its own thread,
joined by queues of one chunk: while chunk k is read back, k+1 is written and k+2 is
read, so the copy costs about its slowest stage instead of the sum of all three, and
holds at most three chunks in memory. The read-back of a chunk starts only after its
upload stream has finished, so it reads what the host has written.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from corral.errors import CorruptImage, InvalidInput, StorageError
from corral.storage.base import Piece, StorageBackend
from corral.storage.sparse import hash_piece

DEFAULT_CHUNK = 64 << 20
COPY_CHUNK = 64 << 20
"""Per chunk of :func:`copy_volume`, which holds up to three in memory. Larger chunks
open fewer streams (libvirt refreshes the target's pool after each upload); smaller
ones fill and drain the pipeline sooner. 32-128 MiB measured alike on a 1 GiB disk."""


def file_sha256(path: Path) -> str:
    """The hex sha256 of a local file, the digest ``send_file`` expects; a sparse file's
    holes hash as the zeros they read as, like the read-back does."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(4 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def partial_marker(dest_path: Path) -> Path:
    """The marker that says ``dest_path`` may be incomplete."""
    return dest_path.with_name(dest_path.name + ".partial")


def transfer_complete(dest: StorageBackend, dest_path: Path) -> bool:
    """Whether ``dest_path`` holds a whole, verified transfer."""
    return dest.exists(dest_path) and not dest.exists(partial_marker(dest_path))


def send_file(
    source: Path,
    sha256: str,
    dest: StorageBackend,
    dest_path: Path,
    *,
    offset: int = 0,
    on_progress: Callable[[int], None] | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> None:
    """Copy the local file ``source`` byte for byte to ``dest_path`` in ``dest``'s pool.

    Pre: ``sha256`` is the hex digest of ``source``; ``0 <= offset <= size``, and a
    non-zero ``offset`` is a ``bytes_done`` this destination reported before.
    Post: ``dest_path`` holds ``source``'s bytes and :func:`transfer_complete` is true.
    ``on_progress`` runs after each chunk; if it raises, the transfer stops there and
    may be resumed from the last offset the caller recorded.
    On a checksum mismatch the destination and its marker are removed and
    CorruptImage is raised. Other failures leave both for a resume.
    """
    size = _size(source)
    if chunk <= 0:
        raise InvalidInput(f"The transfer chunk size must be positive, not {chunk}.")
    if not 0 <= offset <= size:
        raise InvalidInput(
            f"Cannot resume sending {source.name} at byte {offset}: it has {size} bytes."
        )
    marker = partial_marker(dest_path)
    if offset == 0:
        if transfer_complete(dest, dest_path) and dest.sha256(dest_path) == (sha256, size):
            if on_progress is not None:
                on_progress(size)
            return
        if not dest.exists(marker):
            dest.create_empty(marker)  # before any byte, so no crash looks like a whole base
        dest.delete(dest_path)
        dest.create_empty(dest_path)
    elif not (dest.exists(marker) and dest.exists(dest_path)):
        raise StorageError(
            f"Cannot resume sending {source.name} to {dest_path}: no transfer is under way "
            "there; start again from byte 0."
        )

    done = offset
    while done < size:
        end = min(done + chunk, size)
        dest.upload_range(source, dest_path, done, end)
        done = end
        if on_progress is not None:
            on_progress(done)

    digest, length = dest.sha256(dest_path)
    if (digest, length) != (sha256, size):
        dest.delete(dest_path)
        dest.delete(marker)
        raise CorruptImage(
            f"The copy of {source.name} at {dest_path} does not match the library's "
            f"checksum (read back {length} of {size} bytes, sha256 {digest[:12]}… "
            f"instead of {sha256[:12]}…).",
            hint="The copy was removed; send the image again.",
        )
    dest.delete(marker)


def copy_volume(
    source_backend: StorageBackend,
    source_path: Path,
    dest_backend: StorageBackend,
    dest_path: Path,
    *,
    on_progress: Callable[[int], None] | None = None,
    chunk: int = COPY_CHUNK,
) -> None:
    """Copy the volume ``source_path`` byte for byte to ``dest_path`` in ``dest_backend``'s
    pool, holes kept as holes, each chunk verified by sha256 as it arrives.

    Pre: nothing writes to ``source_path`` during the copy (a stopped machine's disk).
    Whatever ``dest_path`` and its marker hold (an earlier attempt's) is replaced; there
    is no resume. Post: ``dest_path`` holds the bytes read from ``source_path`` and
    :func:`transfer_complete` is true. ``on_progress(bytes_done)`` runs in the caller's
    thread after each chunk is verified; if it raises, the copy stops there.
    On a chunk that does not read back as it was read, the destination and its marker
    are removed and CorruptImage is raised. Any other failure leaves both (the marker
    says "incomplete"); the caller deletes them. No thread of the copy outlives it.
    """
    if chunk <= 0:
        raise InvalidInput(f"The transfer chunk size must be positive, not {chunk}.")
    size = source_backend.size(source_path)
    marker = partial_marker(dest_path)
    if not dest_backend.exists(marker):
        dest_backend.create_empty(marker)  # before any byte, so no crash looks whole
    dest_backend.delete(dest_path)
    dest_backend.create_empty(dest_path)
    bounds = [(lo, min(lo + chunk, size)) for lo in range(0, size, chunk)]

    def read(lo: int, hi: int) -> _Read:
        digest, pieces, length = hashlib.sha256(), [], 0
        for piece in source_backend.read_range(source_path, lo, hi):
            length += hash_piece(digest, piece)
            pieces.append(piece)
        if length != hi - lo:
            raise StorageError(
                f"{source_path} ended at byte {lo + length} while it was copied, though "
                f"it had {size} bytes; something changed it. Copy it again."
            )
        return _Read(lo, hi, digest.hexdigest(), pieces)

    def write(got: _Read) -> _Written:
        dest_backend.write_range(dest_path, got.start, got.end, got.pieces)
        return _Written(got.start, got.end, got.sha256)

    # The comparison proves the destination holds what was read from the source, chunk
    # by chunk. It cannot tell a source that changed under the reader from one that did
    # not (both sides are compared with what was read, a torn read included): hence the
    # precondition, and the length check at the end that catches a source that grew.
    bad: tuple[int, _Written, str, int] | None = None
    with _pipeline(bounds, read, write) as written:
        for index, done in enumerate(written):
            digest, length = hashlib.sha256(), 0
            for piece in dest_backend.read_range(dest_path, done.start, done.end):
                length += hash_piece(digest, piece)
            if (digest.hexdigest(), length) != (done.sha256, done.end - done.start):
                bad = (index, done, digest.hexdigest(), length)
                break
            if on_progress is not None:
                on_progress(done.end)
    # Past the pipeline: its threads are done, so nothing writes to what is removed.
    if bad is not None:
        index, done, digest_hex, length = bad
        dest_backend.delete(dest_path)
        dest_backend.delete(marker)
        raise CorruptImage(
            f"The copy of {source_path.name} at {dest_path} does not match its source in "
            f"chunk {index + 1} of {len(bounds)} (bytes {done.start} to {done.end}): read "
            f"back {length} of {done.end - done.start} bytes, sha256 {digest_hex[:12]}… "
            f"instead of {done.sha256[:12]}….",
            hint="The copy was removed; copy it again.",
        )
    now = source_backend.size(source_path)
    if now != size:
        raise StorageError(
            f"{source_path} changed while it was copied ({size} bytes, then {now}); "
            "copy it again."
        )
    if (copied := dest_backend.size(dest_path)) != size:
        dest_backend.delete(dest_path)
        dest_backend.delete(marker)
        raise CorruptImage(
            f"The copy of {source_path.name} at {dest_path} has {copied} bytes instead "
            f"of {size}.",
            hint="The copy was removed; copy it again.",
        )
    dest_backend.delete(marker)


@dataclass(frozen=True, slots=True)
class _Read:
    start: int
    end: int
    sha256: str
    pieces: list[Piece]


@dataclass(frozen=True, slots=True)
class _Written:
    start: int
    end: int
    sha256: str


@dataclass(frozen=True, slots=True)
class _Failed:
    error: BaseException


_END = object()
"""The last item a stage passes on after its last chunk."""
_POLL = 0.05
"""Seconds a blocked stage waits before it looks again whether the copy stopped."""


@contextlib.contextmanager
def _pipeline(
    bounds: list[tuple[int, int]],
    read: Callable[[int, int], _Read],
    write: Callable[[_Read], _Written],
) -> Iterator[Iterator[_Written]]:
    """Run ``read`` over ``bounds`` and ``write`` over what it read, each in a thread of
    its own, and yield what was written, in order. A stage's error is passed on in place
    of its chunk and raised from the iterator, after the chunks before it. Leaving the
    block (normally or not) stops both threads and waits for them.
    """
    stop = threading.Event()
    to_write: queue.Queue[object] = queue.Queue(maxsize=1)
    to_check: queue.Queue[object] = queue.Queue(maxsize=1)

    def put(q: queue.Queue[object], item: object) -> bool:
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                q.put(item, timeout=_POLL)
                return True
        return False

    def reader() -> None:
        for lo, hi in bounds:
            try:
                item: object = read(lo, hi)
            except BaseException as exc:  # passed on, raised in the caller's thread
                put(to_write, _Failed(exc))
                return
            if not put(to_write, item):
                return
        put(to_write, _END)

    def writer() -> None:
        while not stop.is_set():
            try:
                item = to_write.get(timeout=_POLL)
            except queue.Empty:
                continue
            if isinstance(item, _Read):
                try:
                    item = write(item)
                except BaseException as exc:
                    item = _Failed(exc)
            if not put(to_check, item) or not isinstance(item, _Written):
                return

    def written() -> Iterator[_Written]:
        while True:
            item = to_check.get()
            if isinstance(item, _Failed):
                raise item.error
            if not isinstance(item, _Written):
                return
            yield item

    threads = [threading.Thread(target=reader, name="copy-read", daemon=True),
               threading.Thread(target=writer, name="copy-write", daemon=True)]
    for t in threads:
        t.start()
    try:
        yield written()
    finally:
        stop.set()
        for t in threads:
            t.join()


def _size(source: Path) -> int:
    try:
        return source.stat().st_size
    except FileNotFoundError:
        raise StorageError(f"The image file {source} is missing.") from None
    except OSError as exc:
        raise StorageError(f"Could not read {source}: {exc.strerror}.") from exc
