"""register: the adapter and its evaluation into MLflow (adapter + eval_report -> registered_model).

One MLflow run per kubetune run (tagged ``kubetune.run_id`` = the adapter's fingerprint, so registering again never
makes a second run) in experiment ``tracking.experiment`` with:

- params: the full resolved config (``cfg.flat()``, values as strings);
- metrics: every number in the eval report's ``metrics.json`` (``eval_loss``, ``base_eval_loss``, ...), the training
  summary's ``train_tokens_per_second``, ``train_seconds``, ``tokens_seen``, ``global_step``, ``final_loss``,
  ``peak_rss_bytes``, ``world_size``, ``collective_seconds_per_step``, ``allreduce_bytes_per_step``,
  ``allgather_bytes_per_step`` (fsdp) and each rank's ``train_tokens_per_second_rank_<r>``, the data/pack counts
  (``data.*``, ``pack.*``), and the training curve as ``train_loss`` by step;
- artifacts: ``adapter/`` (the whole adapter folder: weights, tokenizer, ``base_model.json``, ``merged/`` when
  made), ``eval/``, ``data/`` and ``pack/`` reports, ``training_summary.json``, ``config.yaml``;
- tags: ``kubetune.distributed_backend`` (``gloo``, ``nccl``, ``ccl``; ``none`` for one process) and
  ``kubetune.distributed_strategy`` (``ddp``, ``fsdp``; ``none`` for one process);
- dataset lineage: the prepared train and eval splits as MLflow dataset inputs, digest = data fingerprint;
- the eval report as the run's description.

A version of the registered model (``tracking.registered_model``, default ``kubetune-<model basename>``) points
at the run's ``adapter/`` (adapter + base reference, not ``mlflow.transformers``: a PEFT model on a local base does
not round-trip through it), tagged ``kubetune.data_fingerprint``, ``kubetune.eval_loss``, ``kubetune.base_model``.
The promotion gate (:func:`kubetune.promotion.promote`, run on MLflow by :func:`kubetune.tracking.promote`) moves
alias ``champion`` only for a real improvement and records ``kubetune.promotion`` / ``kubetune.promotion_reason`` on
the version and the run.

Output folder::

    registration.json  tracking_uri, experiment, run_id, model_name, version, promotion, promotion_reason,
                       champion_version, status ("registered" | "pending" | "disabled"), kubetune_run_id
    outbox.json        only while pending: everything that was to be sent (params, metrics, tags, artifact paths)
    outbox/            only while pending: the artifacts to send, hard-linked (or copied) from the inputs
    manifest.json

``registration.json`` is this registration's view when it finished; when several runs register at once, a racer
finishing later may still take the alias from it (and re-tag it in MLflow): MLflow's tags are the final word.

When MLflow is unreachable (after bounded retries) the stage still succeeds: it keeps the outbox, marks the
registration ``pending`` and warns. Running ``kubetune register`` again with the same inputs sends the outbox
(the MLflow side is idempotent) and replaces the folder with a ``registered`` one. Nothing is lost.

Also here, because they read the registry: :func:`check_data`, a recurring run's "has the data changed since the
champion?" decision (the pipeline's data check), and the reports for people of both (:func:`data_check_report`,
:func:`registration_report`, rendered by :mod:`kubetune.report`).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune import report as rpt
from kubetune import tracking
from kubetune.artifacts import (
    MANIFEST,
    fingerprint,
    output_lock,
    read_json,
    read_manifest,
    stage_output,
    version,
    write_json,
)
from kubetune.config import Config
from kubetune.errors import UserError

log = logging.getLogger(__name__)

UNCHANGED = "unchanged"  # check_data's verdict that skips training; every other verdict trains
REGISTRATION = "registration.json"
OUTBOX = "outbox.json"
OUTBOX_DIR = "outbox"
SUMMARY_METRICS = (
    "train_tokens_per_second",
    "train_seconds",
    "tokens_seen",
    "global_step",
    "max_steps",
    "final_loss",
    "peak_rss_bytes",
    "peak_gpu_memory_bytes",
    "trainable_parameters",
    "total_parameters",
    "world_size",
    "collective_seconds_per_step",
    "allreduce_bytes_per_step",
    "allgather_bytes_per_step",
)


def _metric_key(key: str) -> str:
    """A name MLflow accepts as a metric key (word characters, `.`, `-`, `/`, space)."""
    return re.sub(r"[^\w.\- /]", "_", key).replace("..", "_").lstrip("/")[:250] or "_"


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def _optional_json(path: Path) -> dict[str, Any]:
    try:
        data = read_json(path)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable JSON ({err}); re-run the stage that wrote it") from None
    return data if isinstance(data, dict) else {}


def _upstream(manifest: dict[str, Any], key: str, stage: str) -> tuple[Path | None, dict[str, Any] | None]:
    """A stage folder recorded in the eval report's manifest inputs, when it is still there and complete."""
    entry = (manifest.get("inputs") or {}).get(key) or {}
    path = entry.get("path")
    if not path:
        return None, None
    try:
        return Path(path), read_manifest(path, stage)
    except UserError:
        return None, None


def build_payload(
    cfg: Config,
    adapter: Path,
    eval_report: Path,
    prepared: Path | None,
    packed: Path | None,
    *,
    uri: str,
    model_name: str,
    run_key: str,
    data_fp: str | None,
) -> dict[str, Any]:
    """What register sends to MLflow, as plain data (see :mod:`kubetune.tracking` for the format)."""
    metrics_path = eval_report / "metrics.json"
    if not metrics_path.is_file():
        raise UserError(f"{metrics_path}: not found; re-run `kubetune evaluate`")
    eval_metrics = _optional_json(metrics_path)
    eval_loss, base_eval_loss = _number(eval_metrics.get("eval_loss")), _number(eval_metrics.get("base_eval_loss"))
    if eval_loss is None or base_eval_loss is None:
        raise UserError(f"{metrics_path}: eval_loss/base_eval_loss missing or not finite; re-run `kubetune evaluate`")
    summary = _optional_json(adapter / "training_summary.json")
    if not summary:
        log.warning("%s: no training_summary.json; the run will lack training metrics", adapter)
    base_ref = _optional_json(adapter / "base_model.json")
    base_name = str(base_ref.get("name_or_path") or cfg.model.name_or_path)
    method = str(summary.get("method") or cfg.method)

    metrics: dict[str, float] = {}
    for k, v in eval_metrics.items():
        if (n := _number(v)) is not None:
            metrics[_metric_key(k)] = n
    for k in SUMMARY_METRICS:
        if (n := _number(summary.get(k))) is not None:
            metrics[k] = n
    for rank, rate in enumerate(summary.get("tokens_per_second_per_rank") or []):
        if (n := _number(rate)) is not None:
            metrics[f"train_tokens_per_second_rank_{rank}"] = n
    if "train_tokens_per_second" not in metrics:
        log.warning("%s: training_summary.json has no train_tokens_per_second", adapter)
    for prefix, folder in (("data", prepared), ("pack", packed)):
        if folder is not None:
            for k, v in (read_manifest(folder).get("counts") or {}).items():
                if (n := _number(v)) is not None:
                    metrics[_metric_key(f"{prefix}.{k}")] = n
    curve = [
        [int(s), float(v)]
        for s, v in summary.get("loss_curve") or []
        if _number(s) is not None and _number(v) is not None
    ]

    artifacts: list[dict[str, str]] = [
        {"path": str(adapter), "artifact_path": "adapter"},
        {"path": str(eval_report), "artifact_path": "eval"},
    ]
    for name in ("training_summary.json", "config.yaml"):
        if (adapter / name).is_file():
            artifacts.append({"path": str(adapter / name), "artifact_path": ""})
    for folder, names, dest in (
        (prepared, ("data_report.json", "data_report.md"), "data"),
        (packed, ("pack_report.json", "pack_report.md"), "pack"),
    ):
        for name in names:
            if folder is not None and (folder / name).is_file():
                artifacts.append({"path": str(folder / name), "artifact_path": dest})

    datasets = []
    if prepared is not None and data_fp:
        stem = Path(cfg.data.path.rstrip("/")).stem or "prepared"  # named after the data, not the model
        for split, context in (("train", "train"), ("eval", "eval")):
            if (prepared / f"{split}.jsonl").is_file():
                datasets.append(
                    tracking.dataset_record(
                        prepared / f"{split}.jsonl", name=f"{stem}-{split}", digest=data_fp, context=context
                    )
                )

    tags = {
        tracking.TAG_RUN_KEY: run_key,
        tracking.TAG_BASE_MODEL: base_name,
        "kubetune.method": method,
        "kubetune.version": version(),
    }
    if data_fp:
        tags[tracking.TAG_DATA_FINGERPRINT] = data_fp
    if base_ref.get("weights_sha256"):
        tags["kubetune.base_weights_sha256"] = str(base_ref["weights_sha256"])
    if summary.get("world_size"):
        tags["kubetune.distributed_backend"] = str(summary.get("backend") or "none")
        tags["kubetune.distributed_strategy"] = str(summary.get("strategy") or "none")
    version_tags = {
        k: tags[k]
        for k in (tracking.TAG_RUN_KEY, tracking.TAG_BASE_MODEL, "kubetune.method", tracking.TAG_DATA_FINGERPRINT)
        if k in tags
    }
    version_tags[tracking.TAG_EVAL_LOSS] = repr(eval_loss)
    version_tags[tracking.TAG_BASE_EVAL_LOSS] = repr(base_eval_loss)
    merged = (adapter / "merged").is_dir()
    report = eval_report / "eval_report.md"
    run_name = cfg.tracking.run_name or f"{model_name.removeprefix('kubetune-')}-{method}-{run_key[:8]}"
    return {
        "format": 1,
        "tracking_uri": uri,
        "experiment": cfg.tracking.experiment,
        "run": {
            "key": run_key,
            "name": run_name,
            "tags": tags,
            "params": tracking.params_from_flat(cfg.flat()),
            "metrics": metrics,
            "history": {"train_loss": curve} if curve else {},
            "artifacts": artifacts,
            "datasets": datasets,
            "note": report.read_text(encoding="utf-8") if report.is_file() else "",
        },
        "model": {
            "name": model_name,
            "artifact_path": "adapter",
            "tags": version_tags,
            "description": f"{method} adapter for {base_name} (eval_loss {eval_loss:.4f}, base "
            f"{base_eval_loss:.4f}); the base reference is adapter/base_model.json"
            + ("; merged weights in adapter/merged" if merged else ""),
        },
        "gate": {
            "eval_loss": eval_loss,
            "base_eval_loss": base_eval_loss,
            "min_improvement": cfg.tracking.min_improvement,
        },
    }


def _write_outbox(tmp: Path, payload: dict[str, Any], base_dir: Path | None) -> dict[str, Any]:
    """Snapshot the artifacts under ``tmp/outbox/`` and write ``tmp/outbox.json`` (paths relative to the folder)."""
    kept = json.loads(json.dumps(payload))
    for i, a in enumerate(kept["run"]["artifacts"]):
        src = Path(a["path"])
        if src.is_absolute():
            rel = Path(OUTBOX_DIR) / f"{i:02d}-{src.name}"
        else:  # already a snapshot inside the previous outbox: keep its place
            rel, src = src, (base_dir or Path.cwd()) / src
        tracking.link_or_copy(src, tmp / rel)
        a["path"] = str(rel)
    write_json(tmp / OUTBOX, kept)
    return kept


def register(
    cfg: Config,
    adapter: str | Path,
    eval_report: str | Path,
    out: str | Path,
    *,
    prepared: str | Path | None = None,
    packed: str | Path | None = None,
    overwrite: bool = False,
    retry: tracking.Retry | None = None,
) -> Path:
    """Register the adapter and its eval report in MLflow; write ``out`` (see the module doc) and return it.

    ``prepared``/``packed`` add the data and pack reports and the dataset lineage; when omitted they are taken from
    the eval report's manifest if those folders still exist. ``retry`` bounds the attempts (tests make it fast).
    """
    adapter, eval_report, out = Path(adapter), Path(eval_report), Path(out)
    a_m = read_manifest(adapter, "train")
    e_m = read_manifest(eval_report, "evaluate")
    if prepared is not None:
        prepared, d_m = Path(prepared), read_manifest(prepared, "prepare")
    else:
        prepared, d_m = _upstream(e_m, "prepared", "prepare")
    if packed is not None:
        packed, k_m = Path(packed), read_manifest(packed, "pack")
    else:
        packed, k_m = _upstream(e_m, "packed", "pack")
    data_fp = (d_m or {}).get("fingerprint") or ((e_m.get("inputs") or {}).get("prepared") or {}).get("fingerprint")
    run_key = a_m["fingerprint"]
    uri = tracking.resolve_uri(cfg)
    base_name = str(_optional_json(adapter / "base_model.json").get("name_or_path") or "")
    model_name = tracking.registered_model_name(cfg, base_name)
    fp = fingerprint(
        "register", run_key, e_m["fingerprint"], data_fp, (k_m or {}).get("fingerprint"), cfg.to_dict(), uri, model_name
    )
    inputs = {
        "adapter": {"path": str(adapter.resolve()), "fingerprint": run_key},
        "eval_report": {"path": str(eval_report.resolve()), "fingerprint": e_m["fingerprint"]},
        "prepared": {"path": str(prepared.resolve()) if prepared else None, "fingerprint": data_fp},
        "packed": {"path": str(packed.resolve()) if packed else None, "fingerprint": (k_m or {}).get("fingerprint")},
    }
    settings = {
        "tracking_uri": uri,
        "experiment": cfg.tracking.experiment,
        "registered_model": model_name,
        "min_improvement": cfg.tracking.min_improvement,
        "enabled": cfg.tracking.enabled,
    }

    with output_lock(out):
        existing = _existing_manifest(out)
        if existing is not None and existing.get("fingerprint") == fp and existing.get("stage") == "register":
            log.info("%s: up to date (already registered, fingerprint %s); nothing to do", out, fp[:12])
            return out
        resend = (
            existing is not None
            and existing.get("registration_fingerprint") == fp
            and existing.get("status") == "pending"
            and (out / OUTBOX).is_file()
        )
        if not resend and not overwrite and out.exists() and any(out.iterdir()):
            what = (
                f"a different `{existing.get('stage')}` output (fingerprint {str(existing.get('fingerprint'))[:12]}"
                f" != {fp[:12]})"
                if existing
                else "something that is not a complete kubetune output"
            )
            raise UserError(f"{out}: holds {what}; pass --overwrite to replace it or choose another output folder")

        if not cfg.tracking.enabled:
            record = {"status": "disabled", "tracking_uri": None, "kubetune_run_id": run_key}
            log.info("tracking.enabled is false: nothing sent to MLflow")
            return _write(out, fp, inputs, settings, record, status="disabled")

        if resend:
            payload, base_dir = read_json(out / OUTBOX), out
            log.info("%s: sending the registration kept while MLflow was unreachable", out)
        else:
            payload = build_payload(
                cfg,
                adapter,
                eval_report,
                prepared,
                packed,
                uri=uri,
                model_name=model_name,
                run_key=run_key,
                data_fp=data_fp,
            )
            base_dir = None
        try:
            result = tracking.send(payload, base_dir=base_dir, retry=retry)
        except tracking.TrackingUnavailable as err:
            log.warning(
                "%s; kept locally in %s, run `kubetune register` again (same inputs) to send it", err, out / OUTBOX
            )
            record = {
                "status": "pending",
                "tracking_uri": uri,
                "experiment": cfg.tracking.experiment,
                "run_id": err.progress.get("run_id"),
                "model_name": model_name,
                "version": err.progress.get("version"),
                "promotion": None,
                "promotion_reason": None,
                "champion_version": None,
                "kubetune_run_id": run_key,
                "error": str(err),
                "outbox": OUTBOX,
            }
            # On a resend the payload's artifact paths point into the current outbox; they are carried over.
            return _write(out, fp, inputs, settings, record, status="pending", outbox=(payload, base_dir))
        record = {**result, "status": "registered", "kubetune_run_id": run_key}
        out = _write(out, fp, inputs, settings, record, status="registered")
        log.info(
            "registered %s version %s in MLflow (%s): %s; champion is version %s. Run: %s",
            result["model_name"],
            result["version"],
            uri,
            result["promotion"],
            result["champion_version"],
            result["run_id"],
        )
        return out


def _existing_manifest(out: Path) -> dict[str, Any] | None:
    if not (out / MANIFEST).is_file():
        return None
    try:
        return read_manifest(out)
    except UserError:
        return None


def _write(
    out: Path,
    fp: str,
    inputs: dict[str, Any],
    settings: dict[str, Any],
    record: dict[str, Any],
    *,
    status: str,
    outbox: tuple[dict[str, Any], Path | None] | None = None,
) -> Path:
    # A pending output gets its own fingerprint so that a later run with the same inputs is not "up to date" but
    # sends the outbox; `registration_fingerprint` ties it to those inputs.
    stage_fp = fp if status != "pending" else fingerprint(fp, "pending", record.get("error"))
    with stage_output(out, "register", stage_fp, inputs=inputs, config=settings, overwrite=True, lock=False) as w:
        if w.up_to_date:
            return out
        if outbox is not None:
            _write_outbox(w.tmp, *outbox)
        write_json(w.tmp / REGISTRATION, record)
        w.extra = {"registration_fingerprint": fp, "status": status}
        w.counts = {"status": status, "version": record.get("version")}
    return out


def champion_data_fingerprint(cfg: Config, retry: tracking.Retry | None = None) -> str | None:
    """The ``kubetune.data_fingerprint`` of the current champion of this config's registered model; None when
    there is no champion, tracking is disabled, or MLflow is unreachable (a recurring run then trains)."""
    if not cfg.tracking.enabled:
        return None
    return tracking.champion_tag(
        tracking.resolve_uri(cfg), tracking.registered_model_name(cfg), tracking.TAG_DATA_FINGERPRINT, retry=retry
    )


# --------------------------------------------------------------------------------------------------------------
# Has the data changed since the champion? (a recurring run's first question)


@dataclass(frozen=True)
class DataCheck:
    """:func:`check_data`'s answer: ``verdict`` is ``unchanged`` (skip training) or why training goes ahead
    (``forced``, ``no-champion``, ``new-data``); ``reason`` says it in words."""

    verdict: str
    reason: str
    current: str
    champion: str | None
    model_name: str
    tracking_uri: str

    @property
    def train(self) -> bool:
        return self.verdict != UNCHANGED


def check_data(cfg: Config, prepared: str | Path, *, force: bool = False) -> DataCheck:
    """Compare the prepared data's fingerprint (its manifest's ``fingerprint``) with the one recorded on the
    registered model's current ``champion`` (:func:`champion_data_fingerprint`): identical data and no ``force``
    means a recurring run has nothing new to learn from."""
    current = read_manifest(prepared, "prepare")["fingerprint"]
    champion = champion_data_fingerprint(cfg)
    if force:
        verdict, why = "forced", "`force` is set: training regardless of the data"
    elif champion is None:
        verdict, why = "no-champion", "no champion model version records its data yet: training"
    elif champion != current:
        verdict, why = "new-data", "the prepared data differs from the champion's: training"
    else:
        verdict, why = UNCHANGED, "the prepared data is identical to the champion's: training skipped"
    return DataCheck(verdict, why, current, champion, tracking.registered_model_name(cfg), tracking.resolve_uri(cfg))


def data_check_report(check: DataCheck, *, accelerator: str) -> rpt.Report:
    """The data check for the run page: verdict, both fingerprints, the registered model, where training runs."""
    return rpt.Report(
        "Data check",
        [
            rpt.Paragraph(f"**{check.verdict}**: {check.reason}."),
            rpt.Facts(
                [("this run", f"`{check.current}`"), ("champion", f"`{check.champion or '-'}`")],
                header=("", "data fingerprint"),
            ),
            rpt.Paragraph(
                f"Registered model `{check.model_name}` at `{check.tracking_uri}`; training runs on `{accelerator}`."
            ),
        ],
    )


_REGISTRATION_KEYS = (
    "status",
    "model_name",
    "version",
    "promotion",
    "promotion_reason",
    "champion_version",
    "experiment",
    "run_id",
    "tracking_uri",
    "error",
)


def registration_report(registration: Mapping[str, Any]) -> rpt.Report:
    """A short summary of ``registration.json`` (the keys people look for, those that are set)."""
    facts = [
        (key, str(registration[key]).replace("|", "/"))  # a pipe would break the table
        for key in _REGISTRATION_KEYS
        if registration.get(key) is not None
    ]
    return rpt.Report("Registration", [rpt.Facts(facts)])
