"""WebDataset shards of multi-view face captures, and the ``manifest.json`` beside them.

One sample is one capture of one subject with all three views (docs/design.md "Shard schema").
Its key is ``{subject}-{capture}`` and its tar entries are::

    {key}.left.png  {key}.front.png  {key}.right.png     RGB uint8 [S, S, 3] (or .jpg)
    {key}.left.mask.png ...                              uint8 class map [S, S] (0..9), optional
    {key}.lmk2d.npy                                      float32 [3, 68, 2] pixels (x right, y down)
    {key}.lmk3d.npy                                      float32 [K, 3] decimetres, optional
    {key}.gt.npz                                         vertices [N, 3], faces [F, 3], units; optional,
                                                         in the evaluation companion {split}-{index:06d}.eval.tar
    {key}.coeffs.npy                                     float32 [269] true coefficients, optional
    {key}.meta.json                                      subject, capture, yaw_deg, source, schema_version

:class:`ShardWriter` writes ``{split}-{index:06d}.tar`` under a root (a local directory or
``s3://bucket/prefix``) with webdataset's ``TarWriter`` and ``ShardWriter`` semantics (a new
shard starts before a sample once the current one holds ``max_count`` samples or ``max_size``
payload bytes). Each shard is written to a local temporary file first, then published with
:func:`dfmvr.data.storage.put_file` (rename locally; verified, retried, multipart upload on S3);
only published shards are returned, so only they can reach the manifest.

:func:`write_manifest` records the schema version, the splits (by subject: no subject may sit
in two splits), shard names relative to the root, sample counts, image size and a sha256 per
shard. :func:`read_manifest` refuses unknown schema versions, naming the supported ones.

The pieces live apart by job: the schema and its codec (:mod:`dfmvr.data.schema`), reading
(:mod:`dfmvr.data.reader`), writing and publishing (:mod:`dfmvr.data.writer`) and the manifest
(:mod:`dfmvr.data.manifest`); this module is the format's one public face, so callers import
from here.
"""

from __future__ import annotations

from dfmvr.data.manifest import (
    Manifest,
    ManifestError,
    ShardEntry,
    SplitEntry,
    manifest_url,
    read_manifest,
    write_manifest,
)
from dfmvr.data.reader import ShardErrors, shard_samples, without_gt
from dfmvr.data.schema import (
    EVAL_ENTRIES,
    IMAGE_FORMATS,
    MANIFEST_NAME,
    MAX_IMAGE_SIDE,
    N_CLASSES,
    N_LANDMARKS,
    PARSING_VIEWS,
    SCHEMA_VERSION,
    SUPPORTED_SCHEMA_VERSIONS,
    VIEWS,
    Sample,
    decode_image,
    decode_sample,
    describe_array,
    encode_image,
    encode_sample,
    eval_companion_url,
    image_header_size,
    malformed_as_value_error,
    sample_where,
)
from dfmvr.data.writer import ShardInfo, ShardWriter, publish_file

__all__ = [
    "EVAL_ENTRIES", "eval_companion_url", "IMAGE_FORMATS", "MANIFEST_NAME", "MAX_IMAGE_SIDE", "N_CLASSES", "N_LANDMARKS", "PARSING_VIEWS", "SCHEMA_VERSION",
    "SUPPORTED_SCHEMA_VERSIONS", "VIEWS", "Manifest", "ManifestError", "Sample", "ShardEntry", "ShardErrors",
    "ShardInfo", "ShardWriter", "SplitEntry", "decode_image", "decode_sample", "describe_array", "encode_image", "encode_sample", "image_header_size",
    "malformed_as_value_error", "manifest_url", "publish_file", "read_manifest", "sample_where", "shard_samples",
    "without_gt", "write_manifest",
]
