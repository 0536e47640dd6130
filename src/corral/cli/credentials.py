"""Saved server credentials: ``~/.config/corral/credentials.json`` (mode 0600).

``CORRAL_CREDENTIALS`` names another file. It holds one server URL and one API token
from ``corral login``; ``corral logout`` revokes the token and removes the file.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from corral.errors import InvalidInput


@dataclass(frozen=True, slots=True)
class Credentials:
    server: str
    token: str
    token_id: str
    user: str


def path() -> Path:
    override = os.environ.get("CORRAL_CREDENTIALS")
    if override:
        return Path(override)
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "corral" / "credentials.json"


def normalize(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise InvalidInput(
            f"'{url}' is not a server URL.", hint="Write it as http://HOST:PORT or https://HOST."
        )
    return url


def load() -> Credentials | None:
    file = path()
    try:
        data = json.loads(file.read_text())
        return Credentials(
            server=str(data["server"]),
            token=str(data["token"]),
            token_id=str(data["token_id"]),
            user=str(data["user"]),
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidInput(
            f"The credentials file {file} is unreadable or damaged.",
            hint="Remove it and run 'corral login' again.",
        ) from exc


def save(creds: Credentials) -> Path:
    """Write atomically, readable by the owner only from the first byte."""
    file = path()
    file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    part = file.with_name(f".{file.name}.{os.getpid()}.part")
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(asdict(creds), out, indent=2)
            out.write("\n")
        part.chmod(0o600)
        part.replace(file)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return file


def remove() -> bool:
    try:
        path().unlink()
    except FileNotFoundError:
        return False
    return True
