"""The HTTP side as one unit that starts and stops with the broker: listeners and webhook dispatcher.

``fishim up`` calls, around the broker::

    http = HttpSide(config, authenticator, acl)
    ingest = BrokerIngest(config, hooks=http.hooks)   # the webhook outbox joins the ingest's commits
    ...
    await http.start(broker)    # after broker.start(): every ``type: http`` listener, the dispatcher
    ...
    await http.stop()           # before broker.stop()

Each ``http`` listener is a uvicorn ``Server.serve()`` task on the broker's own event loop (no
thread, no process): handlers call the broker and the ACL directly. Submodules import Starlette;
this one imports them only when an HTTP side is started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from typing import TYPE_CHECKING, Any

from fishim.config import Config, ListenerConfig

if TYPE_CHECKING:
    import uvicorn

    from fishim.auth import OrderAcl, StoreAuthenticator
    from fishim.http.context import HttpContext
    from fishim.http.webhooks import Dispatcher, WebhookHook

__all__ = ["HttpSide"]

log = logging.getLogger("fishim.http")

START_TIMEOUT_S = 10.0


class HttpSide:
    """Every ``http`` listener plus the webhook dispatcher, started and stopped with the broker."""

    def __init__(self, config: Config, authenticator: StoreAuthenticator, acl: OrderAcl) -> None:
        self.config = config
        self.authenticator = authenticator
        self.acl = acl
        self.listeners = [lst for lst in config.listeners if lst.type == "http"]
        self.ports: dict[str, int] = {}
        self.hook: WebhookHook | None = None
        if config.webhooks:
            from fishim.http.webhooks import WebhookHook

            self.hook = WebhookHook(config)
        self._contexts: list[HttpContext] = []
        self._servers: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []
        self._dispatcher: Dispatcher | None = None
        self._worker: Any = None

    @property
    def hooks(self) -> list[Any]:
        """Ingest hooks to pass to :class:`~fishim.broker.ingest.BrokerIngest` (before it opens)."""
        return [self.hook] if self.hook is not None else []

    async def start(self, broker: Any) -> None:
        """Open every http listener and start the dispatcher; raises ListenerError (one line) on failure."""
        from fishim.broker import ListenerError
        from fishim.http.context import HttpContext, StoreWorker

        try:
            for listener in self.listeners:
                ctx = HttpContext(self.config, listener, self.authenticator, self.acl, broker)
                self._contexts.append(ctx)
                await self._serve(listener, ctx)
        except OSError as exc:
            await self.stop()
            raise ListenerError(f"listener {listener.name}: cannot listen on {listener.bind}: "
                                f"{exc.strerror or exc}") from None
        if self.config.webhooks:
            from fishim.http.webhooks import Dispatcher

            self._worker = StoreWorker(self.config.store.path)
            self._dispatcher = Dispatcher(self.config, self._worker)
            if self.hook is not None:
                self.hook.attach(asyncio.get_running_loop(), self._dispatcher)
            self._dispatcher.start()

    async def _serve(self, listener: ListenerConfig, ctx: HttpContext) -> None:
        import uvicorn

        from fishim.http.app import QuietServer, create_app

        settings = uvicorn.Config(
            create_app(ctx), log_config=None, access_log=False, lifespan="off", server_header=False,
            proxy_headers=False, timeout_graceful_shutdown=5,
            ssl_certfile=str(listener.tls.cert) if listener.tls else None,
            ssl_keyfile=str(listener.tls.key) if listener.tls else None,
            ssl_ca_certs=str(listener.tls.ca) if listener.tls and listener.tls.ca else None,
            ssl_cert_reqs=ssl.CERT_OPTIONAL if listener.tls and listener.tls.ca else ssl.CERT_NONE)
        try:
            settings.load()
        except (OSError, ssl.SSLError) as exc:
            raise OSError(f"cannot load TLS files: {exc}") from None
        sock = _bind(listener)
        server = QuietServer(settings)
        task = asyncio.create_task(server.serve(sockets=[sock]), name=f"http-{listener.name}")
        self._servers.append((server, task))
        self.ports[listener.name] = sock.getsockname()[1]
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT_S
        while not server.started:
            if task.done():
                raise OSError(f"http server exited: {task.exception()!r}")
            if asyncio.get_running_loop().time() > deadline:
                raise OSError("http server did not start")
            await asyncio.sleep(0.01)
        log.info("listening listener=%s type=http host=%s port=%d tls=%d", listener.name, listener.host,
                 self.ports[listener.name], int(listener.tls is not None))

    async def stop(self) -> None:
        """Stop the dispatcher, then each server (in-flight requests get a few seconds to finish)."""
        if self._dispatcher is not None:
            if self.hook is not None:
                self.hook.attach(None, None)
            await self._dispatcher.stop()
            self._dispatcher = None
        for server, _task in self._servers:
            server.should_exit = True
        for _server, task in self._servers:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(task, 10)
        self._servers.clear()
        for ctx in self._contexts:
            await asyncio.to_thread(ctx.worker.close)
        self._contexts.clear()
        if self._worker is not None:
            await asyncio.to_thread(self._worker.close)
            self._worker = None


def _bind(listener: ListenerConfig) -> socket.socket:
    """Bind the listener's socket ourselves: a taken port is an OSError here, not uvicorn's sys.exit."""
    family = socket.AF_INET6 if ":" in listener.host else socket.AF_INET
    return socket.create_server((listener.host, listener.port), family=family, reuse_port=False)
