"""Reconciliation: the store holds intent, libvirt holds fact; report every difference.

Nothing is "fixed" by deleting data: a record whose domain vanished is marked missing,
and a domain Corral did not define is listed as unmanaged until someone adopts it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from corral.errors import Conflict, HypervisorUnavailable, InvalidInput
from corral.identity import check_name
from corral.model import HostState, Identity, Machine, RecordState
from corral.ops.context import Context
from corral.ops.hosts import local_host
from corral.store.repository import utcnow


@dataclass(frozen=True, slots=True)
class SyncReport:
    unmanaged: list[str]
    """Domains on the host that Corral has no record of."""
    missing: list[str]
    """Records whose domain is gone; newly marked or still missing."""
    returned: list[str]
    """Records marked missing earlier whose domain is back."""
    unreachable: list[str] = field(default_factory=list)
    """Hosts that are down or did not answer: their machines were not checked."""


def sync(ctx: Context) -> SyncReport:
    """Compare every reachable host's domains with the records of its machines.

    Unmanaged domains of other hosts than the local one are named ``HOST/NAME``.
    """
    local, _ = local_host(ctx)
    report = SyncReport([], [], [])
    for host in ctx.store.list_hosts():
        if host.state is HostState.DOWN:
            report.unreachable.append(host.name)
            continue
        try:
            part = _sync_host(ctx, host.name)
        except HypervisorUnavailable:
            report.unreachable.append(host.name)
            continue
        prefix = "" if host.name == local.name else f"{host.name}/"
        report.unmanaged.extend(f"{prefix}{n}" for n in part.unmanaged)
        report.missing.extend(part.missing)
        report.returned.extend(part.returned)
    report.missing.sort()
    return report


def _sync_host(ctx: Context, host: str) -> SyncReport:
    domains = {d.name: d for d in ctx.on(host).driver.list_domains()}
    records = {m.name: m for m in ctx.store.list_machines(host=host)}
    missing, returned = [], []
    for name, machine in records.items():
        present = name in domains and domains[name].uuid == machine.identity.uuid
        if machine.record_state in (RecordState.PROVISIONING, RecordState.DELETING):
            continue  # a job owns it; recovery, not sync, settles it
        if not present:
            missing.append(name)
            if machine.record_state is not RecordState.MISSING:
                ctx.store.set_machine_state(name, RecordState.MISSING)
        elif machine.record_state is RecordState.MISSING:
            ctx.store.set_machine_state(name, RecordState.READY)
            returned.append(name)
    unmanaged = sorted(n for n in domains if n not in records)
    return SyncReport(unmanaged=unmanaged, missing=sorted(missing), returned=returned)


def adopt(ctx: Context, name: str) -> Machine:
    """Take over a domain defined outside Corral: record it as it is, change nothing."""
    host, _ = local_host(ctx)
    if ctx.store.find_machine(name) is not None:
        raise Conflict(f"Machine '{name}' is already managed by Corral.")
    check_name(name)
    parsed = ctx.driver.domain_xml(name)
    disks = [d.source for d in parsed.disks if d.device == "disk" and d.source]
    if not disks:
        raise InvalidInput(f"Domain '{name}' has no disk file; Corral cannot adopt it.")
    mac = parsed.macs[0] if parsed.macs else None
    if mac is not None and ctx.store.taken(macs=[mac]):
        raise Conflict(f"Domain '{name}' has MAC {mac}, which a managed machine already uses.")
    machine = Machine(
        name=name,
        identity=Identity(uuid=parsed.uuid, mac=mac, hostname=name, instance_id=parsed.uuid),
        host=host.name,
        image=None,
        cpus=parsed.cpus,
        memory_bytes=parsed.memory_bytes,
        clone=None,
        disk_path=disks[0],
        seed_path=None,
        record_state=RecordState.READY,
        managed=False,
        created_at=utcnow(),
    )
    ctx.store.add_machine(machine)
    return machine
