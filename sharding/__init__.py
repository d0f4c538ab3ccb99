"""Dataset packing: synthetic triplets and real multi-view captures into WebDataset shards.

- ``python -m sharding.synth``: render synthetic (left, front, right) triplets of procedural
  faces with ground-truth masks, landmarks, meshes and coefficients (:mod:`dfmvr.data.synth`).
- ``python -m sharding.pack``: crop, align and pack real captures from a folder
  (generic, Pixel-Face, Multi-PIE or Bosphorus layouts; :mod:`sharding.pack`).

Both write through :mod:`dfmvr.data.shards` to a local directory or ``s3://bucket/prefix``.
"""
