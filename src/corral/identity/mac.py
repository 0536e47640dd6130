"""MAC addresses: random, unicast and locally administered, so they never clash with a
vendor's burned-in address."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable

from corral.errors import Conflict


def random_mac() -> str:
    octets = bytearray(secrets.token_bytes(6))
    octets[0] = (octets[0] & 0b1111_1100) | 0b0000_0010  # unicast, locally administered
    return ":".join(f"{b:02x}" for b in octets)


def allocate_macs(count: int, taken: Callable[[Iterable[str]], set[str]]) -> list[str]:
    """``count`` MACs unique among themselves and not in ``taken`` (the inventory).

    The store's unique index is the final arbiter; this only makes a clash there
    astronomically unlikely (2^46 addresses).
    """
    chosen: list[str] = []
    for _ in range(8):
        want = count - len(chosen)
        fresh = {random_mac() for _ in range(want)} - set(chosen)
        chosen += sorted(fresh - taken(fresh))
        if len(chosen) >= count:
            return chosen[:count]
    raise Conflict("Could not allocate unique MAC addresses; the inventory may be corrupt.")


def is_locally_administered_unicast(mac: str) -> bool:
    first = int(mac.split(":")[0], 16)
    return bool(first & 0b10) and not first & 0b1
