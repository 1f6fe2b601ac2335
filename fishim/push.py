"""Off-app push through apprise: one thread that sends, retries with backoff, and gives up visibly.

apprise (https://github.com/caronc/apprise) speaks 100+ services from one URL each: WeCom and
DingTalk bots, Feishu, Telegram, ntfy, email, or a plain ``json://`` webhook. fishim only decides
*whether* and *when* (``fishim.alerts``: unread after ``push_delay``); this module only sends.

Sending blocks on the network, so it has its own thread and never holds up ingest or the rules. A
failed send is retried after ``push_backoff``, doubling, up to ``push_attempts`` times; then it is
marked ``failed`` in the store (``fishim alerts`` shows it) and reported through ``on_result``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from fishim.alerts import Outgoing
from fishim.config import AlertsConfig, PushTarget
from fishim.logs import mask

log = logging.getLogger("fishim.push")

ResultHook = Callable[[Outgoing, bool, int, str | None], None]
"""``on_result(item, sent, attempts, error)``: called once per push, when it was sent or given up."""

_TYPES = {"urgent": "failure", "high": "warning", "normal": "info", "low": "info"}


def render(item: Outgoing) -> tuple[str, str]:
    """Title and body of one push: priority, reason and order up front, so a lock screen shows them.

    The push leaves the shop for a third-party service, so phone numbers and addresses in the text
    (a customer named by its phone number) are masked as in the logs; the app has the details.
    """
    note = item.notification
    title = f"[{note.priority}] {note.reason.replace('_', ' ')}" + (f" - order {note.order}" if note.order else "")
    lines = [mask(note.text), f"priority: {note.priority}", f"order: {note.order or '-'}"]
    if note.alert:
        lines.append(f"alert: {note.alert} (fishim alerts ack {note.alert})")
    return title, "\n".join(lines)


class Pusher:
    """The push thread. :meth:`send` queues (thread-safe, never blocks); :meth:`close` stops it."""

    def __init__(self, targets: list[PushTarget], config: AlertsConfig, on_result: ResultHook,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.targets = targets
        self.config = config
        self.on_result = on_result
        self.clock = clock
        self._heap: list[tuple[float, int, Outgoing, int]] = []  # (when, tiebreak, item, attempts so far)
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="fishim-push", daemon=True)
        self._thread.start()

    def send(self, item: Outgoing) -> None:
        with self._cond:
            heapq.heappush(self._heap, (self.clock(), next(self._order), item, 0))
            self._cond.notify()

    def close(self, timeout: float = 5.0) -> None:
        """Stop; pushes not yet sent stay ``waiting`` in the store and are planned again on start."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    def _next(self) -> tuple[Outgoing, int] | None:
        with self._cond:
            while not self._stopping:
                if self._heap and self._heap[0][0] <= self.clock():
                    _when, _n, item, attempts = heapq.heappop(self._heap)
                    return item, attempts
                wait = self._heap[0][0] - self.clock() if self._heap else None
                self._cond.wait(wait)
            return None

    def _run(self) -> None:
        while (job := self._next()) is not None:
            item, attempts = job
            error = self._deliver(item)
            attempts += 1
            if error is None:
                log.info("push sent id=%s user=%s attempts=%d", item.id, item.user, attempts)
                self._report(item, True, attempts, None)
            elif attempts >= self.config.push_attempts:
                log.warning("push failed id=%s user=%s attempts=%d error=%s", item.id, item.user, attempts, error)
                self._report(item, False, attempts, error)
            else:
                delay = self.config.push_backoff / 1000 * 2 ** (attempts - 1)
                log.info("push retry id=%s attempts=%d in=%.1fs error=%s", item.id, attempts, delay, error)
                with self._cond:
                    heapq.heappush(self._heap, (self.clock() + delay, next(self._order), item, attempts))

    def _deliver(self, item: Outgoing) -> str | None:
        """Send once; None on success, else a one-line reason (apprise's own log lines, masked)."""
        import apprise  # ~0.3 s to import: only once the first push is due

        if item.target is None or not 0 <= item.target < len(self.targets):
            return "no such push target"
        sender = apprise.Apprise()
        if not sender.add(self.targets[item.target].url):
            return "apprise does not understand the push url"
        title, body = render(item)
        with apprise.LogCapture(level=logging.WARNING) as captured:
            try:
                ok = sender.notify(body=body, title=title, notify_type=_TYPES[item.notification.priority])
            except Exception as exc:  # a plugin bug must not kill the thread
                return f"{type(exc).__name__}: {exc}"
            text: Any = captured.getvalue()
        if ok:
            return None
        lines = [line.strip() for line in str(text).splitlines() if line.strip()]
        return mask(lines[-1])[:300] if lines else "not delivered"

    def _report(self, item: Outgoing, sent: bool, attempts: int, error: str | None) -> None:
        try:
            self.on_result(item, sent, attempts, error)
        except Exception:
            log.exception("push result hook failed id=%s", item.id)
