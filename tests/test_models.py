"""Models, artifacts, evaluation and the gate: pure logic and files, no Ray."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn import metrics as sk

from jobs.evaluate import evaluate, time_split
from jobs.gate import judge
from jobs.models import ArtifactError, ModelSpec, build_model, load_artifact, predict_proba, save_artifact
from jobs.worker_loop import load_checkpoint, make_optimizer, pick_device, save_checkpoint, train_standalone
from streams.config import GateSettings, ModelSettings

SPEC = ModelSpec("mlp", tuple(f"x{i}" for i in range(6)), ("no", "yes"), (16, 8), 0.1)


def trained_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(SPEC)


def test_artifact_round_trip_is_bit_exact(tmp_path: Path) -> None:
    model = trained_model()
    digests = save_artifact(tmp_path / "m", SPEC, model, '{"stats": 1}')
    assert set(digests) == {"spec.json", "features.json", "weights.safetensors"}
    spec, loaded, features = load_artifact(tmp_path / "m")
    assert spec == SPEC and features == '{"stats": 1}'
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.module.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    x = np.random.default_rng(0).normal(size=(32, 6)).astype(np.float32)
    model.eval()
    assert np.array_equal(predict_proba(model, x).numpy(), loaded.predict_proba(x))


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.marker),))  # type: ignore[return-value]


def test_a_planted_pickle_is_refused_and_never_executed(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    save_artifact(folder, SPEC, trained_model(), "{}")
    marker = tmp_path / "pwned"
    (folder / "weights.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ArtifactError, match="does not match its SHA-256"):
        load_artifact(folder)
    # Even with the digest forged to match, the bytes are parsed as safetensors, never unpickled.
    import hashlib

    digests = json.loads((folder / "digests.json").read_text())
    digests["weights.safetensors"] = hashlib.sha256((folder / "weights.safetensors").read_bytes()).hexdigest()
    (folder / "digests.json").write_text(json.dumps(digests))
    with pytest.raises(ArtifactError, match="is not a safetensors file"):
        load_artifact(folder)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / "digests.json").unlink(), "not a driftloop model artifact"),
        (lambda f: (f / "features.json").write_text("{}x"), "features.json does not match"),
        (lambda f: (f / "spec.json").unlink(), "missing spec.json"),
    ],
)
def test_damaged_artifacts_are_refused(tmp_path: Path, damage: object, message: str) -> None:
    folder = tmp_path / "m"
    save_artifact(folder, SPEC, trained_model(), "{}")
    damage(folder)  # type: ignore[operator]
    with pytest.raises(ArtifactError, match=message):
        load_artifact(folder)


def test_an_unknown_model_kind_is_refused() -> None:
    with pytest.raises(ArtifactError, match="unknown model kind 'forest'"):
        ModelSpec.from_json(json.dumps({**json.loads(SPEC.to_json()), "kind": "forest"}))


def test_logreg_is_one_linear_layer() -> None:
    spec = ModelSpec.from_settings(ModelSettings(kind="logreg"), ["a", "b"], ["no", "yes"])
    assert [type(m).__name__ for m in build_model(spec)] == ["Linear"]


def test_checkpoints_restore_weights_and_optimizer_without_pickle(tmp_path: Path) -> None:
    model = trained_model()
    optimizer = make_optimizer(model, 0.01, 0.0)
    x, y = torch.randn(64, 6), torch.randint(0, 2, (64,))
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    save_checkpoint(tmp_path, model, optimizer, epoch=3)
    fresh = trained_model(seed=1)
    fresh_opt = make_optimizer(fresh, 0.01, 0.0)
    assert load_checkpoint(tmp_path, fresh, fresh_opt) == 3
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for group in (optimizer, fresh_opt):  # one more identical step gives identical weights
        group.zero_grad()
    for m, o in ((model, optimizer), (fresh, fresh_opt)):
        torch.manual_seed(7)  # the same dropout mask for both
        torch.nn.functional.cross_entropy(m(x), y).backward()
        o.step()
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_the_standalone_loop_learns_a_separable_problem() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 6)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    model = trained_model()
    history = train_standalone(model, x[:1500], y[:1500], x[1500:], y[1500:], epochs=5, batch_size=64,
                               learning_rate=0.01, device=pick_device(False), bf16=True)  # fmt: skip
    assert history[-1].metrics["val_accuracy"] > 0.9
    assert history[-1].train_loss < history[0].train_loss


def test_metrics_match_scikit_learn() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 500)
    p1 = np.clip(y * 0.6 + rng.normal(0.2, 0.25, 500), 0.01, 0.99)
    proba = np.column_stack([1 - p1, p1])
    report = evaluate(y, proba, ["no", "yes"])
    pred = proba.argmax(axis=1)
    assert report["accuracy"] == pytest.approx(sk.accuracy_score(y, pred))
    assert report["f1"] == pytest.approx(sk.f1_score(y, pred))
    assert report["f1_macro"] == pytest.approx(sk.f1_score(y, pred, average="macro"))
    assert report["precision"] == pytest.approx(sk.precision_score(y, pred))
    assert report["recall_macro"] == pytest.approx(sk.recall_score(y, pred, average="macro"))
    assert report["roc_auc"] == pytest.approx(sk.roc_auc_score(y, p1))
    assert report["log_loss"] == pytest.approx(sk.log_loss(y, proba))
    assert report["confusion_matrix"] == sk.confusion_matrix(y, pred).tolist()
    three = rng.dirichlet([1, 1, 1], 300)
    labels = rng.integers(0, 3, 300)
    assert evaluate(labels, three, [0, 1, 2])["roc_auc"] == pytest.approx(
        sk.roc_auc_score(labels, three, multi_class="ovr", average="macro")
    )


def test_per_class_weighted_and_baselines_for_every_gate_metric_match_scikit_learn() -> None:
    from sklearn.dummy import DummyClassifier

    from jobs.evaluate import BASELINE_METRICS
    from streams.config import GATE_METRICS

    rng = np.random.default_rng(5)
    labels = rng.choice(4, 600, p=[0.6, 0.2, 0.15, 0.05])  # a dominant class, a rare one
    proba = rng.dirichlet([1, 1, 1, 1], 600) + np.eye(4)[labels] * 0.5
    proba /= proba.sum(axis=1, keepdims=True)
    report = evaluate(labels, proba, ["a", "b", "c", "d"])
    pred = proba.argmax(axis=1)
    p, r, f, n = sk.precision_recall_fscore_support(labels, pred, labels=[0, 1, 2, 3], zero_division=0)
    for c, name in enumerate("abcd"):
        assert report["per_class"][name] == pytest.approx({"precision": p[c], "recall": r[c], "f1": f[c],
                                                           "support": n[c]})  # fmt: skip
    assert report["f1_weighted"] == pytest.approx(sk.f1_score(labels, pred, average="weighted"))
    assert set(GATE_METRICS) <= set(BASELINE_METRICS), "every metric the gate accepts has a baseline to beat"
    prior = DummyClassifier(strategy="prior").fit(np.zeros((600, 1)), labels)
    base_pred, base_proba = prior.predict(np.zeros((600, 1))), prior.predict_proba(np.zeros((600, 1)))
    assert report["baseline_accuracy"] == pytest.approx(sk.accuracy_score(labels, base_pred))
    assert report["baseline_f1_macro"] == pytest.approx(sk.f1_score(labels, base_pred, average="macro"))
    assert report["baseline_precision_macro"] == pytest.approx(
        sk.precision_score(labels, base_pred, average="macro", zero_division=0)
    )
    assert report["baseline_recall_macro"] == pytest.approx(sk.recall_score(labels, base_pred, average="macro"))
    assert report["baseline_log_loss"] == pytest.approx(sk.log_loss(labels, base_proba), rel=1e-6)
    assert report["baseline_roc_auc"] == pytest.approx(0.5)


def test_roc_auc_with_ties_and_one_vs_rest_matches_scikit_learn() -> None:
    rng = np.random.default_rng(11)
    y = rng.integers(0, 2, 20_000)
    p1 = np.round(np.clip(y * 0.2 + rng.normal(0.4, 0.2, y.size), 0, 1), 2)  # about 100 values: ties everywhere
    proba = np.column_stack([1 - p1, p1])
    assert evaluate(y, proba, ["no", "yes"])["roc_auc"] == pytest.approx(sk.roc_auc_score(y, p1), abs=1e-12)
    palette = rng.dirichlet([1, 1, 1, 1], 12)  # each row one of 12: each column has 12 distinct scores
    labels = rng.integers(0, 4, 20_000)
    four = palette[(labels * 3 + rng.integers(0, 4, labels.size)) % 12]
    expected = sk.roc_auc_score(labels, four, multi_class="ovr", average="macro")
    assert evaluate(labels, four, list("abcd"))["roc_auc"] == pytest.approx(expected, abs=1e-12)
    assert np.isnan(evaluate(np.zeros(10, dtype=np.int64), proba[:10], ["no", "yes"])["roc_auc"]), "one class only"


def test_one_macro_f1_for_evaluation_and_the_monitor_matches_scikit_learn() -> None:
    """`macro_f1` takes a batch (the monitor's bootstrap resamples): each row equals scikit-learn's."""
    from jobs.evaluate import f1_per_class, macro_f1

    rng = np.random.default_rng(13)
    classes = ["fail", "ok", "rare", "never"]  # "never" is neither predicted nor true: its F1 is 0
    truth = rng.choice(classes[:3], (50, 120), p=[0.3, 0.65, 0.05])
    predicted = np.where(rng.random(truth.shape) < 0.8, truth, rng.choice(classes[:3], truth.shape))
    batch = macro_f1(predicted, truth, classes)
    assert batch.shape == (50,)
    for row in range(50):
        t, p = truth[row], predicted[row]
        expected = sk.f1_score(t, p, labels=classes, average=None, zero_division=0)
        assert f1_per_class(p, t, classes).tolist() == pytest.approx(expected.tolist(), abs=1e-12)
        assert batch[row] == pytest.approx(
            sk.f1_score(t, p, labels=classes, average="macro", zero_division=0), abs=1e-12
        )


def test_the_holdout_is_the_most_recent() -> None:
    times = np.array([5, 1, 4, 2, 3, 9, 7, 8, 6, 0])
    train, holdout = time_split(times, 0.3)
    assert sorted(times[holdout].tolist()) == [7, 8, 9]
    assert max(times[train]) < min(times[holdout])


GATE = GateSettings(
    primary_metric="f1_macro", min_improvement=0.01, no_regression=("accuracy", "log_loss"), tolerance=0.02
)
BASE = {"holdout": "h1", "f1_macro": 0.70, "accuracy": 0.75, "log_loss": 0.50, "baseline_f1_macro": 0.40}


@pytest.mark.parametrize(
    ("challenger", "champion", "promote", "why"),
    [
        ({**BASE, "f1_macro": 0.72}, BASE, True, "improves by 0.01"),
        ({**BASE, "f1_macro": 0.705}, BASE, False, "does not improve"),
        ({**BASE, "f1_macro": 0.75, "accuracy": 0.70}, BASE, False, "accuracy 0.7000 vs 0.7500: regresses"),
        ({**BASE, "f1_macro": 0.75, "log_loss": 0.53}, BASE, False, "log_loss 0.5300 vs 0.5000: regresses"),
        ({**BASE, "f1_macro": 0.75, "log_loss": 0.45}, BASE, True, "log_loss 0.4500 vs 0.5000: within"),
        ({**BASE, "f1_macro": 0.75, "holdout": "h2"}, BASE, False, "not on the same holdout"),
        ({**BASE, "f1_macro": 0.43}, None, True, "beats the majority-class baseline"),
        ({**BASE, "f1_macro": 0.41}, None, False, "does not beat the majority-class baseline"),
        ({"holdout": "h1"}, BASE, False, "has no f1_macro"),
    ],
)
def test_gate_decisions(
    challenger: dict[str, object], champion: dict[str, object] | None, promote: bool, why: str
) -> None:
    decision = judge(challenger, champion, GATE)
    assert decision.promote is promote
    assert any(why in reason for reason in decision.reasons), decision.reasons


def test_the_gpu_check_runs_on_the_cpu_too() -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    result = subprocess.run(
        [sys.executable, "-m", "jobs.gpu_check", "--device", "cpu", "--rows", "6000", "--epochs", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["ok"] is True


@pytest.mark.parametrize(
    "metric", ["accuracy", "f1", "f1_macro", "precision_macro", "recall_macro", "roc_auc", "log_loss"]
)
def test_a_first_model_is_promoted_on_every_metric_the_gate_accepts(metric: str) -> None:
    """roc_auc, log_loss, precision_macro and recall_macro never promoted a first model: no baseline."""
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 400)
    p1 = np.clip(y * 0.7 + rng.normal(0.15, 0.15, 400), 0.01, 0.99)
    report = evaluate(y, np.column_stack([1 - p1, p1]), ["no", "yes"]) | {"holdout": "h"}
    decision = judge(report, None, GateSettings(primary_metric=metric))  # type: ignore[arg-type]
    assert decision.promote, decision.reasons
