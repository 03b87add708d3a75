"""``medtransfer search``: Optuna studies over real tiny fits of PneumoniaMNIST, each trial an MLflow child run."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from helpers import DEFAULT_CONFIG, REPO
from optuna.trial import TrialState

from medtransfer.commands.search import run_search
from medtransfer.commands.search_space import load_space, open_storage
from medtransfer.entry import main
from medtransfer.errors import DataError

TINY = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=2",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.image_size=32",
    "--data.batch_size=32",
]
LR = "model.optimizer.init_args.lr"
WD = "model.optimizer.init_args.weight_decay"


def _space(folder: Path, spec: dict) -> Path:
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _runs(workdir: Path):
    mlflow.set_tracking_uri(f"sqlite:///{workdir}/mlruns/mlflow.db")
    return mlflow.search_runs(experiment_names=["medtransfer"])


def _trials(workdir: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=open_storage(f"sqlite:///{workdir}/mlruns/optuna.db")).trials


@pytest.mark.slow
def test_grid_search_with_two_worker_processes_runs_each_point_once(workdir, pneumonia_npz, capsys):
    space = _space(
        workdir,
        {
            LR: {"type": "float", "low": 1e-4, "high": 1e-1, "log": True, "grid": [1e-3, 1e-2]},
            WD: {"type": "float", "low": 0.0, "high": 1e-2, "grid": [0.0, 1e-4]},
        },
    )
    main(["search", f"--config={DEFAULT_CONFIG}", f"--space={space}", "--sampler=grid", "--workers=2",
          "--study_name=grid2x2", "--pruning=false", "--output=best.yaml", "--", *TINY,
          f"--data.path={pneumonia_npz}"])  # fmt: skip
    trials = _trials(workdir, "grid2x2")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    points = sorted((t.params[LR], t.params[WD]) for t in trials)
    assert points == [(1e-3, 0.0), (1e-3, 1e-4), (1e-2, 0.0), (1e-2, 1e-4)]
    assert all(0.0 <= t.value <= 1.0 for t in trials)

    runs = _runs(workdir)
    parents = runs[runs["tags.medtransfer.command"] == "search"]
    children = runs[runs["tags.mlflow.parentRunId"].notna()]
    assert len(parents) == 1 and len(children) == 4
    parent = parents.iloc[0]
    assert set(children["tags.mlflow.parentRunId"]) == {parent.run_id}
    assert sorted(children["tags.optuna.trial"].astype(int)) == [0, 1, 2, 3]
    assert set(children["status"]) == {"FINISHED"} and parent["status"] == "FINISHED"
    assert sorted(children[f"params.{LR.replace('init_args.', '')}"].astype(float)) == [1e-3, 1e-3, 1e-2, 1e-2]
    assert "metrics.test/auroc" not in children.columns or children["metrics.test/auroc"].isna().all()
    best = max(trials, key=lambda t: t.value)
    assert parent["metrics.best_val/auroc"] == pytest.approx(best.value)
    assert int(parent["tags.best_trial"]) == best.number
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.run_id, "search")}
    assert {"search/best.yaml", "search/trials.csv", "search/optimization_history.png"} <= artifacts

    written = yaml.safe_load((workdir / "best.yaml").read_text())
    assert written["model"]["optimizer"]["init_args"]["lr"] == best.params[LR]
    assert written["model"]["optimizer"]["init_args"]["weight_decay"] == best.params[WD]
    assert written["test_after_fit"] is True  # the base config's, not the trials' override
    link = f"/#/experiments/{parent.experiment_id}/runs/{parent.run_id}?workflowType=machine_learning"
    assert f"See it in the MLflow UI (make ui): http://127.0.0.1:5000{link}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as printed:  # `fit --config best.yaml` accepts the file as it is
        main(["fit", "--config=best.yaml", "--trainer.max_epochs=1", "--print_config"])
    assert printed.value.code == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["optimizer"]["init_args"]["lr"] == best.params[LR]


@pytest.mark.slow
def test_random_search_draws_log_uniform_learning_rates_within_bounds(workdir, pneumonia_npz, capsys):
    space = _space(workdir, {LR: {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}})
    result = run_search(
        DEFAULT_CONFIG, space, sampler="random", n_trials=2, study_name="random", pruning=False,
        fit_args=[*TINY, f"--data.path={pneumonia_npz}"], output=workdir / "best.yaml",
    )  # fmt: skip
    trials = _trials(workdir, "random")
    lrs = [t.params[LR] for t in trials]
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs) and lrs[0] != lrs[1]
    assert trials[0].distributions[LR].log
    assert result.best["params"][LR] in lrs
    child_lrs = sorted(_runs(workdir)["params.model.optimizer.lr"].dropna().astype(float))
    assert child_lrs == pytest.approx(sorted(lrs))  # each trial fitted with its drawn value
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("search: trial")]
    assert [line.split(";")[1].split(",")[0] for line in progress] == [" 1/2 trials finished", " 2/2 trials finished"]


@pytest.mark.slow
def test_pruned_trial_is_marked_pruned_in_optuna_and_killed_in_mlflow(workdir, pneumonia_npz):
    # Minimising val/loss, a learning rate of 100 wrecks the head at once; the median pruner, warmed up by
    # trial 0, stops trial 1 after its first validation epoch.
    space = _space(workdir, {LR: {"type": "float", "low": 1e-4, "high": 1e3, "log": True, "grid": [1e-3, 1e2]}})
    result = run_search(
        DEFAULT_CONFIG, space, sampler="grid", study_name="pruned", metric="val/loss", direction="minimize",
        pruning=True, pruning_startup_trials=1, pruning_warmup_epochs=0,
        fit_args=[*TINY, "--trainer.max_epochs=2", f"--data.path={pneumonia_npz}"], output=workdir / "best.yaml",
    )  # fmt: skip
    trials = _trials(workdir, "pruned")
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    assert list(trials[1].intermediate_values) == [0]  # stopped after its first epoch
    assert result.best["trial"] == 0
    runs = _runs(workdir).set_index("tags.optuna.trial")
    assert runs.loc["1", "status"] == "KILLED" and runs.loc["1", "tags.optuna.state"] == "PRUNED"
    assert runs.loc["0", "status"] == "FINISHED"


@pytest.mark.parametrize(
    ("spec", "sampler", "message"),
    [
        ({LR: {"type": "float", "low": 1e-4, "high": 1e-2}}, "grid", f"{LR!r}: --sampler grid needs"),
        ({LR: {"type": "float", "low": 0.0, "high": 1e-2, "log": True}}, "random", f"{LR!r}: `log: true` needs"),
        ({LR: {"type": "floaty", "low": 0.0, "high": 1.0}}, "random", f"{LR!r}: expected `type`"),
        ({LR: {"type": "float", "low": 1e-4, "high": 1e-2, "grid": [1.0]}}, "grid", f"{LR!r}: grid values [1.0]"),
        ({"data.batch_size": {"type": "categorical", "choices": []}}, "random", "'data.batch_size': a categorical"),
    ],
)
def test_bad_search_space_names_the_key(tmp_path, spec, sampler, message):
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_space(_space(tmp_path, spec), sampler)


def test_unknown_fit_option_in_space_is_a_one_line_error(workdir, pneumonia_npz, capsys):
    space = _space(workdir, {"model.optimiser.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}})
    with pytest.raises(SystemExit) as stopped:
        main(["search", f"--config={DEFAULT_CONFIG}", f"--space={space}", "--n_trials=1", "--",
              f"--data.path={pneumonia_npz}"])  # fmt: skip
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "search space key 'model.optimiser.lr' is not an option of `medtransfer fit`" in err
    assert not (workdir / "mlruns" / "optuna.db").exists() or not optuna.get_all_study_names(
        open_storage(f"sqlite:///{workdir}/mlruns/optuna.db")
    )


def test_space_file_of_the_repository_is_valid_for_both_samplers():
    for sampler in ("grid", "random"):
        params = load_space(REPO / "configs" / "search" / "pneumonia_lr.yaml", sampler)
        assert [p.key for p in params] == [LR, "finetuning.finetune_lr"]
        assert all(p.log for p in params)
    assert json.dumps([p.as_dict() for p in params])  # stored in the study as plain JSON
