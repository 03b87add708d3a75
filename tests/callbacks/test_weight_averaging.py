"""EMA: the averaged weights are what is validated, checkpointed and tested after fit (Lightning's own callback
put the live weights back when ``test_after_fit`` loaded the best checkpoint), with the decision state fitted on
validation, not an average of old thresholds."""

from __future__ import annotations

import torch
from helpers import DEFAULT_CONFIG, tiny_fit_args

from medtransfer.commands.fit import build_cli

EMA = '[{"class_path": "medtransfer.callbacks.weight_averaging.EMA", "init_args": {"decay": 0.5}}]'


def test_the_best_checkpoint_holds_the_average_and_test_after_fit_measures_it(workdir, pneumonia_npz):
    cli = build_cli(
        ["fit", f"--config={DEFAULT_CONFIG}", f"--data.path={pneumonia_npz}", *tiny_fit_args(),
         f"--trainer.callbacks={EMA}", "--mlflow_model.enabled=false"]
    )  # fmt: skip
    checkpoint = torch.load(cli.trainer.checkpoint_callback.best_model_path, map_location="cpu", weights_only=True)
    averaged, live = checkpoint["state_dict"], checkpoint["current_model_state"]
    name = "head.1.weight"  # the new head: trained from the first step
    assert not torch.equal(averaged[name], live[name])
    for buffer in ("decision_threshold", "temperature", "min_confidence"):  # fitted on validation, not averaged
        assert torch.equal(averaged[buffer], live[buffer]), buffer
    tested = cli.model.state_dict()  # after test_after_fit loaded the best checkpoint
    assert torch.equal(tested[name], averaged[name])
    assert float(tested["decision_threshold"]) == float(averaged["decision_threshold"])
