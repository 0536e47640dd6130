"""Capture a real machine as a template, sealed: its clones get identities of their own.

One source machine boots from the appliance (which makes its machine-id and SSH host
key at first boot), is read through its serial console, refused for capture while it
runs, then stopped and shared by the module. Clones of a sealed capture must differ
from it and from each other; clones of an unsealed capture must share its identity
(the counter-test: proof that the identity test can fail).
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from corral.images.appliance import ApplianceArtifacts
from tests.guest_shell import run_in_guest
from tests.libvirt_cleanup import remove_prefixed
from tests.multihost import start_hosts, stop_hosts
from tests.serving import import_appliance

from .conftest import CorralEnv

pytestmark = pytest.mark.guest

URI = "qemu:///system"
KEY = "/etc/dropbear/dropbear_ed25519_host_key"
# Waits (bounded) for the host key, made in the background after the readiness line,
# then prints the machine-id and the key's public part (dropbearkey -y).
IDENTITY = (
    f"for i in $(seq 300); do [ -s {KEY} ] && break; sleep 0.2; done; "
    "echo ID=$(cat /etc/machine-id)"
    f" K=$(dropbearkey -y -f {KEY} | grep ^ssh-ed25519 | cut -d' ' -f2)"
)
IDENTITY_LINE = r"(ID=[0-9a-f]{32} K=[A-Za-z0-9+/=]{20,})"


@dataclass(frozen=True)
class Identity:
    machine_id: str
    host_key: str


def identity(name: str, uri: str = URI) -> Identity:
    line = run_in_guest(uri, name, IDENTITY, IDENTITY_LINE, timeout=120)
    machine_id, key = (part.split("=", 1)[1] for part in line.split())
    return Identity(machine_id, key)


@dataclass
class Source:
    env: CorralEnv
    name: str
    identity: Identity
    refused_while_running: subprocess.CompletedProcess[str]
    images_while_running: list[str]


@pytest.fixture(scope="module")
def env(appliance: ApplianceArtifacts) -> Iterator[CorralEnv]:
    """A Corral of this module's own, so that one source machine serves every test."""
    prefix = f"ct{secrets.token_hex(3)}"
    root = Path("/var/tmp") / f"corral-test-{prefix}"
    root.mkdir(mode=0o755)
    made = CorralEnv(root=root, prefix=prefix)
    made.env = {f"CORRAL_{k.upper()}": str(v) for k, v in made.settings_kwargs.items()}
    made.env["CORRAL_CONFIG"] = str(root / "none.toml")
    try:
        import_appliance(made.settings(), appliance)
        yield made
    finally:
        remove_prefixed(URI, prefix)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def source(env: CorralEnv) -> Source:
    name = env.name("src")
    env.run("vm", "create", name, "--image", "appliance", "--wait")
    ident = identity(name)
    refused = env.run("image", "capture", name, "--name", env.name("hot"), check=False)
    images = [i["name"] for i in env.json("image", "list")]
    env.run("vm", "stop", name)
    assert env.json("vm", "show", name)["state"] == "shut-off"
    return Source(env, name, ident, refused, images)


def leftovers(env: CorralEnv, image: str) -> list[str]:
    """Library files of ``image`` and capture staging files, by name."""
    images = env.root / "state" / "images"
    return sorted(p.name for p in images.iterdir()
                  if p.name.startswith((f"{image}-", ".capture-")))


def boot_clone(env: CorralEnv, image: str, suffix: str) -> str:
    name = env.name(suffix)
    env.run("vm", "create", name, "--image", image, "--wait")
    return name


def test_a_running_machine_is_refused_and_nothing_is_made(source: Source) -> None:
    refused = source.refused_while_running
    assert refused.returncode == 4  # Conflict
    assert "is running; Corral captures only stopped machines" in refused.stderr
    assert f"corral vm stop {source.name}" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert source.env.name("hot") not in source.images_while_running
    assert leftovers(source.env, source.env.name("hot")) == []


def test_the_source_has_an_identity_of_its_own(source: Source) -> None:
    assert len(source.identity.machine_id) == 32
    assert source.identity.machine_id != "0" * 32


def test_clones_of_a_sealed_capture_each_get_their_own_identity(source: Source) -> None:
    env = source.env
    image = env.name("tmpl")
    captured = env.run("image", "capture", source.name, "--name", image)
    out = captured.stdout
    assert "emptied /etc/machine-id" in out
    assert f"removed {KEY}" in out
    assert "removed /var/lib/corral/instance-id" in out
    assert f"as image {image}" in out
    shown, appliance = env.json("image", "show", image), env.json("image", "show", "appliance")
    assert shown["boot"] == "kernel"  # the appliance's kernel, initrd and command line
    assert shown["cmdline"] == appliance["cmdline"]
    assert Path(shown["kernel"]).read_bytes() == Path(appliance["kernel"]).read_bytes()
    assert not [n for n in leftovers(env, image) if n.startswith(".capture-")]

    first, second = boot_clone(env, image, "c1"), boot_clone(env, image, "c2")
    one, two = identity(first), identity(second)
    ids = {source.identity.machine_id, one.machine_id, two.machine_id}
    keys = {source.identity.host_key, one.host_key, two.host_key}
    assert len(ids) == 3, (source.identity, one, two)
    assert len(keys) == 3, (source.identity, one, two)
    for clone in (first, second):
        env.run("vm", "delete", clone, "--force")

    # The machine itself was left as it was: it boots with the identity it had.
    env.run("vm", "start", source.name)
    try:
        assert identity(source.name) == source.identity
    finally:
        env.run("vm", "stop", source.name)


def test_clones_of_an_unsealed_capture_share_the_source_identity(source: Source) -> None:
    """The counter-test: without sealing, the identity test above would fail."""
    env = source.env
    image = env.name("raw")
    captured = env.run("image", "capture", source.name, "--name", image, "--no-seal")
    assert "Not sealed" in captured.stdout
    clone = boot_clone(env, image, "c3")
    assert identity(clone) == source.identity
    env.run("vm", "delete", clone, "--force")


def test_a_filesystem_it_cannot_seal_is_refused_and_leaves_nothing(source: Source) -> None:
    """A failure in the middle of the job (after the flatten): rolled back, nothing left."""
    env = source.env
    blank = env.root / "blank.raw"
    with blank.open("wb") as f:
        f.truncate(16 << 20)
    env.run("image", "import", str(blank), "--name", env.name("blank"), "--format", "raw")
    machine = env.name("blankvm")
    env.run("vm", "create", machine, "--image", env.name("blank"), "--no-start")
    image = env.name("nofs")
    refused = env.run("image", "capture", machine, "--name", image, check=False)
    assert refused.returncode != 0
    assert "seals only ext2, ext3 and ext4" in refused.stderr
    assert "--no-seal" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert image not in [i["name"] for i in env.json("image", "list")]
    assert leftovers(env, image) == []
    job = env.json("job", "list")[0]
    assert (job["kind"], job["target"], job["state"]) == ("capture", image, "rolled-back")
    env.run("vm", "delete", machine, "--force")


@pytest.mark.parametrize("failpoint", ["capture.seal:after", "image.record:after"])
def test_a_capture_killed_midway_is_rolled_back_by_the_next_command(
    source: Source, failpoint: str
) -> None:
    env = source.env
    image = env.name("killed")
    result = env.run("image", "capture", source.name, "--name", image,
                     env={"CORRAL_FAILPOINT": failpoint}, check=False)
    assert result.returncode == -9  # SIGKILL, in the middle of the job
    assert leftovers(env, image)  # it had written something
    recovered = env.run("job", "list")
    assert f"Recovered interrupted capture job for '{image}'" in recovered.stderr
    assert image not in [i["name"] for i in env.json("image", "list")]
    assert leftovers(env, image) == []


def test_a_machine_on_another_host_is_captured_through_libvirt(source: Source) -> None:
    """The host flattens the chain into a volume, which is fetched, sealed here and
    removed there."""
    env = source.env
    hosts = start_hosts(env.root, 1, first_address=40)
    pool = env.root / "far-pool"
    name, image = env.name("far"), env.name("fartmpl")
    try:
        env.run("host", "add", "far", hosts[0].uri, "--pool-path", str(pool), "--network",
                env.name("far"), "--accelerator", "tcg")
        env.run("vm", "create", name, "--image", "appliance", "--host", "far", "--wait")
        identity(name, hosts[0].uri)  # its host key exists (made after the readiness line)
        env.run("vm", "stop", name)
        before = sorted(p.name for p in pool.iterdir())
        out = env.run("image", "capture", name, "--name", image).stdout
        assert "emptied /etc/machine-id" in out and f"removed {KEY}" in out
        assert sorted(p.name for p in pool.iterdir()) == before  # the flat copy is gone
        assert not [n for n in leftovers(env, image) if n.startswith(".capture-")]
        assert env.json("image", "show", image)["boot"] == "kernel"
    finally:
        env.run("vm", "delete", "--force", name, check=False)
        env.run("host", "remove", "far", check=False)
        stop_hosts(hosts)
