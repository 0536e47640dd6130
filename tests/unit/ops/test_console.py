from __future__ import annotations

from pathlib import Path

from corral.ops.console import find_line, read_ready


def test_a_half_written_readiness_line_does_not_count_yet(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    assert read_ready(log) is None  # no log yet
    log.write_bytes(b"booting\r\nCORRAL-READY hostname=web-1 instance-id=i-12")
    assert read_ready(log) is None
    with log.open("ab") as f:
        f.write(b"34 mac=02:00:00:00:00:01\r\n$ ")
    report = read_ready(log)
    assert report is not None
    assert (report.hostname, report.instance_id, report.mac) == (
        "web-1", "i-1234", "02:00:00:00:00:01")


def test_find_line_ignores_lines_that_merely_contain_the_marker(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"echo CORRAL-PROBE-OK\nCORRAL-PROBE-OK\n")
    assert find_line(log, "CORRAL-PROBE-OK") == "CORRAL-PROBE-OK"
    log.write_bytes(b"# echo CORRAL-PROBE-OK\n")
    assert find_line(log, "CORRAL-PROBE-OK") is None
