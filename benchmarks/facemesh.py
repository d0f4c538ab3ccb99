"""The face mesh's landmarks and part masks against the truth of synthetic renders.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/facemesh.py [--subjects 20] [--captures 2]
        [--sizes 256,64] [--yaw 0,30,45,60] [--no-dlib] [--dlib-subjects 6] [--json]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/facemesh.py --pictures docs/img

Renders of the procedural face model (:mod:`dfmvr.data.synth`: random identity, expression,
lighting, background and pose jitter) at each ``|yaw|``, both signs, with their true 68
landmarks and parsing masks. On each render:

- **mesh**: :class:`dfmvr.facemesh.FaceMesh` seeded from the true five corner points, its 68
  points (:func:`dfmvr.facemesh.points68`) against the truth. NME is the mean point error over
  the distance between the outer eye corners (iBUG 36 and 45), for all 68 points, the 51 without
  the jaw, and the jaw's 17 (whose definitions differ, ``MESH_TO_IBUG68``).
- **pipeline** (256 px, the first ``--dlib-subjects``, unless ``--no-dlib``):
  :class:`dfmvr.detect.FaceDetector` as photos get it (dlib's HOG, the CNN when HOG finds
  nothing, dlib's five points, the mesh from them), on the render framed by a random background
  of 1.5 times its side: faces found, the median NME of dlib's five points and of the mesh's
  five corners against the true corners, and of the mesh's 68 points.
- **masks**: per-class IoU over all renders of a yaw (one confusion matrix) of
  :func:`dfmvr.facemesh.part_masks` and of the builtin parse net (``model.parse_net=builtin``,
  trained on such renders at 64 px; :func:`dfmvr.train.parsing.predict_masks` resizes to it).
- **ms per face**: the mesh's two passes (crops included), the rasteriser, the parse net at
  one thread.

``--pictures DIR`` instead writes overlays (the mesh's points, its 68 points, its part masks)
on the real photos that installed packages ship (matplotlib's Grace Hopper; scikit-image's
astronaut when it is installed) and on a render at yaw 45 beside its truth.

``--json`` prints one JSON object as the last line: per size and ``|yaw|`` under ``results``,
timings under ``ms``, the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_record  # noqa: E402

from dfmvr.data.align import corner_points  # noqa: E402
from dfmvr.facemesh import FaceMesh, part_masks, points68  # noqa: E402
from dfmvr.facemodel.model import PARSE_CLASSES  # noqa: E402
from dfmvr.train.parsing import class_iou, confusion_matrix, predict_masks  # noqa: E402

JAW, INNER = slice(0, 17), slice(17, 68)


def render_set(*, size: int, yaws: list[float], subjects: int, captures: int, seed: int) -> list[dict]:
    """Renders at every yaw of ``yaws`` (three per parameter set, as the generator makes them)."""
    from dfmvr.config import FaceModelConfig
    from dfmvr.data.synth import SynthConfig, default_n_vertices, render_views, sample_params
    from dfmvr.facemodel import build_face_model
    from dfmvr.render import Renderer
    from dfmvr.render.camera import Camera

    n_vertices = min(default_n_vertices(size), 12000)  # 12k renders 256 px cleanly at a third of the time
    model = build_face_model(FaceModelConfig(n_vertices=n_vertices))
    renderer = Renderer(Camera.at_size(size), backend="torch")
    out = []
    for s in range(subjects):
        for c in range(captures):
            for k in range(0, len(yaws), 3):
                chunk = yaws[k:k + 3]
                triple = tuple(chunk + [chunk[-1]] * (3 - len(chunk)))
                cfg = SynthConfig(out="unused", size=size, seed=seed, yaw_deg=triple, n_vertices=n_vertices)
                r = render_views(model, renderer, sample_params(model, cfg, s, c))
                out += [{"image": r.images[v], "mask": r.masks[v], "lmk": r.lmk2d[v].astype(np.float64),
                         "yaw": abs(chunk[v]), "subject": s} for v in range(len(chunk))]
    return out


def nme(points: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-point error over the outer-eye-corner distance of ``truth`` (iBUG-68)."""
    return np.linalg.norm(points - truth, axis=-1) / np.linalg.norm(truth[36] - truth[45])


def _iou(conf: torch.Tensor) -> dict:
    iou = class_iou(conf).numpy()
    return {"miou": round(float(np.nanmean(iou)), 4),
            "iou": {name: round(float(v), 4) for name, v in zip(PARSE_CLASSES, iou)}}


def _framed(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The render in the middle of a random background of 1.5 times its side, as a photo frames
    a face (a render fills its frame, and dlib's detectors miss most faces cut by the border):
    ``(photo, offset)`` with render pixel + offset = photo pixel."""
    from dfmvr.data.backgrounds import random_background

    s = image.shape[0]
    side = s * 3 // 2
    photo = (random_background(rng, side) * 255).round().astype(np.uint8)
    o = (side - s) // 2
    photo[o:o + s, o:o + s] = image
    return photo, np.array([o, o], np.float64)


def measure(renders: list[dict], mesh: FaceMesh, parse_net, detector, detector_subjects: int) -> tuple[dict, dict]:
    rng = np.random.default_rng(0)
    parsed = predict_masks(parse_net, np.stack([r["image"] for r in renders]))
    rows: dict[float, dict] = {}
    t_mesh, t_mask = [], []
    for r, parse_mask in zip(renders, parsed):
        row = rows.setdefault(r["yaw"], {"e68": [], "score": [], "conf_mesh": 0, "conf_net": 0,
                                         "tried": 0, "found": 0, "e5_dlib": [], "e5_mesh": [], "e68_pipe": []})
        t = time.perf_counter()
        found = mesh.landmarks(r["image"], corner_points(r["lmk"]))
        t_mesh.append(time.perf_counter() - t)
        row["e68"].append(nme(points68(found.points)[:, :2], r["lmk"]))
        row["score"].append(found.score)
        t = time.perf_counter()
        ours = part_masks(found.points, r["image"].shape)
        t_mask.append(time.perf_counter() - t)
        truth = torch.from_numpy(r["mask"])
        row["conf_mesh"] = row["conf_mesh"] + confusion_matrix(torch.from_numpy(ours), truth)
        row["conf_net"] = row["conf_net"] + confusion_matrix(torch.from_numpy(parse_mask), truth)
        if detector is not None and r["subject"] < detector_subjects:
            photo, offset = _framed(r["image"], rng)
            faces = detector.faces(photo)
            row["tried"] += 1
            if faces:
                face = faces[0]
                row["found"] += 1
                lmk = r["lmk"] + offset
                true5 = corner_points(lmk)
                scale = np.linalg.norm(lmk[36] - lmk[45])
                row["e5_dlib"].append(np.linalg.norm(face.points5 - true5, axis=1).mean() / scale)
                row["e5_mesh"].append(np.linalg.norm(corner_points(face.points68) - true5, axis=1).mean() / scale)
                row["e68_pipe"].append(nme(face.points68, lmk).mean())
    out = {}
    for yaw, row in sorted(rows.items()):
        e = np.stack(row["e68"])
        res = {"renders": len(e), "nme68": round(float(e.mean()), 4), "nme51": round(float(e[:, INNER].mean()), 4),
               "nme_jaw": round(float(e[:, JAW].mean()), 4), "score_min": round(float(np.min(row["score"])), 3),
               "mesh_masks": _iou(row["conf_mesh"]), "parse_net_masks": _iou(row["conf_net"])}
        if detector is not None:
            res["pipeline"] = {"renders": row["tried"], "found": row["found"]}
            if row["found"]:  # medians: a false HOG box (an eye on a dark render) ruins one face's every point
                res["pipeline"].update({k: round(float(np.median(row[k])), 4)
                                        for k in ("e5_dlib", "e5_mesh", "e68_pipe")})
        out[str(int(yaw))] = res
    return out, {"mesh_ms": 1e3 * float(np.median(t_mesh)), "part_masks_ms": 1e3 * float(np.median(t_mask))}


def _photos() -> dict[str, np.ndarray]:
    """Real photographs that installed packages ship: matplotlib's portrait of Grace Hopper and,
    when scikit-image is installed, its astronaut (Eileen Collins; NASA, public domain)."""
    import importlib.util

    import cv2
    import matplotlib

    paths = {"grace_hopper": Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"}
    spec = importlib.util.find_spec("skimage")
    if spec is not None and spec.submodule_search_locations:
        paths["astronaut"] = Path(list(spec.submodule_search_locations)[0]) / "data" / "astronaut.png"
    return {name: np.ascontiguousarray(cv2.imread(str(path))[..., ::-1]) for name, path in paths.items()
            if path.is_file()}


def _overlay(image: np.ndarray, points: np.ndarray, masks: list[np.ndarray], truth: np.ndarray | None = None,
             *, side: int = 288) -> np.ndarray:
    """Panels side by side at ``side`` px: the image with the mesh's 468 points (grey), its 68
    (green) and the true 68 (red, when given); then each of ``masks`` over the image."""
    import cv2

    from dfmvr.data.synth import PALETTE

    k = side / image.shape[0]
    big = cv2.resize(image, (round(image.shape[1] * k), side), interpolation=cv2.INTER_AREA)
    dots = big.copy()
    for x, y in points[:, :2] * k:
        cv2.circle(dots, (int(x), int(y)), 1, (200, 200, 200), -1)
    if truth is not None:
        for x, y in truth * k:
            cv2.circle(dots, (int(x), int(y)), 2, (255, 40, 40), -1)
    for x, y in points68(points)[:, :2] * k:
        cv2.circle(dots, (int(x), int(y)), 2, (40, 255, 40), -1)
    panels = [dots]
    for m in masks:
        m = cv2.resize(m, big.shape[1::-1], interpolation=cv2.INTER_NEAREST)
        blend = np.where(m[..., None] > 0, (0.45 * big + 0.55 * PALETTE[m]).astype(np.uint8), big)
        panels.append(blend)
    return np.concatenate(panels, 1)


def pictures(out: Path) -> list[Path]:
    """Under ``out``: ``facemesh_<photo>.png`` for the photos (the mesh's points, its part masks,
    the builtin parse net's masks, on the aligned crop that reconstruction makes) and
    ``facemesh_render45.png`` (the points with the truth's in red, the part masks, the true masks)."""
    import cv2

    from dfmvr.config import FaceModelConfig
    from dfmvr.data.align import AlignmentTemplate, transform_points
    from dfmvr.detect import FaceDetector, PhotoAligner
    from dfmvr.facemodel import build_face_model
    from dfmvr.nets.parsenet import load_parsenet

    out.mkdir(parents=True, exist_ok=True)
    template = AlignmentTemplate.from_face_model(build_face_model(FaceModelConfig(n_vertices=4000)), [0.0], 288)
    aligner = PhotoAligner(template, [0.0], FaceDetector(landmarker="mesh"), largest=True, views=("front",))
    parse_net = load_parsenet("builtin")
    png = [cv2.IMWRITE_PNG_COMPRESSION, 9]
    written = []
    for name, photo in _photos().items():
        # the crop reconstruction makes (dlib's five points onto the face model's frontal template)
        view = aligner.align([photo], name)[0]
        mesh = transform_points(view.matrix, view.face.mesh[:, :2])
        parsed = predict_masks(parse_net, view.image[None])[0]
        written.append(out / f"facemesh_{name}.png")
        cv2.imwrite(str(written[-1]), _overlay(view.image, mesh, [view.mesh_mask, parsed])[..., ::-1], png)
    r = render_set(size=256, yaws=[45.0], subjects=1, captures=1, seed=7)[0]
    found = FaceMesh().landmarks(r["image"], corner_points(r["lmk"]))
    panel = _overlay(r["image"], found.points, [part_masks(found.points, r["image"].shape), r["mask"]], r["lmk"],
                     side=256)
    written.append(out / "facemesh_render45.png")
    cv2.imwrite(str(written[-1]), panel[..., ::-1], png)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subjects", type=int, default=20)
    p.add_argument("--captures", type=int, default=2)
    p.add_argument("--sizes", default="256,64", help="render sides in pixels")
    p.add_argument("--yaw", default="0,30,45,60", help="|yaw| in degrees (each rendered at both signs)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--no-dlib", action="store_true", help="skip the detector pipeline")
    p.add_argument("--dlib-subjects", type=int, default=6,
                   help="the detector pipeline on the first this many subjects only (its CNN takes ~1 s a render)")
    p.add_argument("--pictures", default=None, metavar="DIR",
                   help="only write the overlay pictures (docs/img: facemesh_*.png) and stop")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.pictures:
        for path in pictures(Path(args.pictures)):
            print(f"{path} ({path.stat().st_size // 1024} KB)")
        return 0
    from dfmvr.nets.parsenet import load_parsenet

    yaws = sorted({s * float(y) for y in args.yaw.split(",") for s in (1, -1)})
    mesh = FaceMesh()
    parse_net = load_parsenet("builtin")
    detector = None
    if not args.no_dlib:
        from dfmvr.detect import FaceDetector
        detector = FaceDetector(landmarker="mesh")
    results, ms = {}, {}
    for size in (int(v) for v in args.sizes.split(",")):
        t = time.perf_counter()
        renders = render_set(size=size, yaws=yaws, subjects=args.subjects, captures=args.captures, seed=args.seed)
        render_s = time.perf_counter() - t
        t = time.perf_counter()
        predict_masks(parse_net, np.stack([r["image"] for r in renders]))
        net_ms = 1e3 * (time.perf_counter() - t) / len(renders)
        results[str(size)], times = measure(renders, mesh, parse_net, detector if size >= 128 else None,
                                            args.dlib_subjects)
        ms[str(size)] = {**{k: round(v, 2) for k, v in times.items()}, "parse_net_ms": round(net_ms, 2),
                         "render_s": round(render_s, 1)}
        for yaw, res in results[str(size)].items():
            pipe, nan = res.get("pipeline", {}), float("nan")
            pipe_txt = "" if not pipe else (
                f"  | dlib found {pipe['found']}/{pipe['renders']}, median NME 5 points dlib "
                f"{pipe.get('e5_dlib', nan):.4f} mesh {pipe.get('e5_mesh', nan):.4f}, "
                f"68 {pipe.get('e68_pipe', nan):.4f}")
            print(f"{size:3d} px yaw {yaw:>2}: NME68 {res['nme68']:.4f} NME51 {res['nme51']:.4f} "
                  f"jaw {res['nme_jaw']:.4f} score min {res['score_min']:.2f}  mIoU mesh "
                  f"{res['mesh_masks']['miou']:.3f} parse net {res['parse_net_masks']['miou']:.3f}{pipe_txt}")
        print(f"{size:3d} px ms per face: {ms[str(size)]}")
    if args.json:
        print(json.dumps({"benchmark": "facemesh", "args": vars(args), "results": results, "ms": ms,
                          "machine": machine_record()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
