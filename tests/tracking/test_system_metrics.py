"""MLflow system metrics in the fit's run: on by option or by MLflow's own switch, which Lightning's
``MLFlowLogger`` ignores (Lightning issue #20563)."""

from __future__ import annotations

import mlflow
import pytest
from helpers import DEFAULT_CONFIG, tiny_fit_args
from mlflow.tracking import MlflowClient

from medtransfer.entry import main
from medtransfer.tracking.system_metrics import LogSystemMetrics


def test_off_by_default_and_follows_mlflows_own_switch(monkeypatch):
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", raising=False)
    assert not LogSystemMetrics().active
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true")
    assert LogSystemMetrics().active
    assert not LogSystemMetrics(enabled=False).active


@pytest.mark.slow
def test_fit_logs_cpu_and_memory_into_its_run(workdir, pneumonia_npz):
    main(["fit", f"--config={DEFAULT_CONFIG}", f"--data.path={pneumonia_npz}", *tiny_fit_args(3, 2, 2),
          "--system_metrics.enabled=true", "--system_metrics.interval_s=0.5", "--test_after_fit=true"])  # fmt: skip
    mlflow.set_tracking_uri(f"sqlite:///{workdir}/mlruns/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["medtransfer"])
    assert len(runs) == 1  # sampled into the fit's run, not a run of its own
    client = MlflowClient(f"sqlite:///{workdir}/mlruns/mlflow.db")
    metrics = client.get_run(runs.iloc[0].run_id).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics)
    history = client.get_metric_history(runs.iloc[0].run_id, "system/cpu_utilization_percentage")
    steps = sorted(m.step for m in history)
    assert len(steps) >= 2 and len(set(steps)) == len(steps)  # fit, then test continuing its steps
