"""Configuration: a TOML file plus ``CORRAL_*`` environment variables.

The file is ``$CORRAL_CONFIG`` or ``/etc/corral/corral.toml``; environment variables win
over it. The defaults work as root on a fresh Debian machine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_CONFIG_FILE = Path("/etc/corral/corral.toml")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CORRAL_", extra="forbid", frozen=True)

    state_dir: Path = Path("/var/lib/corral")
    """Holds the SQLite store, the image library, machine disks and console logs."""
    database_url: str | None = None
    """SQLAlchemy URL; default: SQLite at ``state_dir/corral.db``."""
    host_uri: str = "qemu:///system"
    """libvirt URI of the local host, enrolled on first use."""
    host_name: str = "local"
    pool_name: str = "corral"
    """Name of the libvirt directory pool holding machine disks and seeds."""
    network_name: str = "corral"
    """Isolated libvirt network (no forward, no address) that machine NICs join."""
    stop_timeout: float = 60.0
    ready_timeout: float = 180.0
    accelerator: Literal["auto", "kvm", "tcg"] = "auto"
    """``auto``: KVM only when a short boot probe proves it works, else TCG."""
    kvm_probe_timeout: float = 20.0
    qemu_img_cpu_seconds: int = 60
    qemu_img_address_space: int = 1 << 30
    appliance_cache_dir: Path | None = None
    """Where downloaded Debian packages for the appliance are kept; default under state_dir."""
    listen_address: str = "127.0.0.1"
    listen_port: int = 8080
    cookie_secure: bool = True
    """Session cookies only over HTTPS; browsers treat http://127.0.0.1 and localhost as
    secure, so this stays on unless the console is served over plain HTTP elsewhere."""
    admin_password: str | None = Field(default=None, repr=False)
    """For the first admin account; when unset, one is generated and printed once."""
    max_upload_bytes: int = 64 << 30
    sweep_interval: float = 2.0
    """Seconds between sweeps of every machine's power state."""
    cpu_overcommit: float = Field(default=4.0, gt=0)
    """vCPUs a host may hold per thread, unless the host sets its own ratio."""
    memory_overcommit: float = Field(default=1.0, gt=0)
    disk_overcommit: float = Field(default=1.0, gt=0)
    linked_clone_growth: float = Field(default=0.1, ge=0, le=1)
    """Share of a linked clone's virtual size its claim reserves for the bytes it will own."""
    placement: Literal["spread", "pack"] = "spread"
    """Spread machines over the hosts (most free memory first), or pack them."""
    weigher_multipliers: dict[str, float] = Field(default_factory=dict)
    """Per weigher name (memory, cpu_score, image, group): how much it counts."""
    health_interval: float = 15.0
    """Seconds between health checks of every host by the server."""
    host_timeout: float = 10.0
    """Seconds a host may take to answer a health check before it is marked down."""
    pool_fill_limit: float = Field(default=0.95, gt=0, le=1)
    """No new disk goes into a pool filled past this fraction; 1 turns the guard off."""
    migration_bandwidth_mib: int = Field(default=0, ge=0)
    """MiB/s a live migration may use on the wire; 0: as much as it can."""
    failpoint: str | None = Field(default=None, repr=False)
    """``step:before`` or ``step:after``: SIGKILL this process there. For crash tests only."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = Path(os.environ.get("CORRAL_CONFIG", DEFAULT_CONFIG_FILE))
        toml = TomlConfigSettingsSource(settings_cls, toml_file=path if path.is_file() else None)
        return (init_settings, env_settings, toml)

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.state_dir / 'corral.db'}"

    @property
    def image_dir(self) -> Path:
        return self.state_dir / "images"

    @property
    def pool_dir(self) -> Path:
        return self.state_dir / "pool"

    @property
    def console_dir(self) -> Path:
        return self.state_dir / "console"

    @property
    def lock_dir(self) -> Path:
        return self.state_dir / "locks"

    @property
    def cache_dir(self) -> Path:
        return self.appliance_cache_dir or self.state_dir / "cache"


def load_settings(**overrides: Any) -> Settings:
    return Settings(**overrides)
