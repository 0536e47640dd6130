"""``python -m bench [NAME…]``: run the benchmarks (all by default)."""

from __future__ import annotations

import importlib
import sys

BENCHES = ["clone_define", "create_overhead", "boot", "batch", "api_list", "state_sweep",
           "placement", "convert", "migrate", "first_write", "clone_backends",
           "snapshot_clone"]


def main() -> None:
    for name in sys.argv[1:] or BENCHES:
        module = importlib.import_module(f"bench.{name}")
        print(f"\n## {name}: {module.__doc__.strip().splitlines()[0] if module.__doc__ else ''}")
        module.run()


if __name__ == "__main__":
    main()
