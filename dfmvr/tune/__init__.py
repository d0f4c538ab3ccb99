"""Ray Tune sweeps over the training job: loss weights, backbone variants, the paper's ablations.

A sweep runs one Ray Tune trial per variant, seed and draw of the search space; every trial
fits the same ``TorchTrainer`` as ``jobs/train.py`` (:func:`dfmvr.train.launch.build_trainer`)
and is tracked as an MLflow child run of the sweep's parent run. At the end the sweep writes a
results table and bar chart to its folder and logs them to the parent run.

- :mod:`dfmvr.tune.settings`: the ``tune`` config section (imported by :mod:`dfmvr.config`).
- :mod:`dfmvr.tune.space`: the search-space mini-language (``loguniform(4,64)``, ...).
- :mod:`dfmvr.tune.presets`: named sweeps (``ablation``, ``loss-weights``, ``angles``).
- :mod:`dfmvr.tune.trial`: what runs in each trial.
- :mod:`dfmvr.tune.runs`: the MLflow parent and child runs.
- :mod:`dfmvr.tune.callback`: the driver's Tune callback (result journal, closing child runs).
- :mod:`dfmvr.tune.journal`: the result journal and an ASHA that survives ``Tuner.restore``.
- :mod:`dfmvr.tune.results`: the table and chart.
- :mod:`dfmvr.tune.angles`: test sets rendered at other side-view angles (``angles`` preset).
- :mod:`dfmvr.tune.sweep`: the driver (``run_sweep``), used by ``jobs/tune.py``.

This package's ``__init__`` imports nothing heavy: :mod:`dfmvr.config` imports its settings.
"""
