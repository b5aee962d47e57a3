"""Dataset preparation service: a folder of images with sidecar captions.

Entry points (each takes its config from :mod:`adapterhub.dataset.config`, reports progress
through an optional callback and returns plain data; nothing here prints):

* :func:`~adapterhub.dataset.captioning.run_captioning`: any captioner plugin over the folder;
* :func:`~adapterhub.dataset.tags.edit_tags` (``plan`` + ``apply``) and
  :func:`~adapterhub.dataset.journal.undo_last`;
* :func:`~adapterhub.dataset.stats.tag_stats`, :func:`~adapterhub.dataset.buckets.bucket_report`,
  :func:`~adapterhub.dataset.prepare.prepare`, :func:`~adapterhub.dataset.validate.validate`.

Every entry point that changes the folder holds its writer lock (:mod:`adapterhub.dataset.lock`)
and writes through the undo journal (:mod:`adapterhub.dataset.journal`).

The captioner contract (the hook ``adapterhub_captioners``) is described in
:mod:`adapterhub.dataset.captioning`.
"""
from adapterhub.dataset.config import (BucketConfig, CaptionConfig, PrepareConfig, StatsConfig,
                                       TagEditConfig, UndoConfig, ValidateConfig)
from adapterhub.dataset.folder import Dataset, Item, Subset, scan

__all__ = ["BucketConfig", "CaptionConfig", "PrepareConfig", "StatsConfig", "TagEditConfig",
           "UndoConfig", "ValidateConfig", "Dataset", "Item", "Subset", "scan"]
