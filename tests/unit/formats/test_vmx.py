"""VMX files as VMware products write them, read into a ForeignMachine."""

from __future__ import annotations

import pytest

from corral.errors import InvalidInput
from corral.formats.foreign import ForeignDisk, ForeignNic
from corral.formats.vmx import normalise_mac, parse_vmx, read_settings

# What VMware Workstation 17 writes for a Debian guest (trimmed of nothing that matters:
# mixed key case, the .encoding line, PCI bridges, tools and VMCI keys Corral ignores).
WORKSTATION = b""".encoding = "UTF-8"
config.version = "8"
virtualHW.version = "20"
pciBridge0.present = "TRUE"
pciBridge4.present = "TRUE"
pciBridge4.virtualDev = "pcieRootPort"
pciBridge4.functions = "8"
vmci0.present = "TRUE"
hpet0.present = "TRUE"
nvram = "Debian 12 (web).nvram"
virtualHW.productCompatibility = "hosted"
powerType.powerOff = "soft"
displayName = "Debian 12 (web)"
guestOS = "debian12-64"
tools.syncTime = "FALSE"
firmware = "efi"
sound.autoDetect = "TRUE"
sound.virtualDev = "hdaudio"
sound.fileName = "-1"
sound.present = "TRUE"
numvcpus = "2"
cpuid.coresPerSocket = "2"
memsize = "2048"
scsi0.virtualDev = "lsilogic"
scsi0.present = "TRUE"
scsi0:0.fileName = "Debian 12 (web).vmdk"
scsi0:0.present = "TRUE"
scsi0:1.fileName = "Debian 12 (web)-0.vmdk"
scsi0:1.present = "TRUE"
sata0.present = "TRUE"
sata0:1.deviceType = "cdrom-image"
sata0:1.fileName = "/home/me/iso/debian-12.5.0-amd64-netinst.iso"
sata0:1.present = "TRUE"
usb.present = "TRUE"
ehci.present = "TRUE"
usb_xhci.present = "TRUE"
ethernet0.connectionType = "nat"
ethernet0.addressType = "generated"
ethernet0.virtualDev = "e1000e"
ethernet0.present = "TRUE"
ethernet0.generatedAddress = "00:0C:29:3E:4F:5A"
ethernet0.generatedAddressOffset = "0"
floppy0.present = "FALSE"
uuid.bios = "56 4d 9b 3c 1e 2f 8a 7b-1c 2d 3e 4f 5a 6b 7c 8d"
uuid.location = "56 4d 9b 3c 1e 2f 8a 7b-1c 2d 3e 4f 5a 6b 7c 8d"
vm.genid = "-1234567890123456789"
sharedFolder0.present = "TRUE"
sharedFolder0.enabled = "TRUE"
sharedFolder0.readAccess = "TRUE"
sharedFolder0.writeAccess = "TRUE"
sharedFolder0.hostPath = "/home/me/src"
sharedFolder0.guestName = "src"
sharedFolder.maxNum = "1"
cleanShutdown = "TRUE"
softPowerOff = "TRUE"
"""


def test_a_workstation_machine_is_read_with_what_it_could_not_keep() -> None:
    m = parse_vmx(WORKSTATION)
    assert (m.name, m.cpus, m.memory_bytes) == ("Debian 12 (web)", 2, 2048 << 20)
    assert m.uuid == "564d9b3c-1e2f-8a7b-1c2d-3e4f5a6b7c8d"
    assert (m.firmware, m.guest_os) == ("efi", "debian12-64")
    assert m.disks == (
        ForeignDisk("Debian 12 (web).vmdk", "scsi", "vmdk"),
        ForeignDisk("Debian 12 (web)-0.vmdk", "scsi", "vmdk"),
    )
    assert m.nics == (ForeignNic("00:0c:29:3e:4f:5a", "e1000e"),)
    dropped = "\n".join(m.dropped)
    for expected in ("sata0:1 is a CD/DVD drive ('/home/me/iso/debian-12.5.0-amd64-netinst.iso')",
                     "sound card (hdaudio)", "USB controller", "USB 2 controller",
                     "USB 3 controller", "2 cores per socket", "shared folder 'src' "
                     "(host folder '/home/me/src')", "ethernet0 was connected to nat"):
        assert expected in dropped
    assert "floppy" not in dropped  # floppy0.present = "FALSE"
    assert all(s.endswith(".") for s in m.dropped)


def test_keys_are_case_insensitive_and_escapes_are_decoded() -> None:
    settings = read_settings(b'.encoding = "UTF-8"\nDISPLAYNAME = "a |22quoted|22 |7C name"\n'
                             b"# a comment\n\nMemSize = 512\n")
    assert settings["displayname"] == 'a "quoted" | name'
    assert settings["memsize"] == "512"


def test_the_encoding_line_is_honoured() -> None:
    data = '.encoding = "windows-1252"\ndisplayName = "Caf\u00e9"\n'.encode("cp1252")
    assert parse_vmx(data + b'scsi0:0.present = "TRUE"\n').name == "Caf\u00e9"
    with pytest.raises(InvalidInput, match="unknown encoding"):
        parse_vmx(b'.encoding = "klingon"\ndisplayName = "x"\n')


def test_esxi_static_and_vpx_addresses_and_disk_order() -> None:
    m = parse_vmx(b"""config.version = "8"
displayName = "db"
memSize = "1024"
ide0:0.present = "TRUE"
ide0:0.fileName = "db_1.vmdk"
scsi0.present = "TRUE"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "db.vmdk"
scsi0:0.deviceType = "scsi-hardDisk"
nvme0.present = "TRUE"
nvme0:0.present = "TRUE"
nvme0:0.fileName = "/vmfs/volumes/ds1/db/db_2.vmdk"
ethernet0.present = "TRUE"
ethernet0.virtualDev = "vmxnet3"
ethernet0.networkName = "VM Network"
ethernet0.addressType = "vpx"
ethernet0.generatedAddress = "00:50:56:aa:bb:cc"
ethernet1.present = "TRUE"
ethernet1.addressType = "static"
ethernet1.address = "00:50:56:00:00:01"
ethernet2.present = "FALSE"
ethernet2.address = "00:50:56:00:00:02"
""")
    # SCSI first, then NVMe, then IDE, as VMware's BIOS looks for them
    assert [d.path for d in m.disks] == ["db.vmdk", "/vmfs/volumes/ds1/db/db_2.vmdk", "db_1.vmdk"]
    assert [d.bus for d in m.disks] == ["scsi", "nvme", "ide"]
    assert m.nics == (ForeignNic("00:50:56:aa:bb:cc", "vmxnet3"),
                      ForeignNic("00:50:56:00:00:01", "vlance"))
    assert any("'VM Network'" in s for s in m.dropped)
    assert (m.firmware, m.cpus, m.uuid) == ("bios", 1, None)


def test_bios_hdd_order_picks_the_boot_disk() -> None:
    m = parse_vmx(b'scsi0:0.present = "TRUE"\nscsi0:0.fileName = "a.vmdk"\n'
                  b'sata0:0.present = "TRUE"\nsata0:0.fileName = "b.vmdk"\n'
                  b'bios.hddOrder = "sata0:0"\n')
    assert [d.path for d in m.disks] == ["b.vmdk", "a.vmdk"]


def test_absent_devices_and_controllers_are_skipped() -> None:
    m = parse_vmx(b'scsi0.present = "FALSE"\nscsi0:0.present = "TRUE"\n'
                  b'scsi0:0.fileName = "ghost.vmdk"\nide0:0.present = "FALSE"\n'
                  b'ide0:0.fileName = "off.vmdk"\nide0:1.present = "TRUE"\n'
                  b'ide0:1.fileName = "disk.vmdk"\n')
    assert [d.path for d in m.disks] == ["disk.vmdk"]


def test_passthrough_raw_and_unknown_devices_are_reported() -> None:
    m = parse_vmx(b'scsi0:0.present = "TRUE"\nscsi0:0.deviceType = "scsi-passthru"\n'
                  b'scsi0:0.fileName = "/dev/sg1"\nscsi0:1.present = "TRUE"\n'
                  b'scsi0:1.deviceType = "tape"\nscsi0:1.fileName = "t"\n'
                  b'ide1:0.present = "TRUE"\nide1:0.deviceType = "atapi-cdrom"\n'
                  b'ide1:0.fileName = "auto detect"\n')
    assert m.disks == ()
    assert len(m.dropped) == 3
    assert "passes a host device through" in m.dropped[0]


def test_bad_macs_and_address_types_get_new_ones() -> None:
    m = parse_vmx(b'ethernet0.present = "TRUE"\nethernet0.addressType = "static"\n'
                  b'ethernet0.address = "01:00:5e:00:00:01"\n'
                  b'ethernet1.present = "TRUE"\nethernet1.addressType = "funny"\n'
                  b'ethernet2.present = "TRUE"\n')
    assert [n.mac for n in m.nics] == [None, None, None]
    assert any("not a unicast MAC" in s for s in m.dropped)
    assert any("address type 'funny'" in s for s in m.dropped)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not a VMX file"),
        (b"\x7fELF\x02\x01\x01\0\0\0", "NUL bytes"),
        (b'memsize = "lots"\n', "not a whole number"),
        (b'numvcpus = "0"\n', "at least 1"),
        (b"this is not vmx\n", "not of the form"),
        (b"x" * (2 << 20), "a VMX file is a few KiB"),
    ],
)
def test_what_is_not_a_vmx_file_is_refused_in_one_sentence(data: bytes, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse_vmx(data)


def test_macs_are_normalised() -> None:
    assert normalise_mac("00-0C-29-AB-CD-EF") == "00:0c:29:ab:cd:ef"
    assert normalise_mac("00:0c:29:ab:cd") is None
    assert normalise_mac("ff:ff:ff:ff:ff:ff") is None  # broadcast is no NIC's address
