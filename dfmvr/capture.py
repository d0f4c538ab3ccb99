"""One capture's three views, ready for the model: from a folder of photos or aligned crops, or
from a shard split (what ``jobs/reconstruct.py`` reads; formats in :mod:`dfmvr.reconstruct`).

A capture folder holds ``left``, ``front`` and ``right`` images (``.png``, ``.jpg`` or
``.jpeg``) and optionally ``left.mask.png`` ... (all three or none). Photos of any size are
aligned to the model's crop by a :class:`dfmvr.detect.PhotoAligner` (landmarks and part masks
of the face mesh come along); aligned crops are resized to the model's size. Everything that is
wrong with a capture is a :class:`dfmvr.inputs.CaptureError` naming its folder or file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import cv2
import numpy as np
import torch

from dfmvr.data.align import transform_points
from dfmvr.data.samples import Skipped
from dfmvr.data.shards import VIEWS
from dfmvr.facemesh import view_points68
from dfmvr.inputs import CaptureError, prepare_view, to_uint8

if TYPE_CHECKING:
    from dfmvr.detect import PhotoAligner

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")


@dataclass(kw_only=True, slots=True)
class Capture:
    """Three views of one face, ready for the model."""

    name: str
    """Capture name (folder name or sample key); the output folder's name."""
    source: str
    """Where it came from (folder path, or shard URL)."""
    images: np.ndarray
    """uint8 [V, S, S, 3] RGB at the model's size."""
    masks: np.ndarray | None = None
    """uint8 [V, S, S] parsing classes, or None (the parse net makes them)."""
    lmk2d: np.ndarray | None = None
    """float32 [V, 68, 2] given landmarks (pixels at size S), drawn in green on the overlay."""
    photos: list[np.ndarray] | None = None
    """The original photos (uint8 RGB, any size) when the views were aligned from photos."""
    matrices: np.ndarray | None = None
    """[V, 2, 3] photo pixels -> crop pixels, with ``photos``."""
    alignment: dict[str, str] | None = None
    """Per view, how it was aligned (detector and confidences, or another view's geometry)."""
    part_masks: np.ndarray | None = None
    """uint8 [V, S, S] parsing classes from the face mesh of each photo (every view's face found),
    or None: what fitting compares the render with, where the parse net (trained on renders)
    takes hair and hats for skin."""


def _read_image(path: Path, *, mask: bool) -> np.ndarray:
    flag = cv2.IMREAD_UNCHANGED if mask else cv2.IMREAD_COLOR
    image = cv2.imread(str(path), flag)
    if image is None:
        raise CaptureError(f"{path}: not a readable image")
    if not mask:
        image = np.ascontiguousarray(image[..., ::-1])
    return image


def _view_file(folder: Path, view: str) -> Path | None:
    found = [folder / f"{view}.{ext}" for ext in IMAGE_EXTENSIONS if (folder / f"{view}.{ext}").is_file()]
    if len(found) > 1:
        raise CaptureError(f"{folder}: {' and '.join(p.name for p in found)} are both there; keep one per view")
    return found[0] if found else None


def load_capture(folder: str | Path, size: int, aligner: "PhotoAligner | None" = None) -> Capture:
    """Read one capture folder (see the module docstring): aligned crops, or photos aligned by
    ``aligner``.

    Raises:
        CaptureError: naming the folder or file: a view missing or unreadable, both a .png and a
            .jpg of one view, a non-square crop, masks for only some views, a bad mask, no face
            in any photo, several faces in a photo.
    """
    folder = Path(folder)
    files = {view: _view_file(folder, view) for view in VIEWS}
    missing = [view for view, f in files.items() if f is None]
    if missing:
        have = sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
        raise CaptureError(f"{folder}: missing view(s) {missing} (expected {'/'.join(VIEWS)}.png or .jpg; "
                           f"found {have[:12]})")
    mask_files = {view: folder / f"{view}.mask.png" for view in VIEWS}
    present = [view for view, f in mask_files.items() if f.is_file()]
    if present and len(present) != len(VIEWS):
        raise CaptureError(f"{folder}: masks for {present} only; give {'/'.join(VIEWS)}.mask.png for every "
                           "view or none (then the parse net makes them)")
    if aligner is not None:
        photos = [_read_image(files[v], mask=False) for v in VIEWS]
        masks = [_read_image(mask_files[v], mask=True) for v in VIEWS] if present else None
        return align_photos(aligner, folder.name, str(folder), photos, masks)
    images = np.stack([prepare_view(_read_image(files[v], mask=False), size, str(files[v])) for v in VIEWS])
    masks = None
    if present:
        masks = np.stack([prepare_view(_read_image(mask_files[v], mask=True), size, str(mask_files[v]), mask=True)
                          for v in VIEWS])
    return Capture(name=folder.name, source=str(folder), images=images, masks=masks)


def align_photos(aligner: "PhotoAligner", name: str, source: str, photos: list[np.ndarray],
                 masks: list[np.ndarray] | None = None) -> Capture:
    """A :class:`Capture` from three photos (uint8 RGB, any size; masks, if given, the photos'
    size) aligned by ``aligner``.

    Raises:
        CaptureError: no face in any view, several faces in one, a mask of another size.
    """
    from dfmvr.detect import ManyFacesError, NoFaceError

    if masks is not None:
        for v, photo, mask in zip(VIEWS, photos, masks):
            if mask.shape[:2] != photo.shape[:2]:
                raise CaptureError(f"{source}: {v} mask is {list(mask.shape[:2])}, its photo {list(photo.shape[:2])}")
    try:
        views = aligner.align(photos, source, masks)
    except (NoFaceError, ManyFacesError) as e:
        raise CaptureError(str(e)) from None
    lmk = np.full((len(views), 68, 2), np.nan, np.float32)
    for i, a in enumerate(views):
        if a.face is not None and a.face.points68 is not None:
            lmk[i] = transform_points(a.matrix, a.face.points68)
            if a.face.landmarker == "mesh":  # the mesh's jaw is not the visible outline on a turned face
                lmk[i] = view_points68(lmk[i], VIEWS[i])
    part = [a.mesh_mask for a in views]
    return Capture(name=name, source=source, images=np.stack([a.image for a in views]),
                   masks=None if masks is None else np.stack([a.mask for a in views]),
                   lmk2d=lmk if np.isfinite(lmk).any() else None,
                   part_masks=np.stack(part) if all(p is not None for p in part) else None,
                   photos=list(photos), matrices=np.stack([a.matrix for a in views]),
                   alignment={v: a.how for v, a in zip(VIEWS, views)})


def find_captures(root: str | Path) -> list[Path]:
    """Capture folders under ``root``: ``root`` itself when it holds view images, else its
    sub-folders (sorted; hidden ones ignored). Folders without any view are still listed, so
    that the run reports them instead of passing over them in silence."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"capture folder {root}: no such directory")
    if any(_has_any_view(root, view) for view in VIEWS):
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _has_any_view(folder: Path, view: str) -> bool:
    return any((folder / f"{view}.{ext}").is_file() for ext in IMAGE_EXTENSIONS)


def iter_folder(root: str | Path, size: int, aligner: "PhotoAligner | None" = None) -> Iterator[Capture | Skipped]:
    """Every capture under ``root`` (:func:`find_captures`), loaded, or :class:`Skipped`."""
    for folder in find_captures(root):
        try:
            yield load_capture(folder, size, aligner)
        except CaptureError as e:
            yield Skipped(name=folder.name, source=str(folder), reason=str(e))


def iter_shards(url: str, split: str, size: int, *, endpoint: str | None = None,
                max_samples: int = 0) -> Iterator[Capture | Skipped]:
    """Every sample of a shard split as a :class:`Capture` (with its landmarks), or :class:`Skipped`."""
    from dfmvr.data.shards import read_manifest
    from dfmvr.data.samples import make_decoder, plan_chunks, read_chunk

    manifest = read_manifest(url, endpoint=endpoint)
    decoder = make_decoder(manifest, size, with_gt=False)
    for chunk in plan_chunks(manifest, split, chunk_size=1 << 30, max_samples=max_samples):
        for item in read_chunk(chunk, decoder, endpoint=endpoint):
            if isinstance(item, Skipped):
                yield item
                continue
            images = to_uint8(item.images)
            yield Capture(name=item.key, source=chunk.url, images=images, masks=item.masks, lmk2d=item.lmk2d)


def fit_evidence(captures: list[Capture], images: torch.Tensor, make_masks
                 ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """What the fit of a batch of captures reads (:mod:`dfmvr.fit`): ``(masks [B, V, S, S] or None,
    lmk2d [B, V, 68, 2])``. Masks: each capture's given ones, else the face mesh's part masks of its
    photos, else ``make_masks`` (the parse net) for those only; None when no capture has its own
    (the fit then asks the parse net itself). Landmarks: given or found, NaN where none."""
    v = images.shape[1]
    lmk = torch.from_numpy(np.stack([c.lmk2d if c.lmk2d is not None else np.full((v, 68, 2), np.nan, np.float32)
                                     for c in captures]).astype(np.float32))
    own = [c.masks if c.masks is not None else c.part_masks for c in captures]
    if all(m is None for m in own):
        return None, lmk
    masks = torch.zeros(images.shape[0], v, *images.shape[-2:], dtype=torch.long)
    missing = [i for i, m in enumerate(own) if m is None]
    if missing:
        masks[missing] = make_masks(images[missing]).cpu()
    for i, m in enumerate(own):
        if m is not None:
            masks[i] = torch.from_numpy(m.astype(np.int64))
    return masks, lmk


__all__ = ["Capture", "IMAGE_EXTENSIONS", "align_photos", "fit_evidence", "find_captures", "iter_folder", "iter_shards", "load_capture"]
