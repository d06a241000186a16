"""A real one-node Ray cluster on 127.0.0.1, started with ``ray start --head --block``.

It is the laptop stand-in for a cluster: jobs reach it only through ``ray job submit`` (its job
server lives in the dashboard process, so the dashboard is on, bound to 127.0.0.1), exactly as
on a GPU cluster. Every port is picked free, the session folder is its own, and stopping it
signals only its own process group: it never touches another Ray on the machine (``ray stop``
would stop them all).

    with LocalCluster(num_cpus=4) as c:
        subprocess.run(["rayembed", "submit", "train", "--address", c.dashboard_url, ...])
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

logger = logging.getLogger(__name__)


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that were free on 127.0.0.1 a moment ago."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def ray_executable() -> str:
    """The ``ray`` CLI of this Python environment (falls back to PATH)."""
    beside = Path(sys.executable).with_name("ray")
    if beside.exists():
        return str(beside)
    found = shutil.which("ray")
    if not found:
        raise FileNotFoundError("The `ray` command is not installed; pip install 'ray[default]'.")
    return found


def _pgid_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            members.append(int(entry.name))
    return members


class LocalCluster:
    """``ray start --head --block`` on 127.0.0.1 with free ports, its own temp dir and auth mode.

    ``auth_mode`` is exported as RAY_AUTH_MODE to the cluster; with ``"token"``, ``token_path``
    (a file holding the token) is exported as RAY_AUTH_TOKEN_PATH. Clients must use the same
    two variables: :meth:`client_env` returns them.
    """

    def __init__(self, *, num_cpus: int = 4, object_store_mb: int = 256, auth_mode: str = "disabled",
                 token_path: str | os.PathLike | None = None, temp_root: str = "/tmp",
                 env: dict[str, str] | None = None, start_timeout_s: float = 180.0):
        if auth_mode not in ("disabled", "token"):
            raise ValueError(f"auth_mode must be 'disabled' or 'token', got {auth_mode!r}.")
        if auth_mode == "token" and not token_path:
            raise ValueError("auth_mode='token' needs token_path, a file holding the cluster token.")
        self.num_cpus = num_cpus
        self.object_store_mb = object_store_mb
        self.auth_mode = auth_mode
        self.token_path = str(token_path) if token_path else None
        self.temp_root = temp_root
        self.extra_env = dict(env or {})
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.temp_dir: str | None = None
        self.gcs_port = self.dashboard_port = 0
        self.log_path: Path | None = None

    # ----------------------------------------------------------------------------- addresses

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """What ``ray job submit --address`` takes."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def client_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment for ``ray job submit`` and friends that matches the cluster's auth."""
        env = dict(os.environ if base is None else base)
        env["RAY_AUTH_MODE"] = self.auth_mode
        env.pop("RAY_AUTH_TOKEN", None)
        if self.token_path:
            env["RAY_AUTH_TOKEN_PATH"] = self.token_path
        else:
            env.pop("RAY_AUTH_TOKEN_PATH", None)
        env.pop("RAY_ADDRESS", None)
        return env

    # ----------------------------------------------------------------------------- lifecycle

    def start(self) -> LocalCluster:
        if self.proc is not None:
            raise RuntimeError("This LocalCluster is already started.")
        # Short prefix: Ray's unix sockets live under the temp dir and paths are capped at 107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="rc", dir=self.temp_root)
        (gcs, dash, client, nm, om, agent_http, agent_grpc, renv, metrics) = free_ports(9)
        self.gcs_port, self.dashboard_port = gcs, dash
        cmd = [
            ray_executable(), "start", "--head", "--block",
            "--temp-dir", self.temp_dir,
            "--port", str(gcs),
            "--num-cpus", str(self.num_cpus), "--num-gpus", "0",
            "--object-store-memory", str(self.object_store_mb * 1024 * 1024),
            # The job server lives in the dashboard process: without it `ray job submit` has nothing to talk to.
            "--include-dashboard", "true",
            "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(dash),
            "--ray-client-server-port", str(client),
            "--node-manager-port", str(nm),
            "--object-manager-port", str(om),
            "--dashboard-agent-listen-port", str(agent_http),
            "--dashboard-agent-grpc-port", str(agent_grpc),
            "--runtime-env-agent-port", str(renv),
            "--metrics-export-port", str(metrics),
            "--disable-usage-stats",
        ]
        env = self.client_env()
        env.update(
            {
                # Binds every Ray socket to 127.0.0.1 (--node-ip-address alone is not enough).
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                "RAY_USAGE_STATS_ENABLED": "0",
                # Jobs' `python` must be this environment's interpreter.
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            }
        )
        env.update(self.extra_env)
        self.log_path = Path(self.temp_dir) / "ray_start.log"
        t0 = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        logger.info("Local Ray cluster up in %.1f s: %s (dashboard %s, auth %s)",
                    time.perf_counter() - t0, self.gcs_address, self.dashboard_url, self.auth_mode)
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        headers = {}
        if self.auth_mode == "token":
            headers["Authorization"] = f"Bearer {Path(self.token_path).read_text().strip()}"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"`ray start` exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                req = urllib.request.Request(f"{self.dashboard_url}/api/version", headers=headers)
                with urllib.request.urlopen(req, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(
            f"The local Ray cluster's job server did not answer within {self.start_timeout_s:.0f} s.\n"
            f"{self.log_tail()}"
        )

    def log_tail(self, n: int = 40) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def processes(self) -> list[int]:
        """Live processes of this cluster (its process group)."""
        if self.proc is None:
            return []
        return _pgid_members(self.proc.pid)

    def stop(self, grace_s: float = 8.0) -> None:
        """SIGTERM this cluster's process group, SIGKILL what is left after ``grace_s``, remove its files.

        Raises RuntimeError if any of its processes survive (never signals anything else).
        """
        if self.proc is None:
            return
        pgid = self.proc.pid
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _pgid_members(pgid):
                time.sleep(0.2)
            if not _pgid_members(pgid):
                break
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        left = _pgid_members(pgid)
        self.proc = None
        if left:
            raise RuntimeError(f"Processes of the local Ray cluster survived SIGKILL: {left}")
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
