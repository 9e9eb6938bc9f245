"""`python -m bench.scalechild OUT.json MIRROR-ARGS...`: run the mirror CLI in this process, then write
the bytes it wrote to `index.json` (case 13 measures them; nothing else in the CLI counts them)."""

from __future__ import annotations

import json
import sys

from mirror.cli import main as mirror_main
from mirror.store.layout import index_bytes_written


def main() -> int:
    """Run `mirror ARGS`; write {index_bytes} to OUT.json; return mirror's exit status."""
    out, args = sys.argv[1], sys.argv[2:]
    try:
        rc = mirror_main(args)
    finally:
        with open(out, "w") as f:
            json.dump({"index_bytes": index_bytes_written()}, f)
    return rc


if __name__ == "__main__":
    sys.exit(main())
