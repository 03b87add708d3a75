"""Turn a dataset on disk into a :class:`Manifest` (paths, targets, splits; patients and boxes), one module per
layout: :mod:`.chestxray14`, :mod:`.csv_table`, :mod:`.folder`, :mod:`.mura`; :mod:`.manifest` holds the split rules
they share. Every problem with the input is a ``DataError`` naming the file, the line (header = 1) or the path.
"""

from medtransfer.data.sources.chestxray14 import chestxray14_manifest
from medtransfer.data.sources.csv_table import csv_manifest
from medtransfer.data.sources.folder import folder_manifest
from medtransfer.data.sources.manifest import SPLITS, Manifest
from medtransfer.data.sources.mura import mura_manifest

__all__ = ["SPLITS", "Manifest", "chestxray14_manifest", "csv_manifest", "folder_manifest", "mura_manifest"]
