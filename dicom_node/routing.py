"""Routing decisions: which rule (if any) a complete series matches. Pure logic, no I/O.

A rule matches when every `match` regex finds a match (re.search) in its attribute's value and no
`exclude` regex does. Multi-valued attributes (ImageType) are matched on their values joined by a
backslash, as they appear in the DICOM encoding ("ORIGINAL\\PRIMARY\\AXIAL"). A missing attribute
is matched as the empty string. The loop guard comes first: the node never processes its own
output, whatever the rules say.

When no rule matches, the decision also says why for each rule (`RuleMiss`): the offline
`ltdiff-node standardize` prints it for the operator. The node's log keeps the short reason only
(the attribute values stay out of the log).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dicom_node.config import RouteRule


@dataclass(frozen=True)
class RuleMiss:
    """Why one rule did not match: an attribute its `match` regex did not find, or one its
    `exclude` regex found. value: the series' value (None when the attribute is absent)."""

    rule: str
    attribute: str
    value: str | None
    pattern: str
    excluded: bool = False

    def describe(self) -> str:
        """E.g. "ConvolutionKernel 'Bl64d' does not match ^Br40" (the value is shown, so this
        is for the operator's terminal, not for the log)."""
        shown = f"'{self.value}'" if self.value is not None else "(absent)"
        if self.excluded:
            return f"{self.attribute} {shown} matches the exclusion {self.pattern}"
        return f"{self.attribute} {shown} does not match {self.pattern}"


@dataclass(frozen=True)
class RouteDecision:
    rule: RouteRule | None
    reason: str
    misses: tuple[RuleMiss, ...] = ()  # no rule matched: why not, rule by rule, in order


def rule_misses(header: Mapping[str, str], rule: RouteRule) -> tuple[RuleMiss, ...]:
    """Why `rule` does not match `header`: every `match` attribute that misses; when all match,
    every `exclude` attribute that hits. Empty: the rule matches."""
    missed = tuple(
        RuleMiss(rule.name, a, header.get(a), rx)
        for a, rx in rule.match
        if not re.search(rx, header.get(a, ""))
    )
    if missed:
        return missed
    return tuple(
        RuleMiss(rule.name, a, header.get(a), rx, excluded=True)
        for a, rx in rule.exclude
        if re.search(rx, header.get(a, ""))
    )


def decide(
    header: Mapping[str, str], rules: Sequence[RouteRule], *, own_output: bool
) -> RouteDecision:
    if own_output:
        return RouteDecision(None, "loop guard: series was produced by ltdiff-node")
    misses: list[RuleMiss] = []
    for rule in rules:
        why_not = rule_misses(header, rule)
        if not why_not:
            return RouteDecision(rule, f"matched rule {rule.name!r}")
        misses.extend(why_not)
    return RouteDecision(None, "no rule matched", tuple(misses))
