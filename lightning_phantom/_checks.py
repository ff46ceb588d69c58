"""The one validator of counts (sizes, ranks, ghosts …) that every layer of the package shares."""

from __future__ import annotations

from typing import Any


def positive_int(name: str, value: Any, low: int = 1, error: type[Exception] = ValueError, *,
                 also: str = "") -> int:
    """``value`` if it is an int >= ``low`` (a bool is not a count), else ``error`` naming ``name``.

    ``also`` names other values the caller accepts, for the message (e.g. ``"'auto'"``).
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        either = f"{also} or " if also else ""
        raise error(f"{name} must be {either}an integer >= {low}, got {value!r}")
    return value
