"""Host enrollment, and the boot probe that decides whether KVM really works."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from corral.errors import CorralError
from corral.identity import new_identity
from corral.identity.mac import random_mac
from corral.model import Accelerator, DomainPlan, Host, Image, KernelBoot
from corral.ops.console import find_line
from corral.ops.context import Context

APPLIANCE = "appliance"
PROBE_MARKER = "CORRAL-PROBE-OK"


def local_host(ctx: Context) -> tuple[Host, str | None]:
    """The local host, enrolled on first use. The message is said once, at enrollment."""
    host = ctx.store.find_host(ctx.settings.host_name)
    if host is not None:
        return host, None
    host = enroll(ctx)
    return host, f"Enrolled host '{host.name}' ({host.uri}): {host.accelerator_note}"


def enroll(ctx: Context) -> Host:
    s = ctx.settings
    facts = ctx.driver.facts()
    ctx.driver.ensure_pool(s.pool_name, str(s.pool_dir))
    ctx.driver.ensure_network(s.network_name)
    accelerator, note = probe_accelerator(ctx)
    host = Host(
        name=s.host_name,
        uri=s.host_uri,
        facts=facts,
        accelerator=accelerator,
        accelerator_note=note,
        pool_name=s.pool_name,
        pool_path=str(s.pool_dir),
    )
    ctx.store.put_host(host)
    return host


def probe_accelerator(ctx: Context) -> tuple[Accelerator, str]:
    """KVM only if a guest really boots with it: a present /dev/kvm is not proof."""
    choice = ctx.settings.accelerator
    if choice != "auto":
        return Accelerator(choice), f"{choice.upper()} chosen by configuration."
    if not ctx.driver.kvm_device_present():
        return Accelerator.TCG, "no KVM on this host; guests run under software emulation (TCG)."
    image = ctx.store.find_image(APPLIANCE)
    if image is None or image.kernel_boot is None:
        return Accelerator.TCG, (
            "KVM is present but not yet proven (no appliance to boot); using software "
            "emulation (TCG). Run 'corral host probe' after 'corral image build-appliance'."
        )
    timeout = ctx.settings.kvm_probe_timeout
    if _boots_with_kvm(ctx, image, image.kernel_boot, timeout):
        return Accelerator.KVM, "KVM works: a test guest booted with it."
    return Accelerator.TCG, (
        f"/dev/kvm is present, but a test guest did not boot with KVM within {timeout:.0f} s; "
        "guests run under software emulation (TCG), which is slower."
    )


def reprobe(ctx: Context) -> Host:
    host, _ = local_host(ctx)
    accelerator, note = probe_accelerator(ctx)
    updated = Host(
        name=host.name,
        uri=host.uri,
        facts=ctx.driver.facts(),
        accelerator=accelerator,
        accelerator_note=note,
        pool_name=host.pool_name,
        pool_path=host.pool_path,
    )
    ctx.store.put_host(updated)
    return updated


def _boots_with_kvm(ctx: Context, image: Image, boot: KernelBoot, timeout: float) -> bool:
    base = Path(image.path)
    token = secrets.token_hex(4)
    name = f"corral-kvm-probe-{token}"
    disk = ctx.storage.volume_path(name)
    log = ctx.settings.console_dir / f"{name}.log"
    ctx.settings.console_dir.mkdir(parents=True, exist_ok=True)
    plan = DomainPlan(
        name=name,
        identity=new_identity(name, random_mac()),
        accelerator=Accelerator.KVM,
        cpus=1,
        memory_bytes=128 << 20,
        disk_path=str(disk),
        disk_backing=str(base),
        seed_path=None,
        console_log=str(log),
        network=None,
        kernel_boot=KernelBoot(boot.kernel, boot.initrd, f"{boot.cmdline} corral.probe"),
    )
    ctx.storage.linked_clone(base, disk, image.virtual_size)
    try:
        try:
            ctx.driver.run_transient(plan)
        except CorralError:
            return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if find_line(log, PROBE_MARKER) is not None:
                return True
            time.sleep(0.2)
        return False
    finally:
        ctx.driver.destroy(name)
        ctx.storage.delete(disk)
        log.unlink(missing_ok=True)
