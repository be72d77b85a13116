"""`kubetune` command line: argument parsing only; every command calls a library function.

    kubetune prepare|pack|train|evaluate|register --config FILE [--set KEY=VALUE ...]
    kubetune run --config FILE [--set KEY=VALUE ...]        all stages in order, locally
    kubetune generate --config FILE --adapter DIR --prompt "..."
    kubetune ui --config FILE                               MLflow UI on the run's tracking store
    kubetune config [--config FILE] [--explain]             the resolved config, or every key documented
    kubetune pipeline compile|run|upload|submit|schedule    Kubeflow Pipelines (see `kubetune pipeline --help`)

Exit codes: 0 done, 2 bad input (one line naming the file/row/key), 3 preempted (run again to resume), 1 other.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from kubetune import dag
from kubetune.errors import EXIT_FAILURE, EXIT_OK, PeerLost, Preempted, UserError

log = logging.getLogger("kubetune")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not verbose:
        for noisy in (
            "transformers",
            "datasets",
            "peft",
            "trl",
            "accelerate",
            "bitsandbytes",
            "httpx",
            "urllib3",
            "mlflow",
            "alembic",
            "huggingface_hub",
            "filelock",
        ):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        try:
            import datasets
            import transformers

            datasets.disable_progress_bars()
            transformers.utils.logging.set_verbosity_error()
            transformers.utils.logging.disable_progress_bar()
        except ImportError:
            pass
        import warnings

        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)


def config_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    """``--config`` and ``--set KEY=VALUE``, as every command that reads a config takes them (``kubetune-pipeline``
    too)."""
    p.add_argument("--config", "-c", required=required, help="YAML config (see configs/ for presets)")
    p.add_argument(
        "--set",
        "-s",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set lora.r=8 (repeatable)",
    )


def _config_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    config_args(p, required)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output with other inputs")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging, library warnings shown")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubetune",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit codes: 0 done, 2 bad input, 3 preempted (rerun to resume), 1 other.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for stage in dag.STAGES:
        p = sub.add_parser(stage.name, help=stage.summary)
        _config_args(p)
        if not stage.inputs:
            p.add_argument("--data", help="dataset path or hub id (same as --set data.path=...)")
        for name in stage.inputs:
            source = dag.BY_NAME[name]
            p.add_argument(
                f"--{source.option}", help=f"{source.artifact} folder (default: <output_dir>/{source.folder})"
            )
        p.add_argument("--out", help=f"output folder (default: <output_dir>/{stage.folder})")

    p = sub.add_parser("run", help="all stages in order on this machine")
    _config_args(p, required=True)

    p = sub.add_parser(
        "generate", help="answer prompts with the base model and with the adapter, labelled (or a merged model)"
    )
    _config_args(p)
    p.add_argument("--adapter", help="adapter or merged model folder (default: <output_dir>/adapter)")
    p.add_argument("--prompt", "-p", action="append", default=[], help="a prompt (repeatable); stdin if none")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument(
        "--no-base", action="store_true", help="answer with the adapter only (the base model's answers are skipped)"
    )

    p = sub.add_parser("ui", help="open the MLflow UI on the tracking store of a config")
    _config_args(p)
    p.add_argument("--port", type=int, default=5000)

    p = sub.add_parser("config", help="print the resolved config, or --explain every key")
    _config_args(p)
    p.add_argument("--explain", action="store_true", help="every key with its default and documentation")

    sub.add_parser(
        "pipeline", help="Kubeflow Pipelines: compile, run --local, upload, submit, schedule", add_help=False
    )
    return parser


def _load(args: argparse.Namespace, extra: list[str] | None = None):
    from kubetune import config

    return config.load(args.config, list(args.set) + list(extra or []))


def _dir(cfg, explicit: str | None, stage: str) -> Path:
    return Path(explicit) if explicit else Path(cfg.output_dir) / dag.BY_NAME[stage].folder


def _print(msg: str = "") -> None:
    print(msg, flush=True)


def cmd_stage(args: argparse.Namespace) -> int:
    extra = [f"data.path={args.data}"] if getattr(args, "data", None) else []
    cfg = _load(args, extra)
    stage = dag.BY_NAME[args.command]
    inputs = {name: _dir(cfg, getattr(args, dag.BY_NAME[name].dest), name) for name in stage.inputs}
    world = _world(stage.name)
    hw = machine() if stage.name == "train" else None
    out = dag.run(stage, cfg, inputs, _dir(cfg, args.out, stage.name), overwrite=args.overwrite, hw=hw, world=world)
    if world.is_writer:  # under torchrun the other ranks wrote nothing to point at
        _print(f"{args.command}: done -> {out}")
    return EXIT_OK


def machine():
    """This machine's facts for the train stage, with the user's overrides read from the environment, here."""
    from kubetune import hardware

    return hardware.detect(**hardware.overrides(os.environ))


def _world(command: str):
    """This process's rank under torchrun, read here, once. Only `kubetune train` runs on several processes."""
    from kubetune.distributed import World

    world = World.from_env(os.environ)
    if world.distributed and command != "train":
        raise UserError(
            f"kubetune {command}: runs as one process, not under torchrun (WORLD_SIZE={world.world_size}); "
            "start only `kubetune train` with torchrun"
        )
    return world


def run_all(cfg, *, overwrite: bool = False) -> dict[str, Path]:
    """Every stage in order under ``cfg.output_dir`` (register only with tracking on); returns the output folders."""
    _world("run")
    d = dag.folders(cfg.output_dir)
    for k, stage in enumerate(dag.STAGES, 1):
        if not dag.runs(cfg, stage):
            continue
        log.info("[%d/%d] %s -> %s", k, len(dag.STAGES), stage.name, d[stage.name])
        hw = machine() if stage.name == "train" else None
        dag.run(stage, cfg, {name: d[name] for name in stage.inputs}, d[stage.name], overwrite=overwrite, hw=hw)
    return d


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "n/a" if v is None else str(v)


def run_summary(dirs: dict[str, Path], config_path: str | None = None) -> str:
    """The closing summary: the eval comparison and where everything is."""
    lines = []
    metrics_path = dirs["evaluate"] / "metrics.json"
    if metrics_path.is_file():
        m = json.loads(metrics_path.read_text())
        lines.append("")
        lines.append(f"{'metric':<16}{'base':>12}{'adapter':>12}")
        for key, label in (
            ("eval_loss", "eval loss"),
            ("eval_perplexity", "perplexity"),
            ("exact_match", "exact match"),
            ("rouge_l", "ROUGE-L"),
        ):
            if key in m:
                lines.append(f"{label:<16}{_fmt(m.get('base_' + key)):>12}{_fmt(m.get(key)):>12}")
    summary_path = dirs["train"] / "training_summary.json"
    if summary_path.is_file():
        s = json.loads(summary_path.read_text())
        lines.append(
            f"\ntrained {s.get('global_step')} steps, {s.get('tokens_seen', 0):,} tokens at "
            f"{s.get('train_tokens_per_second', 0):.0f} tokens/s"
        )
    lines.append("")
    for stage, path in dirs.items():
        if path.exists():
            lines.append(f"  {dag.BY_NAME[stage].folder + '/':<12} {path}")
    reg = dirs["register"] / "registration.json"
    if reg.is_file():
        r = json.loads(reg.read_text())
        lines.append(f"\nMLflow: {r.get('tracking_uri')}  experiment {r.get('experiment')!r}  run {r.get('run_id')}")
        if r.get("version"):
            lines.append(
                f"model {r.get('model_name')} v{r.get('version')}: {r.get('promotion')} ({r.get('promotion_reason')})"
            )
        if r.get("status") == "pending":
            lines.append("MLflow was unreachable: results are kept locally; run `kubetune register` again to send")
        lines.append(
            f"open it with: kubetune ui --config {config_path or '<this config>'}   (or mlflow ui --backend-store-uri "
            f"{r.get('tracking_uri')})"
        )
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args)
    dirs = run_all(cfg, overwrite=args.overwrite)
    _print(run_summary(dirs, args.config))
    return EXIT_OK


def cmd_generate(args: argparse.Namespace) -> int:
    from kubetune.generation import answer

    cfg = _load(args)
    prompts = args.prompt or [line.strip() for line in sys.stdin if line.strip()]
    if not prompts:
        raise UserError("generate: no prompts; pass --prompt TEXT (repeatable) or lines on stdin")
    adapter = _dir(cfg, args.adapter, "train")
    adapter_cfg = adapter / "config.yaml"
    method = cfg.method
    if adapter_cfg.is_file():  # the adapter records how it was trained (a QLoRA adapter needs its quantised base)
        import yaml

        method = (yaml.safe_load(adapter_cfg.read_text()) or {}).get("method", method)
    answers = answer(
        cfg.model,
        adapter,
        prompts,
        with_base=not args.no_base,
        max_new_tokens=args.max_new_tokens,
        system_prompt=cfg.data.system_prompt,
        threads=cfg.train.threads,
        quant=cfg.quant if method == "qlora" else None,
    )
    _print(format_answers(answers, adapter))
    return EXIT_OK


def format_answers(answers, folder: Path) -> str:
    """Each prompt with its answers labelled: the base model's (where there is one) above the adapter's."""
    from kubetune.generation import is_adapter

    tuned_label = f"adapter ({folder})" if is_adapter(folder) else f"merged model ({folder})"
    blocks = []
    for a in answers:
        lines = [f"### {a.prompt}"]
        if a.base is not None:
            lines += ["base model:", _indent(a.base)]
        lines += [f"{tuned_label}:", _indent(a.tuned)]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in (text or "(empty answer)").splitlines())


UI_START_TIMEOUT_S = 180.0  # a fresh sqlite store takes 10-15 s to migrate on first start


def cmd_ui(args: argparse.Namespace) -> int:
    """Start ``mlflow ui`` on the config's store, say so, print the URL once it answers, and run until stopped."""
    import signal
    import subprocess

    from kubetune.tracking import resolve_uri, ui_command

    cfg = _load(args)
    uri = resolve_uri(cfg)
    cmd = ui_command(cfg, port=args.port)
    url = f"http://127.0.0.1:{args.port}"
    _print(f"starting the MLflow UI for {uri} ({' '.join(cmd)}); waiting for it to answer on {url} ...")
    try:
        proc = subprocess.Popen(cmd)
    except OSError as err:
        raise UserError(f"cannot start `{cmd[0]}` ({err.strerror}); is mlflow installed in this environment?") from None
    # SIGTERM (a closed session, `kill`) stops the UI too; Ctrl-C reaches both processes from the terminal.
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    try:
        if not _wait_until_answers(proc, url + "/health", UI_START_TIMEOUT_S):
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
                raise UserError(f"the MLflow UI did not answer on {url} within {UI_START_TIMEOUT_S:.0f} s; stopped it")
            # mlflow ui exits 0 even when it could not bind its port
            raise UserError(
                f"the MLflow UI stopped before it answered on {url} (exit code {proc.returncode}; its messages are "
                f"above); if port {args.port} is taken, pass --port"
            )
        _print(f"MLflow UI: {url}   (Ctrl-C stops it)")
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        return EXIT_OK
    if rc not in (0, -signal.SIGTERM, -signal.SIGINT):
        raise UserError(f"the MLflow UI exited with code {rc} (its messages are above)")
    return EXIT_OK


def _wait_until_answers(proc, health_url: str, timeout_s: float) -> bool:
    """Poll ``health_url`` until it answers 200 (True), or ``proc`` exits or the time is up (False)."""
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(health_url, timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    return False


def cmd_config(args: argparse.Namespace) -> int:
    from kubetune import config

    _print(config.explain() if args.explain else config.dump(_load(args)))
    return EXIT_OK


# Commands that load a model start under tcmalloc where it is installed (kubetune.cpu.allocator.allocator_preload_env).
_MODEL_COMMANDS = frozenset({"train", "evaluate", "run", "generate"})


def _restart_under_allocator(argv: list[str]) -> None:
    """Replace this process with the same command line under tcmalloc (``LD_PRELOAD``: malloc can only be replaced
    when a process starts) for the commands that load a model, where ``KUBETUNE_ALLOCATOR`` and the machine say so.
    A no-op in the restarted process: its ``LD_PRELOAD`` already names the allocator."""
    command = argv[0] if argv else ""
    if command not in _MODEL_COMMANDS and not (command == "pipeline" and "--local" in argv):
        return
    from kubetune.cpu import allocator

    changes = allocator.allocator_preload_env()
    if changes is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, {**os.environ, **changes})
    except OSError as err:  # carry on where we are: the C library's malloc, which the train stage tunes
        print(f"kubetune: warning: could not restart under {changes['LD_PRELOAD']}: {err}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the process's own command line (the console script, python -m kubetune.cli)
        argv = sys.argv[1:]
        rc = _guard(lambda: _restart_under_allocator(argv))  # returns only where no restart is due
        if rc:
            return rc
    argv = list(argv)
    if argv and argv[0] == "pipeline":
        # The KFP commands live with the pipeline code (the `kubetune-pipeline` console script); the library never
        # imports kfp, it finds that command through the entry point the package declares.
        _setup_logging("-v" in argv or "--verbose" in argv)
        return _guard(lambda: _command("pipeline")(argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(getattr(args, "verbose", False))
    handlers = {"run": cmd_run, "generate": cmd_generate, "ui": cmd_ui, "config": cmd_config}
    return _guard(lambda: handlers.get(args.command, cmd_stage)(args))


def _command(name: str):
    """The ``main`` of the installed command ``name`` (entry point group ``kubetune.commands``)."""
    from importlib.metadata import entry_points

    found = entry_points(group="kubetune.commands", name=name)
    if not found:
        raise UserError(f"kubetune {name}: not in this installation: reinstall kubetune (`pip install -e .`)")
    return next(iter(found)).load()


def _guard(fn) -> int:
    try:
        return int(fn() or 0)
    except UserError as err:
        # One line, always: a value quoted from the input may itself hold line breaks.
        message = " ".join(str(err).splitlines())
        print(f"kubetune: error: {message}", file=sys.stderr, flush=True)
        return err.exit_code
    except (Preempted, PeerLost) as err:
        print(f"kubetune: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    except KeyboardInterrupt:
        print("kubetune: interrupted", file=sys.stderr)
        return 130
    except Exception:
        log.exception("unexpected failure (a bug, or an environment problem the message above names)")
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
