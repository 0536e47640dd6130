"""The block backends' byte verbs, on a plain file standing in for a device, and the
domain XML of a block volume."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

from corral.formats.domain_xml import build_domain_xml, parse_domain_xml
from corral.model import Accelerator, DomainPlan, Identity
from corral.storage.block import PIECE_BYTES, device_pieces, device_size, write_device
from corral.storage.sparse import Hole


def test_zero_pieces_read_as_holes_and_holes_write_as_zeros(tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    data = os.urandom(1000)
    with dev.open("wb") as f:
        f.truncate(4 * PIECE_BYTES)
        f.seek(PIECE_BYTES + 5)
        f.write(data)
    pieces = list(device_pieces(dev, 0, 10 * PIECE_BYTES))
    assert isinstance(pieces[0], Hole) and pieces[0].length == PIECE_BYTES
    assert isinstance(pieces[1], bytes) and pieces[1][5:1005] == data
    assert pieces[2] == Hole(2 * PIECE_BYTES)
    assert device_size(dev) == 4 * PIECE_BYTES
    # Writing a hole over data makes it read as zeros; the size stays.
    written = write_device(dev, PIECE_BYTES, [Hole(10), b"xyz", Hole(PIECE_BYTES - 13)],
                           punch=True)
    assert written == PIECE_BYTES
    content = dev.read_bytes()
    assert content[PIECE_BYTES:PIECE_BYTES + 13] == bytes(10) + b"xyz"
    assert content[PIECE_BYTES + 13:2 * PIECE_BYTES] == bytes(PIECE_BYTES - 13)
    assert len(content) == 4 * PIECE_BYTES


def test_a_block_volume_boots_as_a_raw_block_disk() -> None:
    plan = DomainPlan(
        name="web-1",
        identity=Identity(uuid="6f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9", mac=None,
                          hostname="web-1", instance_id="i-1"),
        accelerator=Accelerator.TCG, cpus=1, memory_bytes=256 << 20,
        disk_path="/dev/vg0/web-1", disk_backing=None, seed_path="/pool/web-1-seed.iso",
        console_log="/pool/web-1.log", network=None, kernel_boot=None,
    )
    xml = build_domain_xml(plan)
    disk = ET.fromstring(xml).find("devices/disk")
    assert disk is not None
    assert disk.get("type") == "block"
    assert disk.find("source") is not None and disk.find("source").attrib == {  # type: ignore[union-attr]
        "dev": "/dev/vg0/web-1"}
    assert disk.find("driver").get("type") == "raw"  # type: ignore[union-attr]
    parsed = parse_domain_xml(xml)
    vda = parsed.disk("vda")
    assert vda is not None and vda.source == "/dev/vg0/web-1" and vda.format == "raw"
    seed = parsed.disk("vdb")
    assert seed is not None and seed.source == "/pool/web-1-seed.iso"  # files stay files
