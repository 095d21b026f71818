"""The `adapters-mtl registry` CLI as a script or a person would use it."""

from __future__ import annotations

import copy
import json

import pytest
from helpers import make_config, tiny

from adapters_mtl import AdapterModel, HeadConfig
from adapters_mtl.apps.cli import main
from adapters_mtl.files.folder import save_adapter


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_registry_cli_round_trip(tmp_path, capsys):
    model = AdapterModel(copy.deepcopy(tiny("bert"))).eval()
    model.add_adapter("news", make_config("lora", "bert", 0), head=HeadConfig(num_labels=3))
    folder = save_adapter(model, "news", tmp_path / "news", metrics={"acc": 0.8})
    root = ["registry", "--root", str(tmp_path / "reg")]

    code, out, _ = run(capsys, *root, "--json", "publish", str(folder), "--tag", "bbc", "--alias", "prod")
    assert code == 0 and json.loads(out) == {"ref": "news@1"}
    assert run(capsys, *root, "--json", "publish", str(folder))[1].count("news@2") == 1
    code, out, _ = run(capsys, *root, "--json", "list", "--tag", "bbc")
    assert [r["ref"] for r in json.loads(out)] == ["news@1"]
    code, out, _ = run(capsys, *root, "list")  # the table for people
    assert code == 0 and "news@1" in out and "prod" in out
    code, out, _ = run(capsys, *root, "--json", "show", "news@prod")
    assert json.loads(out)["card"]["metrics"] == {"acc": 0.8}
    code, out, _ = run(capsys, *root, "--json", "alias", "news@2", "prod")
    assert json.loads(out)["ref"] == "news@2"
    code, out, _ = run(capsys, *root, "--json", "verify")
    assert code == 0 and json.loads(out) == {"news@1": "ok", "news@2": "ok"}
    code, out, _ = run(capsys, *root, "--json", "remove", "news@1")
    assert json.loads(out) == {"removed": "news@1"}
    code, out, _ = run(capsys, *root, "--json", "rebuild")
    assert json.loads(out) == {"versions": 1, "problems": {}}

    code, _, err = run(capsys, *root, "show", "news@9")
    assert code == 2 and "has no version 9; versions: [2]" in err
    code, _, err = run(capsys, *root, "publish", str(tmp_path / "missing"))
    assert code == 2 and "error" in err
    code, _, err = run(capsys, *root, "publish", str(folder), "--name", "../evil")
    assert code == 2 and "invalid adapter name" in err


def test_registry_cli_import_peft(tmp_path, capsys):
    import peft

    base = tiny("bert")
    base.save_pretrained(tmp_path / "base")
    peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["query"])).save_pretrained(
        str(tmp_path / "peft")
    )
    registry = ["registry", "--root", str(tmp_path / "reg"), "--json"]
    peft_folder, base_folder = str(tmp_path / "peft"), str(tmp_path / "base")
    code, out, err = run(
        capsys, *registry, "import-peft", peft_folder, "--name", "imported", "--base", base_folder
    )
    assert code == 0, err
    assert json.loads(out) == {"ref": "imported@1"}


@pytest.mark.parametrize("argv", [["--help"], ["registry", "--help"], ["registry", "publish", "--help"]])
def test_help_texts(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0 and "usage: adapters-mtl" in capsys.readouterr().out


def test_merge_choices_and_default_match_the_library():
    from adapters_mtl.apps.cli import _parser
    from adapters_mtl.serving.merging import DEFAULT_MERGE_METHOD, MERGE_METHODS

    args = ["merge", "-a", "a", "-a", "b", "--name", "m"]
    assert _parser().parse_args(args).method == DEFAULT_MERGE_METHOD
    for method in MERGE_METHODS:
        assert _parser().parse_args([*args, "--method", method]).method == method
    with pytest.raises(SystemExit):
        _parser().parse_args([*args, "--method", "mean"])
