"""Registry of the official MedMNIST v2 2D datasets and their MedMNIST+ file releases.

Every URL and MD5 below is copied from MedMNIST's own ``medmnist/info.py``
(github.com/MedMNIST/MedMNIST, ``__version__ = "3.0.2"``, commit 805b742), which points at Zenodo record
10519652. That record re-released the 28x28 files of OrganA/C/SMNIST with blank samples removed (v2.2.4),
so their size-28 MD5s differ from the older record 6496656. Sizes 64, 128 and 224 are the MedMNIST+ releases.

MedMNIST's ``"ordinal-regression"`` task (RetinaMNIST) is mapped to ``"multiclass"``; the original string is
kept in :attr:`MedMNISTInfo.official_task`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, get_args

from medtransfer.errors import DataError

__all__ = ["MEDMNIST_FLAGS", "MedMNISTInfo", "Task", "get_medmnist_info"]

_logger = logging.getLogger(__name__)

Task = Literal["binary", "multiclass", "multilabel"]
"""Training task: one sigmoid output, one softmax over classes, or one sigmoid per label."""

_TASKS: tuple[str, ...] = get_args(Task)


@dataclass(frozen=True)
class MedMNISTInfo:
    """Facts about one MedMNIST 2D dataset, as published in the official INFO.

    Attributes:
        flag: Lower-case dataset name, e.g. ``"pneumoniamnist"``.
        python_class: Class name in the ``medmnist`` package, e.g. ``"PneumoniaMNIST"``.
        task: ``"binary"``, ``"multiclass"`` or ``"multilabel"`` (ordinal regression maps to multiclass).
        official_task: The task string exactly as in the official INFO.
        n_channels: 1 for grayscale, 3 for RGB.
        labels: Class (or, for multilabel, finding) index -> name.
        n_samples: Official number of images per split (``train``, ``val``, ``test``).
        license: Licence of the released files.
        resources: Image size -> ``(url, md5)`` of the official ``.npz`` file.
    """

    flag: str
    python_class: str
    task: Task
    official_task: str
    n_channels: int
    labels: Mapping[int, str] = field(hash=False)
    n_samples: Mapping[str, int] = field(hash=False)
    license: str
    resources: Mapping[int, tuple[str, str]] = field(hash=False)

    def __post_init__(self) -> None:
        if self.task not in _TASKS:
            raise DataError(f"MedMNIST {self.flag!r}: task must be one of {_TASKS}, got {self.task!r}")
        # Read-only views, so that the shared registry entries cannot be changed by accident.
        for name in ("labels", "n_samples", "resources"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    @property
    def num_classes(self) -> int:
        """Number of classes (multiclass/binary) or labels (multilabel)."""
        return len(self.labels)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Released image sizes, ascending."""
        return tuple(sorted(self.resources))

    def _check_size(self, size: int) -> int:
        if isinstance(size, bool) or not isinstance(size, int) or size not in self.resources:
            sizes = ", ".join(str(s) for s in self.sizes)
            raise DataError(f"MedMNIST {self.flag!r} has no size {size!r}; available sizes: {sizes}")
        return size

    def filename(self, size: int = 28) -> str:
        """Official file name: ``{flag}.npz`` for size 28, ``{flag}_{size}.npz`` otherwise.

        Raises:
            DataError: If ``size`` was not released for this dataset.
        """
        size = self._check_size(size)
        return f"{self.flag}.npz" if size == 28 else f"{self.flag}_{size}.npz"

    def resource(self, size: int = 28) -> tuple[str, str]:
        """Return ``(url, md5)`` of the official file for ``size``.

        Raises:
            DataError: If ``size`` was not released for this dataset.
        """
        return self.resources[self._check_size(size)]


#: The three OrganMNIST views (axial, coronal, sagittal) share their 11 organ classes.
_ORGAN_LABELS = {
    0: "bladder",
    1: "femur-left",
    2: "femur-right",
    3: "heart",
    4: "kidney-left",
    5: "kidney-right",
    6: "liver",
    7: "lung-left",
    8: "lung-right",
    9: "pancreas",
    10: "spleen",
}

# Generated from medmnist/info.py (MedMNIST/MedMNIST, v3.0.2); do not edit by hand.
_ENTRIES: tuple[MedMNISTInfo, ...] = (
    MedMNISTInfo(
        flag="pathmnist",
        python_class="PathMNIST",
        task="multiclass",
        official_task="multi-class",
        n_channels=3,
        labels={
            0: "adipose",
            1: "background",
            2: "debris",
            3: "lymphocytes",
            4: "mucus",
            5: "smooth muscle",
            6: "normal colon mucosa",
            7: "cancer-associated stroma",
            8: "colorectal adenocarcinoma epithelium",
        },
        n_samples={"train": 89996, "val": 10004, "test": 7180},
        license="CC BY 4.0",
        resources={
            28: (
                "https://zenodo.org/records/10519652/files/pathmnist.npz?download=1",
                "a8b06965200029087d5bd730944a56c1",
            ),
            64: (
                "https://zenodo.org/records/10519652/files/pathmnist_64.npz?download=1",
                "55aa9c1e0525abe5a6b9d8343a507616",
            ),
            128: (
                "https://zenodo.org/records/10519652/files/pathmnist_128.npz?download=1",
                "ac42d08fb904d92c244187169d1fd1d9",
            ),
            224: (
                "https://zenodo.org/records/10519652/files/pathmnist_224.npz?download=1",
                "2c51a510bcdc9cf8ddb2af93af1eadec",
            ),
        },
    ),
    MedMNISTInfo(
        flag="chestmnist",
        python_class="ChestMNIST",
        task="multilabel",
        official_task="multi-label, binary-class",
        n_channels=1,
        labels={
            0: "atelectasis",
            1: "cardiomegaly",
            2: "effusion",
            3: "infiltration",
            4: "mass",
            5: "nodule",
            6: "pneumonia",
            7: "pneumothorax",
            8: "consolidation",
            9: "edema",
            10: "emphysema",
            11: "fibrosis",
            12: "pleural",
            13: "hernia",
        },
        n_samples={"train": 78468, "val": 11219, "test": 22433},
        license="CC BY 4.0",
        resources={
            28: (
                "https://zenodo.org/records/10519652/files/chestmnist.npz?download=1",
                "02c8a6516a18b556561a56cbdd36c4a8",
            ),
            64: (
                "https://zenodo.org/records/10519652/files/chestmnist_64.npz?download=1",
                "9de6cd0b934ebb5b7426cfba5efbae16",
            ),
            128: (
                "https://zenodo.org/records/10519652/files/chestmnist_128.npz?download=1",
                "db107e5590b27930b62dbaf558aebee3",
            ),
            224: (
                "https://zenodo.org/records/10519652/files/chestmnist_224.npz?download=1",
                "45bd33e6f06c3e8cdb481c74a89152aa",
            ),
        },
    ),
    MedMNISTInfo(
        flag="dermamnist",
        python_class="DermaMNIST",
        task="multiclass",
        official_task="multi-class",
        n_channels=3,
        labels={
            0: "actinic keratoses and intraepithelial carcinoma",
            1: "basal cell carcinoma",
            2: "benign keratosis-like lesions",
            3: "dermatofibroma",
            4: "melanoma",
            5: "melanocytic nevi",
            6: "vascular lesions",
        },
        n_samples={"train": 7007, "val": 1003, "test": 2005},
        license="CC BY-NC 4.0",
        resources={
            28: (
                "https://zenodo.org/records/10519652/files/dermamnist.npz?download=1",
                "0744692d530f8e62ec473284d019b0c7",
            ),
            64: (
                "https://zenodo.org/records/10519652/files/dermamnist_64.npz?download=1",
                "b70a2f5635c6199aeaa28c31d7202e1f",
            ),
            128: (
                "https://zenodo.org/records/10519652/files/dermamnist_128.npz?download=1",
                "2defd784463fa5243564e855ed717de1",
            ),
            224: (
                "https://zenodo.org/records/10519652/files/dermamnist_224.npz?download=1",
                "8974907d8e169bef5f5b96bc506ae45d",
            ),
        },
    ),
    MedMNISTInfo(
        flag="octmnist",
        python_class="OCTMNIST",
        task="multiclass",
        official_task="multi-class",
        n_channels=1,
        labels={
            0: "choroidal neovascularization",
            1: "diabetic macular edema",
            2: "drusen",
            3: "normal",
        },
        n_samples={"train": 97477, "val": 10832, "test": 1000},
        license="CC BY 4.0",
        resources={
            28: (
                "https://zenodo.org/records/10519652/files/octmnist.npz?download=1",
                "c68d92d5b585d8d81f7112f81e2d0842",
            ),
            64: (
                "https://zenodo.org/records/10519652/files/octmnist_64.npz?download=1",
                "e229e9440236b774d9f0dfef9d07bdaf",
            ),
            128: (
                "https://zenodo.org/records/10519652/files/octmnist_128.npz?download=1",
                "0a97e76651ace45c5d943ee3f65b63ae",
            ),
            224: (
                "https://zenodo.org/records/10519652/files/octmnist_224.npz?download=1",
                "abc493b6d529d5de7569faaef2773ba3",
            ),
        },
    ),
    MedMNISTInfo(
        flag="pneumoniamnist",
        python_class="PneumoniaMNIST",
        task="binary",
        official_task="binary-class",
        n_channels=1,
        labels={
            0: "normal",
            1: "pneumonia",
        },
        n_samples={"train": 4708, "val": 524, "test": 624},
        license="CC BY 4.0",
        resources={
            28: (
                "https://zenodo.org/records/10519652/files/pneumoniamnist.npz?download=1",
                "28209eda62fecd6e6a2d98b1501bb15f",
            ),
            64: (
                "https://zenodo.org/records/10519652/files/pneumoniamnist_64.npz?download=1",
                "8f4eceb4ccffa70c672198ea285246c6",
            ),
            128: (
                "https://zenodo.org/records/10519652/files/pneumoniamnist_128.npz?download=1",
                "05b46931834c231683c68f40c47b2971",
            ),
            224: (
                "https://zenodo.org/records/10519652/files/pneumoniamnist_224.npz?download=1",
                "d6a3c71de1b945ea11211b03746c1fe1",
            ),
        },
    ),
    MedMNISTInfo(
        flag="retinamnist",
        python_class="RetinaMNIST",
        task="multiclass",
        official_task="ordinal-regression",
        n_channels=3,
        labels={
            0: "0",
            1: "1",
            2: "2",
            3: "3",
            4: "4",
        },
        n_samples={"train": 1080, "val": 120, "test": 400},
        license="CC BY 4.0",
        resources={
            28: (
                "https://zenodo.org/records/10519652/files/retinamnist.npz?download=1",
                "bd4c0672f1bba3e3a89f0e4e876791e4",
            ),
            64: (
                "https://zenodo.org/records/10519652/files/retinamnist_64.npz?download=1",
                "afda852cc34dcda56f86ad2b2457dbcc",
            ),
            128: (
                "https://zenodo.org/records/10519652/files/retinamnist_128.npz?download=1",
                "e48e916a24454daf90583d4e6efb1a18",
            ),
            224: (
                "https://zenodo.org/records/10519652/files/retinamnist_224.npz?download=1",
                "eae7e3b6f3fcbda4ae613ebdcbe35348",
            ),
        },
    ),
    MedMNISTInfo(
        flag="breastmnist",
        python_class="BreastMNIST",
        task="binary",
        official_task="binary-class",
        n_channels=1,
        labels={
            0: "malignant",
            1: "normal, benign",
        },
        n_samples={"train": 546, "val": 78, "test": 156},
        license="CC BY 4.0",
        resources={
            28: (
                "https://zenodo.org/records/10519652/files/breastmnist.npz?download=1",
                "750601b1f35ba3300ea97c75c52ff8f6",
            ),
            64: (
                "https://zenodo.org/records/10519652/files/breastmnist_64.npz?download=1",
                "742edef2a1fd1524b2efff4bd7ba9364",
            ),
            128: (
                "https://zenodo.org/records/10519652/files/breastmnist_128.npz?download=1",
                "363e4b3f8d712e9b5de15470a2aaadf1",
            ),
            224: (
                "https://zenodo.org/records/10519652/files/breastmnist_224.npz?download=1",
                "b56378a6eefa9fed602bb16d192d4c8b",
            ),
        },
    ),
    MedMNISTInfo(
        flag="bloodmnist",
        python_class="BloodMNIST",
        task="multiclass",
        official_task="multi-class",
        n_channels=3,
        labels={
            0: "basophil",
            1: "eosinophil",
            2: "erythroblast",
            3: "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
            4: "lymphocyte",
            5: "monocyte",
            6: "neutrophil",
            7: "platelet",
        },
        n_samples={"train": 11959, "val": 1712, "test": 3421},
        license="CC BY 4.0",
        resources={
            28: (
                "https://zenodo.org/records/10519652/files/bloodmnist.npz?download=1",
                "7053d0359d879ad8a5505303e11de1dc",
            ),
            64: (
                "https://zenodo.org/records/10519652/files/bloodmnist_64.npz?download=1",
                "2b94928a2ae4916078ca51e05b6b800b",
            ),
            128: (
                "https://zenodo.org/records/10519652/files/bloodmnist_128.npz?download=1",
                "adace1e0ed228fccda1f39692059dd4c",
            ),
            224: (
                "https://zenodo.org/records/10519652/files/bloodmnist_224.npz?download=1",
                "b718ff6835fcbdb22ba9eacccd7b2601",
            ),
        },
    ),
    MedMNISTInfo(
        flag="tissuemnist",
        python_class="TissueMNIST",
        task="multiclass",
        official_task="multi-class",
        n_channels=1,
        labels={
            0: "Collecting Duct, Connecting Tubule",
            1: "Distal Convoluted Tubule",
            2: "Glomerular endothelial cells",
            3: "Interstitial endothelial cells",
            4: "Leukocytes",
            5: "Podocytes",
            6: "Proximal Tubule Segments",
            7: "Thick Ascending Limb",
        },
        n_samples={"train": 165466, "val": 23640, "test": 47280},
        license="CC BY 4.0",
        resources={
            28: (
                "https://zenodo.org/records/10519652/files/tissuemnist.npz?download=1",
                "ebe78ee8b05294063de985d821c1c34b",
            ),
            64: (
                "https://zenodo.org/records/10519652/files/tissuemnist_64.npz?download=1",
                "123ece2eba09d0aa5d698fda57103344",
            ),
            128: (
                "https://zenodo.org/records/10519652/files/tissuemnist_128.npz?download=1",
                "61b955355d7425a89687b06cca3ce0c2",
            ),
            224: (
                "https://zenodo.org/records/10519652/files/tissuemnist_224.npz?download=1",
                "b077128c4a949f0a4eb01517f9037b9c",
            ),
        },
    ),
    MedMNISTInfo(
        flag="organamnist",
        python_class="OrganAMNIST",
        task="multiclass",
        official_task="multi-class",
        n_channels=1,
        labels=_ORGAN_LABELS,
        n_samples={"train": 34561, "val": 6491, "test": 17778},
        license="CC BY 4.0",
        resources={
            28: (
                "https://zenodo.org/records/10519652/files/organamnist.npz?download=1",
                "68e3f8846a6bd62f0c9bf841c0d9eacc",
            ),
            64: (
                "https://zenodo.org/records/10519652/files/organamnist_64.npz?download=1",
                "2dcccc29b88e6da5a01161ef20cda288",
            ),
            128: (
                "https://zenodo.org/records/10519652/files/organamnist_128.npz?download=1",
                "eeae80d0a227a8d099027e1b3cfd3b60",
            ),
            224: (
                "https://zenodo.org/records/10519652/files/organamnist_224.npz?download=1",
                "50747347e05c87dd3aaf92c49f9f3170",
            ),
        },
    ),
    MedMNISTInfo(
        flag="organcmnist",
        python_class="OrganCMNIST",
        task="multiclass",
        official_task="multi-class",
        n_channels=1,
        labels=_ORGAN_LABELS,
        n_samples={"train": 12975, "val": 2392, "test": 8216},
        license="CC BY 4.0",
        resources={
            28: (
                "https://zenodo.org/records/10519652/files/organcmnist.npz?download=1",
                "b9ceb9546e10131b32923c5bbeaea2b1",
            ),
            64: (
                "https://zenodo.org/records/10519652/files/organcmnist_64.npz?download=1",
                "3ce34a8724ea6f548e6db4744d03b6a9",
            ),
            128: (
                "https://zenodo.org/records/10519652/files/organcmnist_128.npz?download=1",
                "773c1f009daa3fe5d9a2a201b2a7ed94",
            ),
            224: (
                "https://zenodo.org/records/10519652/files/organcmnist_224.npz?download=1",
                "050f5e875dc056f6768abf94ec9995d1",
            ),
        },
    ),
    MedMNISTInfo(
        flag="organsmnist",
        python_class="OrganSMNIST",
        task="multiclass",
        official_task="multi-class",
        n_channels=1,
        labels=_ORGAN_LABELS,
        n_samples={"train": 13932, "val": 2452, "test": 8827},
        license="CC BY 4.0",
        resources={
            28: (
                "https://zenodo.org/records/10519652/files/organsmnist.npz?download=1",
                "9ab87b696fb54e2a387ebe992d6ed5f1",
            ),
            64: (
                "https://zenodo.org/records/10519652/files/organsmnist_64.npz?download=1",
                "53a6d115339d874c25e309a994ff46d3",
            ),
            128: (
                "https://zenodo.org/records/10519652/files/organsmnist_128.npz?download=1",
                "ded0c5fa01a95dc4978b956f613e9b8e",
            ),
            224: (
                "https://zenodo.org/records/10519652/files/organsmnist_224.npz?download=1",
                "b354719e553fbbb2513d5533f52a4cb1",
            ),
        },
    ),
)

_REGISTRY: dict[str, MedMNISTInfo] = {info.flag: info for info in _ENTRIES}

MEDMNIST_FLAGS: tuple[str, ...] = tuple(_REGISTRY)
"""Flags of all registered MedMNIST 2D datasets, in the official order."""


def get_medmnist_info(flag: str) -> MedMNISTInfo:
    """Look up a MedMNIST 2D dataset by flag (case-insensitive), e.g. ``"pneumoniamnist"``.

    Raises:
        DataError: If the flag is unknown; the message lists the known flags.
    """
    key = flag.strip().lower() if isinstance(flag, str) else flag
    try:
        return _REGISTRY[key]
    except (KeyError, TypeError):
        raise DataError(f"Unknown MedMNIST dataset {flag!r}; known flags: {', '.join(_REGISTRY)}") from None
