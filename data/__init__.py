"""ConvForever data: PD-Extended-schema parquet shards -> labelled, augmented batches.

Public API (other role folders code against these names)::

    from convforever.data import CATEGORIES, classify_caption, DataConfig, Batch, make_loader, resolve_files
    from convforever.data import write_demo_dataset
"""

from .demo import DemoDataset, write_demo_dataset
from .images import IMAGENET_MEAN, IMAGENET_STD
from .labels import CATEGORIES, NUM_CLASSES, classify_caption, label_from_value
from .loader import Batch, DataConfig, make_loader
from .parquet import PD_EXTENDED_SCHEMA, resolve_files

__all__ = [
    "CATEGORIES", "NUM_CLASSES", "IMAGENET_MEAN", "IMAGENET_STD", "PD_EXTENDED_SCHEMA", "Batch", "DataConfig",
    "DemoDataset", "classify_caption", "label_from_value", "make_loader", "resolve_files", "write_demo_dataset",
]
