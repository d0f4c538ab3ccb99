"""``python -m sharding.synth``: the synthetic dataset generator's command line.

The generator itself is :mod:`dfmvr.data.synth` (the training job makes the embedded default's
data with it, and the library does not import ``sharding``); see its docstring for the options.
"""

from __future__ import annotations

import sys

from dfmvr.data.synth import main

if __name__ == "__main__":
    sys.exit(main())
