#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian 12 machine for Corral (run as root):
# Debian packages, host fixes that a service manager would normally make, the
# libvirt daemons, and the virtualenv. Safe to run again; it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

PACKAGES=(
  qemu-system-x86 qemu-utils            # the hypervisor and qemu-img
  libvirt-daemon-system libvirt-clients # libvirtd, virtlogd, virsh
  libvirt-dev pkg-config gcc            # to build libvirt-python
  tini                                  # reaps QEMU's daemonized children where no init does
  busybox-static kmod cpio e2fsprogs    # to build the appliance
  lz4                                   # to unpack the kernel once, for a faster boot
  dpkg-dev                              # apt-get download, dpkg-deb
  postgresql                            # the store's tests also run against PostgreSQL
  chromium                              # the console's end-to-end tests (driven by Playwright)
  wrk                                   # HTTP load for the API benchmark (make bench)
  rsync                                 # the cold-migration benchmark's baseline
  btrfs-progs xfsprogs                  # the btrfs and reflink (XFS) storage backends' tests
  python3-venv
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  say "Installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Without udev, /dev/kvm keeps root-only permissions. libvirt then decides on every
# call that KVM "is no longer available", discards its capability cache and re-probes
# QEMU for seconds. Debian's udev rule makes it root:kvm 0660; do the same.
if [[ -c /dev/kvm ]] && [[ "$(stat -c %G:%a /dev/kvm)" != "kvm:660" ]]; then
  say "Giving /dev/kvm Debian's usual permissions (root:kvm 0660)"
  chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
fi

# Start the daemons only when nothing answers on their sockets (no service manager here).
if ! virsh -c qemu:///system version >/dev/null 2>&1; then
  if ! pgrep -x virtlogd >/dev/null; then
    say "Starting virtlogd (no service manager runs it)"
    virtlogd -d
  fi
  say "Starting libvirtd under tini (no service manager runs it)"
  # tini -s adopts QEMU's daemonized children and reaps them; otherwise they stay
  # zombies and libvirt waits for them to exit.
  setsid tini -s -- libvirtd >/var/log/libvirt/corral-libvirtd.out 2>&1 </dev/null &
  for _ in $(seq 1 100); do
    virsh -c qemu:///system version >/dev/null 2>&1 && break
    sleep 0.1
  done
  virsh -c qemu:///system version >/dev/null
fi

if [[ ! -x .venv/bin/python ]]; then
  say "Creating the virtualenv in .venv"
  python3 -m venv .venv
fi
stamp=.venv/.corral-installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
  say "Installing Corral and its Python dependencies into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  touch "$stamp"
fi
scripts/build-web.sh  # the web console's htmx and xterm.js, from npm (skipped when up to date)
say "Set-up done. The corral command is .venv/bin/corral"
