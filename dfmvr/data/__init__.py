"""Shards, object storage and the training loader.

- :mod:`dfmvr.data.shards`: the sample schema, ``ShardWriter`` and ``manifest.json``.
- :mod:`dfmvr.data.storage`: local directories and ``s3://`` through boto3 (registers the
  ``s3`` scheme with webdataset on import).
- :mod:`dfmvr.data.transforms`: weight maps, colour jitter, resizing.
- :mod:`dfmvr.data.batch`: the typed :class:`~dfmvr.data.batch.Batch` and its collate function.
- :mod:`dfmvr.data.loader`: ``make_loader`` streaming a manifest's split into batches.
"""

from dfmvr.data.shards import (
    SCHEMA_VERSION,
    SUPPORTED_SCHEMA_VERSIONS,
    VIEWS,
    Manifest,
    ManifestError,
    Sample,
    ShardInfo,
    ShardWriter,
    decode_sample,
    encode_sample,
    read_manifest,
    write_manifest,
)
from dfmvr.data.storage import StorageError, TransferSettings

__all__ = [
    "SCHEMA_VERSION",
    "SUPPORTED_SCHEMA_VERSIONS",
    "VIEWS",
    "Manifest",
    "ManifestError",
    "Sample",
    "ShardInfo",
    "ShardWriter",
    "StorageError",
    "TransferSettings",
    "decode_sample",
    "encode_sample",
    "read_manifest",
    "write_manifest",
]
