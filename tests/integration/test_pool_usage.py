"""Space accounting read from the host, checked against the filesystem itself, and the
fill guard that keeps new disks out of a full pool."""

from __future__ import annotations

import os
from pathlib import Path

from tests.integration.conftest import CorralEnv, libvirt_domain_names


def allocated(path: str) -> int:
    return Path(path).stat().st_blocks * 512


def test_pool_usage_matches_the_filesystem(with_appliance: CorralEnv) -> None:
    env = with_appliance
    name = env.name("acct")
    env.run("vm", "create", name, "--image", "appliance", "--no-start")
    try:
        (pool,) = [p for p in env.json("pool", "usage") if p["host"] == "local"]
        machine = env.json("vm", "show", name)
        (mine,) = [m for m in pool["machines"] if m["name"] == name]
        assert mine["owned_bytes"] == allocated(machine["disk_path"])
        image = next(i for i in env.json("image", "list") if i["name"] == "appliance")
        assert mine["shared_bytes"] == allocated(image["path"]) > mine["owned_bytes"]
        assert mine["base"] == "appliance" and mine["virtual_size"] == machine["virtual_size"]
        (base,) = [i for i in pool["images"] if i["name"] == "appliance"]
        assert base["allocated_bytes"] == allocated(image["path"])
        st = os.statvfs(pool["path"])
        assert pool["capacity_bytes"] == st.f_blocks * st.f_frsize
        assert abs(pool["available_bytes"] - st.f_bavail * st.f_frsize) < 64 << 20
        assert 0 < pool["fill"] < 1
        table = env.run("pool", "usage", "local").stdout
        assert name in table and "% full" in table
    finally:
        env.run("vm", "delete", "--force", name, check=False)


def test_a_pool_past_its_fill_limit_takes_no_new_disk(with_appliance: CorralEnv) -> None:
    env = with_appliance
    name = env.name("full")
    # Whatever this disk holds, it is more than 0.1 % full.
    refused = env.run("vm", "create", name, "--image", "appliance", "--no-start",
                      check=False, env={"CORRAL_POOL_FILL_LIMIT": "0.001"})
    assert refused.returncode == 6, refused.stderr
    said = " ".join(refused.stderr.split())
    assert "The pool of host 'local' is" in said and "past the 0.1 % limit" in said
    assert "Free space in the pool" in said
    assert "Traceback" not in refused.stderr
    assert name not in [m["name"] for m in env.json("vm", "list")]
    assert libvirt_domain_names(env.prefix) == set()
    assert not list((env.root / "state" / "pool").glob(f"{name}-*"))
