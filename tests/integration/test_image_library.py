"""The image library through the CLI: every format in, hostile files out, safe deletes."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from .conftest import CorralEnv


def _make(root: Path, name: str, fmt: str, *options: str) -> Path:
    raw = root / f"{name}.src.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), "32M"], check=True)
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 2M", str(raw)], check=True,
                   capture_output=True)
    if fmt == "raw":
        return raw
    out = root / f"{name}.{fmt}"
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", fmt, *options, str(raw),
                    str(out)], check=True)
    return out


@pytest.mark.parametrize(
    ("fmt", "options"),
    [
        ("qcow2", []),
        ("raw", []),
        ("vmdk", ["-o", "subformat=monolithicSparse"]),
        ("vmdk", ["-o", "subformat=streamOptimized"]),
        ("vdi", []),
    ],
)
def test_import_each_format_as_a_read_only_qcow2_base(
    corral_env: CorralEnv, fmt: str, options: list[str]
) -> None:
    env = corral_env
    src = _make(env.root, "golden", fmt, *options)
    env.run("image", "import", str(src), "--name", "golden")
    shown = env.json("image", "show", "golden")
    base = Path(shown["path"])
    assert shown["source_format"] == fmt
    assert shown["virtual_size"] == 32 << 20
    assert shown["boot"] == "disk"
    assert shown["sha256"] == hashlib.sha256(base.read_bytes()).hexdigest()
    assert base.stat().st_mode & 0o222 == 0  # read-only
    info = subprocess.run(["qemu-img", "info", "-U", "-f", "qcow2", str(base)],
                          capture_output=True, text=True, check=True).stdout
    assert "backing file" not in info
    # the data came through the conversion
    probe = subprocess.run(["qemu-io", "-r", "-U", "-f", "qcow2", "-c", "read -P 0x5a 1M 2M",
                            str(base)], capture_output=True, text=True, check=True)
    assert "Pattern verification failed" not in probe.stdout


def test_hostile_images_are_refused_by_the_cli_and_leave_no_file(corral_env: CorralEnv) -> None:
    env = corral_env
    evil = env.root / "evil.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/passwd",
                    str(evil)], check=True)
    result = env.run("image", "import", str(evil), check=False)
    assert result.returncode == 5
    assert "backing file" in result.stderr and "Traceback" not in result.stderr
    vmdk = env.root / "evil.vmdk"
    vmdk.write_text('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                    'createType="monolithicFlat"\nRW 2048 FLAT "/etc/passwd" 0\n')
    result = env.run("image", "import", str(vmdk), check=False)
    assert result.returncode == 5
    qcow_as_raw = _make(env.root, "liar", "qcow2")
    result = env.run("image", "import", str(qcow_as_raw), "--format", "raw", check=False)
    assert result.returncode == 5
    assert env.json("image", "list") == []
    assert list((env.root / "state" / "images").iterdir()) == []


def test_delete_refuses_while_machines_depend_and_names_them(
    with_appliance: CorralEnv,
) -> None:
    env = with_appliance
    env.run("vm", "create", env.name("dep"), "--image", "appliance", "--count", "2",
            "--no-start")
    result = env.run("image", "delete", "appliance", check=False)
    assert result.returncode == 4
    assert env.name("dep-1") in result.stderr and env.name("dep-2") in result.stderr
    path = Path(env.json("image", "show", "appliance")["path"])
    assert path.exists()
    env.run("vm", "delete", env.name("dep-1"), env.name("dep-2"))
    env.run("image", "delete", "appliance")
    assert not path.exists()
    assert env.json("image", "list") == []


def test_duplicate_image_name_is_refused(corral_env: CorralEnv) -> None:
    env = corral_env
    src = _make(env.root, "one", "qcow2")
    env.run("image", "import", str(src), "--name", "one")
    result = env.run("image", "import", str(src), "--name", "one", check=False)
    assert result.returncode == 4 and "already exists" in result.stderr
    assert len(list((env.root / "state" / "images").iterdir())) == 1
