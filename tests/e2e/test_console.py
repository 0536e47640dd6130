"""The web console end to end, in a real browser against a real server."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from corral.images.appliance import ApplianceArtifacts
from tests.serving import ADMIN_PASSWORD, Served, running_server

LAPTOP = {"width": 1366, "height": 768}
WIDE = {"width": 1920, "height": 1080}


@pytest.fixture(scope="module")
def bare() -> Iterator[Served]:
    """A served Corral without images: enough for the pages and the checks."""
    with running_server() as served:
        yield served


def login(page: Page, served: Served, password: str = ADMIN_PASSWORD) -> None:
    page.goto(served.url + "/")
    expect(page).to_have_url(re.compile(r"/ui/login\?next="))
    page.fill("#login-name", "admin")
    page.fill("#login-password", password)
    page.click("button[type=submit]")


def session_cookie(served: Served) -> tuple[str, str]:
    with httpx.Client(base_url=served.url) as client:
        r = client.post("/auth/session", json={"name": "admin", "password": ADMIN_PASSWORD})
        r.raise_for_status()
        return r.cookies["corral_session"], r.json()["csrf_token"]


def test_a_wrong_password_says_so_and_stays_on_the_login_page(
    browser: Browser, bare: Served, shots: Path
) -> None:
    page = browser.new_page(viewport=LAPTOP)
    try:
        login(page, bare, password="not-the-password")
        error = page.locator("#login-error")
        expect(error).to_be_visible()
        expect(error).to_have_text("Wrong user name or password.")
        expect(page).to_have_url(re.compile(r"/ui/login"))
        page.screenshot(path=str(shots / "login-error.png"))
        assert not any(c["name"] == "corral_session" for c in page.context.cookies())
    finally:
        page.close()


def test_a_change_without_the_csrf_header_is_refused(bare: Served) -> None:
    cookie, csrf = session_cookie(bare)
    with httpx.Client(base_url=bare.url, cookies={"corral_session": cookie}) as client:
        assert client.get("/ui/").status_code == 200  # pages read with the cookie alone
        page = client.get("/ui/machines").text
        assert f'<meta name="csrf-token" content="{csrf}">' in page
        refused = client.post("/machines/nothing/start")
        assert refused.status_code == 403
        assert "X-CSRF-Token" in refused.json()["detail"]
        wrong = client.post("/machines/nothing/start", headers={"X-CSRF-Token": "forged"})
        assert wrong.status_code == 403
        # With the page's value the change goes through to the API's own checks.
        allowed = client.post("/machines/nothing/start", headers={"X-CSRF-Token": csrf})
        assert allowed.status_code == 404


def test_pages_redirect_to_login_and_load_nothing_from_elsewhere(bare: Served) -> None:
    with httpx.Client(base_url=bare.url) as client:
        r = client.get("/")
        assert r.status_code == 307 and r.headers["location"] == "/ui/"
        r = client.get("/ui/machines")
        assert r.status_code == 303
        assert r.headers["location"] == "/ui/login?next=/ui/machines"
        htmx = client.get("/ui/partials/machines", headers={"HX-Request": "true"})
        assert htmx.headers["HX-Redirect"].startswith("/ui/login")
        assert client.get("/static/vendor/htmx.min.js").status_code == 200
        assert client.get("/static/vendor/xterm.js").status_code == 200
    cookie, _ = session_cookie(bare)
    with httpx.Client(base_url=bare.url, cookies={"corral_session": cookie}) as client:
        for path in ("/ui/", "/ui/machines", "/ui/images", "/ui/hosts", "/ui/audit"):
            html = client.get(path).raise_for_status().text
            assert not re.search(r'(src|href)="(https?:)?//', html), path


def test_the_console_socket_refuses_other_origins_and_strangers(bare: Served) -> None:
    cookie, _ = session_cookie(bare)
    ws = bare.url.replace("http://", "ws://") + "/machines/nothing/console"
    with pytest.raises(InvalidStatus) as refused:
        connect(ws, origin="http://evil.example", additional_headers={
            "Cookie": f"corral_session={cookie}"}).close()
    assert refused.value.response.status_code == 403
    # Same origin, no credentials: accepted, then closed as unauthenticated.
    with connect(ws, origin=bare.url) as conn:
        with pytest.raises(Exception):  # noqa: B017  (a ConnectionClosed of some kind)
            conn.recv(timeout=10)
        assert conn.close_code == 4401
    # Logged in, but there is no such machine.
    with connect(ws, origin=bare.url,
                 additional_headers={"Cookie": f"corral_session={cookie}"}) as conn:
        with pytest.raises(Exception):  # noqa: B017
            conn.recv(timeout=10)
        assert conn.close_code == 4404


def test_upload_an_image_with_progress_then_delete_it(
    browser: Browser, bare: Served, shots: Path
) -> None:
    disk = Path("/var/tmp") / f"{bare.prefix}-upload.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    page = browser.new_page(viewport=LAPTOP)
    try:
        login(page, bare)
        expect(page).to_have_url(bare.url + "/ui/")
        page.goto(bare.url + "/ui/images")
        expect(page.locator("#image-rows")).to_contain_text("No images yet")
        page.set_input_files("#upload-file", str(disk))
        page.fill("#upload-name", "tiny")
        page.select_option("#upload-format", "qcow2")
        page.click("#upload-submit")
        expect(page.locator(".jobs-toast")).to_contain_text("import tiny")
        row = page.locator('tr[data-image="tiny"]')
        expect(row).to_be_visible(timeout=60_000)
        expect(row).to_contain_text("16 MiB")
        page.screenshot(path=str(shots / "images-uploaded.png"))
        row.locator("[data-delete-image]").click()
        expect(page.locator("#confirm-dialog")).to_contain_text("tiny")
        page.click("#confirm-ok")
        expect(row).to_have_count(0, timeout=30_000)
        with bare.admin() as api:
            assert [i["name"] for i in api.get("/images").json()] == []
    finally:
        page.close()
        disk.unlink(missing_ok=True)


def terminal_lines(page: Page) -> list[str]:
    lines: list[str] = page.evaluate(
        """() => {
            const b = window.corralTerminal.buffer.active;
            const out = [];
            for (let i = 0; i < b.length; i++) {
                const line = b.getLine(i);
                if (line) out.push(line.translateToString(true));
            }
            return out;
        }"""
    )
    return lines


@pytest.mark.guest
def test_create_watch_console_and_delete_a_machine(
    browser: Browser, appliance: ApplianceArtifacts, shots: Path
) -> None:
    with running_server(appliance) as served:
        page = browser.new_page(viewport=LAPTOP)
        try:
            _walk_through(page, served, shots)
        finally:
            page.close()


def _walk_through(page: Page, served: Served, shots: Path) -> None:
    name = served.name("web")

    # 1. Log in.
    page.goto(served.url + "/")
    expect(page.locator("#login-form")).to_be_visible()
    page.screenshot(path=str(shots / "login.png"))
    login(page, served)
    expect(page).to_have_url(served.url + "/ui/")
    expect(page.locator("h1")).to_have_text("Dashboard")

    # 2. Create a machine from the appliance through the dialog.
    page.click("nav >> text=Machines")
    expect(page).to_have_url(served.url + "/ui/machines")
    page.screenshot(path=str(shots / "machines-empty.png"))
    page.click("#open-create")
    dialog = page.locator("#create-dialog")
    expect(dialog).to_be_visible()
    dialog.locator('input[name="name"]').fill(name)
    dialog.locator('select[name="image"]').select_option("appliance")
    dialog.locator('select[name="memory"]').select_option("256")
    dialog.locator('textarea[name="ssh_keys"]').fill(
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINKMaypgas38FfPj4RJY8XahlqBHrPDqU/6FbdPzUYnc"
        " e2e@corral"
    )
    page.screenshot(path=str(shots / "create-dialog.png"))
    page.click("#create-submit")
    expect(dialog).to_be_hidden()

    # 3. Watch it reach running in the table (the rows refresh every 2 s).
    row = page.locator(f'tr[data-machine="{name}"]')
    expect(row).to_be_visible(timeout=30_000)
    expect(row.locator(".pill")).to_have_text("running", timeout=180_000)
    page.screenshot(path=str(shots / "machines.png"))

    # 4. Its page, and its serial console in xterm.js.
    row.locator(f'a[href="/ui/machines/{name}"]').click()
    expect(page.locator("h1")).to_contain_text(name)
    expect(page.locator("#console-status")).to_have_text("connected", timeout=30_000)
    # What the guest printed before the console opened is replayed from its log.
    expect(page.locator(".xterm-rows")).to_contain_text("CORRAL-READY", timeout=10_000)
    page.locator("#terminal").click()
    deadline = time.monotonic() + 120
    found = False
    while not found and time.monotonic() < deadline:
        page.keyboard.type("hostname")
        page.keyboard.press("Enter")
        end = time.monotonic() + 4
        while time.monotonic() < end:
            if name in (line.strip() for line in terminal_lines(page)):
                found = True
                break
            page.wait_for_timeout(200)
    assert found, "the console never answered 'hostname': " + "\n".join(terminal_lines(page))
    expect(page.locator(".xterm-rows")).to_contain_text(name)
    page.screenshot(path=str(shots / "machine.png"))
    page.screenshot(path=str(shots / "machine-full.png"), full_page=True)

    # The other pages, for the record.
    for path, shot in (("/ui/", "dashboard"), ("/ui/images", "images"),
                       ("/ui/hosts", "hosts"), ("/ui/audit", "audit")):
        page.goto(served.url + path)
        page.wait_for_load_state("networkidle")
        page.screenshot(path=str(shots / f"{shot}.png"))
    page.set_viewport_size(WIDE)
    page.goto(served.url + "/ui/")
    page.screenshot(path=str(shots / "dashboard-wide.png"))
    page.goto(served.url + f"/ui/machines/{name}")
    expect(page.locator("#console-status")).to_have_text("connected", timeout=30_000)
    page.wait_for_timeout(1000)
    page.screenshot(path=str(shots / "machine-wide.png"))
    page.set_viewport_size(LAPTOP)

    # 5. Delete it, confirming, and see it go.
    page.goto(served.url + "/ui/machines")
    row = page.locator(f'tr[data-machine="{name}"]')
    row.locator("[data-delete-machine]").click()
    confirm = page.locator("#confirm-dialog")
    expect(confirm).to_be_visible()
    expect(confirm).to_contain_text(name)
    page.screenshot(path=str(shots / "delete-confirm.png"))
    page.click("#confirm-ok")
    expect(row).to_have_count(0, timeout=120_000)
    expect(page.locator("#machine-rows")).to_contain_text("No machines yet")
    with served.admin() as api:
        assert api.get("/machines").json()["items"] == []


def test_a_viewer_sees_no_audit_log_and_no_console(bare: Served) -> None:
    with bare.admin() as api:
        api.post("/users", json={"name": "vera", "password": "vera-password-1",
                                 "role": "viewer", "projects": ["default"]}).raise_for_status()
    with httpx.Client(base_url=bare.url) as client:
        r = client.post("/auth/session", json={"name": "vera", "password": "vera-password-1"})
        r.raise_for_status()
        client.cookies.set("corral_session", r.cookies["corral_session"])
        dashboard = client.get("/ui/").raise_for_status().text
        assert "vera" in dashboard and 'href="/ui/audit"' not in dashboard
        audit = client.get("/ui/audit")
        assert audit.status_code == 403
        assert "Only an admin may do this." in audit.text
        missing = client.get("/ui/machines/nothing")
        assert missing.status_code == 404 and "Not found" in missing.text
