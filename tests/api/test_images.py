"""Image upload: the raw body streamed to disk, vetted like any import, capped in size."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import finish, is_problem, small_qcow2
from tests.serving import Served, running_server

CAP = 256 << 10


@pytest.fixture(scope="module")
def capped() -> Iterator[Served]:
    with running_server(max_upload_bytes=CAP) as served:
        yield served


def _uploads(served: Served) -> list[Path]:
    folder = served.settings.state_dir / "uploads"
    return list(folder.iterdir()) if folder.exists() else []


def _tiny(tmp_path: Path, name: str = "tiny.qcow2", *extra: str) -> Path:
    return small_qcow2(tmp_path, name, "1M", "-o", "cluster_size=512", *extra)


def test_upload_streams_imports_and_lists(capped: Served, tmp_path: Path) -> None:
    image = _tiny(tmp_path)
    assert image.stat().st_size < CAP

    def chunks() -> Iterator[bytes]:  # no Content-Length: streamed, chunked
        with image.open("rb") as f:
            while chunk := f.read(4096):
                yield chunk

    with capped.admin() as c:
        r = c.post("/images", params={"name": "tiny", "format": "qcow2"}, content=chunks(),
                   headers={"content-type": "application/octet-stream"})
        (job,) = finish(c, r)
        assert job["kind"] == "import" and job["target"] == "tiny"
        listed = {i["name"]: i for i in c.get("/images").json()}
        assert listed["tiny"]["source_format"] == "qcow2"
        assert listed["tiny"]["virtual_size"] == 1 << 20 and listed["tiny"]["project"] is None
        assert c.get("/images/tiny").json()["sha256"] == listed["tiny"]["sha256"]
        is_problem(c.post("/images", params={"name": "tiny"}, content=image.read_bytes()), 409)
        is_problem(c.post("/images", params={"name": "empty"}, content=b""), 400)
        assert c.delete("/images/tiny").status_code == 204
        is_problem(c.get("/images/tiny"), 404)
    assert _uploads(capped) == []


def test_upload_over_the_cap_is_413_and_leaves_nothing(capped: Served) -> None:
    big = b"\0" * (CAP + 1)
    with capped.admin() as c:
        is_problem(c.post("/images", params={"name": "big-declared"}, content=big), 413)

        def chunks() -> Iterator[bytes]:  # no Content-Length: the server counts
            for _ in range(CAP // 4096 + 2):
                yield b"\0" * 4096

        try:
            r = c.post("/images", params={"name": "big-streamed"}, content=chunks())
        except httpx.TransportError:
            pass  # the server may close the connection while the client is still sending
        else:
            is_problem(r, 413)
        names = [i["name"] for i in c.get("/images").json()]
        assert "big-declared" not in names and "big-streamed" not in names
        assert c.get("/jobs", params={"target": "big-streamed"}).json()["items"] == []
    assert _uploads(capped) == []


def test_hostile_image_is_422_and_nothing_is_recorded(capped: Served, tmp_path: Path) -> None:
    hostile = _tiny(tmp_path, "hostile.qcow2", "-b", "/etc/passwd", "-F", "raw")
    with capped.admin() as c:
        r = c.post("/images", params={"name": "hostile", "format": "qcow2"},
                   content=hostile.read_bytes())
        problem = is_problem(r, 422)
        assert "backing" in problem["detail"].lower()
        is_problem(c.get("/images/hostile"), 404)
        assert c.get("/jobs", params={"target": "hostile"}).json()["items"] == []
    assert _uploads(capped) == []
    assert list((capped.settings.image_dir).iterdir()) == []
