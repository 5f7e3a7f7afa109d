"""Typed configuration: one dataclass per section, loadable from YAML, with dotted overrides.

    cfg = load_config("configs/default.yaml", overrides=["graph.knn_k=10", "train.lr=1e-3"])

An unknown or mistyped key is an error that lists the valid keys of that section (no silent
`None` for typos, which hurt MMRec users). Values are type-checked and range-checked before any
expensive work starts. Defaults are the spec's (`../shared/spec/gtc.md` §3).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from gtc_ray.errors import GtcInputError


@dataclass
class GraphConfig:
    """Prepared graphs (spec §5.4, §5.5)."""

    knn_k: int = 10  # neighbours per item in each modality's kNN graph
    mm_image_weight: float = 0.1  # weight of "image" when the modalities are exactly image+text
    # Explicit blend weights per modality; empty = image/text rule above, else uniform.
    modality_weights: dict = field(default_factory=dict)
    user_topk: int = 200  # co-occurring neighbours kept per user (the reference keeps 200)
    chunk_rows: int = 2048  # rows per block in chunked graph building (memory ~ chunk x n)


@dataclass
class ModelConfig:
    """GTC model shape and loss weights (spec §3, §5, §6)."""

    embedding_size: int = 64
    noise_steps: int = 600  # diffusion steps T
    beta_start: float = 1e-4
    beta_end: float = 0.01
    reg_weight: float = 1e-3
    diff_weight: float = 0.7  # lambda_gen
    tc_weight: float = 0.4  # lambda_TC (symile_weight)
    tc_temperature: float = 0.07  # logit scale initialised to log(1/temperature)
    tc_mode: str = "n"  # "n" (shared permuted negatives), "n_squared", "pairwise" (InfoNCE ablation)
    gate: str = "as_written"  # "as_written" (B7, default), "per_modality", "off"
    use_diffusion: bool = True  # ablation: False feeds the projected features unfiltered
    use_tc: bool = True  # ablation: False drops the TC loss
    use_content: bool = True  # ablation: False = ID-only model (no modalities at all)
    n_layers: int = 2  # propagation hops of each graph encoder
    user_graph_k: int = 40  # sampled user-user neighbours per epoch
    logit_scale_max: float = 4.6052  # clamp of the TC logit scale (ln 100, as CLIP); fixes B8
    # "bfloat16": the denoisers and the TC matrix products in bfloat16 (mixed precision: softmax,
    # losses, weights and optimizer state stay float32); ~2x faster on CPUs with AVX512-BF16 or AMX
    matmul_precision: str = "float32"


@dataclass
class CompatConfig:
    """Reproduce the original code's behaviour where it changes results (spec §10). Off by default."""

    freeze_denoiser: bool = False  # B1: denoisers are fixed random networks
    stale_eval: bool = False  # B5: evaluate from the last training batch's embeddings
    unstable_bpr: bool = False  # B6: -log2(sigmoid(x)) instead of the stable form


@dataclass
class TrainConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    epochs: int = 1000
    batch_size: int = 2048  # global batch; split across workers (see batch_scaling)
    batch_scaling: str = "split"  # "split": B/W per worker (steps/epoch as single-process); "per_worker": B each
    shard_item_work: bool = True  # split projections, denoisers, L_gen, L_TC by item rows across workers
    patience: int = 20  # stop after patience+1 evaluations without strict improvement
    seed: int = 999
    eval_every: int = 1
    num_threads: int = 1  # torch threads per worker (spec P12)
    checkpoint_every: int = 1
    # checkpoints kept per run (the newest); each one carries the best-so-far weights as well
    keep_checkpoints: int = 2


@dataclass
class EvalConfig:
    topk: list = field(default_factory=lambda: [5, 10, 20, 50])
    valid_metric: str = "recall@20"
    user_chunk: int = 1024  # users scored per block: memory ~ user_chunk x items
    # False (default): the spec's protocol (§8), as the original and published MMRec tables: test
    # ranks all items with only the user's training items masked. True: the stricter protocol that
    # also masks the user's validation items in test.
    mask_valid_in_test: bool = False


@dataclass
class RayConfig:
    address: str | None = None  # None: start a local Ray (or use RAY_ADDRESS)
    num_cpus: int = 2  # for the local Ray only
    object_store_memory: int = 1_000_000_000  # for the local Ray only
    workers: int = 2
    use_gpu: bool = False
    # logical CPUs per Train worker; None (default): on the embedded local Ray, what leaves one CPU
    # to Ray Data (RAY_NOTES P3) shared by the workers (at most 1); on a cluster, 1
    cpus_per_worker: float | None = None
    # worker-group restarts per run (Ray Train FailureConfig): a lost worker resumes from the
    # latest checkpoint; 0 turns fault tolerance off
    max_failures: int = 3
    storage_path: str = "gtc_runs"  # Ray Train storage (checkpoints): a directory or a URI (s3://...)
    # extra resources each Train worker asks for, e.g. {wnode: 0.01} (a custom resource that only
    # some nodes have) to place training on those nodes; CPU and GPU come from the keys above
    worker_resources: dict = field(default_factory=dict)


@dataclass
class Config:
    graph: GraphConfig = field(default_factory=GraphConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    compat: CompatConfig = field(default_factory=CompatConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "Config":
        _check_ranges(self)
        return self


_CHOICES = {
    "model.tc_mode": ("n", "n_squared", "pairwise"),
    "model.gate": ("as_written", "per_modality", "off"),
    "model.matmul_precision": ("float32", "bfloat16"),
    "train.batch_scaling": ("split", "per_worker"),
}

_POSITIVE = [
    "graph.knn_k", "graph.user_topk", "graph.chunk_rows", "model.embedding_size", "model.noise_steps",
    "model.beta_start", "model.beta_end", "model.tc_temperature", "model.user_graph_k", "train.lr",
    "train.epochs", "train.batch_size", "train.eval_every", "train.num_threads", "eval.user_chunk",
    "ray.num_cpus", "ray.workers", "train.checkpoint_every", "train.keep_checkpoints",
]
_NON_NEGATIVE = [
    "model.reg_weight", "model.diff_weight", "model.tc_weight", "train.weight_decay",
    "train.patience", "model.n_layers", "graph.mm_image_weight", "ray.max_failures",
]


def _get(cfg: Config, dotted: str):
    sec, key = dotted.split(".")
    return getattr(getattr(cfg, sec), key)


def _check_ranges(cfg: Config) -> None:
    for k, allowed in _CHOICES.items():
        v = _get(cfg, k)
        if v not in allowed:
            raise GtcInputError(f"config key {k}", f"value {v!r} is not one of {list(allowed)}",
                                f"set {k} to one of {', '.join(allowed)}")
    for k in _POSITIVE:
        v = _get(cfg, k)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise GtcInputError(f"config key {k}", f"must be a positive number, got {v!r}",
                                f"set {k} to a value > 0")
    for k in _NON_NEGATIVE:
        v = _get(cfg, k)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise GtcInputError(f"config key {k}", f"must be >= 0, got {v!r}", f"set {k} to a value >= 0")
    cpw = cfg.ray.cpus_per_worker
    bad = {k: v for k, v in cfg.ray.worker_resources.items()
           if str(k).upper() in ("CPU", "GPU") or not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0}
    if bad:
        raise GtcInputError("config key ray.worker_resources", f"{bad} is not a mapping of custom resource names "
                            "to positive amounts (CPU and GPU have their own keys)",
                            "e.g. --set 'ray.worker_resources={wnode: 0.01}'; use ray.cpus_per_worker / --gpu")
    if cpw is not None and not (isinstance(cpw, (int, float)) and math.isfinite(cpw) and cpw > 0):
        raise GtcInputError("config key ray.cpus_per_worker", f"must be a positive number or null, got {cpw!r}",
                            "set ray.cpus_per_worker to a value > 0, or null to size it automatically")
    m = cfg.model
    if not m.beta_start < m.beta_end < 1:
        raise GtcInputError("config keys model.beta_start/model.beta_end",
                            f"need 0 < beta_start < beta_end < 1, got {m.beta_start}, {m.beta_end}",
                            "choose an increasing noise schedule, e.g. 1e-4 and 0.01")
    if m.noise_steps < 2:
        raise GtcInputError("config key model.noise_steps", f"must be >= 2, got {m.noise_steps}",
                            "use at least 2 diffusion steps (the spec's default is 600)")
    if not 0 <= cfg.graph.mm_image_weight <= 1:
        raise GtcInputError("config key graph.mm_image_weight", "must lie in [0, 1]", "use e.g. 0.1")
    for name, w in cfg.graph.modality_weights.items():
        if not isinstance(w, (int, float)) or w < 0:
            raise GtcInputError(f"config key graph.modality_weights.{name}", f"weight {w!r} must be >= 0",
                                "give each modality a non-negative weight")
    vm = cfg.eval.valid_metric
    name, _, k = vm.partition("@")
    if name not in ("recall", "ndcg", "precision", "map") or not k.isdigit() or int(k) not in cfg.eval.topk:
        raise GtcInputError("config key eval.valid_metric", f"{vm!r} is not a computed metric",
                            f"use <recall|ndcg|precision|map>@K with K in eval.topk={cfg.eval.topk}")
    if not cfg.eval.topk or any((not isinstance(k, int)) or k <= 0 for k in cfg.eval.topk):
        raise GtcInputError("config key eval.topk", f"{cfg.eval.topk!r} must be a list of positive ints",
                            "e.g. [5, 10, 20, 50]")


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Check `value` against the dataclass field type; ints are accepted for floats."""
    origin = get_origin(typ)
    if origin is not None and type(None) in get_args(typ):  # Optional[X]
        if value is None:
            return None
        typ = [a for a in get_args(typ) if a is not type(None)][0]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" as a string
            return float(value)
        except ValueError:
            pass
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, float),
          str: lambda v: isinstance(v, str),
          list: lambda v: isinstance(v, list),
          dict: lambda v: isinstance(v, dict)}.get(typ if origin is None else origin, lambda v: True)
    if not ok(value):
        tname = getattr(typ, "__name__", str(typ))
        raise GtcInputError(f"config key {where}", f"expected {tname}, got {value!r} ({type(value).__name__})",
                            f"give {where} a {tname} value")
    return value


def _section_types(cls) -> dict:
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def apply_dict(cfg: Config, data: dict, source: str = "config") -> Config:
    """Merge a nested dict into `cfg`, rejecting unknown sections and keys."""
    if not isinstance(data, dict):
        raise GtcInputError(source, "the top level must be a mapping of sections",
                            f"use sections {', '.join(f.name for f in fields(Config))}")
    sections = {f.name for f in fields(Config)}
    for sec, body in data.items():
        if sec not in sections:
            raise GtcInputError(f"{source}: section {sec!r}", "unknown section",
                                f"valid sections are {', '.join(sorted(sections))}")
        if not isinstance(body, dict):
            raise GtcInputError(f"{source}: section {sec!r}", "must be a mapping of keys to values",
                                f"write '{sec}:' followed by indented 'key: value' lines")
        obj = getattr(cfg, sec)
        types = _section_types(type(obj))
        for key, value in body.items():
            if key not in types:
                raise GtcInputError(f"{source}: key {sec}.{key}", "unknown key",
                                    f"valid keys of [{sec}] are {', '.join(sorted(types))}")
            setattr(obj, key, _coerce(value, types[key], f"{sec}.{key}"))
    return cfg


def parse_override(text: str) -> dict:
    """'graph.knn_k=10' -> {'graph': {'knn_k': 10}} (value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or key.count(".") != 1:
        raise GtcInputError(f"override {text!r}", "must look like section.key=value",
                            "e.g. --set graph.knn_k=10 or --set train.lr=1e-3")
    sec, k = key.strip().split(".")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise GtcInputError(f"override {text!r}", f"value is not valid YAML ({e})", "quote the value") from e
    return {sec: {k: value}}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> Config:
    cfg = Config()
    if base:
        apply_dict(cfg, base, "config")
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise GtcInputError(f"config file {p}", "does not exist", "pass an existing YAML file to --config")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise GtcInputError(f"config file {p}", f"is not valid YAML ({e})", "fix the YAML syntax") from e
        apply_dict(cfg, data, f"config file {p}")
    for o in overrides or []:
        apply_dict(cfg, parse_override(o), f"override {o!r}")
    return cfg.validate()


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config saved with `to_dict` (checkpoints, Ray workers)."""
    return apply_dict(Config(), data, "saved config").validate()
