"""Render one stats answer as the admin card, in a terminal.

What `jobstats-exporter check` prints for on-call over SSH: Redis status,
each queue's status and five counts, its schedule in words and the next run
as a countdown. Pure: takes the answer and the time, returns text.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from .model import QueueStats, Stats
from .schedule import CronSchedules

__all__ = ["countdown", "render_card"]

#: A next run later than this is a stuck schedule, as for the JobStatsRecurringJobOverdue alert.
OVERDUE_GRACE_SECONDS = 120

_Paint = Callable[[str, str], str]
_COLORS = {"active": "32", "paused": "33", "stopped": "31", "unknown": "90"}
_STATE_COLORS = {
    "waiting": "90",
    "active": "34",
    "completed": "32",
    "failed": "31",
    "delayed": "33",
}


def countdown(seconds: float) -> str:
    """`in 3m 12s` for a time ahead, `overdue 2m 5s` for one past; two units at most."""
    ahead = seconds >= 0
    left = int(abs(seconds))
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if left >= size or (unit == "s" and not parts):
            parts.append(f"{left // size}{unit}")
            left %= size
    text = " ".join(parts[:2])
    return f"in {text}" if ahead else f"overdue {text}"


def render_card(
    stats: Stats, now: float, schedules: CronSchedules, source: str, color: bool = False
) -> str:
    """The card as lines of text; `color` adds ANSI colors like the card's badges."""

    def paint(text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if color else text

    redis = "Enabled" if stats.redis_enabled else "Disabled"
    available = {True: "available", False: "unavailable", None: "availability not reported"}
    lines = [
        f"Background Jobs  ({source})",
        f"Redis: {redis}, {available[stats.redis_available]}",
        "",
    ]
    for queue in stats.queues:
        lines.extend(_queue_lines(queue, now, schedules, paint))
        lines.append("")
    for error in stats.invalid:
        lines.append(paint(f"skipped malformed queue: {_printable(str(error))}", "31"))
    if stats.invalid:
        lines.append("")
    all_active = all(queue.status == "active" for queue in stats.queues)
    overdue = any(_overdue_seconds(queue, now) > OVERDUE_GRACE_SECONDS for queue in stats.queues)
    healthy = (
        stats.redis_available is not False and all_active and not overdue and not stats.invalid
    )
    total = sum(queue.completed for queue in stats.queues)
    status = paint("healthy", "32") if healthy else paint("needs attention", "31")
    count = len(stats.queues)
    lines.append(
        f"System: {status}; {count} queue{'' if count == 1 else 's'}; total completed {total}"
    )
    return "\n".join(lines) + "\n"


def _queue_lines(
    queue: QueueStats, now: float, schedules: CronSchedules, paint: _Paint
) -> list[str]:
    shown_status = queue.status if queue.status != "unknown" else (queue.status_text or "unknown")
    shown_status = _printable(shown_status)
    lines = [f"{_printable(queue.name)}  [{paint(shown_status, _COLORS[queue.status])}]"]
    lines.append(
        "  "
        + "   ".join(
            f"{paint(_printable(state), _STATE_COLORS.get(state, '0'))} {count}"
            for state, count in queue.states()
        )
    )
    recurring = queue.recurring
    if recurring is None or (recurring.count == 0 and recurring.cron is None):
        lines.append("  no recurring jobs")
        return lines
    plural = "" if recurring.count == 1 else "s"
    schedule_text = "no cron"
    if recurring.cron is not None:
        schedule = schedules.at(recurring.cron, now)
        words = schedule.words if schedule else "invalid cron pattern"
        schedule_text = f"{_printable(recurring.cron)} ({_printable(words)})"
    next_text = (
        "no next run"
        if recurring.next_run_ms is None
        else f"next run {countdown(recurring.next_run_ms / 1000 - now)}"
    )
    lines.append(
        "  "
        + paint(f"recurring: {recurring.count} job{plural}, {schedule_text}, {next_text}", "33")
    )
    return lines


def _overdue_seconds(queue: QueueStats, now: float) -> float:
    recurring = queue.recurring
    if recurring is None or recurring.next_run_ms is None:
        return 0.0
    return now - recurring.next_run_ms / 1000


def _printable(text: str) -> str:
    """Upstream text made safe for a terminal: control characters escaped, never obeyed."""
    return text if text.isprintable() else json.dumps(text, ensure_ascii=False)[1:-1]
