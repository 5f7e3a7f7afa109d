"""Search spaces: YAML files in `tune_spaces/`, validated before any trial starts.

    description: free text
    samples: 8                 # default number of trials (--samples overrides); grids multiply it
    max_concurrent: 1          # default trials at once (--max-concurrent overrides)
    scheduler:                 # optional: ASHA early stopping on validation Recall@20
      type: asha               # or "none"
      max_epochs: 40           # max_t, in epochs
      grace_period: 5
      reduction_factor: 2
    fixed:                     # config values shared by every trial (section.key: value)
      train.epochs: 40
    params:                    # searched values (section.key: distribution)
      train.lr: {loguniform: [1.0e-4, 1.0e-2]}
      model.noise_steps: {lograndint: [10, 1000]}
      model.tc_weight: {uniform: [0.1, 1.0]}
      model.use_tc: {choice: [true, false]}
      train.seed: {grid: [1, 2, 3]}
      ablation: {grid: [gtc, id_only]}   # named switch sets, see ABLATIONS

Distributions: uniform, loguniform, randint, lograndint ([low, high]), choice, grid (lists).
Each key must be a real config key; values are type-checked against the config.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from gtc_ray.config import Config, apply_dict
from gtc_ray.errors import GtcInputError

# The pseudo-parameter `ablation` selects one of these named switch sets (spec ablations).
ABLATIONS = {
    "gtc": {},
    "no_diffusion": {"model.use_diffusion": False},
    "no_tc": {"model.use_tc": False},
    "pairwise_tc": {"model.tc_mode": "pairwise"},
    "no_gate": {"model.gate": "off"},
    "id_only": {"model.use_content": False},
}
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "lograndint", "choice", "grid")
TOP_KEYS = ("description", "samples", "max_concurrent", "scheduler", "fixed", "params")
SCHED_KEYS = ("type", "max_epochs", "grace_period", "reduction_factor")
# keys (besides graph.*) that decide what the driver builds once for all trials (train/ingest.py)
SHARED_BY_TRIALS = ("eval.mask_valid_in_test", "train.shard_item_work")


@dataclass
class SearchSpace:
    path: str
    params: dict  # dotted key -> (distribution, args)
    fixed: dict = field(default_factory=dict)  # dotted key -> value
    samples: int = 1
    max_concurrent: int = 1
    scheduler: dict | None = None
    description: str = ""

    def tune_param_space(self) -> dict:
        from ray import tune
        make = {"uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
                "randint": lambda a: tune.randint(a[0], a[1] + 1), "lograndint": lambda a: tune.lograndint(a[0], a[1] + 1),
                "choice": tune.choice, "grid": tune.grid_search}
        return {k: make[d](a) for k, (d, a) in self.params.items()}

    def config_for(self, base: Config, sampled: dict) -> Config:
        """The trial's full config: base, then `fixed`, then the sampled values."""
        cfg = copy.deepcopy(base)
        sampled = dict(sampled)
        extra = ABLATIONS[sampled.pop("ablation")] if "ablation" in sampled else {}
        for k, v in {**self.fixed, **extra, **sampled}.items():
            sec, key = k.split(".")
            apply_dict(cfg, {sec: {key: v}}, f"search space {self.path}: {k}")
        return cfg.validate()


def _err(path, where, problem, fix):
    return GtcInputError(f"search space {path}: {where}", problem, fix)


def _check_key(path, key) -> None:
    from dataclasses import fields
    cfg = Config()
    sections = {f.name for f in fields(Config)}
    if not isinstance(key, str) or key.count(".") != 1:
        raise _err(path, f"parameter {key!r}", "is not a section.key config name", "e.g. train.lr or model.tc_weight")
    sec, k = key.split(".")
    if sec not in sections:
        raise _err(path, f"parameter {key!r}", f"unknown config section {sec!r}",
                   f"valid sections are {', '.join(sorted(sections))}")
    valid = {f.name for f in fields(type(getattr(cfg, sec)))}
    if k not in valid:
        raise _err(path, f"parameter {key!r}", "unknown config key", f"valid keys of [{sec}] are {', '.join(sorted(valid))}")


def load_space(path: str | Path, base: Config | None = None) -> SearchSpace:
    p = Path(path)
    if not p.is_file():
        raise GtcInputError(f"search space {p}", "does not exist", "pass a YAML file from tune_spaces/ to --space")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise GtcInputError(f"search space {p}", f"is not valid YAML ({e})", "fix the YAML syntax") from e
    if not isinstance(data, dict):
        raise _err(p, "top level", "must be a mapping", f"use the keys {', '.join(TOP_KEYS)}")
    unknown = set(data) - set(TOP_KEYS)
    if unknown:
        raise _err(p, f"key {sorted(unknown)[0]!r}", "unknown top-level key", f"valid keys are {', '.join(TOP_KEYS)}")
    params = data.get("params") or {}
    if not isinstance(params, dict) or not params:
        raise _err(p, "params", "must be a non-empty mapping of config keys to distributions",
                   "e.g. params: {train.lr: {loguniform: [1.0e-4, 1.0e-2]}}")
    parsed = {}
    for key, spec in params.items():
        if key == "ablation":
            vals = spec.get("grid", spec.get("choice")) if isinstance(spec, dict) else None
            if not isinstance(vals, list) or not vals or any(v not in ABLATIONS for v in vals):
                raise _err(p, "parameter 'ablation'", f"needs a grid or choice of {list(ABLATIONS)}, got {spec!r}",
                           "e.g. ablation: {grid: [gtc, id_only]}")
            parsed[key] = (next(iter(spec)), vals)
            continue
        _check_key(p, key)
        if key.startswith("graph.") or key in SHARED_BY_TRIALS:
            raise _err(p, f"parameter {key!r}", "is fixed for the whole search: the driver prepares the graphs, "
                       "evaluation targets and feature blocks once and every trial shares them",
                       f"move {key} to `fixed:` (or --set), and run one search per value")
        if not isinstance(spec, dict) or len(spec) != 1:
            raise _err(p, f"parameter {key!r}", f"distribution {spec!r} must be a one-key mapping",
                       f"write e.g. {key}: {{uniform: [0.1, 1.0]}}")
        (dist, args), = spec.items()
        if dist not in DISTRIBUTIONS:
            raise _err(p, f"parameter {key!r}", f"unknown distribution {dist!r}", f"use one of {', '.join(DISTRIBUTIONS)}")
        if not isinstance(args, list):
            raise _err(p, f"parameter {key!r}", f"{dist} needs a list, got {args!r}",
                       "write the bounds or values as a YAML list, e.g. [0.1, 1.0]")
        if dist in ("choice", "grid"):
            if not args:
                raise _err(p, f"parameter {key!r}", f"{dist} has no values", "list at least one value")
            values = args
        else:
            if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
                raise _err(p, f"parameter {key!r}", f"{dist} needs [low, high] numbers, got {args!r}",
                           "give two numbers, low first")
            lo, hi = args
            if lo >= hi:
                raise _err(p, f"parameter {key!r}", f"bounds reversed or empty: low {lo} >= high {hi}",
                           "put the smaller bound first")
            if dist.startswith("log") and lo <= 0:
                raise _err(p, f"parameter {key!r}", f"{dist} needs low > 0, got {lo}", "use a positive lower bound")
            if dist in ("randint", "lograndint") and not (float(lo).is_integer() and float(hi).is_integer()):
                raise _err(p, f"parameter {key!r}", f"{dist} needs integer bounds, got {args!r}", "use integers")
            values = [lo, hi]
            args = [int(lo), int(hi)] if dist.endswith("randint") else [float(lo), float(hi)]
        for v in values:  # every value must be acceptable to the config (type and range)
            sec, k = key.split(".")
            try:
                apply_dict(Config(), {sec: {k: v}}, "probe").validate()
            except GtcInputError as e:
                raise _err(p, f"parameter {key!r}", f"value {v!r} is not valid ({e.problem})", e.fix) from None
        parsed[key] = (dist, args)
    fixed = data.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise _err(p, "fixed", "must be a mapping of config keys to values", "e.g. fixed: {train.epochs: 40}")
    for key, v in fixed.items():
        _check_key(p, key)
        sec, k = key.split(".")
        try:
            apply_dict(Config(), {sec: {k: v}}, "probe").validate()
        except GtcInputError as e:
            raise _err(p, f"fixed {key!r}", f"value {v!r} is not valid ({e.problem})", e.fix) from None
    sched = data.get("scheduler")
    if sched is not None:
        if not isinstance(sched, dict):
            raise _err(p, "scheduler", "must be a mapping", "e.g. scheduler: {type: asha, max_epochs: 40}")
        bad = set(sched) - set(SCHED_KEYS)
        if bad:
            raise _err(p, f"scheduler key {sorted(bad)[0]!r}", "unknown", f"valid keys are {', '.join(SCHED_KEYS)}")
        if sched.get("type", "asha") not in ("asha", "none"):
            raise _err(p, "scheduler.type", f"unknown scheduler {sched.get('type')!r}", "use 'asha' or 'none'")
        for k in ("max_epochs", "grace_period", "reduction_factor"):
            if k in sched and (not isinstance(sched[k], int) or sched[k] < 1):
                raise _err(p, f"scheduler.{k}", f"must be a positive integer, got {sched[k]!r}", "use e.g. 2")
        if sched.get("type", "asha") == "none":
            sched = None
    samples, conc = data.get("samples", 1), data.get("max_concurrent", 1)
    for k, v in (("samples", samples), ("max_concurrent", conc)):
        if not isinstance(v, int) or v < 1:
            raise _err(p, k, f"must be a positive integer, got {v!r}", f"set {k}: 1 or more")
    space = SearchSpace(str(p), parsed, fixed, samples, conc, sched, str(data.get("description", "")))
    space.config_for(base or Config(), {})  # fixed values combine into a valid config
    return space
