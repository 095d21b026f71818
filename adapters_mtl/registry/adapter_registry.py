"""AdapterRegistry: versioned, verified adapter folders in a local folder or any fsspec store.

Two parts with one job each: the :class:`~adapters_mtl.registry.store.Store` (the files: the truth, the
lock, atomic publish, never-reused version numbers) and the :class:`~adapters_mtl.registry.catalog.Catalog`
(a rebuildable SQLite index of the files with root-relative paths). This class joins them: it validates
what is published exactly as loading does (so the registry never holds a version that cannot be loaded),
keeps the catalog in step with the files, and resolves ``name@version|alias`` references.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import re
import sqlite3
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..core.config import validate_name
from ..files.folder import CARD, AdapterFileError, read_adapter, read_regular, save_adapter
from .catalog import Catalog, NameIndex, Row
from .store import REGISTRY_META, Store, StoreError

if TYPE_CHECKING:
    from ..model import AdapterModel

__all__ = ["AdapterRecord", "AdapterRegistry", "RegistryError", "default_root"]

_REF = re.compile(r"^(?P<name>[^@]+)(?:@(?P<tag>[^@]+))?$")
_T = TypeVar("_T")

# One catalog sync at a time per registry in this process: a sync scans the files, then writes the index,
# and a sync whose scan predates a remove must not write after the remover's own sync (the catalog would
# list the removed version again). Re-entrant: a full sync syncs names.
_SYNC_LOCKS: dict[str, threading.RLock] = {}
_SYNC_LOCKS_GUARD = threading.Lock()
# A name's folder listing is trusted from memory only when its timestamps are at least this old: a change
# in the same clock tick as the last look leaves them unchanged (coarse kernel clocks tick every few ms;
# FAT and HFS+ store 1-2 s), so a recent folder is always listed again (git's "racily clean" rule).
SETTLED_NS = 2_000_000_000


def _sync_lock(url: str) -> threading.RLock:
    with _SYNC_LOCKS_GUARD:
        return _SYNC_LOCKS.setdefault(url, threading.RLock())


class RegistryError(KeyError):
    """A name, version or alias the registry cannot resolve, an invalid reference, or a store that cannot
    do what was asked (read-only, damaged files)."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


def default_root() -> str:
    """``$ADAPTERS_MTL_REGISTRY``, else ``~/.cache/adapters_mtl/registry``."""
    return os.environ.get("ADAPTERS_MTL_REGISTRY") or os.path.join(
        os.path.expanduser("~"), ".cache", "adapters_mtl", "registry"
    )


@dataclass(frozen=True)
class AdapterRecord(Row):
    """One published adapter version, as the catalog knows it (``relpath``: its folder relative to the
    registry root; ``path``: that folder in this store)."""

    path: str = ""

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def _text(value: object, default: str = "") -> str:
    return value if isinstance(value, str) else default


class AdapterRegistry:
    """Publish, version, resolve, verify and remove adapters.

    Args:
        root: a local folder or an fsspec URL (``memory://reg``, ``s3://bucket/reg``); default
            :func:`default_root`.
        catalog: path of the SQLite catalog (default ``<root>/catalog.sqlite`` for local roots, else a
            file under the user cache keyed by the URL).
        single_writer: allow publishing to a store that has no conditional create (you guarantee one
            writing process); local folders, S3 and ``memory://`` need no such promise.
        storage_options: fsspec options of the store (credentials, ``client_kwargs``); S3 also reads
            the usual ``AWS_*`` environment variables (``AWS_ENDPOINT_URL`` for MinIO and the like).

    Guarantees (tested): a published version is complete and loadable or not visible at all; version
    numbers are never reused; a damaged version or alias file is reported by name and every other adapter
    keeps working; a copied or moved registry serves its own files; a read-only root serves list, show,
    verify, fetch and load. Safe to use from several threads and processes at once.
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        catalog: str | os.PathLike | None = None,
        *,
        single_writer: bool = False,
        storage_options: dict | None = None,
    ) -> None:
        self.url = str(root or default_root())
        self.store = Store(self.url, single_writer=single_writer, storage_options=storage_options)
        self.fs, self.root, self.local = self.store.fs, self.store.root, self.store.local
        if catalog is None:
            if self.local:
                catalog = os.path.join(self.root, "catalog.sqlite")
            else:
                readable = re.sub(r"[^A-Za-z0-9]+", "_", self.url)[-60:]
                digest = hashlib.sha256(self.url.encode()).hexdigest()[:16]  # one catalog per exact URL
                catalog = os.path.join(
                    os.path.expanduser("~"),
                    ".cache",
                    "adapters_mtl",
                    "catalogs",
                    f"{readable}-{digest}.sqlite",
                )
        self.catalog_path = str(catalog)
        self.catalog = Catalog(self.catalog_path)
        # {name: (what its files looked like, (rows, aliases, problems) read then)}: see _name_state
        self._seen: dict[str, tuple[tuple, tuple[list[Row], dict[str, int], dict[int, str]]]] = {}
        self._catalog_retry(self._sync_all)

    # ------------------------------------------------------------------ files -> catalog
    def _index_name(self, name: str, known: dict[int, Row]) -> NameIndex:
        """What the files say about ``name`` (versions already indexed are not read again)."""
        index = NameIndex()
        for version in self.store.versions(name):
            if version in known:
                index.rows.append(known[version])
                continue
            rel = self.store.version_rel(name, version)
            try:
                files = self.store.read_version(name, version)
            except (ValueError, OSError) as e:
                index.problems[version] = f"{name}@{version} is damaged: {e}"
                continue
            card, meta = files.card, files.meta
            tags = meta.get("tags")
            index.rows.append(
                Row(
                    name=name,
                    version=version,
                    task=_text(card.get("task"), name),
                    methods=tuple(card.get("methods") or ()),
                    base_model=card.get("base_model"),
                    base_fingerprint=card.get("base_fingerprint"),
                    tags=tuple(str(t) for t in tags) if isinstance(tags, list) else (),
                    created=_text(meta.get("published"), _text(card.get("created"))),
                    relpath=rel,
                )
            )
        try:
            index.aliases = self.store.aliases(name)
        except (ValueError, OSError) as e:
            index.problems[0] = f"the aliases of {name!r} are unreadable: {e}"
        return index

    def _sync(self, names: list[str]) -> None:
        """Bring the catalog in step with the files for ``names`` (scan and write as one step)."""
        with _sync_lock(self.store.url):
            self._sync_unlocked(names)

    def _sync_unlocked(self, names: list[str]) -> None:
        for name in names:
            self._seen.pop(name, None)
        self.store.refresh()
        changed = {}
        for name in names:
            rows = self.catalog.rows(name)
            index = self._index_name(name, {r.version: r for r in rows if r.relpath})
            old = self.catalog.problems(name)
            if (
                rows != index.rows
                or self.catalog.aliases(name) != index.aliases
                or {v: r for (_, v), r in old.items()} != index.problems
            ):
                changed[name] = index
        if changed and not self.catalog.replace(changed):
            self._sync_all()  # the file could not be written: the in-memory index is filled instead

    def _sync_all(self, rebuild: bool = False) -> int:
        with _sync_lock(self.store.url):
            return self._sync_all_unlocked(rebuild)

    def _sync_all_unlocked(self, rebuild: bool) -> int:
        self.store.refresh()
        on_disk, skipped = self.store.names()
        for folder, why in skipped.items():
            warnings.warn(f"{self.store.path('adapters', folder)} is skipped: {why}", stacklevel=3)
        if rebuild or self.catalog.in_memory:
            index = {name: self._index_name(name, {}) for name in on_disk}
            if not self.catalog.replace(index, everything=True):
                self.catalog.replace(index, everything=True)  # now in memory
            return sum(len(i.rows) for i in index.values())
        self._sync(on_disk)
        gone = set(self.catalog.names()) - set(on_disk)
        if gone:
            self.catalog.drop_names(gone)
        return len(self.catalog.rows())

    def rebuild(self) -> int:
        """Re-index every version from the files in one transaction (readers see the old or the new
        index, never an empty one), under the publish lock, and drop the leftovers of killed writers.
        A damaged version is reported (see :meth:`problems`), not fatal. Returns the number of versions."""
        if not self.store.writable:
            return self._sync_all(rebuild=True)
        with self.store.lock():
            self.store.clean_leftovers()
            return self._sync_all(rebuild=True)

    def problems(self) -> dict[str, str]:
        """Damaged versions and alias files: ``{"name@version" or "name": what is wrong}``."""
        return {(f"{n}@{v}" if v else n): reason for (n, v), reason in self.catalog.problems().items()}

    # ------------------------------------------------------------------ publish
    def publish(
        self,
        source: str | os.PathLike[str] | AdapterModel,
        name: str | None = None,
        *,
        adapter: str | None = None,
        tags: list[str] | tuple[str, ...] = (),
        aliases: list[str] | tuple[str, ...] = (),
        **card_fields: Any,
    ) -> str:
        """Publish an adapter folder, or ``adapter`` of an ``AdapterModel``, as the next version of ``name``.

        The folder is checked exactly as loading checks it (:func:`adapters_mtl.files.folder.read_adapter`: card,
        checksums, configs, every tensor header, dtypes, finite values, head) and only the files its card
        lists are copied — never a symlink, a path outside the folder or a pickle.

        Args:
            source: an adapter folder (ours; a plain PEFT folder goes through :meth:`import_peft`) or an
                :class:`~adapters_mtl.AdapterModel`.
            name: registry name (default: the adapter's / card's name).
            adapter: with a model as ``source``: which adapter to publish.
            tags: free-form labels for :meth:`list`.
            aliases: aliases to point at the new version (e.g. ``["prod"]``).
            card_fields: ``task``, ``metrics``, ``recipe``, ``description`` (model sources only).

        Returns:
            ``"name@version"``: the version is visible, complete and loadable. On an exception nothing is
            visible.

        Raises:
            ValueError: invalid name/alias/tag. AdapterFileError: the folder fails validation.
            RegistryError: the store cannot be written.
        """
        from ..model import AdapterModel

        for alias in aliases:
            self._check_alias(alias)
        for tag in tags:
            validate_name(tag, "tag")
        if name is not None:
            validate_name(name)
        with tempfile.TemporaryDirectory(prefix="amtl-publish-") as tmp:
            if isinstance(source, AdapterModel):
                if adapter is None:
                    raise ValueError("publishing from a model needs adapter=<name of the adapter to publish>")
                source = save_adapter(source, adapter, Path(tmp) / "a", **card_fields)
                name = name or adapter
            elif card_fields:
                raise TypeError(f"card fields {sorted(card_fields)} can only be given with a model as source")
            folder = read_adapter(source)
            if folder.card is None:
                raise AdapterFileError(
                    f"{source} has no adapter card (a plain PEFT folder?): import it with "
                    "`adapters-mtl registry import-peft` or AdapterRegistry.import_peft(model, folder, name), "
                    "which checks it against its base model first"
                )
            name = validate_name(name or folder.name)
            self._warn_ignored(folder.root, set(folder.files))
            files = dict(folder.files)  # exactly the bytes read_adapter checked, the card included
            try:
                readme = read_regular(folder.root, "README.md", limit=1 << 20)
            except AdapterFileError:
                readme = None  # text for people, never parsed: a link or an odd file is just left out
            if readme is not None:
                files["README.md"] = readme
            published = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            files[REGISTRY_META] = json.dumps({"tags": list(tags), "published": published}).encode()
            try:
                version = self.store.publish(name, files, tuple(aliases))
            except StoreError as e:
                raise RegistryError(str(e)) from e
        try:
            self._sync([name])
        except (sqlite3.Error, OSError) as e:  # the version is published; the index catches up later
            warnings.warn(
                f"{name}@{version} is published but the catalog was not updated ({e})", stacklevel=2
            )
        return f"{name}@{version}"

    @staticmethod
    def _warn_ignored(root: Path, listed: set[str]) -> None:
        extra = sorted(
            p.relative_to(root).as_posix()
            for p in root.rglob("*")
            if (p.is_file() or p.is_symlink())
            and p.relative_to(root).as_posix() not in listed | {CARD, "README.md"}
        )
        if extra:
            warnings.warn(
                f"{root}: {extra[:10]} are not listed in the adapter card and are not published", stacklevel=3
            )

    def import_peft(self, model: AdapterModel, folder: str | os.PathLike[str], name: str, **kw: Any) -> str:
        """Load a plain PEFT folder into ``model`` (all checks of ``load_adapter``), then publish it."""
        from ..files.folder import load_adapter

        load_adapter(model, folder, name=name)
        try:
            return self.publish(model, name, adapter=name, **kw)
        finally:
            model.remove_adapter(name)

    def _check_alias(self, alias: str) -> None:
        validate_name(alias, "alias")
        if alias == "latest" or alias.isdigit():
            raise ValueError(f"alias {alias!r} is reserved: 'latest' and numbers always mean versions")

    # ------------------------------------------------------------------ read
    def _catalog_retry(self, fn: Callable[[], _T]) -> _T:
        """Run a catalog read; a catalog damaged since it was opened is set aside, rebuilt, and read again."""
        try:
            return fn()
        except sqlite3.OperationalError:
            raise
        except sqlite3.DatabaseError as e:
            self.catalog.set_aside(e)
            self.catalog = Catalog(self.catalog_path)
            self._sync_all()
            return fn()

    def resolve(self, ref: str) -> AdapterRecord:
        """``"name"`` / ``"name@latest"`` (highest version), ``"name@3"``, ``"name@prod"`` → its record.

        Raises:
            RegistryError: an invalid reference, an unknown name, version or alias (listing what exists),
                or a damaged version (saying what is wrong with it).
        """
        m = _REF.match(ref) if isinstance(ref, str) else None
        if not m:
            raise RegistryError(
                f"invalid adapter reference {ref!r}: expected 'name', 'name@3' or 'name@alias'"
            )
        name, tag = m["name"], m["tag"] or "latest"
        validate_name(name)
        if not (tag.isascii() and tag.isdigit()) and tag != "latest":
            try:
                validate_name(tag, "alias")
            except ValueError as e:
                raise RegistryError(f"invalid adapter reference {ref!r}: {e}") from e
        return self._catalog_retry(lambda: self._resolve(name, tag))

    def _files_look(self, name: str) -> tuple | None:
        """What ``name``'s files look like without reading them, for a local store: the inode and times of
        its folder (publishing and removing a version rename an entry in it; writing aliases.json renames
        one too) and of ``aliases.json`` (edited in place too). None when that cannot prove they are
        unchanged: a remote store, a missing folder, or timestamps younger than :data:`SETTLED_NS`."""
        if not self.local:
            return None
        now = time.time_ns()
        looks: list[tuple[int, ...]] = []
        for path in (self.store.path("adapters", name), self.store.path("adapters", name, "aliases.json")):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                if not looks:
                    return None
                looks.append(())
                continue
            except OSError:
                return None
            if max(st.st_mtime_ns, st.st_ctime_ns) > now - SETTLED_NS:
                return None
            looks.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        return tuple(looks)

    def _name_state(self, name: str) -> tuple[list[Row], dict[str, int], dict[int, str]]:
        """``name``'s rows, aliases and problems, the catalog brought in step with the files first.

        A local name whose files look as they did at the last sync (:meth:`_files_look`) is answered
        from memory: no listing, no SQLite (2-3 ms per resolve otherwise, as long as reading the adapter
        itself). What is loaded is still checked whole (card, sha256 of every file) by :meth:`load`.
        """
        look = self._files_look(name)
        seen = self._seen.get(name)
        if look is not None and seen is not None and seen[0] == look:
            return seen[1]
        self._sync([name])
        state = (
            self.catalog.rows(name),
            self.catalog.aliases(name),
            {v: r for (_, v), r in self.catalog.problems(name).items()},
        )
        if look is not None:  # looked at before the sync: a change during it shows as a new look
            self._seen[name] = (look, state)
        return state

    def _resolve(self, name: str, tag: str) -> AdapterRecord:
        found, aliases, problems = self._name_state(name)
        rows = {r.version: r for r in found}
        versions = sorted(rows)
        if not versions and not problems:
            names = sorted({r.name for r in self.catalog.rows()})
            raise RegistryError(
                f"no adapter named {name!r} in {self.url}; published names: {names or 'none'}"
            )
        if tag == "latest":
            if not versions:
                raise RegistryError(f"every version of {name!r} is damaged: {sorted(problems.values())}")
            version = versions[-1]
        elif tag.isascii() and tag.isdigit():
            version = int(tag)
        else:
            if tag not in aliases:
                if 0 in problems:
                    raise RegistryError(f"cannot resolve {name}@{tag}: {problems[0]}")
                raise RegistryError(f"{name!r} has no alias {tag!r}; aliases: {sorted(aliases) + ['latest']}")
            version = aliases[tag]
        if version in problems:
            raise RegistryError(
                f"{problems[version]}. Other versions of {name!r}: {versions or 'none'}; remove the damaged "
                f"one with `adapters-mtl registry remove {name}@{version}`"
            )
        if version not in rows:
            raise RegistryError(f"{name!r} has no version {version}; versions: {versions}")
        return self._record(rows[version])

    def _record(self, row: Row) -> AdapterRecord:
        fields = {f.name: getattr(row, f.name) for f in dataclasses.fields(row)}  # flat: asdict deep-copies
        return AdapterRecord(**fields, path=self.store.path(row.relpath))

    def list(
        self,
        *,
        task: str | None = None,
        base: str | None = None,
        method: str | None = None,
        tag: str | None = None,
    ) -> list[AdapterRecord]:
        """Every published, readable version matching all given filters, by name then version (damaged
        versions are left out: see :meth:`problems`)."""
        self._catalog_retry(self._sync_all)  # other processes and machines may have written
        out = [self._record(r) for r in self._catalog_retry(self.catalog.rows)]
        return [
            r
            for r in out
            if (task is None or r.task == task)
            and (base is None or base in (r.base_model, r.base_fingerprint))
            and (method is None or method in r.methods)
            and (tag is None or tag in r.tags)
        ]

    def aliases(self, name: str) -> dict[str, int]:
        return self._catalog_retry(lambda: self.catalog.aliases(name))

    def show(self, ref: str) -> dict:
        """The card of ``ref`` plus its registry record and aliases."""
        from ..files.folder import parse_card

        rec = self.resolve(ref)
        card = parse_card(
            self.store.read(f"{self.store.version_rel(rec.name, rec.version)}/{CARD}"), rec.path
        )
        aliases = [a for a, v in self.aliases(rec.name).items() if v == rec.version]
        return {
            "ref": rec.ref,
            "tags": list(rec.tags),
            "published": rec.created,
            "aliases": aliases,
            "card": card,
        }

    def set_alias(self, ref: str, alias: str) -> None:
        """Point ``alias`` of ``ref``'s name at ``ref``'s version (a damaged aliases file is replaced)."""
        self._check_alias(alias)
        rec = self.resolve(ref)
        try:
            with self.store.lock():
                current = self.store.aliases_or_empty(rec.name)
                current[alias] = rec.version
                self.store.write_aliases(rec.name, current)
        except StoreError as e:
            raise RegistryError(str(e)) from e
        self._sync([rec.name])

    # ------------------------------------------------------------------ verify / fetch / remove
    def verify(self, ref: str | None = None) -> dict[str, str]:
        """Check ``ref`` (or every version) as loading would — checksums, configs, tensor headers, dtypes,
        values, head — without a base model: ``{"name@v": "ok" | what is wrong}``. Damaged versions and
        alias files are reported too."""
        records = [self.resolve(ref)] if ref else self.list()
        report = {} if ref else dict(self.problems())
        for rec in records:
            try:
                if self.local:
                    read_adapter(rec.path, require_card=True)
                else:
                    with tempfile.TemporaryDirectory(prefix="amtl-verify-") as tmp:
                        self.fs.get(rec.path.rstrip("/") + "/", tmp, recursive=True)
                        read_adapter(tmp, require_card=True)
                report[rec.ref] = "ok"
            except (AdapterFileError, OSError, ValueError) as e:
                report[rec.ref] = str(e)
        return dict(sorted(report.items()))

    def fetch(self, ref: str) -> Path:
        """A local folder holding ``ref``'s files, checked as :meth:`verify` does (remote stores are copied
        to a temporary folder first)."""
        rec = self.resolve(ref)
        if self.local:
            read_adapter(rec.path, require_card=True)
            return Path(rec.path)
        cache = Path(tempfile.mkdtemp(prefix=f"amtl-{rec.name}-{rec.version}-"))
        self.fs.get(rec.path.rstrip("/") + "/", str(cache), recursive=True)
        read_adapter(cache, require_card=True)
        return cache

    def load(self, model: AdapterModel, ref: str, name: str | None = None) -> str:
        """Attach ``ref`` to ``model`` (every check of ``load_adapter``); returns the adapter name
        (default: the ref's name)."""
        from ..files.folder import load_adapter

        rec = self.resolve(ref)
        if self.local:
            return load_adapter(model, rec.path, name=name or rec.name, require_card=True)
        # (fetch checks the copy, then load_adapter checks it again: remote loads are dominated by the copy)
        return load_adapter(model, self.fetch(rec.ref), name=name or rec.name, require_card=True)

    def remove(self, ref: str) -> str:
        """Remove one version, named by its number (``name@3``: never an alias or ``latest``, so a moved
        alias cannot make it remove another version); hidden in one step, then deleted; aliases to it are
        dropped. Its number is never given out again. Damaged versions can be removed too.
        Returns the removed ``name@version``.

        Raises:
            RegistryError: not ``name@<number>``, an unknown version, or a read-only store.
        """
        m = _REF.match(ref) if isinstance(ref, str) else None
        tag = (m["tag"] or "") if m else ""
        if not (m and tag.isascii() and tag.isdigit()):
            raise RegistryError(
                f"remove takes one version by number, e.g. 'news@3'; got {ref!r} (resolve an alias first: "
                "`adapters-mtl registry show NAME@ALIAS` names its version)"
            )
        name, version = validate_name(m["name"]), int(tag)
        self._sync([name])
        if (name, version) not in self.catalog.problems(name):
            self.resolve(f"{name}@{version}")  # says what exists if it does not
        try:
            with self.store.lock():
                self.store.remove(name, version)
                current = self.store.aliases_or_empty(name)
                if any(v == version for v in current.values()):
                    self.store.write_aliases(name, {a: v for a, v in current.items() if v != version})
        except StoreError as e:
            raise RegistryError(str(e)) from e
        self._sync([name])
        return f"{name}@{version}"
