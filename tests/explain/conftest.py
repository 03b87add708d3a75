"""The planted-lesion detector the explanation tests share (trained once per session)."""

from __future__ import annotations

import pytest
import torch
from lesions import _backgrounds, _centres, _input, _plant
from torch.optim.swa_utils import update_bn

from medtransfer.models.classifier import ClassifierModule


@pytest.fixture(scope="session")
def lesion_model(pneumonia_npz):
    """Pretrained Lite0 fine-tuned (head and backbone, 200 steps of 32: at 60 the
    detector is still crude and occlusion's hit rate on it is about 0.80) to detect the planted blob, in eval mode,
    and held-out (test split) normal X-rays to plant new lesions on."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    train = _backgrounds(pneumonia_npz, "train")
    model = ClassifierModule(
        backbone="tf_efficientnet_lite0",
        pretrained="lite0-package",
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-3),
    )
    optimizer = model.configure_optimizers()

    def batch(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        images = train[torch.randint(len(train), (n,), generator=generator)]
        images[: n // 2] = _plant(images[: n // 2], _centres(n // 2, generator))
        return _input(images), (torch.arange(n) < n // 2).long()

    model.train()
    for _ in range(200):
        loss, _, _ = model.model_step(batch())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    update_bn([batch(64)[0] for _ in range(3)], model)  # running statistics for the final weights
    return model.eval(), _backgrounds(pneumonia_npz, "test")
