"""Where each key of a TOML document is written: key path -> line number, for config error messages.

`tomllib` gives values but no positions. This scanner reads the text once more, knowing
just enough TOML (tables, arrays of tables, dotted and quoted keys, inline tables,
multi-line arrays and strings) to say on which line each key path starts. It is pure
and best effort: on text it does not follow it returns what it found so far. Paths are
tuples of keys and array-of-tables indexes: `("jobs", 1, "source", "host")`.
"""

from __future__ import annotations

import re

KeyPath = tuple[str | int, ...]

# One token: a multi-line or single-line string, a punctuation mark, a newline, a comment, or a bare word.
_TOKEN = re.compile(
    r'(?P<ml>"""(?:\\.|[^\\])*?"""|\'\'\'.*?\'\'\')'
    r'|(?P<str>"(?:\\.|[^"\\\n])*"|\'[^\'\n]*\')'
    r"|(?P<punct>[\[\]{}=,])"
    r"|(?P<nl>\n)"
    r"|(?P<comment>#[^\n]*)"
    r"|(?P<ws>[ \t\r]+)"
    r"|(?P<bare>[^\s\[\]{}=,#\"']+)",
    re.DOTALL,
)


def _tokens(text: str) -> list[tuple[str, str, int]]:
    out: list[tuple[str, str, int]] = []
    line = 1
    for m in _TOKEN.finditer(text):
        kind = m.lastgroup or ""
        value = m.group()
        if kind in ("ml", "str", "punct", "bare", "nl"):
            out.append((kind, value, line))
        line += value.count("\n")
    return out


def _key_part(kind: str, value: str) -> list[str]:
    if kind == "str":
        return [value[1:-1]]
    return [p for p in value.split(".") if p]


class _Scanner:
    def __init__(self, text: str) -> None:
        self.toks = _tokens(text)
        self.i = 0
        self.lines: dict[KeyPath, int] = {}
        self.arrays: dict[KeyPath, int] = {}  # array-of-tables path -> how many elements so far

    def peek(self) -> tuple[str, str, int]:
        return self.toks[self.i] if self.i < len(self.toks) else ("eof", "", 0)

    def take(self) -> tuple[str, str, int]:
        tok = self.peek()
        self.i += 1
        return tok

    def skip_newlines(self) -> None:
        while self.peek()[0] == "nl":
            self.i += 1

    def key(self, stop: str) -> list[str]:
        """Read a dotted key up to the punctuation `stop` (not consumed)."""
        parts: list[str] = []
        while self.peek()[0] in ("bare", "str") and self.peek()[1] != stop:
            kind, value, _ = self.take()
            parts += _key_part(kind, value)
        return parts

    def resolve(self, names: list[str]) -> KeyPath:
        """Return the path of a table header: each array of tables on the way gets its last index."""
        path: KeyPath = ()
        for name in names:
            path += (name,)
            if path in self.arrays:
                path += (self.arrays[path] - 1,)
        return path

    def value(self, at: KeyPath) -> None:
        kind, value, _ = self.peek()
        if value == "{":
            self.take()
            while self.peek()[1] not in ("}", "") and self.peek()[0] != "eof":
                if self.peek()[1] == ",":
                    self.take()
                    continue
                self.pair(at)
            self.take()
        elif value == "[":
            self.take()
            index = 0
            while True:
                self.skip_newlines()
                if self.peek()[1] == "]" or self.peek()[0] == "eof":
                    self.take()
                    return
                if self.peek()[1] == ",":
                    self.take()
                    index += 1
                    continue
                self.lines.setdefault((*at, index), self.peek()[2])
                self.value((*at, index))
        else:
            # A scalar: one token, or a local date-time written with a space (two bare words).
            self.take()
            if kind == "bare" and self.peek()[0] == "bare":
                self.take()

    def pair(self, at: KeyPath) -> None:
        line = self.peek()[2]
        names = self.key("=")
        if self.take()[1] != "=":
            raise ValueError("expected =")
        path = at
        for name in names:
            path += (name,)
            self.lines.setdefault(path, line)
        self.value(path)

    def run(self) -> dict[KeyPath, int]:
        table: KeyPath = ()
        while True:
            self.skip_newlines()
            kind, value, line = self.peek()
            if kind == "eof":
                return self.lines
            if value == "[":
                self.take()
                double = self.peek()[1] == "["
                if double:
                    self.take()
                names = self.key("]")
                self.take()
                if double:
                    self.take()
                    base = self.resolve(names[:-1]) + tuple(names[-1:])
                    self.arrays[base] = self.arrays.get(base, 0) + 1
                    self.lines.setdefault(base, line)
                    table = (*base, self.arrays[base] - 1)
                else:
                    table = self.resolve(names)
                self.lines.setdefault(table, line)
                continue
            self.pair(table)


def key_lines(text: str) -> dict[KeyPath, int]:
    """Return the line (1-based) on which each key path of TOML `text` is first written."""
    scanner = _Scanner(text)
    try:
        return scanner.run()
    except (ValueError, IndexError):
        return scanner.lines
