"""Hosts: enrolment and probing, health, maintenance and removal.

A host is a libvirt URI. Enrolment probes it: facts (CPU model, sockets, cores,
threads, memory), its storage pool, which accelerator really works (a guest must boot
with it: a present /dev/kvm is not proof) and a short fixed CPU benchmark run in that
guest, which gives a single-thread speed score.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from corral.compute.base import ComputeDriver, load_compute_driver
from corral.errors import Conflict, CorralError, InvalidInput
from corral.identity import check_name, new_identity
from corral.identity.mac import random_mac
from corral.model import (
    Accelerator,
    DomainPlan,
    Host,
    HostPlacement,
    HostState,
    KernelBoot,
)
from corral.ops.console import find_line
from corral.ops.context import Context, HostHandle
from corral.store.repository import utcnow

APPLIANCE = "appliance"
PROBE_MARKER = "CORRAL-PROBE-OK"
BENCH_MARKER = "CORRAL-BENCH"
DEFAULT_REMOTE_POOL = "/var/lib/libvirt/images/corral"
_BENCH = re.compile(r"bytes=(\d+) centiseconds=(\d+)")
AcceleratorChoice = Literal["auto", "kvm", "tcg"]


@dataclass(frozen=True, slots=True)
class ProbeResult:
    accelerator: Accelerator
    note: str
    cpu_score: float | None
    """sha256 MiB/s of one vCPU, measured in a guest on the host; None if not measured."""


def local_host(ctx: Context) -> tuple[Host, str | None]:
    """The local host, enrolled on first use. The message is said once, at enrollment."""
    host = ctx.store.find_host(ctx.settings.host_name)
    if host is not None:
        return host, None
    host = enroll(ctx)
    return host, f"Enrolled host '{host.name}' ({host.uri}): {host.accelerator_note}"


def enroll(ctx: Context) -> Host:
    """Enrol the local host (from the settings). No benchmark: it costs a guest boot,
    and the first command should stay quick; 'corral host probe' measures it."""
    s = ctx.settings
    host = _facts_and_pool(
        ctx.driver, name=s.host_name, uri=s.host_uri, pool_name=s.pool_name,
        pool_path=str(s.pool_dir), network=s.network_name,
    )
    result = probe_accelerator(ctx, ctx.on(host), s.accelerator, bench=False)
    host = replace(host, accelerator=result.accelerator, accelerator_note=result.note,
                   last_seen=utcnow())
    ctx.store.put_host(host)  # idempotent: two first commands may enrol it at once
    ctx.forget_handle(host.name)
    return host


def add_host(
    ctx: Context,
    name: str,
    uri: str,
    *,
    pool_path: str = DEFAULT_REMOTE_POOL,
    network: str | None = None,
    placement: HostPlacement | None = None,
    accelerator: AcceleratorChoice | None = None,
) -> Host:
    """Enrol a remote host by its libvirt URI, probing it (accelerator and CPU score).

    Nothing is kept if the host cannot be reached or probed.
    """
    check_name(name, what="host name")
    if not Path(pool_path).is_absolute():
        raise InvalidInput(f"The pool path {pool_path} is not absolute.")
    if ctx.store.find_host(name) is not None:
        raise Conflict(f"A host named '{name}' is already enrolled.",
                       hint="Choose another name, or remove the old host first.")
    if any(h.uri == uri for h in ctx.store.list_hosts()):
        raise Conflict(f"A host with URI {uri} is already enrolled.")
    with load_compute_driver("libvirt", uri) as driver:
        host = _facts_and_pool(
            driver, name=name, uri=uri, pool_name=ctx.settings.pool_name, pool_path=pool_path,
            network=network or ctx.settings.network_name,
        )
    host = replace(host, placement=placement or HostPlacement(), last_seen=utcnow())
    ctx.store.add_host(host)
    try:
        result = probe_accelerator(ctx, ctx.on(host), accelerator or ctx.settings.accelerator,
                                   bench=True)
    except BaseException:
        ctx.forget_handle(name)
        ctx.store.delete_host(name)
        raise
    host = replace(host, accelerator=result.accelerator, accelerator_note=result.note,
                   cpu_score=result.cpu_score)
    ctx.store.put_host(host)
    ctx.forget_handle(name)
    return host


def _facts_and_pool(
    driver: ComputeDriver, *, name: str, uri: str, pool_name: str, pool_path: str, network: str
) -> Host:
    facts = driver.facts()
    driver.ensure_pool(pool_name, pool_path)
    driver.ensure_network(network)
    capacity, _available = driver.pool_capacity(pool_name)
    return Host(
        name=name, uri=uri, facts=facts, accelerator=Accelerator.TCG, accelerator_note="",
        pool_name=pool_name, pool_path=pool_path, network=network, disk_bytes=capacity,
    )


def probe(ctx: Context, name: str | None = None) -> Host:
    """Probe a host again: facts, pool capacity, accelerator and CPU score."""
    host = ctx.store.get_host(name) if name else local_host(ctx)[0]
    handle = ctx.on(host)
    fresh = _facts_and_pool(
        handle.driver, name=host.name, uri=host.uri, pool_name=host.pool_name,
        pool_path=host.pool_path, network=host.network,
    )
    result = probe_accelerator(ctx, handle, ctx.settings.accelerator, bench=True)
    updated = replace(host, facts=fresh.facts, disk_bytes=fresh.disk_bytes,
                      accelerator=result.accelerator, accelerator_note=result.note,
                      cpu_score=result.cpu_score, last_seen=utcnow())
    ctx.store.put_host(updated)
    return updated


def probe_accelerator(
    ctx: Context, handle: HostHandle, choice: AcceleratorChoice, *, bench: bool
) -> ProbeResult:
    """KVM only if a guest really boots with it; the same guest measures the CPU."""
    image = ctx.store.find_image(APPLIANCE)
    has_guest = image is not None and image.kernel_boot is not None

    def score_with(accel: Accelerator) -> float | None:
        return _probe_guest(ctx, handle, accel, bench=True)[1] if bench and has_guest else None

    if choice != "auto":
        accel = Accelerator(choice)
        return ProbeResult(accel, f"{choice.upper()} chosen by configuration.", score_with(accel))
    if not handle.driver.kvm_device_present():
        return ProbeResult(Accelerator.TCG,
                           "no KVM on this host; guests run under software emulation (TCG).",
                           score_with(Accelerator.TCG))
    if not has_guest:
        return ProbeResult(Accelerator.TCG, (
            "KVM is present but not yet proven (no appliance to boot); using software "
            "emulation (TCG). Run 'corral host probe' after 'corral image build-appliance'."
        ), None)
    timeout = ctx.settings.kvm_probe_timeout
    booted, score = _probe_guest(ctx, handle, Accelerator.KVM, bench=bench, timeout=timeout)
    if booted:
        return ProbeResult(Accelerator.KVM, "KVM works: a test guest booted with it.", score)
    return ProbeResult(Accelerator.TCG, (
        f"/dev/kvm is present, but a test guest did not boot with KVM within {timeout:.0f} s; "
        "guests run under software emulation (TCG), which is slower."
    ), score_with(Accelerator.TCG))


def _probe_guest(
    ctx: Context, handle: HostHandle, accelerator: Accelerator, *, bench: bool,
    timeout: float = 60.0,
) -> tuple[bool, float | None]:
    """Boot the appliance once on the host: did it reach userspace, and how fast is a CPU?"""
    from corral.ops.distribute import ensure_image

    image = ctx.store.get_image(APPLIANCE)
    where = ensure_image(ctx, handle, image)
    boot = where.kernel_boot
    assert boot is not None
    name = f"corral-probe-{secrets.token_hex(4)}"
    disk = handle.storage.volume_path(name)
    if handle.local:
        ctx.settings.console_dir.mkdir(parents=True, exist_ok=True)
    flags = " corral.probe corral.bench" if bench else " corral.probe"
    plan = DomainPlan(
        name=name,
        identity=new_identity(name, random_mac()),
        accelerator=accelerator,
        cpus=1,
        memory_bytes=128 << 20,
        disk_path=str(disk),
        disk_backing=where.base,
        seed_path=None,
        console_log=str(handle.console_log(name)),
        network=None,
        kernel_boot=KernelBoot(boot.kernel, boot.initrd, boot.cmdline + flags),
    )
    handle.storage.linked_clone(Path(where.base), disk, image.virtual_size)
    try:
        try:
            handle.driver.run_transient(plan)
        except CorralError:
            return False, None
        deadline = time.monotonic() + timeout
        booted = False
        while time.monotonic() < deadline:
            text = handle.read_console(name)
            booted = booted or find_line(text, PROBE_MARKER) is not None
            if booted and not bench:
                return True, None
            line = find_line(text, BENCH_MARKER)
            if line is not None:
                return True, _score(line)
            time.sleep(0.2)
        return booted, None
    finally:
        handle.driver.destroy(name)
        handle.storage.delete(disk)
        handle.remove_console(name)


def _score(line: str) -> float | None:
    m = _BENCH.search(line)
    if m is None or int(m[2]) <= 0:
        return None
    return round(int(m[1]) / (1 << 20) / (int(m[2]) / 100), 1)


# -- health, maintenance, removal -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class HealthChange:
    host: str
    before: HostState
    after: HostState
    note: str


def check_health(ctx: Context, on_change: Callable[[HealthChange], None] = lambda c: None,
                 ) -> list[HealthChange]:
    """Ask every host (not in maintenance) for its facts, all at once, within a deadline.

    A host that does not answer is marked down and receives nothing new; one that
    answers again is marked up.
    """
    hosts = [h for h in ctx.store.list_hosts() if h.state is not HostState.MAINTENANCE]
    changes: list[HealthChange] = []
    if not hosts:
        return changes
    # Not a `with` block: its exit would wait for a host that hangs past the deadline.
    pool = ThreadPoolExecutor(max_workers=min(16, len(hosts)), thread_name_prefix="health")
    try:
        futures = {h.name: pool.submit(_answers, ctx, h) for h in hosts}
        deadline = time.monotonic() + ctx.settings.host_timeout
        for host in hosts:
            try:
                note = futures[host.name].result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                note = f"no answer within {ctx.settings.host_timeout:g} s"
            _record_health(ctx, host, note, changes, on_change)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return changes


def _record_health(ctx: Context, host: Host, note: str | None, changes: list[HealthChange],
                   on_change: Callable[[HealthChange], None]) -> None:
    after = HostState.UP if note is None else HostState.DOWN
    # Re-read: an operator may have put the host in maintenance meanwhile.
    current = ctx.store.get_host(host.name)
    if current.state is HostState.MAINTENANCE:
        return
    ctx.store.set_host_state(host.name, after, note or "", seen=note is None)
    if after is not current.state:
        change = HealthChange(host.name, current.state, after, note or "answers again")
        changes.append(change)
        ctx.store.add_event(f"host.{after.value}", host.name,
                            f"host {host.name} is {after.value}: {change.note}", None)
        on_change(change)


def _answers(ctx: Context, host: Host) -> str | None:
    """None if the host answers; else why not, in a few words."""
    handle = ctx.on(host)
    try:
        handle.driver.facts()
    except CorralError as exc:
        ctx.forget_handle(host.name)  # reconnect from scratch next time
        return exc.message
    return None


def set_maintenance(ctx: Context, name: str, on: bool) -> Host:
    host = ctx.store.get_host(name)
    if on:
        ctx.store.set_host_state(name, HostState.MAINTENANCE, "set by an operator")
        ctx.store.add_event("host.maintenance", name, f"host {name} is in maintenance", None)
    elif host.state is HostState.MAINTENANCE:
        # Back to up; the next health check marks it down if it does not answer.
        ctx.store.set_host_state(name, HostState.UP, "")
        ctx.store.add_event("host.up", name, f"host {name} left maintenance", None)
    return ctx.store.get_host(name)


def remove_host(ctx: Context, name: str) -> None:
    """Forget a host; refused while it holds machines. Its pool and files stay on it."""
    if name == ctx.settings.host_name:
        raise Conflict(f"Host '{name}' is the local host; Corral keeps it enrolled.")
    ctx.store.delete_host(name)
    ctx.forget_handle(name)
