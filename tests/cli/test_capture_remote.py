"""`image capture` against a real Corral server: the same command, its work done by the
server's job (POST /images/capture), what sealing removed read back from its event."""

from __future__ import annotations

from tests.cli.test_remote import Remote, one_error
from tests.cli.test_remote import remote as remote  # the fixtures, re-exported
from tests.cli.test_remote import served as served
from tests.serving import Served


def test_capture_over_the_server(remote: Remote, served: Served) -> None:
    remote.login()
    src, image = served.name("capsrc"), served.name("capimg")
    try:
        remote.json("vm", "create", src, "--image", "appliance", "--wait")
        running = remote.run("image", "capture", src, "--name", image)
        assert running.returncode == 4
        assert "Corral captures only stopped machines" in one_error(running)
        remote.ok("vm", "stop", src)

        out = remote.ok("image", "capture", src, "--name", image)
        assert "emptied /etc/machine-id" in out
        assert "removed /var/lib/corral/instance-id" in out
        assert f"as image {image}" in out
        shown = remote.json("image", "show", image)
        assert shown["name"] == image and shown["boot"] == "kernel"
        jobs = {(j["kind"], j["target"], j["state"]) for j in remote.json("job", "list")}
        assert ("capture", image, "succeeded") in jobs

        again = remote.run("image", "capture", src, "--name", image)
        assert again.returncode == 4
        assert one_error(again).startswith(f"error: An image named '{image}' already exists.")
    finally:
        remote.run("vm", "delete", "--force", src)
        remote.run("image", "delete", image)
