"""The promotion protocol: which registered version holds alias ``champion``, as pure logic over a
:class:`Registry`.

- :func:`decide`: the policy. A version is promoted only when its eval loss beats the baseline's (the champion's,
  or the base model's when there is no champion) by at least ``min_improvement``, and by more than nothing.
- :func:`promote`: the gate for one version, as a compare-and-set loop, then :func:`converge`.
- :func:`converge`: after racing registrations (or a send cut off half-way), put the alias on the best version that
  earned promotion and re-tag the racers that lost. Every racer computes the same answer, so concurrent calls agree,
  and calling it again changes nothing.

The decision is recorded as version tags (and on the version's run): ``kubetune.promotion`` (``promoted`` |
``rejected``), ``kubetune.promotion_reason`` (a sentence with the numbers) and ``kubetune.promotion_baseline`` (the
champion version compared against, or ``base``). A version's eval loss is its tag ``kubetune.eval_loss``, else
its run's metric ``eval_loss``.

Nothing here talks to a server: :class:`kubetune.tracking.MlflowRegistry` is the MLflow implementation of
:class:`Registry`; the unit tests drive the same protocol through an in-memory one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger(__name__)

ALIAS = "champion"
TAG_EVAL_LOSS = "kubetune.eval_loss"
TAG_PROMOTION = "kubetune.promotion"
TAG_REASON = "kubetune.promotion_reason"
TAG_BASELINE = "kubetune.promotion_baseline"  # the champion version compared against, or "base"
PROMOTED, REJECTED = "promoted", "rejected"
LOST = "lost a concurrent promotion"  # how a racer's rejection by convergence begins

# Versions registered this close together (registry clock) are treated as racing for the alias; older promoted
# versions are history and never pulled back into `champion` (a manual rollback stays rolled back).
RACE_WINDOW_S = 600.0

Decide = Callable[[float, "float | None", float, str], "tuple[bool, str]"]


@dataclass(frozen=True)
class Version:
    """A registered model version as the protocol sees it: number, tags, run and creation time (ms)."""

    version: str
    tags: Mapping[str, str] = field(default_factory=dict)
    run_id: str | None = None
    creation_timestamp: int = 0


class Registry(Protocol):
    """One registered model's versions and its ``champion`` alias."""

    name: str

    def champion(self) -> Version | None:
        """The version holding alias ``champion``; None when none does (or the model does not exist yet)."""

    def get(self, version: str) -> Version | None:
        """The version as stored now; None when it does not exist (deleted)."""

    def versions(self) -> list[Version]:
        """Every version of the model."""

    def set_alias(self, version: str) -> None:
        """Point alias ``champion`` at ``version``."""

    def tag_version(self, version: str, tags: Mapping[str, str]) -> None:
        """Set tags on a version (others are kept)."""

    def tag_run(self, run_id: str, tags: Mapping[str, str]) -> None:
        """Set tags on a run (others are kept)."""

    def run_metric(self, run_id: str, key: str) -> float | None:
        """The run's latest value of metric ``key``; None when it has none."""


def decide(eval_loss: float, baseline_loss: float | None, min_improvement: float, against: str) -> tuple[bool, str]:
    """Promote only when ``eval_loss`` is lower than ``baseline_loss`` by at least ``min_improvement`` (and by
    more than nothing). Returns (promoted, a sentence with the numbers)."""
    if eval_loss is None or not math.isfinite(eval_loss):
        return False, f"eval_loss {eval_loss} is not a finite number"
    if baseline_loss is None or not math.isfinite(baseline_loss):
        return False, (
            f"{against} has no recorded eval loss to compare with (tag `{TAG_EVAL_LOSS}`); "
            "move the alias by hand if this version should serve"
        )
    gain = baseline_loss - eval_loss
    if gain <= 0:
        return False, f"eval_loss {eval_loss:.4f} does not beat {against} ({baseline_loss:.4f})"
    if gain < min_improvement:
        return False, (
            f"eval_loss {eval_loss:.4f} beats {against} ({baseline_loss:.4f}) by only {gain:.4f}, "
            f"less than min_improvement {min_improvement:.4f}"
        )
    return True, (
        f"eval_loss {eval_loss:.4f} beats {against} ({baseline_loss:.4f}) by {gain:.4f} "
        f"(min_improvement {min_improvement:.4f})"
    )


def loss_of(registry: Registry, v: Version) -> float | None:
    """The version's eval loss: tag ``kubetune.eval_loss``, else its run's ``eval_loss`` metric; None if neither
    is a number."""
    raw = v.tags.get(TAG_EVAL_LOSS)
    try:
        if raw is not None:
            return float(raw)
        if v.run_id:
            return registry.run_metric(v.run_id, "eval_loss")
    except (ValueError, TypeError):
        return None
    return None


def chain(registry: Registry, v: Version, limit: int = 50) -> dict[str, tuple[str, Version | None]]:
    """Versions reached by following ``kubetune.promotion_baseline`` from ``v``: the champions it replaced (nearest
    first), each mapped to the version that replaced it and the version as read (None once deleted)."""
    seen: dict[str, tuple[str, Version | None]] = {}
    current: Version | None = v
    while current is not None and len(seen) < limit:
        prev = current.tags.get(TAG_BASELINE)
        if not prev or prev == "base" or prev in seen:
            break
        replacer = current.version
        current = registry.get(prev)  # a deleted version ends the chain
        seen[prev] = (replacer, current)
    return seen


def record(
    registry: Registry, version: str, run_id: str | None, decision: str, reason: str, baseline: str | None
) -> None:
    """Write a decision on the version and, when it has one, its run."""
    tags = {TAG_PROMOTION: decision, TAG_REASON: reason}
    if baseline is not None:
        tags[TAG_BASELINE] = baseline
    registry.tag_version(version, tags)
    if run_id:
        registry.tag_run(run_id, tags)


def promote(
    registry: Registry,
    v: Version,
    *,
    eval_loss: float,
    base_eval_loss: float,
    min_improvement: float,
    run_id: str | None,
    window_s: float = RACE_WINDOW_S,
    rounds: int = 5,
    decide: Decide = decide,
) -> dict[str, Any]:
    """The gate for version ``v``, as a compare-and-set loop, then convergence against racing versions.

    1. Read the champion; compare this version's eval loss with it (or with the base model's eval loss when there
       is none) via ``decide``; record the decision and reason as tags (version and run) *before* moving the
       alias; move it when promoted; read again: if another version took the alias meanwhile without having
       beaten this one, decide again against it.
    2. Converge (:func:`converge`): the alias must end on the best version that earned promotion among those
       registered within ``window_s`` of this one; the racers that lose are re-tagged ``rejected`` with the reason.

    Re-running it for a version that already holds the alias, or that a later champion beat, changes nothing; a
    run cut off half-way (tags written, alias not moved, racers not re-tagged) is completed by running it again.
    Returns ``{"promotion", "promotion_reason", "champion_version"}`` as the registry holds them at the end.
    """
    name, version = registry.name, v.version
    for _ in range(rounds):
        holder = registry.champion()
        if holder is not None and holder.version == version:
            break
        if holder is not None and version in chain(registry, holder):
            log.info(
                "%s version %s was replaced by champion version %s; keeping its recorded decision",
                name,
                version,
                holder.version,
            )
            return state(registry, version)
        if holder is None:
            baseline_loss, against, baseline = base_eval_loss, "the base model", "base"
        else:
            baseline_loss, against = loss_of(registry, holder), f"champion version {holder.version}"
            baseline = holder.version
        promoted, reason = decide(eval_loss, baseline_loss, min_improvement, against)
        record(registry, version, run_id, PROMOTED if promoted else REJECTED, reason, baseline)
        if not promoted:
            return state(registry, version)
        registry.set_alias(version)
    converge(registry, registry.get(version) or v, window_s=window_s, rounds=rounds)
    return state(registry, version)


def converge(registry: Registry, v: Version, *, window_s: float = RACE_WINDOW_S, rounds: int = 5) -> str | None:
    """Put the alias on the best (lowest eval loss, then lowest version number) version among the current holder
    and the versions that earned promotion within ``window_s`` of ``v``; re-tag racers that lost. Every racer
    computes the same answer, so concurrent calls agree. Returns the champion version."""
    name = registry.name
    best = None
    recent: list[Version] = []
    for _ in range(rounds):
        holder = registry.champion()
        ref = v.creation_timestamp or 0
        recent = [
            x
            for x in registry.versions()
            if x.tags.get(TAG_PROMOTION) == PROMOTED and abs((x.creation_timestamp or 0) - ref) <= window_s * 1000
        ]
        contenders = {x.version: x for x in recent}
        if holder is not None:
            contenders[holder.version] = holder
        scored = [(loss, int(k), x) for k, x in contenders.items() if (loss := loss_of(registry, x)) is not None]
        if not scored:
            return holder.version if holder is not None else None
        best = min(scored, key=lambda t: (t[0], t[1]))
        if holder is not None and holder.version == best[2].version:
            break
        log.warning(
            "%s: alias %s is on version %s but racing version %s has the lower eval loss (%.4f); moving it",
            name,
            ALIAS,
            holder.version if holder else None,
            best[2].version,
            best[0],
        )
        registry.set_alias(best[2].version)
    if best is None:
        return None
    winner = best[2]
    on_chain = chain(registry, winner)
    for x in recent:
        if x.version == winner.version or x.version in on_chain:
            continue
        loss = loss_of(registry, x)
        reason = (
            f"{LOST}: version {winner.version} (eval_loss {best[0]:.4f}) beats this "
            f"version (eval_loss {loss:.4f}) and holds `{ALIAS}`"
        )
        log.warning("%s version %s %s", name, x.version, reason)
        record(registry, x.version, x.run_id, REJECTED, reason, None)
    # A version the winner's chain runs through held the alias and was beaten fairly by the next one: it stays
    # promoted, as a champion replaced later does. Another racer's convergence may have rejected it before the
    # chain reached it (a racer re-decides against a newer holder and re-tags its baseline): restore it.
    for xv, (successor, x) in on_chain.items():  # (read by chain(); the loop above leaves their tags alone)
        if x is None or x.tags.get(TAG_PROMOTION) != REJECTED or not (x.tags.get(TAG_REASON) or "").startswith(LOST):
            continue
        before = x.tags.get(TAG_BASELINE)
        over = "the base model" if before in (None, "base") else f"version {before}"
        reason = f"was `{ALIAS}` (promoted over {over}) until version {successor} beat it"
        log.info("%s version %s %s", name, xv, reason)
        record(registry, xv, x.run_id, PROMOTED, reason, None)
    return winner.version


def state(registry: Registry, version: str) -> dict[str, Any]:
    """``{"promotion", "promotion_reason", "champion_version"}`` of ``version`` as the registry holds them now."""
    v = registry.get(version)
    holder = registry.champion()
    tags = v.tags if v is not None else {}
    return {
        "promotion": tags.get(TAG_PROMOTION),
        "promotion_reason": tags.get(TAG_REASON),
        "champion_version": holder.version if holder is not None else None,
    }
