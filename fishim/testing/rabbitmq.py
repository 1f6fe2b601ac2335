"""Run a throwaway RabbitMQ cluster with the MQTT plugin (Debian's ``rabbitmq-server``) for tests.

Every node gets its own name (``fishimN-<id>@localhost``), data and log dirs under one temp dir,
its own AMQP, MQTT and Erlang distribution ports on 127.0.0.1, and the plugin enabled; the nodes
share one Erlang cookie and one ``epmd`` (Erlang's port mapper) that this harness starts itself on
a free loopback port, so nothing outside the temp dir and nothing beyond loopback is touched.
The nodes form the cluster at boot from a static node list (``cluster_formation.classic_config``);
if they came up apart, nodes 2..n join node 1 with ``rabbitmqctl join_cluster``.
:meth:`RabbitCluster.kill` SIGKILLs a node's Erlang VM, like a machine dying; :meth:`close` stops
everything it started, by pid.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from fishim.testing import Managed, free_port, wait_for_port

__all__ = ["RabbitCluster", "find_rabbitmq"]

log = logging.getLogger("fishim.testing.rabbitmq")

_BIN = Path("/usr/lib/rabbitmq/bin")
_LOOPBACK_DIST = "-kernel inet_dist_use_interface {127,0,0,1}"


def find_rabbitmq() -> Path | None:
    """Directory of ``rabbitmq-server`` and ``rabbitmqctl`` (Debian's package), or None."""
    return _BIN if (_BIN / "rabbitmq-server").exists() and shutil.which("erl") else None


@dataclass
class RabbitNode:
    index: int
    name: str
    amqp_port: int
    mqtt_port: int
    dist_port: int
    dir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def pid_file(self) -> Path:
        return self.dir / "node.pid"

    def vm_pid(self) -> int | None:
        """The Erlang VM's OS pid (the node writes it to its pid file once it runs)."""
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


class RabbitCluster(Managed):
    """``nodes`` RabbitMQ nodes clustered together, MQTT on each; use as a context manager.

    ``mirror_sessions`` (default) sets a classic-mirrored-queue policy on the plugin's session
    queues (``mqtt-subscription-*``) so a persistent session outlives the node it was created on.
    """

    def __init__(self, nodes: int = 2, *, mirror_sessions: bool = True, startup_timeout: float = 90.0) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="fishim-rabbit-"))
        self.epmd_port = free_port()
        self.mirror_sessions = mirror_sessions
        self.startup_timeout = startup_timeout
        tag = secrets.token_hex(3)
        self.nodes = [RabbitNode(i, f"fishim{i}-{tag}@localhost", free_port(), free_port(), free_port(),
                                 self.root / f"n{i}") for i in range(1, nodes + 1)]
        (self.root / ".erlang.cookie").write_text(secrets.token_hex(16))
        (self.root / ".erlang.cookie").chmod(0o400)
        self._epmd: subprocess.Popen[bytes] | None = None
        self._finalizer = weakref.finalize(self, RabbitCluster._cleanup, self._procs_ref())

    def _procs_ref(self) -> list[subprocess.Popen[bytes]]:
        self._procs: list[subprocess.Popen[bytes]] = []
        return self._procs

    @staticmethod
    def _cleanup(procs: list[subprocess.Popen[bytes]]) -> None:
        for proc in reversed(procs):
            _kill_group(proc)

    # -- environment ----------------------------------------------------------------------------

    def _env(self, node: RabbitNode | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(HOME=str(self.root), ERL_EPMD_PORT=str(self.epmd_port), ERL_EPMD_ADDRESS="127.0.0.1",
                   RABBITMQ_CONF_ENV_FILE="/dev/null", RABBITMQ_CTL_ERL_ARGS=_LOOPBACK_DIST,
                   LANG="C.UTF-8", LC_ALL="C.UTF-8")
        if node is not None:
            env.update(
                RABBITMQ_NODENAME=node.name, RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
                RABBITMQ_NODE_PORT=str(node.amqp_port), RABBITMQ_DIST_PORT=str(node.dist_port),
                RABBITMQ_MNESIA_BASE=str(node.dir / "mnesia"), RABBITMQ_LOG_BASE=str(node.dir / "log"),
                RABBITMQ_CONFIG_FILE=str(node.dir / "rabbitmq.conf"),
                RABBITMQ_ADVANCED_CONFIG_FILE=str(node.dir / "advanced.config"),
                RABBITMQ_ENABLED_PLUGINS_FILE=str(node.dir / "enabled_plugins"),
                RABBITMQ_PID_FILE=str(node.pid_file), RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=_LOOPBACK_DIST)
        return env

    def _config(self, node: RabbitNode) -> str:
        return "\n".join([
            f"listeners.tcp.default = 127.0.0.1:{node.amqp_port}",
            f"mqtt.listeners.tcp.default = 127.0.0.1:{node.mqtt_port}",
            "mqtt.allow_anonymous = true",
            "mqtt.vhost = /",
            "mqtt.exchange = amq.topic",
            "cluster_partition_handling = ignore",  # 2 nodes: the survivor of a 1-1 split must not pause
            # the nodes find each other at boot (no stop_app / join_cluster / start_app round trips)
            "cluster_formation.peer_discovery_backend = classic_config",
            *(f"cluster_formation.classic_config.nodes.{n.index} = {n.name}" for n in self.nodes),
            "disk_free_limit.absolute = 50MB",
            "log.console = false",
            "log.file.level = info",
            "",
        ])

    def ctl(self, node: RabbitNode, *args: str, timeout: float = 60.0) -> str:
        """``rabbitmqctl -n NODE ARGS``; raises with its output if it fails."""
        done = subprocess.run([str(_BIN / "rabbitmqctl"), "-n", node.name, *args], env=self._env(),
                              capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} on {node.name} failed ({done.returncode}):\n"
                               f"{done.stdout}\n{done.stderr}")
        return done.stdout

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> RabbitCluster:
        self._epmd = subprocess.Popen(["epmd", "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                                      env=self._env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True)
        self._procs.append(self._epmd)
        wait_for_port(self.epmd_port, timeout=10, proc=self._epmd)
        for node in self.nodes:
            node.dir.mkdir(parents=True)
            (node.dir / "rabbitmq.conf").write_text(self._config(node))
            (node.dir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")  # = rabbitmq-plugins enable
            self._launch(node)
        for node in self.nodes:
            self._await(node)
            wait_for_port(node.mqtt_port, timeout=self.startup_timeout)
        first = self.nodes[0]
        if self._running(first) != len(self.nodes):  # booted apart (each saw no peer yet): join by hand
            for node in self.nodes[1:]:
                self.ctl(node, "stop_app")
                self.ctl(node, "join_cluster", first.name)
                self.ctl(node, "start_app")
                self.ctl(node, "await_startup", timeout=self.startup_timeout)
            if self._running(first) != len(self.nodes):
                raise RuntimeError(f"rabbitmq nodes did not form one cluster:\n{self.log_tail(first)}")
        if self.mirror_sessions:
            self.ctl(first, "set_policy", "--apply-to", "queues", "fishim-mqtt-sessions", "^mqtt-subscription-",
                     '{"ha-mode":"all","ha-sync-mode":"automatic"}')
        log.info("rabbitmq cluster up nodes=%s", [n.name for n in self.nodes])
        return self

    def _running(self, node: RabbitNode) -> int:
        """How many nodes of ``node``'s cluster run."""
        return int(self.ctl(node, "eval", "length(rabbit_nodes:all_running()).").strip())

    def _launch(self, node: RabbitNode) -> None:
        with open(node.dir / "server.out", "ab") as out:
            node.proc = subprocess.Popen([str(_BIN / "rabbitmq-server")], env=self._env(node),
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self._procs.append(node.proc)

    def _await(self, node: RabbitNode) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            try:
                self.ctl(node, "await_startup", "--timeout", "10", timeout=30)
                return
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                if node.proc is not None and node.proc.poll() is not None:
                    raise RuntimeError(f"rabbitmq node {node.name} exited:\n{self.log_tail(node)}") from exc
                if time.monotonic() > deadline:
                    raise TimeoutError(f"rabbitmq node {node.name} not up:\n{self.log_tail(node)}") from exc

    def kill(self, node: RabbitNode) -> None:
        """SIGKILL the node's Erlang VM and its launcher: no clean shutdown of any kind."""
        pid = node.vm_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if node.proc is not None:
            _kill_group(node.proc)
        log.info("rabbitmq node killed name=%s pid=%s", node.name, pid)

    def log_tail(self, node: RabbitNode, lines: int = 30) -> str:
        texts = [p.read_text(errors="replace") for p in sorted((node.dir / "log").glob("*.log"))] if (
            node.dir / "log").exists() else []
        out = node.dir / "server.out"
        texts.append(out.read_text(errors="replace") if out.exists() else "")
        return "\n".join("\n".join(texts).splitlines()[-lines:])

    def close(self) -> None:
        for node in self.nodes:
            pid = node.vm_pid()
            if node.proc is not None and node.proc.poll() is None and pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._finalizer()
        shutil.rmtree(self.root, ignore_errors=True)
