"""A real multi-node Ray cluster on one machine (tests, bench/scale.py): a head and worker nodes, each a
separate `ray start --block` process group with its own resources, so a test can kill
one node (SIGKILL to its process group) while the others go on."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    def __init__(self, workers: int = 2, cpus_per_worker: int = 1, object_store_mb: int = 150, auth_mode: str | None = None):
        """``auth_mode`` ("token" or "disabled") sets the nodes' RAY_AUTH_MODE; by default
        they inherit this process's."""
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.ray = os.path.join(os.path.dirname(sys.executable), "ray")
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        if auth_mode:
            self.env["RAY_AUTH_MODE"] = auth_mode
        store = str(object_store_mb * 1024 * 1024)
        self.head = self._start(["--head", f"--port={self.port}", "--num-cpus=0", "--include-dashboard=false",
                                 f"--object-store-memory={store}"])
        self.workers: list[subprocess.Popen] = []
        try:
            # with token auth on, the head uses (or writes) ~/.ray/auth_token; worker nodes and
            # drivers given an explicit address join with it. Without a token, auth is off.
            token = os.path.expanduser("~/.ray/auth_token")
            deadline = time.time() + 60
            while auth_mode != "disabled" and not os.path.exists(token) and time.time() < deadline and self.head.poll() is None:
                time.sleep(0.2)
            if os.path.exists(token) and auth_mode != "disabled":
                self.env.setdefault("RAY_AUTH_MODE", "token")
            self._wait_nodes(1)
            for _ in range(workers):
                self.add_worker(cpus_per_worker, object_store_mb)
        except BaseException:
            self.stop()
            raise

    def _start(self, args: list[str]) -> subprocess.Popen:
        return subprocess.Popen([self.ray, "start", "--block", *args], env=self.env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def add_worker(self, cpus: int = 1, object_store_mb: int = 150) -> int:
        i = len(self.workers)
        self.workers.append(self._start([f"--address={self.address}", f"--num-cpus={cpus}",
                                         f"--object-store-memory={object_store_mb * 1024 * 1024}",
                                         f'--resources={{"worker{i}": 1}}']))
        self._wait_nodes(1 + len([w for w in self.workers if w.poll() is None]))
        return i

    def alive_nodes(self) -> int:
        code = ("from mmloom.curate.runner import init_ray; import ray; init_ray('%s'); "
                "print(sum(1 for n in ray.nodes() if n['Alive']))" % self.address)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=self.env, timeout=120)
        try:
            return int(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return 0

    def _wait_nodes(self, n: int, timeout: float = 600) -> None:
        """Until ``n`` nodes are registered: returns at once when they are; the ceiling is
        for a machine so loaded that node start-up takes minutes."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.alive_nodes() >= n:
                return
            time.sleep(1)
        raise RuntimeError(f"Ray cluster at {self.address} did not reach {n} nodes")

    def node_of(self, pid: int) -> int | None:
        """Which worker node a process belongs to (Ray may give workers their own process
        group, so walk up the parents to a `ray start` process group we started)."""
        groups = {w.pid: i for i, w in enumerate(self.workers) if w.poll() is None}
        while pid > 1:
            try:
                if os.getpgid(pid) in groups:
                    return groups[os.getpgid(pid)]
                with open(f"/proc/{pid}/stat") as f:
                    pid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ProcessLookupError):
                return None
        return None

    def kill_worker(self, i: int) -> None:
        os.killpg(self.workers[i].pid, signal.SIGKILL)
        self.workers[i].wait()

    def stop(self) -> None:
        for p in [*self.workers, self.head]:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
