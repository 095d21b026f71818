"""AdapterRegistry: versioned, verified adapter folders in a local folder or any fsspec store.

Store layout (the files are the source of truth):
  <root>/adapters/<name>/<version>/   one adapter folder (see io.py) + registry.json (tags, publish time)
  <root>/adapters/<name>/aliases.json {"prod": 2, ...}  ("latest" is implicit: the highest version)
  <root>/staging/<uuid>/              publishes in progress (never visible)
  <root>/trash/<uuid>/                removals in progress (never visible)
The SQLite catalog (WAL) only indexes the files: ``rebuild()`` recreates it, and every registry adds
versions whose files exist but whose catalog row is missing (a writer killed after the rename).

Publishing stages and verifies the files first, then, under an exclusive lock, picks the next version
and makes it visible with one rename. The lock is an ``flock`` on ``<root>/.lock`` for local stores
(released by the OS if the writer dies) and a process lock for other fsspec stores, which assume one
writing process per store.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec

from .config import validate_name
from .io import CARD, AdapterFileError, check_files, read_card, save_adapter, verify_files

__all__ = ["AdapterRecord", "AdapterRegistry", "RegistryError", "default_root"]

_REF = re.compile(r"^(?P<name>[^@]+)(?:@(?P<tag>[^@]+))?$")
_THREAD_LOCKS: dict[str, threading.Lock] = {}


class RegistryError(KeyError):
    """A name, version or alias the registry cannot resolve, or an invalid reference."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


def default_root() -> str:
    """``$ADAPTERS_MTL_REGISTRY``, else ``~/.cache/adapters_mtl/registry``."""
    return os.environ.get("ADAPTERS_MTL_REGISTRY") or os.path.join(
        os.path.expanduser("~"), ".cache", "adapters_mtl", "registry"
    )


@dataclass(frozen=True)
class AdapterRecord:
    """One published adapter version, as the catalog knows it."""

    name: str
    version: int
    task: str
    methods: tuple[str, ...]
    base_model: str | None
    base_fingerprint: str | None
    tags: tuple[str, ...]
    created: str
    path: str

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


class AdapterRegistry:
    """Publish, version, resolve, verify and remove adapters.

    Args:
        root: a local folder or an fsspec URL (``memory://reg``, ``s3://bucket/reg``); default
            :func:`default_root`.
        catalog: path of the SQLite catalog (default ``<root>/catalog.sqlite`` for local roots, else a
            file under the user cache keyed by the URL).
    """

    def __init__(
        self, root: str | os.PathLike | None = None, catalog: str | os.PathLike | None = None
    ) -> None:
        url = str(root or default_root())
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.root = self.root.rstrip("/")
        self.local = "file" in (
            self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        )
        self.url = url
        self.fs.makedirs(self._p("adapters"), exist_ok=True)
        if catalog is None:
            if self.local:
                catalog = os.path.join(self.root, "catalog.sqlite")
            else:
                key = re.sub(r"[^A-Za-z0-9]+", "_", url)[-100:]
                catalog = os.path.join(
                    os.path.expanduser("~"), ".cache", "adapters_mtl", "catalogs", key + ".sqlite"
                )
        self.catalog_path = str(catalog)
        Path(self.catalog_path).parent.mkdir(parents=True, exist_ok=True)
        self._init_catalog()
        self._sync()

    # ------------------------------------------------------------------ paths and locks
    def _p(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        lock = _THREAD_LOCKS.setdefault(self.url, threading.Lock())
        with lock:
            if not self.local:
                yield
                return
            import fcntl

            with open(self._p(".lock"), "a+") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)

    def _db(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.catalog_path, timeout=60, isolation_level=None)
        con.execute("PRAGMA busy_timeout=60000")
        return con

    def _init_catalog(self) -> None:
        with contextlib.closing(self._db()) as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute(
                "CREATE TABLE IF NOT EXISTS adapters (name TEXT, version INTEGER, task TEXT, methods TEXT, "
                "base_model TEXT, base_fingerprint TEXT, tags TEXT, created TEXT, path TEXT, "
                "PRIMARY KEY (name, version))"
            )
            con.execute(
                "CREATE TABLE IF NOT EXISTS aliases (name TEXT, alias TEXT, version INTEGER, PRIMARY KEY (name, alias))"
            )

    # ------------------------------------------------------------------ files -> catalog
    def _versions_on_disk(self, name: str) -> list[int]:
        folder = self._p("adapters", name)
        if not self.fs.exists(folder):
            return []
        out = []
        for entry in self.fs.ls(folder, detail=False):
            last = entry.rstrip("/").rsplit("/", 1)[-1]
            if last.isdigit() and self.fs.exists(f"{entry.rstrip('/')}/{CARD}"):
                out.append(int(last))
        return sorted(out)

    def _names_on_disk(self) -> list[str]:
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in self.fs.ls(self._p("adapters"), detail=False))

    def _record_from_files(self, name: str, version: int) -> tuple:
        base = self._p("adapters", name, str(version))
        card = json.loads(self.fs.cat_file(f"{base}/{CARD}"))
        meta_path = f"{base}/registry.json"
        meta = json.loads(self.fs.cat_file(meta_path)) if self.fs.exists(meta_path) else {}
        return (
            name, version, card.get("task") or name, ",".join(card.get("methods", [])), card.get("base_model"),
            card.get("base_fingerprint"), ",".join(meta.get("tags", [])), meta.get("published", card.get("created", "")),
            base,
        )  # fmt: skip

    def _aliases_on_disk(self, name: str) -> dict[str, int]:
        path = self._p("adapters", name, "aliases.json")
        return json.loads(self.fs.cat_file(path)) if self.fs.exists(path) else {}

    def _sync(self, names: list[str] | None = None, full: bool = False) -> None:
        """Make the catalog match the files for ``names`` (all when None)."""
        with contextlib.closing(self._db()) as con:
            con.execute("BEGIN IMMEDIATE")
            for name in names if names is not None else self._names_on_disk():
                disk = set(self._versions_on_disk(name))
                known = {v for (v,) in con.execute("SELECT version FROM adapters WHERE name=?", (name,))}
                for v in known - disk:
                    con.execute("DELETE FROM adapters WHERE name=? AND version=?", (name, v))
                for v in sorted(disk - known if not full else disk):
                    con.execute(
                        "INSERT OR REPLACE INTO adapters VALUES (?,?,?,?,?,?,?,?,?)",
                        self._record_from_files(name, v),
                    )
                con.execute("DELETE FROM aliases WHERE name=?", (name,))
                for alias, v in self._aliases_on_disk(name).items():
                    con.execute("INSERT INTO aliases VALUES (?,?,?)", (name, alias, v))
            if names is None:
                on_disk = set(self._names_on_disk())
                for (name,) in con.execute("SELECT DISTINCT name FROM adapters").fetchall():
                    if name not in on_disk:
                        con.execute("DELETE FROM adapters WHERE name=?", (name,))
                        con.execute("DELETE FROM aliases WHERE name=?", (name,))
            con.execute("COMMIT")

    def rebuild(self) -> int:
        """Recreate the catalog from the files (and drop leftovers of killed writers). Returns the version count."""
        for leftover in ("staging", "trash"):
            if self.fs.exists(self._p(leftover)):
                with self._lock():
                    self.fs.rm(self._p(leftover), recursive=True)
        with contextlib.closing(self._db()) as con:
            con.execute("DELETE FROM adapters")
            con.execute("DELETE FROM aliases")
        self._sync(full=True)
        return len(self.list())

    # ------------------------------------------------------------------ publish
    def publish(
        self,
        source,
        name: str | None = None,
        *,
        adapter: str | None = None,
        tags: list[str] | tuple[str, ...] = (),
        aliases: list[str] | tuple[str, ...] = (),
        **card_fields,
    ) -> str:
        """Publish an adapter folder, or ``adapter`` of an ``AdapterModel``, as the next version of ``name``.

        Args:
            source: an adapter folder (ours or PEFT's) or an :class:`~adapters_mtl.AdapterModel`.
            name: registry name (default: the adapter's / card's name).
            adapter: with a model as ``source``: which adapter to publish.
            tags: free-form labels for :meth:`list`.
            aliases: aliases to point at the new version (e.g. ``["prod"]``).
            card_fields: ``task``, ``metrics``, ``recipe``, ``description`` (model sources only).

        Returns:
            ``"name@version"``.

        Raises:
            ValueError: invalid name/alias/tag. AdapterFileError: the folder fails verification.
        """
        from .model import AdapterModel

        with tempfile.TemporaryDirectory(prefix="amtl-publish-") as tmp:
            if isinstance(source, AdapterModel):
                if adapter is None:
                    raise ValueError("publishing from a model needs adapter=<name of the adapter to publish>")
                folder = save_adapter(source, adapter, Path(tmp) / "a", **card_fields)
                name = name or adapter
            else:
                folder = Path(source)
                card = read_card(folder)
                if card is None:
                    raise AdapterFileError(
                        f"{folder} has no adapter card; import a plain PEFT folder with import_peft(model, folder, name)"
                    )
                verify_files(folder, card)
                name = name or card.get("name")
            validate_name(name)
            for alias in aliases:
                self._check_alias(alias)
            for tag in tags:
                validate_name(tag, "tag")
            return self._commit(folder, name, tuple(tags), tuple(aliases))

    def import_peft(self, model, folder, name: str, **kw) -> str:
        """Load a plain PEFT folder into ``model`` (all checks of ``load_adapter``), then publish it."""
        from .io import load_adapter

        load_adapter(model, folder, name=name)
        try:
            return self.publish(model, name, adapter=name, **kw)
        finally:
            model.remove_adapter(name)

    def _commit(self, folder: Path, name: str, tags: tuple[str, ...], aliases: tuple[str, ...]) -> str:
        import datetime

        stage = self._p("staging", uuid.uuid4().hex)
        self.fs.makedirs(stage, exist_ok=True)
        try:
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                rel = path.relative_to(folder).as_posix()
                self.fs.makedirs(f"{stage}/{rel}".rsplit("/", 1)[0], exist_ok=True)
                self.fs.put_file(str(path), f"{stage}/{rel}")
            published = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            self.fs.pipe_file(
                f"{stage}/registry.json", json.dumps({"tags": list(tags), "published": published}).encode()
            )
            self._verify_store_folder(stage)
            _crash_point("staged")
            with self._lock():
                version = max(self._versions_on_disk(name), default=0) + 1
                target = self._p("adapters", name, str(version))
                self.fs.makedirs(self._p("adapters", name), exist_ok=True)
                self.fs.mv(stage, target, recursive=True)  # the one step that makes it visible
                _crash_point("visible")
                if aliases:
                    current = self._aliases_on_disk(name)
                    current.update(dict.fromkeys(aliases, version))
                    self._write_aliases(name, current)
                self._sync([name])
        except BaseException:
            if self.fs.exists(stage):
                self.fs.rm(stage, recursive=True)
            raise
        return f"{name}@{version}"

    def _write_aliases(self, name: str, aliases: dict[str, int]) -> None:
        path = self._p("adapters", name, "aliases.json")
        data = json.dumps(aliases, sort_keys=True).encode()
        if self.local:  # atomic replace
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def _check_alias(self, alias: str) -> None:
        validate_name(alias, "alias")
        if alias == "latest" or alias.isdigit():
            raise ValueError(f"alias {alias!r} is reserved: 'latest' and numbers always mean versions")

    # ------------------------------------------------------------------ read
    def resolve(self, ref: str) -> AdapterRecord:
        """``"name"`` / ``"name@latest"`` (highest version), ``"name@3"``, ``"name@prod"`` → its record.

        Raises:
            RegistryError: unknown name, version or alias, listing what exists.
        """
        m = _REF.match(ref or "")
        if not m:
            raise RegistryError(
                f"invalid adapter reference {ref!r}: expected 'name', 'name@3' or 'name@alias'"
            )
        name, tag = m["name"], m["tag"] or "latest"
        validate_name(name)
        self._sync([name])
        with contextlib.closing(self._db()) as con:
            versions = [
                v
                for (v,) in con.execute("SELECT version FROM adapters WHERE name=? ORDER BY version", (name,))
            ]
            if not versions:
                names = [n for (n,) in con.execute("SELECT DISTINCT name FROM adapters ORDER BY name")]
                raise RegistryError(
                    f"no adapter named {name!r} in {self.url}; published names: {names or 'none'}"
                )
            if tag == "latest":
                version = versions[-1]
            elif tag.isdigit():
                version = int(tag)
                if version not in versions:
                    raise RegistryError(f"{name!r} has no version {version}; versions: {versions}")
            else:
                row = con.execute(
                    "SELECT version FROM aliases WHERE name=? AND alias=?", (name, tag)
                ).fetchone()
                if row is None:
                    known = [a for (a,) in con.execute("SELECT alias FROM aliases WHERE name=?", (name,))]
                    raise RegistryError(f"{name!r} has no alias {tag!r}; aliases: {known + ['latest']}")
                version = row[0]
        return self._get(name, version)

    def _get(self, name: str, version: int) -> AdapterRecord:
        with contextlib.closing(self._db()) as con:
            row = con.execute("SELECT * FROM adapters WHERE name=? AND version=?", (name, version)).fetchone()
        if row is None:
            raise RegistryError(f"{name}@{version} is not in the catalog")
        n, v, task, methods, base, fp, tags, created, path = row
        return AdapterRecord(n, v, task, tuple(methods.split(",")) if methods else (), base, fp,
                             tuple(tags.split(",")) if tags else (), created, path)  # fmt: skip

    def list(
        self,
        *,
        task: str | None = None,
        base: str | None = None,
        method: str | None = None,
        tag: str | None = None,
    ) -> list[AdapterRecord]:
        """Every published version matching all given filters, by name then version."""
        with contextlib.closing(self._db()) as con:
            rows = con.execute("SELECT name, version FROM adapters ORDER BY name, version").fetchall()
        out = [self._get(n, v) for n, v in rows]
        return [
            r for r in out
            if (task is None or r.task == task) and (base is None or base in (r.base_model, r.base_fingerprint))
            and (method is None or method in r.methods) and (tag is None or tag in r.tags)
        ]  # fmt: skip

    def aliases(self, name: str) -> dict[str, int]:
        with contextlib.closing(self._db()) as con:
            return dict(con.execute("SELECT alias, version FROM aliases WHERE name=?", (name,)).fetchall())

    def show(self, ref: str) -> dict:
        """The card of ``ref`` plus its registry record and aliases."""
        rec = self.resolve(ref)
        card = json.loads(self.fs.cat_file(f"{rec.path}/{CARD}"))
        return {"ref": rec.ref, "tags": list(rec.tags), "published": rec.created,
                "aliases": [a for a, v in self.aliases(rec.name).items() if v == rec.version], "card": card}  # fmt: skip

    def set_alias(self, ref: str, alias: str) -> None:
        """Point ``alias`` of ``ref``'s name at ``ref``'s version."""
        self._check_alias(alias)
        rec = self.resolve(ref)
        with self._lock():
            current = self._aliases_on_disk(rec.name)
            current[alias] = rec.version
            self._write_aliases(rec.name, current)
            self._sync([rec.name])

    # ------------------------------------------------------------------ verify / fetch / remove
    def _verify_store_folder(self, folder: str) -> None:
        card = json.loads(self.fs.cat_file(f"{folder}/{CARD}"))
        present = [p[len(folder) + 1 :] for p in self.fs.glob(f"{folder}/**/*.safetensors")]

        def read(rel: str) -> bytes | None:
            path = f"{folder}/{rel}"
            return self.fs.cat_file(path) if self.fs.exists(path) else None

        check_files(card, read, present, folder)

    def verify(self, ref: str | None = None) -> dict[str, str]:
        """Check the checksums of ``ref`` (or every version): ``{"name@v": "ok" | problem}``."""
        records = [self.resolve(ref)] if ref else self.list()
        report = {}
        for rec in records:
            try:
                self._verify_store_folder(rec.path)
                report[rec.ref] = "ok"
            except (AdapterFileError, OSError, ValueError) as e:
                report[rec.ref] = str(e)
        return report

    def fetch(self, ref: str) -> Path:
        """A local folder holding ``ref``'s files, verified (remote stores are copied to a temp cache)."""
        rec = self.resolve(ref)
        self._verify_store_folder(rec.path)
        if self.local:
            return Path(rec.path)
        cache = Path(tempfile.mkdtemp(prefix=f"amtl-{rec.name}-{rec.version}-"))
        self.fs.get(rec.path.rstrip("/") + "/", str(cache), recursive=True)
        return cache

    def load(self, model, ref: str, name: str | None = None) -> str:
        """Attach ``ref`` to ``model`` (verified, base checked); returns the adapter name (default: the ref's name)."""
        from .io import load_adapter

        rec = self.resolve(ref)
        # load_adapter verifies every checksum itself; remote stores are copied (and verified) first
        folder = Path(rec.path) if self.local else self.fetch(rec.ref)
        return load_adapter(model, folder, name=name or rec.name)

    def remove(self, ref: str) -> None:
        """Remove one version (``name@v``), hidden in one step, then deleted; aliases to it are dropped."""
        rec = self.resolve(ref)
        with self._lock():
            trash = self._p("trash", uuid.uuid4().hex)
            self.fs.makedirs(self._p("trash"), exist_ok=True)
            self.fs.mv(rec.path, trash, recursive=True)
            current = {a: v for a, v in self._aliases_on_disk(rec.name).items() if v != rec.version}
            if self.fs.exists(self._p("adapters", rec.name, "aliases.json")):
                self._write_aliases(rec.name, current)
            self._sync([rec.name])
            self.fs.rm(trash, recursive=True)


def _crash_point(where: str) -> None:
    # Lets the crash tests kill a publishing process at a precise step (ADAPTERS_MTL_CRASH_AT=staged|visible).
    if os.environ.get("ADAPTERS_MTL_CRASH_AT") == where:
        os._exit(17)
