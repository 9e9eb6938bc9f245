"""`mirror sync -c FILE`: run the config's jobs once, incrementally; the exit code says how it went."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiofiles

from mirror.commands.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    add_common,
    add_foreign,
    exit_code,
    load_config,
)
from mirror.config import Config, JobConfig
from mirror.engine.copy import FAILED, Engine, Progress
from mirror.engine.sync import CANCELLED, SyncObserver, SyncResult, SyncRun, summarize, sync
from mirror.errors import ExitStatus, MirrorError, UsageError, os_reason
from mirror.progress import (
    ERROR,
    INFO,
    WARNING,
    BlobsOnly,
    JsonLog,
    JsonProgress,
    JsonSyncView,
    PlainSyncView,
    RateLimitNotes,
)
from mirror.reference import Reference
from mirror.store.layout import Layout
from mirror.store.lock import CacheLock
from mirror.store.state import StateDB

if TYPE_CHECKING:
    from mirror.engine.publish import Publisher
    from mirror.progress_rich import RichProgress


def register(sub: Any) -> None:
    """Add the `sync` command."""
    p: argparse.ArgumentParser = sub.add_parser("sync", help="run the config's jobs once, incrementally")
    add_common(p)
    p.add_argument("--job", action="append", default=[], metavar="NAME", help="run only this job (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="show what would be fetched; write nothing")
    add_foreign(p)
    p.add_argument(
        "--report", type=Path, metavar="FILE", help="write a JSON report of every image to FILE (`-`: stdout)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print only failures and the summary")
    p.add_argument("--json", action="store_true", help="log JSON lines even on a terminal")
    p.add_argument(
        "--wait",
        type=float,
        nargs="?",
        const=float("inf"),
        default=0.0,
        metavar="SECONDS",
        help="wait this long for a busy cache (bare: as long as it takes); with --queue: wait for the fleet's results",
    )
    p.add_argument("--queue", metavar="URL", help="hand the images to `mirror worker`s through Redis (docs/fleet.md)")
    p.add_argument(
        "--grace", type=float, metavar="SECONDS", help="after SIGTERM/SIGINT, time downloads in flight get to finish"
    )
    p.set_defaults(run=run)


class _Collect:
    """A PlanObserver that keeps the run id and what a stopped run's report and summary need, and passes results on.

    A run cancelled by a signal returns nothing: its report is built from what this kept.
    With `keep_all` (a `--report`) that is every planned reference and every result;
    otherwise only counts, the failed results, and the planned references still without a
    result (a set that empties as the run goes on).
    """

    def __init__(self, inner: SyncObserver, *, keep_all: bool = True) -> None:
        self.inner = inner
        self.keep_all = keep_all
        self.results: list[SyncResult] = []  # keep_all: every result, in the order they came
        self.run_id = 0
        self._planned: list[tuple[str, str]] = []  # keep_all: (job, reference), in the order they were planned
        self._tally = SyncRun([], {})  # not keep_all: the counts so far, failures kept
        self._pending: dict[str, set[str]] = {}  # not keep_all: job -> planned references without a result
        self._repos: dict[str, set[str]] = {}  # not keep_all: job -> repositories of what it planned or reported

    def run_started(self, run: int) -> None:
        """Keep the run id."""
        self.run_id = run

    def planned(self, job: str, references: Sequence[str]) -> None:
        """Keep the names (or, not keeping all, those without a result yet, and their repository)."""
        if self.keep_all:
            self._planned += [(job, r) for r in references]
        elif references:
            self._pending.setdefault(job, set()).update(references)
            self._repos.setdefault(job, set()).add(_repo_name(references[0]))  # one call, one repository

    def cancelled_run(self, jobs: list[JobConfig]) -> SyncRun:
        """Return every result so far, then `cancelled` for each planned reference without one.

        A repository the config names whose tags were not listed yet gets one `cancelled`
        entry (`HOST/REPO`), and so does a job stopped before it had listed anything (`HOST`).
        Not keeping all, the same entries are counted, and only the failed results kept.
        """
        if not self.keep_all:
            return self._cancelled_tally(jobs)
        out = list(self.results)
        seen = {(r.job, r.reference) for r in out}
        for job, ref in self._planned:
            if (job, ref) not in seen:
                seen.add((job, ref))
                out.append(SyncResult(job, ref, CANCELLED))
        why = "stopped before its images were listed"
        for j in jobs:
            names = {_repo_name(ref) for job, ref in seen if job == j.name}
            for where in _unlisted(j, names):
                out.append(SyncResult(j.name, where, CANCELLED, error=why))
        return SyncRun.of(out)

    def _cancelled_tally(self, jobs: list[JobConfig]) -> SyncRun:
        out = self._tally
        for job in self._pending.values():
            for _ in job:
                out.add(CANCELLED, keep=False)
        for j in jobs:
            for _ in _unlisted(j, self._repos.get(j.name, set())):
                out.add(CANCELLED, keep=False)
        return out

    def job_grew(self, job: str, images: int) -> None:
        """Pass on."""
        self.inner.job_grew(job, images)

    def result(self, result: SyncResult) -> None:
        """Keep (or count) and pass on."""
        if self.keep_all:
            self.results.append(result)
        else:
            self._tally.add(result, keep=result.status == FAILED)
            pending = self._pending.get(result.job)
            if pending is not None and result.reference in pending:
                pending.discard(result.reference)  # its repository was kept when it was planned
            else:
                self._repos.setdefault(result.job, set()).add(_repo_name(result.reference))
        self.inner.result(result)


def _unlisted(job: JobConfig, names: set[str]) -> list[str]:
    """Return the names a stopped run reports `cancelled` for `job`: itself (`HOST`) when it reached no repository
    (`names` empty), else each repository the config names outside `names` (`HOST/REPO`)."""
    if not names:
        return [job.spec.registry]
    repos = job.spec.repositories.names if job.source.type == "registry" else ()
    return [f"{job.spec.registry}/{r}" for r in repos if _repo_name(f"{job.spec.registry}/{r}") not in names]


def _repo_name(reference: str) -> str:
    """Return the normalised repository of a reference (`docker.io/library/redis`), or the text when it is none."""
    try:
        return Reference.parse(reference).name
    except MirrorError:
        return reference


def chosen_jobs(cfg: Config, names: list[str]) -> list[JobConfig]:
    """Return the jobs named on the command line (all when none), or raise UsageError for an unknown one."""
    if not cfg.jobs:
        raise UsageError("the config has no [[jobs]] to run")
    known = {j.name: j for j in cfg.jobs}
    for name in names:
        if name not in known:
            raise UsageError(f"--job {name}: no such job in the config (jobs: {', '.join(known)})")
    return [j for j in cfg.jobs if not names or j.name in names]


def report_doc(
    run_id: int, started: float, results: list[SyncResult], code: int, dry_run: bool, interrupted: str | None = None
) -> dict[str, Any]:
    """Return the `--report` document."""
    return {
        "run": run_id or None,
        "dry_run": dry_run,
        "interrupted": interrupted,
        "started": started,
        "finished": time.time(),
        "exit_code": code,
        "counts": summarize(results),
        "foreign_layers": sum(r.foreign for r in results),  # kept as references, not fetched
        "failed": [r.reference for r in results if r.status == FAILED],
        "images": [r.to_json() for r in results],
    }


async def run(args: argparse.Namespace) -> int:
    """Run the chosen jobs; print a line per image and a summary; write the report; return the exit code."""
    if args.config is None:
        raise UsageError("sync needs a config file: mirror sync -c mirror.toml")
    cfg = load_config(args)  # a bad config stops here, before anything is written
    jobs = chosen_jobs(cfg, args.job)
    report = _report_target(args.report)  # a report that cannot be written stops here too, not after the run
    tty = sys.stderr.isatty() and not args.quiet and not args.json
    rich: RichProgress | None = None
    observer: SyncObserver
    progress: Progress
    log: JsonLog | None = None
    # Results go to stdout, unless the report goes there (`--report -`): then it is alone on it.
    results = sys.stderr if args.report is not None and str(args.report) == "-" else sys.stdout
    if tty:
        from mirror.progress_rich import RichProgress, RichSyncView  # rich only on a terminal (start-up time)

        rich = RichProgress.on_stderr()
        progress, observer = BlobsOnly(rich), RichSyncView(rich)
    elif args.json or not sys.stderr.isatty():
        # Each reference's outcome is a result (stdout); blob events, notes and the summary are the log (stderr).
        log = JsonLog(sys.stderr, quiet=args.quiet)
        progress = BlobsOnly(JsonProgress(sys.stderr, quiet=True))
        observer = JsonSyncView(JsonLog(results, quiet=args.quiet))
    else:
        progress, observer = BlobsOnly(JsonProgress(sys.stderr, quiet=True)), PlainSyncView(results, args.quiet)
    started, t0 = time.time(), time.monotonic()
    if args.queue:
        return await _run_queued(args, cfg, jobs, observer, log, report, started, t0)
    async with AsyncExitStack() as stack:
        if args.dry_run:
            # Read what is there; create nothing, lock nothing.
            layout = Layout.open(cfg.cache, create=False) if (cfg.cache / "oci-layout").exists() else Layout(cfg.cache)
            state = await StateDB.open(cfg.cache, readonly=True)
        else:
            layout = Layout.open(cfg.cache)
            await stack.enter_async_context(CacheLock(cfg.cache, exclusive=False, wait=args.wait, lease=True))
            state = await StateDB.open(cfg.cache)
        stack.push_async_callback(state.close)
        transport = await stack.enter_async_context(cfg.transport())
        transport.events = RateLimitNotes(progress.note)
        engine = cfg.engine(layout, transport, progress)
        if rich is not None:
            stack.enter_context(rich)
        # Downloads are tasks of their own: on the way out, stop any a cancelled run left.
        stack.push_async_callback(engine.abort)
        pairs = [(j.spec, j.build_source(transport)) for j in jobs]
        # Only a report lists every image; the lines and the summary are written as results land, or counted.
        keep_all = report is not None
        collected = _Collect(observer, keep_all=keep_all)
        stopping = asyncio.Event()
        publisher = cfg.publisher(engine, transport)  # jobs with a registry destination push through it
        task = asyncio.ensure_future(
            sync(
                engine,
                state,
                pairs,
                dry_run=args.dry_run,
                stopping=stopping,
                observer=collected,
                publisher=publisher,
                keep_all=keep_all,
            )
        )
        grace = cfg.daemon.grace if args.grace is None else args.grace
        signalled = _stop_on_signals(task, stopping, grace)
        try:
            run_id, results = await task
        except asyncio.CancelledError:
            if not signalled:
                raise
            run_id, results = collected.run_id, collected.cancelled_run(jobs)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                asyncio.get_running_loop().remove_signal_handler(sig)
    secs = time.monotonic() - t0
    code = _exit_code(results)
    interrupted = signalled[0].name if signalled else None
    if signalled:
        code = ExitStatus.SIGNAL + signalled[0].value  # the shell's convention for "ended by a signal"
    doc = report_doc(run_id, started, results.results, code, args.dry_run, interrupted) if report is not None else None
    code = _summary(log, results, jobs, engine, publisher, secs, code, interrupted)
    if report is not None and doc is not None:
        code = await _write_report(report, doc, code)
    return code


def _exit_code(run: SyncRun) -> int:
    """Return 0 when every image is cached, 3 when no endpoint could be reached, else 1 (as `exit_code`)."""
    if not run.counts.get(FAILED):
        return EXIT_OK
    return EXIT_UNREACHABLE if run.unreachable else EXIT_FAILED


async def _run_queued(
    args: argparse.Namespace,
    cfg: Config,
    jobs: list[JobConfig],
    observer: SyncObserver,
    log: JsonLog | None,
    report: Path | None,
    started: float,
    t0: float,
) -> int:
    """`sync --queue`: plan and enqueue for the fleet; with `--wait`, report as a sync does."""
    from mirror.fleet.enqueue import enqueue_run, fleet_summary  # redis and saq load only for fleet runs

    wait = args.wait is not None and args.wait > 0
    results, tasks = await enqueue_run(cfg, jobs, args.queue, observer, wait=wait, dry_run=args.dry_run)
    code = exit_code(results) if results else EXIT_OK
    doc = report_doc(0, started, results, code, args.dry_run) if report is not None else None
    fleet_summary(log, results, len(jobs), tasks, time.monotonic() - t0, code)
    if report is not None and doc is not None:
        code = await _write_report(report, doc, code)
    return code


def _report_target(path: Path | None) -> Path | None:
    """Return where `--report` goes (`-`: stdout), its folder created; raise UsageError when it cannot be written.

    Checked before the run, so that an hour of downloads does not end in a lost report.
    """
    if path is None or str(path) == "-":
        return path
    if path.is_dir():
        raise UsageError(f"--report {path}: is a directory; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--report {path}: cannot create its folder: {os_reason(exc)}") from None
    if not os.access(path.parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"--report {path}: not writable")
    return path


async def _write_report(path: Path, doc: dict[str, Any], code: int) -> int:
    """Write the report to `path` (`-`: stdout); return `code`, or FAILED when a clean run's report is lost."""
    text = json.dumps(doc, indent=1) + "\n"
    if str(path) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return code
    # Beside it, then renamed over it: a reader never sees half a report, and a failed write keeps the last one.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        async with aiofiles.open(tmp, "w") as f:
            await f.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        print(f"mirror: --report {path}: {os_reason(exc)}", file=sys.stderr)
        return EXIT_FAILED if code == EXIT_OK else code
    return code


def _summary(
    log: JsonLog | None,
    results: SyncRun,
    jobs: list[JobConfig],
    engine: Engine,
    publisher: Publisher,
    secs: float,
    code: int,
    interrupted: str | None,
) -> int:
    """Print (or log) the run's summary on stderr; return `code`."""
    counts = results.counts
    s = engine.stats
    mb = s.bytes_fetched / 1e6
    ps = publisher.pusher.stats
    pushes = results.pushes
    if log is not None:
        log.event(
            "summary",
            INFO if code == EXIT_OK else WARNING if interrupted else ERROR,
            references=results.total,
            jobs=len(jobs),
            counts=counts,
            blobs_fetched=s.blobs_fetched,
            blobs_present=s.blobs_present,
            bytes_fetched=s.bytes_fetched,
            **(
                {
                    "blobs_pushed": ps.blobs_uploaded,
                    "blobs_mounted": ps.blobs_mounted,
                    "bytes_pushed": ps.bytes_uploaded,
                    "manifests_pushed": ps.manifests_put,
                }
                if pushes
                else {}
            ),
            seconds=round(secs, 3),
            exit_code=code,
            interrupted=interrupted,
        )
        return code
    parts = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "nothing to do"
    print(
        f"{results.total} references in {len(jobs)} jobs: {parts}; blobs fetched {s.blobs_fetched}, "
        f"already present {s.blobs_present}; {mb:.1f} MB in {secs:.2f}s"
        + (
            f"; pushed {ps.blobs_uploaded} blobs ({ps.bytes_uploaded / 1e6:.1f} MB), mounted {ps.blobs_mounted}, "
            f"{ps.manifests_put} manifests"
            if pushes
            else ""
        )
        + (f"; stopped by {interrupted}" if interrupted else ""),
        file=sys.stderr,
    )
    return code


def _stop_on_signals(task: asyncio.Future[Any], stopping: asyncio.Event, grace: float) -> list[signal.Signals]:
    """On SIGTERM/SIGINT stop starting images, give downloads in flight `grace` seconds, then cancel `task`.

    A second signal cancels at once. Returns the list the first signal received is put in.
    """
    got: list[signal.Signals] = []
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if got:
            task.cancel()
            return
        got.append(sig)
        stopping.set()
        print(f"mirror: {sig.name}: finishing downloads in flight (up to {grace:g}s)", file=sys.stderr, flush=True)
        loop.call_later(grace, task.cancel)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    return got
