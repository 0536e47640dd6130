#!/usr/bin/env bash
# `make run`: the appliance in the library, the local host enrolled, then the server
# (REST API and web console) on http://127.0.0.1:8080 until Ctrl-C. Machines keep
# running after the server stops.
#   CORRAL_LISTEN_ADDRESS / CORRAL_LISTEN_PORT  where to listen
#   CORRAL_ADMIN_PASSWORD                       the first admin's password (else generated)
set -euo pipefail
cd "$(dirname "$0")/.."
corral=.venv/bin/corral
say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

say "Building the appliance image (cached after the first time)"
$corral image build-appliance
say "The local host"
$corral host show
say "Starting the server"
exec $corral serve
