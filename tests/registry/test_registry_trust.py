"""The registry under faults users cause: hostile folders, damaged files, copies and moves, removed
versions, read-only roots, full disks, racing writers. Each test is a case found by trying it (issue 10)."""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
from helpers import batch, make_config, tiny
from safetensors.torch import load_file, save_file

from adapters_mtl import AdapterModel, HeadConfig
from adapters_mtl.files.folder import AdapterFileError, load_adapter, save_adapter
from adapters_mtl.registry import AdapterRegistry, RegistryError
from adapters_mtl.registry.catalog import Catalog


@pytest.fixture(scope="module")
def base():
    return tiny("bert", seed=4)


def _model(base, *names):
    model = AdapterModel(copy.deepcopy(base)).eval()
    for i, name in enumerate(names):
        torch.manual_seed(i)
        model.add_adapter(name, make_config("lora", "bert", 0), head=HeadConfig(num_labels=2 + i))
    return model


@pytest.fixture(scope="module")
def model(base):
    return _model(base, "a", "b")


def _rehash(folder: Path) -> None:
    """Record the current sha256 of every listed file (what an attacker or a buggy tool would do)."""
    card = json.loads((folder / "adapter_card.json").read_text())
    for rel in card["files"]:
        if (folder / rel).is_file():
            card["files"][rel] = hashlib.sha256((folder / rel).read_bytes()).hexdigest()
    (folder / "adapter_card.json").write_text(json.dumps(card))


def _edit_card(folder: Path, **changes) -> None:
    card = json.loads((folder / "adapter_card.json").read_text())
    card.update(changes)
    (folder / "adapter_card.json").write_text(json.dumps(card))


def _store_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in (root / "adapters").rglob("*") if p.is_file())


# ----------------------------------------------------------------------------------------- 1. hostile folders
def test_publish_copies_only_listed_regular_files_never_links_or_pickles(tmp_path, model):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not publish")
    folder = save_adapter(model, "a", tmp_path / "a")
    (folder / "notes.txt").symlink_to(secret)
    (folder / "adapter_model.bin").write_bytes(b"pickle")
    (folder / "extra.pt").write_bytes(b"pickle")
    reg = AdapterRegistry(tmp_path / "reg")
    with pytest.warns(UserWarning, match="not listed in the adapter card and are not published"):
        assert reg.publish(folder) == "a@1"
    published = [f.removeprefix("adapters/a/1/") for f in _store_files(tmp_path / "reg") if "/1/" in f]
    assert published == [
        "README.md",
        "adapter_card.json",
        "adapter_config.json",
        "adapter_model.safetensors",
        "head.safetensors",
        "registry.json",
    ]
    assert not any(p.is_symlink() for p in (tmp_path / "reg").rglob("*"))
    assert reg.verify() == {"a@1": "ok"}


@pytest.mark.parametrize(
    "entry, match",
    [
        ("../../../../etc/hostname", "outside the folder"),
        ("/etc/hostname", "outside the folder"),
        ("sub/../../x.json", "outside the folder"),
        ("adapter_model.bin", "a pickle"),
        ("weights.pt", "a pickle"),
        ("notes.txt", "holds only"),
    ],
)
def test_card_entries_outside_the_folder_or_of_other_kinds_are_refused(tmp_path, base, model, entry, match):
    folder = save_adapter(model, "a", tmp_path / "a")
    card = json.loads((folder / "adapter_card.json").read_text())
    card["files"][entry] = "0" * 64
    (folder / "adapter_card.json").write_text(json.dumps(card))
    reg = AdapterRegistry(tmp_path / "reg")
    with pytest.raises(AdapterFileError, match=match):
        reg.publish(folder)
    fresh = AdapterModel(copy.deepcopy(base))
    with pytest.raises(AdapterFileError, match=match):
        load_adapter(fresh, folder)
    assert reg.list() == [] and fresh.adapter_names == []


def test_a_listed_file_that_is_a_symlink_is_refused(tmp_path, model):
    folder = save_adapter(model, "a", tmp_path / "a")
    real = tmp_path / "elsewhere.json"
    shutil.move(folder / "adapter_config.json", real)
    (folder / "adapter_config.json").symlink_to(real)
    with pytest.raises(AdapterFileError, match="symbolic link"):
        AdapterRegistry(tmp_path / "reg").publish(folder)
    linked_dir = save_adapter(model, "a", tmp_path / "b")
    shutil.move(linked_dir / "adapter_card.json", tmp_path / "card.json")
    (linked_dir / "adapter_card.json").symlink_to(tmp_path / "card.json")
    with pytest.raises(AdapterFileError, match="symbolic link"):
        AdapterRegistry(tmp_path / "reg").publish(linked_dir)


def _broken_folders(tmp_path: Path, model) -> dict[str, Path]:
    """Folders whose checksums are right but that cannot be loaded."""
    out = {}

    def make(key, mutate):
        folder = save_adapter(model, "a", tmp_path / key)
        mutate(folder)
        _rehash(folder)
        out[key] = folder

    weights = "adapter_model.safetensors"
    make("truncated", lambda f: (f / weights).write_bytes((f / weights).read_bytes()[:-40]))
    make(
        "huge_header",
        lambda f: (f / weights).write_bytes(struct.pack("<Q", 2**62) + (f / weights).read_bytes()[8:]),
    )
    make("empty_file", lambda f: (f / weights).write_bytes(b""))

    def retype(f, fn):
        tensors = load_file(f / weights)
        save_file({k: fn(v) for k, v in tensors.items()}, f / weights)

    make("integer_tensors", lambda f: retype(f, lambda t: t.to(torch.int32)))
    make("nan_weights", lambda f: retype(f, lambda t: t.clone().fill_(float("nan"))))
    make("inf_weights", lambda f: retype(f, lambda t: t.clone().fill_(float("inf"))))

    def drop_lora_b(f):
        save_file({k: v for k, v in load_file(f / weights).items() if "lora_B" not in k}, f / weights)

    make("unpaired_lora", drop_lora_b)

    def config(f, **changes):
        cfg = json.loads((f / "adapter_config.json").read_text())
        cfg.update(changes)
        (f / "adapter_config.json").write_text(json.dumps(cfg))

    make("r_zero", lambda f: config(f, r=0))
    make("negative_alpha_pattern", lambda f: config(f, alpha_pattern={"query": -2.0}))
    make("unknown_peft_type", lambda f: config(f, peft_type="NOT_A_METHOD"))
    make("config_is_a_list", lambda f: (f / "adapter_config.json").write_text("[1, 2]"))
    make("unknown_head_kind", lambda f: _edit_card(f, head={"kind": "mystery", "num_labels": 2}))
    make("unknown_head_key", lambda f: _edit_card(f, head={"kind": "seq_cls", "num_labels": 2, "colour": 1}))
    make("head_wrong_labels", lambda f: _edit_card(f, head={"kind": "seq_cls", "num_labels": 5}))
    make("card_is_a_list", lambda _f: None)
    (out["card_is_a_list"] / "adapter_card.json").write_text("[]")
    make("card_bad_name", lambda f: _edit_card(f, name="../../x"))
    make("card_files_not_dict", lambda _f: None)
    (out["card_files_not_dict"] / "adapter_card.json").write_text(json.dumps({"files": ["a"]}))
    make("card_huge_number", lambda f: _edit_card(f, metrics={"acc": 1}))
    card = (out["card_huge_number"] / "adapter_card.json").read_text()
    (out["card_huge_number"] / "adapter_card.json").write_text(
        card.replace('"acc": 1', '"acc": 1' + "0" * 5000)
    )
    return out


def test_publish_refuses_every_folder_that_loading_refuses(tmp_path, base, model):
    reg = AdapterRegistry(tmp_path / "reg")
    fresh = AdapterModel(copy.deepcopy(base))
    folders = _broken_folders(tmp_path, model)
    assert len(folders) == 18
    for key, folder in folders.items():
        with pytest.raises(AdapterFileError) as published:
            reg.publish(folder)
        with pytest.raises(AdapterFileError) as loaded:
            load_adapter(fresh, folder)
        assert str(folder) in str(published.value), (key, published.value)
        assert str(loaded.value) == str(published.value), key  # one validation, two callers
        assert fresh.adapter_names == [] and len(fresh.heads) == 0
    assert reg.list() == [] and _store_files(tmp_path / "reg") == []


def test_fp16_and_fp64_files_are_converted_with_a_warning_when_precision_is_lost(tmp_path, base, model):
    for dtype, warns in ((torch.float64, True), (torch.float16, False)):
        folder = save_adapter(model, "a", tmp_path / str(dtype))
        weights = folder / "adapter_model.safetensors"
        save_file({k: v.to(dtype) for k, v in load_file(weights).items()}, weights)
        _rehash(folder)
        fresh = AdapterModel(copy.deepcopy(base))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load_adapter(fresh, folder)
        lossy = [w for w in caught if "loses precision" in str(w.message)]
        assert bool(lossy) == warns, dtype
        if warns:
            assert "float64" in str(lossy[0].message) and "float32" in str(lossy[0].message)


# ----------------------------------------------------------------------------------------- 2. damaged files
def test_a_damaged_version_is_reported_by_name_and_everything_else_keeps_working(tmp_path, model):
    root = tmp_path / "reg"
    reg = AdapterRegistry(root)
    for name in ("a", "a", "b"):
        reg.publish(model, adapter=name, aliases=["prod"])
    (root / "adapters" / "a" / "2" / "adapter_card.json").write_text("{not json")
    (root / "adapters" / "b" / "aliases.json").write_text('["prod"]')
    for fresh in (AdapterRegistry(root), reg):
        assert fresh.rebuild() == 2  # a@1, b@1: the damaged a@2 is skipped, not fatal
        assert [r.ref for r in fresh.list()] == ["a@1", "b@1"]
        problems = fresh.problems()
        assert set(problems) == {"a@2", "b"}
        assert "adapters/a/2/adapter_card.json" in problems["a@2"] and "not a readable" in problems["a@2"]
        assert "adapters/b/aliases.json" in problems["b"]
        with pytest.raises(RegistryError, match=r"a@2 is damaged.*adapter_card.json.*remove a@2"):
            fresh.resolve("a@2")
        assert fresh.resolve("a").version == 1  # latest readable
        with pytest.raises(RegistryError, match="aliases.json"):
            fresh.resolve("b@prod")
        assert fresh.resolve("b@1").version == 1 and fresh.resolve("b").version == 1
        report = fresh.verify()
        assert report["a@1"] == "ok" and report["b@1"] == "ok" and "damaged" in report["a@2"]
    reg.set_alias("b@1", "prod")  # writing the aliases again repairs the file
    assert reg.resolve("b@prod").version == 1 and "b" not in reg.problems()
    reg.remove("a@2")
    assert reg.problems() == {} and reg.publish(model, adapter="a") == "a@3"


def test_garbage_catalog_is_set_aside_and_rebuilt_from_the_files(tmp_path, model):
    root = tmp_path / "reg"
    reg = AdapterRegistry(root)
    reg.publish(model, adapter="a", aliases=["prod"])
    Path(reg.catalog_path).write_bytes(b"this is not a database" * 100)
    with pytest.warns(UserWarning, match="was damaged"):
        again = AdapterRegistry(root)
    assert [r.ref for r in again.list()] == ["a@1"] and again.resolve("a@prod").version == 1
    assert list(root.glob("catalog.sqlite.corrupt-*"))
    # damaged while a registry object is open: the next read rebuilds it
    Path(again.catalog_path).write_bytes(b"garbage" * 1000)
    with pytest.warns(UserWarning, match="was damaged"):
        assert again.resolve("a").version == 1
    assert again.rebuild() == 1
    # damage past the header (a valid first page, garbage in the data pages)
    for i in range(40):
        again.publish(model, adapter="b", tags=[f"t{i}"])
    with sqlite3.connect(again.catalog_path) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(Path(again.catalog_path).read_bytes())
    page = int.from_bytes(data[16:18], "big")
    data[2 * page :] = os.urandom(len(data) - 2 * page)
    Path(again.catalog_path).write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="was damaged"):
        third = AdapterRegistry(root)
    assert len(third.list()) == 41 and third.problems() == {}


def test_catalogs_of_an_older_layout_are_reindexed(tmp_path, model):
    root = tmp_path / "reg"
    AdapterRegistry(root).publish(model, adapter="a")
    with sqlite3.connect(root / "catalog.sqlite") as con:  # round 1's layout: absolute paths, no version
        con.execute("PRAGMA user_version=0")
        con.execute("UPDATE adapters SET relpath='/somewhere/else'")
    assert AdapterRegistry(root).resolve("a").path == str(root / "adapters" / "a" / "1")


@pytest.mark.parametrize("ref", ["b@²", "b@", "@1", "b@1@2", "b@../x", "b@ a", "", None, 3])
def test_bad_references_get_a_clear_error(tmp_path, ref):
    reg = AdapterRegistry(tmp_path / "reg")
    with pytest.raises((RegistryError, ValueError), match="invalid"):
        reg.resolve(ref)


# ----------------------------------------------------------------------------------------- 3. copies and moves
def test_a_copied_registry_serves_its_own_files_and_a_moved_one_keeps_working(tmp_path, model, base):
    root = tmp_path / "reg"
    reg = AdapterRegistry(root)
    reg.publish(model, adapter="a")
    copy_root = tmp_path / "reg_copy"
    shutil.copytree(root, copy_root)
    weights = copy_root / "adapters" / "a" / "1" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # damage the copy only
    copied = AdapterRegistry(copy_root)
    assert copied.resolve("a").path == str(copy_root / "adapters" / "a" / "1")
    assert "does not match its recorded sha256" in copied.verify()["a@1"]
    with pytest.raises(AdapterFileError, match=str(copy_root)):
        copied.load(AdapterModel(copy.deepcopy(base)), "a")
    assert reg.verify() == {"a@1": "ok"}

    moved_root = tmp_path / "moved"
    shutil.move(root, moved_root)
    moved = AdapterRegistry(moved_root)  # no rebuild needed
    fresh = AdapterModel(copy.deepcopy(base)).eval()
    assert moved.load(fresh, "a") == "a" and moved.verify() == {"a@1": "ok"}
    inputs = batch(2, 5)
    with torch.no_grad():
        assert torch.equal(
            model(**inputs, adapters="a").row_logits[0], fresh(**inputs, adapters="a").row_logits[0]
        )


# ----------------------------------------------------------------------------------------- 4. version numbers
def test_version_numbers_are_never_reused(tmp_path, model):
    for root in (str(tmp_path / "reg"), "memory://never-reused"):
        reg = AdapterRegistry(root, catalog=tmp_path / f"{abs(hash(root))}.sqlite")
        for _ in range(3):
            reg.publish(model, adapter="a")
        reg.remove("a@3")
        assert reg.publish(model, adapter="b", name="a") == "a@4"
        for ref in ("a", "a@latest", "a@prod"):  # removal takes an explicit number, never a moving name
            with pytest.raises(RegistryError, match="by number"):
                reg.remove(ref)
        reg.remove("a@4")
        reg.remove("a@2")
        assert reg.publish(model, adapter="a") == "a@5"
        with pytest.raises(RegistryError, match="has no version 3"):
            reg.resolve("a@3")
        assert AdapterRegistry(root, catalog=tmp_path / "other.sqlite").publish(model, adapter="a") == "a@6"


# ----------------------------------------------------------------------------------------- 6. read-only roots
_READ_ONLY = r"""
import copy, json, sys, warnings
import torch
sys.path.insert(0, sys.argv[2])
from helpers import tiny
from adapters_mtl import AdapterModel
from adapters_mtl.registry import AdapterRegistry, RegistryError
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    reg = AdapterRegistry(sys.argv[1])
out = {"warned": any("in-memory index" in str(w.message) for w in caught),
       "list": [r.ref for r in reg.list()], "show": reg.show("a@prod")["ref"], "verify": reg.verify()}
model = AdapterModel(tiny("bert", seed=4))
out["load"] = reg.load(model, "a")
for key, write in (("publish", lambda: reg.publish(model, adapter="a")),
                   ("alias", lambda: reg.set_alias("a@1", "x")), ("remove", lambda: reg.remove("b@1")),
                   ("rebuild", reg.rebuild)):
    try:
        out[key] = write()
    except RegistryError as e:
        out[key] = str(e)
print(json.dumps(out))
"""


def _run_read_only(root: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``script`` with ``root`` on a real read-only mount (a private mount namespace), or, for a user
    without that right, with the root's permissions taken away."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-c", script, str(root), *args]
    if os.geteuid() == 0:
        if shutil.which("unshare") is None:
            pytest.skip("needs unshare to mount the registry read-only")
        mount = f"mount --bind '{root}' '{root}' && mount -o remount,bind,ro '{root}' && exec \"$@\""
        cmd = ["unshare", "-m", "sh", "-c", mount, "sh", *cmd]
        probe = subprocess.run(["unshare", "-m", "sh", "-c", mount, "sh", "true"], capture_output=True)
        if probe.returncode != 0:
            pytest.skip(f"cannot mount read-only here: {probe.stderr.decode()[-200:]}")
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    for p in [root, *root.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    finally:
        for p in [root, *root.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)


def test_a_read_only_root_serves_list_show_verify_and_load(tmp_path, model):
    root = tmp_path / "reg"
    reg = AdapterRegistry(root)
    reg.publish(model, adapter="a", aliases=["prod"])
    reg.publish(model, adapter="b")
    proc = _run_read_only(root, _READ_ONLY, str(Path(__file__).parents[1]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["list"] == ["a@1", "b@1"] and out["show"] == "a@1" and out["load"] == "a"
    assert out["verify"] == {"a@1": "ok", "b@1": "ok"}
    assert all("read-only" in out[k] for k in ("publish", "alias", "remove")) and out["warned"]
    assert out["rebuild"] == 2  # re-indexes in memory


# ----------------------------------------------------------------------------------------- 7. disk full
def test_disk_full_during_publish_leaves_nothing_visible_and_a_retry_gives_one_version(
    tmp_path, model, monkeypatch
):
    root = tmp_path / "reg"
    reg = AdapterRegistry(root)
    folder = save_adapter(model, "a", tmp_path / "a")
    real_fsync = os.fsync
    calls = {"n": 0}
    outcomes = []
    for fail_at in range(1, 9):  # every write of a publish (files, registry.json, aliases) fails in turn
        calls["n"] = 0

        def fsync(fd, fail_at=fail_at):
            calls["n"] += 1
            if calls["n"] == fail_at:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        try:
            outcomes.append(reg.publish(folder, aliases=["prod"]))
        except OSError as e:
            assert e.errno == errno.ENOSPC
            outcomes.append(None)
        monkeypatch.setattr(os, "fsync", real_fsync)
        fresh = AdapterRegistry(root)
        visible = [r.ref for r in fresh.list()]
        assert visible == [o for o in outcomes if o], (fail_at, visible, outcomes)  # failed = invisible
        assert set(fresh.verify().values()) <= {"ok"}
    assert outcomes[-1] is not None and None in outcomes
    assert list((root / "staging").iterdir()) == []


def test_a_catalog_that_cannot_be_written_falls_back_to_memory(tmp_path, model, monkeypatch):
    reg = AdapterRegistry(tmp_path / "reg")
    reg.publish(model, adapter="a")

    real = Catalog._replace

    def full(self, index, everything):  # the file refuses writes; memory still works
        if not self.in_memory:
            raise sqlite3.OperationalError("database or disk is full")
        return real(self, index, everything)

    monkeypatch.setattr(Catalog, "_replace", full)
    with pytest.warns(UserWarning, match="in-memory index"):
        fresh = AdapterRegistry(tmp_path / "reg")
        (tmp_path / "reg" / "adapters" / "a" / "aliases.json").write_text('{"prod": 1}')  # a change to index
        assert [r.ref for r in fresh.list()] == ["a@1"]
        assert fresh.resolve("a@prod").version == 1
    monkeypatch.undo()


# ----------------------------------------------------------------------------------------- 8. racing writers
def test_rebuild_remove_alias_and_publish_race_without_losing_anything(tmp_path, model):
    root = tmp_path / "reg"
    AdapterRegistry(root)
    folder = save_adapter(model, "a", tmp_path / "a")
    errors: list[BaseException] = []
    published: list[str] = []

    def run(fn, n):
        try:
            for _ in range(n):
                fn()
        except BaseException as e:  # noqa: BLE001 (the test reports every failure)
            errors.append(e)

    def publish():
        published.append(AdapterRegistry(root).publish(folder, aliases=["prod"]))

    def rebuild():
        AdapterRegistry(root).rebuild()

    def alias_and_remove():
        reg = AdapterRegistry(root)
        refs = [r.ref for r in reg.list()]
        if len(refs) > 2:
            reg.set_alias(refs[0], "old")
            reg.remove(refs[1])

    threads = [
        threading.Thread(target=run, args=(f, n))
        for f, n in ((publish, 8), (publish, 8), (rebuild, 10), (alias_and_remove, 5))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert errors == []
    reg = AdapterRegistry(root)
    assert len(set(published)) == 16  # every publish got its own version
    assert set(reg.verify().values()) == {"ok"} and reg.problems() == {}
    on_disk = {f"a@{p.name}" for p in (root / "adapters" / "a").iterdir() if p.name.isdigit()}
    assert {r.ref for r in reg.list()} == on_disk <= set(published)


# ----------------------------------------------------------------------------------------- many machines
_S3_PUBLISHER = r"""
import sys, warnings
warnings.simplefilter("ignore")
from adapters_mtl.registry import AdapterRegistry
reg = AdapterRegistry(sys.argv[1], catalog=sys.argv[2])  # each "machine" has its own catalog
for _ in range(int(sys.argv[4])):
    print(reg.publish(sys.argv[3]), flush=True)
"""


@pytest.fixture(scope="module")
def s3_endpoint():
    pytest.importorskip("s3fs")
    server = pytest.importorskip("moto.server")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    srv = server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    import s3fs

    s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}).mkdir("bucket")
    yield endpoint
    srv.stop()


def test_two_machines_publishing_one_name_on_s3_never_collide(
    tmp_path, model, base, s3_endpoint, monkeypatch
):
    """A real S3 API (moto's server, through s3fs): version numbers are claimed with If-None-Match."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    url = "s3://bucket/team-registry"
    folder = save_adapter(model, "a", tmp_path / "a")
    env = dict(os.environ, AWS_ENDPOINT_URL=s3_endpoint)
    machines = [
        subprocess.Popen(
            [sys.executable, "-c", _S3_PUBLISHER, url, str(tmp_path / f"m{i}.sqlite"), str(folder), "4"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    refs = []
    for proc in machines:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        refs += out.split()
    assert sorted(refs, key=lambda r: int(r.split("@")[1])) == [f"a@{v}" for v in range(1, 9)]
    reg = AdapterRegistry(url, catalog=tmp_path / "reader.sqlite")
    assert [r.ref for r in reg.list()] == [f"a@{v}" for v in range(1, 9)]
    assert set(reg.verify().values()) == {"ok"}
    reg.remove("a@8")
    assert reg.publish(folder, aliases=["prod"]) == "a@9"  # never reused, on S3 too
    fresh = AdapterModel(copy.deepcopy(base)).eval()
    assert reg.load(fresh, "a@prod") == "a"
    inputs = batch(2, 5)
    with torch.no_grad():
        assert torch.equal(
            model(**inputs, adapters="a").row_logits[0], fresh(**inputs, adapters="a").row_logits[0]
        )


def test_a_store_without_conditional_create_refuses_to_publish_unless_single_writer(tmp_path, model):
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class PlainStore(MemoryFileSystem):  # stands for any fsspec store with no create-if-absent
        protocol = "plainstore"

    fsspec.register_implementation("plainstore", PlainStore, clobber=True)
    reg = AdapterRegistry("plainstore://reg", catalog=tmp_path / "c.sqlite")
    with pytest.raises(RegistryError, match="no conditional create.*single_writer=True"):
        reg.publish(model, adapter="a")
    assert reg.list() == []
    single = AdapterRegistry("plainstore://reg", catalog=tmp_path / "c.sqlite", single_writer=True)
    assert single.publish(model, adapter="a") == "a@1" and single.verify() == {"a@1": "ok"}


def test_cli_names_damaged_versions_and_keeps_serving_the_rest(tmp_path, model, capsys):
    from adapters_mtl.apps.cli import main

    root = tmp_path / "reg"
    reg = AdapterRegistry(root)
    reg.publish(model, adapter="a")
    reg.publish(model, adapter="b")
    (root / "adapters" / "b" / "1" / "adapter_card.json").write_text("[]")
    assert main(["registry", "--root", str(root), "rebuild"]) == 0
    capsys.readouterr()
    assert main(["registry", "--root", str(root), "--json", "rebuild"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["versions"] == 1 and "JSON list" in out["problems"]["b@1"]
    assert main(["registry", "--root", str(root), "list"]) == 0
    captured = capsys.readouterr()
    assert "a@1" in captured.out and "b@1 skipped" in captured.err and "adapter_card.json" in captured.err
    assert main(["registry", "--root", str(root), "show", "b@1"]) == 2
    assert "b@1 is damaged" in capsys.readouterr().err
    assert main(["registry", "--root", str(root), "verify"]) == 1
    assert main(["registry", "--root", str(root), "remove", "b@1"]) == 0
    assert main(["registry", "--root", str(root), "verify"]) == 0


_WORKER = r"""
import json, random, sys, warnings
warnings.simplefilter("ignore")
from adapters_mtl.registry import AdapterRegistry, RegistryError
root, folder, role, seed, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
rng = random.Random(seed)
for i in range(n):
    reg = AdapterRegistry(root)
    if role == "publish":
        print(json.dumps({"published": reg.publish(folder, aliases=["prod"])}), flush=True)
    elif role == "rebuild":
        reg.rebuild()
    else:
        refs = [r.ref for r in reg.list()]
        if len(refs) > 2:
            victim = rng.choice(refs[:-1])
            try:
                reg.set_alias(victim, "old")
                print(json.dumps({"removed": reg.remove(victim)}), flush=True)
            except RegistryError:
                pass  # another remover took it first
print(json.dumps({"done": role}), flush=True)
"""


def test_processes_publishing_removing_aliasing_rebuilding_and_killed_lose_nothing(tmp_path, model):
    """Several processes at once, some killed with SIGKILL mid-way: what was reported published is there
    unless reported removed, nothing is half visible, and every version verifies."""
    import signal
    import time

    root = tmp_path / "reg"
    AdapterRegistry(root)
    folder = save_adapter(model, "a", tmp_path / "a")

    def spawn(role, seed, n):
        return subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(root), str(folder), role, str(seed), str(n)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    workers = [spawn("publish", 0, 6), spawn("publish", 1, 6), spawn("remove", 2, 6), spawn("rebuild", 3, 6)]
    victims = [spawn("publish", 10 + i, 50) for i in range(2)]
    events = []
    for i, v in enumerate(victims):  # killed mid-stream, at some point after their first publish
        events.append(json.loads(v.stdout.readline()))
        time.sleep(0.2 + 0.3 * i)
        v.send_signal(signal.SIGKILL)
    for proc in workers + victims:
        out, err = proc.communicate(timeout=300)
        if proc not in victims:
            assert proc.returncode == 0, err[-3000:]
        events += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert all(v.returncode == -signal.SIGKILL for v in victims)
    published = {e["published"] for e in events if "published" in e}
    removed = {e["removed"] for e in events if "removed" in e}
    assert sum("done" in e for e in events) == 4 and len(published) >= 12
    reg = AdapterRegistry(root)
    reg.rebuild()
    listed = {r.ref for r in reg.list()}
    assert published - removed <= listed and not (listed & removed)
    assert set(reg.verify().values()) == {"ok"} and reg.problems() == {}
    versions = sorted(int(r.split("@")[1]) for r in published | listed)
    assert len(versions) == len(set(versions))  # no number handed out twice
    assert reg.resolve("a@prod").version in {r.version for r in reg.list()}


def test_legacy_registries_without_claims_never_reuse_a_removed_number(tmp_path, model):
    root = tmp_path / "reg"
    reg = AdapterRegistry(root)
    reg.publish(model, adapter="a")
    reg.publish(model, adapter="a")
    shutil.rmtree(root / "adapters" / "a" / ".claims")  # as written before claims existed
    reg.remove("a@2")
    assert reg.publish(model, adapter="a") == "a@3"


def test_publish_copies_the_bytes_it_checked_not_a_later_edit(tmp_path, model, monkeypatch):
    import adapters_mtl.registry.adapter_registry as registry_module

    folder = save_adapter(model, "a", tmp_path / "a")
    real = registry_module.read_adapter

    def checked_then_swapped(path):
        out = real(path)
        _edit_card(Path(path), files={"extra.json": "0" * 64})  # swapped right after the check
        return out

    monkeypatch.setattr(registry_module, "read_adapter", checked_then_swapped)
    reg = AdapterRegistry(tmp_path / "reg")
    assert reg.publish(folder) == "a@1"
    monkeypatch.undo()
    assert reg.verify() == {"a@1": "ok"}


def test_a_registry_object_sees_what_other_writers_published(tmp_path, model):
    reader, writer = AdapterRegistry(tmp_path / "reg"), AdapterRegistry(tmp_path / "reg")
    assert reader.list() == []
    writer.publish(model, adapter="a")
    AdapterRegistry(tmp_path / "reg", catalog=tmp_path / "elsewhere.sqlite").publish(model, adapter="a")
    assert [r.ref for r in reader.list()] == ["a@1", "a@2"] == [r.ref for r in writer.list()]


def test_rebuild_removes_only_stages_whose_writer_is_gone_and_that_are_a_minute_old(tmp_path, model):
    import fcntl

    root = tmp_path / "reg"
    reg = AdapterRegistry(root)
    reg.publish(model, adapter="a", aliases=["prod"])
    staging = root / "staging"
    young, dead, live = (staging / n for n in ("young", "dead", "live"))
    for stage in (young, dead, live):
        stage.mkdir(parents=True)
        (stage / "adapter_model.safetensors").write_bytes(b"x")
    for stage in (dead, live):
        os.utime(stage, (0, 0))
    stale_alias = root / "adapters" / "a" / ".aliases.0123.tmp"
    stale_alias.write_text("{}")
    os.utime(stale_alias, (0, 0))
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a writer still at work on this stage
        reg.rebuild()
    finally:
        os.close(fd)
    assert sorted(p.name for p in staging.iterdir()) == ["live", "young"]
    assert not stale_alias.exists() and reg.resolve("a@prod").version == 1


def test_a_fifo_listed_in_a_card_is_refused_without_hanging(tmp_path, model, base):
    folder = save_adapter(model, "a", tmp_path / "a")
    os.mkfifo(folder / "extra.json")
    _edit_card(
        folder,
        files={**json.loads((folder / "adapter_card.json").read_text())["files"], "extra.json": "0" * 64},
    )
    with pytest.raises(AdapterFileError, match="not a regular file"):
        load_adapter(AdapterModel(copy.deepcopy(base)), folder)
    with pytest.raises(AdapterFileError, match="not a regular file"):
        AdapterRegistry(tmp_path / "reg").publish(folder)
