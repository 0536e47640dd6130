"""What the CLI prints is what it was given: no emoji codes in MACs or names."""

from __future__ import annotations

from corral.cli.render import err, out


def test_a_mac_with_an_emoji_code_in_it_prints_as_it_is() -> None:
    for console in (out, err):
        with console.capture() as captured:
            console.print("mac 1a:ab:07:96:f5:64 → [bold]12:b3:d8:67:fa:3f[/]")
        assert captured.get().strip() == "mac 1a:ab:07:96:f5:64 → 12:b3:d8:67:fa:3f"
