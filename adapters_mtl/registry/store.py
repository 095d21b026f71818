"""The store: a registry's files, the source of truth.

Layout (under the root, a local folder or any fsspec URL):
  adapters/<name>/<version>/      one adapter folder (see files in io.py) + registry.json (tags, publish time)
  adapters/<name>/aliases.json    {"prod": 2, ...}   ("latest" is implicit: the highest version)
  adapters/<name>/.claims/<v>     one empty file per version number ever handed out: numbers are never reused
  staging/<uuid>/                 local publishes in progress (never visible; flock'ed by a live writer)
  trash/<uuid>/                   local removals in progress (never visible)

A version is visible once its folder holds ``adapter_card.json``. Locally the whole folder appears in one
rename under an exclusive ``flock`` on ``<root>/.lock`` (released by the OS if the writer dies). On object
stores (no rename) a version number is claimed with a conditional create (S3 ``If-None-Match: *``), so two
machines can never take the same number, and the card is uploaded last, so the version becomes visible
complete. Stores with no conditional create are refused for publishing unless ``single_writer=True``.
Known limits on object stores: ``aliases.json`` is rewritten whole, so alias updates from two machines at
the same moment are last-writer-wins; an upload killed mid-way leaves objects without a card (invisible,
their number never reused) that ``clean_leftovers`` does not delete.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec

from ..core.config import validate_name
from ..files.folder import CARD

__all__ = ["Store", "StoreError", "VersionFiles"]

_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()
# object stores whose ``pipe_file(mode="create")`` is an atomic create-if-absent (s3fs: If-None-Match;
# memory: one process by nature, "xb" under its own lock)
_CONDITIONAL_CREATE = {"s3", "s3a", "memory"}
REGISTRY_META = "registry.json"
# a stage younger than this is never cleaned up: its writer may not have locked it yet (it does so
# microseconds after creating it; anything older without a lock belongs to a dead writer)
STAGE_GRACE_S = 60.0


class StoreError(RuntimeError):
    """The store cannot do what was asked (read-only, no conditional create, a failed write)."""


@dataclass(frozen=True)
class VersionFiles:
    """What a version folder says about itself (read without parsing tensors)."""

    card: dict
    meta: dict


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)


class Store:
    """Files of one registry root. Every path given to or returned by its methods is relative to the root.

    Args:
        url: a local folder or an fsspec URL.
        single_writer: allow publishing on a store without conditional create (you guarantee that one
            process writes at a time).
        storage_options: passed to fsspec (e.g. ``{"client_kwargs": {"endpoint_url": ...}}`` for S3).
    """

    def __init__(self, url: str, *, single_writer: bool = False, storage_options: dict | None = None) -> None:
        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.root = root.rstrip("/") or "/"
        protocols = _protocols(self.fs)
        self.local = "file" in protocols or "local" in protocols
        self.conditional_create = self.local or bool(_CONDITIONAL_CREATE & set(protocols))
        self.single_writer = single_writer
        try:
            self.fs.makedirs(self.path("adapters"), exist_ok=True)
        except OSError:
            pass  # a read-only root: reads still work; writes say why they cannot
        self.writable = self._probe_writable()

    # ------------------------------------------------------------------ paths
    def path(self, *parts: str) -> str:
        """The store path of a root-relative path."""
        return "/".join([self.root.rstrip("/"), *parts]) if self.root != "/" else "/" + "/".join(parts)

    def version_rel(self, name: str, version: int) -> str:
        return f"adapters/{name}/{version}"

    def _probe_writable(self) -> bool:
        if not self.local:
            return True  # object stores answer writes with errors of their own
        probe = self.path(f".write-probe-{uuid.uuid4().hex}")
        try:
            with open(probe, "wb"):
                pass
            os.unlink(probe)
            return True
        except OSError:
            return False

    def require_writable(self, what: str) -> None:
        if not self.writable:
            raise StoreError(
                f"cannot {what}: the registry root {self.url} is read-only or cannot be created (reading, "
                "listing, verifying and loading still work). Publish to a writable folder, or ask whoever "
                "owns the root."
            )

    # ------------------------------------------------------------------ the lock
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive across threads; across processes too for local roots (``flock``). Only writers take
        it (StoreError on a read-only root)."""
        self.require_writable("write")
        with _THREAD_LOCKS_GUARD:
            lock = _THREAD_LOCKS.setdefault(self.url, threading.Lock())
        with lock:
            if not self.local:
                yield
                return
            import fcntl

            with open(self.path(".lock"), "a+") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ reading
    def refresh(self) -> None:
        """Forget cached listings (object stores cache them): other machines may have written."""
        if not self.local:
            self.fs.invalidate_cache()

    def names(self) -> tuple[list[str], dict[str, str]]:
        """(valid adapter names on disk, {folder: why it is skipped} for folders that are not names)."""
        base = self.path("adapters")
        if not self.fs.exists(base):
            return [], {}
        names, skipped = [], {}
        for entry in self.fs.ls(base, detail=False):
            last = entry.rstrip("/").rsplit("/", 1)[-1]
            try:
                names.append(validate_name(last))
            except ValueError:
                skipped[last] = "not a valid adapter name (a folder someone put there by hand?)"
        return sorted(names), skipped

    def versions(self, name: str) -> list[int]:
        """Visible versions of ``name`` (folders named by a number that hold a card)."""
        folder = self.path("adapters", name)
        if not self.fs.exists(folder):
            return []
        out = []
        for entry in self.fs.ls(folder, detail=False):
            last = entry.rstrip("/").rsplit("/", 1)[-1]
            if last.isascii() and last.isdigit() and self.fs.exists(f"{entry.rstrip('/')}/{CARD}"):
                out.append(int(last))
        return sorted(out)

    def claimed(self, name: str) -> list[int]:
        folder = self.path("adapters", name, ".claims")
        if not self.fs.exists(folder):
            return []
        found = (e.rstrip("/").rsplit("/", 1)[-1] for e in self.fs.ls(folder, detail=False))
        return sorted(int(v) for v in found if v.isascii() and v.isdigit())

    def read(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def read_version(self, name: str, version: int) -> VersionFiles:
        """The card and registry metadata of a version.

        Raises:
            ValueError (AdapterFileError): a damaged card, naming the file.
        """
        from ..files.folder import parse_card

        rel = self.version_rel(name, version)
        card = parse_card(self.read(f"{rel}/{CARD}"), f"{self.path(rel, CARD)}")
        meta: dict = {}
        if self.exists(f"{rel}/{REGISTRY_META}"):
            try:
                meta = json.loads(self.read(f"{rel}/{REGISTRY_META}"))
            except (ValueError, RecursionError):
                meta = {}
            if not isinstance(meta, dict):
                meta = {}
        return VersionFiles(card, meta)

    def aliases(self, name: str) -> dict[str, int]:
        """``aliases.json`` of ``name`` ({} when absent).

        Raises:
            ValueError: a damaged file (not JSON, or not ``{alias: version}``), naming it.
        """
        rel = f"adapters/{name}/aliases.json"
        if not self.exists(rel):
            return {}
        where = self.path(rel)
        try:
            data = json.loads(self.read(rel))
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{where} is not valid JSON ({e})") from e
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v > 0
            for k, v in data.items()
        ):
            raise ValueError(f'{where} is not an object of alias -> version number, e.g. {{"prod": 2}}')
        return data

    # ------------------------------------------------------------------ writing
    def next_version(self, name: str) -> int:
        return max([0, *self.versions(name), *self.claimed(name)]) + 1

    def _claim(self, name: str, version: int) -> bool:
        """Take ``version`` for ``name``; False if another writer has it."""
        path = self.path("adapters", name, ".claims", str(version))
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return False
            return True
        self.fs.makedirs(self.path("adapters", name, ".claims"), exist_ok=True)
        for attempt in range(8):
            try:
                self.fs.pipe_file(path, b"", mode="create")
                return True
            except FileExistsError:  # s3fs: 412 Precondition Failed
                return False
            except OSError as e:
                if getattr(e, "errno", None) == errno.EEXIST:
                    return False
                # S3 answers 409 ConditionalRequestConflict (s3fs: EBUSY) to a create racing another on
                # the same key: nobody has it yet, so ask again
                if getattr(e, "errno", None) != errno.EBUSY or attempt == 7:
                    raise
                time.sleep(0.05 * 2**attempt)
                self.refresh()
        return False

    def publish(self, name: str, files: dict[str, bytes], aliases: tuple[str, ...] = ()) -> int:
        """Make ``files`` (relative path -> bytes, the card among them) the next version of ``name``.

        Either the version becomes visible complete and its number is returned, or an exception is
        raised and nothing is visible (a claimed number may be burnt: numbers are never reused anyway).
        """
        self.require_writable("publish")
        if not self.conditional_create and not self.single_writer:
            raise StoreError(
                f"{self.url}: this store ({'/'.join(_protocols(self.fs))}) has no conditional create, so two "
                "machines publishing at once could take the same version. Publish from one process with "
                "AdapterRegistry(root, single_writer=True), or use a local folder or S3."
            )
        if self.local:
            return self._publish_local(name, files, aliases)
        return self._publish_remote(name, files, aliases)

    def _publish_local(self, name: str, files: dict[str, bytes], aliases: tuple[str, ...]) -> int:
        import fcntl

        stage = self.path("staging", uuid.uuid4().hex)
        os.makedirs(stage)
        # the stage folder itself is flock'ed while this writer lives; rebuild() removes only stages it
        # can lock and that are older than STAGE_GRACE_S (so not one created a moment ago, before its lock)
        live = os.open(stage, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        alias_tmp = None
        try:
            fcntl.flock(live, fcntl.LOCK_EX)
            if os.fstat(live).st_nlink == 0:
                raise StoreError(f"{stage} was removed while starting to publish; publish again")
            for rel, data in files.items():
                os.makedirs(os.path.dirname(f"{stage}/{rel}"), exist_ok=True)
                with open(f"{stage}/{rel}", "xb") as fh:  # "x": never writes into a recreated folder
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())  # a full disk fails here, before anything is visible
            _crash_point("staged")
            with self.lock():
                version = self.next_version(name)
                while not self._claim(name, version):
                    version += 1
                alias_tmp = self._stage_aliases(name, aliases, version) if aliases else None
                os.rename(stage, self.path(self.version_rel(name, version)))  # visible, all at once
                _crash_point("visible")
                if alias_tmp is not None:
                    os.replace(alias_tmp, self.path("adapters", name, "aliases.json"))
                    alias_tmp = None
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            if alias_tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(alias_tmp)
            raise
        finally:
            os.close(live)
        return version

    def _stage_aliases(self, name: str, aliases: tuple[str, ...], version: int) -> str:
        current = self.aliases_or_empty(name)
        current.update(dict.fromkeys(aliases, version))
        tmp = self.path("adapters", name, f".aliases.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(json.dumps(current, sort_keys=True).encode())
            fh.flush()
            os.fsync(fh.fileno())
        return tmp

    def aliases_or_empty(self, name: str) -> dict[str, int]:
        try:
            return self.aliases(name)
        except ValueError:
            return {}  # a damaged aliases.json is replaced by the next write

    def _publish_remote(self, name: str, files: dict[str, bytes], aliases: tuple[str, ...]) -> int:
        self.refresh()
        with self.lock():  # one writer per process; the claim protects against other machines
            version = self.next_version(name)
            while not self._claim(name, version):
                version += 1
                self.refresh()
            rel = self.version_rel(name, version)
            try:
                for path, data in sorted(files.items(), key=lambda kv: kv[0] == CARD):  # the card last
                    self.fs.pipe_file(self.path(rel, path), data)
            except BaseException:
                with contextlib.suppress(Exception):
                    self.fs.rm(self.path(rel), recursive=True)
                raise
            if aliases:
                current = self.aliases_or_empty(name)
                current.update(dict.fromkeys(aliases, version))
                self.write_aliases(name, current)
        return version

    def write_aliases(self, name: str, aliases: dict[str, int]) -> None:
        self.require_writable("change aliases")
        path = self.path("adapters", name, "aliases.json")
        data = json.dumps(aliases, sort_keys=True).encode()
        if self.local:  # atomic replace
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        else:
            self.fs.pipe_file(path, data)

    def remove(self, name: str, version: int) -> None:
        """Hide the version in one step, then delete its files (its number stays claimed)."""
        self.require_writable("remove")
        # claimed first (registries written before claims existed have none): the number is never reused
        self._claim(name, version)
        rel = self.version_rel(name, version)
        if self.local:
            trash = self.path("trash", uuid.uuid4().hex)
            os.makedirs(self.path("trash"), exist_ok=True)
            os.rename(self.path(rel), trash)

            shutil.rmtree(trash, ignore_errors=True)
        else:
            self.fs.rm_file(self.path(rel, CARD))  # hidden: a version is visible through its card
            self.fs.rm(self.path(rel), recursive=True)

    def clean_leftovers(self) -> list[str]:
        """Remove what killed writers left (stages whose writer is gone, trash). Returns what was removed."""
        if not (self.local and self.writable):
            return []
        import fcntl

        removed = []
        trash = self.path("trash")
        if os.path.isdir(trash):
            shutil.rmtree(trash, ignore_errors=True)
            removed.append("trash")
        staging = self.path("staging")
        if os.path.isdir(staging):
            for entry in sorted(os.listdir(staging)):
                path = os.path.join(staging, entry)
                with contextlib.suppress(OSError):
                    if time.time() - os.lstat(path).st_mtime < STAGE_GRACE_S:
                        continue  # perhaps created a moment ago, before its writer locked it
                    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: a live writer
                        shutil.rmtree(path, ignore_errors=True)
                        removed.append(f"staging/{entry}")
                    finally:
                        os.close(fd)
        for tmp in glob.glob(self.path("adapters", "*", ".aliases.*.tmp")):
            with contextlib.suppress(OSError):
                if time.time() - os.lstat(tmp).st_mtime > STAGE_GRACE_S:
                    os.unlink(tmp)  # an alias write killed before its rename
                    removed.append(os.path.relpath(tmp, self.root))
        return removed


def _crash_point(where: str) -> None:
    # Lets the crash tests kill a publishing process at a precise step (ADAPTERS_MTL_CRASH_AT=staged|visible).
    if os.environ.get("ADAPTERS_MTL_CRASH_AT") == where:
        os._exit(17)
