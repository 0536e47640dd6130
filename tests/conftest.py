"""Fixtures shared by every test tier."""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from corral.images.appliance import ApplianceArtifacts, build_appliance
from tests.libvirt_cleanup import domains_with_disks_under

CACHE = Path(__file__).resolve().parents[1] / "build" / "cache"


@pytest.fixture(scope="session", autouse=True)
def no_domain_left_behind() -> Iterator[None]:
    """Fail the run if any test left a libvirt domain whose disks were in a test's
    directory: every test must remove what it made, even when it fails."""
    yield
    try:
        left = domains_with_disks_under("qemu:///system", "/var/tmp/corral-test-")
    except libvirt.libvirtError:
        return  # no libvirtd: then no test made a domain either
    assert not left, f"tests left these domains defined: {sorted(left)}"


@pytest.fixture(scope="session")
def appliance() -> Iterator[ApplianceArtifacts]:
    out = Path("/var/tmp") / f"corral-appliance-{secrets.token_hex(3)}"
    try:
        yield build_appliance(out, CACHE)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL from Debian's packages, on a Unix socket only, for this run."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if not bins:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    bindir = Path(bins[-1])
    root = Path(tempfile.mkdtemp(prefix="corral-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    shutil.chown(root, "postgres")
    shutil.chown(sock, "postgres")
    run_as = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*run_as, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
        check=True, capture_output=True,
    )
    port = _free_port()
    opts = f"-k {sock} -p {port} -c listen_addresses='' -c fsync=off"
    subprocess.run(
        [*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-w", "-l",
         str(root / "log"), "start"],
        check=True, capture_output=True,
    )
    try:
        subprocess.run(
            [*run_as, str(bindir / "createdb"), "-h", str(sock), "-p", str(port), "corral"],
            check=True, capture_output=True,
        )
        yield f"postgresql+psycopg://postgres@/corral?host={sock}&port={port}"
    finally:
        subprocess.run(
            [*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            check=False, capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The store's tests run on SQLite and on a real PostgreSQL (a fresh database each)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'corral.db'}"
        return
    base: str = request.getfixturevalue("postgres_url")
    import sqlalchemy

    name = f"t{os.getpid()}_{abs(hash(tmp_path)) % 10**8}"
    admin = sqlalchemy.create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield base.replace("/corral?", f"/{name}?")
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
        admin.dispose()
