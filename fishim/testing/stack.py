"""A whole fishim (broker + bridge + SQLite store) on a free loopback port, for tests and scripts.

Sync, replay and the client library are only meaningful end to end: real broker, real bridge, real
store file. :class:`Stack` starts one of two shapes:

- ``"embedded"`` (default): ``python -m fishim up`` in a child process, exactly what the shop runs;
- ``"mosquitto"``: Debian's Mosquitto plus an in-process :class:`fishim.bridge.Bridge`, the
  "works unchanged against Mosquitto" shape.

Either way :meth:`Stack.start` returns only once a sync request is answered: the store is open and
sync is served, not merely the port open.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt
import yaml

from fishim.config import Config
from fishim.testing import Managed, free_port, wait_for_port

__all__ = ["Stack"]

log = logging.getLogger("fishim.testing.stack")

Kind = Literal["embedded", "mosquitto"]


class Stack(Managed):
    """Broker + bridge for ``db`` on ``127.0.0.1:port``.

    Args:
        db: the SQLite store (created if missing).
        kind: see the module docstring.
        config: prefix and limits to run with; store path and listener are overridden.
        probe: (username, password) for the readiness sync; anonymous ``probe`` by default (fine
            while the store has no accounts).
        port: listener port; a free one by default.
        extra_listeners: more ``listeners`` entries (``ws``, ``http``) after the default tcp one.
    """

    def __init__(self, db: Path, *, kind: Kind = "embedded", config: Config | None = None,
                 probe: tuple[str, str | None] = ("probe", None), port: int | None = None,
                 extra_listeners: list[dict[str, Any]] | None = None) -> None:
        self.db = Path(db).resolve()
        self.port = port or free_port()
        self.kind: Kind = kind
        base = (config or Config()).model_dump(mode="json")
        base["store"] = {"path": str(self.db)}
        base["listeners"] = [{"name": "default", "type": "tcp", "bind": f"127.0.0.1:{self.port}"},
                             *(extra_listeners or [])]
        self.config = Config.model_validate(base)
        self.probe = probe
        self.workdir = Path(tempfile.mkdtemp(prefix="fishim-stack-"))
        self.log_path = self.workdir / "fishim.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._mosquitto: Any = None
        self._bridge: Any = None

    def __repr__(self) -> str:
        return f"<Stack {self.kind} 127.0.0.1:{self.port} db={self.db}>"

    @property
    def bridge(self) -> Any:
        """The in-process :class:`~fishim.bridge.Bridge` (``mosquitto`` kind only, else None)."""
        return self._bridge

    def start(self, timeout: float = 30.0) -> Stack:
        if self.kind == "embedded":
            self._start_embedded(timeout)
        else:
            self._start_mosquitto(timeout)
        self.wait_ready(timeout)
        log.info("%r ready", self)
        return self

    def _start_embedded(self, timeout: float) -> None:
        config_file = self.workdir / "broker.yaml"
        data = self.config.model_dump(mode="json")
        data["logging"] = {"level": "INFO", "file": str(self.log_path)}
        config_file.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if k not in ("FISHIM_DB", "FISHIM_BIND")}
        env["FISHIM_CONFIG"] = str(config_file)
        with open(self.workdir / "stderr.log", "ab") as err:
            self._proc = subprocess.Popen([sys.executable, "-m", "fishim", "up"], env=env, cwd=self.workdir,
                                          stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.port, timeout=timeout, proc=self._proc)
        except BaseException:
            self.close()
            raise

    def _start_mosquitto(self, timeout: float) -> None:
        from fishim.bridge import Bridge
        from fishim.testing.mosquitto import Mosquitto

        self._mosquitto = Mosquitto(port=self.port, startup_timeout=timeout).start()
        self._bridge = Bridge(self.config, f"mqtt://127.0.0.1:{self.port}")
        self._bridge.start()
        self._bridge.wait_ready(timeout)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Publish sync requests until one is answered (the bridge serves sync once it is ready)."""
        user, password = self.probe
        client_id = f"probe-{uuid.uuid4().hex[:8]}"
        prefix = self.config.prefix
        answered = threading.Event()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
        client.username_pw_set(user, password)
        client.on_message = lambda *_a: answered.set()
        deadline = time.monotonic() + timeout
        try:
            client.connect("127.0.0.1", self.port)
            client.loop_start()
            client.subscribe([(f"{prefix}/sync/{user}/{client_id}/events", 1),
                                            (f"{prefix}/errors/{user}", 1)])
            while not answered.is_set():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self!r}: no sync reply within {timeout}s\n{self.log_tail()}")
                if self._proc is not None and self._proc.poll() is not None:
                    raise RuntimeError(f"{self!r}: fishim up exited {self._proc.returncode}\n{self.log_tail()}")
                client.publish(f"{prefix}/sync/{user}/{client_id}/request", json.dumps({"since": 0}), 1)
                answered.wait(1.0)
        finally:
            client.disconnect()
            client.loop_stop()

    def log_text(self) -> str:
        """Everything the broker and bridge logged so far (for failure messages and debugging)."""
        texts = []
        for path in (self.log_path, self.workdir / "stderr.log"):
            if path.exists():
                texts.append(path.read_text(errors="replace"))
        if self._mosquitto is not None:
            texts.append(self._mosquitto.log_text())
        return "\n".join(texts)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def close(self) -> None:
        """Stop everything (SIGTERM, then SIGKILL after 15 s for the child)."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(15)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(5)
            self._proc = None
        if self._bridge is not None:
            self._bridge.stop()
            self._bridge = None
        if self._mosquitto is not None:
            self._mosquitto.close()
            self._mosquitto = None
        shutil.rmtree(self.workdir, ignore_errors=True)
