"""New captures in, meshes out: what ``jobs/reconstruct.py`` does, as a library.

Input: a folder of captures, one sub-folder per capture::

    ROOT/<capture>/left.png  front.png  right.png        (or .jpg; RGB face crops)
    ROOT/<capture>/left.mask.png ...                     optional parsing masks (0..9), all three or none

(a ROOT that itself holds ``left/front/right`` images is one capture), or a shard split
(:func:`reconstruct_shards`). Views are photos of any size and aspect by default: the face in
each is found and aligned to the model's crop (:class:`dfmvr.detect.PhotoAligner`, the
``detect`` extra; a side view where no face is found takes the front view's alignment, and the
summary says which). With ``aligned=True`` (``--aligned``) views must instead be square,
face-aligned crops like the shards' (the model's training input); square images of another side
are resized to the model's size (area interpolation down, linear up; masks nearest-neighbour),
anything else is refused. Captures without masks get them from the parse net
(``model.parse_net``) when the model takes masks.

Output, under ``out``, per capture (meshes in millimetres, model frame: x to the subject's
left, y up, z towards the camera)::

    <capture>/mesh.obj            geometry with albedo vertex colours (``v x y z r g b``)
    <capture>/mesh_albedo.ply     binary PLY, vertex colours = albedo
    <capture>/mesh_shaded.ply     binary PLY, vertex colours = albedo lit by the predicted SH
                                  lighting, as the front view sees it
    <capture>/coeffs.npz          all coefficients, split by the layout (id, exp, tex, gamma,
                                  angles [V, 3] radians, trans [V, 3] decimetres) and joined
    <capture>/mesh_photo.ply      binary PLY, vertex colours sampled from the views (photos when
                                  there are photos) where each vertex is seen best
    <capture>/landmarks3d.txt     68 iBUG landmarks, one ``x y z`` per line, mm, model frame
    <capture>/overlay.png         per view: input | render over input with predicted landmarks,
                                  rendered at the tile's size; with fitting a row for the
                                  network and one for the fitted result
    <capture>/photo_overlay.png   (photos) the render over each photo, rendered at the photo's
                                  resolution (rows as overlay.png)
    <capture>/photo_<view>.png    (photos) the final render over each photo at full size

With ``fit_steps`` (``--fit-steps N``) the network's prediction is refined against each capture's
own evidence (:mod:`dfmvr.fit`: landmarks given or found on the photos, the photometric and mask
terms, the regulariser); the files hold the fitted result and ``summary.json`` each term before
and after.

and for the whole run ``contact_sheet.png`` (every capture's three overlays, labelled) and
``summary.json`` (what was done and what was skipped, with reasons). A bad capture (a missing
or unreadable view, a non-square image, masks for only some views, no masks and no parse net,
a non-finite prediction) is skipped with a message naming its folder and the problem; the run
goes on with the rest.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import cv2
import numpy as np
import torch

from dfmvr.capture import Capture, fit_evidence, iter_folder, iter_shards
from dfmvr.data.align import invert_similarity, transform_points
from dfmvr.data.samples import Skipped
from dfmvr.data.shards import VIEWS
from dfmvr.facemodel.model import MM_PER_UNIT
from dfmvr.inputs import to_model_tensor
from dfmvr.model import reads_parse_net_masks
from dfmvr.pictures import crisp_crops, photo_colors, photo_view_overlay, render_views
from dfmvr.visualize import PRED_COLOR, blend_render, contact_sheet, draw_landmarks, label_strip, overlay_row, write_png

if TYPE_CHECKING:
    from dfmvr.serving import Reconstructor

_logger = logging.getLogger(__name__)

PHOTO_ROW_HEIGHT = 512
"""Height of each row of ``photo_overlay.png`` (the per-view ``photo_<view>.png`` are full size)."""


# --------------------------------------------------------------------------- mesh files


def write_obj(path: str | Path, vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray | None = None,
              comment: str = "") -> Path:
    """Wavefront OBJ: ``v x y z [r g b]`` (colours in 0..1, the common extension MeshLab and
    trimesh read), ``f`` 1-based.

    Args:
        vertices: ``[N, 3]``; faces: ``[F, 3]`` 0-based; colors: ``[N, 3]`` in [0, 1] or None.
    """
    path = Path(path)
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    lines = [f"# {line}" for line in comment.splitlines()]
    if colors is not None:
        colors = np.clip(np.asarray(colors, dtype=np.float64), 0, 1)
        lines += [f"v {x:.6f} {y:.6f} {z:.6f} {r:.4f} {g:.4f} {b:.4f}"
                  for (x, y, z), (r, g, b) in zip(vertices, colors)]
    else:
        lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in vertices]
    lines += [f"f {a} {b} {c}" for a, b, c in faces + 1]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_ply(path: str | Path, vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray,
              comment: str = "") -> Path:
    """Binary little-endian PLY with per-vertex RGB (uchar).

    Args:
        vertices: ``[N, 3]``; faces: ``[F, 3]`` 0-based; colors: ``[N, 3]`` in [0, 1].
    """
    path = Path(path)
    vertices = np.asarray(vertices, dtype=np.float32)
    faces = np.asarray(faces, dtype=np.int32)
    rgb = (np.clip(np.asarray(colors, dtype=np.float64), 0, 1) * 255 + 0.5).astype(np.uint8)
    header = ["ply", "format binary_little_endian 1.0"]
    header += [f"comment {line}" for line in comment.splitlines()]
    header += [f"element vertex {len(vertices)}", "property float x", "property float y", "property float z",
               "property uchar red", "property uchar green", "property uchar blue",
               f"element face {len(faces)}", "property list uchar int vertex_indices", "end_header"]
    vertex_rows = np.empty(len(vertices), dtype=[("p", "<f4", 3), ("c", "u1", 3)])
    vertex_rows["p"], vertex_rows["c"] = vertices, rgb
    face_rows = np.empty(len(faces), dtype=[("n", "u1"), ("i", "<i4", 3)])
    face_rows["n"], face_rows["i"] = 3, faces
    with path.open("wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        f.write(vertex_rows.tobytes())
        f.write(face_rows.tobytes())
    return path


# --------------------------------------------------------------------------- the run


@dataclass(kw_only=True, slots=True)
class ReconstructConfig:
    """How a reconstruction run writes its outputs."""

    out: str
    """Output folder (created)."""
    batch_size: int = 8
    """Captures per forward pass."""
    tile: int = 192
    """Side of each tile in ``overlay.png``, pixels (views are upsampled to it)."""
    sheet_max: int = 60
    """Captures shown on the contact sheet (the first ones); 0: no sheet."""
    sheet_columns: int = 3
    """Captures per row of the contact sheet."""
    aligned: bool = False
    """Views are aligned crops (today's shards' framing) instead of photos to detect faces in."""
    largest_face: bool = False
    """Photos with several faces: take the largest instead of skipping the capture."""
    fit_steps: int = 0
    """Test-time fitting steps after the network (:mod:`dfmvr.fit`); 0: the network alone."""
    fit_from: str = "network"
    """Where fitting starts: ``network`` (its prediction) or ``mean`` (the mean face: fitting alone)."""

    def __post_init__(self) -> None:
        if self.fit_steps < 0:
            raise ValueError(f"fit_steps: expected >= 0, got {self.fit_steps}")
        if self.fit_from not in ("network", "mean"):
            raise ValueError(f"fit_from: expected 'network' or 'mean', got {self.fit_from!r}")
        if not self.out:
            raise ValueError("out: expected an output folder, got ''")
        for name in ("batch_size", "tile", "sheet_columns"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.sheet_max < 0:
            raise ValueError(f"sheet_max: expected >= 0, got {self.sheet_max}")


@dataclass(kw_only=True, slots=True)
class ReconstructSummary:
    """What a run did (``summary.json``)."""

    checkpoint: str
    out: str
    done: list[dict] = field(default_factory=list)
    """``{"name", "source", "dir"}`` per capture written (and ``"alignment"`` for photos)."""
    skipped: list[Skipped] = field(default_factory=list)
    contact_sheet: str | None = None

    def to_dict(self) -> dict:
        return {"checkpoint": self.checkpoint, "out": self.out, "n_done": len(self.done),
                "n_skipped": len(self.skipped), "contact_sheet": self.contact_sheet,
                "units": "mm", "frame": "model (x subject's left, y up, z towards the camera)",
                "done": self.done, "skipped": [s.to_dict() for s in self.skipped]}


def _view_rows(recon: "Reconstructor", capture: Capture, outs: list[tuple[str, object, int]], tile: int) -> np.ndarray:
    """``overlay.png``: per result (network, fitted) one row of input | render over input per
    view, rendered at ``tile`` px (not a model-size render scaled up)."""
    size = recon.model.image_size
    crops = crisp_crops(capture.images, tile, capture.photos, capture.matrices)
    given = None if capture.lmk2d is None else capture.lmk2d * (tile / size)
    rows = []
    for label, out, b in outs:
        renders, covers, _ = render_views(recon.model, out.posed[b], out.colors[b], tile)
        rows.append(overlay_row(crops, renders, covers, out.lm2d[b].cpu().numpy() * (tile / size), given, tile=tile,
                                title=f"{capture.name}, {label}: input | render (red: its landmarks"
                                      + ("" if given is None else ", green: found)" if capture.photos is not None
                                         else ", green: given)")))
    return np.concatenate(rows, axis=0)


def _photo_rows(recon: "Reconstructor", folder: Path, capture: Capture, outs: list[tuple[str, object, int]],
                height: int = PHOTO_ROW_HEIGHT) -> np.ndarray:
    """``photo_overlay.png`` (per result a row of the three photos with the render over them,
    rendered at each photo's resolution, shown at ``height``) and, for the last result,
    ``photo_<view>.png`` at the photo's own resolution."""
    rows = []
    for k, (label, out, b) in enumerate(outs):
        tiles = []
        for v, (photo, m) in enumerate(zip(capture.photos, capture.matrices)):
            over, side = photo_view_overlay(recon.model, np.asarray(photo, np.uint8), m, out.posed[b, v],
                                            out.colors[b, v])
            if k == len(outs) - 1:
                write_png(folder / f"photo_{VIEWS[v]}.png", over)
            scale = height / over.shape[0]
            small = cv2.resize(over, (max(1, round(over.shape[1] * scale)), height), interpolation=cv2.INTER_AREA)
            lm = transform_points(invert_similarity(m), out.lm2d[b, v].cpu().numpy())
            tiles.append(draw_landmarks(small, lm, PRED_COLOR, scale, max(1, height // 150)))
        rows.append(label_strip(np.concatenate(tiles, axis=1), f"{capture.name}, {label}: render over the photos"))
    width = max(r.shape[1] for r in rows)
    return np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows])


def capture_files(recon: "Reconstructor", folder: Path, out, b: int, capture: Capture, tile: int,
                  network=None) -> np.ndarray:
    """Write one capture's files from batch row ``b`` of ``out`` (a rendered ReconOutput; with
    ``network``, the network's own output before fitting, shown beside it).

    Returns:
        uint8 ``[V, S, S, 3]``: the render over each view (for the contact sheet; no landmarks,
        which would hide the fit at thumbnail size).
    """
    fm = recon.model.face.model
    folder.mkdir(parents=True, exist_ok=True)
    verts_mm = out.shape[b].cpu().numpy().astype(np.float64) * MM_PER_UNIT
    faces = fm.tri.cpu().numpy()
    albedo = out.albedo[b].clamp(0, 1).cpu().numpy()
    front = VIEWS.index("front")
    shaded = out.colors[b, front].clamp(0, 1).cpu().numpy()
    how = "fitted to the views" if network is not None else "the network's prediction"
    note = (f"dfmvr reconstruction of {capture.name} ({capture.source}), {how}\ncheckpoint {recon.source}\n"
            f"face model {fm.name}; units mm; model frame: x subject's left, y up, z towards the camera")
    flat = note.replace("\n", "; ")
    write_obj(folder / "mesh.obj", verts_mm, faces, albedo, note)
    write_ply(folder / "mesh_albedo.ply", verts_mm, faces, albedo, flat + "; colours: albedo")
    write_ply(folder / "mesh_shaded.ply", verts_mm, faces, shaded, flat + "; colours: shaded (predicted lighting, front view)")
    views = capture.photos if capture.photos is not None else list(capture.images)
    photo_rgb, _ = photo_colors(recon.model, out.posed[b], views, capture.matrices, fallback=albedo)
    write_ply(folder / "mesh_photo.ply", verts_mm, faces, photo_rgb,
              flat + "; colours: sampled from the views where each vertex is seen best (albedo where none sees it)")
    parts = out.parts
    np.savez(folder / "coeffs.npz", coeffs=out.coeffs[b].cpu().numpy(),
             **{name: getattr(parts, name)[b].cpu().numpy() for name in ("id", "exp", "tex", "gamma", "angles", "trans")},
             views=np.array(VIEWS), face_model=np.array(fm.name),
             checkpoint=np.array(recon.source))
    lm3d = verts_mm[fm.keypoints.cpu().numpy()]
    np.savetxt(folder / "landmarks3d.txt", lm3d, fmt="%.4f",
               header=f"68 iBUG landmarks of {capture.name}: x y z in mm, model frame")
    outs = ([("network", network, b), ("fitted", out, b)] if network is not None else [("network", out, b)])
    write_png(folder / "overlay.png", _view_rows(recon, capture, outs, tile))
    if capture.photos is not None:
        write_png(folder / "photo_overlay.png", _photo_rows(recon, folder, capture, outs))
    renders = out.image[b].permute(0, 2, 3, 1).cpu().numpy()
    covers = out.render_mask[b, :, 0].cpu().numpy()
    return np.stack([blend_render(capture.images[v], renders[v], covers[v]) for v in range(len(VIEWS))])


def _batches(items: Iterable[Capture | Skipped], size: int, skipped: list[Skipped]) -> Iterator[list[Capture]]:
    batch: list[Capture] = []
    for item in items:
        if isinstance(item, Skipped):
            _logger.warning("skipping %s", item.message())
            skipped.append(item)
            continue
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _fit(recon: "Reconstructor", ready: list[Capture], images: torch.Tensor, out, cfg: ReconstructConfig):
    """Fit a batch of captures (:mod:`dfmvr.fit`) on what :func:`dfmvr.capture.fit_evidence` gives,
    from the network's prediction or the mean face."""
    from dfmvr.fit import FitConfig

    masks, lmk = fit_evidence(ready, images, recon.make_masks)
    no_lmk = [c.name for c in ready if c.lmk2d is None]
    if no_lmk:
        _logger.warning("fitting without landmarks (none given or found): %s", ", ".join(no_lmk))
    fit_cfg = FitConfig(steps=cfg.fit_steps, start=cfg.fit_from)
    return recon.fit(images, masks, lmk, init=out.coeffs if cfg.fit_from == "network" else None, cfg=fit_cfg)


def _fit_record(fitted, b: int, cfg: ReconstructConfig, n: int) -> dict:
    """A capture's fit in ``summary.json``: each term (unweighted) and the weighted total, before and after."""
    return {"steps": cfg.fit_steps, "start": cfg.fit_from, "seconds_per_capture": round(fitted.seconds / n, 3),
            "before": {k: round(x, 6) for k, x in fitted.before[b].items()},
            "after": {k: round(x, 6) for k, x in fitted.after[b].items()}}


def reconstruct_captures(recon: "Reconstructor", captures: Iterable[Capture | Skipped],
                         cfg: ReconstructConfig) -> ReconstructSummary:
    """Reconstruct every capture and write its files (see the module docstring).

    Returns:
        The summary (also written to ``<out>/summary.json``).
    """
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = ReconstructSummary(checkpoint=recon.source, out=str(out_dir))
    needs_masks = recon.cfg.model.mask_input and not reads_parse_net_masks(recon.cfg.model)
    if needs_masks and recon.parse_net is None:
        _logger.warning("model takes masks and no parse net is loaded (model.parse_net): captures without "
                        "masks will be skipped")
    sheet: list[tuple[str, np.ndarray]] = []
    seen: set[str] = set()
    for batch in _batches(captures, cfg.batch_size, summary.skipped):
        ready = []
        for cap in batch:
            if cap.name in seen:
                summary.skipped.append(Skipped(name=cap.name, source=cap.source,
                                               reason="another capture of this name was already written"))
            elif needs_masks and cap.masks is None and recon.parse_net is None:
                summary.skipped.append(Skipped(
                    name=cap.name, source=cap.source,
                    reason="no masks (left/front/right.mask.png) and no parse net (model.parse_net) to make "
                           "them; this model takes masks"))
            else:
                ready.append(cap)
                seen.add(cap.name)
        if not ready:
            continue
        images = to_model_tensor(np.stack([c.images for c in ready]))
        masks = None
        if needs_masks:
            missing = [i for i, c in enumerate(ready) if c.masks is None]
            masks = torch.zeros(images.shape[0], images.shape[1], *images.shape[-2:], dtype=torch.long)
            for i, c in enumerate(ready):
                if c.masks is not None:
                    masks[i] = torch.from_numpy(c.masks.astype(np.int64))
            if missing:
                masks[missing] = recon.make_masks(images[missing]).cpu()
        out = recon.predict(images, masks, render=True)
        network, fitted = None, None
        if cfg.fit_steps:
            network, fitted = out, _fit(recon, ready, images, out, cfg)
            out = fitted.output
        finite = torch.isfinite(out.coeffs).all(1) & torch.isfinite(out.shape).flatten(1).all(1)
        for b, cap in enumerate(ready):
            if not bool(finite[b]):
                summary.skipped.append(Skipped(name=cap.name, source=cap.source,
                                               reason="the model's prediction is not finite (NaN or inf)"))
                continue
            folder = out_dir / cap.name
            try:
                views = capture_files(recon, folder, out, b, cap, cfg.tile, network)
            except OSError as e:
                summary.skipped.append(Skipped(name=cap.name, source=cap.source, reason=f"cannot write outputs: {e}"))
                continue
            summary.done.append({"name": cap.name, "source": cap.source, "dir": str(folder),
                                 **({"alignment": cap.alignment} if cap.alignment else {}),
                                 **({"fit": _fit_record(fitted, b, cfg, len(ready))} if fitted is not None else {})})
            if len(sheet) < cfg.sheet_max:
                sheet.append((cap.name, views))
        _logger.info("reconstructed %d captures (%d skipped)", len(summary.done), len(summary.skipped))
    if sheet:
        path = write_png(out_dir / "contact_sheet.png", contact_sheet(sheet, columns=cfg.sheet_columns))
        summary.contact_sheet = str(path)
    (out_dir / "summary.json").write_text(json.dumps(summary.to_dict(), indent=1))
    for s in summary.skipped:
        _logger.warning("skipped %s", s.message())
    return summary


def reconstruct_folder(recon: "Reconstructor", root: str | Path, cfg: ReconstructConfig) -> ReconstructSummary:
    """Reconstruct every capture folder under ``root`` (see the module docstring): photos, or
    aligned crops with ``cfg.aligned``.

    Raises:
        dfmvr.detect.DetectExtraMissing: photos, and the ``detect`` extra is not installed.
    """
    aligner = None if cfg.aligned else recon.photo_aligner(largest=cfg.largest_face)
    return reconstruct_captures(recon, iter_folder(root, recon.model.image_size, aligner), cfg)


def reconstruct_shards(recon: "Reconstructor", url: str, split: str, cfg: ReconstructConfig, *,
                       endpoint: str | None = None, max_samples: int = 0) -> ReconstructSummary:
    """Reconstruct every sample of a shard split (given landmarks drawn green on the overlays)."""
    return reconstruct_captures(recon, iter_shards(url, split, recon.model.image_size, endpoint=endpoint,
                                                   max_samples=max_samples), cfg)


__all__ = [
    "ReconstructConfig", "ReconstructSummary", "reconstruct_captures", "reconstruct_folder", "reconstruct_shards",
    "write_obj", "write_ply",
]
