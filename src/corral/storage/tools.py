"""Running a storage tool (lvm, zfs, rbd) and reading a pool's ``pool.json``.

Every command is an argument list, never a shell string, and every name in it has passed
:func:`corral.storage.base.check_volume_name` or :func:`check_snapshot_name` first, so no
name can be read as an option or reach another pool. A tool's failure becomes one
sentence: its last line of stderr, translated to NoSpace, Conflict or NotFound where the
words say so.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from corral.errors import CorralError, NoSpace, StorageError

Errors = Mapping[str, Callable[[str], CorralError]]
"""Words a tool's stderr may hold -> the error (from its one sentence) they mean."""

POOL_FILE = "pool.json"
"""The file in a pool's directory that names what the directory alone cannot (a volume
group, a dataset, a Ceph pool)."""


def read_pool_config(directory: Path, backend: str, keys: Sequence[str],
                     optional: Sequence[str] = ()) -> dict[str, str]:
    """The string values of ``keys`` (and of those ``optional`` keys present) in
    ``<directory>/pool.json``; other keys are ignored.

    Raises StorageError in one sentence if the file is missing, is not a JSON object, or
    lacks a key.
    """
    path = directory / POOL_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise StorageError(
            f"The {backend} pool at {directory} has no {POOL_FILE} naming its {keys[0]}."
        ) from None
    except OSError as exc:
        raise StorageError(f"Could not read {path}: {exc.strerror}.") from exc
    except ValueError as exc:
        raise StorageError(f"The file {path} is not valid JSON.") from exc
    if not isinstance(data, dict):
        raise StorageError(f"The file {path} is not a JSON object.")
    missing = [k for k in keys if not isinstance(data.get(k), str) or not data[k]]
    if missing:
        raise StorageError(f"The file {path} does not name the pool's {', '.join(missing)}.")
    found = {k: str(data[k]) for k in keys}
    for k in optional:
        if isinstance(data.get(k), str) and data[k]:
            found[k] = str(data[k])
    return found


def run_tool(argv: Sequence[str], action: str, *, input_text: str | None = None,
             errors: Errors | None = None) -> str:
    """Run ``argv`` (a list: no shell) and return its stdout.

    On failure raise one sentence, "Could not ACTION: REASON.": NoSpace when the tool
    says the pool is full, else the error of the first key of ``errors`` found in its
    stderr, else StorageError. A missing tool is a StorageError naming it.
    """
    try:
        proc = subprocess.run(
            list(argv), input=input_text, capture_output=True, text=True, check=False,
            env={**os.environ, "LC_ALL": "C"},  # English messages: errors are found by text
        )
    except FileNotFoundError:
        raise StorageError(f"The {argv[0]} command is not installed on this host.") from None
    except OSError as exc:
        raise StorageError(f"Could not start {argv[0]}: {exc.strerror}.") from exc
    if proc.returncode == 0:
        return proc.stdout
    raise tool_error(proc.stderr, proc.returncode, action, errors)


def tool_error(stderr: str, returncode: int, action: str,
               errors: Errors | None = None) -> CorralError:
    """The one-sentence error for a tool that failed with ``stderr``. Pure."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    reason = lines[-1] if lines else f"exit status {returncode}"
    for prefix in ("ERROR: ", "error: ", "rbd: ", "cannot ", "  "):
        reason = reason.removeprefix(prefix)
    reason = reason.rstrip(".")
    text = f"Could not {action}: {reason}."
    lowered = stderr.lower()
    if "no space left" in lowered or "out of space" in lowered or "insufficient free" in lowered:
        return NoSpace(text)
    for key, make in (errors or {}).items():
        if key.lower() in lowered:
            return make(text)
    return StorageError(text)
