"""A TCP proxy that loses signal the way a rider's phone does.

Phones rarely say goodbye: the network dies under them. A client that calls ``disconnect()`` exercises
none of the paths that matter (broker keepalive, last will, session takeover, QoS-1 redelivery,
fishim's sync replay), so tests put this proxy between a client and the broker and break the wire
instead:

- :meth:`Proxy.cut` resets every connection (TCP RST, no MQTT DISCONNECT), optionally refusing new
  ones until :meth:`Proxy.restore`: the phone went into a tunnel.
- :meth:`Proxy.stall` stops forwarding in both directions while keeping the sockets open: the broker
  sees a silent client and its keepalive has to notice, as with a phone stuck on one bar.
- :meth:`Proxy.slow` adds latency and/or a bandwidth cap: a congested mobile network.
- :meth:`Proxy.restore` undoes all of that, globally and for every connection.

The same controls exist per connection (:meth:`Proxy.connection_list`). The proxy runs its own
asyncio loop in a daemon thread, so synchronous pytest tests and scripts drive it with plain calls;
every control is thread-safe and has taken effect when it returns.

Example::

    with Mosquitto() as broker, Proxy("127.0.0.1", broker.port) as proxy:
        client = connect_client(proxy.port)
        proxy.cut()          # client sees a connection reset, broker publishes its will
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["Connection", "Proxy"]

log = logging.getLogger("fishim.testing.proxy")

_T = TypeVar("_T")
_CHUNK = 65536
_CALL_TIMEOUT = 10.0


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close a socket with an RST instead of a FIN, so the peer sees 'connection reset'.

    SO_LINGER with a zero timeout makes close() discard unsent data and send RST: the closest a
    loopback socket gets to a radio link vanishing.
    """
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):  # already closed by the peer
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class Connection:
    """One proxied client connection; its controls affect it alone.

    Per-connection settings override the proxy-wide ones for slowing; a connection is stalled if
    either it or the whole proxy is stalled. Obtain instances from :meth:`Proxy.connection_list`.
    """

    def __init__(
        self,
        proxy: Proxy,
        conn_id: int,
        peer: tuple[str, int],
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.id = conn_id
        self.peer = peer
        self._proxy = proxy
        self._client = client
        self._upstream = upstream
        self._stalled = False
        self._bytes_per_s: float | None = None
        self._delay_s: float | None = None
        self._flow = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.closed = False

    def __repr__(self) -> str:
        return f"<Connection #{self.id} from {self.peer[0]}:{self.peer[1]}{' closed' if self.closed else ''}>"

    # -- controls (any thread) -------------------------------------------------------------------

    def cut(self) -> None:
        """Reset this connection on both sides (RST), without any MQTT DISCONNECT."""
        self._proxy._call(lambda: self._close(reset=True))

    def stall(self) -> None:
        """Stop forwarding both ways on this connection, keeping its sockets open."""
        self._proxy._call(lambda: self._set(stalled=True))

    def slow(self, bytes_per_s: float | None = None, delay_ms: float | None = None) -> None:
        """Throttle this connection (overrides the proxy-wide :meth:`Proxy.slow`); see there."""
        _check_slow(bytes_per_s, delay_ms)
        self._proxy._call(lambda: self._set(bytes_per_s=bytes_per_s, delay_s=_delay(delay_ms)))

    def restore(self) -> None:
        """Clear this connection's own stall and slow settings (proxy-wide ones still apply)."""
        self._proxy._call(lambda: self._set(stalled=False, bytes_per_s=None, delay_s=None))

    # -- loop thread only ------------------------------------------------------------------------

    def _set(self, **changes: Any) -> None:
        for name, value in changes.items():
            setattr(self, f"_{name}", value)
        self._refresh()

    def _refresh(self) -> None:
        """Recompute whether data may flow, after a local or proxy-wide change."""
        if self._stalled or self._proxy._stalled:
            self._flow.clear()
        else:
            self._flow.set()

    def _rate(self) -> float | None:
        return self._bytes_per_s if self._bytes_per_s is not None else self._proxy._bytes_per_s

    def _latency(self) -> float:
        delay = self._delay_s if self._delay_s is not None else self._proxy._delay_s
        return delay or 0.0

    def _start(self) -> None:
        self._refresh()
        self._tasks = [
            asyncio.create_task(self._pump(self._client[0], self._upstream[1], "up")),
            asyncio.create_task(self._pump(self._upstream[0], self._client[1], "down")),
        ]

    async def _run(self) -> None:
        self._start()
        await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
        self._close(reset=False)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
        """Copy one direction, honouring stall and slow between chunks.

        While stalled we stop *reading* too, so TCP flow control pushes back on the sender exactly as
        an unacknowledging radio link would, and a peer's close is only noticed after restore.
        Latency is applied per read chunk and bytes arriving meanwhile are batched into the next one,
        so ``delay_ms`` delays delivery by between one and two delays without capping throughput at
        one chunk per delay: crude, but enough to make timing assumptions in tests fail loudly.
        """
        try:
            while True:
                await self._flow.wait()
                rate = self._rate()
                size = _CHUNK if rate is None else max(1, min(_CHUNK, int(rate / 20)))
                data = await reader.read(size)
                if not data:
                    log.debug("%r: %s side closed", self, "client" if direction == "up" else "upstream")
                    return
                latency, rate = self._latency(), self._rate()  # may have changed while reading
                if latency:
                    await asyncio.sleep(latency)
                if rate:
                    await asyncio.sleep(len(data) / rate)
                await self._flow.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError) as exc:
            log.debug("%r: %s pump ended: %s", self, direction, exc)

    def _close(self, reset: bool) -> None:
        if self.closed:
            return
        self.closed = True
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        for _, writer in (self._client, self._upstream):
            if reset:
                _reset(writer)
            else:
                writer.close()
        log.debug("%r %s", self, "reset" if reset else "closed")
        self._proxy._forget(self)


def _check_slow(bytes_per_s: float | None, delay_ms: float | None) -> None:
    if bytes_per_s is None and delay_ms is None:
        raise ValueError("slow() needs bytes_per_s and/or delay_ms")
    if bytes_per_s is not None and bytes_per_s <= 0:
        raise ValueError("bytes_per_s must be positive")
    if delay_ms is not None and delay_ms < 0:
        raise ValueError("delay_ms must not be negative")


def _delay(delay_ms: float | None) -> float | None:
    return None if delay_ms is None else delay_ms / 1000.0


class Proxy:
    """TCP proxy from a free loopback port to ``upstream_host:upstream_port``, with signal-loss controls.

    Use as a context manager (or :meth:`start` / :meth:`close`). ``port`` is the port clients connect
    to; ``connections`` is the number of live proxied connections. A connection that dies while
    stalled is only noticed (and uncounted) after :meth:`restore`, as on a real network.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        connect_timeout: float = 5.0,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.listen_host = listen_host
        self.port = listen_port
        self.connect_timeout = connect_timeout
        self.total_connections = 0
        self.refused = 0  # connections reset on arrival while refusing (cut(refuse=True))
        self._conns: dict[int, Connection] = {}
        self._handlers: set[asyncio.Task[Any]] = set()
        self._stalled = False
        self._refusing = False
        self._bytes_per_s: float | None = None
        self._delay_s: float | None = None
        self._count_changed = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None

    def __repr__(self) -> str:
        return f"<Proxy 127.0.0.1:{self.port} -> {self.upstream[0]}:{self.upstream[1]}>"

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> Proxy:
        """Start the loop thread and listen; returns self once ``port`` accepts connections."""
        if self._loop is not None:
            raise RuntimeError("proxy already started")
        self._loop = asyncio.new_event_loop()
        name = f"proxy-{self.upstream[0]}:{self.upstream[1]}"
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()
        try:
            self._server = self._submit(asyncio.start_server(self._handle, self.listen_host, self.port))
        except BaseException:
            self._stop_loop()
            raise
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("%r listening", self)
        return self

    def close(self) -> None:
        """Stop listening, reset every connection and stop the loop thread. Idempotent."""
        if self._loop is None:
            return
        try:
            self._submit(self._shutdown())
        finally:
            self._stop_loop()
        log.info("%r closed", self)

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- controls (any thread) -------------------------------------------------------------------

    @property
    def connections(self) -> int:
        """Number of live proxied connections."""
        return len(self._conns)

    def connection_list(self) -> list[Connection]:
        """Snapshot of the live connections, oldest first, for per-connection controls."""
        return self._call(lambda: sorted(self._conns.values(), key=lambda c: c.id))

    def wait_connections(self, n: int, timeout: float = 10.0) -> None:
        """Block until exactly ``n`` connections are live (e.g. a client reconnected, or all dropped).

        Raises:
            TimeoutError: the count did not reach ``n`` in time.
        """
        deadline = time.monotonic() + timeout
        with self._count_changed:
            while len(self._conns) != n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self!r}: {len(self._conns)} connections, wanted {n}")
                self._count_changed.wait(left)

    def wait_refused(self, n: int, timeout: float = 10.0) -> None:
        """Block until ``n`` connection attempts in all were refused: a client's retries, counted.

        Raises:
            TimeoutError: fewer than ``n`` were refused in time.
        """
        with self._count_changed:
            if not self._count_changed.wait_for(lambda: self.refused >= n, timeout):
                raise TimeoutError(f"{self!r}: {self.refused} connections refused, wanted {n}")

    def cut(self, *, refuse: bool = False) -> int:
        """Reset every current connection abruptly (RST both ways, no MQTT DISCONNECT).

        With ``refuse=True`` new connections are reset on arrival until :meth:`restore`, so a
        reconnecting client keeps failing as a phone without coverage does. Returns how many
        connections were cut.
        """

        def do() -> int:
            self._refusing = refuse
            conns = list(self._conns.values())
            for conn in conns:
                conn._close(reset=True)
            return len(conns)

        count = self._call(do)
        log.info("%r: cut %d connection(s)%s", self, count, ", refusing new ones" if refuse else "")
        return count

    def stall(self) -> None:
        """Stop forwarding in both directions on every connection, current and new; sockets stay open.

        The broker then sees a silent client: nothing arrives, nothing is acknowledged, and only its
        keepalive (or the client's) can detect the loss.
        """
        self._call(lambda: self._set(stalled=True))
        log.info("%r: stalled", self)

    def slow(self, bytes_per_s: float | None = None, delay_ms: float | None = None) -> None:
        """Throttle every connection: ``delay_ms`` of added one-way latency and/or a ``bytes_per_s``
        cap per direction. Per-connection settings override these. Calling again replaces both values.
        """
        _check_slow(bytes_per_s, delay_ms)
        self._call(lambda: self._set(bytes_per_s=bytes_per_s, delay_s=_delay(delay_ms)))
        log.info("%r: slowed to bytes_per_s=%s delay_ms=%s", self, bytes_per_s, delay_ms)

    def restore(self) -> None:
        """Back to a healthy network: accept new connections, clear stall and slow everywhere."""

        def do() -> None:
            self._refusing = False
            for conn in self._conns.values():
                conn._stalled, conn._bytes_per_s, conn._delay_s = False, None, None
            self._set(stalled=False, bytes_per_s=None, delay_s=None)

        self._call(do)
        log.info("%r: restored", self)

    # -- loop thread -----------------------------------------------------------------------------

    def _set(self, **changes: Any) -> None:
        for name, value in changes.items():
            setattr(self, f"_{name}", value)
        for conn in self._conns.values():
            conn._refresh()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            pass  # proxy closing; asyncio's stream callback would log a cancelled handler as an error
        finally:
            self._handlers.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        if self._refusing:
            log.debug("%r: refusing connection from %s:%s", self, *peer[:2])
            _reset(writer)
            with self._count_changed:
                self.refused += 1
                self._count_changed.notify_all()
            return
        try:
            upstream = await asyncio.wait_for(asyncio.open_connection(*self.upstream), self.connect_timeout)
        except (OSError, TimeoutError) as exc:
            log.warning("%r: upstream connect failed (%s); resetting client", self, exc)
            _reset(writer)
            return
        self.total_connections += 1
        conn = Connection(self, self.total_connections, (peer[0], peer[1]), (reader, writer), upstream)
        with self._count_changed:
            self._conns[conn.id] = conn
            self._count_changed.notify_all()
        log.debug("%r: opened %r", self, conn)
        try:
            await conn._run()
        finally:
            conn._close(reset=False)

    def _forget(self, conn: Connection) -> None:
        with self._count_changed:
            if self._conns.pop(conn.id, None) is not None:
                self._count_changed.notify_all()

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        self._refusing = True
        for conn in list(self._conns.values()):
            conn._close(reset=True)
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await self._server.wait_closed()

    # -- cross-thread plumbing -------------------------------------------------------------------

    def _submit(self, coro: Coroutine[Any, Any, _T]) -> _T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(_CALL_TIMEOUT)

    def _call(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` on the proxy's loop and return its result: state is only touched there."""
        if self._loop is None:
            raise RuntimeError("proxy not started")
        if threading.current_thread() is self._thread:
            return fn()
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        self._loop.call_soon_threadsafe(run)
        return future.result(_CALL_TIMEOUT)

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(_CALL_TIMEOUT)
        if not loop.is_running():
            loop.close()
        self._loop = self._thread = None
