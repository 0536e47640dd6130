"""Building the appliance from Debian's packages (apt, dpkg-deb, mkfs.ext4, qemu-img).

The downloaded packages are kept in ``build/cache`` at the top of the checkout
(gitignored), so only the first run on a machine downloads them (about 28 MB).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from corral.errors import CorralError
from corral.images import appliance
from corral.images.appliance import ApplianceArtifacts, ApplianceBuildError, build_appliance

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / "build" / "cache"
TOOLS = ("apt-get", "apt-cache", "dpkg-deb", "mkfs.ext4", "qemu-img", "debugfs", "cpio")

missing = [tool for tool in TOOLS if shutil.which(tool) is None]
pytestmark = pytest.mark.skipif(
    bool(missing), reason=f"skipped: not installed on this machine: {', '.join(missing)}"
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> ApplianceArtifacts:
    return build_appliance(tmp_path_factory.mktemp("appliance") / "out", CACHE)


@pytest.fixture(scope="module")
def root_image(built: ApplianceArtifacts, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The disk's ext4 filesystem as a raw image, for read-only inspection."""
    raw = tmp_path_factory.mktemp("raw") / "root.img"
    subprocess.run(
        ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(built.disk), str(raw)],
        check=True,
    )
    return raw


def debugfs(image: Path, request: str) -> str:
    done = subprocess.run(
        ["debugfs", "-R", request, str(image)], capture_output=True, text=True, check=True
    )
    return done.stdout


def initramfs_listing(initrd: Path) -> dict[str, str]:
    """Path -> ``ls -l`` mode string, read by GNU cpio (not by our own writer)."""
    done = subprocess.run(
        ["cpio", "-itv", "--quiet"], stdin=initrd.open("rb"), capture_output=True, check=True
    )
    listing = {}
    for line in done.stdout.decode().splitlines():
        fields = line.split()
        name = fields[-3] if "->" in fields else fields[-1]
        listing[name] = fields[0]
    return listing


def package_file(name: str) -> bytes:
    return (Path(appliance.__file__).parent / "appliance_files" / name).read_bytes()


# --- the artifacts ----------------------------------------------------------------


def test_artifacts_exist_and_describe_the_kernel(built: ApplianceArtifacts) -> None:
    for path in (built.disk, built.kernel, built.initrd):
        assert path.is_file() and path.stat().st_size > 0
        assert path.parent == built.disk.parent
    assert built.kernel_version.endswith("-cloud-amd64")
    assert "console=ttyS0" in built.cmdline.split()
    assert "root=/dev/vda" in built.cmdline.split()
    assert "quiet" in built.cmdline.split()
    assert "corral.probe" not in built.cmdline


def test_kernel_is_an_elf_with_a_pvh_entry(built: ApplianceArtifacts) -> None:
    # Debian's bzImage is LZ4: the builder decompresses it so QEMU can skip the
    # decompressor (PVH boot).
    data = built.kernel.read_bytes()
    assert built.kernel.name == "vmlinux"
    assert data[:4] == b"\x7fELF"
    assert appliance._has_pvh_entry(data)
    assert built.kernel_version.encode() in data


def test_disk_is_a_valid_qcow2_of_the_promised_size(built: ApplianceArtifacts) -> None:
    subprocess.run(["qemu-img", "check", "-q", "-f", "qcow2", str(built.disk)], check=True)
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(built.disk)],
            capture_output=True,
            check=True,
        ).stdout
    )
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == appliance.DISK_SIZE
    assert "backing-filename" not in info
    assert built.disk.stat().st_size < 16 << 20  # mostly empty


def test_initramfs_holds_init_busybox_and_modules(built: ApplianceArtifacts) -> None:
    listing = initramfs_listing(built.initrd)
    moddir = f"lib/modules/{built.kernel_version}"
    assert listing["init"].startswith("-rwx")
    assert listing["bin/busybox"].startswith("-rwx")
    assert listing["dev/console"].startswith("c")
    assert listing["dev/kmsg"].startswith("c")
    for module in (
        "virtio_ring",
        "virtio",
        "virtio_pci_legacy_dev",
        "virtio_pci_modern_dev",
        "virtio_pci",
        "virtio_blk",
        "failover",
        "net_failover",
        "virtio_net",
        "cdrom",
        "isofs",
        "button",
        "evdev",
    ):
        assert f"{moddir}/{module}.ko" in listing, module
    assert f"{moddir}/modules.dep" in listing
    assert f"{moddir}/corral.modules" in listing


def test_initramfs_init_and_module_order(built: ApplianceArtifacts, tmp_path: Path) -> None:
    subprocess.run(
        ["cpio", "-idm", "--quiet"], stdin=built.initrd.open("rb"), cwd=tmp_path, check=True
    )
    assert (tmp_path / "init").read_bytes() == package_file("initramfs-init")
    moddir = tmp_path / "lib/modules" / built.kernel_version
    assert (moddir / "corral.modules").read_text().split() == list(appliance.MODULES)
    deps = {
        line.split(":")[0]: line.split(":")[1].split()
        for line in (moddir / "modules.dep").read_text().splitlines()
    }
    # kmod's order, which busybox modprobe follows: loaded from the last to the first.
    assert deps["virtio_net.ko"] == [
        "net_failover.ko",
        "failover.ko",
        "virtio.ko",
        "virtio_ring.ko",
    ]
    assert deps["isofs.ko"] == ["cdrom.ko"]
    assert deps["virtio_ring.ko"] == []
    # Signatures and BTF are trimmed: the module ends with its ELF sections.
    ko = (moddir / "virtio_net.ko").read_bytes()
    assert not ko.endswith(b"~Module signature appended~\n")
    names = [section.name for section in appliance._elf_sections(ko, "virtio_net.ko")]
    assert b".modinfo" in names and b".BTF" not in names


def test_root_filesystem_holds_the_init_and_busybox(
    built: ApplianceArtifacts, root_image: Path
) -> None:
    subprocess.run(["e2fsck", "-fn", str(root_image)], capture_output=True, check=True)
    sbin = [line.split() for line in debugfs(root_image, "ls -l /sbin").splitlines()]
    assert ["100755", "init"] in ([fields[1], fields[-1]] for fields in sbin if fields)
    assert debugfs(root_image, "cat /sbin/init").encode() == package_file("init")
    assert debugfs(root_image, "cat /etc/inittab").encode() == package_file("inittab")
    assert debugfs(root_image, "cat /etc/corral/seed.awk").encode() == package_file("seed.awk")
    assert "ttyS0::respawn:" in debugfs(root_image, "cat /etc/inittab")
    bin_listing = debugfs(root_image, "ls -l /bin")
    assert "busybox" in bin_listing and " sh" in bin_listing
    modules = debugfs(root_image, f"ls /lib/modules/{built.kernel_version}")
    assert "virtio_net.ko" in modules and "modules.dep" in modules


def test_root_ssh_directory_is_private(root_image: Path) -> None:
    mode = debugfs(root_image, "stat /root/.ssh")
    assert "Mode:  0700" in mode
    assert "Mode:  0700" in debugfs(root_image, "stat /root")


# --- the builder's behaviour -----------------------------------------------------------


def test_rebuild_is_idempotent_and_fast(built: ApplianceArtifacts) -> None:
    before = {p: p.stat().st_mtime_ns for p in (built.disk, built.kernel, built.initrd)}
    started = time.monotonic()
    again = build_appliance(built.disk.parent, CACHE)
    assert time.monotonic() - started < 5
    assert again == built
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_build_from_a_warm_cache_takes_seconds(tmp_path: Path, built: ApplianceArtifacts) -> None:
    started = time.monotonic()
    fresh = build_appliance(tmp_path / "fresh", CACHE)
    assert time.monotonic() - started < 10
    assert fresh.kernel.read_bytes() == built.kernel.read_bytes()
    assert fresh.initrd.read_bytes() == built.initrd.read_bytes()  # reproducible
    assert fresh.cmdline == built.cmdline


def test_interrupted_build_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, built: ApplianceArtifacts
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise ApplianceBuildError("mkfs.ext4 failed.")

    monkeypatch.setattr(appliance, "_make_disk", broken)
    with pytest.raises(CorralError, match=r"mkfs\.ext4 failed"):
        build_appliance(tmp_path / "out", CACHE)
    assert list(tmp_path.iterdir()) == [tmp_path / ".out.lock"]


def test_failed_rebuild_keeps_the_previous_appliance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, built: ApplianceArtifacts
) -> None:
    out = tmp_path / "out"
    shutil.copytree(built.disk.parent, out)
    manifest = json.loads((out / "appliance.json").read_text())
    (out / "appliance.json").write_text(json.dumps({**manifest, "key": "stale"}))

    def broken(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # as if the process were stopped mid-build

    monkeypatch.setattr(appliance, "_make_disk", broken)
    with pytest.raises(KeyboardInterrupt):
        build_appliance(out, CACHE)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        p.name for p in built.disk.parent.iterdir()
    )
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")] == []


def test_apt_failure_without_a_cache_is_one_clear_sentence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(appliance, "KERNEL_METAPACKAGE", "corral-no-such-package")
    with pytest.raises(ApplianceBuildError) as err:
        build_appliance(tmp_path / "out", tmp_path / "empty-cache")
    message = str(err.value)
    assert "corral-no-such-package" in message
    assert "\n" not in message
    assert not (tmp_path / "out").exists()


def test_warm_cache_builds_without_apt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, built: ApplianceArtifacts
) -> None:
    # apt cannot resolve the kernel: the build falls back to the cached packages.
    monkeypatch.setattr(appliance, "KERNEL_METAPACKAGE", "corral-no-such-package")
    messages: list[str] = []
    again = build_appliance(tmp_path / "out", CACHE, log=messages.append)
    assert again.kernel_version == built.kernel_version
    assert any("cached" in message for message in messages)


# --- the pieces, checked against the real files ----------------------------------------


@pytest.fixture(scope="module")
def busybox(built: ApplianceArtifacts, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Debian's static busybox from the cache: it runs on this host as in the guest."""
    deb = next(CACHE.glob("busybox-static_*.deb"))
    return appliance._extract_busybox(deb, tmp_path_factory.mktemp("bb") / "busybox")


def parse_seed(busybox: Path, tmp_path: Path, meta: str | None, user: str | None) -> list[str]:
    """Run seed.awk under busybox awk like the guest does: (printed fields, keys file)."""
    files = []
    for name, text in (("meta-data", meta), ("user-data", user)):
        if text is not None:
            (tmp_path / name).write_text(text)
            files.append(str(tmp_path / name))
    script = tmp_path / "seed.awk"
    script.write_bytes(package_file("seed.awk"))
    keys = tmp_path / "authorized_keys"
    done = subprocess.run(
        [str(busybox), "awk", "-v", f"keys={keys}", "-f", str(script), *files],
        capture_output=True,
        text=True,
        check=True,
    )
    return [*done.stdout.split(), keys.read_text() if keys.exists() else "<none>"]


def test_seed_parsing_of_corrals_quoted_yaml(busybox: Path, tmp_path: Path) -> None:
    meta = 'instance-id: "6f1c2a"\nlocal-hostname: "meta-name"\n'
    user = (
        "#cloud-config\n"
        'hostname: "web-1"\n'
        "ssh_authorized_keys:\n"
        '  - "ssh-ed25519 AAAAC3Nza one@host"\n'
        '  - "ssh-rsa AAAAB3Nza two@host"\n'
    )
    assert parse_seed(busybox, tmp_path, meta, user) == [
        "web-1",
        "6f1c2a",
        "ssh-ed25519 AAAAC3Nza one@host\nssh-rsa AAAAB3Nza two@host\n",
    ]


def test_seed_parsing_of_plain_yaml_and_comments(busybox: Path, tmp_path: Path) -> None:
    meta = "instance-id: i-123  # a comment\nlocal-hostname: db-2\n"
    user = (
        "#cloud-config\n"
        "ssh_authorized_keys:\n"
        "- ssh-ed25519 AAAA key@one\n"
        "  - 'ssh-ed25519 BBBB it''s@two'\n"
        "users: []\n"
        "  - not-a-key\n"
    )
    assert parse_seed(busybox, tmp_path, meta, user) == [
        "db-2",  # no hostname in user-data: meta-data's local-hostname
        "i-123",
        "ssh-ed25519 AAAA key@one\nssh-ed25519 BBBB it's@two\n",
    ]


def test_seed_parsing_without_user_data_or_values(busybox: Path, tmp_path: Path) -> None:
    assert parse_seed(busybox, tmp_path, "instance-id: abc\n", None) == ["-", "abc", "<none>"]
    assert parse_seed(busybox, tmp_path, "{}\n", "#cloud-config\n") == ["-", "-", "<none>"]


def test_seed_values_stay_one_token(busybox: Path, tmp_path: Path) -> None:
    meta = 'instance-id: "a b\tc"\nlocal-hostname: "bad name; rm -rf /"\n'
    assert parse_seed(busybox, tmp_path, meta, None)[:2] == ["badnamerm-rf", "abc"]


def test_the_kernel_is_unpacked_whole_from_the_debian_bzimage(
    built: ApplianceArtifacts,
) -> None:
    bzimage = next(CACHE.glob(f"linux-image-*/boot/vmlinuz-{built.kernel_version}"))
    kernel = built.kernel.read_bytes()
    assert kernel[:4] == b"\x7fELF" and appliance._has_pvh_entry(kernel)
    assert appliance._bzimage_payload(bzimage.read_bytes()) == kernel


def test_cpio_writer_makes_device_nodes_without_root(tmp_path: Path) -> None:
    cpio = appliance._Cpio()
    cpio.directory("dev")
    cpio.char_device("dev/console", 5, 1, 0o600)
    cpio.file("hello", b"hi\n", 0o644)
    cpio.symlink("link", "hello")
    (tmp_path / "a.cpio").write_bytes(cpio.finish())
    listing = initramfs_listing(tmp_path / "a.cpio")
    assert listing["dev/console"] == "crw-------"
    assert listing["hello"] == "-rw-r--r--"
    assert listing["link"].startswith("l")


def test_manifest_records_the_packages(built: ApplianceArtifacts) -> None:
    manifest = json.loads((built.disk.parent / "appliance.json").read_text())
    assert manifest["kernel_version"] == built.kernel_version
    assert manifest["cmdline"] == built.cmdline
    assert manifest["kernel_package"].startswith(f"linux-image-{built.kernel_version}_")
    assert manifest["busybox_package"].startswith("busybox-static_")
