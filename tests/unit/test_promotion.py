"""The promotion protocol (kubetune.promotion) driven through two registries: an in-memory one and MLflow's
(a local sqlite store, through kubetune.tracking.MlflowRegistry). Every test runs against both."""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
from dataclasses import replace

import pytest

from kubetune import promotion, tracking
from kubetune.promotion import PROMOTED, REJECTED, TAG_BASELINE, TAG_EVAL_LOSS, TAG_PROMOTION, TAG_REASON, Version


class InMemoryRegistry:
    """A registered model held in dicts: versions numbered from 1, a millisecond clock, runs with tags/metrics."""

    def __init__(self, name: str):
        self.name = name
        self.store: dict[str, Version] = {}
        self.alias: str | None = None
        self.run_tags: dict[str, dict[str, str]] = {}
        self.run_metrics: dict[str, dict[str, float]] = {}
        self._clock = itertools.count(1_700_000_000_000, 10)

    def add(self, tags: Mapping[str, str], run_id: str | None = None) -> Version:
        v = Version(str(len(self.store) + 1), dict(tags), run_id, next(self._clock))
        self.store[v.version] = v
        return v

    def champion(self) -> Version | None:
        return self.store.get(self.alias) if self.alias is not None else None

    def get(self, version: str) -> Version | None:
        return self.store.get(version)

    def versions(self) -> list[Version]:
        return list(self.store.values())

    def set_alias(self, version: str) -> None:
        self.alias = version

    def tag_version(self, version: str, tags: Mapping[str, str]) -> None:
        v = self.store[version]
        self.store[version] = replace(v, tags={**v.tags, **tags})

    def tag_run(self, run_id: str, tags: Mapping[str, str]) -> None:
        self.run_tags.setdefault(run_id, {}).update(tags)

    def run_metric(self, run_id: str, key: str) -> float | None:
        return self.run_metrics.get(run_id, {}).get(key)


class Memory:
    def __init__(self, name: str):
        self.registry = InMemoryRegistry(name)

    def version(self, loss: float | None, *, run: bool = False, **tags: str) -> Version:
        all_tags = dict(tags) if loss is None else {TAG_EVAL_LOSS: repr(loss), **tags}
        run_id = None
        if run:
            run_id = f"run-{len(self.registry.store) + 1}"
            self.registry.run_metrics[run_id] = {"eval_loss": 0.25}
        return self.registry.add(all_tags, run_id)

    def run_tags(self, run_id: str) -> dict[str, str]:
        return self.registry.run_tags.get(run_id, {})

    def delete(self, version: str) -> None:
        del self.registry.store[version]


class Mlflow:
    def __init__(self, uri: str, name: str):
        self.client = tracking.client(uri)
        self.client.create_registered_model(name)
        self.registry = tracking.MlflowRegistry(self.client, name)
        self.experiment = self.client.create_experiment(f"exp-{name}")

    def version(self, loss: float | None, *, run: bool = False, **tags: str) -> Version:
        all_tags = dict(tags) if loss is None else {TAG_EVAL_LOSS: repr(loss), **tags}
        run_id = None
        if run:
            run_id = self.client.create_run(self.experiment).info.run_id
            self.client.log_metric(run_id, "eval_loss", 0.25)
        mv = self.client.create_model_version(
            self.registry.name, source="file:///nowhere", run_id=run_id, tags=all_tags, await_creation_for=0
        )
        time.sleep(0.01)  # distinct creation timestamps
        return self.registry.get(str(mv.version))

    def run_tags(self, run_id: str) -> dict[str, str]:
        return dict(self.client.get_run(run_id).data.tags)

    def delete(self, version: str) -> None:
        self.client.delete_model_version(self.registry.name, version)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


_names = itertools.count()


@pytest.fixture(params=["memory", "mlflow"])
def backend(request, store):
    name = f"m-{request.node.originalname}-{next(_names)}"[:100]
    return Memory(name) if request.param == "memory" else Mlflow(store, name)


def gate(backend, v: Version, loss: float, *, base: float = 3.0, min_improvement: float = 0.0, **kw):
    return promotion.promote(
        backend.registry, v, eval_loss=loss, base_eval_loss=base, min_improvement=min_improvement, run_id=v.run_id, **kw
    )


def tags(backend, version: str) -> Mapping[str, str]:
    return backend.registry.get(version).tags


# --------------------------------------------------------------------------------------------------------------


def test_the_gate_promotes_over_the_base_then_only_real_improvements(backend):
    v1 = backend.version(1.0, run=True)
    first = gate(backend, v1, 1.0, min_improvement=0.1)
    assert first == {
        "promotion": PROMOTED,
        "promotion_reason": "eval_loss 1.0000 beats the base model (3.0000) by 2.0000 (min_improvement 0.1000)",
        "champion_version": "1",
    }
    assert tags(backend, "1")[TAG_BASELINE] == "base"
    assert backend.run_tags(v1.run_id)[TAG_PROMOTION] == PROMOTED  # the decision is on the run too

    worse = gate(backend, backend.version(1.2), 1.2, min_improvement=0.1)
    assert worse["promotion"] == REJECTED and worse["champion_version"] == "1"
    assert worse["promotion_reason"] == "eval_loss 1.2000 does not beat champion version 1 (1.0000)"
    small = gate(backend, backend.version(0.95), 0.95, min_improvement=0.1)
    assert (
        small["promotion"] == REJECTED
        and "by only 0.0500, less than min_improvement 0.1000" in (small["promotion_reason"])
    )

    better = gate(backend, backend.version(0.5), 0.5, min_improvement=0.1)
    assert better["promotion"] == PROMOTED and better["champion_version"] == "4"
    assert backend.registry.champion().version == "4"
    assert tags(backend, "4")[TAG_BASELINE] == "1"
    assert tags(backend, "1")[TAG_PROMOTION] == PROMOTED  # replaced, not rejected
    assert gate(backend, backend.registry.get("4"), 0.5) == better  # again: nothing changes


def test_an_adapter_worse_than_its_base_is_not_promoted(backend):
    result = gate(backend, backend.version(3.5), 3.5)
    assert result == {
        "promotion": REJECTED,
        "promotion_reason": "eval_loss 3.5000 does not beat the base model (3.0000)",
        "champion_version": None,
    }
    assert backend.registry.champion() is None


def test_a_champion_without_a_loss_tag_is_compared_by_its_runs_metric(backend):
    v1 = backend.version(None, run=True)  # the run's eval_loss metric is 0.25
    backend.registry.set_alias(v1.version)
    result = gate(backend, backend.version(0.5), 0.5)
    assert result["promotion"] == REJECTED and "does not beat champion version 1 (0.2500)" in result["promotion_reason"]


def test_convergence_puts_the_alias_back_on_the_better_of_two_racers(backend):
    # Both racers compared themselves with the base model (neither saw the other); the worse one wrote last.
    backend.version(1.0, **{TAG_PROMOTION: PROMOTED, TAG_BASELINE: "base"})
    worse = backend.version(2.0, **{TAG_PROMOTION: PROMOTED, TAG_BASELINE: "base"})
    backend.registry.set_alias(worse.version)
    assert promotion.converge(backend.registry, worse) == "1"
    assert backend.registry.champion().version == "1"
    assert tags(backend, "2")[TAG_PROMOTION] == REJECTED
    assert "lost a concurrent promotion: version 1 (eval_loss 1.0000)" in tags(backend, "2")[TAG_REASON]
    assert tags(backend, "1")[TAG_PROMOTION] == PROMOTED
    assert promotion.converge(backend.registry, worse) == "1"  # converging again changes nothing

    third = backend.version(1.5)  # a racer that saw the worse one as champion re-reads and ends on the best
    result = gate(backend, third, 1.5)
    assert result["promotion"] == REJECTED and result["champion_version"] == "1"
    assert "does not beat champion version 1" in result["promotion_reason"]


def test_a_replaced_champion_keeps_its_promotion_and_history_is_not_pulled_back(backend):
    v1 = backend.version(1.0, **{TAG_PROMOTION: PROMOTED, TAG_BASELINE: "base"})
    v2 = backend.version(0.5, **{TAG_PROMOTION: PROMOTED, TAG_BASELINE: v1.version})
    backend.registry.set_alias(v2.version)
    assert promotion.converge(backend.registry, v2) == "2"
    assert tags(backend, "1")[TAG_PROMOTION] == PROMOTED

    backend.registry.set_alias(v1.version)  # rolled back by hand: a later fair promotion must not resurrect v2
    result = gate(backend, backend.version(0.8), 0.8, window_s=0.0)
    assert result["promotion"] == PROMOTED and result["champion_version"] == "3"


def test_convergence_restores_a_champion_the_winners_chain_runs_through(backend):
    for loss in (0.5, 0.9):  # versions 1 and 2, each promoted over the base model
        backend.version(loss, **{TAG_PROMOTION: PROMOTED, TAG_BASELINE: "base"})
    backend.version(0.7, **{TAG_PROMOTION: PROMOTED, TAG_BASELINE: "2"})
    backend.registry.set_alias("3")
    assert promotion.converge(backend.registry, backend.registry.get("2")) == "1"
    assert all(tags(backend, v)[TAG_PROMOTION] == REJECTED for v in ("2", "3"))  # v1's chain was empty then
    backend.registry.tag_version("1", {TAG_BASELINE: "3"})  # v1's re-decision against v3
    assert promotion.converge(backend.registry, backend.registry.get("1")) == "1"
    for version, successor, over in (("3", "1", "version 2"), ("2", "3", "the base model")):
        assert tags(backend, version)[TAG_PROMOTION] == PROMOTED, version
        assert tags(backend, version)[TAG_REASON] == (
            f"was `champion` (promoted over {over}) until version {successor} beat it"
        )


def test_a_deleted_version_ends_the_chain(backend):
    backend.version(1.0, **{TAG_PROMOTION: PROMOTED, TAG_BASELINE: "base"})
    v2 = backend.version(0.5, **{TAG_PROMOTION: PROMOTED, TAG_BASELINE: "1"})
    backend.delete("1")
    assert promotion.chain(backend.registry, backend.registry.get(v2.version)) == {"1": ("2", None)}


class Cut(Exception):
    pass


class CutOff:
    """A registry whose writes fail after ``writes`` of them went through (a send cut off half-way)."""

    def __init__(self, inner, writes: int):
        self.inner, self.left, self.name = inner, writes, inner.name

    def __getattr__(self, attr):
        return getattr(self.inner, attr)

    def _write(self, fn, *args):
        if self.left <= 0:
            raise Cut(fn.__name__)
        self.left -= 1
        return fn(*args)

    def set_alias(self, version):
        return self._write(self.inner.set_alias, version)

    def tag_version(self, version, tags):
        return self._write(self.inner.tag_version, version, tags)

    def tag_run(self, run_id, tags):
        return self._write(self.inner.tag_run, run_id, tags)


@pytest.mark.parametrize("writes", range(5))
def test_a_promotion_cut_off_after_any_write_converges_when_run_again(backend, writes):
    """Version 1 (0.9) and version 2 (0.6) were promoted over the base model in one race and 2 holds the alias;
    version 3 (0.5) beats 2. Its promotion (decision tags, alias, re-tagging racer 1) is cut off after ``writes``
    writes (4 is all of them); run again, it ends where an uninterrupted one does."""
    backend.version(0.9, **{TAG_PROMOTION: PROMOTED, TAG_BASELINE: "base"})
    backend.version(0.6, **{TAG_PROMOTION: PROMOTED, TAG_BASELINE: "base"})
    backend.registry.set_alias("2")
    v3 = backend.version(0.5, run=True)
    cut_off = False
    try:
        promotion.promote(
            CutOff(backend.registry, writes),
            v3,
            eval_loss=0.5,
            base_eval_loss=3.0,
            min_improvement=0.0,
            run_id=v3.run_id,
        )
    except Cut:
        cut_off = True
    assert cut_off == (writes < 4)  # the cut happened where intended
    result = gate(backend, backend.registry.get("3"), 0.5)
    assert result == {
        "promotion": PROMOTED,
        "promotion_reason": "eval_loss 0.5000 beats champion version 2 (0.6000) by 0.1000 (min_improvement 0.0000)",
        "champion_version": "3",
    }
    assert backend.run_tags(v3.run_id)[TAG_PROMOTION] == PROMOTED
    assert tags(backend, "3")[TAG_BASELINE] == "2"
    assert tags(backend, "2")[TAG_PROMOTION] == PROMOTED  # replaced fairly
    assert tags(backend, "1")[TAG_PROMOTION] == REJECTED
    assert tags(backend, "1")[TAG_REASON].startswith("lost a concurrent promotion: version 3 (eval_loss 0.5000)")


@pytest.mark.parametrize("writes", range(3))
def test_a_racer_cut_off_after_moving_the_alias_is_undone_by_convergence(backend, writes):
    """Version 2 (0.9) decided against the base model while version 1 (0.6) already held the alias; it moved the
    alias, and its convergence was cut off after ``writes`` writes (2 is all of them). Converging again puts the
    alias back on 1."""
    backend.version(0.6, **{TAG_PROMOTION: PROMOTED, TAG_BASELINE: "base"})
    v2 = backend.version(0.9, **{TAG_PROMOTION: PROMOTED, TAG_BASELINE: "base"})
    backend.registry.set_alias("2")
    cut_off = False
    try:
        promotion.converge(CutOff(backend.registry, writes), v2)
    except Cut:
        cut_off = True
    assert cut_off == (writes < 2)
    assert promotion.converge(backend.registry, backend.registry.get("2")) == "1"
    assert backend.registry.champion().version == "1"
    assert tags(backend, "2")[TAG_PROMOTION] == REJECTED and tags(backend, "1")[TAG_PROMOTION] == PROMOTED


@pytest.mark.parametrize(
    ("loss", "baseline", "min_imp", "promoted", "words"),
    [
        (1.0, 2.0, 0.0, True, "by 1.0000"),
        (2.0, 2.0, 0.0, False, "does not beat"),
        (1.5, 2.0, 0.5, True, "by 0.5000"),
        (1.9, 2.0, 0.5, False, "by only 0.1000"),
        (float("inf"), 2.0, 0.0, False, "not a finite number"),
        (1.0, float("nan"), 0.0, False, "no recorded eval loss"),
    ],
)
def test_decide_is_the_same_function_through_tracking(loss, baseline, min_imp, promoted, words):
    assert tracking.decide is promotion.decide
    ok, reason = promotion.decide(loss, baseline, min_imp, "the base model")
    assert ok is promoted and words in reason
