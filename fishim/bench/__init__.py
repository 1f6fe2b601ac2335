"""fishim benchmarks: every figure measured in one run against its peer, reported as a ratio.

Sections (``--only`` picks some, all run by default); each figure is the median of ``reps`` runs:

1. ``throughput``: 1 publisher -> 1 subscriber, QoS 0 and QoS 1, 200-byte payloads: fishim's embedded
   broker vs stock amqtt 0.12.1 (default config) vs Mosquitto. Runs interleave the brokers, so a
   neighbour's load hits all of them alike.
2. ``e2e``: messages/s the bridge stores (commits seen by polling SQLite) and publish->store latency,
   on the embedded broker and on Mosquitto, vs one paho subscriber (the bridge's own client stack,
   doing nothing) on the same broker with no bridge: the overhead ratio.
3. ``latency``: publish->subscriber latency at a steady 1,000 msg/s with the bridge running.
4. ``replay``: 10,000 stored events replayed to a reconnecting client (``{"since": 0}``), events/s.
5. ``fanin``: rider clients each sending a location fix per second: delivered ratio, p99 latency,
   broker CPU and RSS (500 riders x 60 s; ``--quick``: 50 x 10 s).
6. ``memory``: bridge RSS over a big history vs a small one (1,000,000 vs 10,000 stored events;
   ``--quick``: 100,000 vs 10,000). It must not grow with history.
7. ``durable``: durable throughput on ``fishim up`` (a real subprocess): QoS-1 publishes where
   PUBACKed == stored (checked from the publisher by counting rows), vs Mosquitto + ``fishim bridge``.
8. ``durable-latency``: publish -> PUBACK and publish -> subscriber p99 at 1,000 msg/s on ``fishim up``.
9. ``synchronous``: durable throughput on ``fishim up`` for each ``store.synchronous`` setting.
10. ``drain``: a backlog queued on Mosquitto for a stopped bridge, stored by ``fishim bridge`` on start.
11. ``replay-client``: a realistic history replayed over MQTT and through ``FishimClient``.
- ``profile``: py-spy samples of the embedded broker and its bridge, and of the bridge on Mosquitto,
  under the e2e load, saved to ``bench-out/profile-*.txt`` (collapsed stacks) and summarised.

Every broker, bridge and load generator is a process of its own (its own GIL), bound to 127.0.0.1,
started in its own process group and ended on exit, Ctrl-C or failure (and by the kernel if this
process is killed). Load generators use the small asyncio MQTT 3.1.1 client in
:mod:`fishim.bench.wire` rather than paho, so the client side stays out of the way of the brokers
being compared.

One module per section; :mod:`fishim.bench.sections` is the table that runs and reports them.

Usage::

    fishim bench --quick            # < 60 s, small counts: rough figures, checks the code
    fishim bench                    # full mode (~20 min): run it on a quiet machine
    python -m fishim.bench --only durable,durable-latency

Writes ``bench-out/report.json`` and, for a run of every section, the generated part of
``BENCHMARKS.md`` (between its ``bench:begin``/``bench:end`` markers; text outside them is kept).
"""
