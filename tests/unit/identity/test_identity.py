from __future__ import annotations

import io
from pathlib import Path

import pycdlib
import pytest

from corral.errors import InvalidInput
from corral.identity import allocate_macs, batch_names, check_name, new_identity
from corral.identity.mac import is_locally_administered_unicast, random_mac
from corral.identity.seed import seed_content, write_seed


@pytest.mark.parametrize("name", ["web", "a", "web-1", "x" * 63, "0day"])
def test_valid_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "-web", "web-", "Web", "web_1", "a.b", "x" * 64, "../etc", "web 1", "wéb"]
)
def test_unsafe_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidInput, match="is not a valid machine name"):
        check_name(name)


def test_batch_names() -> None:
    assert batch_names("web", 1) == ["web"]
    assert batch_names("web", 3) == ["web-1", "web-2", "web-3"]
    with pytest.raises(InvalidInput):
        batch_names("x" * 62, 2)  # x…-1 is 64 characters


def test_macs_are_unicast_locally_administered_and_avoid_taken() -> None:
    assert all(is_locally_administered_unicast(random_mac()) for _ in range(500))
    seen: set[str] = set()
    first = allocate_macs(50, lambda c: set(c) & seen)
    seen |= set(first)
    second = allocate_macs(50, lambda c: set(c) & seen)
    assert len(set(first)) == 50 and not set(first) & set(second)


def test_seed_iso_has_cidata_label_and_both_files(tmp_path: Path) -> None:
    ident = new_identity("yes", "02:11:22:33:44:55")
    path = tmp_path / "seed.iso"
    write_seed(path, seed_content(ident, ("ssh-ed25519 AAAAC3 user@host: x",)))
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    try:
        assert iso.pvd.volume_identifier.decode().strip() == "cidata"
        files = {}
        for name in ("meta-data", "user-data"):
            buf = io.BytesIO()
            iso.get_file_from_iso_fp(buf, rr_path=f"/{name}")
            files[name] = buf.getvalue().decode()
    finally:
        iso.close()
    assert f'instance-id: "{ident.instance_id}"' in files["meta-data"]
    # "yes" would be a boolean in YAML if it were not quoted
    assert 'local-hostname: "yes"' in files["meta-data"]
    assert files["user-data"].startswith("#cloud-config\n")
    assert '  - "ssh-ed25519 AAAAC3 user@host: x"' in files["user-data"]
    assert not list(tmp_path.glob(".*tmp"))


def test_identities_are_distinct() -> None:
    a, b = new_identity("a", "02:00:00:00:00:01"), new_identity("a", "02:00:00:00:00:01")
    assert a.uuid != b.uuid and a.instance_id != b.instance_id
