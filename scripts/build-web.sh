#!/usr/bin/env bash
# Vendor the web console's browser libraries (htmx, xterm.js and its fit add-on) from
# the npm registry into src/corral/web/static/vendor/. The console loads nothing from a
# CDN, so it works offline. Pinned by web/package-lock.json; skipped when up to date.
set -euo pipefail
cd "$(dirname "$0")/.."

web=web
vendor=src/corral/web/static/vendor
stamp=$vendor/.stamp
want="$(sha256sum "$web/package-lock.json" "$0" | sha256sum | cut -d' ' -f1)"
if [[ -f $stamp && "$(cat "$stamp")" == "$want" && "${1:-}" != "--force" ]]; then
  exit 0
fi

if ! command -v npm >/dev/null; then
  # Machines of this kind ship Node.js with npm; a bare Debian gets Debian's own.
  echo "==> Installing npm from Debian's packages"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm >/dev/null
fi
echo "==> Vendoring the web console's libraries (npm ci in $web/)"
(cd "$web" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)

mods=$web/node_modules
rm -rf "$vendor"
mkdir -p "$vendor"
cp "$mods/htmx.org/dist/htmx.min.js" "$vendor/htmx.min.js"
cp "$mods/@xterm/xterm/lib/xterm.js" "$vendor/xterm.js"
cp "$mods/@xterm/xterm/css/xterm.css" "$vendor/xterm.css"
cp "$mods/@xterm/addon-fit/lib/addon-fit.js" "$vendor/addon-fit.js"
for pkg in htmx.org @xterm/xterm @xterm/addon-fit; do
  name=${pkg//\//-}; name=${name#@}
  cp "$mods/$pkg/LICENSE"* "$vendor/LICENSE.$name" 2>/dev/null || true
done
echo "$want" >"$stamp"
