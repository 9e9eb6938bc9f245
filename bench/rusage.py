"""Run one command in a fresh child and write its wall time and resource usage as JSON.

`python -m bench.rusage OUT.json CMD...`: this process only waits, so RUSAGE_CHILDREN
holds exactly the command's (and its own children's) peak RSS and block output.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time


def main() -> int:
    """Run argv[2:], write {seconds, cpu, maxrss_kib, oublock, returncode} to argv[1]; return its exit code."""
    out, cmd = sys.argv[1], sys.argv[2:]
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(out, "w") as f:
        usage = {
            "seconds": seconds,
            "cpu": ru.ru_utime + ru.ru_stime,
            "maxrss_kib": ru.ru_maxrss,
            "oublock": ru.ru_oublock,
        }
        json.dump({**usage, "returncode": rc}, f)
    return rc


if __name__ == "__main__":
    sys.exit(main())
