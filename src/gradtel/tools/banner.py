"""Terminal status line in the style of the original StatusBanner.

``NaN:X`` / ``Inf:Y`` are red bold above the warning threshold and red bold
reverse above the critical one, exactly as TELE-300 describes the banner.
"""

from __future__ import annotations

from ..health import GradHealth, Status

__all__ = ["progress_bar", "status_line", "styled_count"]

_RESET = "\033[0m"
_STYLES = {
    Status.HEALTHY: "",
    Status.WARNING: "\033[1;31m",  # red bold
    Status.CRITICAL: "\033[1;7;31m",  # red bold reverse
}


def styled_count(label: str, count: int, status: Status, *, color: bool) -> str:
    """``label:count``, styled by the count's own status when ``color`` is on.

    >>> styled_count("NaN", 7, Status.CRITICAL, color=True)
    '\\x1b[1;7;31mNaN:7\\x1b[0m'
    >>> styled_count("NaN", 7, Status.CRITICAL, color=False)
    'NaN:7'
    """
    text = f"{label}:{count}"
    style = _STYLES[status] if color else ""
    return f"{style}{text}{_RESET}" if style else text


def progress_bar(done: int, total: int, width: int = 20) -> str:
    """A fixed-width bar.

    >>> progress_bar(5, 10, width=10)
    '[#####-----]'
    """
    filled = width if total <= 0 else min(width, done * width // total)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def status_line(health: GradHealth, *, color: bool) -> str:
    """``NaN:X Inf:Y status`` for one update.

    >>> from gradtel.health import GradHealth
    >>> status_line(GradHealth(inf_by_layer={"head": 7}), color=False)
    'NaN:0 Inf:7 critical'
    """
    nan = styled_count("NaN", health.nan_total, health.nan_status, color=color)
    inf = styled_count("Inf", health.inf_total, health.inf_status, color=color)
    return f"{nan} {inf} {health.status.value}"
