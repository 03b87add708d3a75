"""InputSpec: the model's input contract, by name, from timm to the data module, the checkpoint and predict."""

from __future__ import annotations

import pytest
import timm

from medtransfer.data.input_spec import InputSpec
from medtransfer.data.medmnist import MedMNISTDataModule
from medtransfer.errors import DataError
from medtransfer.models.classifier import ClassifierModule
from medtransfer.models.inference import input_settings
from medtransfer.models.input_spec import backbone_input_spec

#: ``checkpoint["input"]`` of a checkpoint written before the reshuffle (/work/fixtures/pre_reshuffle.ckpt).
OLD_INPUT = {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic", "channels": 3,
             "color": "gray", "dicom_frame": "middle",
             "reference": {"statistics": ["mean"], "low": [0.1], "high": [0.9]}}  # fmt: skip


@pytest.mark.parametrize("backbone", ["resnet18", "tf_efficientnet_lite0", "test_byobnet", "resnet50.a1_in1k"])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_the_cli_link_gives_the_data_module_what_the_model_builds(backbone, in_chans):
    """The link runs on parse (without a network); it must agree with the built backbone's timm data config."""
    model = timm.create_model(backbone, pretrained=False, num_classes=0, in_chans=in_chans)
    expected = InputSpec.from_timm(timm.data.resolve_model_data_config(model), in_chans)
    assert backbone_input_spec(backbone, in_chans) == expected
    assert expected.channels == in_chans and expected.size == model.pretrained_cfg["input_size"][-1]


def test_model_owns_its_spec_from_timm():
    spec = ClassifierModule(backbone="resnet18", pretrained="none", in_chans=1).input_spec
    assert (spec.size, spec.interpolation, spec.channels) == (224, "bicubic", 1)
    assert spec.mean == pytest.approx((0.485, 0.456, 0.406)) and spec.std == pytest.approx((0.229, 0.224, 0.225))


def test_dict_round_trip_by_name_with_plain_values():
    spec = InputSpec.from_dict(OLD_INPUT)
    assert spec.mean == (0.5, 0.5, 0.5) and spec.reference == OLD_INPUT["reference"]
    assert spec.to_dict() == OLD_INPUT and type(spec.to_dict()["mean"]) is list
    assert "reference" not in InputSpec(32, (0.5,), (0.5,)).to_dict()


def test_checkpoints_from_before_colour_support_read_gray_and_the_middle_frame():
    older = {key: value for key, value in OLD_INPUT.items() if key not in ("color", "dicom_frame", "reference")}
    spec = InputSpec.from_dict(older | {"unknown_later_key": 1})
    assert (spec.color, spec.dicom_frame, spec.reference) == ("gray", "middle", None)


def test_old_checkpoint_input_is_read_and_written_back_by_name():
    model = ClassifierModule(backbone="resnet18", pretrained="none")
    model.on_load_checkpoint({"input": OLD_INPUT})
    assert input_settings(model, {"input": OLD_INPUT}) == model.trained_input == InputSpec.from_dict(OLD_INPUT)
    saved: dict = {}
    model.on_save_checkpoint(saved)  # no data module: keeps what the checkpoint held
    assert saved["input"] == OLD_INPUT
    assert input_settings(model) == model.input_spec  # a model without a checkpoint: the backbone's


def test_explicit_data_options_win_over_the_model_spec(pneumonia_npz):
    given = InputSpec(224, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), "bicubic")
    dm = MedMNISTDataModule(path=str(pneumonia_npz), image_size=32, std=(0.5,) * 3, input_spec=given)
    dm.setup("fit")
    assert dm.input_spec == InputSpec(32, (0.1, 0.2, 0.3), (0.5,) * 3, "bicubic", 3, "gray", "middle")
    assert "input_spec" not in dm.hparams  # checkpoints load with weights_only=True


def test_standalone_data_module_needs_size_and_statistics_or_a_spec(pneumonia_npz):
    with pytest.raises(DataError, match="image_size, mean and std are unknown"):
        MedMNISTDataModule(path=str(pneumonia_npz)).setup("fit")


def test_data_channels_must_match_the_model_spec(pneumonia_npz):
    spec = InputSpec(32, (0.5,), (0.5,), channels=1)
    with pytest.raises(DataError, match=r"set model\.in_chans: 3"):
        MedMNISTDataModule(path=str(pneumonia_npz), input_spec=spec).setup("fit")
