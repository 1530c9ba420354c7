"""The ``polm`` command line: a thin layer over the recipe runner and the stage functions."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from polm.errors import PolmError


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr)


def cmd_run(a) -> None:
    from polm.runner import run_recipe

    run_recipe(a.recipe, a.workdir, eval_n=a.eval_n, verbose=a.verbose, gates=not a.no_gates)


def cmd_validate(a) -> None:
    from polm.recipe import check_models, load_recipe

    for path in a.recipes:
        recipe = load_recipe(path)
        check_models(recipe)
        print(
            f"{path}: ok ({len(recipe.models)} models, {len(recipe.stages)} stages: "
            f"{' -> '.join(recipe.order()) or 'none'})"
        )


def cmd_stages(a) -> None:
    from polm.registry import STAGES

    width = max(map(len, STAGES))
    for name, entry in sorted(STAGES.items()):
        print(f"{name:<{width}}  {entry.summary}")


def cmd_inspect(a) -> None:
    from polm.checkpoint import Checkpoint

    ckpt = Checkpoint.open(a.ckpt)
    m = ckpt.manifest
    if a.json:
        print(json.dumps(m.model_dump(mode="json"), indent=2))
        return
    c = _console()
    c.print(f"[bold]{ckpt.path}[/bold]")
    c.print(
        f"  stage         {m.stage}\n  format        {m.format}\n"
        f"  content hash  {m.content_hash}\n  seed          {m.seed}\n  created       {m.created}"
    )
    for p in m.parents:
        c.print(f"  parent        {p.path} ({p.stage}, {p.content_hash[:12]})")
    c.print("  settings      " + json.dumps(m.settings, sort_keys=True))
    for k, v in sorted(m.metrics.items()):
        c.print(f"  {k:<28} {v:.4g}" if isinstance(v, float) else f"  {k:<28} {v}")
    c.print("  versions      " + ", ".join(f"{k} {v}" for k, v in m.versions.items()))


def cmd_lineage(a) -> None:
    from polm.checkpoint import Checkpoint, lineage

    for depth, node in lineage(Checkpoint.open(a.ckpt)):
        pad = "    " * depth + ("└── " if depth else "")
        if isinstance(node, Checkpoint):
            m = node.manifest
            acc = ", ".join(
                f"{k.split('.')[1]} {v:.1%}"
                for k, v in sorted(m.metrics.items())
                if k.startswith("eval.") and k.endswith(".accuracy")
            )
            src = f" <- {m.settings['source']}" if m.stage == "import" else ""
            print(
                f"{pad}{m.stage} [{m.format}] {node.path} {m.content_hash[:12]}{src}"
                f"{f'  ({acc})' if acc else ''}"
            )
        else:
            print(f"{pad}{node.stage} {node.path} {node.content_hash[:12]} (missing or changed)")


def cmd_eval(a) -> None:
    from polm.checkpoint import Checkpoint
    from polm.evaluate import evaluate_checkpoint

    ckpt = Checkpoint.open(a.ckpt)
    if a.endpoint:
        return endpoint_eval(a, ckpt)
    metrics = evaluate_checkpoint(ckpt, a.task, n=a.n)
    if a.self_refine:
        from polm.refine import refine_metrics

        metrics |= refine_metrics(ckpt, a.task, a.n, a.self_refine, a.trace, a.critic)
    ckpt.update_metrics(metrics)
    if a.json:
        print(json.dumps(metrics, indent=2))
    else:
        for k, v in metrics.items():
            print(f"{k:<28} {v:.4f}" if isinstance(v, float) else f"{k:<28} {v}")


def endpoint_eval(a, ckpt) -> None:
    """``polm eval CKPT --endpoint URL``: lm-evaluation-harness on the served model (CKPT gives
    the tokenizer and chat template); printed, not written into the manifest."""
    import os

    from polm.lmeval import run_lm_eval

    if a.self_refine:
        raise PolmError("--self-refine runs the checkpoint itself; drop it with --endpoint.")
    tokenizer = ckpt.path
    if not (tokenizer / "tokenizer_config.json").is_file():
        raise PolmError(
            f"{ckpt.path} ({ckpt.format}) has no transformers tokenizer; --endpoint needs the "
            "served model's hf, peft-adapter or quantized checkpoint for its tokenizer."
        )
    api_key = os.environ.get("POLM_API_KEY") or os.environ.get("OPENAI_API_KEY")
    write = Path(a.write_tasks) if a.write_tasks else None
    metrics = run_lm_eval(a.endpoint, tokenizer, a.task, a.n, a.model, api_key, write)
    if a.json:
        print(json.dumps(metrics, indent=2))
    else:
        for k, v in metrics.items():
            print(f"{k:<36} {v:.4f}")


def cmd_import(a) -> None:
    from polm.importer import import_model

    ckpt = import_model(a.src, a.out, allow_pickle=a.allow_pickle)
    print(f"imported {a.src} -> {ckpt.path} ({ckpt.manifest.content_hash[:12]})")


def cmd_report(a) -> None:
    from polm.report import load, render_report
    from polm.runner import result_console, summary_table

    report = load(Path(a.run_dir))
    out = render_report(a.run_dir)
    console = result_console()
    console.print(summary_table(report["name"], report["stages"], report["eval"]))
    console.print(f"report: {out} (markdown: {out.with_suffix('.md')})", soft_wrap=True)


def _task_name(name: str) -> str:
    from polm.tasks import TASKS

    if name not in TASKS:
        raise argparse.ArgumentTypeError(f"unknown task {name!r} (known: {', '.join(TASKS)})")
    return name


def _parse_sets(pairs: list[str]) -> dict:
    from polm.recipe import parse_yaml
    from polm.settings import short_repr

    values = {}
    for pair in pairs:
        if "=" not in pair:
            raise PolmError(f"--set expects key=value, got {pair!r}.")
        k, v = pair.split("=", 1)
        values[k.strip()] = parse_yaml(v, f"--set {k.strip()}: the value {short_repr(v)}")
    return values


def cmd_stage(a) -> None:
    from polm.checkpoint import Checkpoint
    from polm.recipe import read_yaml
    from polm.runner import run_stage, stage_output
    from polm.settings import parse_settings

    values = {}
    if a.config:
        if not Path(a.config).is_file():
            raise PolmError(f"no settings file at {a.config}.")
        values = read_yaml(Path(a.config)) or {}
        if not isinstance(values, dict):
            raise PolmError(f"{a.config}: expected a mapping of settings.")
    values.update(_parse_sets(a.set))
    settings = parse_settings(a.stage, values)  # validate before touching any checkpoint
    paths = a.inputs or []
    if not paths and hasattr(settings, "model_paths"):
        paths = settings.model_paths()  # a mergekit YAML names its models
    if not paths:
        raise PolmError(f"{a.stage} needs its inputs: --from CKPT...")
    inputs = [Checkpoint.open(p) for p in paths]
    out = Path(a.out)
    log_path = None if a.verbose else out.with_name(f"{out.name}.log")
    with stage_output(_console(stderr=True), out.name, a.stage, log_path) as bar:
        ckpt = run_stage(a.stage, inputs, settings, out, a.nproc)
        if a.eval:  # the suite a recipe runs after every stage, into the manifest
            from polm.evaluate import evaluate_checkpoint

            if bar is not None:
                bar.start(f"evaluating on {', '.join(a.eval)}")
            ckpt.update_metrics(evaluate_checkpoint(ckpt, a.eval, n=a.eval_n))
    print(f"{a.stage} -> {ckpt.path} ({ckpt.manifest.content_hash[:12]})")
    if a.eval:
        for k, v in ckpt.manifest.metrics.items():
            if k.startswith("eval.") or k in ("size_bytes", "bits_per_weight", "params"):
                print(f"  {k:<28} {v:.4f}" if isinstance(v, float) else f"  {k:<28} {v}")


def cmd_package(a) -> None:
    from polm.registry import packager, packager_options

    options = {k: getattr(a, k) for k in packager_options(a.target) if hasattr(a, k)}
    out = packager(a.target)(a.ckpt, a.out, **options)
    print(f"{a.target} package -> {out}" + (f" (+ {a.tar_name.format(out.name)})" if a.tar else ""))


def cmd_serve(a) -> None:
    """Exec ``bentoml serve serve.service:Polm`` with this interpreter.

    BentoML imports the service from its working directory, and its workers run there. That is
    the directory ``serve`` is installed in (site-packages, or the repository for a development
    install), so the service that runs is the one shipped with this polm whatever the current
    directory holds; paths the server reads are made absolute first, since its cwd moves."""
    import importlib.util
    import os

    if a.model is not None:
        from polm.checkpoint import Checkpoint

        a.model = str(Checkpoint.open(a.model).path.absolute())  # no checkpoint: exit 2 now
    if a.draft not in (None, "none"):
        from polm.checkpoint import Checkpoint

        a.draft = str(Checkpoint.open(a.draft).path.absolute())
    if a.adapter:
        named = {}
        for item in a.adapter:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise PolmError(f"--adapter {item!r}: give NAME=DIR.")
            from polm.checkpoint import Checkpoint

            named[name] = str(Checkpoint.open(path).path.absolute())
        a.adapters = ",".join(f"{k}={v}" for k, v in named.items())
    else:
        a.adapters = None
    for var in ("POLM_MODEL", "POLM_CACHE", "POLM_API_KEY_FILE"):
        if os.environ.get(var):
            os.environ[var] = str(Path(os.environ[var]).expanduser().absolute())
    spec = importlib.util.find_spec("serve")
    if spec is None or spec.origin is None:
        raise PolmError("polm's serve package is not importable: reinstall polm.")
    working_dir = Path(spec.origin).resolve().parent.parent
    argv = [sys.executable, "-m", "bentoml", "serve", "serve.service:Polm"]
    argv += ["--working-dir", str(working_dir), "--host", a.host, "--port", str(a.port)]
    if a.api_key_file is not None:
        a.api_key_file = str(Path(a.api_key_file).expanduser().absolute())
        if not Path(a.api_key_file).is_file():
            raise PolmError(f"--api-key-file {a.api_key_file}: no such file.")
    keys = ("model", "backend", "served_model_name", "max_concurrency", "api_key_file", "adapters",
            "draft", "draft_tokens")  # fmt: skip
    for key in keys:
        value = getattr(a, key)
        if value is not None:
            argv += ["--arg", f"{key}={value}"]
    os.execv(argv[0], argv)


VERBOSE_HELP = (
    "show everything the libraries print (progress bars, warnings, logs) instead of one "
    "progress bar and one result line per stage"
)


def build_parser() -> argparse.ArgumentParser:
    from polm.registry import STAGES

    p = argparse.ArgumentParser(
        prog="polm",
        description="polm: post-training for language "
        "models, one recipe from alignment to serving.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # -v is taken after the command too (`polm run R.yaml -v`); SUPPRESS keeps the global value
    # when a subcommand does not see it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP
    )

    s = sub.add_parser("run", parents=[common], help="run a recipe")
    s.add_argument("recipe")
    s.add_argument("--workdir", help="output directory (default runs/<name>)")
    s.add_argument("--eval-n", type=int, help="evaluate on the first N test examples only")
    s.add_argument(
        "--no-gates",
        action="store_true",
        help="check and report the recipe's quality gates, but run through a failed one",
    )
    s.set_defaults(fn=cmd_run)
    s = sub.add_parser("validate", parents=[common], help="check recipes without running them")
    s.add_argument("recipes", nargs="+")
    s.set_defaults(fn=cmd_validate)
    sub.add_parser("stages", parents=[common], help="list the registered stages").set_defaults(
        fn=cmd_stages
    )
    s = sub.add_parser("inspect", parents=[common], help="show a checkpoint's manifest")
    s.add_argument("ckpt")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_inspect)
    s = sub.add_parser(
        "lineage", parents=[common], help="print the tree of checkpoints a checkpoint came from"
    )
    s.add_argument("ckpt")
    s.set_defaults(fn=cmd_lineage)
    s = sub.add_parser(
        "eval", parents=[common], help="evaluate a checkpoint; results go into its manifest"
    )
    s.add_argument("ckpt")
    s.add_argument("--task", action="append", required=True, help="task name (repeatable)")
    s.add_argument("--n", type=int, help="first N test examples only")
    s.add_argument(
        "--self-refine",
        type=int,
        default=0,
        metavar="N",
        help="also answer with N rounds of generate-critique-revise",
    )
    s.add_argument(
        "--critic",
        choices=["self", "verifier", "both"],
        default="self",
        help="with --self-refine: who critiques: the model itself (default), the task's "
        "verifier (says where an answer is wrong, never the right answer), or both in turn",
    )
    s.add_argument("--trace", help="write each self-refine answer and critique to this JSONL")
    s.add_argument(
        "--endpoint",
        metavar="URL",
        help="score the model served at this OpenAI-compatible /v1 with lm-evaluation-harness "
        "(CKPT gives the tokenizer and chat template; key from POLM_API_KEY or OPENAI_API_KEY)",
    )
    s.add_argument("--model", help="with --endpoint: the served model name (default: the first)")
    s.add_argument(
        "--write-tasks", metavar="DIR", help="with --endpoint: keep lm-eval's tasks here"
    )
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_eval)
    s = sub.add_parser(
        "import", parents=[common], help="import builtin:NAME, an HF directory or a .gguf file"
    )
    s.add_argument("src")
    s.add_argument("--out", required=True)
    s.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept pickle (.bin/.pt) weights; loaded with weights_only=True",
    )
    s.set_defaults(fn=cmd_import)
    s = sub.add_parser(
        "serve", parents=[common], help="serve a checkpoint (bentoml serve, OpenAI-compatible)"
    )
    s.add_argument("model", nargs="?", help="checkpoint directory (default: the built-in)")
    s.add_argument("--backend", choices=["auto", "transformers", "onnx", "vllm", "llamacpp"])
    s.add_argument("--served-model-name", dest="served_model_name")
    s.add_argument("--max-concurrency", dest="max_concurrency", type=int)
    s.add_argument(
        "--api-key-file",
        dest="api_key_file",
        help="a file of API keys (one a line) every /v1 route then requires as a Bearer token "
        "(or POLM_API_KEY=key1,key2 in the environment)",
    )
    s.add_argument(
        "--adapter",
        action="append",
        metavar="NAME=DIR",
        help="also serve this LoRA adapter checkpoint of MODEL under NAME (repeatable)",
    )
    s.add_argument(
        "--draft",
        metavar="DIR",
        help="speculative decoding: a draft checkpoint with MODEL's tokenizer (e.g. its "
        "optimize.distill student) proposes tokens MODEL checks (transformers backend); "
        "default: the student distilled with draft_for_teacher beside MODEL; none: no draft",
    )
    s.add_argument("--draft-tokens", dest="draft_tokens", type=int, metavar="N",
                   help="tokens the draft proposes a step (default 4)")  # fmt: skip
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=3000)
    s.set_defaults(fn=cmd_serve)
    s = sub.add_parser("package", parents=[common], help="package a checkpoint for deployment")
    pk = s.add_subparsers(dest="target", required=True, metavar="TARGET")
    # target: (help, --out's help, what --tar writes)
    targets = {
        "edge": (
            "int4 ONNX + runner needing only onnxruntime-genai",
            "the package's directory",
            "{}.tar.gz",
        ),
        "bento": (
            "a bento that carries the checkpoint (bentoml serve DIR, bentoml containerize)",
            "where the bento is copied (bentoml serve OUT)",
            "{}.bento",
        ),
    }
    for target, (help_, out_help, tar_name) in targets.items():
        s = pk.add_parser(target, parents=[common], help=help_)
        s.add_argument("ckpt")
        s.add_argument("--out", required=True, help=out_help)
        s.add_argument("--tar", action="store_true", help=f"also write {tar_name.format('OUT')}")
        s.set_defaults(fn=cmd_package, tar_name=tar_name)
        if target == "edge":
            s.add_argument(
                "--precision",
                default="int4",
                choices=["int4", "int8", "fp32"],
                help="export precision when CKPT is not already onnx",
            )
    s = sub.add_parser(
        "report",
        parents=[common],
        help="write a run directory's report (HTML and markdown, with plots); print its table",
    )
    s.add_argument("run_dir")
    s.set_defaults(fn=cmd_report)

    groups: dict[str, argparse._SubParsersAction] = {}
    for name, entry in sorted(STAGES.items()):
        group, stage = name.split(".", 1)
        if group not in groups:
            g = sub.add_parser(group, parents=[common], help=f"run one {group} stage")
            groups[group] = g.add_subparsers(dest="stage_name", required=True, metavar="STAGE")
        s = groups[group].add_parser(stage, parents=[common], help=entry.summary)
        s.add_argument(
            "--from",
            dest="inputs",
            nargs="+",
            required=not entry.inputs_in_settings,
            metavar="CKPT",
            help="input checkpoints"
            + (" (default: the models the settings name)" * entry.inputs_in_settings),
        )
        s.add_argument("--out", required=True)
        s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        s.add_argument("--config", help="YAML file of settings (--set overrides)")
        s.add_argument(
            "--eval",
            nargs="+",
            metavar="TASK",
            type=_task_name,
            help="evaluate the output on these tasks (into its manifest)",
        )
        s.add_argument("--eval-n", type=int, help="first N test examples per task only")
        s.add_argument(
            "--nproc",
            type=int,
            default=1,
            help="processes (DDP; gloo on CPU)" if entry.trains else argparse.SUPPRESS,
        )
        s.set_defaults(fn=cmd_stage, stage=name)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import logging

    # polm's own notes (a resumed run, data taken from the lineage): on screen with -v, in the
    # stage's log file otherwise
    logger = logging.getLogger("polm")
    if not logger.handlers:  # main() may be called more than once in a process
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("polm: %(message)s"))
        logger.addHandler(handler)
    logger.propagate = False  # its own handler above, not the root's as well
    logger.setLevel(logging.INFO)
    if not args.verbose:
        from polm.progress import quiet_libraries

        quiet_libraries()
    try:
        args.fn(args)
    except PolmError as e:
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
