"""A polite multi-node Ray cluster on 127.0.0.1 for tests: `ray start` a head node and N worker
nodes, each in its own short temp dir, and stop them by PID (never `ray stop`, which ends every
Ray process of the machine, another test's or a user's included).

    with RayNodes(workers=2, worker_resources={"wnode": 1}) as c:
        subprocess.run([..., "--address", c.gcs_address], env=c.env)     # a driver joins by GCS
        JobSubmissionClient(c.address).submit_job(...)                   # jobs go to the dashboard
        c.kill_node(0)                                                   # lose worker node 0

Only the ports that collide with another Ray on the same machine are chosen (free ones): the GCS
port, the head's dashboard and Ray Client server ports and every node's dashboard agent HTTP port
(default 52365, the one that made job submission answer "No available agent to submit job").
Choosing every port by hand left a head whose raylet died at once (RAY_NOTES §6), so the others
stay Ray's own choice. Authentication is off by default (RAY_AUTH_MODE=disabled); with
auth="token" a fresh token lives in the cluster's own directory (RAY_AUTH_TOKEN_PATH), not in
~/.ray. The nodes' PATH starts with this interpreter's bin directory, so a job's `python` and
`gtc-ray` are the venv's (RAY_NOTES §6), and RAY_API_SERVER_ADDRESS names the head's dashboard
(the State API clients inside Ray would otherwise guess among all the machine's Ray instances).

A node's processes are those whose command line names its temp dir (or, for the head's Ray
Client server, its port), and their descendants (`ray start` exits after spawning them); each is remembered with its start time, so a reused PID
is never signalled.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
RAY = BIN / "ray"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ processes (Linux /proc)

def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    if fields[0] == "Z":  # a zombie holds nothing: only its parent can reap it
        return None
    return int(fields[1]), int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _processes() -> dict[int, tuple[int, int]]:
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _stat(int(d))
            if st is not None:
                out[int(d)] = st
    return out


def _alive(pid: int, start: int) -> bool:
    st = _stat(pid)
    return st is not None and st[1] == start


@dataclass
class Node:
    """One Ray node: index (-1 for the head), its temp dir and the processes found so far."""
    index: int
    temp_dir: str
    agent_port: int
    cpus: float
    resources: dict = field(default_factory=dict)
    procs: dict[int, int] = field(default_factory=dict)  # pid -> start time
    killed: bool = False
    # other command lines of this node: all strings of one tuple present (the head's Ray Client
    # server names neither the temp dir nor a parent of the node: `ray start` has exited)
    also: list[tuple[str, ...]] = field(default_factory=list)

    def _mine(self, cmd: str) -> bool:
        return self.temp_dir in cmd or any(all(s in cmd for s in t) for t in self.also)

    @property
    def is_head(self) -> bool:
        return self.index < 0

    def scan(self) -> dict[int, int]:
        """Add this node's current processes (by temp dir in the command line, plus descendants)."""
        table = _processes()
        mine = {pid for pid in table if self._mine(_cmdline(pid))}
        mine |= {pid for pid, start in self.procs.items() if pid in table and table[pid][1] == start}
        grew = True
        while grew:  # descendants: workers the raylet forked, helpers of the agents
            kids = {pid for pid, (ppid, _) in table.items() if ppid in mine and pid not in mine}
            grew = bool(kids)
            mine |= kids
        for pid in mine:
            self.procs[pid] = table[pid][1]
        return {pid: s for pid, s in self.procs.items() if _alive(pid, s)}

    def raylet_pid(self) -> int | None:
        for pid in self.scan():
            if "/raylet " in _cmdline(pid) or _cmdline(pid).startswith("raylet "):
                return pid
        return None

    def kill(self, grace_s: float = 3.0) -> None:
        """SIGKILL the raylet first (it starts no more workers), then SIGTERM the rest, SIGKILL
        what is left after `grace_s`; scans again until nothing of the node is alive."""
        raylet = self.raylet_pid()
        if raylet is not None:
            _signal(raylet, self.procs[raylet], signal.SIGKILL)
        for rnd in range(4):
            live = self.scan()
            if not live:
                break
            sig = signal.SIGTERM if rnd == 0 and grace_s > 0 else signal.SIGKILL
            for pid, start in live.items():
                _signal(pid, start, sig)
            deadline = time.time() + (grace_s if sig == signal.SIGTERM else 2.0)
            while time.time() < deadline and any(_alive(p, s) for p, s in live.items()):
                time.sleep(0.1)
        self.killed = True

    def alive(self) -> bool:
        return bool(self.scan())


def _signal(pid: int, start: int, sig) -> None:
    if _alive(pid, start):  # the same process we found, not a reused PID
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


# ------------------------------------------------------------------ the cluster

class RayNodes:
    """A head node and `workers` worker nodes started with `ray start` on 127.0.0.1.

    Args:
        workers: number of worker nodes.
        head_cpus: the head's --num-cpus (0: drivers run there, all tasks on worker nodes).
        worker_cpus: --num-cpus of each worker node.
        worker_resources: custom resources of every worker node ({"wnode": 1}), or a list with one
            dict per worker node.
        auth: "disabled" (RAY_AUTH_MODE=disabled) or "token" (a fresh token in this cluster's
            own directory, via RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH).
        env: extra environment for every node (and in `env`, for clients).
        start_timeout: seconds each `ray start` may take.

    Attributes (after start()): gcs_address ("127.0.0.1:PORT", for ray.init / --address /
    RAY_ADDRESS), address (the job / dashboard address "http://127.0.0.1:PORT"), dashboard_port,
    client_address ("ray://127.0.0.1:PORT"), env (the environment to run clients and drivers
    with), head and nodes (Node objects; nodes[i] is worker node i), root (the cluster's directory).
    """

    def __init__(self, workers: int = 1, *, head_cpus: float = 0, worker_cpus: float = 2,
                 worker_resources: dict | list[dict] | None = None, auth: str = "disabled",
                 env: dict | None = None, start_timeout: float = 120):
        if auth not in ("disabled", "token"):
            raise ValueError(f"auth must be 'disabled' or 'token', not {auth!r}")
        if isinstance(worker_resources, list) and len(worker_resources) != workers:
            raise ValueError("worker_resources: one dict per worker node")
        self.n_workers, self.head_cpus, self.worker_cpus = workers, head_cpus, worker_cpus
        self.worker_resources = worker_resources
        self.auth, self.start_timeout = auth, start_timeout
        # short: Ray's Unix socket paths (<temp>/session_<date>_<pid>/sockets/...) must fit 107 bytes
        self.root = tempfile.mkdtemp(prefix="rn", dir="/tmp")
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
        for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN"):
            self.env.pop(k, None)  # the nodes and their clients must not be steered to another cluster
        if auth == "disabled":
            self.env["RAY_AUTH_MODE"] = "disabled"
            self.env.pop("RAY_AUTH_TOKEN_PATH", None)
        else:
            token = Path(self.root) / "auth_token"
            token.write_text(secrets.token_hex(32))
            token.chmod(0o600)
            self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
        self.head: Node | None = None
        self.nodes: list[Node] = []
        self.gcs_address = self.address = self.client_address = ""
        self.dashboard_port = 0

    # ---------------------------------------------------------------- start / stop

    def _ray_start(self, args: list[str], node: Node) -> None:
        cmd = [str(RAY), "start", "--node-ip-address=127.0.0.1", f"--num-cpus={node.cpus:g}",
               f"--temp-dir={node.temp_dir}", f"--dashboard-agent-listen-port={node.agent_port}",
               "--disable-usage-stats", *args]
        if node.resources:
            cmd.append(f"--resources={json.dumps(node.resources)}")
        try:
            r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=self.start_timeout)
        except subprocess.TimeoutExpired as e:
            node.scan()
            raise RuntimeError(f"`ray start` of node {node.index} did not return within "
                               f"{self.start_timeout:.0f}s: {(e.stderr or '')[-2000:]}") from None
        finally:
            node.scan()
        if r.returncode != 0:
            raise RuntimeError(f"`ray start` of node {node.index} failed ({r.returncode}):\n"
                               f"{(r.stdout + r.stderr)[-3000:]}")

    def _node(self, index: int, cpus: float, resources: dict) -> Node:
        d = os.path.join(self.root, "h" if index < 0 else f"w{index}")
        os.mkdir(d)
        return Node(index, d, free_port(), cpus, dict(resources or {}))

    def start(self) -> "RayNodes":
        try:
            gcs, dash, client = free_port(), free_port(), free_port()
            # every process of the cluster asks this dashboard for the State API: with no address, Ray
            # looks for "the" Ray of the machine and finds several (Train V2's placement-group
            # cleaner then fails, or asks another cluster; see gtc_ray/train/cluster.py)
            self.env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dash}"
            self.head = self._node(-1, self.head_cpus, {})
            self.head.also.append(("ray.util.client.server", f"--port={client} "))
            self._ray_start(["--head", f"--port={gcs}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
                             "--include-dashboard=true", f"--ray-client-server-port={client}"], self.head)
            self.gcs_address, self.dashboard_port = f"127.0.0.1:{gcs}", dash
            self.address, self.client_address = f"http://127.0.0.1:{dash}", f"ray://127.0.0.1:{client}"
            for i in range(self.n_workers):
                self.add_node()
            self.wait_for_nodes(1 + self.n_workers)
        except BaseException:
            self.stop()
            raise
        return self

    def add_node(self, cpus: float | None = None, resources: dict | None = None) -> Node:
        """Start one more worker node (index len(nodes)) and return it."""
        i = len(self.nodes)
        if resources is None:
            wr = self.worker_resources
            resources = (wr[i] if isinstance(wr, list) and i < len(wr) else wr if isinstance(wr, dict) else {})
        node = self._node(i, self.worker_cpus if cpus is None else cpus, resources)
        self.nodes.append(node)
        self._ray_start([f"--address={self.gcs_address}"], node)
        return node

    def stop(self) -> None:
        """Kill every node of this cluster by PID (worker nodes first), then remove its directory."""
        for node in [*reversed(self.nodes), *([self.head] if self.head else [])]:
            try:
                node.kill()
            except Exception as e:  # keep stopping the others
                print(f"raynodes: stopping node {node.index}: {e}", file=sys.stderr)
        shutil.rmtree(self.root, ignore_errors=True)

    def kill_node(self, i: int, wait_dead_s: float | None = None) -> None:
        """Lose worker node i: SIGKILL its raylet, then its workers and agents. With `wait_dead_s`,
        wait until the GCS reports the node dead (it notices by missed health checks)."""
        node = self.nodes[i]
        before = self.alive_nodes() if wait_dead_s else None
        node.kill(grace_s=0)
        if wait_dead_s:
            self.wait_for_nodes(before - 1, timeout=wait_dead_s)

    # ---------------------------------------------------------------- queries

    def node_states(self) -> list[dict]:
        """The State API's node list (node_id, state, resources_total, ...), from the dashboard."""
        req = urllib.request.Request(f"{self.address}/api/v0/nodes?limit=1000")
        if self.auth == "token":
            req.add_header("Authorization", f"Bearer {Path(self.env['RAY_AUTH_TOKEN_PATH']).read_text().strip()}")
        with urllib.request.urlopen(req, timeout=10) as r:
            body = json.loads(r.read())
        return body["data"]["result"]["result"]

    def alive_nodes(self) -> int:
        return sum(n.get("state") == "ALIVE" for n in self.node_states())

    def wait_for_nodes(self, n: int, timeout: float = 60) -> None:
        deadline, last = time.time() + timeout, None
        while time.time() < deadline:
            try:
                last = self.alive_nodes()
                if last == n:
                    return
            except OSError as e:  # the dashboard may still be starting
                last = e
            time.sleep(0.5)
        raise TimeoutError(f"the cluster did not reach {n} alive nodes in {timeout:.0f}s (last: {last})")

    def head_alive(self) -> bool:
        """The head's processes run and its GCS accepts connections."""
        if self.head is None or not self.head.alive():
            return False
        host, port = self.gcs_address.rsplit(":", 1)
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return True
        except OSError:
            return False

    def __enter__(self) -> "RayNodes":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
