"""The ``adapters-mtl`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..model import AdapterModel
    from ..registry import AdapterRegistry
    from ..serving.composer import Composer

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adapters-mtl",
        description="Multi-task learning with per-row routed adapters (LoRA, DoRA, AdaLoRA, prefix, prompt tuning, IA3, "
        "bottleneck) on a frozen transformer.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="showcase on the packaged real MiniLM: train, publish, hot-swap, route, merge (~2 min on 2 cores)",
        description="Train a LoRA adapter per task (BBC news topics, tweet sentiment) on the packaged "
        "MiniLM-L6 in mixed routed batches, evaluate on held-out splits, publish both to a local registry, "
        "serve them with the composer (hot swap, one mixed batch checked row by row against each adapter "
        "alone, merge and unmerge) and print a results table; writes the training plot.",
    )
    demo.add_argument(
        "--seed", type=int, default=0, help="seed of data splits and initialisation (default 0)"
    )
    demo.add_argument("--steps", type=int, default=240, help="training steps (default 240)")
    demo.add_argument(
        "--out", default="runs/demo", help="output folder: registry, plot, metrics (default runs/demo)"
    )
    train = sub.add_parser(
        "train",
        help="train one adapter per task from a recipe (works under `accelerate launch` unchanged)",
        description="Train the tasks of a YAML recipe (see recipes/), evaluate on their test splits and "
        "publish each adapter to the registry. The whole recipe (values, data splits, output folder, registry) "
        "is checked before the model loads. In train.output_dir: metrics.csv grows every step, checkpoint/ "
        "every train.checkpoint_every steps and on Ctrl-C (exit 130), adapters/<task> is saved before the test "
        "evaluation (publish it later with `adapters-mtl registry publish FOLDER`), then results.json and "
        "training.png. A recipe with a compose: section composes published adapters for its (unseen) task instead. "
        "Exit codes: 0 done, 1 trained but publishing failed, 2 bad recipe or input, 130 interrupted.",
    )
    train.add_argument("recipe", help="path of a recipe YAML file")
    train.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. train.steps=5 tasks.0.limit=100"
    )
    train.add_argument("--json", action="store_true", help="print the results as JSON")
    again = train.add_mutually_exclusive_group()
    again.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in train.output_dir from its checkpoint (same recipe and overrides)",
    )
    again.add_argument(
        "--overwrite",
        action="store_true",
        help="start again when train.output_dir already holds a run (replaces its metrics.csv, checkpoint/, "
        "adapters/ and results.json); without --resume or --overwrite such a run is kept and training "
        "refuses to start",
    )
    _serving_parsers(sub)
    _registry_parser(sub)
    return parser


def _serving_parsers(sub: argparse._SubParsersAction) -> None:
    def common(p: argparse.ArgumentParser, base: str) -> None:
        p.add_argument(
            "--adapter",
            "-a",
            action="append",
            required=True,
            metavar="REF",
            help="registry adapter NAME, NAME@VERSION or NAME@ALIAS (repeatable)",
        )
        p.add_argument(
            "--base", default=base, help=f"'minilm', 'smollm2' or a local model folder (default {base})"
        )
        p.add_argument(
            "--registry", default=None, help="registry root or fsspec URL (default: the user registry)"
        )
        p.add_argument("--json", action="store_true", help="machine-readable JSON output")

    pred = sub.add_parser(
        "predict",
        help="classify texts with registry adapters (every text with every --adapter, one routed batch)",
        description="Load the adapters from the registry onto one base model and classify each text with "
        "each adapter; rows are routed to their adapter in one batch. Labels come from each adapter's head.",
    )
    pred.add_argument(
        "texts", nargs="+", metavar="TEXT|FILE", help="texts, or .txt files with one text per line"
    )
    common(pred, "minilm")
    gen = sub.add_parser(
        "generate",
        help="continue prompts with registry adapters (every prompt with every --adapter, one routed batch)",
        description="Greedy generation with per-row adapters on one causal LM (default: the packaged SmolLM2).",
    )
    gen.add_argument(
        "texts", nargs="+", metavar="PROMPT|FILE", help="prompts, or .txt files with one per line"
    )
    gen.add_argument("--max-new-tokens", type=int, default=32)
    common(gen, "smollm2")
    merge = sub.add_parser(
        "merge",
        help="merge registry LoRA adapters into a new adapter and publish it",
        description="Merge LoRA adapters in ΔW space (cat, linear, svd, ties, dare_linear, dare_ties, "
        "magnitude_prune) and publish the result to the registry as NAME (loadable by PEFT).",
    )
    merge.add_argument(
        "--weights", "-w", type=float, nargs="+", help="one weight per --adapter (default 1 each)"
    )
    merge.add_argument(  # a copy of serving.merging's MERGE_METHODS (--help imports no torch; a test compares)
        "--method",
        default="cat",
        choices=["cat", "linear", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune"],
        help="merge method (default: cat, the exact one: the result equals the weighted stack)",
    )
    merge.add_argument(
        "--density", type=float, default=1.0, help="share of values kept (ties, dare_*, magnitude_prune)"
    )
    merge.add_argument(
        "--rank", type=int, default=None, help="rank of SVD-based results (default: the largest input)"
    )
    merge.add_argument("--name", required=True, help="registry name of the merged adapter")
    common(merge, "minilm")
    comp = sub.add_parser(
        "compose",
        help="compose registry adapters for an unseen task (few-shot search or zero-shot) and publish it",
        description="Few-shot: search merge weights of the --adapter candidates on k labelled examples "
        "(LoraHub-style, gradient-free) and give the result a nearest-centroid head. Zero-shot: weight the "
        "candidates by the similarity of --description to their cards, centroids from --labels.",
    )
    comp.add_argument("--examples", help="CSV with text,label columns (few-shot)")
    comp.add_argument(
        "--eval", help="CSV with text,label columns to report accuracy vs base and each adapter"
    )
    comp.add_argument("--description", help="the new task in words (zero-shot)")
    comp.add_argument("--labels", nargs="+", help="label names (zero-shot; few-shot: their order)")
    comp.add_argument(
        "--budget", type=int, default=40, help="weight vectors tried by the search (default 40)"
    )
    comp.add_argument("--seed", type=int, default=0)
    comp.add_argument("--name", required=True, help="registry name of the composed adapter")
    common(comp, "minilm")


def _registry_parser(sub: argparse._SubParsersAction) -> None:
    reg = sub.add_parser(
        "registry",
        help="publish, list, show, verify and remove versioned adapters",
        description="Manage an adapter registry: a local folder or an fsspec URL holding versioned adapter "
        "folders, indexed by a SQLite catalog. References are NAME (latest), NAME@VERSION or NAME@ALIAS.",
    )
    reg.add_argument(
        "--root",
        default=None,
        help="registry folder or fsspec URL "
        "(default: $ADAPTERS_MTL_REGISTRY, else ~/.cache/adapters_mtl/registry)",
    )
    reg.add_argument("--json", action="store_true", help="machine-readable JSON output")
    cmds = reg.add_subparsers(dest="registry_command", required=True, metavar="ACTION")
    ls = cmds.add_parser("list", help="list published versions (filters combine)")
    ls.add_argument("--task")
    ls.add_argument("--base", help="base model id or fingerprint")
    # checked against the registered methods when the command runs (--help stays free of torch imports)
    ls.add_argument("--method", help="an adapter method, e.g. lora, prefix, ia3, bottleneck")
    ls.add_argument("--tag")
    show = cmds.add_parser("show", help="show one version's card, tags and aliases")
    show.add_argument("ref", help="NAME, NAME@VERSION or NAME@ALIAS")
    pub = cmds.add_parser(
        "publish",
        help="publish an adapter folder (saved by adapters_mtl) as the next version",
        description="Check the folder exactly as loading does (card, checksums, configs, tensor headers, "
        "dtypes, finite values, head) and copy only the files its card lists (never a symlink, a path "
        "outside the folder or a pickle) as the next version; version numbers are never reused.",
    )
    pub.add_argument("folder")
    pub.add_argument("--name", help="registry name (default: the card's name)")
    pub.add_argument("--tag", action="append", default=[], help="a tag (repeatable)")
    pub.add_argument(
        "--alias", action="append", default=[], help="point this alias at the new version (repeatable)"
    )
    imp = cmds.add_parser(
        "import-peft", help="check a PEFT adapter folder against its base model and publish it"
    )
    imp.add_argument("folder")
    imp.add_argument("--name", required=True, help="registry name for the adapter")
    imp.add_argument(
        "--base", required=True, help="'minilm', 'smollm2' (the packaged models) or a local model folder"
    )
    imp.add_argument("--tag", action="append", default=[])
    imp.add_argument("--alias", action="append", default=[])
    alias = cmds.add_parser("alias", help="point ALIAS of a name at a version")
    alias.add_argument("ref")
    alias.add_argument("alias")
    rm = cmds.add_parser(
        "remove", help="remove one version (NAME@VERSION; damaged ones too); its number is never reused"
    )
    rm.add_argument("ref")
    ver = cmds.add_parser(
        "verify",
        help="check one version or everything as loading would: checksums, configs, tensor headers, "
        "dtypes, values, heads; damaged versions and alias files are listed (exit 1 on a failure)",
    )
    ver.add_argument("ref", nargs="?")
    cmds.add_parser(
        "rebuild",
        help="re-index the catalog from the files in one transaction (damaged versions are reported, "
        "not fatal) and drop leftovers of killed writers",
    )


def _load_base(spec: str) -> AdapterModel:
    """The ``--base`` model, wrapped, without its tokenizer (importing adapters tokenizes nothing)."""
    from ..data.bases import load_base
    from ..model import AdapterModel

    return AdapterModel(load_base(spec, tokenizer=False)[0])


def _table(title: str, columns: list[str], rows: Sequence[Sequence[object]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*[str(c) for c in row])
    Console().print(table)


def _registry(args: argparse.Namespace) -> int:
    from ..methods import METHODS
    from ..registry import AdapterRegistry

    if getattr(args, "method", None) is not None and args.method not in METHODS:
        print(f"error: --method {args.method!r}: expected one of {sorted(METHODS)}", file=sys.stderr)
        return 2

    reg = AdapterRegistry(args.root)
    cmd = args.registry_command
    out: object
    if cmd == "list":
        records = reg.list(task=args.task, base=args.base, method=args.method, tag=args.tag)
        if not args.json:
            aliases = {name: reg.aliases(name) for name in {r.name for r in records}}
            rows = [
                [
                    r.ref,
                    r.task,
                    "+".join(r.methods),
                    r.base_model or "-",
                    ", ".join(r.tags) or "-",
                    ", ".join(a for a, v in aliases[r.name].items() if v == r.version) or "-",
                    r.created,
                ]
                for r in records
            ]
            _table(
                f"adapters in {reg.url}",
                ["ref", "task", "methods", "base", "tags", "aliases", "published"],
                rows,
            )
            for ref, problem in reg.problems().items():  # damaged files: named, never fatal
                print(f"adapters-mtl: warning: {ref} skipped: {problem}", file=sys.stderr)
            return 0
        out = [r.__dict__ | {"ref": r.ref} for r in records]
    elif cmd == "show":
        out = reg.show(args.ref)
        if not args.json:
            card = out["card"]
            rows = [
                [k, json.dumps(v) if isinstance(v, (dict, list)) else v]
                for k, v in sorted(card.items())
                if k != "files"
            ]
            rows += [["aliases", ", ".join(out["aliases"]) or "-"], ["tags", ", ".join(out["tags"]) or "-"]]
            _table(out["ref"], ["field", "value"], rows)
            return 0
    elif cmd == "publish":
        out = {"ref": reg.publish(args.folder, args.name, tags=args.tag, aliases=args.alias)}
    elif cmd == "import-peft":
        out = {
            "ref": reg.import_peft(
                _load_base(args.base), args.folder, args.name, tags=args.tag, aliases=args.alias
            )
        }
    elif cmd == "alias":
        reg.set_alias(args.ref, args.alias)
        out = {"ref": reg.resolve(f"{args.ref.split('@')[0]}@{args.alias}").ref, "alias": args.alias}
    elif cmd == "remove":
        out = {"removed": reg.remove(args.ref)}
    elif cmd == "verify":
        out = reg.verify(args.ref)
        if not args.json:
            _table("verification", ["ref", "result"], [[k, v] for k, v in out.items()])
        if args.json:
            print(json.dumps(out, indent=2))
        return 0 if all(v == "ok" for v in out.values()) else 1
    else:  # rebuild
        out = {"versions": reg.rebuild(), "problems": reg.problems()}
    print(json.dumps(out, indent=2, default=str) if args.json else _plain(out))
    return 0


def _train(args: argparse.Namespace) -> int:
    import shlex

    from ..training import TrainingInterrupted
    from .recipe import RunError, load_recipe, run_recipe

    try:
        summary = run_recipe(
            load_recipe(args.recipe, args.overrides), resume=args.resume, overwrite=args.overwrite
        )
    except TrainingInterrupted as e:
        again = shlex.join(["adapters-mtl", "train", args.recipe, *args.overrides, "--resume"])
        print(
            f"adapters-mtl: interrupted after step {e.step}; checkpoint in {e.checkpoint}; "
            f"continue with: {again}",
            file=sys.stderr,
        )
        return 130
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C
        print(
            "adapters-mtl: interrupted; the last checkpoint (if any) is in train.output_dir/checkpoint",
            file=sys.stderr,
        )
        return 130
    except RunError as e:
        print(f"adapters-mtl: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary, indent=2, default=float))
        return 0
    if "test_accuracy" in summary:  # a compose recipe
        weights = summary["weights"]
        rows = [
            [k, f"{v:.3f}", f"{weights[k]:+.2f}" if k in weights else "-"]
            for k, v in summary["test_accuracy"].items()
        ]
        title = f"few-shot composition for {summary['task']} ({summary['shots']} examples): test accuracy"
        _table(title, ["adapter / mix", "accuracy", "weight"], rows)
        return 0
    rows = []
    for task, metrics in summary["test"].items():
        shown = ", ".join(
            f"{k}={v:.3f}" for k, v in metrics.items() if k != "score" and not isinstance(v, dict)
        )
        rows.append([task, shown, summary["published"].get(task, "-")])
    title = f"test results after {summary['steps']} steps ({summary['output_dir']})"
    _table(title, ["task", "test metrics", "published"], rows)
    if summary.get("samples"):
        samples = [[r["task"], r["target"], r["output"]] for r in summary["samples"]]
        _table("sample generations (one routed batch)", ["task", "target", "output"], samples)
    if summary.get("not_published"):
        print(f"not published: {summary['not_published']}")
    return 0


def _texts(items: list[str]) -> list[str]:
    from pathlib import Path

    out: list[str] = []
    for item in items:
        path = Path(item)
        if path.suffix == ".txt" and path.is_file():
            out.extend(line.strip() for line in path.read_text().splitlines() if line.strip())
        else:
            out.append(item)
    return out


def _serve(args: argparse.Namespace) -> int:
    from ..data.bases import load_base
    from ..registry import AdapterRegistry
    from ..serving.composer import Composer

    # merge tokenizes nothing: a --base folder without tokenizer files is enough for it
    base, tokenizer = load_base(args.base, tokenizer=args.command != "merge")
    registry = AdapterRegistry(args.registry)  # None: the user registry
    composer = Composer(base, registry=registry, tokenizer=tokenizer)
    if args.command == "merge":
        composer.merge(
            args.adapter, args.weights, args.method, into="merged", density=args.density, rank=args.rank
        )
        sources = [registry.resolve(a).ref for a in args.adapter]
        weights = args.weights or [1.0] * len(sources)
        ref = registry.publish(
            composer.model,
            args.name,
            adapter="merged",
            task=args.name,
            description=f"{args.method} merge of {sources} with weights {weights}",
        )
        print(json.dumps({"ref": ref, "sources": sources}) if args.json else f"published {ref}")
        return 0
    if args.command == "compose":
        return _compose(composer, registry, args)
    texts = _texts(args.texts)
    rows = [(t, a) for t in texts for a in args.adapter]
    if args.command == "predict":
        preds = composer.predict([t for t, _ in rows], adapters=[a for _, a in rows])
        out = [
            {"text": t, "adapter": p.adapter, "label": p.label, "score": p.score}
            for (t, _), p in zip(rows, preds, strict=True)
        ]
        columns = ["text", "adapter", "label", "score"]
    else:
        gens = composer.generate(
            [t for t, _ in rows], adapters=[a for _, a in rows], max_new_tokens=args.max_new_tokens
        )
        out = [{"prompt": t, "adapter": a, "output": g} for (t, a), g in zip(rows, gens, strict=True)]
        columns = ["prompt", "adapter", "output"]
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        cells = [[f"{r[c]:.3f}" if isinstance(r[c], float) else r[c] for c in columns] for r in out]
        _table(args.command, columns, cells)
    return 0


def _csv_examples(path: str) -> tuple[list[str], list[str]]:
    import csv

    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"text", "label"} <= set(rows[0]):
        raise ValueError(f"{path}: expected a CSV file with 'text' and 'label' columns")
    return [r["text"] for r in rows], [r["label"] for r in rows]


def _compose(composer: Composer, registry: AdapterRegistry, args: argparse.Namespace) -> int:
    from ..serving.lorahub import compose, compose_zero_shot

    if args.examples:
        texts, labels = _csv_examples(args.examples)
        ev = _csv_examples(args.eval) if args.eval else (None, None)
        result = compose(
            composer,
            args.adapter,
            texts,
            labels,
            label_names=args.labels,
            budget=args.budget,
            seed=args.seed,
            eval_texts=ev[0],
            eval_labels=ev[1],
        )
        how = f"few-shot composition ({len(texts)} examples)"
    elif args.description and args.labels:
        result = compose_zero_shot(composer, args.adapter, args.description, args.labels)
        how = f"zero-shot composition for {args.description!r}"
    else:
        raise ValueError(
            "compose needs --examples FILE.csv (few-shot) or --description TEXT --labels ... (zero-shot)"
        )
    ref = registry.publish(
        composer.model,
        args.name,
        adapter=result.adapter,
        task=args.name,
        description=f"{how} of {result.weights}",
    )
    out = {"ref": ref, "weights": result.weights, "accuracy": result.accuracy}
    print(json.dumps(out, indent=2) if args.json else _plain(out))
    return 0


def _plain(out: object) -> str:
    if isinstance(out, dict):
        return "\n".join(f"{k}: {v}" for k, v in out.items())
    return str(out)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for bad input, with the reason on stderr)."""
    args = _parser().parse_args(argv)
    from ..files.folder import AdapterFileError
    from ..registry import RegistryError

    try:
        if args.command == "demo":
            from .demo import run_demo

            run_demo(seed=args.seed, steps=args.steps, out=args.out)
            return 0
        if args.command == "train":
            return _train(args)
        if args.command in ("predict", "generate", "merge", "compose"):
            return _serve(args)
        return _registry(args)
    except (RegistryError, AdapterFileError, ValueError, KeyError, FileNotFoundError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e  # KeyError's str() adds quotes
        print(f"adapters-mtl: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
