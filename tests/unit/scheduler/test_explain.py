from __future__ import annotations

import json

import pytest

from corral.model.states import GroupPolicy, HostState
from corral.scheduler import Inventory, NoValidHost, Scheduler
from tests.unit.scheduler.build import host, request


def five_hosts() -> Inventory:
    return Inventory([
        host("h1", state=HostState.DOWN, tags={"ssd"}),
        host("h2", memory=2, tags={"ssd"}),
        host("h3", memory=4, tags={"ssd"}, used=(0, 1, 0)),
        host("h4"),
        host("h5", tags={"hdd"}),
    ])


def test_summary_counts_each_host_once_by_its_first_refusal() -> None:
    explanation = Scheduler().explain(five_hosts(), request(tags={"ssd"}))
    assert explanation.summary() == (
        "No host can take 'web-1' (2 vCPUs, 4.0 GiB memory, 20.0 GiB disk): of 5 hosts,"
        " 1 is down, 2 lack tag 'ssd' and 2 lack memory.")
    assert explanation.removed == (
        ("state", 1), ("platform", 0), ("tags", 2), ("capacity", 2), ("group", 0))
    assert explanation.passed == 0
    assert explanation.best is None
    # h1 would fit but for being down, h4 and h5 but for the tag, h2 and h3 but for memory
    assert explanation.hint() == (
        "Bring a host back up or out of maintenance."
        " Tag more hosts 'ssd', or drop the tag from the request."
        " Free memory on a host (stop or delete machines), or add a host.")


def test_the_error_is_the_summary_then_the_hint() -> None:
    with pytest.raises(NoValidHost) as caught:
        Scheduler().place(Inventory([host("a", memory=16), host("b", memory=32)]),
                          request("db-1", cpus=1, memory=64, disk=10))
    assert caught.value.message == (
        "No host can take 'db-1' (1 vCPU, 64.0 GiB memory, 10.0 GiB disk): of 2 hosts,"
        " 2 lack memory.")
    assert caught.value.hint == (
        "No host has 64.0 GiB memory even when empty (the largest has 32.0 GiB);"
        " ask for less, or add a bigger host.")


def test_one_host_in_maintenance_and_an_empty_inventory() -> None:
    one = Scheduler().explain(Inventory([host("a", state=HostState.MAINTENANCE)]), request())
    assert one.summary() == (
        "No host can take 'web-1' (2 vCPUs, 4.0 GiB memory, 20.0 GiB disk): of 1 host,"
        " 1 is in maintenance.")
    none = Scheduler().explain(Inventory([]), request())
    assert none.summary() == (
        "No host can take 'web-1' (2 vCPUs, 4.0 GiB memory, 20.0 GiB disk): there are no"
        " hosts.")
    assert none.hint() == "Add a host."


def test_platform_and_affinity_sentences() -> None:
    inv = Inventory([host("a", arch="aarch64"), host("b", groups={"db": 1}, memory=2),
                     host("c"), host("d", accelerator="tcg")])
    req = request(arch="x86_64", accelerator="kvm", group="db", policy=GroupPolicy.AFFINITY)
    explanation = Scheduler().explain(inv, req)
    assert explanation.summary() == (
        "No host can take 'web-1' (2 vCPUs, 4.0 GiB memory, 20.0 GiB disk): of 4 hosts,"
        " 1 is not x86_64, 1 lacks kvm, 1 lacks memory and 1 is not where group 'db' runs.")
    # advice only from the filters that alone keep a host out: b lacks only memory, c is
    # only not where the group runs; a and d fail two filters each
    assert explanation.hint() == (
        "Free memory on a host (stop or delete machines), or add a host."
        " Free capacity where group 'db' runs, or make the group soft.")


def test_a_placeable_request_summarises_the_winner() -> None:
    explanation = Scheduler().explain(five_hosts(), request(memory=1))
    assert explanation.summary() == (
        "4 of 5 hosts can take 'web-1' (2 vCPUs, 1.0 GiB memory, 20.0 GiB disk);"
        " 'h4' scores best.")
    assert explanation.hint() is None
    assert [(v.host, v.passed) for v in explanation.verdicts] == [
        ("h4", True), ("h5", True), ("h3", True), ("h2", True), ("h1", False)]


def test_lines_show_every_host_with_every_failing_filter() -> None:
    explanation = Scheduler().explain(five_hosts(), request(tags={"ssd"}, memory=1))
    assert explanation.lines() == [
        "HOST  RESULT     SCORE  WHY",
        "h3    fits        1.00  memory 1.00, cpu_score 0.00, image 0.00, group 0.00",
        "h2    fits        0.00  memory 0.00, cpu_score 0.00, image 0.00, group 0.00",
        "h1    refused        -  state: down: the last health check could not reach it",
        "h4    refused        -  tags: lacks tag 'ssd'",
        "h5    refused        -  tags: lacks tag 'ssd'",
    ]
    failing = Scheduler().explain(five_hosts(), request(tags={"ssd"}, memory=17))
    h1 = next(v for v in failing.verdicts if v.host == "h1")
    assert [r.filter for r in h1.refusals] == ["state", "capacity"]


def test_to_dict_has_stable_keys_and_is_json() -> None:
    data = Scheduler().explain(five_hosts(), request(tags={"ssd"})).to_dict()
    assert list(data) == ["machine", "needs", "hosts", "passed", "best", "summary", "hint",
                          "removed", "verdicts"]
    assert data["needs"] == {"cpus": 2, "memory_bytes": 4 << 30, "disk_bytes": 20 << 30}
    assert data["removed"][2] == {"filter": "tags", "hosts": 2}
    assert data["verdicts"][0] == {
        "host": "h1", "passed": False, "total": None, "scores": {},
        "refusals": [{"filter": "state", "key": "down",
                      "detail": "down: the last health check could not reach it"}]}
    assert json.loads(json.dumps(data)) == data


def test_large_counts_read_with_thousands_separators() -> None:
    inv = Inventory([host(f"h{k:04d}", state=HostState.DOWN) for k in range(1200)])
    assert Scheduler().explain(inv, request()).summary().endswith(
        "of 1,200 hosts, 1,200 are down.")
