"""The console's pool pages in a real browser: host states, maintenance, and where a
new machine would go (a dry run: nothing is created, no guest boots)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect

from corral.images.appliance import ApplianceArtifacts
from tests.e2e.test_console import LAPTOP, login
from tests.serving import Served, running_server


@pytest.fixture(scope="module")
def pooled(appliance: ApplianceArtifacts) -> Iterator[Served]:
    with running_server(appliance) as served:
        yield served


def _logged_in(browser: Browser, served: Served) -> Page:
    page = browser.new_page(viewport=LAPTOP)
    login(page, served)
    expect(page).to_have_url(served.url + "/ui/")
    return page


def test_hosts_page_shows_the_local_host_up_and_maintenance_toggles(
    browser: Browser, pooled: Served, shots: Path
) -> None:
    page = _logged_in(browser, pooled)
    try:
        page.goto(pooled.url + "/ui/hosts")
        card = page.locator('section.host[data-host="local"]')
        expect(card.locator(".host-state .pill")).to_have_text("up")
        expect(card.locator(".host-claimed")).to_contain_text("0 machines")
        expect(card.locator(".host-tags")).to_contain_text("none")
        page.screenshot(path=str(shots / "hosts.png"), full_page=True)

        card.locator('[data-maintenance="on"]').click()
        card = page.locator('section.host[data-host="local"]')
        expect(card.locator(".host-state .pill")).to_have_text("maintenance")
        expect(card.locator(".host-note")).to_have_text("set by an operator")
        page.screenshot(path=str(shots / "hosts-maintenance.png"), full_page=True)

        # A create refused by the scheduler shows its sentence and every host's verdict.
        page.goto(pooled.url + "/ui/machines")
        page.click("#open-create")
        dialog = page.locator("#create-dialog")
        dialog.locator('input[name="name"]').fill(pooled.name("held"))
        dialog.locator('select[name="image"]').select_option("appliance")
        dialog.locator("#create-submit").click()
        expect(dialog.locator("#create-error-text")).to_contain_text("maintenance")
        expect(dialog.locator("#create-explain")).to_contain_text("refused")
        page.screenshot(path=str(shots / "create-refused.png"))

        page.goto(pooled.url + "/ui/hosts")
        page.locator('section.host[data-host="local"] [data-maintenance="off"]').click()
        expect(page.locator('section.host[data-host="local"] .host-state .pill')
               ).to_have_text("up")
    finally:
        with pooled.admin() as c:
            c.put("/hosts/local/maintenance", json={"on": False}).raise_for_status()
        page.close()


def test_the_create_form_previews_where_each_machine_would_go(
    browser: Browser, pooled: Served, shots: Path
) -> None:
    page = _logged_in(browser, pooled)
    try:
        page.goto(pooled.url + "/ui/machines")
        page.click("#open-create")
        dialog = page.locator("#create-dialog")
        dialog.locator('input[name="name"]').fill(pooled.name("plan"))
        dialog.locator('select[name="image"]').select_option("appliance")
        dialog.locator('input[name="count"]').fill("2")
        dialog.locator('input[name="fast"]').check()
        dialog.locator("#create-preview-button").click()
        rows = dialog.locator("#create-preview-rows tr")
        expect(rows).to_have_count(2)
        expect(rows.nth(0).locator(".preview-host")).to_have_text("local")
        expect(rows.nth(1)).to_contain_text(pooled.name("plan-2"))
        page.screenshot(path=str(shots / "create-preview.png"))
        with pooled.admin() as c:  # a preview creates nothing
            found = c.get("/machines", params={"prefix": pooled.name("plan")}).json()
            assert found["total"] == 0
    finally:
        page.close()


def test_hosts_page_lists_added_storage_pools_with_their_space(
    browser: Browser, pooled: Served, shots: Path
) -> None:
    directory = pooled.settings.state_dir.parent / "console-pool"
    directory.mkdir(exist_ok=True)
    name = pooled.name("spool")
    with pooled.admin() as c:
        c.post("/pools", json={"name": name, "type": "qcow2", "path": str(directory)}
               ).raise_for_status()
    page = _logged_in(browser, pooled)
    try:
        page.goto(pooled.url + "/ui/hosts")
        added = page.locator(f'tr[data-pool="{name}"]')
        expect(added).to_contain_text("qcow2")
        expect(added.locator(".pool-fill [role=progressbar]")).to_have_count(1)
        own = page.locator("tr[data-pool]").filter(has_text="host's own")
        expect(own).to_have_count(1)
        expect(own.locator(".pool-owned")).not_to_be_empty()
        page.screenshot(path=str(shots / "hosts-pools.png"), full_page=True)
    finally:
        page.close()
        with pooled.admin() as c:
            c.delete(f"/pools/{name}").raise_for_status()
