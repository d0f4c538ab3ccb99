"""The search-space mini-language of ``tune.space``, checked against the config before any trial.

::

    tune.space.loss.photo=loguniform(4,64)          # log-uniform draw in [4, 64]
    tune.space.optim.lr=uniform(1e-4,3e-3)          # uniform draw
    tune.space.train.val_samples=randint(8,64)      # integer in [8, 64)
    tune.space.model.backbone=choice(cnn,unet,fusion)   # one of them, drawn per sample
    tune.space.model.regressor=grid(rednet50,resnet50)  # every one (crossed with other grids)
    tune.space.loss.mask_loss=false                 # a plain value: fixed in every trial

:func:`parse_space` turns ``{dotted key: text}`` into :class:`Distribution` objects: the key must
be a config field and every value must pass that field's type and range checks (grid and choice
values each; the two bounds of a range), so a typo fails here, naming the key, instead of in the
tenth trial. :meth:`Distribution.to_tune` gives the Ray Tune domain.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from dfmvr.config import Config, apply_overrides

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
"""The distribution names the parser knows."""

RESERVED = ("seed", "work_dir", "tune")
"""Keys a sweep sets itself (``seed`` from ``tune.seeds``), never searched."""

_CALL = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*\((.*)\)\s*$", re.S)


@dataclass(frozen=True, slots=True)
class Distribution:
    """One dimension of the search space."""

    key: str
    """Dotted config key (``loss.photo``)."""
    kind: str
    """``grid``, ``choice``, ``uniform``, ``loguniform``, ``randint`` or ``value`` (fixed)."""
    values: tuple[Any, ...]
    """The typed values (grid, choice, value) or the bounds ``(low, high)`` (ranges)."""

    @property
    def is_random(self) -> bool:
        """Drawn anew for every sample (not a grid or a fixed value)."""
        return self.kind in ("choice", "uniform", "loguniform", "randint")

    def to_tune(self) -> Any:
        """The Ray Tune domain (``tune.grid_search([...])``, ``tune.loguniform(lo, hi)``, ...)."""
        from ray import tune

        if self.kind == "value":
            return self.values[0]
        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        lo, hi = self.values
        return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[self.kind](lo, hi)

    def describe(self) -> str:
        """``loss.photo=loguniform(4,64)``: how the dimension was written."""
        if self.kind == "value":
            return f"{self.key}={_text(self.values[0])}"
        return f"{self.key}={self.kind}({','.join(_text(v) for v in self.values)})"


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "(" + ",".join(_text(v) for v in value) + ")"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def split_args(text: str) -> list[str]:
    """``"a, (1,2), b"`` -> ``["a", "(1,2)", "b"]``: commas inside brackets do not split."""
    out, depth, current = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    tail = "".join(current).strip()
    if tail or out:
        out.append(tail)
    return out


def _get(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _typed(cfg: Config, key: str, raw: Any) -> Any:
    """``raw`` converted to the field's type and checked by its section (raises naming the key)."""
    try:
        return _get(apply_overrides(cfg, {key: raw}), key)
    except KeyError as e:
        raise KeyError(f"tune.space.{key}: not a config field ({e.args[0]})") from None
    except ValueError as e:
        raise ValueError(f"tune.space.{key}: value {raw!r} is not allowed ({e})") from None


def _check_registered(key: str, value: Any) -> None:
    """Backbone and regressor names must be registered: a typo would otherwise crash its trial."""
    if key not in ("model.backbone", "model.regressor"):
        return
    from dfmvr.nets.registry import list_backbones, list_regressors

    known = list_backbones() if key == "model.backbone" else list_regressors()
    if value not in known:
        raise ValueError(f"tune.space.{key}: expected one of {known}, got {value!r}")


def parse_distribution(cfg: Config, key: str, spec: Any) -> Distribution:
    """Parse one ``tune.space`` entry against ``cfg``.

    Raises:
        KeyError: ``key`` is not a config field (or is one a sweep sets itself).
        ValueError: an unknown distribution name, wrong arguments, or a value the field refuses;
            the message names ``tune.space.<key>``, the expected form and what was given.
    """
    if key in RESERVED or key.split(".")[0] in RESERVED:
        raise KeyError(f"tune.space.{key}: {key.split('.')[0]!r} is set by the sweep itself "
                       f"(seeds: tune.seeds), not searched; expected a model, loss, optim, data or train key")
    current = _get_or_none(cfg, key)
    if dataclasses.is_dataclass(current):
        raise KeyError(f"tune.space.{key}: {key!r} is a config section; expected one of its fields, e.g. "
                       f"{key}.{dataclasses.fields(current)[0].name}")
    current = _typed(cfg, key, current)
    match = _CALL.match(spec) if isinstance(spec, str) else None
    if match is None:
        value = _typed(cfg, key, spec)
        _check_registered(key, value)
        return Distribution(key=key, kind="value", values=(value,))
    name, body = match.group(1), match.group(2)
    if name not in DISTRIBUTIONS:
        raise ValueError(f"tune.space.{key}: unknown distribution {name!r} in {spec!r}; expected one of "
                         f"{list(DISTRIBUTIONS)}, e.g. loguniform(4,64) or choice(cnn,unet,fusion)")
    args = split_args(body)
    if name in ("grid", "choice"):
        if not args or any(a == "" for a in args):
            raise ValueError(f"tune.space.{key}: {name} expects one or more comma-separated values, got {spec!r}")
        values = tuple(_typed(cfg, key, a) for a in args)
        for v in values:
            _check_registered(key, v)
        return Distribution(key=key, kind=name, values=values)
    if len(args) != 2:
        raise ValueError(f"tune.space.{key}: {name} expects two bounds (low,high), got {spec!r}")
    if isinstance(current, bool) or not isinstance(current, (int, float)):
        raise ValueError(f"tune.space.{key}: {name} draws numbers, but the field holds "
                         f"{type(current).__name__} ({current!r}); use grid(...) or choice(...)")
    try:
        lo, hi = (float(a) for a in args)
    except ValueError:
        raise ValueError(f"tune.space.{key}: {name} expects numeric bounds, got {spec!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"tune.space.{key}: {name} expects finite bounds with low < high, got {spec!r}")
    if name == "loguniform" and lo <= 0:
        raise ValueError(f"tune.space.{key}: loguniform expects bounds > 0, got {spec!r}")
    if name == "randint":
        if not (lo.is_integer() and hi.is_integer()):
            raise ValueError(f"tune.space.{key}: randint expects integer bounds, got {spec!r}")
        if isinstance(current, float):
            raise ValueError(f"tune.space.{key}: randint draws integers for an integer field; this field holds "
                             f"a float ({current!r}); use uniform(...)")
        lo, hi = int(lo), int(hi)
        _typed(cfg, key, lo)
        _typed(cfg, key, hi - 1)  # randint's high is exclusive
        return Distribution(key=key, kind=name, values=(lo, hi))
    if isinstance(current, int):
        raise ValueError(f"tune.space.{key}: {name} draws floats, but the field holds an integer "
                         f"({current!r}); use randint(low,high)")
    _typed(cfg, key, lo)
    _typed(cfg, key, hi)
    return Distribution(key=key, kind=name, values=(lo, hi))


def _get_or_none(cfg: Config, key: str) -> Any:
    try:
        return _get(cfg, key)
    except AttributeError:
        return None


def parse_space(cfg: Config, space: Mapping[str, Any]) -> dict[str, Distribution]:
    """Every entry of ``space`` (``cfg.tune.space`` merged with a preset's) parsed, in order.

    Raises:
        KeyError / ValueError: as :func:`parse_distribution`, for the first bad entry.
    """
    return {key: parse_distribution(cfg, key, spec) for key, spec in space.items()}


def param_space(dists: Mapping[str, Distribution]) -> dict[str, Any]:
    """The ``"space"`` part of a Tune ``param_space``: ``{dotted key: domain}``."""
    return {key: d.to_tune() for key, d in dists.items()}


def label(values: Mapping[str, Any], dists: Mapping[str, Distribution]) -> str:
    """A short, stable name for a trial's point in the space (the searched keys only):
    ``backbone=unet photo=12.3``; empty when nothing is searched."""
    parts = []
    for key, d in dists.items():
        if d.kind == "value" or key not in values:
            continue
        v = values[key]
        text = f"{v:.3g}" if isinstance(v, float) else _text(v)
        parts.append(f"{key.split('.')[-1]}={text}")
    return " ".join(parts)
