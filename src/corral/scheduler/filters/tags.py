"""A host must carry every tag the request names."""

from __future__ import annotations

from collections.abc import Sequence

from corral.scheduler.base import Filter, Refusal
from corral.scheduler.inventory import BoolArray, Inventory
from corral.scheduler.values import Request


def _quoted(tags: Sequence[str]) -> str:
    return ", ".join(f"'{t}'" for t in tags)


class TagFilter(Filter):
    name = "tags"

    def mask(self, inv: Inventory, req: Request) -> BoolArray:
        tags = iter(req.tags)
        first = next(tags, None)
        if first is None:
            return inv.every
        mask = inv.tag_mask(first)
        for tag in tags:
            mask = mask & inv.tag_mask(tag)
        return mask

    def refusal(self, inv: Inventory, req: Request, i: int) -> Refusal:
        missing = sorted(req.tags - inv.host_tags(i))
        word = "tag" if len(missing) == 1 else "tags"
        return Refusal(self.name, "tags:" + ",".join(missing), f"lacks {word} {_quoted(missing)}",
                       f"lack {word} {_quoted(missing)}", f"lacks {word} {_quoted(missing)}")

    def hint(self, inv: Inventory, req: Request, refused: Sequence[int]) -> str | None:
        missing = sorted(set().union(*(req.tags - inv.host_tags(i) for i in refused)))
        word = "tag" if len(missing) == 1 else "tags"
        return f"Tag more hosts {_quoted(missing)}, or drop the {word} from the request."
