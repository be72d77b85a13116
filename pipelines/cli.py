"""`kubetune pipeline ...`: compile the pipeline, run it locally, upload it, submit runs and schedules.

    kubetune pipeline compile [--out build/sft_pipeline.yaml] [--cpu-image REF] [--gpu-image REF]
    kubetune pipeline run --local --config FILE [--set KEY=VALUE ...] [--root DIR]
    kubetune pipeline upload --host URL [--file build/sft_pipeline.yaml] [--name kubetune-sft]
    kubetune pipeline submit --host URL --config FILE [--experiment NAME]
    kubetune pipeline schedule --host URL --cron "0 3 * * *" [--config FILE] [--name NAME]
    kubetune pipeline schedule --host URL [--name NAME] --pause|--resume|--delete

Exit codes: 0 done; 2 bad input or a request the KFP API refused (one line says which); 1 anything else (the
host cannot be reached, a server error, a failed local run).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from kubetune.cli import config_args
from kubetune.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, UserError
from pipelines.placement import SERVICE_ACCOUNT

DEFAULT_PACKAGE = "build/sft_pipeline.yaml"
DEFAULT_EXPERIMENT = "kubetune"
# The Kubernetes service account runs execute as (manifests/base/pipeline): its Google identity reads and writes
# the artifacts bucket through Workload Identity.
DEFAULT_SERVICE_ACCOUNT = SERVICE_ACCOUNT


def _out(line: str) -> None:
    print(line, flush=True)


def _remote_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--host",
        required=True,
        help="KFP API base URL, e.g. http://localhost:8080 (port-forward to ml-pipeline-ui) or https://HOST/pipeline",
    )
    p.add_argument("--namespace", help="Kubeflow profile namespace (multi-user deployments)")
    p.add_argument("--ui-host", help="base URL for the links printed (default: --host)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the API (default 30)")


def _run_as(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--service-account",
        default=DEFAULT_SERVICE_ACCOUNT,
        help=f"Kubernetes service account of the run's pods (default {DEFAULT_SERVICE_ACCOUNT}; '' for KFP's)",
    )


def _config_args(p: argparse.ArgumentParser, required: bool) -> None:
    config_args(p, required)
    p.add_argument(
        "--accelerator",
        choices=("cpu", "gpu"),
        default="cpu",
        help="train on the C3 CPU pool (default) or the GPU pool",
    )
    p.add_argument("--force", action="store_true", help="train even when the data is the champion's")


def _train_nodes(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--train-nodes",
        type=int,
        default=None,
        metavar="N",
        help="train_nodes parameter: nodes that train together (default 1; more run a Kubeflow Trainer TrainJob)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubetune pipeline",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit codes: 0 done, 2 bad input or refused request, 1 other.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("compile", help="compile the pipeline to YAML for upload")
    p.add_argument("--out", default=DEFAULT_PACKAGE, help=f"output file (default {DEFAULT_PACKAGE})")
    p.add_argument("--cpu-image", help="image for every step but GPU training (default kubetune-cpu:<version>)")
    p.add_argument("--gpu-image", help="image for GPU training (default kubetune-gpu:<version>)")
    p.add_argument(
        "--checkpoint-gcsfuse",
        action="store_true",
        help="the checkpoint PVC is a GCS bucket through GKE's GCS FUSE CSI driver (adds the sidecar annotation)",
    )
    p.add_argument(
        "--checkpoint-pvc",
        help="PersistentVolumeClaim mounted in the train pods for checkpoints (becomes the default checkpoint_root)",
    )

    p = sub.add_parser("run", help="run the pipeline locally through kfp.local")
    p.add_argument("--local", action="store_true", help="required: run on this machine (use `submit` for a cluster)")
    _config_args(p, required=True)
    p.add_argument(
        "--root",
        help="folder for the runs, checkpoints and default MLflow store (default: the config's output_dir)",
    )
    p.add_argument(
        "--refresh-data",
        action="store_true",
        help="take the prepare-fresh branch (locally nothing is cached: both read the data)",
    )

    p = sub.add_parser("upload", help="upload the compiled pipeline, or add a version to it")
    _remote_args(p)
    p.add_argument("--file", default=DEFAULT_PACKAGE, help=f"compiled pipeline (default {DEFAULT_PACKAGE})")
    p.add_argument("--name", default=None, help="pipeline name (default kubetune-sft)")
    p.add_argument("--version", help="version name (default <name>-<UTC time>-<sha256 prefix>)")
    p.add_argument("--description", help="version description")

    p = sub.add_parser("submit", help="create a run, with parameters from a config file")
    _remote_args(p)
    _run_as(p)
    _config_args(p, required=False)
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help=f"KFP experiment (default {DEFAULT_EXPERIMENT})")
    p.add_argument("--run-name", help="run name (default: <pipeline> <model> <UTC time>)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--pipeline", help="run the latest version of this uploaded pipeline (default kubetune-sft)")
    src.add_argument("--file", help="run this compiled pipeline file instead of an uploaded one")
    p.add_argument("--checkpoint-root", default=None, help="checkpoint_root parameter (a path in the train pod)")
    _train_nodes(p)
    p.add_argument("--refresh-data", action="store_true", help="re-read the data even if prepare is cached")

    p = sub.add_parser("schedule", help="create or update a recurring run (idempotent by name)")
    _remote_args(p)
    _run_as(p)
    _config_args(p, required=False)
    p.add_argument("--cron", help="cron expression: 5 fields ('0 3 * * *') or 6 with seconds first")
    p.add_argument("--name", help="recurring run name (default <pipeline>-recurring)")
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help=f"KFP experiment (default {DEFAULT_EXPERIMENT})")
    p.add_argument(
        "--pipeline",
        default=None,
        help="uploaded pipeline to run (default kubetune-sft); runs follow its latest version",
    )
    p.add_argument("--checkpoint-root", default=None, help="checkpoint_root parameter (a path in the train pod)")
    _train_nodes(p)
    act = p.add_mutually_exclusive_group()
    act.add_argument("--pause", action="store_true", help="pause the recurring run")
    act.add_argument("--resume", action="store_true", help="resume the recurring run")
    act.add_argument("--delete", action="store_true", help="delete the recurring run")
    return parser


def cmd_compile(args: argparse.Namespace) -> int:
    from pipelines.images import Images, default_images
    from pipelines.sft_pipeline import compile_pipeline

    defaults = default_images()
    images = Images(cpu=args.cpu_image or defaults.cpu, gpu=args.gpu_image or defaults.gpu)
    if args.checkpoint_pvc is not None and not args.checkpoint_pvc.strip():
        raise UserError("--checkpoint-pvc: empty; give the PersistentVolumeClaim's name")
    out = compile_pipeline(
        args.out, images, checkpoint_pvc=args.checkpoint_pvc, checkpoint_gcsfuse=args.checkpoint_gcsfuse
    )
    _out(
        f"compiled {out} (cpu image {images.cpu}, gpu image {images.gpu}"
        + (f", checkpoints on PVC {args.checkpoint_pvc})" if args.checkpoint_pvc else ")")
    )
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    if not args.local:
        raise UserError(
            "`kubetune pipeline run` needs --local (this machine); to run on a cluster use "
            "`kubetune pipeline submit --host URL --config FILE`"
        )
    from pipelines.arguments import load_config
    from pipelines.local import run_local

    root = args.root
    if root is None:
        root = load_config(args.config, args.set)[1].output_dir
    result = run_local(
        args.config,
        args.set,
        root=root,
        accelerator=args.accelerator,
        force=args.force,
        refresh_data=args.refresh_data,
    )
    _out(f"local pipeline run finished: {result.run_dir}")
    _out(f"  data check: {result.verdict}")
    for name, path in result.outputs.items():
        _out(f"  {name}: {path}")
    if result.registration:
        reg = result.registration
        _out(
            f"  registered {reg.get('model_name')} version {reg.get('version')}: {reg.get('promotion')} "
            f"({reg.get('promotion_reason')}); MLflow run {reg.get('run_id')} at {reg.get('tracking_uri')}"
        )
    return EXIT_OK


def _arguments(args: argparse.Namespace, *, refresh_data: bool) -> dict:
    from pipelines.arguments import check_for_cluster, check_train_nodes, load_config, pipeline_arguments

    if args.config is None and args.set:
        raise UserError("--set needs --config (the named parameters come from a whole config)")
    if args.config is None:
        # No config: the pipeline's own defaults, except what was asked for on the command line.
        arguments = {"accelerator": args.accelerator, "force": args.force, "refresh_data": refresh_data}
        if args.checkpoint_root is not None:
            arguments["checkpoint_root"] = args.checkpoint_root
        if args.train_nodes is not None:
            arguments["train_nodes"] = check_train_nodes(args.train_nodes)
        return arguments
    raw, cfg = load_config(args.config, args.set)
    for warning in check_for_cluster(cfg):
        print(f"kubetune: warning: {warning}", file=sys.stderr, flush=True)
    arguments = pipeline_arguments(
        raw,
        cfg,
        accelerator=args.accelerator,
        force=args.force,
        checkpoint_root=args.checkpoint_root or "",
        refresh_data=refresh_data,
        train_nodes=1 if args.train_nodes is None else args.train_nodes,
    )
    if args.checkpoint_root is None:
        del arguments["checkpoint_root"]  # keep the compiled default (the checkpoint PVC mount, if any)
    return arguments


def _connect(args: argparse.Namespace):
    from pipelines.client import connect

    return connect(args.host, namespace=args.namespace, ui_host=args.ui_host, timeout=args.timeout)


def cmd_upload(args: argparse.Namespace) -> int:
    from pipelines.client import upload
    from pipelines.sft_pipeline import PIPELINE_NAME

    name = args.name or PIPELINE_NAME
    if not Path(args.file).is_file():
        raise UserError(f"{args.file}: not found; compile it first (`kubetune pipeline compile --out {args.file}`)")
    result = upload(_connect(args), args.file, name, version=args.version, description=args.description)
    verb = {
        "created": "uploaded pipeline",
        "version-added": "added version to pipeline",
        "unchanged": "already uploaded: pipeline",
    }[result["action"]]
    _out(f"{verb} {name} (version {result['version']}): {result['link']}")
    return EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    from pipelines.client import submit
    from pipelines.sft_pipeline import PIPELINE_NAME

    arguments = _arguments(args, refresh_data=args.refresh_data)
    pipeline = None if args.file else (args.pipeline or PIPELINE_NAME)
    model = Path(str(arguments.get("model") or "default-model")).name
    run_name = (
        args.run_name or f"{pipeline or PIPELINE_NAME} {model} {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())}"
    )
    result = submit(
        _connect(args),
        arguments,
        experiment=args.experiment,
        run_name=run_name,
        pipeline=pipeline,
        package=args.file,
        service_account=args.service_account,
    )
    source = f"version {result['version']} of {pipeline}" if pipeline else args.file
    _out(f"submitted run {result['run_id']} ({source}) in experiment {args.experiment}: {result['link']}")
    return EXIT_OK


def cmd_schedule(args: argparse.Namespace) -> int:
    from pipelines.client import schedule
    from pipelines.sft_pipeline import PIPELINE_NAME

    pipeline = args.pipeline or PIPELINE_NAME
    name = args.name or f"{pipeline}-recurring"
    action = "pause" if args.pause else "resume" if args.resume else "delete" if args.delete else "apply"
    arguments = None
    if action == "apply":
        if not args.cron:
            raise UserError(
                "--cron is required to create or update a recurring run, e.g. --cron '0 3 * * *' "
                "(or pass --pause, --resume or --delete)"
            )
        # Scheduled runs re-read the data (refresh_data): new rows behind an unchanged path must be seen.
        arguments = _arguments(args, refresh_data=True)
    elif args.cron or args.config:
        raise UserError(f"--{action} acts on the existing recurring run; drop --cron/--config")
    result = schedule(
        _connect(args),
        name,
        pipeline=pipeline,
        experiment=args.experiment,
        cron=args.cron,
        arguments=arguments,
        action=action,
        service_account=args.service_account,
    )
    what = result["action"]
    detail = f" (cron '{result['cron']}')" if "cron" in result else ""
    if what == "unchanged":
        _out(f"recurring run {name} is up to date{detail}: {result['link']}")
    elif what == "deleted":
        _out(f"deleted recurring run {name}")
    else:
        _out(f"{what} recurring run {name}{detail}: {result['link']}")
    return EXIT_OK


COMMANDS = {
    "compile": cmd_compile,
    "run": cmd_run,
    "upload": cmd_upload,
    "submit": cmd_submit,
    "schedule": cmd_schedule,
}


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (the words after `kubetune pipeline`) and run the command; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exit_:  # argparse: 0 for --help, 2 for bad usage (it printed why)
        return int(exit_.code or 0)
    try:
        return COMMANDS[args.command](args)
    except UserError as err:
        print(f"kubetune: error: {err}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except Exception as err:
        # Unreachable host, server errors, a failed local step: one line, exit 1. Anything else is a bug and
        # keeps its traceback.
        from pipelines.client import KfpUnavailable
        from pipelines.local import LocalRunFailed

        if not isinstance(err, KfpUnavailable | LocalRunFailed):
            raise
        print(f"kubetune: error: {err}", file=sys.stderr, flush=True)
        return EXIT_FAILURE
