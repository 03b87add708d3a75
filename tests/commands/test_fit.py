"""The ``medtransfer`` CLI end to end: a short real fit + test tracked in MLflow, and one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from helpers import DEFAULT_CONFIG, tiny_fit_args
from mlflow.tracking import MlflowClient

from medtransfer.entry import main

SMALL = tiny_fit_args()
CHESTXRAY14_CONFIG = DEFAULT_CONFIG.parent / "chestxray14_sample_lite0.yaml"


def _client(workdir: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{workdir}/mlruns/mlflow.db")


def _runs(workdir: Path):
    mlflow.set_tracking_uri(f"sqlite:///{workdir}/mlruns/mlflow.db")
    return mlflow.search_runs(experiment_names=["medtransfer"])


@pytest.fixture
def fitted(workdir, pneumonia_npz, capsys):
    """One short fit + test of the default config through the CLI; returns the run and its output."""
    main(["fit", f"--config={DEFAULT_CONFIG}", f"--data.path={pneumonia_npz}", *SMALL])
    return _runs(workdir), capsys.readouterr().out


def test_fit_then_test_leaves_one_complete_mlflow_run(workdir, fitted):
    runs, out = fitted
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["status"] == "FINISHED"
    assert run["tags.mlflow.runName"].startswith("tf_efficientnet_lite0-pneumoniamnist-")
    assert run["params.model.backbone"] == "tf_efficientnet_lite0"
    assert run["params.model.pretrained"] == "lite0-package"
    assert run["params.finetuning.finetune_lr"] == "0.00053" and run["params.finetuning.lr_decay"] == "0.91"
    assert run["params.model.drop_rate"] == "0.41"
    assert run["params.model.optimizer.lr"] == "0.001"
    assert run["params.data.image_size"] == "32"
    for metric in ("val/auroc", "val/acc", "val/loss", "train/loss", "test/auroc", "test/acc", "finetune/phase",
                   "val/threshold", "test/threshold", "test/sensitivity", "test/specificity", "test/aurc", "test/ece",
                   "test/selective_acc_cov90", "test/coverage_at_acc95", "test/coverage"):  # fmt: skip
        assert f"metrics.{metric}" in runs.columns, metric
    assert 0.5 < run["metrics.test/auroc"] <= 1.0
    assert run["metrics.finetune/phase"] == 2
    history = _client(workdir).get_metric_history(run.run_id, "val/auroc")
    assert len(history) == 2  # per epoch
    artifacts = {a.path for a in _client(workdir).list_artifacts(run.run_id)}
    assert {"checkpoints", "config", "plots"} <= artifacts
    figures = {Path(a.path).name for a in _client(workdir).list_artifacts(run.run_id, "plots")}
    assert figures == {"roc.png", "risk_coverage.png", "reliability.png", "confusion.png", "evaluation.csv"}
    checkpoints = _client(workdir).list_artifacts(run.run_id, "checkpoints")
    assert len(checkpoints) == 1 and checkpoints[0].path.endswith(".ckpt")
    link = f"http://127.0.0.1:5000/#/experiments/{run.experiment_id}/runs/{run.run_id}?workflowType=machine_learning"
    assert f"See it in the MLflow UI (make ui): {link}" in out


@pytest.mark.slow
def test_logged_checkpoint_is_the_best_and_knows_its_run(workdir, fitted):
    runs, _ = fitted
    run_id = runs.iloc[0].run_id
    local = Path(
        mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoints", dst_path=str(workdir / "dl"))
    )
    checkpoint = torch.load(next(local.glob("*.ckpt")), weights_only=True)
    assert checkpoint["mlflow"]["run_id"] == run_id
    best_score = float(runs.iloc[0]["tags.best_val/auroc"])
    val_history = {m.step: m.value for m in _client(workdir).get_metric_history(run_id, "val/auroc")}
    assert best_score == pytest.approx(max(val_history.values()), abs=1e-5)
    # test applied the threshold fitted on validation at the best epoch, carried in the checkpoint
    best_step = max(val_history, key=val_history.get)
    thresholds = {m.step: m.value for m in _client(workdir).get_metric_history(run_id, "val/threshold")}
    assert float(checkpoint["state_dict"]["decision_threshold"]) == pytest.approx(thresholds[best_step])
    assert runs.iloc[0]["metrics.test/threshold"] == pytest.approx(thresholds[best_step])


@pytest.mark.slow
def test_test_command_on_a_checkpoint_logs_into_the_fit_run(workdir, fitted, pneumonia_npz):
    runs, _ = fitted
    run_id = runs.iloc[0].run_id
    last = next(workdir.glob("mlruns/*/*/checkpoints/last.ckpt"))
    main(["test", f"--config={DEFAULT_CONFIG}", f"--data.path={pneumonia_npz}", f"--ckpt_path={last}", *SMALL])
    after = _runs(workdir)
    assert list(after.run_id) == [run_id]
    artifacts = {a.path for a in _client(workdir).list_artifacts(run_id, "config")}
    assert artifacts == {"config/fit.yaml", "config/test.yaml"}
    assert len(_client(workdir).get_metric_history(run_id, "test/auroc")) == 2


@pytest.mark.slow
def test_validate_on_a_checkpoint_creates_no_new_run(workdir, fitted, pneumonia_npz):
    runs, _ = fitted
    last = next(workdir.glob("mlruns/*/*/checkpoints/last.ckpt"))
    main(["validate", f"--config={DEFAULT_CONFIG}", f"--data.path={pneumonia_npz}", f"--ckpt_path={last}", *SMALL])
    assert list(_runs(workdir).run_id) == list(runs.run_id)


@pytest.mark.slow
def test_resumed_fit_continues_the_same_run_in_phase_two(workdir, fitted, pneumonia_npz):
    runs, _ = fitted
    run_id = runs.iloc[0].run_id
    last = next(workdir.glob("mlruns/*/*/checkpoints/last.ckpt"))
    args = [a for a in SMALL if not a.startswith("--trainer.max_epochs")]
    main(["fit", f"--config={DEFAULT_CONFIG}", f"--data.path={pneumonia_npz}", f"--ckpt_path={last}", *args,
          "--trainer.max_epochs=3", "--test_after_fit=false"])  # fmt: skip
    after = _runs(workdir)
    assert list(after.run_id) == [run_id]
    client = _client(workdir)
    phases = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "finetune/phase"))
    epochs = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "epoch"))
    assert epochs[-1][1] == 2 and phases[-1] == (epochs[-1][0], 2.0)  # the new epoch ran, in phase 2
    for key in ("val/auroc", "train/loss", "finetune/phase"):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert len(steps) == len(set(steps)), key  # a resumed fit logs each epoch once


@pytest.mark.slow
def test_ckpt_path_last_resumes_the_experiments_most_recently_checkpointed_run(workdir, fitted, pneumonia_npz):
    older = fitted[0].iloc[0].run_id
    older_epochs = len(_client(workdir).get_metric_history(older, "epoch"))
    args = [a for a in SMALL if not a.startswith("--trainer.max_epochs")]
    main(["fit", f"--config={DEFAULT_CONFIG}", f"--data.path={pneumonia_npz}", *args, "--trainer.max_epochs=1",
          "--test_after_fit=false"])  # fmt: skip
    (newer,) = set(_runs(workdir).run_id) - {older}
    main(["fit", f"--config={DEFAULT_CONFIG}", f"--data.path={pneumonia_npz}", "--ckpt_path=last", *args,
          "--trainer.max_epochs=2", "--test_after_fit=false"])  # fmt: skip
    assert set(_runs(workdir).run_id) == {older, newer}  # no third run
    epochs = [m.value for m in _client(workdir).get_metric_history(newer, "epoch")]
    assert max(epochs) == 1  # the newer run went on from its epoch 0 to epoch 1
    assert len(_client(workdir).get_metric_history(older, "epoch")) == older_epochs  # the older run is untouched


def test_ckpt_path_last_without_any_checkpoint_is_one_clear_line(workdir, pneumonia_npz, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", f"--config={DEFAULT_CONFIG}", f"--data.path={pneumonia_npz}", "--ckpt_path=last", *SMALL])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--ckpt_path last: no run of experiment 'medtransfer' has a last.ckpt" in err
    assert "Traceback" not in err


def test_evaluate_subcommand_audits_a_predictions_file(workdir, chexnet_dir, capsys):
    main(["evaluate", str(chexnet_dir / "preds.csv"), str(chexnet_dir / "Data_Entry_2017_v2020.csv.gz"),
          "--out_dir", str(workdir / "audit")])  # fmt: skip
    assert "Pneumonia" in capsys.readouterr().out
    assert (workdir / "audit" / "evaluation.csv").is_file()


def _error_line(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


def test_missing_data_file_is_one_clear_line(workdir, capsys):
    line = _error_line(capsys, ["fit", f"--config={DEFAULT_CONFIG}", "--data.path=missing.npz"])
    assert line.startswith("medtransfer: error: Data file not found: missing.npz")


def test_unknown_backbone_is_one_clear_line(workdir, pneumonia_npz, capsys):
    args = [
        "fit",
        f"--config={DEFAULT_CONFIG}",
        f"--data.path={pneumonia_npz}",
        "--model.backbone=resnet5O",
        "--model.pretrained=none",
    ]
    line = _error_line(capsys, args)
    assert line.startswith("medtransfer: error: Unknown backbone 'resnet5O'")


def test_npz_without_expected_keys_is_one_clear_line(workdir, capsys):
    import numpy as np

    np.savez(workdir / "odd.npz", images=np.zeros((2, 28, 28), np.uint8))
    line = _error_line(capsys, ["fit", f"--config={DEFAULT_CONFIG}", "--data.path=odd.npz", *SMALL])
    assert "odd.npz lacks the key(s) train_images, train_labels" in line


def test_console_script_prints_no_traceback(workdir):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "medtransfer.commands.fit",
            "fit",
            f"--config={DEFAULT_CONFIG}",
            "--data.path=missing.npz",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("medtransfer: error: Data file not found")


def test_offline_lite0_weights_on_another_backbone_is_one_clear_line(workdir, pneumonia_npz, capsys):
    args = ["fit", f"--config={DEFAULT_CONFIG}", f"--data.path={pneumonia_npz}", "--model.backbone=resnet18"]
    line = _error_line(capsys, args)
    assert line.startswith("medtransfer: error: pretrained: lite0-package holds weights for 'tf_efficientnet_lite0'")


def test_a_corrupt_image_read_in_a_loader_worker_is_still_one_line(workdir, pneumonia_npz, capsys):
    from PIL import Image

    with np.load(pneumonia_npz) as data:
        images, labels = data["test_images"][:30], data["test_labels"][:30, 0]
    lines = ["path,label"]
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(image).save(workdir / f"img{i}.png")
        lines.append(f"img{i}.png,{label}")
    (workdir / "cases.csv").write_text("\n".join(lines) + "\n")
    for i in range(30):  # every image is truncated, so whichever the loader reads first fails
        (workdir / f"img{i}.png").write_bytes((workdir / f"img{i}.png").read_bytes()[:60])
    args = [
        "fit", f"--config={DEFAULT_CONFIG}", "--data=medtransfer.data.images.ImageDataModule",
        "--data.source=medtransfer.data.images.CsvSource", f"--data.source.csv_path={workdir / 'cases.csv'}",
        "--data.num_workers=1", "--data.image_size=32", "--trainer.max_epochs=1", "--test_after_fit=false",
    ]  # fmt: skip
    line = _error_line(capsys, args)
    assert line.startswith("medtransfer: error: ") and "img" in line and "Traceback" not in line


def test_help_lists_every_command_with_one_line(capsys):
    from medtransfer.commands.fit import MedTransferCLI
    from medtransfer.entry import COMMAND_HELP, COMMANDS

    main(["--help"])
    out = capsys.readouterr().out
    commands = {"fit", "validate", "test", *COMMANDS}
    assert set(COMMAND_HELP) == commands
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert sorted(listed) == sorted(commands)  # one line each
    assert "Run inference on your data" not in out  # Lightning's own predict text
    assert "predict" not in MedTransferCLI.subcommands()  # medtransfer predict is the batch-inference command


def test_help_imports_neither_lightning_nor_mlflow():
    """``medtransfer --help`` answers from ``medtransfer.entry`` alone: no seconds of heavy imports."""
    code = "import sys; from medtransfer.entry import main; main(['--help']); print(sorted(sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    modules = result.stdout.splitlines()[-1]
    assert "lightning" not in modules and "mlflow" not in modules and "torch" not in modules
    assert "prepare" in result.stdout


@pytest.mark.slow
def test_a_default_fit_log_has_no_warning_the_user_cannot_act_on(workdir, pneumonia_npz, recwarn):
    for _ in range(2):  # as a search or learning curve runs fits, in one process
        main(["fit", f"--config={DEFAULT_CONFIG}", f"--data.path={pneumonia_npz}", *SMALL])
    messages = [f"{w.category.__name__}: {w.message}" for w in recwarn]
    assert not [m for m in messages if "JsonargparseWarning" in m or "multiple `ModelCheckpoint`" in m], messages
    assert sum("logging interval" in m for m in messages) <= 1  # actionable (names the option), said once
    with pytest.raises(SystemExit):  # albumentations' tuple defaults, dumped by --print_config
        main(["fit", f"--config={CHESTXRAY14_CONFIG}", "--print_config"])
    assert not [w for w in recwarn if "does not round-trip" in str(w.message)]
