"""Ray start-up and resource sizing: join the cluster named by ray.address / RAY_ADDRESS, or start
an embedded local Ray, and size the Train workers' CPUs so that Ray Data always has room."""

from __future__ import annotations

import math
import os
import time

from gtc_ray.config import Config
from gtc_ray.errors import GtcInputError


def _on_local_ray(cfg: Config) -> bool:
    return not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))


def resolve_cpus_per_worker(cfg: Config, workers: int, extra_cpu: float = 0.0) -> float:
    """CPUs per Train worker: the configured value, or (ray.cpus_per_worker null) on the embedded
    local Ray what leaves one CPU to Ray Data, shared by the workers and capped at 1; on a cluster 1.
    `workers` counts every worker that runs at once (all concurrent trials' workers)."""
    if cfg.ray.cpus_per_worker is not None:
        return float(cfg.ray.cpus_per_worker)
    if not _on_local_ray(cfg):
        return 1.0
    spare = cfg.ray.num_cpus - 1 - extra_cpu
    if spare <= 0:
        raise GtcInputError("config key ray.num_cpus", f"the local Ray's {cfg.ray.num_cpus} CPUs leave none for "
                            "training after one for Ray Data", "raise ray.num_cpus, or run fewer trials at once")
    return math.floor(min(1.0, spare / max(workers, 1)) * 1e4) / 1e4  # down: the total must still fit


def check_local_resources(cfg: Config, workers: int, extra_cpu: float = 0.0) -> None:
    """On the embedded local Ray, leave a whole CPU to Ray Data, or ingestion waits forever (RAY_NOTES P3)."""
    if not _on_local_ray(cfg):
        return
    cpw = resolve_cpus_per_worker(cfg, workers, extra_cpu)
    if workers * cpw + extra_cpu > cfg.ray.num_cpus - 1 + 1e-9:
        raise GtcInputError("config keys ray.workers/ray.cpus_per_worker",
                            f"{workers} workers x {cpw} CPU leave less than one of the "
                            f"local Ray's {cfg.ray.num_cpus} CPUs for Ray Data, which would hang",
                            f"use ray.cpus_per_worker <= {(cfg.ray.num_cpus - 1 - extra_cpu) / max(workers, 1):g} "
                            "or null (sized automatically; CPUs are logical, torch threads are set by "
                            "train.num_threads), or raise ray.num_cpus")


def ensure_ray(cfg: Config, log=print, workers: int = 0, extra_cpu: float = 0.0) -> None:
    """Join the cluster named by ray.address / RAY_ADDRESS, or start an embedded local Ray. A Ray
    that cannot be joined or started is a GtcInputError (one paragraph), not a traceback.
    preflight() calls this early, before any expensive work, when a cluster is named."""
    import ray
    check_local_resources(cfg, workers, extra_cpu)
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # end-of-run detection (RAY_NOTES §2)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    addr = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    t0 = time.perf_counter()
    if addr:
        _connect(addr, "--address / ray.address" if cfg.ray.address else "RAY_ADDRESS")
        log(f"connected to Ray at {addr} ({time.perf_counter() - t0:.1f}s)")
    else:
        _start_local(cfg)
        log(f"started a local Ray with {cfg.ray.num_cpus} CPUs ({time.perf_counter() - t0:.1f}s)")


# The address of the dashboard (State API) of the local Ray this process started. Ray's State API
# clients that get no address -- Train V2's PlacementGroupCleaner and its state actor call
# ray.util.state.get_actor() so -- look for "the" Ray of the machine: RAY_API_SERVER_ADDRESS, else
# RAY_ADDRESS, else every gcs_server process found by `ps` plus /tmp/ray/ray_current_cluster (the
# last `ray start`). With a second Ray on the machine (another `gtc-ray train` or `tune`, a test
# cluster) they raise "Found multiple active Ray instances" (the cleaner's monitor dies), or ask the
# last `ray start`ed cluster, which does not know this run's controller, take it for dead and remove
# the run's placement group. So the local Ray gets a dashboard port chosen here, and
# RAY_API_SERVER_ADDRESS names it during ray.init: the raylet inherits it, and with it every worker
# and actor of this Ray. This process's own environment is restored right after: the variable also
# steers JobSubmissionClient(address) and State API calls of whoever uses this process later, and
# would point them at this Ray after it is shut down (or away from the cluster they name).
def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_line(e: BaseException, limit: int = 300) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= limit else msg[:limit] + "..."


def _shutdown_quietly() -> None:
    import ray
    try:
        ray.shutdown()  # a half-started Ray (GCS up, raylet not) must not stay behind
    except Exception:
        pass


def _start_local(cfg: Config) -> None:
    import ray
    for attempt in range(3):
        port = _free_port()
        before = os.environ.get("RAY_API_SERVER_ADDRESS")
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        try:
            ray.init(address="local", num_cpus=cfg.ray.num_cpus, object_store_memory=cfg.ray.object_store_memory,
                     log_to_driver=True, dashboard_host="127.0.0.1", dashboard_port=port)
            return
        except Exception as e:
            _shutdown_quietly()
            if "already occupied" in str(e) and attempt < 2:  # taken between choosing and binding it
                continue
            raise GtcInputError(
                "Ray start-up", f"the local Ray ({cfg.ray.num_cpus} CPUs) did not start: {_one_line(e)}",
                "this mostly means the machine is overloaded (other Ray instances, builds) or /tmp or "
                "/dev/shm is full: retry when it is quieter; Ray's logs are in /tmp/ray/session_latest/logs "
                "(--debug shows the traceback), or pass --address of a running cluster") from e
        finally:  # the raylet has inherited it; this process goes back to what it had
            if before is None:
                os.environ.pop("RAY_API_SERVER_ADDRESS", None)
            else:
                os.environ["RAY_API_SERVER_ADDRESS"] = before


def _connect(addr: str, source: str) -> None:
    import ray
    where = f"Ray cluster address {addr} ({source})"
    fix = ("pass the GCS address of the head node (HOST:PORT, the --port of `ray start --head`, 6379 by "
           "default) or ray://HOST:10001, check that the cluster runs, or drop --address and unset "
           "RAY_ADDRESS to start a local Ray")
    if "://" in addr and not addr.startswith("ray://"):
        raise GtcInputError(where, "is not a Ray address (an http:// address is the dashboard, used by "
                            "`ray job submit`)", fix)
    hostport = addr[len("ray://"):] if addr.startswith("ray://") else addr
    host, sep, port = hostport.rpartition(":")
    if addr not in ("auto", "local") and sep and port.isdigit():
        import socket
        try:  # ray.init retries an unreachable GCS for minutes; a closed port is known at once
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
        except OSError as e:
            raise GtcInputError(where, f"does not answer ({_one_line(e)})", fix) from None
    try:
        ray.init(address=addr)  # a cluster brings its own resources (RAY_NOTES §3)
    except Exception as e:
        _shutdown_quietly()
        raise GtcInputError(where, f"could not be joined: {_one_line(e)}",
                            fix + "; with token authentication (Ray's default) set RAY_AUTH_MODE=token and "
                            "the cluster's token (RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)") from e


# ------------------------------------------------------------------ checks before any work

def preflight(cfg: Config, *, tracking_uri: str | None = None, track: bool = True, use_ray: bool = True,
              log=print, workers: int = 0, extra_cpu: float = 0.0) -> None:
    """The checks that need the network, before any expensive work (dataset preparation, MLflow
    runs, Ray start-up): with `track`, an http(s) MLflow server must answer as one; with `use_ray`
    on a cluster (ray.address / RAY_ADDRESS), Ray is joined now (seconds) and, with `track`, a
    cluster of several nodes must have a tracking URI given (not the implicit local SQLite file).
    `tracking_uri` is what the user gave (None: MLFLOW_TRACKING_URI, else the default)."""
    from gtc_ray import tracking
    if track:
        tracking.check_server(tracking_uri)
    if use_ray and not _on_local_ray(cfg):
        ensure_ray(cfg, log, workers, extra_cpu)
        if track:
            check_cluster_tracking(tracking_uri, log)


def check_cluster_tracking(tracking_uri: str | None = None, log=print) -> None:
    """On a connected Ray cluster of more than one alive node, refuse the implicit SQLite store: it
    is a file in this process's working directory on one machine (under `ray job submit`, a
    temporary copy), so the runs would be out of reach of the other machines and of later commands.
    A given local file store only gets a note (it may be on shared storage)."""
    import ray
    from gtc_ray import tracking
    nodes = sum(bool(n.get("Alive")) for n in ray.nodes())
    if nodes <= 1:
        return
    given = tracking.given_tracking_uri(tracking_uri)
    if given is None:
        raise GtcInputError(
            "MLflow tracking store", f"none was given, and the Ray cluster has {nodes} alive nodes: the "
            f"default store is a local SQLite file ({tracking.resolve_tracking_uri(None)}) on this machine "
            "only, out of reach of the other nodes and of later commands run elsewhere",
            "run an MLflow server (`mlflow server --host 0.0.0.0 --port 5000 --backend-store-uri "
            "sqlite:///mlflow.db --artifacts-destination DIR_OR_S3_URI`) and pass --tracking-uri "
            "http://HOST:5000, or set MLFLOW_TRACKING_URI=http://HOST:5000")
    if tracking.is_local_store(given):
        log(f"note: the MLflow store {given} is a local file on a {nodes}-node cluster: only this machine "
            "sees it unless it lies on shared storage")
