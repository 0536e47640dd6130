"""Bad input and faults: one clear sentence, a non-zero exit, nothing half-made."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from .conftest import CORRAL, CorralEnv, libvirt_domain_names


def _leftovers(env: CorralEnv) -> dict[str, object]:
    """Everything a machine could leave behind: domains, pool files, records, jobs."""
    pool = env.root / "state" / "pool"
    return {
        "domains": libvirt_domain_names(env.prefix),
        "pool files": sorted(p.name for p in pool.iterdir()) if pool.exists() else [],
        "records": [m["name"] for m in env.json("vm", "list")],
    }


NOTHING = {"domains": set(), "pool files": [], "records": []}


def _one_sentence(stderr: str) -> None:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["vm", "create", "{p}-x", "--image", "nope"], 3, "No image named 'nope'"),
        (["vm", "show", "{p}-ghost"], 3, "No machine named"),
        (["vm", "delete", "{p}-ghost"], 3, "No machine named"),
        (["vm", "create", "{p}_Bad", "--image", "appliance"], 2, "not a valid machine name"),
        (["vm", "create", "../{p}", "--image", "appliance"], 2, "not a valid machine name"),
        (
            ["vm", "create", "{p}-m", "--image", "appliance", "--memory", "4T"],
            4,
            "1 lacks memory",
        ),
        (
            ["vm", "create", "{p}-d", "--image", "appliance", "--disk-size", "900T"],
            4,
            "1 lacks disk",
        ),
        (
            ["vm", "create", "{p}-s", "--image", "appliance", "--memory", "lots"],
            2,
            "not a valid memory size",
        ),
        (["vm", "create", "{p}-c", "--image", "appliance", "--cpus", "99"], 4, "vCPUs"),
    ],
)
def test_bad_requests_are_refused_and_leave_nothing(
    with_appliance: CorralEnv, args: list[str], code: int, says: str
) -> None:
    env = with_appliance
    result = env.run(*(a.format(p=env.prefix) for a in args), check=False)
    assert result.returncode == code, result.stderr
    assert says in result.stderr
    _one_sentence(result.stderr)
    assert _leftovers(env) == NOTHING


def test_duplicate_name_is_refused_and_the_first_machine_is_untouched(
    with_appliance: CorralEnv,
) -> None:
    env = with_appliance
    name = env.name("dup")
    env.run("vm", "create", name, "--image", "appliance", "--no-start")
    before = env.json("vm", "show", name)
    result = env.run("vm", "create", name, "--image", "appliance", check=False)
    assert result.returncode == 4 and "already exists" in result.stderr
    _one_sentence(result.stderr)
    assert env.json("vm", "show", name) == before
    assert libvirt_domain_names(env.prefix) == {name}


def test_unreachable_libvirtd_is_one_sentence(corral_env: CorralEnv) -> None:
    result = corral_env.run(
        "host",
        "list",
        check=False,
        env={"CORRAL_HOST_URI": "qemu+unix:///system?socket=/nonexistent/libvirt-sock"},
    )
    assert result.returncode == 7
    assert "libvirtd" in result.stderr
    _one_sentence(result.stderr)


def test_truncated_image_is_refused_and_not_imported(corral_env: CorralEnv) -> None:
    env = corral_env
    src = env.root / "broken.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(src), "64M"], check=True)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 8M", str(src)],
        check=True,
        capture_output=True,
    )
    os.truncate(src, src.stat().st_size // 2)
    result = env.run("image", "import", str(src), "--name", "broken", check=False)
    assert result.returncode == 5, result.stderr
    _one_sentence(result.stderr)
    assert env.json("image", "list") == []
    assert list((env.root / "state" / "images").iterdir()) == []


@pytest.fixture
def small_pool(with_appliance: CorralEnv) -> CorralEnv:
    """The env's pool on an 80 MiB tmpfs, larger than the appliance's 64 MiB disk."""
    pool = with_appliance.root / "state" / "pool"
    pool.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=80m,mode=0755", "tmpfs", str(pool)], check=True
    )
    yield with_appliance
    subprocess.run(["umount", "-l", str(pool)], check=False)


def test_a_full_disk_during_a_clone_leaves_nothing(small_pool: CorralEnv) -> None:
    env = small_pool
    pool = env.root / "state" / "pool"
    # fill the pool so that the appliance's data (~3.5 MiB) cannot be copied in
    subprocess.run(["fallocate", "-l", "79M", str(pool / "ballast")], check=True)
    result = env.run(
        "vm", "create", env.name("full"), "--image", "appliance", "--clone", "full", check=False
    )
    assert result.returncode == 6, result.stderr
    assert "full" in result.stderr.lower() or "space" in result.stderr.lower()
    _one_sentence(result.stderr)
    (pool / "ballast").unlink()
    assert _leftovers(env) == NOTHING


PROVISION_STEPS = [
    "machine.record",
    "image.ensure",
    "disk.clone",
    "seed.write",
    "domain.define",
    "machine.ready",
]


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("step", PROVISION_STEPS)
def test_kill_9_during_provisioning_leaves_nothing_after_the_next_command(
    with_appliance: CorralEnv, step: str, when: str
) -> None:
    env = with_appliance
    died = env.run(
        "vm",
        "create",
        env.name("crash"),
        "--image",
        "appliance",
        check=False,
        env={"CORRAL_FAILPOINT": f"{step}:{when}"},
    )
    assert died.returncode == -signal.SIGKILL, died.stderr
    # the next command, whatever it is, recovers the interrupted job
    listed = env.run("vm", "list", "-o", "json")
    assert "Recovered interrupted provision job" in listed.stderr
    assert _leftovers(env) == NOTHING
    job = env.json("job", "list")[0]  # newest first
    assert (job["kind"], job["state"]) == ("provision", "rolled-back")
    # every step that may have begun, and only those, was compensated; the record (the
    # host's claim) is written with the job, so it is always released
    compensated = [st["name"] for st in job["steps"] if st["state"] == "compensated"]
    begun = max(1, PROVISION_STEPS.index(step) + (when == "after"))
    assert compensated == PROVISION_STEPS[:begun]
    # and the name is free again
    env.run("vm", "create", env.name("crash"), "--image", "appliance", "--no-start")


@pytest.mark.parametrize("step", ["domain.undefine", "disk.delete", "machine.forget"])
def test_kill_9_during_delete_finishes_the_delete(with_appliance: CorralEnv, step: str) -> None:
    env = with_appliance
    env.run("vm", "create", env.name("del"), "--image", "appliance", "--no-start")
    died = env.run(
        "vm", "delete", env.name("del"), check=False, env={"CORRAL_FAILPOINT": f"{step}:before"}
    )
    assert died.returncode == -signal.SIGKILL
    env.run("vm", "list")
    assert _leftovers(env) == NOTHING


def test_kill_9_during_clone_leaves_the_source_intact(with_appliance: CorralEnv) -> None:
    env = with_appliance
    src = env.name("orig")
    env.run("vm", "create", src, "--image", "appliance", "--no-start")
    before = env.json("vm", "show", src)
    died = env.run(
        "vm",
        "clone",
        src,
        env.name("twin"),
        check=False,
        env={"CORRAL_FAILPOINT": "domain.define:after"},
    )
    assert died.returncode == -signal.SIGKILL
    env.run("vm", "list")
    after = _leftovers(env)
    assert after["domains"] == {src} and after["records"] == [src]
    assert len(after["pool files"]) == 2  # the source's disk and seed, nothing of the twin
    assert env.json("vm", "show", src) == before
    assert Path(before["disk_path"]).exists()


def test_two_processes_racing_for_one_name_cannot_both_win(with_appliance: CorralEnv) -> None:
    env = with_appliance
    name = env.name("race")
    racers = [
        subprocess.Popen(
            [CORRAL, "vm", "create", name, "--image", "appliance", "--no-start"],
            env={**os.environ, **env.env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [(r.wait(timeout=120), r.communicate()[1]) for r in racers]
    assert sorted(code for code, _ in results) == [0, 4], results
    # Rich may wrap the sentence where the terminal would end: compare words.
    assert any("already exists" in " ".join(stderr.split()) for _, stderr in results), results
    # exactly one machine, with one disk and one seed: the loser left nothing
    left = _leftovers(env)
    assert left["domains"] == {name} and left["records"] == [name]
    assert len(left["pool files"]) == 2


def test_a_machine_that_will_not_start_is_not_left_behind(with_appliance: CorralEnv) -> None:
    env = with_appliance
    kernel = Path(env.json("image", "show", "appliance")["kernel"])
    aside = kernel.with_name(kernel.name + ".aside")
    kernel.rename(aside)  # QEMU cannot start without it
    try:
        result = env.run("vm", "create", env.name("nostart"), "--image", "appliance",
                         check=False)
    finally:
        aside.rename(kernel)
    assert result.returncode == 8, result.stderr
    assert env.name("nostart") in result.stderr and "Traceback" not in result.stderr
    assert _leftovers(env) == NOTHING
