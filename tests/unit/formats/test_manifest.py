"""The pure OVF manifest (.mf) parser and writer."""

from __future__ import annotations

import hashlib

import pytest

from corral.errors import InvalidInput
from corral.formats.manifest import ManifestEntry, parse_manifest, write_manifest

SHA1 = hashlib.sha1(b"disk").hexdigest()
SHA256 = hashlib.sha256(b"ovf").hexdigest()


def test_ovftool_spelling() -> None:
    text = f"SHA256(web.ovf)= {SHA256}\nSHA1(web-disk1.vmdk)= {SHA1.upper()}\n"
    entries = parse_manifest(text)
    assert entries == {
        "web.ovf": ManifestEntry("web.ovf", "SHA256", SHA256),
        "web-disk1.vmdk": ManifestEntry("web-disk1.vmdk", "SHA1", SHA1),  # lower-cased
    }


def test_virtualbox_spelling_with_spaces_and_crlf() -> None:
    text = f"SHA1 (db.ovf) = {SHA1}\r\nSHA1 (db-disk001.vmdk) = {SHA1}\r\n\r\n"
    assert sorted(parse_manifest(text)) == ["db-disk001.vmdk", "db.ovf"]


def test_write_then_parse() -> None:
    entries = [ManifestEntry("a.ovf", "SHA256", SHA256), ManifestEntry("a-1.vmdk", "SHA1", SHA1)]
    text = write_manifest(entries)
    assert text.splitlines()[0] == f"SHA256(a.ovf)= {SHA256}"
    assert list(parse_manifest(text).values()) == entries


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("hello world", "Line 1 of the manifest is not a digest line"),
        (f"MD5(a.ovf)= {'0' * 32}", "uses MD5, which Corral cannot check"),
        (f"SHA256(a.ovf)= {SHA1}", "SHA256 digest of 'a.ovf' has the wrong length"),
        (f"SHA1(../../etc/passwd)= {SHA1}", "not a plain file name"),
        (f"SHA1(/etc/passwd)= {SHA1}", "not a plain file name"),
        (f"SHA1(a.ovf)= {SHA1}\nSHA1(a.ovf)= {SHA1}", "lists 'a.ovf' twice"),
    ],
)
def test_bad_manifests_are_refused(text: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse_manifest(text)


def test_the_writer_refuses_a_path() -> None:
    with pytest.raises(InvalidInput, match="not a plain file name"):
        write_manifest([ManifestEntry("x/a.ovf", "SHA256", SHA256)])
