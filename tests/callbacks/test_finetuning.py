"""FreezeThenFinetune: what trains, which BatchNorm layers run in eval mode, and at which lr, per phase."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from helpers import tiny_loaders
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.nn.modules.batchnorm import _BatchNorm

from medtransfer.callbacks.finetuning import FreezeThenFinetune
from medtransfer.models.backbones import backbone_blocks
from medtransfer.models.classifier import ClassifierModule

BACKBONE = "resnet10t"  # small, with BatchNorm and timm's group_matcher


class Probe(Callback):
    """Records, at the first batch of every epoch, the state the finetuning callback left."""

    def __init__(self) -> None:
        self.epochs: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx:
            return
        self.epochs[trainer.current_epoch] = {
            "trainable": {n for n, p in pl_module.named_parameters() if p.requires_grad},
            "bn_training": {
                n for n, m in pl_module.backbone.named_modules() if isinstance(m, _BatchNorm) and m.training
            },
            "groups": [(g["name"], g["lr"], len(g["params"])) for g in trainer.optimizers[0].param_groups],
        }


def _fit(callback: FreezeThenFinetune, epochs: int, tmp_path, ckpt_path=None, model=None):
    seed_everything(0)
    model = model or ClassifierModule(backbone=BACKBONE, pretrained="none")
    probe = Probe()
    trainer = Trainer(
        max_epochs=epochs,
        callbacks=[callback, probe, ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    train, val = tiny_loaders()
    trainer.fit(model, train, val, ckpt_path=ckpt_path)
    return model, probe, trainer


def _names(module_prefix: str, model: ClassifierModule) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith(module_prefix)}


def test_phase_one_trains_only_the_head_with_backbone_batchnorm_in_eval_mode(tmp_path):
    callback = FreezeThenFinetune(unfreeze_at_epoch=2, finetune_lr=1e-5)
    seed_everything(0)
    model = ClassifierModule(backbone=BACKBONE, pretrained="none")
    before = copy.deepcopy(model.backbone.state_dict())
    model, probe, _ = _fit(callback, 2, tmp_path, model=model)
    for epoch in (0, 1):
        assert probe.epochs[epoch]["trainable"] == _names("head.", model)
        assert probe.epochs[epoch]["bn_training"] == set()
        assert probe.epochs[epoch]["groups"] == [("head", 1e-3, 2)]
    after = model.backbone.state_dict()
    for key, tensor in before.items():  # weights and BatchNorm running statistics untouched
        assert torch.equal(tensor, after[key]), key


def test_phase_two_unfreezes_all_blocks_at_finetune_lr_and_keeps_statistics_frozen(tmp_path):
    callback = FreezeThenFinetune(unfreeze_at_epoch=1, finetune_lr=1e-5)
    seed_everything(0)
    model = ClassifierModule(backbone=BACKBONE, pretrained="none")
    before = copy.deepcopy(model.backbone.state_dict())
    model, probe, trainer = _fit(callback, 2, tmp_path, model=model)
    phase2 = probe.epochs[1]
    assert phase2["trainable"] == {n for n, _ in model.named_parameters()}
    assert phase2["bn_training"] == set()
    n_backbone = len(list(model.backbone.parameters()))
    assert phase2["groups"] == [("head", 1e-5, 2), ("backbone", 1e-5, n_backbone)]
    after = model.backbone.state_dict()
    assert not torch.equal(before["conv1.0.weight"], after["conv1.0.weight"]), "backbone did not train in phase 2"
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)
    assert trainer.logged_metrics["finetune/phase"] == 2
    assert trainer.logged_metrics["finetune/lr_backbone"] == pytest.approx(1e-5)


def test_head_lr_in_phase_two_is_configurable(tmp_path):
    callback = FreezeThenFinetune(unfreeze_at_epoch=1, finetune_lr=1e-5, head_finetune_lr=1e-4)
    _, probe, _ = _fit(callback, 2, tmp_path)
    assert [(name, lr) for name, lr, _ in probe.epochs[1]["groups"]] == [("head", 1e-4), ("backbone", 1e-5)]


def test_top_blocks_only_and_batchnorm_train_mode(tmp_path):
    callback = FreezeThenFinetune(unfreeze_at_epoch=1, unfreeze_blocks=1, bn_mode="train")
    seed_everything(0)
    model = ClassifierModule(backbone=BACKBONE, pretrained="none")
    top = backbone_blocks(model.backbone)[-1]
    top_params = {id(p) for m in top for p in m.parameters(recurse=False)}
    top_bns = {id(m) for m in top if isinstance(m, _BatchNorm)}
    model, probe, _ = _fit(callback, 2, tmp_path, model=model)
    expected = _names("head.", model) | {
        f"backbone.{n}" for n, p in model.backbone.named_parameters() if id(p) in top_params
    }
    assert probe.epochs[1]["trainable"] == expected
    named_bns = {n for n, m in model.backbone.named_modules() if id(m) in top_bns}
    assert named_bns and probe.epochs[1]["bn_training"] == named_bns
    assert probe.epochs[0]["bn_training"] == set()


def test_resume_from_a_phase_two_checkpoint_stays_in_phase_two(tmp_path):
    _fit(FreezeThenFinetune(unfreeze_at_epoch=1, finetune_lr=2e-5), 2, tmp_path)
    seed_everything(0)
    model = ClassifierModule(backbone=BACKBONE, pretrained="none")
    resumed_callback = FreezeThenFinetune(unfreeze_at_epoch=1, finetune_lr=2e-5)
    model, probe, _ = _fit(resumed_callback, 3, tmp_path, ckpt_path=tmp_path / "last.ckpt", model=model)
    assert list(probe.epochs) == [2]
    state = probe.epochs[2]
    assert state["trainable"] == {n for n, _ in model.named_parameters()}
    assert [(name, lr) for name, lr, _ in state["groups"]] == [("head", 2e-5), ("backbone", 2e-5)]
    assert state["bn_training"] == set()


def test_resumed_phase_two_actually_updates_the_backbone(tmp_path):
    _fit(FreezeThenFinetune(unfreeze_at_epoch=1), 2, tmp_path)
    seed_everything(0)
    model = ClassifierModule(backbone=BACKBONE, pretrained="none")
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    saved = checkpoint["state_dict"]["backbone.conv1.0.weight"]
    model, _, _ = _fit(
        FreezeThenFinetune(unfreeze_at_epoch=1), 3, tmp_path, ckpt_path=tmp_path / "last.ckpt", model=model
    )
    assert not torch.equal(model.backbone.conv1[0].weight.detach(), saved)


def test_freezing_leaves_batchnorm_tracking_alone():
    model = ClassifierModule(backbone=BACKBONE, pretrained="none")
    FreezeThenFinetune.freeze_parameters(model.backbone)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(bn.track_running_stats for bn in FreezeThenFinetune.batchnorm_layers(model.backbone))


def test_module_without_backbone_is_rejected(tmp_path):
    from lightning.pytorch.demos.boring_classes import BoringModel

    trainer = Trainer(callbacks=[FreezeThenFinetune()], logger=False, fast_dev_run=True, enable_progress_bar=False)
    with pytest.raises(MisconfigurationException, match=r"nn\.Module `backbone` attribute"):
        trainer.fit(BoringModel())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"unfreeze_at_epoch": -1}, "unfreeze_at_epoch"),
        ({"unfreeze_blocks": 0}, "unfreeze_blocks"),
        ({"bn_mode": "eval"}, "bn_mode"),
        ({"lr_decay": 0.0}, "lr_decay"),
        ({"lr_decay": 1.5}, "lr_decay"),
        ({"schedule": "linear"}, "schedule"),
        ({"warmup_fraction": 1.0}, "warmup_fraction"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=f"Expected argument `{match}`"):
        FreezeThenFinetune(**kwargs)


def test_reduce_on_plateau_scheduler_survives_the_added_backbone_group(tmp_path):
    seed_everything(0)
    scheduler = functools.partial(torch.optim.lr_scheduler.ReduceLROnPlateau, factor=0.1, patience=0)
    model = ClassifierModule(backbone=BACKBONE, pretrained="none", scheduler=scheduler, scheduler_monitor="val/loss")
    callback = FreezeThenFinetune(unfreeze_at_epoch=1, finetune_lr=1e-5)
    model, probe, trainer = _fit(callback, 3, tmp_path, model=model)
    assert [name for name, *_ in probe.epochs[2]["groups"]] == ["head", "backbone"]
    assert len(trainer.lr_scheduler_configs[0].scheduler.get_last_lr()) == 2  # stepped over both groups


class LrTrace(Callback):
    """Records every group's learning rate at every training batch, after the callbacks have set it."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, dict[str, float]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        groups = {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups}
        self.steps.append((trainer.current_epoch, groups))


def _traced_fit(model, callback: FreezeThenFinetune, epochs: int, tmp_path) -> tuple[Trainer, LrTrace]:
    """Fit ``model`` on the tiny task, recording every group's learning rate at every batch."""
    trace = LrTrace()
    trainer = Trainer(max_epochs=epochs, callbacks=[callback, trace], logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(model, *tiny_loaders())
    return trainer, trace


def test_discriminative_learning_rates_decay_block_by_block_down_the_backbone(tmp_path):
    callback = FreezeThenFinetune(unfreeze_at_epoch=1, finetune_lr=1e-4, lr_decay=0.5)
    seed_everything(0)
    model = ClassifierModule(backbone=BACKBONE, pretrained="none")
    blocks = backbone_blocks(model.backbone)
    model, probe, _ = _fit(callback, 2, tmp_path, model=model)
    groups = probe.epochs[1]["groups"]
    assert groups[0][:2] == ("head", 1e-4)
    backbone = groups[1:]
    assert [name for name, *_ in backbone] == [f"backbone.{i}" for i in range(len(blocks))]
    expected = [1e-4 * 0.5 ** (len(blocks) - 1 - i) for i in range(len(blocks))]
    assert [lr for _, lr, _ in backbone] == pytest.approx(expected)
    assert sum(n for *_, n in backbone) == len(list(model.backbone.parameters()))


def test_discriminative_groups_keep_their_learning_rates_after_a_resume(tmp_path):
    _fit(FreezeThenFinetune(unfreeze_at_epoch=1, finetune_lr=1e-4, lr_decay=0.5), 2, tmp_path)
    first_run = torch.load(tmp_path / "last.ckpt", weights_only=True)["optimizer_states"][0]["param_groups"]
    callback = FreezeThenFinetune(unfreeze_at_epoch=1, finetune_lr=1e-4, lr_decay=0.5)
    _, probe, _ = _fit(callback, 3, tmp_path, ckpt_path=tmp_path / "last.ckpt")
    assert [(name, lr) for name, lr, _ in probe.epochs[2]["groups"]] == [(g["name"], g["lr"]) for g in first_run]
    assert len(probe.epochs[2]["groups"]) > 2


def test_top_blocks_only_get_decayed_rates_too(tmp_path):
    callback = FreezeThenFinetune(unfreeze_at_epoch=1, finetune_lr=1e-4, lr_decay=0.1, unfreeze_blocks=2)
    _, probe, _ = _fit(callback, 2, tmp_path)
    rates = [lr for name, lr, _ in probe.epochs[1]["groups"] if name.startswith("backbone")]
    assert rates == pytest.approx([1e-5, 1e-4])


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_phase_schedules_warm_up_and_decay_every_group_in_both_phases(tmp_path, schedule):
    callback = FreezeThenFinetune(
        unfreeze_at_epoch=2, finetune_lr=1e-4, lr_decay=0.5, schedule=schedule, warmup_fraction=0.25
    )
    seed_everything(0)
    _, trace = _traced_fit(ClassifierModule(backbone=BACKBONE, pretrained="none"), callback, 4, tmp_path)
    for phase_epochs, peaks in (((0, 1), {"head": 1e-3}), ((2, 3), {"head": 1e-4, "backbone.4": 1e-4})):
        steps = [groups for epoch, groups in trace.steps if epoch in phase_epochs]
        for name, peak in peaks.items():
            lrs = [groups[name] for groups in steps]
            top = max(range(len(lrs)), key=lrs.__getitem__)
            assert lrs[0] < peak / 2 and lrs[-1] < peak / 2, (name, lrs)  # warm-up start, decayed end
            assert lrs[top] == pytest.approx(peak, rel=0.3), (name, lrs)
            assert 0 < top < len(lrs) - 1
    phase2 = [groups for epoch, groups in trace.steps if epoch >= 2]
    lowest = next(name for name in phase2[-1] if name.startswith("backbone"))
    assert phase2[2][lowest] < phase2[2]["backbone.4"]  # discriminative rates scheduled alike


def _scheduler_factories():
    lr_sched = torch.optim.lr_scheduler
    return {
        "ReduceLROnPlateau": functools.partial(lr_sched.ReduceLROnPlateau, factor=0.1, patience=0),
        "StepLR": functools.partial(lr_sched.StepLR, step_size=1, gamma=0.5),
        "CosineAnnealingLR": functools.partial(lr_sched.CosineAnnealingLR, T_max=3),
        "LambdaLR": functools.partial(lr_sched.LambdaLR, lr_lambda=lambda epoch: 0.5**epoch),
        "OneCycleLR": functools.partial(lr_sched.OneCycleLR, max_lr=1e-3, total_steps=3),
        "ExponentialLR": functools.partial(lr_sched.ExponentialLR, gamma=0.9),
    }


@pytest.mark.parametrize("name", list(_scheduler_factories()))
def test_every_torch_scheduler_runs_through_the_unfreeze_and_schedules_the_new_groups(tmp_path, name):
    seed_everything(0)
    model = ClassifierModule(backbone=BACKBONE, pretrained="none", scheduler=_scheduler_factories()[name])
    callback = FreezeThenFinetune(unfreeze_at_epoch=1, finetune_lr=1e-5, lr_decay=0.5, unfreeze_blocks=2)
    trainer, trace = _traced_fit(model, callback, 3, tmp_path)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    groups = trainer.optimizers[0].param_groups
    assert len(scheduler.get_last_lr()) == len(groups) == 3
    phase2 = next(g for epoch, g in trace.steps if epoch == 1)
    if name != "ReduceLROnPlateau":  # epoch-stepped schedules move the backbone groups from epoch 1 to 2
        final = next(g for epoch, g in trace.steps if epoch == 2)
        assert final["backbone.4"] != phase2["backbone.4"]
    assert all(lr > 0 for lr in phase2.values())


def test_phase_schedule_and_a_model_scheduler_are_refused_together(tmp_path):
    scheduler = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1)
    model = ClassifierModule(backbone=BACKBONE, pretrained="none", scheduler=scheduler)
    trainer = Trainer(
        max_epochs=1,
        callbacks=[FreezeThenFinetune(schedule="cosine")],
        logger=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(MisconfigurationException, match="keep one of them"):
        trainer.fit(model, *tiny_loaders())


def test_phase_lr_factor_shapes():
    from medtransfer.callbacks.finetuning import phase_lr_factor

    assert phase_lr_factor("constant", 0.7, 0.1) == 1.0
    assert phase_lr_factor("cosine", 0.0, 0.1) < 0.01
    assert phase_lr_factor("cosine", 0.1, 0.1) == pytest.approx(1.0)
    assert phase_lr_factor("cosine", 0.55, 0.1) == pytest.approx(0.5)
    assert phase_lr_factor("cosine", 1.0, 0.1) == pytest.approx(0.0, abs=1e-9)
    assert phase_lr_factor("onecycle", 0.0, 0.3) == pytest.approx(1 / 25)
    assert phase_lr_factor("onecycle", 0.3, 0.3) == pytest.approx(1.0)
    assert phase_lr_factor("onecycle", 1.0, 0.3) == pytest.approx(1e-4)
