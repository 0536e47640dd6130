"""The built-in weighers; each is multiplied by ``Weighting.multiplier(name)``."""

from __future__ import annotations

from corral.scheduler.weighers.cpu import CpuScoreWeigher
from corral.scheduler.weighers.group import GroupWeigher
from corral.scheduler.weighers.image import ImageWeigher
from corral.scheduler.weighers.memory import MemoryWeigher

BUILTIN_WEIGHERS = (MemoryWeigher, CpuScoreWeigher, ImageWeigher, GroupWeigher)

__all__ = ["BUILTIN_WEIGHERS", "CpuScoreWeigher", "GroupWeigher", "ImageWeigher", "MemoryWeigher"]
