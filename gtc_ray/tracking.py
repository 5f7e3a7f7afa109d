"""MLflow tracking: embedded SQLite store by default, one writer process per run.

Default store: `sqlite:///<cwd>/mlflow.db` with artifacts under `<cwd>/mlartifacts` (absolute, so
Ray workers and trial processes, which change directory, still write to the right place;
RAY_NOTES §2). `MLFLOW_TRACKING_URI` (or `--tracking-uri`) points at a real server instead.

Before any work, `check_server` makes sure an http(s) tracking URI is an MLflow server that
answers (one request, seconds); later requests retry briefly (HTTP_DEFAULTS) instead of MLflow's
minutes. On a multi-node Ray cluster the implicit SQLite default is refused
(gtc_ray.train.cluster.check_cluster_tracking).

MLflow metric names may not contain '@': `recall@20` is logged as `recall_at_20`.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from gtc_ray.errors import GtcInputError

DEFAULT_EXPERIMENT = "gtc-ray"

# MLflow's own HTTP defaults (7 retries, backoff factor 2, 120 s timeout) keep a command waiting
# ~4.5 minutes on a tracking server that is down before it fails. Ours: 3 retries spaced 0, 2 and
# 4 s (+ up to 0.5 s jitter) ride out a server restart, and 30 s per connect/read bounds a server
# that accepts connections but never answers. setdefault: the user's own values win.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
PREFLIGHT_TIMEOUT_S = 5  # the start-up check: one try, no retries


def configure_http() -> None:
    """HTTP_DEFAULTS into this process's environment (read by MLflow at every request)."""
    for k, v in HTTP_DEFAULTS.items():
        os.environ.setdefault(k, v)


def given_tracking_uri(uri: str | None = None) -> str | None:
    """The tracking URI the user gave (--tracking-uri, else MLFLOW_TRACKING_URI), None for the default."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def resolve_tracking_uri(uri: str | None = None) -> str:
    uri = given_tracking_uri(uri)
    if uri:
        return uri
    return f"sqlite:///{Path.cwd().absolute() / 'mlflow.db'}"


def is_http(uri: str) -> bool:
    return uri.partition("://")[0].lower() in ("http", "https")


def is_local_store(uri: str) -> bool:
    """A store that is a file of this machine: sqlite:///..., file:..., or a plain path."""
    scheme = uri.partition(":")[0].lower() if "://" in uri or uri.startswith("file:") else ""
    return scheme in ("", "sqlite", "file")


def check_server(uri: str | None = None) -> None:
    """Before any work: an http(s) tracking URI (`uri` as given, else MLFLOW_TRACKING_URI) must be an
    MLflow server that answers, within seconds (one request, no retries); other stores pass.
    Failing that, a GtcInputError. Also installs HTTP_DEFAULTS for the later requests."""
    configure_http()
    given = given_tracking_uri(uri)
    if given is None or not is_http(given):
        return
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request
    where = f"MLflow tracking server {given} ({'--tracking-uri' if uri else 'MLFLOW_TRACKING_URI'})"
    endpoint = "/api/2.0/mlflow/experiments/search"
    start = ("start it (`mlflow server --host 0.0.0.0 --port 5000 --backend-store-uri sqlite:///mlflow.db`), "
             "check the host and port, or drop --tracking-uri and unset MLFLOW_TRACKING_URI to use the "
             "local SQLite store")
    try:
        r = http_request(get_default_host_creds(given), endpoint, "GET", params={"max_results": 1},
                         max_retries=0, backoff_factor=0, backoff_jitter=0, timeout=PREFLIGHT_TIMEOUT_S,
                         raise_on_status=False)
    except Exception as e:
        msg = str(e)
        low = msg.lower()
        if "refused" in low:
            why = "connection refused: nothing listens there"
        elif "name or service not known" in low or "name resolution" in low or "nodename nor servname" in low:
            why = "unknown host"
        elif "timed out" in low or "timeout" in low:
            why = f"no answer within {PREFLIGHT_TIMEOUT_S} s"
        elif "ssl" in low or "certificate" in low:
            why = "TLS error: " + " ".join(msg.split())[-200:]
        else:
            why = " ".join(msg.split())[-200:]
        raise GtcInputError(where, f"is not reachable ({why})", start) from None
    body = (r.text or "")[:150].replace("\n", " ").strip()
    if r.status_code in (401, 403):
        raise GtcInputError(where, f"refused the request ({r.status_code}: {body})",
                            "give its credentials: MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or "
                            "MLFLOW_TRACKING_TOKEN")
    if r.status_code >= 500:
        raise GtcInputError(where, f"answered {r.status_code} ({body})",
                            "check the server's log (its backend store or database), then retry")
    try:
        ok = r.status_code == 200 and isinstance(r.json(), dict)
    except ValueError:
        ok = False
    if not ok:
        raise GtcInputError(where, f"answers HTTP but is not an MLflow tracking server (GET {endpoint} gave "
                            f"{r.status_code}: {body or 'an empty body'})",
                            "point --tracking-uri / MLFLOW_TRACKING_URI at the `mlflow server` address, "
                            "http://HOST:PORT (with a path only if the server runs with --static-prefix)")


def artifact_root(uri: str) -> str | None:
    """Absolute artifact location for a local SQLite store (None: the server decides)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").absolute().as_uri()
    return None


def metric_key(name: str) -> str:
    return name.replace("@", "_at_")


def numeric_metrics(rec: dict) -> dict[str, float]:
    out = {}
    for k, v in rec.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        out[metric_key(k)] = float(v)
    return out


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)
    return out


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def client(uri: str | None = None):
    from mlflow.tracking import MlflowClient
    configure_http()  # in every process that talks to the store (driver, Train controller)
    uri = resolve_tracking_uri(uri)
    set_fluent_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def set_fluent_uri(uri: str) -> None:
    """Point MLflow's fluent API (mlflow.start_run, log_model, load_model) at `uri`, for this process
    only. mlflow.set_tracking_uri also writes MLFLOW_TRACKING_URI into the environment, where the
    next command run in this process (or a Ray worker started later) would take it for one the
    user gave: the environment is put back as it was."""
    import mlflow
    before = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def experiment_id(c, uri: str, name: str = DEFAULT_EXPERIMENT) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=artifact_root(uri))
    except Exception:  # created concurrently by another process
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def log_params(c, run_id: str, params: dict) -> None:
    from mlflow.entities import Param
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 90):
        c.log_batch(run_id, params=items[i:i + 90])


def dataset_tags(ds) -> dict:
    return {"gtc.dataset_hash": ds.content_hash, "gtc.dataset_name": ds.manifest.get("name", ""),
            "gtc.dataset_path": str(ds.path), "gtc.git_commit": git_commit()}


class TrainTracker:
    """One MLflow run for `gtc-ray train`: created by the driver, fed live by the Train controller."""

    def __init__(self, uri: str, run_id: str, mlflow_client=None):
        self.uri, self.run_id = uri, run_id
        self._c = mlflow_client  # None: made on first use (after pickling, in another process)

    @property
    def c(self):
        if self._c is None:
            self._c = client(self.uri)
        return self._c

    def __getstate__(self):  # travels to the Train controller: strings only
        return {"uri": self.uri, "run_id": self.run_id, "_c": None}

    @classmethod
    def start(cls, uri: str | None, name: str, cfg, ds, log=print) -> "TrainTracker":
        uri = resolve_tracking_uri(uri)
        c = client(uri)
        run = c.create_run(experiment_id(c, uri), run_name=name,
                           tags={**dataset_tags(ds), **protocol_tags(cfg), "gtc.kind": "train"})
        try:
            log_params(c, run.info.run_id, flatten(cfg.to_dict()))
        except BaseException as e:  # the run exists: it must not stay RUNNING
            end_run_after(c, run.info.run_id, e)
            raise
        return cls(uri, run.info.run_id, c)

    def log(self, rec: dict) -> None:
        from mlflow.entities import Metric
        import time as _t
        ts, step = int(_t.time() * 1000), int(rec.get("epoch", 0))
        self.c.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v in numeric_metrics(rec).items()
                                              if k != "epoch"])

    def train_callback(self):
        from ray.train import UserCallback
        tracker = self

        class MlflowEpochLogger(UserCallback):
            """Logs rank 0's metrics of every report to the run (runs on the Train controller)."""

            def after_report(self, run_context, metrics, checkpoint):
                if metrics and not metrics[0].get("final"):  # the final record is logged by finish()
                    tracker.log(metrics[0])

        return MlflowEpochLogger()

    def finish(self, out: dict, cfg, live: bool) -> None:
        if not live:
            log_history(self.c, self.run_id, out["history"])
        final = {**{f"final_valid_{k}": v for k, v in out["valid"].items()},
                 **{f"test_{k}": v for k, v in out["test"].items()}, "best_epoch": out["best_epoch"]}
        if out.get("modality_balance") is not None:
            final["final_modality_balance"] = out["modality_balance"]
        self.c.log_batch(self.run_id, metrics=[__import__("mlflow").entities.Metric(k, v, 0, 0)
                                               for k, v in numeric_metrics(final).items()])
        self.c.set_tag(self.run_id, "gtc.checkpoint", out["checkpoint"])
        log_config_artifacts(self.c, self.run_id, cfg.to_dict(), out["history"])
        self.c.set_terminated(self.run_id, "FINISHED")

    def end_after(self, error: BaseException) -> None:
        """End the run after `error`: KILLED for Ctrl-C, FAILED for anything else (never RUNNING)."""
        end_run_after(self.c, self.run_id, error)


def end_run_after(c, run_id: str, error: BaseException) -> None:
    status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
    try:
        c.set_terminated(run_id, status)
    except Exception as e:  # the store itself may be what failed: say so, keep the original error
        print(f"warning: could not mark MLflow run {run_id} {status}: {e}")


def protocol_tags(cfg) -> dict:
    """The evaluation protocol as run tags, so every MLflow run says what produced its numbers."""
    from gtc_ray.train.metrics import eval_protocol
    p = eval_protocol(cfg)
    return {"gtc.eval_protocol": p["name"], "gtc.eval_test_mask": p["test_mask"], "gtc.eval_selection": p["selection"]}


def log_history(c, run_id: str, history: list[dict], step_key: str = "epoch") -> None:
    from mlflow.entities import Metric
    import time
    ts = int(time.time() * 1000)
    metrics = []
    for rec in history:
        step = int(rec.get(step_key, 0))
        metrics += [Metric(k, v, ts, step) for k, v in numeric_metrics(rec).items() if k != step_key]
    for i in range(0, len(metrics), 900):  # the store's batch limit is 1000
        c.log_batch(run_id, metrics=metrics[i:i + 900])


def log_config_artifacts(c, run_id: str, config: dict, history: list[dict] | None = None) -> None:
    """The resolved config as YAML and, when there is a history, a training-curves plot."""
    import yaml
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "config.yaml"
        p.write_text(yaml.safe_dump(config, sort_keys=False))
        c.log_artifact(run_id, str(p))
        if history:
            plot = Path(d) / "training_curves.png"
            if plot_curves(history, plot):
                c.log_artifact(run_id, str(plot))


def plot_curves(history: list[dict], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ep = [r["epoch"] for r in history if "train_loss" in r]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    for k in ("train_loss", "train_bpr", "train_tc", "train_gen"):
        ax[0].plot(ep, [r[k] for r in history if "train_loss" in r], label=k[6:])
    ax[0].set_xlabel("epoch"); ax[0].set_title("training losses"); ax[0].legend()
    for k in ("valid_recall@20", "valid_ndcg@20"):
        pts = [(r["epoch"], r[k]) for r in history if k in r and "train_loss" in r]
        if pts:
            ax[1].plot(*zip(*pts), label=k[6:])
    ax[1].set_xlabel("epoch"); ax[1].set_title("validation"); ax[1].legend()
    fig.tight_layout(); fig.savefig(path, dpi=80); plt.close(fig)
    return True


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
