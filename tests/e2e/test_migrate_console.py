"""Moving machines from the console, in a real browser: the Migrate dialog of a stopped
machine, a host's evacuation and the pool's rebalance. No machine boots (each is made
with start false; enrolling h21 boots only its few-second probe); the moves are real,
cold, between the local host and h21, a second libvirtd at 127.0.0.21
(tests/multihost.py; no other test uses that address)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from corral.images.appliance import ApplianceArtifacts
from corral.model import JobState
from corral.store import Store
from tests.e2e.test_console import LAPTOP, login
from tests.libvirt_cleanup import remove_prefixed
from tests.multihost import TestHost, start_hosts, stop_hosts
from tests.serving import Served, running_server, wait_for_job

ADDRESS = 21  # 127.0.0.21: this module's alone (the API's move tests use 127.0.0.20)


@pytest.fixture(scope="module")
def two_hosts(appliance: ApplianceArtifacts) -> Iterator[tuple[Served, TestHost]]:
    """A served Corral with the local host and h21, enrolled through the API."""
    with running_server(appliance) as served:
        root = served.settings.state_dir.parent
        [host] = start_hosts(root, 1, first_address=ADDRESS)
        try:
            with served.admin() as c:
                r = c.post("/hosts", json={
                    "name": host.name, "uri": host.uri,
                    "pool_path": str(root / f"{host.name}-pool"),
                    "network": f"{served.prefix}-{host.name}",  # the hosts share one kernel
                    "accelerator": "tcg",
                })
                assert r.status_code == 201, r.text
            yield served, host
        finally:
            try:
                if not host.running:  # it died: back up, so that what it holds can go
                    host.start()
                with served.admin() as c:
                    _delete_all(c)
                    c.delete(f"/hosts/{host.name}")
            finally:
                try:  # its network is a bridge in the one kernel every host shares
                    remove_prefixed(host.uri, served.prefix)
                finally:
                    stop_hosts([host])


def _delete_all(c: httpx.Client) -> None:
    for m in c.get("/machines", params={"limit": 1000}).json()["items"]:
        r = c.delete(f"/machines/{m['name']}", params={"force": True})
        if r.status_code == 202:
            for job in r.json()["jobs"]:
                wait_for_job(c, job["id"])


@pytest.fixture
def pool(two_hosts: tuple[Served, TestHost]) -> Iterator[tuple[Served, TestHost]]:
    """The pool as each test found it afterwards: no machines, every host up."""
    served, host = two_hosts
    try:
        yield two_hosts
    finally:
        with served.admin() as c:
            _delete_all(c)
            for name in ("local", host.name):
                c.put(f"/hosts/{name}/maintenance", json={"on": False}).raise_for_status()


def _create(served: Served, suffix: str, **extra: Any) -> str:
    name = served.name(suffix)
    with served.admin() as c:
        r = c.post("/machines", json={"name": name, "image": "appliance", "start": False,
                                      "memory_bytes": 128 << 20, **extra})
        assert r.status_code == 202, r.text
        assert wait_for_job(c, r.json()["jobs"][0]["id"])["state"] == "succeeded"
    return name


def _host_of(served: Served, name: str) -> str:
    with served.admin() as c:
        host: str = c.get(f"/machines/{name}").raise_for_status().json()["host"]
        return host


def _wait_host(served: Served, name: str, host: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while _host_of(served, name) != host:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} is not on {host} after {timeout} s")
        time.sleep(0.3)


def _logged_in(browser: Browser, served: Served) -> Page:
    page = browser.new_page(viewport=LAPTOP)
    login(page, served)
    expect(page).to_have_url(served.url + "/ui/")
    return page


def test_the_migrate_dialog_of_a_stopped_machine_lists_hosts_and_moves_it(
    browser: Browser, pool: tuple[Served, TestHost], shots: Path
) -> None:
    served, h21 = pool
    name = _create(served, "cold", host="local")
    with served.admin() as c:  # first with nowhere to go: the only other host is held
        c.put(f"/hosts/{h21.name}/maintenance", json={"on": True}).raise_for_status()
    page = _logged_in(browser, served)
    try:
        page.goto(f"{served.url}/ui/machines/{name}")
        host_fact = page.locator("#summary .machine-host")
        expect(host_fact).to_have_text("local")
        dialog = page.locator("#migrate-dialog")
        page.locator("#summary [data-migrate]").click()
        expect(dialog).to_be_visible()
        expect(dialog.locator("#migrate-source")).to_have_text("local")
        options = dialog.locator("#migrate-to option")
        expect(options).to_have_count(1)  # neither its own host nor one in maintenance
        expect(options.first).to_have_text("Scheduler's choice")
        live = dialog.locator("#migrate-live")
        expect(live).not_to_be_checked()  # stopped: it can only move cold
        expect(live).to_be_disabled()
        expect(dialog.locator("#migrate-note")).to_contain_text("moves cold")
        dialog.locator("#migrate-submit").click()
        refused = page.locator(".toast.error")
        expect(refused).to_contain_text(f"No host can take '{name}'")
        expect(dialog).to_be_hidden()
        page.screenshot(path=str(shots / "migrate-refused.png"))
        assert _host_of(served, name) == "local"

        with served.admin() as c:
            c.put(f"/hosts/{h21.name}/maintenance", json={"on": False}).raise_for_status()
        page.locator("#summary [data-migrate]").click()
        expect(options).to_have_count(2)
        expect(options.nth(1)).to_have_attribute("value", h21.name)
        expect(options.nth(1)).to_contain_text(f"{h21.name} (0 machines,")
        dialog.locator("#migrate-to").select_option(h21.name)
        page.screenshot(path=str(shots / "migrate-dialog.png"))
        dialog.locator("#migrate-submit").click()
        expect(dialog).to_be_hidden()
        moving = page.locator(".jobs-toast")
        expect(moving).to_contain_text(f"Moving {name} to {h21.name}")
        expect(moving).to_contain_text(f"migrate {name}")
        page.screenshot(path=str(shots / "migrate-moving.png"))
        expect(host_fact).to_have_text(h21.name, timeout=120_000)
        assert _host_of(served, name) == h21.name
        with served.admin() as c:
            [job] = [j for j in c.get("/jobs", params={"target": name}).json()["items"]
                     if j["kind"] == "migrate"]
            assert wait_for_job(c, job["id"])["state"] == "succeeded"
    finally:
        page.close()


def test_evacuate_asks_for_confirmation_then_moves_every_machine(
    browser: Browser, pool: tuple[Served, TestHost], shots: Path
) -> None:
    served, h21 = pool
    name = _create(served, "evac", host=h21.name)
    page = _logged_in(browser, served)
    try:
        page.goto(served.url + "/ui/hosts")
        card = page.locator(f'section.host[data-host="{h21.name}"]')
        expect(card.locator(".host-claimed")).to_contain_text("1 machines")
        confirm = page.locator("#confirm-dialog")

        card.locator("[data-evacuate]").click()
        expect(confirm).to_be_visible()
        expect(confirm.locator("#confirm-title")).to_have_text(f"Evacuate {h21.name}?")
        expect(confirm).to_contain_text("then its machine moves to the host the scheduler picks")
        page.screenshot(path=str(shots / "evacuate-confirm.png"))
        confirm.locator('button[value="cancel"]').click()
        expect(confirm).to_be_hidden()
        with served.admin() as c:  # cancelled: nothing happened
            assert c.get(f"/hosts/{h21.name}").json()["state"] == "up"
        assert _host_of(served, name) == h21.name

        card.locator("[data-evacuate]").click()
        confirm.locator("#confirm-ok").click()
        expect(page.locator(".toast.ok")).to_contain_text(
            f"Evacuating {h21.name}: {name} (cold) will move.")
        expect(card.locator(".host-state .pill")).to_have_text("maintenance")
        _wait_host(served, name, "local")
        expect(card.locator(".host-claimed")).to_contain_text("0 machines", timeout=15_000)
        page.screenshot(path=str(shots / "evacuated.png"), full_page=True)
    finally:
        page.close()


def test_rebalance_shows_the_plan_then_carries_it_out(
    browser: Browser, pool: tuple[Served, TestHost], shots: Path
) -> None:
    served, h21 = pool
    page = _logged_in(browser, served)
    try:
        page.goto(served.url + "/ui/hosts")
        page.locator("#rebalance-pool").click()
        expect(page.locator(".toast.ok")).to_contain_text("nothing to move")

        names = [_create(served, f"bal-{i}", host="local") for i in (1, 2)]
        page.locator("#rebalance-pool").click()
        confirm = page.locator("#confirm-dialog")
        expect(confirm.locator("#confirm-title")).to_have_text("Rebalance the pool: 1 move?")
        expect(confirm).to_contain_text(f"to {h21.name}")
        page.screenshot(path=str(shots / "rebalance-confirm.png"))
        confirm.locator("#confirm-ok").click()
        expect(page.locator(".toast.ok").last).to_contain_text("Rebalancing:")
        deadline = time.monotonic() + 120
        while sorted(_host_of(served, n) for n in names) != sorted([h21.name, "local"]):
            assert time.monotonic() < deadline, "the rebalance did not move a machine"
            time.sleep(0.3)
        card = page.locator(f'section.host[data-host="{h21.name}"]')
        expect(card.locator(".host-claimed")).to_contain_text("1 machines", timeout=15_000)
    finally:
        page.close()


def test_a_live_moves_progress_shows_under_its_job(
    browser: Browser, pool: tuple[Served, TestHost], shots: Path
) -> None:
    """A live move needs a booted guest; here its job and its machine.migrating events
    are written to the server's store as the move writes them, and the console follows
    them like any job it started."""
    served, h21 = pool
    name = served.name("live")
    store = Store(served.settings.db_url)
    job = store.create_job("migrate-live", name, "a-test", [])
    page = _logged_in(browser, served)
    try:
        page.goto(served.url + "/ui/machines")
        page.wait_for_function("window.corral !== undefined")
        page.evaluate("([job, title]) => window.corral.followJobs([job], title)", [
            {"id": job.id, "kind": "migrate-live", "target": name, "state": "running",
             "progress": 0.4}, f"Moving {name} to {h21.name} live"])
        toast = page.locator(".jobs-toast")
        expect(toast).to_contain_text(f"migrate-live {name}")
        line = toast.locator(".job-sent")
        # The toast follows events newer than when its stream opened: send tenths, as
        # the move does, until one shows.
        deadline, tenth = time.monotonic() + 30, 0
        while not (line.text_content() or "").endswith("% sent"):
            assert time.monotonic() < deadline, "no progress event reached the toast"
            tenth = min(tenth + 1, 9)
            store.add_event("machine.migrating", name,
                            f"moving {name} to {h21.name}: {tenth * 10} % sent", None)
            time.sleep(0.5)
        store.add_event("machine.migrating", name, f"moving {name} to {h21.name}: 100 % sent",
                        None)
        expect(line).to_have_text(f"moving {name} to {h21.name}: 100 % sent")
        # Another machine's progress is not this job's (the stream polls twice a second).
        store.add_event("machine.migrating", "someone-else", "moving someone-else: 99 % sent",
                        None)
        time.sleep(3)
        expect(line).to_have_text(f"moving {name} to {h21.name}: 100 % sent")
        page.screenshot(path=str(shots / "migrate-live-progress.png"))
        store.finish_job(job.id, JobState.SUCCEEDED)
        expect(toast.locator(".job-state")).to_have_text("succeeded")
    finally:
        store.finish_job(job.id, JobState.SUCCEEDED)
        store.close()
        page.close()
