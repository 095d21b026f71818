"""The catalog: a SQLite index of a store, rebuildable from the files at any time.

It holds paths relative to the store's root, so a registry can be copied, moved, synced or mounted
elsewhere. It is a cache: a damaged catalog is set aside and rebuilt from the files with a warning, and
where it cannot be written (a read-only mount, a full disk) an in-memory index built from the files
serves reads instead. Damaged versions and alias files are indexed as problems, by name, so every other
adapter keeps working.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

__all__ = ["Catalog", "NameIndex", "Row"]

SCHEMA_VERSION = 2  # 1: absolute paths (round 1); 2: relative paths + problems
_TABLES = (
    "CREATE TABLE IF NOT EXISTS adapters (name TEXT, version INTEGER, task TEXT, methods TEXT, "
    "base_model TEXT, base_fingerprint TEXT, tags TEXT, created TEXT, relpath TEXT, PRIMARY KEY (name, version))",
    "CREATE TABLE IF NOT EXISTS aliases (name TEXT, alias TEXT, version INTEGER, PRIMARY KEY (name, alias))",
    # version 0: a problem of the name (its aliases.json), else of that version
    "CREATE TABLE IF NOT EXISTS problems (name TEXT, version INTEGER, reason TEXT, PRIMARY KEY (name, version))",
)


@dataclass(frozen=True)
class Row:
    name: str
    version: int
    task: str
    methods: tuple[str, ...]
    base_model: str | None
    base_fingerprint: str | None
    tags: tuple[str, ...]
    created: str
    relpath: str


def _row_values(r: Row) -> tuple[object, ...]:
    """``r`` as one row of the ``adapters`` table (methods and tags joined with commas)."""
    methods, tags = ",".join(r.methods), ",".join(r.tags)
    return (r.name, r.version, r.task, methods, r.base_model, r.base_fingerprint, tags, r.created, r.relpath)


def _row_from_values(values: tuple) -> Row:
    """The inverse of :func:`_row_values`."""
    name, version, task, methods, base_model, fingerprint, tags, created, relpath = values
    return Row(
        name=name,
        version=version,
        task=task,
        methods=tuple(methods.split(",")) if methods else (),
        base_model=base_model,
        base_fingerprint=fingerprint,
        tags=tuple(tags.split(",")) if tags else (),
        created=created,
        relpath=relpath,
    )


@dataclass
class NameIndex:
    """Everything the catalog holds for one name, as read from the files."""

    rows: list[Row] = field(default_factory=list)
    aliases: dict[str, int] = field(default_factory=dict)
    problems: dict[int, str] = field(default_factory=dict)  # version (0: the name itself) -> reason


class Catalog:
    """The index in the SQLite file ``path`` (``None``: in memory only).

    A damaged file is set aside and recreated (with a warning); a file that cannot be written (read-only,
    disk full) is replaced by an in-memory index (``in_memory``; the reason in ``fallback_reason``), which
    the registry fills from the files.
    """

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.memory: sqlite3.Connection | None = None
        self._memory_lock = threading.RLock()
        self.fallback_reason: str | None = None
        if path is None:
            self._use_memory(None)
            return
        try:
            self._open_file(path)
        except sqlite3.OperationalError as e:  # read-only, disk full, locked too long
            self._use_memory(f"the catalog {path} cannot be written ({e})")

    # ------------------------------------------------------------------ opening
    def _open_file(self, path: str) -> None:
        parent = os.path.dirname(path) or "."
        if not os.path.exists(path) and not os.access(parent, os.W_OK):
            raise sqlite3.OperationalError("its folder is read-only")
        if os.path.exists(path) and not os.access(path, os.W_OK):
            raise sqlite3.OperationalError("the file is read-only")
        os.makedirs(parent, exist_ok=True)
        try:
            self._init(self._connect_file())
        except sqlite3.OperationalError:
            raise
        except sqlite3.DatabaseError as e:  # "file is not a database", "disk image is malformed"
            self.set_aside(e)
            self._init(self._connect_file())

    def set_aside(self, error: Exception) -> None:
        """Move a damaged catalog file (and its WAL/journal) aside with a warning; the next open starts an
        empty one, which the registry fills from the files. Nothing is lost: the files are the truth."""
        if self.path is None or self.memory is not None:
            raise error
        aside = f"{self.path}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        for suffix in ("", "-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.path + suffix, aside + suffix)
        warnings.warn(
            f"the registry catalog {self.path} was damaged ({error}); it was moved to {aside} and is rebuilt "
            "from the adapter files (nothing is lost: the files are the truth)",
            stacklevel=4,
        )

    def _connect_file(self) -> sqlite3.Connection:
        if self.path is None:  # unreachable: a catalog without a file is in memory from the start
            raise RuntimeError("this registry catalog has no file (it is in memory)")
        con = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        con.execute("PRAGMA busy_timeout=60000")
        return con

    def _init(self, con: sqlite3.Connection) -> None:
        with contextlib.closing(con):
            if self.memory is None:
                con.execute("PRAGMA journal_mode=WAL")
            (version,) = con.execute("PRAGMA user_version").fetchone()
            (health,) = con.execute("PRAGMA quick_check").fetchone()  # damage past the header, too
            if health != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {health}")
            con.execute("BEGIN IMMEDIATE")
            if version != SCHEMA_VERSION:  # an older index: drop it, it is rebuilt from the files
                for table in ("adapters", "aliases", "problems"):
                    con.execute(f"DROP TABLE IF EXISTS {table}")
            for ddl in _TABLES:
                con.execute(ddl)
            con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            con.execute("COMMIT")

    def _use_memory(self, reason: str | None) -> None:
        self.memory = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        for ddl in _TABLES:
            self.memory.execute(ddl)
        self.fallback_reason = reason
        if reason:
            warnings.warn(
                f"{reason}: serving from an in-memory index of the adapter files instead", stacklevel=4
            )

    @contextlib.contextmanager
    def _con(self) -> Iterator[sqlite3.Connection]:
        if self.memory is not None:
            with self._memory_lock:
                yield self.memory
            return
        con = self._connect_file()
        try:
            yield con
        finally:
            con.close()

    @property
    def in_memory(self) -> bool:
        return self.memory is not None

    # ------------------------------------------------------------------ writing
    def replace(self, index: dict[str, NameIndex], everything: bool = False) -> bool:
        """Make the catalog hold ``index`` for its names (and nothing else if ``everything``), in one
        transaction: readers see the old or the new state. Returns False (and switches to memory) when the
        file cannot be written, e.g. on a full disk; the caller re-indexes then."""
        try:
            self._replace(index, everything)
            return True
        except sqlite3.OperationalError as e:
            if self.memory is not None:
                raise
            self._use_memory(f"the catalog {self.path} cannot be written ({e})")
            return False

    def _replace(self, index: dict[str, NameIndex], everything: bool) -> None:
        with self._con() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                if everything:
                    for table in ("adapters", "aliases", "problems"):
                        con.execute(f"DELETE FROM {table}")
                for name, entry in index.items():
                    if not everything:
                        for table in ("adapters", "aliases", "problems"):
                            con.execute(f"DELETE FROM {table} WHERE name=?", (name,))
                    con.executemany(
                        "INSERT INTO adapters VALUES (?,?,?,?,?,?,?,?,?)", map(_row_values, entry.rows)
                    )
                    con.executemany(
                        "INSERT INTO aliases VALUES (?,?,?)", [(name, a, v) for a, v in entry.aliases.items()]
                    )
                    con.executemany(
                        "INSERT INTO problems VALUES (?,?,?)",
                        [(name, v, r) for v, r in entry.problems.items()],
                    )
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise

    def drop_names(self, names: Iterable[str]) -> None:
        self.replace({n: NameIndex() for n in names})

    # ------------------------------------------------------------------ reading
    def known_versions(self, name: str) -> set[int]:
        """Versions indexed for ``name``, damaged ones included."""
        with self._con() as con:
            rows = con.execute("SELECT version FROM adapters WHERE name=?", (name,)).fetchall()
            rows += con.execute("SELECT version FROM problems WHERE name=? AND version>0", (name,)).fetchall()
        return {v for (v,) in rows}

    def names(self) -> list[str]:
        with self._con() as con:
            rows = con.execute("SELECT DISTINCT name FROM adapters UNION SELECT DISTINCT name FROM problems")
            return sorted(n for (n,) in rows.fetchall())

    def rows(self, name: str | None = None) -> list[Row]:
        query = "SELECT * FROM adapters" + (" WHERE name=?" if name else "") + " ORDER BY name, version"
        with self._con() as con:
            found = con.execute(query, (name,) if name else ()).fetchall()
        return [_row_from_values(values) for values in found]

    def aliases(self, name: str) -> dict[str, int]:
        with self._con() as con:
            return dict(con.execute("SELECT alias, version FROM aliases WHERE name=?", (name,)).fetchall())

    def problems(self, name: str | None = None) -> dict[tuple[str, int], str]:
        query = "SELECT name, version, reason FROM problems" + (" WHERE name=?" if name else "")
        with self._con() as con:
            found = con.execute(query + " ORDER BY name, version", (name,) if name else ()).fetchall()
        return {(n, v): r for n, v, r in found}
