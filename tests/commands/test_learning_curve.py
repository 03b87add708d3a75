"""``medtransfer learning-curve``: one parent MLflow run, a child fit per config x fraction x seed, CSV + plot."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from helpers import DEFAULT_CONFIG, REPO
from mlflow.tracking import MlflowClient

from medtransfer.commands.learning_curve import run_learning_curve
from medtransfer.entry import main
from medtransfer.errors import MedtransferError

RECIPES = [REPO / "configs" / "learning_curve" / f"{name}.yaml" for name in ("lite0_pretrained", "lite0_scratch")]
TINY = [
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=2",
    "--trainer.limit_test_batches=2",
    "--trainer.enable_progress_bar=false",
    "--finetuning.unfreeze_at_epoch=1",
    "--data.init_args.image_size=32",
    "--data.init_args.batch_size=16",
]


def _read_csv(path):
    """The CSV's rows as the command wrote them (``round_trip``: floats read back exactly)."""
    return list(
        pd.read_csv(path, dtype={"config": str, "run_id": str}, float_precision="round_trip").itertuples(index=False)
    )


@pytest.mark.slow
def test_two_configs_at_two_fractions_make_a_parent_run_with_four_children(workdir, pneumonia_npz, capsys):
    main([
        "learning-curve", f"--configs={json.dumps([str(c) for c in RECIPES])}", f"--base_config={DEFAULT_CONFIG}",
        "--fractions=[0.02, 0.05]", "--seeds=[0]", "--metric=auroc", "--output_dir=curve",
        f"--fit_args={json.dumps([*TINY, f'--data.init_args.path={pneumonia_npz}'])}",
    ])  # fmt: skip
    client = MlflowClient(f"sqlite:///{workdir}/mlruns/mlflow.db")
    experiment = client.get_experiment_by_name("medtransfer")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.run_name.startswith("learning-curve-pneumoniamnist-")
    assert parent.info.status == "FINISHED"
    assert len(children) == 4 == len(runs) - 1
    link = f"/#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}?workflowType=machine_learning"
    assert f"See it in the MLflow UI (make ui): http://127.0.0.1:5000{link}" in capsys.readouterr().out
    assert {(r.data.tags["curve.config"], r.data.tags["curve.fraction"]) for r in children} == {
        ("lite0_pretrained", "0.02"), ("lite0_pretrained", "0.05"), ("lite0_scratch", "0.02"), ("lite0_scratch", "0.05")
    }  # fmt: skip
    assert all(r.info.status == "FINISHED" for r in children)
    assert {r.data.params["data.train_fraction"] for r in children} == {"0.02", "0.05"}
    assert {r.data.params["model.pretrained"] for r in children} == {"lite0-package", "none"}

    points = _read_csv(workdir / "curve" / "learning_curve.csv")
    assert [(p.config, p.fraction) for p in points] == [
        ("lite0_pretrained", 0.02), ("lite0_pretrained", 0.05), ("lite0_scratch", 0.02), ("lite0_scratch", 0.05)
    ]  # fmt: skip
    assert {p.run_id for p in points} == {r.info.run_id for r in children}
    for small, large in (points[:2], points[2:]):
        assert small.train_images < large.train_images
    assert points[0].train_images == points[2].train_images == 25 + 70  # ceil(2 % of 1213) + ceil(2 % of 3477)
    for point in points:
        run = client.get_run(point.run_id)
        assert point.val_metric == max(m.value for m in client.get_metric_history(point.run_id, "val/auroc"))
        assert point.test_metric == pytest.approx(run.data.metrics["test/auroc"])
        assert 0 <= point.train_metric <= 1
    assert (workdir / "curve" / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "learning_curve")}
    assert artifacts == {"learning_curve/learning_curve.csv", "learning_curve/learning_curve.png"}
    history = client.get_metric_history(parent.info.run_id, "lite0_scratch/val_auroc")
    assert sorted(m.step for m in history) == sorted(p.train_images for p in points[2:])


def test_a_fraction_outside_zero_to_one_is_refused_before_any_fit(workdir):
    with pytest.raises(MedtransferError, match="fractions"):
        run_learning_curve(configs=[str(RECIPES[0])], fractions=[0.5, 1.5])
    assert not (workdir / "mlruns").exists()


def test_a_missing_config_is_named(workdir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["learning-curve", "--configs=[nowhere.yaml]"])
    assert exit_info.value.code == 2
    assert "nowhere.yaml" in capsys.readouterr().err


@pytest.mark.slow
def test_a_curve_that_fails_midway_keeps_the_finished_fits_in_its_csv(workdir, pneumonia_npz):
    broken = workdir / "broken.yaml"
    broken.write_text("model:\n  backbone: no_such_backbone\n")
    with pytest.raises(Exception, match="no_such_backbone"):
        run_learning_curve(
            configs=[str(RECIPES[1]), str(broken)], base_config=str(DEFAULT_CONFIG), fractions=[0.02],
            output_dir="curve", fit_args=[*TINY, f"--data.init_args.path={pneumonia_npz}"],
        )  # fmt: skip
    points = _read_csv(workdir / "curve" / "learning_curve.csv")
    assert [(p.config, p.fraction) for p in points] == [("lite0_scratch", 0.02)]
    client = MlflowClient(f"sqlite:///{workdir}/mlruns/mlflow.db")
    (parent,) = client.search_runs(
        [client.get_experiment_by_name("medtransfer").experiment_id], "tags.`medtransfer.command` = 'learning-curve'"
    )
    assert parent.info.status == "FAILED"
