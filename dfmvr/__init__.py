"""dfmvr: production training system for DF-MVR (weakly supervised multi-view 3D face reconstruction).

Shape vocabulary used in every docstring: ``B`` batch, ``V`` views (left, front, right in that
order), ``N`` vertices, ``F`` faces, ``K`` landmarks, ``H, W`` image size (square, ``S``).
Units: face-model units are decimetres (1 unit = 100 mm); image coordinates are pixels with
x right and y down. Frames: *model* (the face model's own, x to the subject's left, y up,
z towards the viewer), *world* (after the per-view rigid pose; the camera sits at z = 10 looking
down -z), *image* (pixels).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``dfmvr.load`` without importing torch, MLflow and the model on ``import dfmvr``
    if name == "load":
        from dfmvr.serving import load

        return load
    raise AttributeError(f"module 'dfmvr' has no attribute {name!r}")


__all__ = ["load"]
