"""The model bundle in MLflow: the pyfunc class the MLflow UI's model serves, and registration.

A training job's best checkpoint directory (weights, the parse net, the face-model signature,
the config: :mod:`dfmvr.train.checkpoint`) is logged as an MLflow pyfunc model
(:class:`DFMVRPyfunc`, which loads it with :mod:`dfmvr.serving`), registered as a new version
of the registered model, and the ``champion`` alias moves to it when it beats the current
champion's ``val/rmse_mm`` (:func:`register_best`). Above both loading (:mod:`dfmvr.serving`)
and MLflow's helpers (:mod:`dfmvr.tracking`), so neither imports the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import torch

from dfmvr.inputs import prepare_capture, to_model_tensor
from dfmvr.serving import Reconstructor
from dfmvr.tracking import CHAMPION_ALIAS, MODEL_ARTIFACT, VAL_METRIC


class DFMVRPyfunc(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc over a model bundle.

    ``predict({"images": uint8 [B, 3, H, H, 3]})`` (left, front, right; square aligned crops of
    any side, resized to the model's) -> ``{"vertices": float32 [B, N, 3]`` (model frame,
    decimetres), ``"faces": int [F, 3]``, ``"coeffs": float32 [B, 269]}``. Masks (``"masks":
    uint8 [B, 3, H, H]``) are optional: the bundled parse net makes them.
    """

    def load_context(self, context) -> None:
        self.reconstructor = Reconstructor.from_checkpoint(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params=None):
        if not isinstance(model_input, dict) or "images" not in model_input:
            raise ValueError(f"model input: expected a dict with 'images' (uint8 [B, 3, H, H, 3]), "
                             f"got {type(model_input).__name__}")
        raw = np.asarray(model_input["images"])
        if raw.ndim != 5 or raw.shape[1] != 3:
            raise ValueError(f"model input 'images': expected uint8 [B, 3, H, H, 3], got shape {list(raw.shape)}")
        masks = model_input.get("masks")
        prepared = [prepare_capture(raw[b], None if masks is None else masks[b], self.reconstructor.model.image_size,
                                    f"capture {b}") for b in range(len(raw))]
        images = to_model_tensor(np.stack([v for v, _ in prepared]))
        mask_t = torch.from_numpy(np.stack([m for _, m in prepared])) if masks is not None else None
        out = self.reconstructor.predict(images, mask_t)
        return {"vertices": out.shape.cpu().numpy(), "faces": self.reconstructor.model.face.model.tri.cpu().numpy(),
                "coeffs": out.coeffs.cpu().numpy()}


def dfmvr_requirement() -> str:
    """The pip requirement that installs exactly the dfmvr running now: ``dfmvr @ file:///...`` for
    a local checkout or wheel (PEP 610 ``direct_url.json``), else ``dfmvr==VERSION``; never a bare
    ``dfmvr`` that a package index could satisfy with someone else's package."""
    import json
    from importlib import metadata

    try:
        dist = metadata.distribution("dfmvr")
    except metadata.PackageNotFoundError:
        raise RuntimeError("dfmvr is not installed (pip install -e .): the logged model could not name it") from None
    direct = dist.read_text("direct_url.json")
    if direct:
        url = json.loads(direct).get("url")
        if url:
            return f"dfmvr @ {url}"
    return f"dfmvr=={dist.version}"


def _version_score(client, name: str, version: str) -> float | None:
    tags = client.get_model_version(name, version).tags or {}
    try:
        return float(tags[VAL_METRIC])
    except (KeyError, ValueError):
        return None


def register_best(run_id: str, checkpoint_dir: str | Path, name: str, metrics: dict[str, float]) -> dict[str, Any]:
    """Log ``checkpoint_dir`` (a whole model bundle: weights, parse net, face-model signature,
    config) as an MLflow pyfunc model in ``run_id``, register it as a new version of ``name`` and
    move alias ``champion`` to it when its ``val/rmse_mm`` beats the current champion's (or there
    is none).

    Returns:
        ``model_uri`` (``runs:/...``), ``registered_uri`` (``models:/NAME/VERSION`` or None),
        ``version``, ``champion`` (True when the alias moved here), ``champion_uri``
        (``models:/NAME@champion``), ``previous_champion`` (version or None) and its score.
    """
    import mlflow

    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=DFMVRPyfunc(),
            artifacts={"checkpoint": str(checkpoint_dir)},
            pip_requirements=[dfmvr_requirement()],
            metadata={"val_metrics": metrics},
        )
    out: dict[str, Any] = {"model_uri": f"runs:/{run_id}/{MODEL_ARTIFACT}", "logged_model_uri": info.model_uri,
                           "registered_uri": None, "version": None, "champion": False, "champion_uri": None,
                           "previous_champion": None, "previous_champion_score": None}
    if not name:
        return out
    from mlflow.exceptions import MlflowException

    mv = mlflow.register_model(info.model_uri, name, tags={k: f"{v:.6g}" for k, v in metrics.items()})
    client = mlflow.MlflowClient()
    desc = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    client.update_model_version(name, mv.version, description=f"run {run_id}: {desc}")
    out["registered_uri"] = f"models:/{name}/{mv.version}"
    out["version"] = str(mv.version)
    try:
        current = str(client.get_model_version_by_alias(name, CHAMPION_ALIAS).version)
    except MlflowException:
        current = None
    score = metrics.get(VAL_METRIC)
    best = _version_score(client, name, current) if current is not None else None
    out["previous_champion"], out["previous_champion_score"] = current, best
    if score is not None and (current is None or best is None or float(score) < best):
        client.set_registered_model_alias(name, CHAMPION_ALIAS, mv.version)
        out["champion"] = True
    out["champion_uri"] = f"models:/{name}@{CHAMPION_ALIAS}"
    return out


__all__ = ["DFMVRPyfunc", "dfmvr_requirement", "register_best"]
