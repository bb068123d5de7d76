"""Routing decisions: which rule (if any) a complete series matches. Pure logic, no I/O.

A rule matches when every `match` regex finds a match (re.search) in its attribute's value and no
`exclude` regex does. Multi-valued attributes (ImageType) are matched on their values joined by a
backslash, as they appear in the DICOM encoding ("ORIGINAL\\PRIMARY\\AXIAL"). A missing attribute
is matched as the empty string. The loop guard comes first: the node never processes its own
output, whatever the rules say.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dicom_node.config import RouteRule


@dataclass(frozen=True)
class RouteDecision:
    rule: RouteRule | None
    reason: str


def decide(
    header: Mapping[str, str], rules: Sequence[RouteRule], *, own_output: bool
) -> RouteDecision:
    if own_output:
        return RouteDecision(None, "loop guard: series was produced by ltdiff-node")
    for rule in rules:
        missed = [a for a, rx in rule.match if not re.search(rx, header.get(a, ""))]
        if missed:
            continue
        excluded = [a for a, rx in rule.exclude if re.search(rx, header.get(a, ""))]
        if excluded:
            continue
        return RouteDecision(rule, f"matched rule {rule.name!r}")
    return RouteDecision(None, "no rule matched")
