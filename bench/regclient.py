"""regclient (`regsync`, `regctl`) as a third tool beside mirror and skopeo in cases 1-5.

The binaries are not part of the project: they are found through `MIRROR_PEERS` (a folder
holding `regclient/regsync` and `regclient/regctl`), else in a `shared/peers` folder beside
the repository or one of its parents. When absent, the cases leave the column out and say so.

regclient writes an OCI layout by temp name and rename, without fsync: the `+sync` rows run
`sync` on every file and folder it wrote afterwards, as durable as mirror leaves its cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from bench.measure import ROOT

# regclient's defaults are 1 image at a time and 3 requests per host; mirror's are 16 and 16.
PARALLEL = 16
REQ_CONCURRENT = 16


def peers_dir() -> Path | None:
    """Return the folder of peer binaries (`MIRROR_PEERS`, else `shared/peers` beside the repo), or None."""
    env = os.environ.get("MIRROR_PEERS")
    if env:
        return Path(env)
    for parent in ROOT.parents:
        candidate = parent / "shared" / "peers"
        if (candidate / "regclient").is_dir():
            return candidate
    return None


def binaries() -> tuple[Path, Path] | None:
    """Return (regsync, regctl) when both are present and executable, else None."""
    base = peers_dir()
    if base is None:
        return None
    regsync, regctl = base / "regclient" / "regsync", base / "regclient" / "regctl"
    if all(p.is_file() and os.access(p, os.X_OK) for p in (regsync, regctl)):
        return regsync, regctl
    return None


ABSENT = (
    "regclient's regsync/regctl were not found (set `MIRROR_PEERS` to a folder holding `regclient/regsync` "
    "and `regclient/regctl`): their rows are left out."
)


def regsync_config(path: Path, host: str, entries: list[tuple[str, str, str]], tags: dict[str, list[str]]) -> Path:
    """Write a regsync YAML config: one sync entry per (type, source, target), loopback without TLS.

    `tags` gives the allowed tags of `repository` entries (by source); YAML is written as JSON,
    which YAML reads as it is.
    """
    sync: list[dict[str, object]] = []
    for kind, source, target in entries:
        entry: dict[str, object] = {"source": source, "target": target, "type": kind}
        if kind == "repository" and source in tags:
            entry["tags"] = {"allow": [f"^{t}$" for t in tags[source]]}
        sync.append(entry)
    doc = {
        "version": 1,
        "creds": [{"registry": host, "tls": "disabled", "reqConcurrent": REQ_CONCURRENT}],
        "defaults": {"parallel": PARALLEL},
        "sync": sync,
    }
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def durable(cmd: list[str], out: Path) -> list[str]:
    """Return `cmd` followed by `sync` of every file and folder under `out` (what fsync would have made durable)."""
    quoted = " ".join(_quote(c) for c in cmd)
    return ["bash", "-o", "pipefail", "-c", f"{quoted} && find {_quote(str(out))} -exec sync {{}} +"]


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def regsync_once(regsync: Path, config: Path) -> list[str]:
    """Return the command line of one `regsync once` pass over `config`."""
    return [str(regsync), "once", "-c", str(config), "-v", "error"]


def regctl_copy(regctl: Path, host: str, src: str, dest: str) -> list[str]:
    """Return the command line of `regctl image copy SRC DEST` with `host` as a plain-HTTP registry."""
    return [str(regctl), "--host", f"reg={host},tls=disabled", "image", "copy", src, dest]
