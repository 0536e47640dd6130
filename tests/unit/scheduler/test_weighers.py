from __future__ import annotations

import numpy as np
import pytest

from corral.model.states import GroupPolicy
from corral.scheduler import Inventory, Scheduler, Weighting
from corral.scheduler.weighers import CpuScoreWeigher, GroupWeigher, ImageWeigher, MemoryWeigher
from tests.unit.scheduler.build import GiB, host, request


def everyone(inv: Inventory) -> np.ndarray:
    return np.arange(len(inv))


def test_memory_weigher_spreads_or_packs() -> None:
    inv = Inventory([host("a", memory=8), host("b", memory=32), host("c", memory=16)])
    raw = MemoryWeigher().raw(inv, request(), everyone(inv), Weighting())
    assert raw.tolist() == [8 * GiB, 32 * GiB, 16 * GiB]
    packed = MemoryWeigher().raw(inv, request(), everyone(inv), Weighting(mode="pack"))
    assert packed.tolist() == [-8 * GiB, -32 * GiB, -16 * GiB]
    assert Scheduler().place(inv, request()).host == "b"
    assert Scheduler(weighting=Weighting(mode="pack")).place(inv, request()).host == "a"
    # pack takes the least free memory that still fits
    assert Scheduler(weighting=Weighting(mode="pack")).place(inv, request(memory=9)).host == "c"


def test_cpu_score_counts_only_for_fast_requests() -> None:
    inv = Inventory([host("a", memory=64, cpu_score=1.0), host("b", cpu_score=3.0),
                     host("c", cpu_score=None), host("d", cpu_score=2.0)])
    weigher = CpuScoreWeigher()
    assert weigher.raw(inv, request(), everyone(inv), Weighting()) is None
    raw = weigher.raw(inv, request(fast=True), everyone(inv), Weighting())
    assert raw is not None
    assert raw.tolist() == [1.0, 3.0, 1.0, 2.0]  # unmeasured counts as the slowest measured
    assert Scheduler().place(inv, request()).host == "a"  # most free memory
    fast = Scheduler().place(inv, request(fast=True))
    assert fast.host == "b"
    assert fast.scores["cpu_score"] == 10.0


def test_cpu_score_without_any_measure_has_no_opinion() -> None:
    inv = Inventory([host("a"), host("b")])
    assert CpuScoreWeigher().raw(inv, request(fast=True), everyone(inv), Weighting()) is None


def test_image_bonus_breaks_near_ties_but_not_big_differences() -> None:
    inv = Inventory([host("a", memory=16), host("b", memory=15, images={"debian"}),
                     host("c", memory=64)])
    weigher = ImageWeigher()
    assert weigher.raw(inv, request(), everyone(inv), Weighting()) is None
    raw = weigher.raw(inv, request(image="debian"), everyone(inv), Weighting())
    assert raw is not None and raw.tolist() == [0.0, 1.0, 0.0]
    assert Scheduler().place(inv, request(image="debian")).host == "c"
    near = Inventory([host("a", memory=16), host("b", memory=15, images={"debian"}),
                      host("c", memory=1)])
    placement = Scheduler().place(near, request(image="debian", memory=1))
    assert placement.host == "b"
    assert placement.scores == {"memory": pytest.approx(14 / 15), "cpu_score": 0.0,
                                "image": 0.5, "group": 0.0}
    assert placement.score == pytest.approx(14 / 15 + 0.5)
    assert Scheduler().place(near, request(image="other")).host == "a"


def test_soft_affinity_and_anti_affinity_are_preferences() -> None:
    inv = Inventory([host("a", groups={"g": 2}), host("b", groups={"g": 1}), host("c")])
    weigher = GroupWeigher()
    soft_anti = request(group="g", policy=GroupPolicy.ANTI_AFFINITY, hard=False)
    soft_aff = request(group="g", policy=GroupPolicy.AFFINITY, hard=False)
    assert weigher.raw(inv, soft_anti, everyone(inv), Weighting()).tolist() == [-2, -1, 0]
    assert weigher.raw(inv, soft_aff, everyone(inv), Weighting()).tolist() == [2, 1, 0]
    hard = request(group="g", policy=GroupPolicy.AFFINITY)
    assert weigher.raw(inv, hard, everyone(inv), Weighting()) is None
    assert Scheduler().place(inv, soft_aff).host == "a"
    assert Scheduler().place(inv, soft_anti).host == "c"


def test_soft_anti_affinity_still_places_when_every_host_holds_the_group() -> None:
    inv = Inventory([host("a", groups={"g": 1}), host("b", groups={"g": 2})])
    soft = request(group="g", policy=GroupPolicy.ANTI_AFFINITY, hard=False)
    assert Scheduler().place(inv, soft).host == "a"
    hard = request(group="g", policy=GroupPolicy.ANTI_AFFINITY)
    assert Scheduler().explain(inv, hard).best is None


def test_scores_are_normalised_and_multiplied() -> None:
    inv = Inventory([host("a", memory=10), host("b", memory=20), host("c", memory=30)])
    scheduler = Scheduler(weighting=Weighting(multipliers={"memory": 3.0}))
    verdicts = scheduler.explain(inv, request(memory=0)).verdicts
    assert [(v.host, v.total) for v in verdicts] == [("c", 3.0), ("b", 1.5), ("a", 0.0)]
    assert Weighting().multiplier("image") == 0.5
    assert Weighting().multiplier("plugin") == 1.0


def test_all_equal_scores_give_zero_and_ties_go_to_the_first_name() -> None:
    inv = Inventory([host("c"), host("a"), host("b")])
    placement = Scheduler().place(inv, request())
    assert placement.host == "a"
    assert placement.score == 0.0
