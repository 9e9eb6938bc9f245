"""The cache's state file `.mirror/state.db` (sqlite): runs, each tag's last digest and check time, errors.

Every call runs on one worker thread that owns the connection, so the event loop never
waits on the disk; each write is one transaction, except that the per-tag writes of
concurrent tags share one (group commit), and the "checked" times of unchanged tags are
kept in memory and written in batches. WAL mode lets a dry run read while a sync writes.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from mirror.errors import StoreError

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    jobs TEXT NOT NULL,
    started REAL NOT NULL,
    finished REAL,
    outcome TEXT,
    images INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS tags (
    ref TEXT PRIMARY KEY,
    job TEXT NOT NULL,
    digest TEXT NOT NULL,
    entry_digest TEXT NOT NULL,
    platforms TEXT NOT NULL,
    checked REAL NOT NULL,
    synced REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS errors (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run INTEGER NOT NULL,
    job TEXT NOT NULL,
    ref TEXT NOT NULL,
    time REAL NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS errors_run ON errors (run);
"""
KEEP_RUNS = 1000  # runs (and their errors) kept in the state; older ones are dropped as new ones finish
# The "checked" times of unchanged tags are written in one statement per batch: when this
# many are pending, when the oldest pending one is this many seconds old, and whenever
# anything reads the tags or a run ends. A crash loses at most the pending ones, which
# only means those tags look checked a little earlier than they were.
TOUCH_BATCH = 512
TOUCH_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class TagState:
    """What the last sync stored for a reference: the source's manifest digest and the index entry's."""

    ref: str
    job: str
    digest: str
    entry_digest: str
    platforms: str
    checked: float
    synced: float


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One finished or running sync run."""

    id: int
    jobs: str
    started: float
    finished: float | None
    outcome: str | None
    images: int
    failed: int
    bytes: int


class StateDB:
    """The sqlite state of one cache, used from async code through a single worker thread."""

    def __init__(self, path: Path, *, readonly: bool = False, keep_runs: int = KEEP_RUNS) -> None:
        self.path = path
        self.readonly = readonly
        self.keep_runs = keep_runs
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mirror-state")
        self._conn: sqlite3.Connection | None = None
        # Group commit of per-tag writes: statements waiting for the next transaction, the
        # task that will commit them (None: none open), and the last such task started.
        self._rows: list[tuple[str, tuple[object, ...]]] = []
        self._touches: list[tuple[float, str]] = []  # (checked, ref) not written yet
        self._touched_since = 0.0  # monotonic time of the oldest pending touch
        self._group: asyncio.Task[None] | None = None
        self._last_group: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, cache: Path, *, readonly: bool = False, keep_runs: int = KEEP_RUNS) -> StateDB:
        """Return the state of the cache at `cache`, creating the file unless `readonly`."""
        db = cls(cache / ".mirror" / "state.db", readonly=readonly, keep_runs=keep_runs)
        await db._call(db._open_sync)
        return db

    def _open_sync(self) -> None:
        try:
            if self.readonly and not self.path.exists():
                return  # a cache never synced: no state to read
            if self.readonly:
                self._conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._conn = sqlite3.connect(self.path, timeout=30)
                self._conn.execute("PRAGMA journal_mode=WAL")
                with self._conn:
                    self._conn.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open the state database: {exc}") from None

    async def _call(self, fn: Callable[[], T]) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: state database: {exc}") from None

    async def _grouped(self, sql: str, row: tuple[object, ...]) -> None:
        """Run one write in the next group transaction; return once it is committed.

        Writes that arrive while a group commits wait together for the next one, so
        a thousand tags cost a few transactions instead of a thousand.
        """
        self._rows.append((sql, row))
        await self._next_group()

    async def _next_group(self) -> None:
        """Start the next group transaction unless one is gathering; return once it is committed."""
        if self._group is None:
            self._group = asyncio.ensure_future(self._commit_group(self._last_group))
            self._group.add_done_callback(_retrieve)
            self._last_group = self._group
        await asyncio.shield(self._group)

    async def _commit_group(self, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await asyncio.wait([previous])  # one group at a time; this one gathers rows meanwhile
        rows, self._rows = self._rows, []
        touches, self._touches = self._touches, []
        self._group = None

        def w() -> None:
            with self._db() as c:
                if touches:
                    # max(): a touch never moves a tag's time back, whatever order the writes take.
                    c.executemany("UPDATE tags SET checked = max(checked, ?) WHERE ref = ?", touches)
                for sql, row in rows:
                    c.execute(sql, row)

        await self._call(w)

    async def flush(self) -> None:
        """Write the pending "checked" times (and any group being gathered); return once committed."""
        if self._touches or self._group is not None:
            await self._next_group()

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"{self.path}: state database is closed")
        return self._conn

    async def close(self) -> None:
        """Write the pending "checked" times, close the connection and the worker thread."""
        try:
            if self._touches and self._conn is not None:
                await self.flush()
        finally:
            if self._last_group is not None:
                await asyncio.wait([self._last_group])
            if self._conn is not None:
                await self._call(self._db().close)
                self._conn = None
            self._pool.shutdown(wait=True)

    async def __aenter__(self) -> StateDB:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def tags(self) -> dict[str, TagState]:
        """Return the state of every reference synced so far, by reference."""

        def q() -> dict[str, TagState]:
            # Row by row, not `fetchall` (a list of every row beside the dict at the peak); the
            # few job names and platform keys shared, not a string of each per reference.
            rows = self._db().execute("SELECT ref, job, digest, entry_digest, platforms, checked, synced FROM tags")
            shared: dict[str, str] = {}
            out: dict[str, TagState] = {}
            for ref, job, digest, entry, plats, checked, synced in rows:
                job = shared.setdefault(job, job)
                plats = shared.setdefault(plats, plats)
                out[ref] = TagState(ref, job, digest, entry, plats, checked, synced)
            return out

        if self._conn is None and self.readonly:
            return {}
        await self.flush()
        return await self._call(q)

    async def start_run(self, jobs: Iterable[str]) -> int:
        """Record that a run of `jobs` began; return its id."""

        def w() -> int:
            with self._db() as c:
                cur = c.execute("INSERT INTO runs (jobs, started) VALUES (?, ?)", (",".join(jobs), time.time()))
                return int(cur.lastrowid or 0)

        return await self._call(w)

    async def finish_run(self, run: int, outcome: str, images: int, failed: int, nbytes: int) -> None:
        """Record how run `run` ended; drop the runs (and their errors) older than the last `keep_runs`.

        A daemon runs its jobs for months: without the cut, a registry failing every tag of
        every run would grow the errors table by the run.
        """
        await self.flush()  # the run's "checked" times are in before it is recorded as ended

        def w() -> None:
            with self._db() as c:
                c.execute(
                    "UPDATE runs SET finished = ?, outcome = ?, images = ?, failed = ?, bytes = ? WHERE id = ?",
                    (time.time(), outcome, images, failed, nbytes, run),
                )
                oldest = run - self.keep_runs
                if oldest > 0:
                    c.execute("DELETE FROM errors WHERE run <= ?", (oldest,))
                    c.execute("DELETE FROM runs WHERE id <= ?", (oldest,))

        await self._call(w)

    async def record_tag(self, state: TagState) -> None:
        """Store what the cache now holds for a reference (in a transaction shared with concurrent writes)."""

        await self._grouped(
            "INSERT OR REPLACE INTO tags (ref, job, digest, entry_digest, platforms, checked, synced)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (state.ref, state.job, state.digest, state.entry_digest, state.platforms, state.checked, state.synced),
        )

    async def touch_tag(self, ref: str, when: float) -> None:
        """Record that `ref` was checked at `when` and found unchanged (written with its batch: see TOUCH_BATCH).

        Returns at once, except for the call that fills a batch: it waits for the batch's commit.
        """
        if not self._touches:
            self._touched_since = time.monotonic()
        self._touches.append((when, ref))
        if len(self._touches) >= TOUCH_BATCH or time.monotonic() - self._touched_since >= TOUCH_SECONDS:
            await self.flush()

    async def forget_tags(self, refs: Iterable[str]) -> None:
        """Drop the state of references removed from the cache."""
        names = [(r,) for r in refs]

        def w() -> None:
            with self._db() as c:
                c.executemany("DELETE FROM tags WHERE ref = ?", names)

        await self._call(w)

    async def record_error(self, run: int, job: str, ref: str, message: str) -> None:
        """Store a failure of `ref` in run `run`."""

        def w() -> None:
            with self._db() as c:
                c.execute(
                    "INSERT INTO errors (run, job, ref, time, message) VALUES (?, ?, ?, ?, ?)",
                    (run, job, ref, time.time(), message),
                )

        await self._call(w)

    async def runs(self, limit: int = 20) -> list[RunRecord]:
        """Return the latest runs, newest first."""

        def q() -> list[RunRecord]:
            rows = (
                self._db()
                .execute(
                    "SELECT id, jobs, started, finished, outcome, images, failed, bytes"
                    " FROM runs ORDER BY id DESC LIMIT ?",
                    (limit,),
                )
                .fetchall()
            )
            return [RunRecord(*r) for r in rows]

        return await self._call(q)

    async def errors(self, run: int) -> list[tuple[str, str, str]]:
        """Return (job, ref, message) of every failure of run `run`."""

        def q() -> list[tuple[str, str, str]]:
            rows = self._db().execute("SELECT job, ref, message FROM errors WHERE run = ? ORDER BY id", (run,))
            return [(str(a), str(b), str(c)) for a, b, c in rows.fetchall()]

        return await self._call(q)


def _retrieve(task: asyncio.Task[None]) -> None:
    """Mark a group's failure as seen: its callers get it, and one whose callers all left must not warn."""
    if not task.cancelled():
        task.exception()
