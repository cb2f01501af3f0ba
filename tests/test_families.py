"""Model families behind one interface: fit, save, load, predict; the search across families. No Ray."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.metrics import log_loss

from jobs.families import Step, family, holdout_metrics
from jobs.models import ArtifactError, ModelSpec, load_artifact, save_artifact
from jobs.tune import apply_params, params_of, search_in_process
from streams.config import FAMILIES, ModelSettings, Param, SearchSettings, load_config
from tests.conftest import DEMO

SMALL = ModelSettings(epochs=4, rounds=40, trees=30, max_depth=4, learning_rate=0.01, eta=0.3, hidden=(16,))


def arrays(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """A data set that scikit-learn ships, standardized, split 75/25: (x, y, x_val, y_val, names)."""
    data = load_breast_cancer() if name == "binary" else load_digits()
    x, y = data.data.astype(np.float32), data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)
    cut = int(len(y) * 0.75)
    return x[:cut], y[:cut], x[cut:], y[cut:], [f"x{i}" for i in range(x.shape[1])]


@pytest.mark.parametrize("data", ["binary", "multiclass"])
@pytest.mark.parametrize("kind", FAMILIES)
def test_every_family_fits_reports_each_step_and_round_trips_without_pickle(
    kind: str, data: str, tmp_path: Path
) -> None:
    x, y, x_val, y_val, names = arrays(data)
    classes = sorted(set(y.tolist()))
    owner = family(kind)
    spec = owner.spec(dataclasses.replace(SMALL, kind=kind), names, classes)
    steps: list[Step] = []
    model, history = owner.fit(spec, dataclasses.replace(SMALL, kind=kind), (x, y, x_val, y_val), on_step=steps.append)

    # The search's view: `epochs` equal shares of the budget (a forest grows in one round: one report, the last).
    expected = [SMALL.epochs] if kind == "random_forest" else list(range(1, SMALL.epochs + 1))
    assert [s.step for s in steps] == expected and [h["epoch"] for h in history] == expected
    proba = model.predict_proba(x_val)
    assert proba.shape == (len(y_val), len(classes)) and np.allclose(proba.sum(axis=1), 1, atol=1e-5)
    # Every family's reported holdout loss is the same quantity: scikit-learn's log loss of its probabilities.
    assert steps[-1].metrics["val_loss"] == pytest.approx(log_loss(y_val, proba, labels=classes), rel=1e-3)
    assert steps[-1].metrics["val_accuracy"] == pytest.approx(float(np.mean(proba.argmax(axis=1) == y_val)))
    assert steps[-1].metrics["val_accuracy"] > 0.8, "it learnt"

    digests = save_artifact(tmp_path / "m", spec, model, "{}")
    assert owner.weights_file in digests
    loaded_spec, loaded, _ = load_artifact(tmp_path / "m")
    assert loaded_spec == spec and np.array_equal(loaded.predict_proba(x_val), proba)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.marker),))  # type: ignore[return-value]


def _tree_artifact(folder: Path, kind: str = "xgboost") -> tuple[ModelSpec, Path]:
    x, y, x_val, y_val, names = arrays("binary")
    owner = family(kind)
    spec = owner.spec(SMALL, names, [0, 1])
    model, _ = owner.fit(spec, dataclasses.replace(SMALL, kind=kind), (x, y, x_val, y_val))
    save_artifact(folder, spec, model, "{}")
    return spec, folder


def _forge(folder: Path, name: str) -> None:
    digests = json.loads((folder / "digests.json").read_text())
    digests[name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    (folder / "digests.json").write_text(json.dumps(digests))


def test_a_pickle_planted_as_a_tree_model_is_refused_and_never_executed(tmp_path: Path) -> None:
    _, folder = _tree_artifact(tmp_path / "m")
    marker = tmp_path / "pwned"
    (folder / "model.ubj").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ArtifactError, match="does not match its SHA-256"):
        load_artifact(folder)
    _forge(folder, "model.ubj")  # digests forged to match: the bytes are parsed as UBJSON, never unpickled
    with pytest.raises(ArtifactError, match="not an XGBoost model"):
        load_artifact(folder)
    assert not marker.exists()
    (folder / "model.ubj").write_bytes(b"{" + pickle.dumps(_Payload(marker)))  # looks like UBJSON, is not
    _forge(folder, "model.ubj")
    with pytest.raises(ArtifactError, match="not an XGBoost model"):
        load_artifact(folder)
    assert not marker.exists()


def test_tree_weights_that_do_not_fit_the_spec_are_refused(tmp_path: Path) -> None:
    _, folder = _tree_artifact(tmp_path / "m")
    spec = json.loads((folder / "spec.json").read_text())
    spec["input_names"] = spec["input_names"][:-1]
    (folder / "spec.json").write_text(json.dumps(spec))
    _forge(folder, "spec.json")
    with pytest.raises(ArtifactError, match=r"has 30 inputs and 1 outputs; spec\.json says 29 inputs"):
        load_artifact(folder)
    spec["kind"], spec["input_names"] = "mlp", [*spec["input_names"], "x29"]  # a tree model named an MLP
    (folder / "spec.json").write_text(json.dumps(spec))
    _forge(folder, "spec.json")
    with pytest.raises(ArtifactError, match=r"records no digest for weights\.safetensors"):
        load_artifact(folder)


def test_balanced_class_weights_raise_the_minority_class_recall() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6000, 4)).astype(np.float32)
    y = (x[:, 0] + 0.8 * rng.normal(size=6000) > 2.0).astype(np.int64)  # about 4 % positives, overlapping
    owner = family("xgboost")
    spec = owner.spec(SMALL, ["a", "b", "c", "d"], [0, 1])
    recall = {}
    for how in ("none", "balanced"):
        settings = dataclasses.replace(SMALL, kind="xgboost", class_weight=how)
        model, _ = owner.fit(spec, settings, (x[:4500], y[:4500], x[4500:], y[4500:]))
        predicted = model.predict_proba(x[4500:]).argmax(axis=1)
        recall[how] = float(np.mean(predicted[y[4500:] == 1] == 1))
    assert recall["balanced"] > recall["none"] + 0.2, recall


def test_holdout_metrics_match_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    proba = rng.dirichlet(np.ones(3), size=200)
    y = rng.integers(0, 3, size=200)
    got = holdout_metrics(proba, y)
    assert got["val_loss"] == pytest.approx(log_loss(y, proba, labels=[0, 1, 2]))
    assert got["val_accuracy"] == pytest.approx(float(np.mean(proba.argmax(axis=1) == y)))


SEARCH = SearchSettings(
    trials=6,
    families=("mlp", "xgboost", "random_forest"),
    space=(
        Param(name="learning_rate", low=0.001, high=0.03, log=True),
        Param(name="hidden", choices=("16", "32,16")),
        Param(name="eta", low=0.05, high=0.5, log=True),
        Param(name="max_depth", low=2, high=6),
        Param(name="trees", choices=(20, 40)),
    ),
)


def test_a_champions_family_and_knobs_are_the_first_point_and_map_back() -> None:
    champion = dataclasses.replace(SMALL, kind="xgboost", eta=0.2, max_depth=5)
    point = params_of(champion, SEARCH)
    assert point == {"kind": "xgboost", "xgboost.eta": 0.2, "xgboost.max_depth": 5}
    settings = apply_params(SMALL, point)
    assert (settings.kind, settings.eta, settings.max_depth) == ("xgboost", 0.2, 5)
    # Another family's knobs in a point do not leak into the chosen one's settings.
    mixed = apply_params(SMALL, {"kind": "mlp", "mlp.hidden": "32,16", "xgboost.max_depth": 2})
    assert (mixed.kind, mixed.hidden, mixed.max_depth) == ("mlp", (32, 16), SMALL.max_depth)
    assert params_of(dataclasses.replace(SMALL, kind="logreg"), SEARCH) == {}, "logreg is not searched"


def test_one_search_tries_every_family_and_picks_the_best_by_the_metric(tmp_path: Path) -> None:
    x, y, x_val, y_val, names = arrays("binary")
    config = load_config(DEMO, env={})
    label = dataclasses.replace(config.schema.label, classes=(0, 1))
    config = dataclasses.replace(
        config, model=SMALL, search=SEARCH, schema=dataclasses.replace(config.schema, label=label)
    )
    warm = params_of(dataclasses.replace(SMALL, kind="random_forest"), SEARCH)
    result = search_in_process(config, (x, y, x_val, y_val), names, tmp_path, warm_start=warm, seed=1)

    kinds = [t["params"]["kind"] for t in result.trials]
    assert kinds[0] == "random_forest", "the champion's family first"
    assert set(kinds) == {"mlp", "xgboost", "random_forest"}, kinds
    best = min((t for t in result.trials if "val_loss" in t), key=lambda t: t["val_loss"])
    assert result.best_params == best["params"] and result.best_metrics["val_loss"] == best["val_loss"]
    for trial in result.trials:  # each trial holds only its own family's knobs
        assert all(k == "kind" or k.startswith(f"{trial['params']['kind']}.") for k in trial["params"])


def test_a_search_over_families_tries_the_champion_then_each_other_familys_configured_values() -> None:
    from jobs.tune import first_points

    warm = params_of(dataclasses.replace(SMALL, kind="xgboost"), SEARCH)
    points = first_points(SEARCH, SMALL, SEARCH.families, warm)
    assert [p["kind"] for p in points] == ["xgboost", "mlp", "random_forest"]
    assert points[1] == {"kind": "mlp", "mlp.learning_rate": 0.01, "mlp.hidden": "16"}
    assert points[2] == {"kind": "random_forest", "random_forest.max_depth": 4}, "30 trees: not among the choices"
    # no room to explore (fewer than two trials a family): only the champion's point
    assert first_points(dataclasses.replace(SEARCH, trials=5), SMALL, SEARCH.families, warm) == [warm]
    assert first_points(SEARCH, SMALL, ("mlp",), None) == []
