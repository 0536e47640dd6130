"""A throwaway Corral for benchmarks: its own state dir, pool and network, removed after."""

from __future__ import annotations

import secrets
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from corral.config import Settings
from corral.images.appliance import build_appliance
from corral.model import ImageFormat
from corral.ops.context import Context
from corral.ops.images import import_image
from tests.libvirt_cleanup import remove_prefixed

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "build" / "cache"


@contextmanager
def bench_context(*, appliance: bool = True) -> Iterator[Context]:
    prefix = f"cb{secrets.token_hex(3)}"
    root = Path("/var/tmp") / f"corral-bench-{prefix}"
    root.mkdir(mode=0o755)
    settings = Settings(
        state_dir=root / "state", pool_name=prefix, network_name=prefix, accelerator="tcg",
        appliance_cache_dir=CACHE,
    )
    ctx = Context(settings)
    try:
        if appliance:
            art = build_appliance(root / "appliance", CACHE)
            import_image(ctx, art.disk, name="appliance", declared=ImageFormat.QCOW2,
                         kernel=art.kernel, initrd=art.initrd, cmdline=art.cmdline)
        yield ctx
    finally:
        ctx.close()
        remove_prefixed(settings.host_uri, prefix)
        shutil.rmtree(root, ignore_errors=True)


def timed(fn: Callable[[], object]) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def p90_ms(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=10)[-1] * 1000


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def row(label: str, value: str, note: str = "") -> None:
    print(f"  {label:<52} {value:>14}  {note}")
