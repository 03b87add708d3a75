"""Turn a dataset on disk into a :class:`Manifest`: every image's path, target and split (plus patients and boxes).

One module per layout:

* :func:`chestxray14_manifest` (:mod:`.chestxray14`): the official ChestX-ray14 label file
  (``Data_Entry_2017.csv`` or its 2020 revision) and, optionally, the official ``train_val_list.txt`` /
  ``test_list.txt``; multilabel over 14 findings.
* :func:`csv_manifest` (:mod:`.csv_table`): any CSV with a path column and one label column (binary/multiclass) or
  several 0/1 columns (multilabel), optionally a split, a patient and four box columns.
* :func:`folder_manifest` (:mod:`.folder`): ``root/<class>/**/<image>`` or
  ``root/{train,val,test}/<class>/**/<image>``.
* :func:`mura_manifest` (:mod:`.mura`): MURA's ``.../patientXXXXX/studyN_positive/imageK.png``.

:mod:`.manifest` holds the :class:`Manifest` and the split rules all builders share. Every problem with the input
is a :class:`~medtransfer.errors.DataError` whose message names the file, the line (the header is line 1) or the
path, and the problem.
"""

from medtransfer.data.sources.chestxray14 import chestxray14_manifest
from medtransfer.data.sources.csv_table import csv_manifest
from medtransfer.data.sources.folder import folder_manifest
from medtransfer.data.sources.manifest import SPLITS, Manifest
from medtransfer.data.sources.mura import mura_manifest

__all__ = [
    "SPLITS",
    "Manifest",
    "chestxray14_manifest",
    "csv_manifest",
    "folder_manifest",
    "mura_manifest",
]
