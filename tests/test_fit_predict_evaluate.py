"""The commands connect: ``fit`` (with test) -> ``predict`` -> ``evaluate`` on real ChestX-ray14 images gives the
table ``test`` wrote, including findings that the small test split has no positives for (undefined, not 0)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from medtransfer.commands.fit import build_cli
from medtransfer.commands.predict import run_predict
from medtransfer.data.sources import chestxray14_manifest
from medtransfer.entry import main
from medtransfer.tracking.callbacks import find_mlflow_logger

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "chestxray14_sample_lite0.yaml"


@pytest.mark.slow
def test_fit_predict_evaluate_reproduces_the_test_table(workdir, chestxray14_sample_dir, capsys):
    labels, images = chestxray14_sample_dir / "Data_Entry_2017_v2020.csv", chestxray14_sample_dir / "images"
    cli = build_cli([
        "fit", f"--config={CONFIG}", f"--data.source.labels_csv={labels}", f"--data.source.image_root={images}",
        "--data.source.test_fraction=0.05",  # 25 test images: some findings have no positive among them
        "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
        "--data.image_size=32",
        "--trainer.enable_progress_bar=false", "--mlflow_model.enabled=false",
    ])  # fmt: skip
    best = Path(cli.trainer.checkpoint_callback.best_model_path)
    run = MlflowClient(f"sqlite:///{workdir}/mlruns/mlflow.db").get_run(find_mlflow_logger(cli.trainer).run_id)
    (test_table,) = workdir.glob("mlruns/*/*/plots/evaluation.csv")
    tested = pd.read_csv(test_table, index_col="class")
    undefined = tested.index[tested["auroc"].isna()]
    assert len(undefined) > 0 and (tested.loc[undefined, "positives"] == 0).all()  # the case this test is about
    assert run.data.metrics["test/auroc"] == pytest.approx(tested.loc["mean", "auroc"], abs=1e-6)
    assert run.data.metrics["test/auroc_labels_defined"] == len(tested) - 1 - len(undefined)
    assert not any(f"test/auroc/{name}" in run.data.metrics for name in undefined)

    # the same test images, predicted from the same checkpoint, then audited against the official label file
    test_paths = chestxray14_manifest(labels, images, val_fraction=0.1, test_fraction=0.05).subset("test").paths
    pd.DataFrame({"path": [str(p) for p in test_paths]}).to_csv(workdir / "test_images.csv", index=False)
    predicted = run_predict(str(workdir / "test_images.csv"), str(best), output=workdir / "predictions.csv")
    assert set(predicted.findings) == set(tested.index[:-1])  # counts per finding and decision, not combinations
    assert all(sum(counts.values()) == len(test_paths) for counts in predicted.findings.values())
    assert set(predicted.decisions) <= {"decided", "abstain"}
    threshold = torch.load(best, weights_only=True)["state_dict"]["decision_threshold"].tolist()
    main(["evaluate", str(workdir / "predictions.csv"), str(labels), "--out_dir", str(workdir / "audit"),
          "--threshold", str(threshold)])  # fmt: skip
    audited = pd.read_csv(workdir / "audit" / "evaluation.csv", index_col="class")
    assert list(audited.index) == list(tested.index) and audited["n"].tolist() == tested["n"].tolist()
    pd.testing.assert_frame_equal(audited, tested, atol=1e-4, rtol=0)  # predict's CSV rounds to 6 decimals

    # multi-label heatmaps: one map per finding decided positive (the top finding when none is), each as a PNG,
    # a raw .npy of the image's size and its own peak and box, the columns joined by "|" in finding order
    few = workdir / "few_images.csv"
    pd.DataFrame({"path": [str(p) for p in test_paths[:4]]}).to_csv(few, index=False)
    run_predict(str(few), str(best), output=workdir / "maps.csv", heatmaps=workdir / "maps")
    rows = pd.read_csv(workdir / "maps.csv", keep_default_na=False)
    for row in rows.itertuples():
        expected = row.prediction.split("|") if row.prediction != "none" else None
        findings = row.heatmap_finding.split("|")
        if expected:
            assert findings == expected
        else:  # nothing decided positive: the most probable finding is explained
            assert findings == [max(tested.index[:-1], key=lambda name: getattr(row, f"prob_{name}"))]
        for column in ("heatmap", "heatmap_npy", "peak_x", "box_x_min"):
            assert len(str(getattr(row, column)).split("|")) == len(findings)
        for name, raw in zip(findings, row.heatmap_npy.split("|"), strict=True):
            assert raw.endswith(f"_{name}.npy") and np.load(raw).shape == Image.open(row.path).size[::-1]
