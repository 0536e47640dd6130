from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from corral.config import Settings


def test_defaults_work_as_root_on_a_fresh_machine(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    monkeypatch.setenv("CORRAL_CONFIG", str(tmp_path / "absent.toml"))
    s = Settings()
    assert s.state_dir == Path("/var/lib/corral")
    assert s.db_url == "sqlite:////var/lib/corral/corral.db"
    assert s.host_uri == "qemu:///system" and s.accelerator == "auto"


def test_the_file_is_read_and_the_environment_wins(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    config = tmp_path / "corral.toml"
    config.write_text('state_dir = "/srv/corral"\nstop_timeout = 5\nhost_name = "rack1"\n')
    monkeypatch.setenv("CORRAL_CONFIG", str(config))
    monkeypatch.setenv("CORRAL_STOP_TIMEOUT", "9")
    s = Settings()
    assert s.state_dir == Path("/srv/corral") and s.pool_dir == Path("/srv/corral/pool")
    assert s.stop_timeout == 9.0 and s.host_name == "rack1"


def test_unknown_or_invalid_settings_are_refused(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    config = tmp_path / "corral.toml"
    config.write_text('stat_dir = "/typo"\n')
    monkeypatch.setenv("CORRAL_CONFIG", str(config))
    with pytest.raises(ValidationError):
        Settings()
    config.write_text("")
    monkeypatch.setenv("CORRAL_ACCELERATOR", "warp")
    with pytest.raises(ValidationError):
        Settings()
