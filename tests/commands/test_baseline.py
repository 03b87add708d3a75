"""``medtransfer baseline``: logistic regression on pixels or frozen features, tracked like a network run."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from medtransfer.commands.baseline import run_baseline
from medtransfer.data.medmnist import MedMNISTDataModule
from medtransfer.entry import main

REPO = Path(__file__).resolve().parents[2]
FIT_CONFIG = REPO / "configs" / "pneumonia_effnet_lite0.yaml"
MEDMNIST = "medtransfer.data.medmnist.MedMNISTDataModule"

#: Every test metric a network run of the default config logs, bar the loss (see tests/test_cli.py).
NETWORK_TEST_METRICS = (
    "val/auroc", "val/acc", "val/threshold", "val/sensitivity", "val/specificity", "val/min_confidence",
    "test/auroc", "test/acc", "test/sensitivity", "test/specificity", "test/threshold", "test/aurc", "test/eaurc",
    "test/augrc", "test/ece", "test/coverage", "test/selective_acc", "test/selective_acc_cov80",
    "test/selective_acc_cov90", "test/selective_acc_cov95", "test/coverage_at_acc95", "test/coverage_at_acc99",
)  # fmt: skip


def _runs(workdir: Path):
    mlflow.set_tracking_uri(f"sqlite:///{workdir}/mlruns/mlflow.db")
    return mlflow.search_runs(experiment_names=["medtransfer"])


def _client(workdir: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{workdir}/mlruns/mlflow.db")


@pytest.mark.slow
def test_pixel_baseline_from_the_fit_config_logs_the_network_metrics(workdir, pneumonia_npz, capsys):
    main(["baseline", f"--config={FIT_CONFIG}", f"--data.path={pneumonia_npz}", "--data.image_size=28",
          "--Cs=[0.01, 1.0]"])  # fmt: skip
    out = capsys.readouterr().out
    runs = _runs(workdir)
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["status"] == "FINISHED"
    assert run["tags.mlflow.runName"].startswith("logreg-pixels-pneumoniamnist-")
    assert run["params.model.backbone"] == "logreg-pixels"
    assert run["params.data.flag"] == "pneumoniamnist"
    assert run["params.data.image_size"] == "28"
    assert run["params.model.threshold_policy"] == "youden"  # from the fit config's model section
    for metric in NETWORK_TEST_METRICS:
        assert f"metrics.{metric}" in runs.columns, metric
    # the full training split at 28 px: well above chance
    assert run["metrics.test/auroc"] > 0.85
    assert run["metrics.val/auroc"] > 0.95
    # C is the validation AUROC's choice among the grid, and logged
    searched = {c: run[f"metrics.baseline/val_auroc/C_{c}"] for c in ("0.01", "1")}
    assert run["params.baseline.C"] == max(searched, key=searched.get)
    assert run["metrics.val/auroc"] == pytest.approx(max(searched.values()))
    artifacts = {a.path for a in _client(workdir).list_artifacts(run.run_id)}
    assert {"plots", "model"} <= artifacts
    figures = {Path(a.path).name for a in _client(workdir).list_artifacts(run.run_id, "plots")}
    assert figures == {"roc.png", "risk_coverage.png", "reliability.png", "confusion.png"}
    model = mlflow.pyfunc.load_model(f"runs:/{run.run_id}/model")
    assert model.metadata.metadata["decision"]["threshold"] == pytest.approx(run["metrics.val/threshold"])
    assert run.run_id in out and "test AUROC" in out
    link = f"http://127.0.0.1:5000/#/experiments/{run.experiment_id}/runs/{run.run_id}?workflowType=machine_learning"
    assert f"See it in the MLflow UI (make ui): {link}" in out


def _with_shuffled_test_labels(source: Path, target: Path) -> Path:
    with np.load(source) as archive:
        arrays = dict(archive)
    arrays["test_labels"] = np.random.default_rng(0).permutation(arrays["test_labels"])
    np.savez(target, **arrays)
    return target


def test_C_and_threshold_are_chosen_on_validation_never_on_test(tmp_path, pneumonia_npz):
    shuffled = _with_shuffled_test_labels(pneumonia_npz, tmp_path / "shuffled.npz")
    results = [
        run_baseline(
            data=MedMNISTDataModule(path=str(path), image_size=28, train_fraction=0.3),
            pixel_size=14,
            Cs=[0.001, 0.1, 10.0],
            log_model=False,
            tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db",
        )
        for path in (pneumonia_npz, shuffled)
    ]
    real, scrambled = results
    assert real.C == scrambled.C
    chosen_on_val = {k: v for k, v in real.metrics.items() if not k.startswith("test/") or k == "test/threshold"}
    assert {k: scrambled.metrics[k] for k in chosen_on_val} == chosen_on_val
    assert real.metrics["test/auroc"] > 0.85
    assert abs(scrambled.metrics["test/auroc"] - 0.5) < 0.1  # the scrambled labels did reach the test metrics
    logged = MlflowClient(real.tracking_uri).get_run(real.run_id).data.params
    assert float(logged["baseline.C"]) == real.C


@pytest.mark.slow
def test_frozen_backbone_features(workdir, pneumonia_npz, capsys):
    main(["baseline", f"--config={FIT_CONFIG}", f"--data.path={pneumonia_npz}", "--data.image_size=32",
          "--data.train_fraction=0.1", "--features=backbone", "--Cs=[0.1]", "--log_model=false"])  # fmt: skip
    run = _runs(workdir).iloc[0]
    assert run["tags.mlflow.runName"].startswith("logreg-tf_efficientnet_lite0-features-pneumoniamnist-")
    assert run["params.model.backbone"] == "logreg-tf_efficientnet_lite0-features"
    assert run["params.model.pretrained"] == "lite0-package"
    assert run["params.baseline.feature_dim"] == "1280"  # EfficientNet-Lite0's pooled features
    assert run["params.baseline.C"] == "0.1"
    assert run["metrics.test/auroc"] > 0.8  # ImageNet features separate the classes even at 32 px


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("config", "named"),
    [
        (f"data: {{class_path: {MEDMNIST}}}\npixle_size: 14\n", "pixle_size"),
        (f"data: {{class_path: {MEDMNIST}, init_args: {{imag_size: 28}}}}\n", "imag_size"),
    ],
)  # fmt: skip
def test_a_misspelt_config_key_is_a_one_line_error(workdir, pneumonia_npz, capsys, config, named):
    with pytest.raises(SystemExit) as exit_info:
        main(["baseline", f"--config={_write(workdir / 'bad.yaml', config)}", f"--data.path={pneumonia_npz}"])
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err
    assert not (workdir / "mlruns").exists()


def test_a_class_missing_from_training_is_a_clear_error(tmp_path, pneumonia_npz):
    with np.load(pneumonia_npz) as archive:
        arrays = dict(archive)
    keep = arrays["train_labels"].ravel() == 1
    arrays["train_images"], arrays["train_labels"] = arrays["train_images"][keep], arrays["train_labels"][keep]
    np.savez(tmp_path / "one_class.npz", **arrays)
    data = MedMNISTDataModule(path=str(tmp_path / "one_class.npz"), image_size=28)
    with pytest.raises(ValueError, match="training split of pneumoniamnist holds 1 of the 2 classes"):
        run_baseline(data=data, pixel_size=7, Cs=[1.0], tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db")


@pytest.mark.parametrize("Cs", [[], [0.1, -1.0]])
def test_Cs_must_be_positive(pneumonia_npz, Cs):
    with pytest.raises(ValueError, match="`Cs` to be positive"):
        run_baseline(data=MedMNISTDataModule(path=str(pneumonia_npz)), Cs=Cs)


def test_multilabel_data_gets_one_regression_per_label(tmp_path, chestxray14_sample_dir):
    from medtransfer.data.images import ChestXray14Source, ImageDataModule

    source = ChestXray14Source(
        labels_csv=str(chestxray14_sample_dir / "Data_Entry_2017_v2020.csv"),
        image_root=str(chestxray14_sample_dir / "images"),
        val_fraction=0.2,
        test_fraction=0.2,
    )
    result = run_baseline(
        data=ImageDataModule(source=source, image_size=28),
        pixel_size=14,
        Cs=[0.1],
        log_model=False,
        tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db",
    )
    per_label = [k for k in result.metrics if k.startswith("test/auroc/")]
    # CheXNet's findings, each with its own threshold and AUROC where the test split has positives and negatives
    assert 10 <= len(per_label) == result.metrics["test/auroc_labels_defined"] <= 14
    assert {"test/auroc", "test/aurc", "test/selective_acc_cov90", "val/threshold"} <= set(result.metrics)
    run = MlflowClient(result.tracking_uri).get_run(result.run_id)
    assert run.data.params["model.task"] == "multilabel"
