"""Loader throughput: triplets per second streamed from S3 through the full loader, next to the
decode-only ceiling, and synthetic generation throughput.

    .venv/bin/python benchmarks/loader.py [--json] [--size 224] [--samples 512] [--data auto]
        [--workers 2] [--no-jpg]

1. Makes the data: ``--data synth`` renders faces with ``dfmvr.data.synth`` (``auto`` uses it when it
   imports and runs, else falls back to ``ellipses``: procedural ellipse "faces" drawn with
   OpenCV: gradient background, shaded skin, a blob per feature class). ``--unique`` distinct
   samples are made and repeated under distinct keys up to ``--samples`` (decode work per
   sample is what matters, not content).
2. Starts a moto S3 server on 127.0.0.1 (this process, one thread), writes the samples as shards
   (``--max-count`` per shard) with ``ShardWriter`` and a manifest, in three layouts read side by
   side: today's (``s3``: the meshes in each shard's evaluation companion, which training never
   fetches), ``inline`` (the layout before companions: the meshes inside the training shards) and
   ``jpg`` (today's with JPEG views; ``--no-jpg`` leaves it out). ``shard_mib_per_triplet`` is
   what the training loader reads per triplet.
3. S3 loader: ``make_loader`` (non-resampled, shuffled, batch ``--batch-size``, ``--workers``
   DataLoader workers) over the whole split, one warm-up epoch, then ``--epochs`` timed epochs.
4. Decode-only ceiling: the same encoded samples (identical PNG bytes) held in memory, split
   between the same number of DataLoader worker processes, through the loader's own
   ``TripletDecoder`` (decode, checks, weight maps) and ``Batcher`` (collate) stages; no storage,
   no tar, no shuffle buffer. Same process count and the same batch transfer to the main process,
   so the difference is exactly what storage streaming and tar parsing cost.
5. Synthetic generation (``dfmvr.data.synth.generate`` into a local directory, ``--synth-workers``
   processes), when it runs; else reported as null.

Every epoch (ours and the ceiling's) includes starting its DataLoader workers, as training does
with ``persistent_workers=False``; epochs of the two alternate so that load from other processes
falls on both alike, and the median epoch counts. The last stdout line with ``--json`` is one JSON object
(docs/design.md "Machine-readable results").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_record  # noqa: E402

from dfmvr.config import DataConfig  # noqa: E402
from dfmvr.data import shards as sh  # noqa: E402
from dfmvr.data.batch import Batch  # noqa: E402
from dfmvr.data.loader import Batcher, EpochState, Tally, TripletDecoder, make_loader  # noqa: E402

_logger = logging.getLogger("benchmarks.loader")

FAKE_ACCESS_KEY = "AKIAFAKEBENCHMARKKEY"
FAKE_SECRET_KEY = "fake-benchmark-secret-not-a-credential"


# ----------------------------------------------------------------------------- data


def ellipse_sample(index: int, size: int) -> sh.Sample:
    """A face-like sample drawn with OpenCV (no renderer needed)."""
    rng = np.random.default_rng(index)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images, masks, lmk2d = {}, {}, []
    base = rng.uniform(40, 200, 3)
    skin = rng.uniform(120, 220, 3)
    for v, view in enumerate(sh.VIEWS):
        background = base + 60 * (xx[..., None] - 0.5) + 40 * (yy[..., None] - 0.5) + rng.normal(0, 6, (size, size, 3))
        mask = np.zeros((size, size), np.uint8)
        cx, cy = size * (0.5 + 0.1 * (v - 1)), size * 0.52
        ax, ay = size * 0.27, size * 0.36
        cv2.ellipse(mask, (int(cx), int(cy)), (int(ax), int(ay)), 0, 0, 360, 1, -1)
        for cls, (fx, fy, r) in zip(
            range(2, 10),
            [(-0.4, -0.35, 0.08), (0.4, -0.35, 0.08), (-0.4, -0.2, 0.07), (0.4, -0.2, 0.07),
             (0.0, 0.05, 0.1), (0.0, 0.45, 0.06), (0.0, 0.38, 0.05), (0.0, 0.52, 0.05)],
        ):
            cv2.ellipse(mask, (int(cx + fx * ax), int(cy + fy * ay)), (int(r * size), int(0.5 * r * size)), 0, 0, 360, cls, -1)
        shade = 0.75 + 0.25 * np.cos((xx - cx / size) * 3.0)[..., None]
        face = skin * shade + rng.normal(0, 4, (size, size, 3))
        image = np.where((mask > 0)[..., None], face, background)
        image = np.where((mask >= 2)[..., None], image * 0.55, image)
        images[view] = np.clip(image, 0, 255).astype(np.uint8)
        masks[view] = mask
        t = np.linspace(0, 2 * np.pi, 68, endpoint=False)
        lmk2d.append(np.stack([cx + 0.8 * ax * np.cos(t), cy + 0.8 * ay * np.sin(t)], axis=1))
    return sh.Sample(
        subject=f"ell{index:05d}",
        capture="00",
        images=images,
        masks=masks,
        lmk2d=np.stack(lmk2d).astype(np.float32),
        lmk3d=rng.normal(size=(68, 3)).astype(np.float32),
        coeffs=rng.normal(size=269).astype(np.float32),
        meta={"yaw_deg": [-45.0, 0.0, 45.0], "source": "benchmark-ellipses"},
    )


def synth_samples(unique: int, size: int, workers: int) -> tuple[list[sh.Sample], float]:
    """``unique`` samples rendered by ``dfmvr.data.synth`` and its throughput (triplets/s)."""
    from dfmvr.data.synth import generate, iter_shard_samples

    with tempfile.TemporaryDirectory(prefix="dfmvr-bench-synth-") as out:
        summary = generate(
            out, n_subjects=unique, n_captures=1, size=size, workers=workers,
            splits=(1.0, 0.0, 0.0), max_count=max(1, unique // max(1, workers)),
        )
        manifest = sh.read_manifest(out)
        samples = [s for url in manifest.shard_urls("train") for s in iter_shard_samples(url)]
    return samples, float(summary.triplets_per_s)


def replicate(samples: list[sh.Sample], count: int) -> list[sh.Sample]:
    """``count`` samples cycling through ``samples`` under distinct subjects."""
    out = []
    for index in range(count):
        source = samples[index % len(samples)]
        out.append(dataclasses.replace(source, subject=f"rep{index:05d}", capture="00"))
    return out


# ----------------------------------------------------------------------------- measurements


class InMemoryTriplets(torch.utils.data.IterableDataset):
    """Encoded samples in memory, split between DataLoader workers, through the loader's stages."""

    def __init__(self, encoded: list[dict], cfg: DataConfig, shard_size: int) -> None:
        super().__init__()
        self.encoded = encoded
        self.cfg = cfg
        self.shard_size = shard_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        tally = Tally()
        decoder = TripletDecoder(
            shard_size=self.shard_size, image_size=self.cfg.image_size, color_jitter=self.cfg.color_jitter,
            weight_map=self.cfg.weight_map, with_gt=False, seed=0, rank=0, state=EpochState(), tally=tally,
        )
        batcher = Batcher(batch_size=self.cfg.batch_size, with_gt=False, tally=tally)
        return batcher(decoder(iter(self.encoded[worker::workers])))


def _cpu_seconds() -> tuple[float, float]:
    """(this process, its waited-for children) user + system CPU seconds."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def time_epochs(candidates: dict[str, object], epochs: int, expected: int) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU seconds per epoch for each ``name -> make_iterable``, after one warm-up epoch each.

    Epochs of the candidates alternate (A B A B ...) so that load from other processes on the
    machine falls on both alike. CPU time is this process (main loop, and for S3 the moto
    server thread) plus the DataLoader workers (joined at the end of each epoch). Every epoch
    must deliver ``expected`` triplets.
    """
    out = {name: {"wall": [], "cpu_main": [], "cpu_workers": []} for name in candidates}
    for epoch in range(epochs + 1):
        for name, make_iterable in candidates.items():
            own0, children0 = _cpu_seconds()
            start = time.perf_counter()
            count = sum(len(batch) for batch in make_iterable() if isinstance(batch, Batch))
            elapsed = time.perf_counter() - start
            own1, children1 = _cpu_seconds()
            if count != expected:
                raise RuntimeError(f"{name} epoch {epoch}: {count} triplets arrived, expected {expected}")
            if epoch > 0:
                out[name]["wall"].append(elapsed)
                out[name]["cpu_main"].append(own1 - own0)
                out[name]["cpu_workers"].append(children1 - children0)
    return out


def start_moto() -> tuple[object, str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID=FAKE_ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=FAKE_SECRET_KEY, AWS_DEFAULT_REGION="us-east-1",
    )
    return server, endpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--samples", type=int, default=512, help="triplets per epoch")
    parser.add_argument("--unique", type=int, default=32, help="distinct samples made (repeated up to --samples)")
    parser.add_argument("--data", choices=("auto", "synth", "ellipses"), default="auto")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (and ceiling processes)")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs (after one warm-up epoch)")
    parser.add_argument("--max-count", type=int, default=64, help="samples per shard")
    parser.add_argument("--synth-workers", type=int, default=2, help="processes for the synthetic generator")
    parser.add_argument("--no-jpg", dest="jpg", action="store_false", help="skip the JPEG-views layout")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    data_source, synth_rate, synth_note = args.data, None, ""
    unique: list[sh.Sample] = []
    if args.data in ("auto", "synth"):
        try:
            unique, synth_rate = synth_samples(min(args.unique, args.samples), args.size, args.synth_workers)
            data_source = "synth"
        except Exception as exn:  # the generator is optional here; say why it was not used
            if args.data == "synth":
                raise
            synth_note = f"dfmvr.data.synth unavailable ({type(exn).__name__}: {exn})"
            _logger.warning("%s; using ellipse samples", synth_note)
    if not unique:
        data_source = "ellipses"
        unique = [ellipse_sample(i, args.size) for i in range(min(args.unique, args.samples))]
    samples = replicate(unique, args.samples)

    server, endpoint = start_moto()
    try:
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        # the layouts side by side: today's (meshes in the evaluation companions), the one before
        # companions (meshes inside the training shards), and today's with JPEG views
        layouts = {"s3": ("png", True), "inline": ("png", False)}
        if args.jpg:
            layouts["jpg"] = ("jpg", True)
        roots, written = {}, {}
        for name, (image_format, split_eval) in layouts.items():
            roots[name] = f"s3://bench/{name}"
            start = time.perf_counter()
            with sh.ShardWriter(roots[name], "train", max_count=args.max_count, split_eval=split_eval) as writer:
                for sample in samples:
                    writer.write(dataclasses.replace(sample, image_format=image_format))
            if name == "s3":
                write_s = time.perf_counter() - start
            sh.write_manifest(roots[name], writer.shards, image_size=args.size)
            written[name] = writer.shards
        shard_bytes = {name: sum(info.size for info in infos) for name, infos in written.items()}
        eval_bytes = sum(info.eval_size for info in written["s3"])

        cfg = DataConfig(url=roots["s3"], image_size=args.size, batch_size=args.batch_size, num_workers=args.workers,
                         shuffle_buffer=64)
        loaders = {name: make_loader(dataclasses.replace(cfg, url=root), "train", resampled=False, seed=0)
                   for name, root in roots.items()}
        encoded = [sh.encode_sample(sample) for sample in samples]
        ceiling = InMemoryTriplets(encoded, cfg, args.size)
        candidates = {name: (lambda loader=loader: iter(loader)) for name, loader in loaders.items()}
        candidates["ceiling"] = lambda: iter(torch.utils.data.DataLoader(ceiling, batch_size=None,
                                                                          num_workers=args.workers))
        times = time_epochs(candidates, args.epochs, args.samples)
        s3_times, ceiling_times = times["s3"]["wall"], times["ceiling"]["wall"]
    finally:
        server.stop()

    s3_rate = args.samples / statistics.median(s3_times)
    ceiling_rate = args.samples / statistics.median(ceiling_times)

    def cpu_ms(name: str, part: str) -> float:
        return 1000 * statistics.median(times[name][part]) / args.samples

    s3_cpu = cpu_ms("s3", "cpu_main") + cpu_ms("s3", "cpu_workers")
    ceiling_cpu = cpu_ms("ceiling", "cpu_main") + cpu_ms("ceiling", "cpu_workers")
    results = {
        "s3_triplets_per_s": round(s3_rate, 2),
        "decode_ceiling_triplets_per_s": round(ceiling_rate, 2),
        "s3_fraction_of_ceiling": round(s3_rate / ceiling_rate, 3),
        "s3_cpu_ms_per_triplet": round(s3_cpu, 2),
        "s3_worker_cpu_ms_per_triplet": round(cpu_ms("s3", "cpu_workers"), 2),
        "ceiling_cpu_ms_per_triplet": round(ceiling_cpu, 2),
        "s3_cpu_fraction_of_ceiling": round(ceiling_cpu / s3_cpu, 3),
        "synth_triplets_per_s": round(synth_rate, 3) if synth_rate is not None else None,
        "shard_write_triplets_per_s": round(args.samples / write_s, 2),
        "shard_mib_per_triplet": round(shard_bytes["s3"] / args.samples / 2**20, 3),
        "eval_companion_mib_per_triplet": round(eval_bytes / args.samples / 2**20, 3),
        "inline_shard_mib_per_triplet": round(shard_bytes["inline"] / args.samples / 2**20, 3),
        "inline_s3_triplets_per_s": round(args.samples / statistics.median(times["inline"]["wall"]), 2),
        "s3_over_inline": round(statistics.median(times["inline"]["wall"]) / statistics.median(s3_times), 3),
        "s3_cpu_over_inline": round((cpu_ms("inline", "cpu_main") + cpu_ms("inline", "cpu_workers")) / s3_cpu, 3),
    }
    if "jpg" in times:
        results.update({
            "jpg_shard_mib_per_triplet": round(shard_bytes["jpg"] / args.samples / 2**20, 3),
            "jpg_s3_triplets_per_s": round(args.samples / statistics.median(times["jpg"]["wall"]), 2),
            "jpg_over_inline": round(statistics.median(times["inline"]["wall"]) / statistics.median(times["jpg"]["wall"]), 3),
        })
    units = {
        "s3_triplets_per_s": "triplets/s", "decode_ceiling_triplets_per_s": "triplets/s",
        "s3_fraction_of_ceiling": "ratio", "synth_triplets_per_s": "triplets/s",
        "s3_cpu_ms_per_triplet": "ms", "s3_worker_cpu_ms_per_triplet": "ms", "ceiling_cpu_ms_per_triplet": "ms",
        "s3_cpu_fraction_of_ceiling": "ratio",
        "shard_write_triplets_per_s": "triplets/s", "shard_mib_per_triplet": "MiB",
        "eval_companion_mib_per_triplet": "MiB", "inline_shard_mib_per_triplet": "MiB",
        "inline_s3_triplets_per_s": "triplets/s", "s3_over_inline": "ratio", "s3_cpu_over_inline": "ratio",
        "jpg_shard_mib_per_triplet": "MiB", "jpg_s3_triplets_per_s": "triplets/s", "jpg_over_inline": "ratio",
    }
    settings = {
        "size": args.size, "samples": args.samples, "unique": len(unique), "data": data_source,
        "batch_size": args.batch_size, "workers": args.workers, "epochs": args.epochs, "max_count": args.max_count,
        "shards": len(written["s3"]), "s3_epoch_s": [round(t, 3) for t in s3_times],
        "ceiling_epoch_s": [round(t, 3) for t in ceiling_times],
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    if synth_note:
        settings["synth_note"] = synth_note
    print(f"data: {data_source} ({len(unique)} unique, {args.samples} triplets, {args.size} px, "
          f"{len(written['s3'])} shards, {results['shard_mib_per_triplet']} MiB/triplet)")
    print(f"{'measurement':<36}{'triplets/s':>12}")
    print(f"{'S3 loader (full pipeline)':<36}{s3_rate:>12.1f}")
    print(f"{'decode-only ceiling (in memory)':<36}{ceiling_rate:>12.1f}")
    print(f"{'S3 / ceiling':<36}{s3_rate / ceiling_rate:>12.1%}")
    print(f"{'S3, meshes inside the shards':<36}{results['inline_s3_triplets_per_s']:>12.1f}"
          f"   ({results['inline_shard_mib_per_triplet']} MiB/triplet; companions {results['s3_over_inline']:.2f}x)")
    if "jpg" in times:
        print(f"{'S3, JPEG views':<36}{results['jpg_s3_triplets_per_s']:>12.1f}"
              f"   ({results['jpg_shard_mib_per_triplet']} MiB/triplet; {results['jpg_over_inline']:.2f}x the inline)")
    print(f"{'CPU ms per triplet':<36}{'S3':>12}{'ceiling':>12}")
    print(f"{'  main process (S3: + moto server)':<36}{cpu_ms('s3', 'cpu_main'):>12.2f}{cpu_ms('ceiling', 'cpu_main'):>12.2f}")
    print(f"{'  DataLoader workers':<36}{cpu_ms('s3', 'cpu_workers'):>12.2f}{cpu_ms('ceiling', 'cpu_workers'):>12.2f}")
    print(f"{'  ceiling / S3 (CPU cost ratio)':<36}{ceiling_cpu / s3_cpu:>12.1%}")
    print(f"{'synthetic generation':<36}{(f'{synth_rate:.2f}' if synth_rate is not None else 'n/a'):>12}")
    if synth_note:
        print(f"synthetic generation not measured: {synth_note}")
    if args.json:
        print(json.dumps({"benchmark": "loader", "results": results, "units": units, "settings": settings,
                          "machine": machine_record()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
