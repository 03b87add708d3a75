"""``medtransfer compare``: real runs of one experiment (two fits, one a search child, and a baseline) ranked
side by side, written as CSV, markdown and a bar chart; one-line errors naming what exists."""

from __future__ import annotations

import hashlib

import pandas as pd
import pytest
from helpers import DEFAULT_CONFIG, tiny_fit_args
from mlflow import MlflowClient

from medtransfer.commands.baseline import run_baseline
from medtransfer.commands.compare import lower_is_better, normalise_metric, run_compare, to_markdown
from medtransfer.commands.fit import build_cli
from medtransfer.data.medmnist import MedMNISTDataModule
from medtransfer.entry import main
from medtransfer.errors import MedtransferError
from medtransfer.tracking.callbacks import find_mlflow_logger

TINY = tiny_fit_args(train_batches=3, val_batches=2, test_batches=2)


@pytest.fixture(scope="module")
def store(tmp_path_factory, pneumonia_npz):
    """An experiment with a Lite0 fit, a ResNet-18 fit that is the child of a search run, and a pixel baseline."""
    folder = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{folder}/mlruns/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setattr("sys.argv", ["medtransfer"])
        lite0 = build_cli(["fit", f"--config={DEFAULT_CONFIG}", f"--data.path={pneumonia_npz}", *TINY])
        client = MlflowClient(uri)
        experiment_id = client.get_experiment_by_name("medtransfer").experiment_id
        parent = client.create_run(experiment_id, run_name="search-demo").info.run_id
        client.set_terminated(parent)
        child = build_cli(
            ["fit", f"--config={DEFAULT_CONFIG}", f"--data.path={pneumonia_npz}", *TINY,
             "--model.backbone=resnet18", "--model.pretrained=none", "--finetuning.finetune_lr=1e-4",
             "--finetuning.head_finetune_lr=1e-4", "--finetuning.lr_decay=1", "--finetuning.schedule=constant",
             "--trainer.logger.init_args.run_name=search-demo-trial-0",
             f'--trainer.logger.init_args.tags={{"mlflow.parentRunId": "{parent}"}}']
        )  # fmt: skip
        pixels = run_baseline(data=MedMNISTDataModule(path=str(pneumonia_npz)), pixel_size=7, Cs=[1.0], log_model=False)
    yield {
        "folder": folder,
        "uri": uri,
        "client": client,
        "lite0": find_mlflow_logger(lite0.trainer).run_id,
        "child": find_mlflow_logger(child.trainer).run_id,
        "parent": parent,
        "baseline": pixels.run_id,
    }


@pytest.mark.slow
def test_every_run_is_listed_best_first_by_the_metric_written_with_an_underscore(store, capsys):
    table = run_compare(metric="test_auroc", tracking_uri=store["uri"]).table
    client = store["client"]
    ids = [store["lite0"], store["child"], store["baseline"]]
    expected = sorted(ids, key=lambda i: -client.get_run(i).data.metrics["test/auroc"])
    assert list(table["run_id"]) == [*expected, store["parent"]]  # the parent logged no test/auroc: last
    assert list(table.columns) == [
        "run", "run_id", "parent", "status", "start", "backbone", "pretrained", "image_size", "epochs", "lrs",
        "test/auroc", "best val/auroc", "test/acc", "test/selective_acc_cov90", "test/aurc", "dataset",
    ]  # fmt: skip
    rows = table.set_index("run_id")
    for run_id in ids:
        metrics = client.get_run(run_id).data.metrics
        assert rows.loc[run_id, "test/auroc"] == metrics["test/auroc"]
        assert rows.loc[run_id, "test/selective_acc_cov90"] == metrics["test/selective_acc_cov90"]
    out = capsys.readouterr().out
    assert "4 runs of 'medtransfer' by test/auroc" in out and "search-demo-trial-0" in out


@pytest.mark.slow
def test_rows_describe_backbone_weights_input_schedule_and_parent(store):
    rows = run_compare(tracking_uri=store["uri"]).table.set_index("run_id")
    lite0, child, pixels = rows.loc[store["lite0"]], rows.loc[store["child"]], rows.loc[store["baseline"]]
    assert lite0["run"].startswith("tf_efficientnet_lite0-pneumoniamnist-") and lite0["status"] == "FINISHED"
    assert (lite0["backbone"], lite0["pretrained"], lite0["image_size"], lite0["epochs"], lite0["lrs"]) == (
        "tf_efficientnet_lite0", "lite0-package", "32", "2", "0.001 -> 0.00053 @1 (head 0.00044) x0.91/block cosine",
    )  # fmt: skip
    history = store["client"].get_metric_history(store["lite0"], "val/auroc")
    assert lite0["best val/auroc"] == pytest.approx(max(m.value for m in history), abs=1e-6)
    assert (child["run"], child["parent"], child["backbone"], child["pretrained"]) == (
        "search-demo-trial-0", "search-demo", "resnet18", "none",
    )  # fmt: skip
    assert child["lrs"] == "0.001 -> 0.0001 @1"
    assert (pixels["backbone"], pixels["lrs"], pixels["parent"]) == ("logreg-pixels", "", "")
    assert rows.loc[store["parent"], "parent"] == "" and pd.isna(rows.loc[store["parent"], "test/auroc"])


@pytest.mark.slow
def test_lower_is_better_metrics_rank_ascending_and_a_filter_narrows_the_runs(store):
    table = run_compare(metric="test/aurc", tracking_uri=store["uri"]).table
    ranked = table["test/aurc"].dropna()
    assert list(ranked) == sorted(ranked) and len(ranked) == 3
    only = run_compare(tracking_uri=store["uri"], filter_string="params.model.backbone = 'resnet18'").table
    assert list(only["run_id"]) == [store["child"]]


@pytest.mark.slow
def test_csv_markdown_and_plot_files_hold_the_table(store, tmp_path):
    table = run_compare(
        tracking_uri=store["uri"], csv=tmp_path / "runs.csv", markdown=tmp_path / "runs.md", plot=tmp_path / "runs.png"
    ).table
    written = pd.read_csv(tmp_path / "runs.csv", dtype={"image_size": str, "epochs": str})
    assert list(written["run_id"]) == list(table["run_id"])
    assert written["test/auroc"].iloc[0] == pytest.approx(table["test/auroc"].iloc[0])
    markdown = (tmp_path / "runs.md").read_text()
    assert markdown == to_markdown(table)
    assert markdown.splitlines()[0].startswith("| run | run_id | parent |") and len(markdown.splitlines()) == 2 + 4
    assert f"| {table['test/auroc'].iloc[0]:.4f} |" in markdown.splitlines()[2]
    assert (tmp_path / "runs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_the_command_line_runs_through_the_medtransfer_dispatcher(store, tmp_path, capsys):
    main(["compare", f"--tracking_uri={store['uri']}", "--metric=test_acc", f"--csv={tmp_path / 'runs.csv'}"])
    out = capsys.readouterr().out
    assert "by test/acc" in out and "logreg-pixels" in out
    assert pd.read_csv(tmp_path / "runs.csv").columns[10] == "test/acc"


@pytest.mark.slow
def test_an_unknown_experiment_lists_the_experiments_that_exist(store, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", f"--tracking_uri={store['uri']}", "--experiment=medtransfr"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "No MLflow experiment 'medtransfr'" in error and "experiments: Default, medtransfer" in error


@pytest.mark.slow
def test_a_metric_no_run_logged_lists_the_metrics_present(store, capsys):
    with pytest.raises(SystemExit):
        main(["compare", f"--tracking_uri={store['uri']}", "--metric=test/f1"])
    error = capsys.readouterr().err
    assert "No run logged the metric 'test/f1'; metrics present:" in error and "test/auroc" in error


def test_a_missing_store_is_an_error_and_is_not_created(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(MedtransferError, match=r"No MLflow store at .*mlruns/mlflow.db"):
        run_compare()
    assert not (tmp_path / "mlruns").exists()


def test_metric_names_are_matched_with_or_without_slashes():
    logged = ["test/auroc", "test/selective_acc_cov90", "val/auroc"]
    assert normalise_metric("test_auroc", logged) == "test/auroc"
    assert normalise_metric("test_selective_acc_cov90", logged) == "test/selective_acc_cov90"
    assert normalise_metric("val/auroc", logged) == "val/auroc"
    with pytest.raises(MedtransferError, match="metrics present: test/auroc, test/selective_acc_cov90, val/auroc"):
        normalise_metric("auroc", logged)


def test_losses_risks_and_calibration_errors_rank_ascending():
    assert all(map(lower_is_better, ["test/aurc", "val/loss", "test/ece", "test/augrc"]))
    assert not any(map(lower_is_better, ["test/auroc", "test/acc", "test/selective_acc_cov90"]))


@pytest.mark.slow
def test_the_dataset_hash_of_a_fitted_run_is_the_npz_files(store, pneumonia_npz):
    tags = store["client"].get_run(store["lite0"]).data.tags
    assert tags["dataset.sha256"] == hashlib.sha256(pneumonia_npz.read_bytes()).hexdigest()


@pytest.mark.slow
def test_each_run_logs_its_splits_as_mlflow_dataset_inputs_and_compare_shows_them(store):
    client = store["client"]
    inputs = client.get_run(store["lite0"]).inputs.dataset_inputs
    contexts = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in inputs}
    assert set(contexts) == {"train", "validation", "test"}
    assert {d.name for d in contexts.values()} == {"pneumoniamnist-train", "pneumoniamnist-val", "pneumoniamnist-test"}
    assert len({d.digest for d in contexts.values()}) == 3 and all(len(d.digest) == 16 for d in contexts.values())
    rows = run_compare(tracking_uri=store["uri"]).table.set_index("run_id")
    # the fits and the baseline saw the same validation data: one dataset, ranked together
    expected = f"pneumoniamnist@{contexts['validation'].digest[:8]}"
    assert {rows.loc[store[k], "dataset"] for k in ("lite0", "child", "baseline")} == {expected}


def _logged_run(client, experiment_id, name, dataset, digest, auroc, params):
    from mlflow.entities import Dataset, DatasetInput, InputTag

    run_id = client.create_run(experiment_id, run_name=name).info.run_id
    source = '{"uri": "/data/x.npz"}'
    client.log_inputs(run_id, [DatasetInput(Dataset(f"{dataset}-val", digest, "local", source),
                                            [InputTag("mlflow.data.context", "validation")])])  # fmt: skip
    client.log_metric(run_id, "test/auroc", auroc)
    for key, value in params.items():
        client.log_param(run_id, key, value)
    client.set_terminated(run_id)
    return run_id


def test_runs_of_different_datasets_are_ranked_apart_unless_asked_and_lrs_say_what_ran(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("mixed")
    frozen = {"model.optimizer.lr": "0.001", "finetuning.finetune_lr": "1e-05", "finetuning.unfreeze_at_epoch": "3",
              "trainer.max_epochs": "3"}  # fmt: skip
    a_good = _logged_run(client, experiment_id, "a-" + "long-run-name-" * 6, "chest", "a" * 16, 0.9, frozen)
    a_bad = _logged_run(client, experiment_id, "a-bad", "chest", "a" * 16, 0.7, {})
    b = _logged_run(client, experiment_id, "b", "derma", "b" * 16, 0.8, {})
    grouped = run_compare(experiment="mixed", tracking_uri=uri).table
    assert list(grouped["run_id"]) == [a_good, a_bad, b]
    assert list(grouped["dataset"]) == ["chest@aaaaaaaa", "chest@aaaaaaaa", "derma@bbbbbbbb"]
    out = capsys.readouterr().out
    assert "ranked within each of 2 datasets" in out and "long-run-name-" * 6 in out  # a long name on one line
    assert list(run_compare(experiment="mixed", tracking_uri=uri, mixed_datasets=True).table["run_id"]) == [
        a_good,
        b,
        a_bad,
    ]
    assert grouped.set_index("run_id").loc[a_good, "lrs"] == "0.001 (frozen)"  # never unfroze: no "-> 1e-05 @3"
