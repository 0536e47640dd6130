"""Sending a library base image to a host's pool: sparse, resumable, verified.

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
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from corral.errors import CorruptImage, InvalidInput, StorageError
from corral.storage.base import StorageBackend

DEFAULT_CHUNK = 64 << 20


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


def _size(source: Path) -> int:
    try:
        return source.stat().st_size
    except FileNotFoundError:
        raise StorageError(f"The image file {source} is missing.") from None
    except OSError as exc:
        raise StorageError(f"Could not read {source}: {exc.strerror}.") from exc
