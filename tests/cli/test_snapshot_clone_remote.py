"""`vm create --from-snapshot` against a real Corral server: the same command, its work
done by the server's job (POST /machines/{name}/snapshots/{snapshot}/clone)."""

from __future__ import annotations

from tests.cli.test_remote import Remote, one_error
from tests.cli.test_remote import remote as remote  # the fixtures, re-exported
from tests.cli.test_remote import served as served
from tests.serving import Served


def test_a_machine_from_a_snapshot_over_the_server(remote: Remote, served: Served) -> None:
    remote.login()
    src, copy, cold = served.name("snapsrc"), served.name("snapcopy"), served.name("snapcold")
    try:
        remote.json("vm", "create", src, "--image", "appliance", "--wait")
        assert remote.json("vm", "snapshot", "create", src, "s")["memory"] is True

        (row,) = remote.json("vm", "create", copy, "--from-snapshot", f"{src}@s")
        source = remote.json("vm", "show", src)
        assert row["name"] == copy and row["state"] == "running"
        assert source["state"] == "running"
        for key in ("uuid", "mac", "hostname", "instance_id"):
            assert row[key] != source[key], key
        (stopped,) = remote.json("vm", "create", cold, "--from-snapshot", f"{src}@s",
                                 "--no-start")
        assert stopped["state"] == "shut-off" and stopped["clone"] == "linked"

        missing = remote.run("vm", "create", served.name("x"), "--from-snapshot",
                             f"{src}@nope")
        assert missing.returncode == 3
        assert one_error(missing).startswith(f"error: No snapshot named '{src}@nope'.")
        jobs = {(j["kind"], j["target"], j["state"]) for j in remote.json("job", "list")}
        assert {("snapshot-clone", copy, "succeeded"),
                ("snapshot-clone", cold, "succeeded")} <= jobs
    finally:
        remote.run("vm", "delete", "--force", cold, copy, src)
