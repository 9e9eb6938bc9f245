"""The generated report: a run of some cases (`--case N`) replaces only their sections.

The marked block of docs/BENCHMARKS.md is `## Run` (machine, mode, load), `## Results`, then
one `### Case N: ...` section per case. A run of every case rewrites it all; a run of some
cases keeps the other cases' sections and the `## Run` of the run that measured them, and
says under each new section how it was run.
"""

from __future__ import annotations

import re

_CASE = re.compile(r"^### Case (\d+):", re.M)


def split_cases(body: str) -> tuple[str, dict[int, str]]:
    """Return the text before the first case section, and each case's section by number."""
    starts = [(m.start(), int(m.group(1))) for m in _CASE.finditer(body)]
    if not starts:
        return body, {}
    sections = {}
    for i, (start, n) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(body)
        sections[n] = body[start:end].rstrip("\n") + "\n"
    return body[: starts[0][0]], sections


def note_run(section: str, note: str) -> str:
    """Return `section` with `note` as a paragraph right under its heading."""
    heading, _, rest = section.partition("\n")
    return f"{heading}\n\n{note.strip()}\n\n{rest.lstrip(chr(10))}"


def merge(old_body: str, new_sections: list[str]) -> str:
    """Return `old_body` with the sections of the cases in `new_sections` replaced or added, in case order."""
    head, sections = split_cases(old_body)
    for section in new_sections:
        m = _CASE.match(section)
        if m is None:
            raise ValueError(f"not a case section: {section[:60]!r}")
        sections[int(m.group(1))] = section.rstrip("\n") + "\n"
    return head + "\n".join(sections[n] for n in sorted(sections))
