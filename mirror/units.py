"""Sizes and durations as people write them (`500MB`, `20GiB`, `90s`, `1h30m`), parsed; pure and light.

Kept apart from the pull-through server and the scheduler, which use them, so that reading a
config (every command does) imports neither (start-up time).
"""

from __future__ import annotations

import re

from mirror.errors import UsageError

_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12}
_SIZE_UNITS |= {"tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_TIME_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")


def parse_size(value: int | str) -> int:
    """Return bytes from an integer or a text such as `500MB`, `20GiB`, `1TB`; raise UsageError."""
    if isinstance(value, int) and not isinstance(value, bool):
        number, unit = float(value), ""
    else:
        text = str(value).strip().lower().replace(" ", "")
        digits = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(digits) :]
        try:
            number = float(digits)
        except ValueError:
            number = -1.0
    if unit not in _SIZE_UNITS or not number > 0:
        raise UsageError(f"invalid size {value!r}: bytes, or a number with KB, MB, GB, TB, KiB, MiB, GiB, TiB")
    return int(number * _SIZE_UNITS[unit])


def parse_duration(value: int | float | str) -> float:
    """Return seconds from a number of seconds or a text like `90s`, `5m`, `6h`, `1d`, `1h30m`."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and value.strip() and _DURATION.sub("", value.strip().replace(" ", "")) == "":
        seconds = sum(float(n) * _TIME_UNITS[u] for n, u in _DURATION.findall(value))
    else:
        raise UsageError(f"invalid duration {value!r}: use seconds or e.g. '90s', '5m', '6h', '1d'")
    if seconds <= 0:
        raise UsageError(f"invalid duration {value!r}: must be more than zero")
    return seconds
