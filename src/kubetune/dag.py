"""The stages of a fine-tune, in order, and what each reads: the one table behind ``kubetune run``, the stage
commands (``kubetune prepare`` ... ``kubetune register``) and the KFP pipeline (:mod:`pipelines.sft_pipeline`
wires its tasks' artifacts from it; tests/pipeline checks the components' inputs and outputs against it).

::

    prepare -> pack -> train -> evaluate -> register
       `--------`-------`----------'           (evaluate reads train, pack, prepare;
       `--------`-------`----------`-----------' register reads train, evaluate, pack, prepare)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kubetune.config import Config
    from kubetune.distributed import World
    from kubetune.hardware import Hardware


@dataclass(frozen=True)
class Stage:
    """One stage: its command and task name, where it writes and what it reads."""

    name: str  # the CLI command and the KFP task
    folder: str  # its output folder under the config's output_dir
    artifact: str  # its output artifact in the KFP pipeline (the same folder, written into the artifact's path)
    option: str  # the CLI option through which later stages are pointed at its output (--prepared ...)
    inputs: tuple[str, ...]  # the stages whose outputs it reads
    summary: str  # one line for `kubetune --help`

    @property
    def dest(self) -> str:
        """The argparse attribute of :attr:`option`."""
        return self.option.replace("-", "_")


STAGES: tuple[Stage, ...] = (
    Stage("prepare", "prepared", "prepared_dataset", "prepared", (), "raw dataset -> prepared_dataset"),
    Stage("pack", "packed", "packed_dataset", "packed", ("prepare",), "prepared_dataset -> packed_dataset"),
    Stage("train", "adapter", "adapter", "adapter", ("pack",), "packed_dataset -> adapter (LoRA / QLoRA)"),
    Stage(
        "evaluate",
        "eval",
        "eval_report",
        "eval-report",
        ("train", "pack", "prepare"),
        "adapter + held-out rows -> eval_report",
    ),
    Stage(
        "register",
        "registered",
        "registration",
        "registered",
        ("train", "evaluate", "pack", "prepare"),
        "adapter + eval_report -> MLflow run, model version, promotion gate",
    ),
)
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}


def folders(root: str | Path) -> dict[str, Path]:
    """Every stage's output folder under ``root`` (a config's ``output_dir``), in stage order."""
    return {s.name: Path(root) / s.folder for s in STAGES}


def runs(cfg: Config, stage: Stage) -> bool:
    """Whether ``kubetune run`` runs ``stage`` for ``cfg``: every stage, and register only with tracking on."""
    return stage.name != "register" or cfg.tracking.enabled


def run(
    stage: Stage,
    cfg: Config,
    inputs: Mapping[str, Path],
    out: Path,
    *,
    overwrite: bool = False,
    hw: Hardware | None = None,
    world: World | None = None,
) -> Path:
    """Run ``stage`` on the outputs of its :attr:`~Stage.inputs` (``inputs``: stage name -> folder) into ``out``;
    returns ``out``. ``hw``: the machine's facts for the train stage (default: detected there); ``world``: its
    rank under torchrun (default: one process)."""
    missing = [name for name in stage.inputs if name not in inputs]
    if missing:
        raise TypeError(f"stage {stage.name} needs the outputs of {', '.join(missing)}")  # programming error
    i = {name: inputs[name] for name in stage.inputs}
    if stage.name == "prepare":
        from kubetune.prepare import prepare

        return prepare(cfg, out, overwrite=overwrite)
    if stage.name == "pack":
        from kubetune.pack import pack

        return pack(cfg, i["prepare"], out, overwrite=overwrite)
    if stage.name == "train":
        from kubetune.train import train

        return train(cfg, i["pack"], out, overwrite=overwrite, hw=hw, world=world)
    if stage.name == "evaluate":
        from kubetune.evaluation import evaluate

        return evaluate(cfg, i["train"], i["pack"], i["prepare"], out, overwrite=overwrite)
    from kubetune.register import register

    return register(cfg, i["train"], i["evaluate"], out, prepared=i["prepare"], packed=i["pack"], overwrite=overwrite)
