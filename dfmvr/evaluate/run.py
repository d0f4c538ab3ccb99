"""Evaluate a checkpoint on a shard split: the model beside its baselines, in mm.

What ``jobs/evaluate.py`` runs (docs/evaluation.md, "Jobs"). Per sample with a ground-truth mesh
(``gt.npz``), three reconstructions are scored with the same metrics
(:mod:`dfmvr.evaluate.metrics`):

- ``model``: the checkpoint on the sample's three views;
- ``mean_face``: the face model's mean shape (zero identity and expression coefficients); pose
  does not matter because every metric aligns the prediction onto the scan first;
- ``single_view``: the same model fed the front view three times (and its mask likewise; the
  per-view yaw prior unchanged), the closest we get to a single-view method on the same weights.

Metrics per sample and method: NoW's scan-to-mesh distances (``now_*``; the 7 scan landmarks are
the ground-truth vertices at ``keypoints[NOW_LANDMARKS_IBUG]`` when the scan has the model's
topology, else the sample's ``lmk3d`` when it holds the 68 iBUG points), the point-to-plane RMSE
(``p2p_rmse_mm``, cropped around the nose tip, iBUG 30) and, for scans of the model's topology,
the aligned per-vertex RMSE (``vertex_rmse_mm``, as in training's validation) and REALY's
per-region errors (``region_<name>_mm``). The split's ``now_*`` statistics pool the distances of
all samples, as NoW does; ``p2p_rmse_mm``, ``vertex_rmse_mm`` and the regions average the
per-sample values.

A sample that cannot be scored (undecodable, landmarks well outside its image, a scan without
faces or with NaN vertices, no scan landmarks, a non-finite prediction) is skipped with a reason
that names it and its shard; the run goes on and the summary lists them. Splits of more than
``ray_threshold`` samples are cut into chunks scored by a pool of Ray actors (:class:`ChunkScorer`,
one model each, ``ray.util.ActorPool``); smaller ones run in this
process.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import torch

from dfmvr.config import check_at_least
from dfmvr.data.batch import TripletItem, collate
from dfmvr.data.shards import VIEWS, read_manifest
from dfmvr.data.samples import ShardChunk, Skipped, make_decoder, plan_chunks, read_chunk
from dfmvr.inputs import to_uint8
from dfmvr.evaluate.report import EvalReport, summarize
from dfmvr.evaluate.scoring import METHODS, RANK_KEY, _now_ibug, scan_truth, score
from dfmvr.model import reads_parse_net_masks

if TYPE_CHECKING:
    from dfmvr.serving import Reconstructor

_logger = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    """One evaluation run."""

    split: str = "test"
    """Split of the shard manifest."""
    out: str = ""
    """Folder for summary.json, per_sample.jsonl and overlays/ (required)."""
    batch_size: int = 8
    """Samples per forward pass."""
    ray_threshold: int = 256
    """Splits with more samples than this are spread over Ray tasks; others run in-process."""
    chunk_size: int = 64
    """Most samples per Ray task (smaller when that leaves workers idle)."""
    n_overlays: int = 4
    """Best and worst samples (by the model's per-sample NoW mean) drawn as overlays, each."""
    max_samples: int = 0
    """Evaluate only the first this many samples of the split (0: all)."""
    device: str = "cpu"
    """``cpu``, ``cuda`` or ``auto`` (in-process; Ray tasks take a GPU when the cluster has them)."""
    icp_iters: int = 60
    """Most ICP iterations per alignment."""
    fit_steps: int = 0
    """Test-time fitting steps after the network (:mod:`dfmvr.fit`); the fitted result is scored
    as ``model`` and the network alone as the ``network`` baseline. 0: the network alone."""
    fit_from: str = "network"
    """Where fitting starts: ``network`` or ``mean`` (the mean face: what fitting does alone)."""
    fit_landmarks: str = "given"
    """The views' landmarks the fit reads: ``given`` (the samples' own 68) or ``mesh`` (the face
    mesh landmarker's on each aligned view, :func:`dfmvr.facemesh.crop_points68`, the side views'
    jaw left out as on photos)."""

    def __post_init__(self) -> None:
        check_at_least("fit_steps", self.fit_steps, 0)
        if self.fit_from not in ("network", "mean"):
            raise ValueError(f"fit_from: expected 'network' or 'mean', got {self.fit_from!r}")
        if self.fit_landmarks not in ("given", "mesh"):
            raise ValueError(f"fit_landmarks: expected 'given' or 'mesh', got {self.fit_landmarks!r}")
        if not self.out:
            raise ValueError("out: expected an output folder, got ''")
        for name in ("batch_size", "chunk_size"):
            check_at_least(name, getattr(self, name), 1)
        for name in ("ray_threshold", "n_overlays", "max_samples", "icp_iters"):
            check_at_least(name, getattr(self, name), 0)
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"device: expected 'cpu', 'cuda' or 'auto', got {self.device!r}")


def checkpoint_slug(uri: str) -> str:
    """A short folder name for a checkpoint URI: ``runs:/abc.../model`` -> ``run-abc12345``,
    ``models:/dfmvr/3`` -> ``dfmvr-v3``, a path -> its last component."""
    if uri.startswith("runs:/"):
        return "run-" + uri[len("runs:/"):].split("/")[0][:8]
    if uri.startswith("models:/"):
        rest = uri[len("models:/"):].strip("/")
        return rest.replace("@", "-").replace("/", "-v", 1).replace("/", "-")
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    return (name[:-len(".pt")] if name.endswith(".pt") else name) or "checkpoint"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# --------------------------------------------------------------------------- per-sample work



@dataclass(kw_only=True, slots=True)
class Candidate:
    """A sample that may be drawn as a best or worst overlay."""

    key: str
    score: float
    image: np.ndarray
    """uint8 overlay row."""


@dataclass(kw_only=True, slots=True)
class ChunkResult:
    """What evaluating some samples produced (merged by :func:`merge`)."""

    records: list[dict] = field(default_factory=list)
    """Per sample: ``{"key", "source", "model": {...}, "mean_face": {...}, "single_view": {...}}``."""
    distances: dict[str, list[np.ndarray]] = field(default_factory=lambda: {k: [] for k in METHODS})
    """Per method, NoW distances of each scored sample (mm)."""
    fit_terms: list[tuple[dict, dict]] = field(default_factory=list)
    """With fitting: per fitted sample, its terms before and after."""
    fit_seconds: float = 0.0
    """With fitting: seconds spent fitting."""
    fit_landmarks_found: int = 0
    """With ``fit_landmarks="mesh"``: views the landmarker found a face in."""
    skipped: list[Skipped] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)
    seconds: float = 0.0


def _masks_for(recon: "Reconstructor", batch, result: ChunkResult, sources: list[str]) -> tuple[list[int], Any]:
    """Indices of the samples that can run, and the masks tensor (None for a mask-free model)."""
    keep = list(range(len(batch)))
    if not recon.cfg.model.mask_input or reads_parse_net_masks(recon.cfg.model):
        return keep, None  # no masks read, or the network makes its own from the parse net
    masks = batch.masks.clone()
    missing = [i for i in keep if not bool(batch.has_masks[i])]
    if missing and recon.parse_net is not None:
        masks[missing] = recon.make_masks(batch.images[missing]).cpu()
    elif missing:
        for i in missing:
            result.skipped.append(Skipped(name=batch.keys[i], source=sources[i],
                                          reason="no masks in the sample and no parse net (model.parse_net) "
                                                 "to make them; this model takes masks"))
        keep = [i for i in keep if i not in missing]
    return keep, masks


def _fitted(recon: "Reconstructor", images: torch.Tensor, lmk2d: torch.Tensor, network, cfg: EvalConfig,
            result: ChunkResult):
    """The fit of a batch (the masks the network reads: its parse net's; ``lmk2d`` as ``cfg.fit_landmarks``)."""
    from dfmvr.fit import FitConfig

    if cfg.fit_landmarks == "mesh":
        from dfmvr.facemesh import crop_points68, without_side_jaw

        lmk2d = torch.from_numpy(without_side_jaw(crop_points68(to_uint8(images.cpu())), VIEWS)).float()
        result.fit_landmarks_found += int(np.isfinite(lmk2d[..., 0, 0]).sum())
    with torch.enable_grad():
        fitted = recon.fit(images, None, lmk2d, init=network.coeffs if cfg.fit_from == "network" else None,
                           cfg=FitConfig(steps=cfg.fit_steps, start=cfg.fit_from))
    result.fit_terms += list(zip(fitted.before, fitted.after))
    result.fit_seconds += fitted.seconds
    return fitted.output


@torch.no_grad()
def evaluate_items(recon: "Reconstructor", items: list[TripletItem], sources: list[str], *, n_overlays: int,
                   icp_iters: int, result: ChunkResult | None = None, cfg: EvalConfig | None = None) -> ChunkResult:
    """Score one batch of decoded samples (``sources``: each one's shard) into ``result``; with
    ``cfg.fit_steps`` the fitted result is ``model`` and the network alone ``network``."""
    from dfmvr.evaluate.metrics import ScanError, vertex_regions
    from dfmvr.visualize import overlay_row

    result = result if result is not None else ChunkResult()
    model = recon.model
    fm = model.face.model
    keypoints = fm.keypoints.cpu().numpy()
    faces = fm.tri.cpu().numpy()
    regions = vertex_regions(fm)
    mean_shape = fm.mean_shape.double().cpu().numpy()
    front = VIEWS.index("front")
    batch = collate(items, with_gt=True)
    keep, masks = _masks_for(recon, batch, result, sources)
    if not keep:
        return result
    device = recon.device
    images = batch.images[keep].to(device)
    masks = masks[keep].to(device) if masks is not None else None
    outputs = {"model": model(images, masks, render=False)}
    if cfg is not None and cfg.fit_steps:
        outputs["network"] = outputs["model"]
        outputs["model"] = _fitted(recon, images, batch.lmk2d[keep].to(device), outputs["network"], cfg, result)
    methods = METHODS + (("network",) if "network" in outputs else ())
    same = [front] * len(VIEWS)
    outputs["single_view"] = model(images[:, same], masks[:, same] if masks is not None else None, render=False)
    scored: list[tuple[int, float]] = []
    by_row: dict[int, dict] = {}
    for row, i in enumerate(keep):
        key, source = batch.keys[i], sources[i]
        where = f"sample {key} in {source}"
        preds = {name: outputs[name].shape[row].double().cpu().numpy() for name in methods if name != "mean_face"}
        preds["mean_face"] = mean_shape
        bad = [name for name, p in preds.items() if not np.isfinite(p).all()]
        if bad:
            result.skipped.append(Skipped(name=key, source=source,
                                          reason=f"non-finite prediction (NaN or inf) from {bad}"))
            continue
        truth = scan_truth(items[i], keypoints, fm.n_vertices, _now_ibug())
        if isinstance(truth, str):
            result.skipped.append(Skipped(name=key, source=source, reason=truth))
            continue
        record: dict[str, Any] = {"key": key, "source": source}
        dists = {}
        try:
            for name in methods:
                record[name], dists[name] = score(preds[name], truth, faces, keypoints, regions, source=where,
                                                  icp_iters=icp_iters)
        except ScanError as e:
            result.skipped.append(Skipped(name=key, source=source, reason=str(e)))
            continue
        result.records.append(record)
        for name in methods:
            result.distances.setdefault(name, []).append(dists[name])
        scored.append((row, record["model"][RANK_KEY]))
        by_row[row] = record
    if n_overlays and scored:
        from dfmvr.pictures import crisp_crops, render_views

        chosen = _extremes(scored, n_overlays)
        rendered = model.decode(outputs["model"].coeffs[[r for r, _ in chosen]], render=False)
        tile = max(160, model.image_size)
        scale = tile / model.image_size
        for j, (row, value) in enumerate(chosen):
            i = keep[row]
            rec = by_row[row]
            title = (f"{batch.keys[i]}: NoW mean {value:.2f} mm (mean face {rec['mean_face'][RANK_KEY]:.2f}, "
                     f"single view {rec['single_view'][RANK_KEY]:.2f}); green given, red predicted landmarks")
            # rendered at the tile's size, over the crop resized to it (not a model-size render scaled up)
            renders, covers, _ = render_views(model, rendered.posed[j], rendered.colors[j], tile)
            image = overlay_row(crisp_crops(to_uint8(batch.images[i]), tile), renders, covers,
                                rendered.lm2d[j].cpu().numpy() * scale, batch.lmk2d[i].numpy() * scale, tile=tile,
                                title=title)
            result.candidates.append(Candidate(key=batch.keys[i], score=value, image=image))
    return result


def _extremes(scored: list[tuple[int, float]], k: int) -> list[tuple[int, float]]:
    """The ``k`` lowest and ``k`` highest entries by value (each once)."""
    order = sorted(scored, key=lambda rv: rv[1])
    picked = {r: v for r, v in order[:k] + order[-k:]}
    return sorted(picked.items(), key=lambda rv: rv[1])


def _keep_extremes(candidates: list[Candidate], k: int) -> list[Candidate]:
    order = sorted(candidates, key=lambda c: c.score)
    chosen = {id(c): c for c in order[:k] + order[-k:]}
    return sorted(chosen.values(), key=lambda c: c.score)


def evaluate_chunk(recon: "Reconstructor", chunk: ShardChunk, decoder, cfg: EvalConfig, *,
                   endpoint: str | None = None) -> ChunkResult:
    """Read and score the samples of one chunk, batch by batch."""
    t0 = time.perf_counter()
    result = ChunkResult()
    pending: list[TripletItem] = []

    def flush() -> None:
        if pending:
            evaluate_items(recon, pending, [chunk.url] * len(pending), n_overlays=cfg.n_overlays,
                           icp_iters=cfg.icp_iters, result=result, cfg=cfg)
            pending.clear()
            result.candidates = _keep_extremes(result.candidates, cfg.n_overlays)

    for item in read_chunk(chunk, decoder, endpoint=endpoint):
        if isinstance(item, Skipped):
            result.skipped.append(item)
            continue
        pending.append(item)
        if len(pending) == cfg.batch_size:
            flush()
    flush()
    result.seconds = time.perf_counter() - t0
    return result


# --------------------------------------------------------------------------- running it


class ChunkScorer:
    """One Ray actor: builds the model once from the checkpoint's dict, then scores chunks.
    Held by a :class:`ray.util.ActorPool`, so a model is built once per actor (not per task,
    and without a process-global cache)."""

    def __init__(self, shared: dict, cfg: EvalConfig):
        from dfmvr.serving import Reconstructor

        torch.set_num_threads(1)
        device = torch.device("cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu")
        self.recon = Reconstructor.from_payload(shared["payload"], shared["source"], device, shared["overrides"])
        self.cfg = cfg
        self.endpoint = shared["endpoint"]
        self.decoder = make_decoder(shared["manifest"], self.recon.model.image_size, with_gt=True,
                                    weight_map=self.recon.cfg.data.weight_map)

    def score(self, chunk: ShardChunk) -> ChunkResult:
        return evaluate_chunk(self.recon, chunk, self.decoder, self.cfg, endpoint=self.endpoint)


def _slim_payload(payload: dict) -> dict:
    """What a worker needs to rebuild the model (no optimizer state)."""
    return {k: payload[k] for k in ("format_version", "model", "step", "config", "face_signature", "metrics", "extra")
            if k in payload}


def _run_ray(recon: "Reconstructor", manifest, chunks: list[ShardChunk], cfg: EvalConfig, overrides: dict,
             endpoint: str | None, slots: int) -> list[ChunkResult]:
    """Score ``chunks`` on a pool of ``min(slots, len(chunks))`` :class:`ChunkScorer` actors (one
    CPU, or one GPU, each); results in chunk order. An actor that dies is restarted and its chunk
    retried (twice)."""
    import ray
    from ray.util import ActorPool

    use_gpu = cfg.device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0
    shared = ray.put({"payload": _slim_payload(recon.payload), "source": recon.source, "overrides": overrides,
                      "manifest": manifest, "endpoint": endpoint})
    actor = ray.remote(ChunkScorer).options(num_cpus=1, num_gpus=1 if use_gpu else 0, max_restarts=2,
                                            max_task_retries=2)
    actors = [actor.remote(shared, cfg) for _ in range(max(1, min(slots, len(chunks))))]
    results = []
    try:
        for result in ActorPool(actors).map(lambda a, chunk: a.score.remote(chunk), chunks):
            results.append(result)
            _logger.info("evaluated %d/%d chunks", len(results), len(chunks))
    finally:
        for a in actors:
            ray.kill(a)
    return results


def merge(results: Iterable[ChunkResult], n_overlays: int) -> ChunkResult:
    """One result from many (records in sample order as the chunks came)."""
    total = ChunkResult()
    for r in results:
        total.records += r.records
        total.skipped += r.skipped
        total.candidates = _keep_extremes(total.candidates + r.candidates, n_overlays)
        total.seconds += r.seconds
        total.fit_terms += r.fit_terms
        total.fit_seconds += r.fit_seconds
        total.fit_landmarks_found += r.fit_landmarks_found
        for name, d in r.distances.items():
            total.distances.setdefault(name, []).extend(d)
    return total



def evaluate(recon: "Reconstructor", cfg: EvalConfig, *, overrides: dict | None = None,
             data_url: str | None = None) -> EvalReport:
    """Evaluate ``recon`` on ``cfg.split`` of its data (``data_url`` or the checkpoint's
    ``data.url``) and write ``summary.json``, ``per_sample.jsonl`` and ``overlays/`` under
    ``cfg.out``.

    Args:
        recon: the loaded model (:func:`dfmvr.serving.load`).
        cfg: the run's settings.
        overrides: the config overrides ``recon`` was loaded with (Ray workers rebuild it the same way).
        data_url: shard root; default ``recon.cfg.data.url``.

    Raises:
        FileNotFoundError / dfmvr.data.shards.ManifestError: no manifest, or no such split.
    """
    url = data_url or recon.cfg.data.url
    if not url:
        raise ValueError("data.url: the checkpoint's config names no shards; pass data.url=ROOT")
    endpoint = recon.cfg.data.s3_endpoint or None
    manifest = read_manifest(url, endpoint=endpoint)
    n_total = manifest.split(cfg.split).count
    n = min(n_total, cfg.max_samples) if cfg.max_samples else n_total
    use_ray = n > cfg.ray_threshold
    t0 = time.perf_counter()
    if use_ray:
        import ray

        if not ray.is_initialized():
            ray.init()
        slots = max(1, int(ray.cluster_resources().get("CPU", 1)))
        chunk_size = max(1, min(cfg.chunk_size, math.ceil(n / slots)))
        chunks = plan_chunks(manifest, cfg.split, chunk_size, max_samples=cfg.max_samples)
        _logger.info("evaluating %d samples of %s split %r in %d chunks on Ray actors", n, manifest.url, cfg.split,
                     len(chunks))
        result = merge(_run_ray(recon, manifest, chunks, cfg, dict(overrides or {}), endpoint, slots), cfg.n_overlays)
    else:
        chunks = plan_chunks(manifest, cfg.split, cfg.chunk_size, max_samples=cfg.max_samples)
        _logger.info("evaluating %d samples of %s split %r in this process", n, manifest.url, cfg.split)
        decoder = make_decoder(manifest, recon.model.image_size, with_gt=True, weight_map=recon.cfg.data.weight_map)
        result = merge((evaluate_chunk(recon, c, decoder, cfg, endpoint=endpoint) for c in chunks), cfg.n_overlays)
    elapsed = time.perf_counter() - t0

    out = Path(cfg.out)
    overlay_dir = out / "overlays"
    overlay_dir.mkdir(parents=True, exist_ok=True)
    from dfmvr.visualize import write_png

    overlays = []
    by_score = sorted(result.candidates, key=lambda c: c.score)
    for label, picked in (("best", by_score[:cfg.n_overlays]), ("worst", by_score[::-1][:cfg.n_overlays])):
        for rank, cand in enumerate(picked, 1):
            overlays.append(write_png(overlay_dir / f"{label}_{rank:02d}_{cand.key}.png", cand.image))
    per_sample = out / "per_sample.jsonl"
    with per_sample.open("w") as f:
        for rec in result.records:
            f.write(json.dumps(rec) + "\n")
    summary = summarize(result)
    summary.update({
        "checkpoint": recon.source,
        "checkpoint_step": int(recon.payload.get("step", 0)),
        "shards": manifest.url,
        "split": cfg.split,
        # what the network read beside each view: its parse net's masks (the paper's pipeline, what
        # every real input gets), or the samples' own (a model trained with model.input_masks=given)
        "input_masks": ("parse_net" if reads_parse_net_masks(recon.cfg.model)
                        else "given" if recon.cfg.model.mask_input else "none"),
        "split_samples": n_total,
        **({"fit_steps": cfg.fit_steps, "fit_from": cfg.fit_from, "fit_landmarks": cfg.fit_landmarks}
           if cfg.fit_steps else {}),
        "skipped": [s.to_dict() for s in result.skipped],
        "n_skipped": len(result.skipped),
        "ray": use_ray,
        "chunks": len(chunks),
        "seconds": elapsed,
        "out": str(out),
        "per_sample": str(per_sample),
        "overlays": [str(p) for p in overlays],
    })
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    for s in result.skipped:
        _logger.warning("skipped %s", s.message())
    return EvalReport(summary=summary, records=result.records, skipped=result.skipped, out=out, overlays=overlays)


__all__ = ["ChunkResult", "EvalConfig", "checkpoint_slug", "evaluate", "evaluate_items", "merge", "resolve_device"]
