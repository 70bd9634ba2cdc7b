"""Status conditions with kstatus semantics.

- working:   Reconciling=True,  Ready=False, Stalled=False
- suspended: Suspended=True,    Ready=False, Reconciling=False, Stalled=False
- succeeded: Succeeded=True,    Ready=True,  Reconciling=False, Stalled=False
- failed:    Failed=True, Stalled=True, Ready=False, Reconciling=False

``lastTransitionTime`` changes only when a condition's status flips; reason and message
follow the latest state. Every condition carries the generation it was computed for.
"""
from __future__ import annotations

from datetime import datetime
from typing import Optional

from .jobs import format_time
from .status import Condition

ORDER = ("Ready", "Reconciling", "Stalled", "Succeeded", "Failed", "Suspended")


def get(conditions: list[Condition], ctype: str) -> Optional[Condition]:
    for c in conditions:
        if c.type == ctype:
            return c
    return None


def is_true(conditions: list[Condition], ctype: str) -> bool:
    c = get(conditions, ctype)
    return c is not None and c.status == "True"


def set_condition(conditions: list[Condition], ctype: str, status: str, reason: str, message: str,
                  now: datetime, generation: Optional[int]) -> list[Condition]:
    """Return the list with ``ctype`` set; its transition time moves only on a flip."""
    old = get(conditions, ctype)
    when = old.lastTransitionTime if old is not None and old.status == status and old.lastTransitionTime else format_time(now)
    new = Condition(type=ctype, status=status, reason=reason, message=message,
                    lastTransitionTime=when, observedGeneration=generation)
    out = [c for c in conditions if c.type != ctype] + [new]
    rank = {t: i for i, t in enumerate(ORDER)}
    return sorted(out, key=lambda c: rank.get(c.type, len(ORDER)))


def apply_state(conditions: list[Condition], state: str, reason: str, message: str,
                now: datetime, generation: Optional[int]) -> list[Condition]:
    """Set all six conditions for one of the states: working, suspended, succeeded, failed."""
    if state not in ("working", "suspended", "succeeded", "failed"):
        raise ValueError(f"unknown state {state!r}")
    s = lambda flag: "True" if flag else "False"  # noqa: E731
    ready_reason = {"working": "Reconciling", "suspended": "Suspended", "succeeded": reason, "failed": reason}[state]
    table = {
        "Ready": (s(state == "succeeded"), ready_reason),
        "Reconciling": (s(state == "working"), reason if state == "working" else state.capitalize()),
        "Stalled": (s(state == "failed"), reason if state == "failed" else "NotStalled"),
        "Succeeded": (s(state == "succeeded"), reason if state == "succeeded" else "NotSucceeded"),
        "Failed": (s(state == "failed"), reason if state == "failed" else "NotFailed"),
        "Suspended": (s(state == "suspended"), reason if state == "suspended" else "NotSuspended"),
    }
    out = list(conditions)
    for ctype in ORDER:
        status, why = table[ctype]
        msg = message if status == "True" or ctype == "Ready" else ""
        out = set_condition(out, ctype, status, why, msg, now, generation)
    return out
