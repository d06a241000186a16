"""A real one-node Ray cluster on 127.0.0.1, started with ``ray start --head --block``.

It is the laptop stand-in for a cluster: jobs reach it only through ``ray job submit`` (its job
server lives in the dashboard process, so the dashboard is on, bound to 127.0.0.1), exactly as
on a GPU cluster. Every port is picked free, the session folder is its own, and stopping it
signals only its own processes, by pid (those of the OS session its ``ray start`` leads): it
never touches another Ray on the machine (``ray stop`` would stop them all).

    with LocalCluster(num_cpus=4) as c:
        subprocess.run(["rayembed", "submit", "train", "--address", c.dashboard_url, ...])

``AutoscalingLocalCluster`` is a head whose autoscaler (v2, Ray's fake multi-node provider)
adds worker nodes of one type on this machine when work asks for their resources, and removes
them when idle:

    with AutoscalingLocalCluster(worker_resources={"CPU": 1, "encoder": 1}, idle_timeout_minutes=0.2) as c:
        ray.init(address=c.gcs_address)
"""

from __future__ import annotations

import json
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
from typing import Any

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


def _session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes whose session is ``sid``.

    ``ray start`` runs as the leader of a session of its own. Ray's worker processes put
    themselves in process groups of their own (so a process-group signal misses them) but stay in
    the session, also once their raylet is gone and they are reparented.
    """
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, session = fields[0], int(fields[3])
        if session == sid and state != "Z":
            members.append(int(entry.name))
    return members


class RayStartError(RuntimeError):
    """``ray start`` itself exited while the cluster was starting."""


class LocalCluster:
    """``ray start --head --block`` on 127.0.0.1 with free ports, its own temp dir and auth mode.

    ``auth_mode`` is exported as RAY_AUTH_MODE to the cluster; with ``"token"``, ``token_path``
    (a file holding the token) is exported as RAY_AUTH_TOKEN_PATH. Clients must use the same
    two variables: :meth:`client_env` returns them.
    """

    def __init__(self, *, num_cpus: int = 4, object_store_mb: int = 256, auth_mode: str = "disabled",
                 token_path: str | os.PathLike | None = None, temp_root: str = "/tmp",
                 env: dict[str, str] | None = None, start_timeout_s: float = 180.0, start_attempts: int = 1):
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
        # On a loaded machine `ray start` can give up by itself ("The current node timed out during
        # startup": Ray waits 30 s, hard-coded, for its raylet to register): start afresh then.
        self.start_attempts = max(1, start_attempts)
        self.proc: subprocess.Popen | None = None
        self._sid: int | None = None  # the session `ray start` leads; remembered to check after stop()
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
        for attempt in range(1, self.start_attempts + 1):
            try:
                return self._start_once()
            except RayStartError as e:
                if attempt == self.start_attempts:
                    raise
                logger.warning("Starting the local Ray cluster failed (attempt %d of %d), starting afresh: %s",
                               attempt, self.start_attempts, str(e).splitlines()[0])
        raise AssertionError("unreachable")

    def _start_once(self) -> LocalCluster:
        # Short prefix: Ray's unix sockets live under the temp dir and paths are capped at 107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="rc", dir=self.temp_root)
        cmd = self._command()
        env = self._env()
        self.log_path = Path(self.temp_dir) / "ray_start.log"
        t0 = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        self._sid = self.proc.pid
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        logger.info("Local Ray cluster up in %.1f s: %s (dashboard %s, auth %s)",
                    time.perf_counter() - t0, self.gcs_address, self.dashboard_url, self.auth_mode)
        return self

    def _command(self) -> list[str]:
        """``ray start --head --block`` with every port picked free (sets gcs_port and dashboard_port)."""
        return self._head_command(include_dashboard=True)

    def _head_command(self, *, include_dashboard: bool, extra: list[str] = (),
                      ports: tuple[int, ...] | None = None) -> list[str]:
        """The head's ``ray start`` line on free ports, ``extra`` flags appended.

        Without the dashboard Ray still starts a minimal one (usage stats) on --dashboard-port,
        so it gets a free port on 127.0.0.1 either way, never the shared default 8265. The job
        server lives in the dashboard process: without it `ray job submit` has nothing to talk to.
        """
        (gcs, dash, client, nm, om, agent_http, agent_grpc, renv, metrics) = ports or free_ports(9)
        self.gcs_port = gcs
        self.dashboard_port = dash if include_dashboard else 0
        return [
            ray_executable(), "start", "--head", "--block",
            "--temp-dir", self.temp_dir,
            "--port", str(gcs),
            "--num-cpus", str(self.num_cpus), "--num-gpus", "0",
            "--object-store-memory", str(self.object_store_mb * 1024 * 1024),
            "--include-dashboard", "true" if include_dashboard else "false",
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
            *extra,
        ]

    def _env(self) -> dict[str, str]:
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
        return env

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        headers = {}
        if self.auth_mode == "token":
            headers["Authorization"] = f"Bearer {Path(self.token_path).read_text().strip()}"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RayStartError(f"`ray start` exited with {self.proc.returncode}:\n{self.log_tail()}")
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
        """Live processes of this cluster (the session its ``ray start`` leads); also after :meth:`stop`."""
        if self._sid is None:
            return []
        return _session_members(self._sid)

    def _signal(self, sig: int) -> bool:
        """Send ``sig`` to every process of this cluster, by pid; False when none was left."""
        pids = self.processes()
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return bool(pids)

    def stop(self, grace_s: float = 8.0) -> None:
        """Stop this cluster's processes, by pid, and remove its files.

        First SIGTERM to ``ray start`` alone, which stops the head's processes in order (about 2 s);
        then SIGTERM to whatever is left (nodes it did not start, workers), and SIGKILL after 2 s.
        Raises RuntimeError if any of its processes survive (never signals anything else).
        """
        if self.proc is None:
            return
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        leader_s, leftover = time.monotonic() - t0, self.processes()
        for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 10.0)):
            if not self._signal(sig):
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and self.processes():
                time.sleep(0.2)
            if not self.processes():
                break
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        left = self.processes()
        self.proc = None
        logger.info("Stopped the local Ray cluster in %.1f s (`ray start` gone after %.1f s; %d processes signalled "
                    "after it)", time.monotonic() - t0, leader_s, len(leftover))
        if left:
            raise RuntimeError(f"Processes of the local Ray cluster survived SIGKILL: {left}")
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ------------------------------------------------------------------------------ autoscaling

FAKE_HEAD_NODE_ID = "f" * 51 + "00000"  # what Ray's fake provider calls its head (ids count up from it)


def _ancestors() -> set[int]:
    """This process and its parents (never signalled, whatever their command lines say)."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def _cmdline_members(temp_dir: str | None, address: str | None) -> list[int]:
    """Live processes whose command line names ``temp_dir`` (or a path in it) or ends an argument
    with ``address`` (``--address=127.0.0.1:<port>``, ``--gcs-address=...``)."""
    members, skip = [], _ancestors()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z":
            continue
        for a in args:
            if temp_dir and (a == temp_dir or f"{temp_dir}/" in a or a.endswith(f"={temp_dir}")):
                members.append(int(entry.name))
                break
            if address and (a == address or a.endswith(f"={address}")):
                members.append(int(entry.name))
                break
    return members


def fake_provider_defaults_path() -> Path:
    """Where Ray's fake multi-node provider reads its default cluster config from."""
    import ray.autoscaler._private.fake_multi_node as fake

    return Path(fake.__file__).with_name("example.yaml")


def ensure_fake_provider_defaults(config: dict[str, Any]) -> Path:
    """Write the fake provider's defaults file when the Ray wheel lacks it (Ray 2.60 does).

    Autoscaler v2's monitor loads ``fake_multi_node/example.yaml`` for defaults and crashes
    without it (``monitor.err``). The copy is ``config`` without its cluster-specific GCS
    address; every key a cluster YAML sets overrides it. An existing file is never touched.
    """
    import yaml

    path = fake_provider_defaults_path()
    if path.exists():
        return path
    defaults = json.loads(json.dumps(config))
    defaults["provider"].pop("gcs_address", None)
    fd, tmp = tempfile.mkstemp(prefix=".example.", suffix=".yaml", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(defaults, f, sort_keys=False)
        if not path.exists():  # another process may have written it meanwhile: keep theirs
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("Wrote the fake provider's missing defaults file %s", path)
    return path


class AutoscalingLocalCluster(LocalCluster):
    """A head on 127.0.0.1 whose autoscaler (v2) adds and removes worker nodes on this machine.

    It uses Ray's fake multi-node provider: the autoscaler "launches" a worker node by starting a
    raylet of its own on this machine, with the node type's resources, and stops it once it has
    been idle for ``idle_timeout_minutes``. One worker node type, ``worker_type``, offers
    ``worker_resources`` (``{"CPU": 1, "encoder": 1}``: work that asks for ``encoder`` only runs
    on such nodes), between ``min_workers`` and ``max_workers`` of them. The head offers
    ``num_cpus`` CPUs and no custom resources.

    The worker nodes are children of the head's autoscaler process and use the head's temp dir;
    :meth:`processes` finds them, with everything else of this cluster, by OS session (the one
    ``ray start`` leads) and by command line (the temp dir, or ``--address=127.0.0.1:<gcs port>``
    for the Ray client server), and :meth:`stop` stops exactly those, by pid.

        with AutoscalingLocalCluster(idle_timeout_minutes=0.2) as c:
            ray.init(address=c.gcs_address)
    """

    def __init__(self, *, num_cpus: int = 1, object_store_mb: int = 256,
                 worker_type: str = "ray.worker.encoder",
                 worker_resources: dict[str, float] | None = None, min_workers: int = 0, max_workers: int = 2,
                 worker_object_store_mb: int = 256, idle_timeout_minutes: float = 1.0,
                 update_interval_s: float = 1.0, include_dashboard: bool = False, start_attempts: int = 2,
                 **kwargs):
        super().__init__(num_cpus=num_cpus, object_store_mb=object_store_mb, start_attempts=start_attempts, **kwargs)
        self.worker_type = worker_type
        self.worker_resources = dict(worker_resources or {"CPU": 1, "encoder": 1})
        self.min_workers, self.max_workers = min_workers, max_workers
        self.worker_object_store_mb = worker_object_store_mb
        self.idle_timeout_minutes = idle_timeout_minutes
        self.update_interval_s = update_interval_s
        self.include_dashboard = include_dashboard
        self.config_path: Path | None = None

    def cluster_config(self) -> dict[str, Any]:
        """The cluster YAML the head's autoscaler runs with (needs :attr:`gcs_port`)."""
        resources = dict(self.worker_resources)
        resources.setdefault("object_store_memory", self.worker_object_store_mb * 1024 * 1024)
        return {
            "cluster_name": f"rayembed-fake-{self.gcs_port}",
            "max_workers": self.max_workers,
            "provider": {
                "type": "fake_multinode",
                "gcs_address": self.gcs_address,
                "launch_multiple": True,
                "head_node_id": FAKE_HEAD_NODE_ID,
            },
            "available_node_types": {
                "ray.head.default": {"resources": {}, "node_config": {}, "max_workers": 0},
                self.worker_type: {
                    "resources": resources,
                    "node_config": {},
                    "min_workers": self.min_workers,
                    "max_workers": self.max_workers,
                },
            },
            "head_node_type": "ray.head.default",
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": self.idle_timeout_minutes,
            "docker": {},
            "auth": {},
            "file_mounts": {},
            "cluster_synced_files": [],
            "file_mounts_sync_continuously": False,
            "rsync_exclude": [],
            "rsync_filter": [],
            "initialization_commands": [],
            "setup_commands": [],
            "head_setup_commands": [],
            "worker_setup_commands": [],
            "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
        }

    def _command(self) -> list[str]:
        import yaml

        ports = tuple(free_ports(9))
        self.gcs_port = ports[0]  # the cluster YAML names the head's address
        config = self.cluster_config()
        self.config_path = Path(self.temp_dir) / "autoscaler.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        ensure_fake_provider_defaults(config)
        return self._head_command(include_dashboard=self.include_dashboard, ports=ports,
                                  extra=["--autoscaling-config", str(self.config_path)])

    def _env(self) -> dict[str, str]:
        env = super()._env()
        env.update(
            {
                "RAY_FAKE_CLUSTER": "1",
                "RAY_enable_autoscaler_v2": "1",
                # The head's own node id must be the one the fake provider calls its head; the worker
                # nodes it starts get their ids (fff...00001, ...) from the provider, not from here.
                "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
                "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID,
                "AUTOSCALER_UPDATE_INTERVAL_S": f"{self.update_interval_s:g}",
            }
        )
        return env

    def start(self) -> AutoscalingLocalCluster:
        super().start()
        return self

    def status(self, timeout: int = 5):
        """The autoscaler's view (``ray.autoscaler.v2.schema.ClusterStatus``): nodes, launches, demands."""
        from ray.autoscaler.v2.sdk import get_cluster_status

        return get_cluster_status(self.gcs_address, timeout=timeout)

    def _wait_ready(self) -> None:
        """Until the GCS answers, the head is alive and the autoscaler has reported its state."""
        deadline = time.monotonic() + self.start_timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RayStartError(f"`ray start` exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                st = self.status(timeout=2)
                heads = [n for n in st.active_nodes + st.idle_nodes if n.instance_id == FAKE_HEAD_NODE_ID]
                if heads and st.stats.autoscaler_version:
                    return
            except Exception as e:  # the GCS is not up yet
                last_error = e
            time.sleep(0.5)
        raise TimeoutError(
            f"The autoscaling Ray head at {self.gcs_address} was not ready within {self.start_timeout_s:.0f} s "
            f"(last error: {last_error!r}).\n{self.log_tail()}\n{self.monitor_log_tail()}"
        )

    def monitor_log_tail(self, n: int = 40) -> str:
        """The autoscaler's stderr (where it says why it crashed)."""
        if not self.temp_dir:
            return ""
        files = sorted(Path(self.temp_dir).glob("session_*/logs/monitor.err"))
        if not files:
            return ""
        return "\n".join(files[-1].read_text(errors="replace").splitlines()[-n:])

    def processes(self) -> list[int]:
        """Live processes of this cluster: its session, and anything naming its temp dir or GCS address.

        The autoscaled worker nodes are in the session too (the autoscaler starts them); the
        command lines are a second net. Works after :meth:`stop` too (to prove nothing is left).
        """
        if self._sid is None:
            return []
        pids = set(super().processes())
        pids.update(_cmdline_members(self.temp_dir, self.gcs_address if self.gcs_port else None))
        return sorted(pids - _ancestors())

    def stop(self, grace_s: float = 8.0) -> None:
        temp_dir = self.temp_dir
        super().stop(grace_s)
        if temp_dir:  # a worker node may still have been writing into it while the base class removed it
            shutil.rmtree(temp_dir, ignore_errors=True)

    def __enter__(self) -> AutoscalingLocalCluster:
        return self.start()
