"""Cluster and tracking set-up as users meet it: an MLflow server that is down or is not one, a
multi-node Ray cluster without a tracking server, two runs at once on one workstation, and the
multi-node test helper (tests/raynodes.py) itself.

The tests that start Ray clusters are `e2e` (their own pytest invocation, see the Makefile); the
tracking-server checks start no Ray and run with the rest of the suite."""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, free_port
from raynodes import RayNodes

BIN = Path(sys.executable).parent
GTC = str(BIN / "gtc-ray")
TINY_SETS = ["--set", "graph.knn_k=5", "--set", "model.noise_steps=50", "--set", "model.embedding_size=16",
             "--set", "train.batch_size=256", "--set", "eval.topk=[5, 10, 20]"]
SPACE = """
samples: 1
fixed:
  train.epochs: 1
params:
  train.lr: {grid: [0.01]}
"""


def _env(**extra) -> dict:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra}
    for k in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        if k not in extra:
            env.pop(k, None)
    return env


@pytest.fixture
def data(tiny, tmp_path) -> Path:
    """A private copy of the tiny dataset without its graph cache (so a preparation would show)."""
    d = tmp_path / "D"
    shutil.copytree(tiny, d, ignore=shutil.ignore_patterns("prepared"))
    return d


def _written(tmp_path: Path, data: Path) -> list[str]:
    """What a refused command must not have created: a run/search directory, an MLflow store, a
    graph cache."""
    out = [p.name for p in tmp_path.iterdir() if p.name in ("runs", "gtc_runs", "mlflow.db", "mlartifacts", "mlruns")]
    return out + (["D/prepared"] if (data / "prepared").exists() else [])


# ------------------------------------------------------------------ tracking server preflight

class _NotMlflow(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(404)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(b"<html>not here</html>")

    def log_message(self, *a):
        pass


class _FakeMlflow(_NotMlflow):
    def do_GET(self):
        ok = self.path.startswith("/api/2.0/mlflow/experiments/search")
        self.send_response(200 if ok else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"experiments": []}' if ok else b"{}")


@pytest.fixture
def http_server():
    """Starts a throw-away HTTP server with a handler class on a free port; yields its URL maker."""
    servers = []

    def start(handler) -> str:
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


@pytest.mark.timeout(60)
def test_unreachable_tracking_server_fails_fast_through_the_cli(data, tmp_path):
    """`gtc-ray train D --tracking-uri http://127.0.0.1:<closed port>` as typed: exit 2 in seconds
    with one paragraph (it took ~279 s of MLflow retries and a 118-line traceback), nothing written."""
    port = free_port()  # bound and closed again: nothing listens there
    t0 = time.perf_counter()
    r = subprocess.run([GTC, "train", str(data), "--epochs", "1", "--tracking-uri", f"http://127.0.0.1:{port}",
                        "--storage", str(tmp_path / "runs"), *TINY_SETS],
                       cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=50)
    took = time.perf_counter() - t0
    assert r.returncode == 2, (r.stdout + r.stderr)[-3000:]
    assert took < 15, took
    assert f"http://127.0.0.1:{port}" in r.stderr and "not reachable" in r.stderr and "Fix:" in r.stderr, r.stderr
    assert "Traceback" not in r.stdout + r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert _written(tmp_path, data) == []


@pytest.mark.timeout(60)
def test_tracking_server_checks(http_server, monkeypatch):
    """check_server: refused, not MLflow (404 HTML), a (fake) MLflow answer; http(s) only; and
    the HTTP retry defaults it installs, which a user's own values override."""
    from gtc_ray import tracking
    from gtc_ray.errors import GtcInputError
    for k in tracking.HTTP_DEFAULTS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "77")
    closed = f"http://127.0.0.1:{free_port()}"
    t0 = time.perf_counter()
    with pytest.raises(GtcInputError, match="not reachable"):
        tracking.check_server(closed)
    assert time.perf_counter() - t0 < 5
    with pytest.raises(GtcInputError, match="not an MLflow tracking server"):
        tracking.check_server(http_server(_NotMlflow))
    tracking.check_server(http_server(_FakeMlflow))  # answers like MLflow: passes
    tracking.check_server("sqlite:////nonexistent/dir/mlflow.db")  # not HTTP: nothing to check
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == tracking.HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "77"  # the user's value wins
    # MLFLOW_TRACKING_URI is checked like --tracking-uri (tune and register use the same check)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", closed)
    with pytest.raises(GtcInputError, match="MLFLOW_TRACKING_URI"):
        tracking.check_server(None)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_real_mlflow_server_passes_the_check(tmp_path):
    """A real `mlflow server` answers the preflight (its endpoint and reply are what we expect)."""
    from gtc_ray import tracking
    port = free_port()
    log = open(tmp_path / "mlflow.log", "w")
    p = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                          "--backend-store-uri", f"sqlite:///{tmp_path / 'db.sqlite'}",
                          "--default-artifact-root", str(tmp_path / "art"), "--workers", "1"],
                         stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    try:
        deadline, err = time.time() + 90, None
        while time.time() < deadline:
            try:
                tracking.check_server(f"http://127.0.0.1:{port}")
                break
            except Exception as e:  # still starting
                err = e
                assert p.poll() is None, (tmp_path / "mlflow.log").read_text()[-3000:]
                time.sleep(1)
        else:
            pytest.fail(f"mlflow server never passed the check: {err}")
    finally:
        os.killpg(p.pid, 15)
        p.wait(timeout=30)


# ------------------------------------------------------------------ Ray start-up (no Ray started)

@pytest.fixture
def fake_ray(monkeypatch):
    """ray.init replaced by a recorder that runs `behaviour(kwargs)`; the pin is restored after."""
    import ray
    calls = []
    state = {"behaviour": lambda kw: None}

    def init(**kw):
        calls.append(kw)
        return state["behaviour"](kw)

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    return calls, state


def test_local_ray_pins_its_own_dashboard_for_every_process_it_starts(fake_ray):
    """The local Ray's dashboard port is chosen up front and RAY_API_SERVER_ADDRESS names it during
    ray.init, so the raylet and every worker inherit it (Train V2's placement-group cleaner then asks
    this Ray, not whichever the machine has); a port taken meanwhile is chosen again."""
    from conftest import tiny_config
    from gtc_ray.train.cluster import ensure_ray
    calls, state = fake_ray
    seen = []

    def init(kw):
        seen.append(os.environ.get("RAY_API_SERVER_ADDRESS"))
        if len(calls) == 1:
            raise ValueError(f"Failed to bind to 127.0.0.1:{kw['dashboard_port']} because it's already occupied.")

    state["behaviour"] = init
    ensure_ray(tiny_config(), log=lambda m: None)
    assert len(calls) == 2 and calls[1]["address"] == "local" and calls[1]["dashboard_host"] == "127.0.0.1"
    assert seen[1] == f"http://127.0.0.1:{calls[1]['dashboard_port']}"
    # this process gets its own environment back: the variable would also steer its later
    # JobSubmissionClient(address) and State API calls to this Ray, after it is shut down too
    assert "RAY_API_SERVER_ADDRESS" not in os.environ


def test_ray_start_up_failures_are_one_paragraph(fake_ray):
    from conftest import tiny_config
    from gtc_ray.errors import GtcInputError
    from gtc_ray.train.cluster import ensure_ray
    calls, state = fake_ray

    def timeout(kw):
        raise Exception("The current node timed out during startup. This could happen because some of\n"
                        "the raylet failed to startup or the GCS has become overloaded.")

    state["behaviour"] = timeout
    with pytest.raises(GtcInputError, match="Ray start-up: the local Ray .* did not start: The current node "
                                            "timed out during startup.*Fix: .*overloaded") as e:
        ensure_ray(tiny_config(), log=lambda m: None)
    assert "\n" not in str(e.value)
    cfg = tiny_config()
    cfg.ray.address = f"127.0.0.1:{free_port()}"  # nothing listens: refused at once, ray.init not tried
    n = len(calls)
    t0 = time.perf_counter()
    with pytest.raises(GtcInputError, match="does not answer"):
        ensure_ray(cfg, log=lambda m: None)
    assert len(calls) == n and time.perf_counter() - t0 < 6
    cfg.ray.address = "http://127.0.0.1:8265"
    with pytest.raises(GtcInputError, match="is not a Ray address"):
        ensure_ray(cfg, log=lambda m: None)


# ------------------------------------------------------------------ Ray clusters (e2e)

@pytest.fixture(scope="module")
def two_nodes():
    with RayNodes(workers=1, worker_resources={"wnode": 1}) as c:
        yield c


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_multi_node_cluster_refuses_the_implicit_sqlite_store(two_nodes, data, tmp_path):
    """No tracking URI on a 2-node cluster: `train --address` and `tune` via RAY_ADDRESS exit 2
    right after connecting, saying what to pass, before any preparation, MLflow run or training."""
    c = two_nodes
    env = {**_env(), **{k: v for k, v in c.env.items() if k.startswith("RAY_AUTH")}}
    runs = []
    r = subprocess.run([GTC, "train", str(data), "--epochs", "1", "--address", c.gcs_address,
                        "--storage", str(tmp_path / "runs"), *TINY_SETS],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    runs.append(r)
    (tmp_path / "space.yaml").write_text(SPACE)
    r = subprocess.run([GTC, "tune", str(data), "--space", str(tmp_path / "space.yaml"), "--workers", "1",
                        "--storage", str(tmp_path / "runs"), *TINY_SETS],
                       cwd=tmp_path, env={**env, "RAY_ADDRESS": c.gcs_address}, capture_output=True, text=True,
                       timeout=120)
    runs.append(r)
    for r in runs:
        out = r.stdout + r.stderr
        assert r.returncode == 2, out[-3000:]
        assert "2 alive nodes" in r.stderr and "--tracking-uri http://HOST:5000" in r.stderr, r.stderr
        assert "MLFLOW_TRACKING_URI" in r.stderr and "Traceback" not in out, out[-3000:]
        assert "connected to Ray" in r.stdout, r.stdout  # refused after connecting...
        assert "run gtc-" not in r.stdout and "search " not in r.stdout  # ...and before the run started
    assert _written(tmp_path, data) == []
    assert c.alive_nodes() == 2  # the drivers left the cluster as it was


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_two_concurrent_trainings_on_one_machine(data, tmp_path):
    """Two `gtc-ray train` at once on one workstation: each starts its own local Ray, and both
    finish (both exited 1 before: Train V2's placement-group cleaner of one run found two Ray
    instances and could not tell which was its own)."""
    procs, logs = [], []
    for i in (1, 2):
        d = tmp_path / f"r{i}"
        d.mkdir()
        logs.append(d / "train.log")
        procs.append(subprocess.Popen(
            [GTC, "train", str(data), "--epochs", "2", "--workers", "1", "--storage", str(d / "runs"),
             "--tracking-uri", f"sqlite:///{d / 'mlflow.db'}", "--metrics-out", str(d / "m.json"), *TINY_SETS],
            cwd=d, env=_env(), stdout=open(logs[-1], "w"), stderr=subprocess.STDOUT, start_new_session=True))
    try:
        rcs = [p.wait(timeout=540) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
    outs = [f.read_text() for f in logs]
    for rc, out in zip(rcs, outs):
        assert rc == 0, out[-4000:]
        assert "Found multiple active Ray instances" not in out, out[-4000:]
        assert "Failed to query Ray Train Controller actor state" not in out, out[-4000:]  # the pin is live
    for i in (1, 2):
        assert (tmp_path / f"r{i}" / "m.json").is_file()


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_raynodes_kill_node_leaves_the_head_alive():
    with RayNodes(workers=2, worker_cpus=1, worker_resources=[{"wnode": 1}, {"wnode": 1}]) as c:
        assert c.alive_nodes() == 3
        assert {n.agent_port for n in [c.head, *c.nodes]}.isdisjoint({52365})  # never the default
        c.kill_node(0, wait_dead_s=120)
        assert not c.nodes[0].alive()
        assert c.head_alive() and c.nodes[1].alive()
        assert c.alive_nodes() == 2
        pids = [*c.head.scan(), *c.nodes[1].scan()]
        root = c.root
    assert not any(Path(f"/proc/{p}").exists() and Path(f"/proc/{p}/cmdline").read_bytes()
                   and root.encode() in Path(f"/proc/{p}/cmdline").read_bytes() for p in pids)
    assert not Path(root).exists()


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_raynodes_token_auth_keeps_its_token_out_of_home():
    home_token = Path.home() / ".ray" / "auth_token"
    before = home_token.stat().st_mtime_ns if home_token.exists() else None
    with RayNodes(workers=0, head_cpus=1, auth="token") as c:
        assert Path(c.env["RAY_AUTH_TOKEN_PATH"]).parent == Path(c.root)
        assert c.alive_nodes() == 1  # the dashboard answered with the cluster's own token
        r = subprocess.run([sys.executable, "-c", "import ray; ray.init(); print(ray.cluster_resources()['CPU'])"],
                           env={**c.env, "RAY_ADDRESS": c.gcs_address}, capture_output=True, text=True,
                           timeout=120, cwd=ROOT)
        assert r.returncode == 0 and r.stdout.strip().endswith("1.0"), (r.stdout + r.stderr)[-3000:]
    assert (home_token.stat().st_mtime_ns if home_token.exists() else None) == before
