"""SQLite catalog of stored samples: where each sample's bytes live, and its metadata.

``catalog.sqlite`` in WAL mode with ``synchronous=FULL``: the sample store
relies on a committed row surviving a crash (compaction deletes the old shard
only after the rows pointing at the new one are durable). ``offset``/``length``
locate the image payload itself inside its shard. One connection shared
behind a lock makes it safe to use from several threads.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import astuple, dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    sample_id TEXT PRIMARY KEY,
    experience INTEGER NOT NULL,
    domain TEXT NOT NULL,
    shard TEXT NOT NULL,
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL,
    probe INTEGER NOT NULL DEFAULT 0,
    label TEXT,
    added_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS samples_experience ON samples(experience);
CREATE INDEX IF NOT EXISTS samples_domain ON samples(domain);
CREATE INDEX IF NOT EXISTS samples_shard ON samples(shard, offset);
CREATE TABLE IF NOT EXISTS experiences (
    experience INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    info TEXT NOT NULL
);
"""
_COLUMNS = "sample_id, experience, domain, shard, offset, length, probe, label, added_at"
_CHUNK = 900  # stay under SQLite's bound-parameter limit


@dataclass(frozen=True)
class SampleRow:
    """One catalogued sample; ``offset``/``length`` locate its payload in ``shard``."""

    sample_id: str
    experience: int
    domain: str
    shard: str
    offset: int
    length: int
    probe: bool
    label: str | None
    added_at: float


def _row(values: tuple) -> SampleRow:
    sid, exp, domain, shard, offset, length, probe, label, added_at = values
    return SampleRow(sid, exp, domain, shard, offset, length, bool(probe), label, added_at)


def _chunks(items: list[str]) -> Iterator[list[str]]:
    for i in range(0, len(items), _CHUNK):
        yield items[i : i + _CHUNK]


def _filters(experience: int | None, probe: bool | None) -> tuple[str, list]:
    clauses, args = [], []
    if experience is not None:
        clauses.append("experience = ?")
        args.append(experience)
    if probe is not None:
        clauses.append("probe = ?")
        args.append(int(probe))
    return (" AND ".join(clauses) or "1"), args


class Catalog:
    """Thread-safe access to the ``samples`` table."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: Iterable = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchall()

    def add_many(self, rows: Iterable[SampleRow]) -> int:
        """Insert rows in one transaction; ids already present are ignored. Returns rows added."""
        with self._transaction() as db:
            before = db.total_changes
            db.executemany(
                f"INSERT OR IGNORE INTO samples ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)",
                [(*astuple(r)[:6], int(r.probe), r.label, r.added_at) for r in rows],
            )
            return db.total_changes - before

    def get(self, sample_ids: Iterable[str]) -> dict[str, SampleRow]:
        """Rows of the given ids that exist, keyed by id."""
        out: dict[str, SampleRow] = {}
        for chunk in _chunks(list(sample_ids)):
            marks = ",".join("?" * len(chunk))
            for values in self._query(
                f"SELECT {_COLUMNS} FROM samples WHERE sample_id IN ({marks})", chunk
            ):
                out[values[0]] = _row(values)
        return out

    def sizes(self, experience: int) -> list[tuple[str, int, bool]]:
        """(sample_id, length, probe) of an experience's samples, in insertion order."""
        return [
            (sid, length, bool(probe))
            for sid, length, probe in self._query(
                "SELECT sample_id, length, probe FROM samples WHERE experience = ? ORDER BY rowid",
                [experience],
            )
        ]

    def by_shard(self, shard: str) -> list[SampleRow]:
        """Rows stored in ``shard``, in file order."""
        return [
            _row(v)
            for v in self._query(
                f"SELECT {_COLUMNS} FROM samples WHERE shard = ? ORDER BY offset", [shard]
            )
        ]

    def page(
        self, after: int, limit: int, experience: int | None = None, probe: bool | None = None,
        until: int | None = None,
    ) -> tuple[list[SampleRow], int]:
        """Up to ``limit`` rows with ``after`` < rowid (<= ``until``); also returns the last rowid
        (keyset paging)."""
        where, args = _filters(experience, probe)
        values = self._query(
            f"SELECT rowid, {_COLUMNS} FROM samples WHERE rowid > ? AND rowid <= ? AND {where} "
            "ORDER BY rowid LIMIT ?",
            [after, until if until is not None else 2**63 - 1, *args, limit],
        )
        return [_row(v[1:]) for v in values], (values[-1][0] if values else after)

    def last_rowid(self) -> int:
        """The newest row's rowid (0 when empty): `page(until=...)` stops at the rows stored so far."""
        return int(self._query("SELECT COALESCE(MAX(rowid), 0) FROM samples")[0][0])

    def ids(self, experience: int | None = None, probe: bool | None = None, after: int = 0) -> list[str]:
        """Sample ids in insertion order; with ``after`` (a `last_rowid()`), those stored since."""
        where, args = _filters(experience, probe)
        return [
            v[0]
            for v in self._query(
                f"SELECT sample_id FROM samples WHERE rowid > ? AND {where} ORDER BY rowid", [after, *args]
            )
        ]

    def count(self, experience: int | None = None) -> int:
        where, args = _filters(experience, None)
        return self._query(f"SELECT COUNT(*) FROM samples WHERE {where}", args)[0][0]

    def delete(self, sample_ids: Iterable[str]) -> int:
        """Delete rows in one transaction; returns how many existed."""
        with self._transaction() as db:
            before = db.total_changes
            for chunk in _chunks(list(sample_ids)):
                marks = ",".join("?" * len(chunk))
                db.execute(f"DELETE FROM samples WHERE sample_id IN ({marks})", chunk)
            return db.total_changes - before

    def delete_beyond(self, shard: str, size: int) -> int:
        """Delete rows of ``shard`` whose payload does not fit in ``size`` bytes (lost bytes)."""
        with self._transaction() as db:
            return db.execute(
                "DELETE FROM samples WHERE shard = ? AND offset + length > ?", (shard, size)
            ).rowcount

    def move(self, positions: Iterable[tuple[str, str, int]]) -> None:
        """Point samples at new (shard, offset) locations, all in one transaction."""
        with self._transaction() as db:
            db.executemany(
                "UPDATE samples SET shard = ?, offset = ? WHERE sample_id = ?",
                [(shard, offset, sid) for sid, shard, offset in positions],
            )

    def hand_over(self, experience: int, to: int, trained: int) -> dict[str, int]:
        """File an experience's tail under experience ``to``: its last ``trained`` non-probe rows and
        the probe rows stored among them (a drift boundary's samples after the change point), and
        mark the experience's record ``handed_over``, in one transaction. Idempotent: rows already
        under ``to`` count as the experience's (``to`` has no rows of its own yet), so a cut replayed
        after a crash files the tail anew, and rows it no longer covers go back. Returns the rows
        whose experience changed: sample id -> experience now."""
        if trained <= 0:
            return {}
        both = "experience IN (?, ?)"
        with self._transaction() as db:
            first = db.execute(
                f"SELECT rowid FROM samples WHERE {both} AND probe = 0 ORDER BY rowid DESC LIMIT 1 OFFSET ?",
                (experience, to, trained - 1),
            ).fetchone() or db.execute(f"SELECT MIN(rowid) FROM samples WHERE {both}", (experience, to)).fetchone()
            if first[0] is None:
                return {}
            # the tail not yet under `to`, and rows under `to` the tail no longer covers
            moving = "(rowid >= ? AND experience = ?) OR (rowid < ? AND experience = ?)"
            args = (first[0], experience, first[0], to)
            filed = {sid: to if tail else experience for sid, tail in db.execute(
                f"SELECT sample_id, rowid >= ? FROM samples WHERE {moving} ORDER BY rowid", (first[0], *args))}
            db.execute(f"UPDATE samples SET experience = CASE WHEN rowid >= ? THEN ? ELSE ? END WHERE {moving}",
                       (first[0], to, experience, *args))
            db.execute("UPDATE experiences SET info = json_set(info, '$.handed_over', json('true')) WHERE experience = ?",
                       (experience,))
        return filed

    def pending_handovers(self) -> list[tuple[int, int]]:
        """(experience, trained images to hand on) of named experiences whose drift tail was never
        filed under the next one (a crash came between the cut and the indexer's turn), oldest first."""
        return [(exp, int(info["images_after_change"])) for exp, info in sorted(self.experience_names().items())
                if info.get("images_after_change") and not info.get("handed_over")]

    def experiences(self) -> dict[int, int]:
        """Sample count per experience."""
        return dict(self._query("SELECT experience, COUNT(*) FROM samples GROUP BY experience"))

    def experience_bytes(self) -> dict[int, tuple[int, int]]:
        """(count, payload bytes) per experience."""
        return {
            exp: (n, b)
            for exp, n, b in self._query(
                "SELECT experience, COUNT(*), SUM(length) FROM samples GROUP BY experience"
            )
        }

    def domains_by_experience(self) -> dict[int, dict[str, int]]:
        out: dict[int, dict[str, int]] = {}
        for exp, domain, n in self._query(
            "SELECT experience, domain, COUNT(*) FROM samples GROUP BY experience, domain"
        ):
            out.setdefault(exp, {})[domain] = n
        return out

    def name_experience(self, experience: int, name: str, info: dict) -> None:
        """Record a finished experience's name (`exp-7`, or its domain) and what describes it
        (JSON: what ended it, first/last stream offsets, time span); a later call replaces it."""
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO experiences (experience, name, info) VALUES (?,?,?)",
                       (experience, name, json.dumps(info, sort_keys=True)))

    def experience_names(self) -> dict[int, dict]:
        """Every named experience: {experience: {"name": ..., **info}}."""
        return {exp: {"name": name, **json.loads(info)}
                for exp, name, info in self._query("SELECT experience, name, info FROM experiences")}

    def shard_extents(self) -> dict[str, tuple[int, int, int]]:
        """Per shard: (end of its last payload, payload bytes, record count)."""
        return {
            shard: (end, live, n)
            for shard, end, live, n in self._query(
                "SELECT shard, MAX(offset + length), SUM(length), COUNT(*) FROM samples GROUP BY shard"
            )
        }

    def all_ids_with_positions(self) -> list[tuple[str, str, int, int]]:
        """(sample_id, shard, offset, length) of every sample, in insertion order."""
        return self._query("SELECT sample_id, shard, offset, length FROM samples ORDER BY rowid")
