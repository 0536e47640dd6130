#!/usr/bin/env bash
# `make run`: the appliance, the local host, and a small demo fleet with its identities.
set -euo pipefail
cd "$(dirname "$0")/.."
corral=.venv/bin/corral
say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

say "Building the appliance image (cached after the first time)"
$corral image build-appliance
say "The local host"
$corral host show
if ! $corral vm show demo-1 >/dev/null 2>&1; then
  say "Provisioning three linked clones of the appliance"
  $corral vm create demo --image appliance --count 3 --wait >/dev/null  # progress shows on stderr
fi
say "The fleet: each machine's identity and the disk bytes it owns"
$corral vm list
cat <<'TXT'

Try: .venv/bin/corral vm console demo-1   (Ctrl-] detaches)
     .venv/bin/corral vm delete --force demo-1 demo-2 demo-3
TXT
