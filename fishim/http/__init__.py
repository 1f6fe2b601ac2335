"""The HTTP side of fishim: media, tracking links, the shop API and webhooks (docs/http.md).

The entry point is :class:`fishim.http.server.HttpSide` (``fishim up`` starts it with the broker).
This package file imports nothing, so the CLI, which uses :mod:`fishim.http.cli`, :mod:`~.tokens`
and :mod:`~.keys`, pays for no server code at start-up.
"""
