"""What every job script shares: building the config from preset, YAML files and overrides, and
printing the final summary."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from dfmvr.config import Config, apply_overrides, load_yaml, parse_cli_overrides
from dfmvr.presets import get_preset


def build_config(overrides: Sequence[str], yaml_files: Sequence[str] = (), *,
                 default_preset: str = "tiny") -> tuple[Config, str]:
    """``preset=NAME`` picks the base (default ``default_preset``), YAML files apply next, then
    the dotted ``key=value`` overrides. Returns the config and a one-line note of what was applied.

    Raises:
        KeyError / ValueError: an unknown key or a bad value, naming it.
    """
    flat = parse_cli_overrides(overrides)
    preset = flat.pop("preset", default_preset)
    cfg = get_preset(preset)
    for path in yaml_files:
        cfg = apply_overrides(cfg, load_yaml(path))
    cfg = apply_overrides(cfg, flat)
    check_registered(cfg)
    note = " ".join([f"preset={preset}", *(f"--config {p}" for p in yaml_files), *overrides])
    return cfg, note


def check_registered(cfg: Config) -> None:
    """The config's registry names (``model.backbone``, ``model.regressor``, ``parsenet.arch``) are
    registered; checked with the other values, before anything starts (the config module sits
    below the networks and cannot ask their registries itself).

    Raises:
        ValueError: naming the key, the value and the registered names.
    """
    from dfmvr.nets import list_backbones, list_parsenets, list_regressors

    for key, value, known in (("model.backbone", cfg.model.backbone, list_backbones()),
                              ("model.regressor", cfg.model.regressor, list_regressors()),
                              ("parsenet.arch", cfg.parsenet.arch, list_parsenets())):
        if value not in known:
            raise ValueError(f"{key}: expected one of {known}, got {value!r}")


def print_summary(title: str, summary: dict[str, Any]) -> None:
    """A short, aligned block at the end of a job (stdout, for people)."""
    print(f"\n== dfmvr {title} summary ==")
    width = max(len(k) for k in summary) if summary else 0
    for key, value in summary.items():
        if isinstance(value, float):
            value = f"{value:.4f}"
        print(f"  {key:<{width}}  {value}")


def finish_batch_job(title: str, shown: dict[str, Any], skipped: Sequence, noun: str,
                     summary_json: str | None, payload: dict[str, Any]) -> None:
    """A batch job's ending: the summary block, then every skipped item's message (a batch goes on
    past bad items and lists them here), then ``payload`` as JSON at ``summary_json`` if given."""
    print_summary(title, shown)
    if skipped:
        print(f"\nskipped {len(skipped)} {noun}(s):")
        for item in skipped:
            print(f"  {item.message()}")
    if summary_json:
        Path(summary_json).write_text(json.dumps(payload, indent=2))


def parse_job_args(description: str, argv: Sequence[str] | None = None, *,
                   add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                   ) -> tuple[argparse.Namespace, Config, str]:
    """The CLI every job shares: ``[preset=NAME] [--config F.yaml ...] [key=value ...]
    [--summary-json PATH]``, plus the job's own options (``add_arguments``). Sets up logging. A
    bad key or value prints ``error: ...`` and exits with status 2, before anything starts."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="preset=NAME and dotted key=value overrides")
    parser.add_argument("--config", action="append", default=[], help="YAML override file (repeatable)")
    parser.add_argument("--summary-json", help="write the final summary here as JSON")
    if add_arguments is not None:
        add_arguments(parser)
    # options may come between the key=value overrides (`preset=tiny --seeds 3 optim.lr=1e-4`)
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg, note = build_config(args.overrides, args.config, default_preset="tiny")
    except (KeyError, ValueError, FileNotFoundError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        raise SystemExit(2) from None
    return args, cfg, note


def overrides_of(args: argparse.Namespace) -> dict[str, Any]:
    """The YAML files' and the command line's dotted overrides (without ``preset``), for jobs
    that apply them on top of another config than the preset's (a checkpoint's own)."""
    flat: dict[str, Any] = {}
    for path in args.config:
        flat.update(load_yaml(path))
    flat.update(parse_cli_overrides(args.overrides))
    flat.pop("preset", None)
    return flat
