"""Fill in the parsing masks of shards packed without them, with a trained parse net.

    python -m sharding.fill_masks --input ROOT --out ROOT2 --parse-net CKPT
        [--batch-size 16] [--device auto|cpu|cuda] [--summary-json PATH]

Reads every shard of ``ROOT``'s manifest (any split), and writes each as a new shard under
``ROOT2`` (``{split}-{index:06d}.tar``, one output shard per input shard) plus a manifest:

- a sample without masks gets ``{view}.mask.png`` for its three views, the parse net's argmax
  class map (uint8, 0..9, at the shard's image size), and ``"masks": "parsenet:<checkpoint
  file name>"`` in its ``meta.json``; its other entries are copied byte for byte;
- a sample that has masks is copied byte for byte;
- a bad sample (undecodable image, missing entry, wrong shape, ...) is skipped, logged, and
  listed at the end; samples a corrupt shard never yields are counted against the manifest.

Output shards are written by the shard writer every shard-writing job shares (the ground truth
into each shard's evaluation companion) and recorded in the one progress record
(:mod:`dfmvr.data.progress`): the same command again after an interruption keeps every output
shard made from the same input shard with the same parse net and fills the rest. A missing or
unreadable checkpoint, or a manifest of another schema version, fails before anything is written. ``ROOT`` and ``ROOT2`` may be local directories or ``s3://bucket/prefix``
(they must differ). The parse net is trained by ``jobs/train_parsenet.py``; see docs/parsenet.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from dfmvr.data import storage
from dfmvr.data.progress import ShardProgress
from dfmvr.data.shards import (
    VIEWS,
    Manifest,
    ShardErrors,
    ShardInfo,
    ShardWriter,
    decode_sample,
    encode_sample,
    read_manifest,
    shard_samples,
    write_manifest,
)
from dfmvr.nets.parsenet import BiSeNet, load_parsenet, parsenet_digest
from dfmvr.train.parsing import predict_masks
from sharding.progress import add_run_options, log_to_stderr

_logger = logging.getLogger(__name__)

MASK_ENTRIES = tuple(f"{view}.mask.png" for view in VIEWS)


@dataclass(kw_only=True, slots=True)
class FillSummary:
    """What a fill run did."""

    manifest: str | None
    """URL of the manifest written (None when nothing could be written)."""
    filled: int = 0
    """Samples that got predicted masks."""
    kept: int = 0
    """Samples that had masks and were copied."""
    skipped: list[dict] = field(default_factory=list)
    """Bad samples: ``{"key", "shard", "reason"}``."""
    lost: list[dict] = field(default_factory=list)
    """Shards that yielded fewer samples than their manifest entry: ``{"shard", "expected", "read", "reason"}``."""
    per_split: dict[str, int] = field(default_factory=dict)
    """Samples written per split."""
    shards: list[str] = field(default_factory=list)
    """Output shard URLs."""
    parse_net: str = ""
    """The checkpoint used."""
    seconds: float = 0.0

    @property
    def written(self) -> int:
        return self.filled + self.kept

    def lines(self) -> list[str]:
        """A human-readable report."""
        out = [f"wrote {self.written} samples ({self.filled} with predicted masks, {self.kept} already masked) "
               f"in {len(self.shards)} shards: {self.per_split}",
               f"manifest: {self.manifest}"]
        if self.skipped:
            out.append(f"skipped {len(self.skipped)} bad samples:")
            out += [f"  {s['key']} in {s['shard']}: {s['reason']}" for s in self.skipped]
        for loss in self.lost:
            out.append(f"shard {loss['shard']}: manifest lists {loss['expected']} samples, read {loss['read']}"
                       + (f" ({loss['reason']})" if loss["reason"] else ""))
        return out


def _same_root(a: str, b: str) -> bool:
    if storage.is_s3(a) or storage.is_s3(b):
        return a.rstrip("/") == b.rstrip("/")
    return os.path.realpath(a) == os.path.realpath(b)


def _fill_batch(model: BiSeNet, pending: list[tuple[dict, object]], provenance: str, batch_size: int) -> list[dict]:
    """Predict the masks of ``pending`` (raw entries, decoded sample) samples; returns the
    entries to write: the raw ones plus mask PNGs and the new ``meta.json``."""
    images = np.stack([sample.images[view] for _, sample in pending for view in VIEWS])
    masks = predict_masks(model, images, batch_size=batch_size).reshape(len(pending), len(VIEWS), *images.shape[1:3])
    out = []
    for (entries, sample), sample_masks in zip(pending, masks):
        sample.masks = {view: np.ascontiguousarray(sample_masks[i]) for i, view in enumerate(VIEWS)}
        sample.meta["masks"] = provenance
        encoded = encode_sample(sample)  # validates the masks; images re-encoded here are not used
        filled = dict(entries)
        filled.update({entry: encoded[entry] for entry in MASK_ENTRIES})
        filled["meta.json"] = encoded["meta.json"]
        out.append(filled)
    return out


def fill_masks(input_root: str, out_root: str, parse_net: str, *, batch_size: int = 16, device: str = "auto",
               endpoint: str | None = None) -> FillSummary:
    """Write ``input_root``'s shards to ``out_root`` with every sample's masks present.

    Args:
        input_root: shard root with a manifest (local or ``s3://``).
        out_root: where the new shards and manifest go (must differ from ``input_root``).
        parse_net: checkpoint from ``jobs/train_parsenet.py`` (:func:`dfmvr.nets.save_parsenet`).
        batch_size: samples per forward pass (three views each).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        endpoint: S3 endpoint (else ``AWS_ENDPOINT_URL``).

    Returns:
        :class:`FillSummary`.

    Raises:
        FileNotFoundError / ValueError: the checkpoint is missing or not a parse-net checkpoint
            (naming the file), ``out_root`` equals ``input_root``, ``batch_size < 1``, or
            ``device`` is ``cuda`` on a machine without one.
        dfmvr.data.shards.ManifestError: the input manifest is unreadable or of another schema version.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    if _same_root(input_root, out_root):
        raise ValueError(f"--out {out_root}: must differ from --input (the input shards are read while writing)")
    manifest = read_manifest(input_root, endpoint=endpoint)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine has no CUDA device (use auto or cpu)")
    dev = torch.device(device)
    model = load_parsenet(parse_net, dev)
    net_size = model.meta.get("image_size")
    if net_size != manifest.image_size:
        _logger.warning("parse net %s was trained at %s px, the shards are %d px: views are resized for it",
                        parse_net, net_size, manifest.image_size)
    provenance = f"parsenet:{Path(parse_net).name}"
    summary = FillSummary(manifest=None, parse_net=str(parse_net))
    t0 = time.perf_counter()
    # resumable like every shard-writing job: an output shard made whole from the same input shard,
    # by the same weights under the same name (the masks' provenance), is kept
    weights = parsenet_digest({"meta": model.meta, "state_dict": model.state_dict()})
    fingerprint = hashlib.sha256(json.dumps([manifest.url, weights, provenance]).encode()).hexdigest()[:16]
    progress = ShardProgress(out_root, fingerprint, endpoint=endpoint)
    recorded = progress.load()
    infos: list[ShardInfo] = []
    for split, entry in manifest.splits.items():
        for index, shard in enumerate(entry.shards):
            done = recorded.get(f"{split}-{index:06d}.tar")
            if done is not None and done.extra.get("source_sha256") == shard.sha256:
                info = done.info
                summary.filled += done.extra["filled"]
                summary.kept += done.extra["kept"]
                summary.skipped += done.extra["skipped"]
                _logger.info("%s: kept from an earlier run (%d samples)", info.url, info.count)
            else:
                before = (summary.filled, summary.kept, len(summary.skipped), len(summary.lost))
                info = _fill_shard(model, manifest, shard, split, out_root, index, provenance, batch_size, endpoint,
                                   summary)
                # a shard read only in part (an outage, a damaged tar) is published but not recorded:
                # the next run reads it again
                if info is not None and len(summary.lost) == before[3]:
                    progress.record(info, source_sha256=shard.sha256, filled=summary.filled - before[0],
                                    kept=summary.kept - before[1], skipped=summary.skipped[before[2]:])
            if info is not None:
                infos.append(info)
                summary.shards.append(info.url)
                summary.per_split[split] = summary.per_split.get(split, 0) + info.count
    if infos:
        extra = dict(manifest.extra)
        if "without_masks" in extra:
            extra["without_masks"] = 0
        extra["fill_masks"] = {
            "input": manifest.url, "parse_net": str(parse_net), "masks": provenance, "filled": summary.filled,
            "kept": summary.kept, "skipped": [s["key"] for s in summary.skipped],
            "parse_net_meta": {k: model.meta.get(k) for k in ("image_size", "width", "steps", "miou")},
        }
        summary.manifest = write_manifest(out_root, infos, image_size=manifest.image_size, extra=extra,
                                          endpoint=endpoint)
    summary.seconds = time.perf_counter() - t0
    if summary.skipped:
        _logger.warning("skipped %d bad samples: %s", len(summary.skipped),
                        ", ".join(s["key"] for s in summary.skipped[:20]))
    return summary


def _fill_shard(model: BiSeNet, manifest: Manifest, shard, split: str, out_root: str, index: int, provenance: str,
                batch_size: int, endpoint: str | None, summary: FillSummary) -> ShardInfo | None:
    """Write input ``shard`` as output shard ``index`` of ``split`` (its evaluation companion too,
    by the shard writer); None when no sample of it could be written."""
    handler = ShardErrors()
    errors = handler.errors
    pending: list[tuple[dict, object]] = []
    read = 0
    with ShardWriter(out_root, split, max_count=1 << 62, max_size=1 << 62, start_index=index,
                     endpoint=endpoint) as out:

        def write(entries: dict, subject: str) -> None:
            out.write_encoded(entries, key=entries["__key__"], subject=subject, image_size=manifest.image_size)

        def flush() -> None:
            for entries in _fill_batch(model, pending, provenance, batch_size):
                write(entries, subject=json.loads(entries["meta.json"])["subject"])
                summary.filled += 1
            pending.clear()

        # an unopenable shard or damage inside it goes to handler.errors; the rest is read
        with shard_samples(shard.url, endpoint=endpoint, handler=handler,
                           companions=[shard.eval_url] if shard.eval_url else []) as raws:
            for raw in raws:
                read += 1
                key = str(raw.get("__key__"))
                entries = {k: v for k, v in raw.items() if not k.startswith("__")}
                entries["__key__"] = key
                try:
                    sample = decode_sample(raw, image_size=manifest.image_size)
                    if sample.image_size != manifest.image_size:
                        raise ValueError(f"views are {sample.image_size} px, the manifest says {manifest.image_size} px")
                except ValueError as exn:
                    _logger.error("skipping sample %s in %s: %s", key, shard.url, exn)
                    summary.skipped.append({"key": key, "shard": shard.url, "reason": str(exn)})
                    continue
                if sample.masks is not None:
                    write(entries, subject=sample.subject)
                    summary.kept += 1
                    continue
                pending.append((entries, sample))
                if len(pending) >= batch_size:
                    flush()
            if pending:
                flush()
    if read < shard.count or errors:
        reason = f"{errors[0]!r:.300}" if errors else ""
        _logger.warning("shard %s: manifest lists %d samples, read %d%s", shard.url, shard.count, read,
                        f"; first error: {reason}" if reason else "")
        summary.lost.append({"shard": shard.url, "expected": shard.count, "read": read, "reason": reason})
    info = out.shards[0] if out.shards else None
    _logger.info("%s -> %s: %d samples", shard.url, out.url_for(index), info.count if info else 0)
    return info


# ---------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sharding.fill_masks", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="shard root with manifest.json (directory or s3://bucket/prefix)")
    p.add_argument("--out", required=True, help="new shard root (directory or s3://bucket/prefix)")
    p.add_argument("--parse-net", required=True, help="parse-net checkpoint (jobs/train_parsenet.py's parsenet.pt)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per forward pass")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--endpoint", default=None, help="S3 endpoint URL (default: AWS_ENDPOINT_URL)")
    add_run_options(p, progress_bar=False)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    log_to_stderr()
    try:
        summary = fill_masks(args.input, args.out, args.parse_net, batch_size=args.batch_size, device=args.device,
                             endpoint=args.endpoint)
    except (FileNotFoundError, ValueError) as exn:  # ManifestError is a ValueError
        print(f"error: {exn}", file=sys.stderr)
        return 2
    for line in summary.lines():
        print(line)
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps({**asdict(summary), "written": summary.written}, indent=1))
    if summary.written == 0:
        print(f"nothing written from {args.input}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
