"""Text from outside made safe to print: every control character escaped, so a value is one line of itself.

A registry, a daemon or an old cache can hold names with a newline or NUL in them; printed raw,
such a name could forge output lines (`ok  victim:latest ...`) or drive the terminal. Every
human-readable line goes through `printable` (JSON output is escaped by `json.dumps` already).
"""

from __future__ import annotations

# C0 controls (tab included: it separates our columns), DEL and C1 controls, as \xNN; newline as \n.
_ESCAPES: dict[int, str] = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
_ESCAPES[ord("\n")] = "\\n"


def printable(text: object) -> str:
    """Return `str(text)` with newline as `\\n` and every other C0, DEL and C1 control as `\\xNN`."""
    return str(text).translate(_ESCAPES)
