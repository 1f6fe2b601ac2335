/*
 * fishim-sync.js: fishim's sync protocol for browsers (and any JS with mqtt.js), used by the tracking
 * page and the shop console. docs/protocol.md is the reference; docs/web.md explains this module.
 *
 * - Connects with mqtt.js over WebSocket (MQTT 3.1.1), subscribes, then asks
 *   {prefix}/sync/{user}/{client_id}/request for everything after its cursor, on every (re)connect.
 * - Every event is handed to onEvent exactly once (dedup by envelope `id`), and per order in
 *   `order_seq` order: fishim's broker stamps `seq`/`order_seq` on everything it routes, so a live
 *   event whose order_seq jumps is held back and a sync fetches what is missing.
 * - The cursor (`seq`) only advances through completed sync replies (next_since), so a reconnect
 *   replays from a point where nothing before was missed; what arrives twice is dropped by `id`.
 *
 * new FishimSync({url, username, password, prefix, onEvent, onState, onPresence, onNotify, onError})
 *   .start();  onEvent({order, channel, leaf, topic, payload, live})  payload has seq and order_seq.
 */
(function (root) {
  "use strict";

  function randomId(prefix) {
    const bytes = new Uint8Array(12);
    (root.crypto || root.msCrypto).getRandomValues(bytes);
    return prefix + "-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  class FishimSync {
    constructor(opts) {
      this.opts = opts;
      this.mqtt = opts.mqtt || root.mqtt;
      this.prefix = opts.prefix || "fishim";
      this.username = opts.username;
      this.clientId = opts.clientId || randomId("web").slice(0, 23);
      this.cursor = opts.since || 0;
      this.seen = new Set();          // envelope ids handed to onEvent
      this.last = new Map();          // order -> last order_seq handed over
      this.held = new Map();          // order -> Map(order_seq -> event) waiting for a hole to fill
      this.syncing = false;
      this.requestId = null;
      this.state = "connecting";
      this.stuck = new Map();         // order -> hole that one sync already could not fill
      this.eventsTopic = `${this.prefix}/sync/${this.username}/${this.clientId}/events`;
    }

    /** Open the connection; mqtt.js reconnects by itself and every connect syncs again. */
    start() {
      const o = this.opts;
      this.client = this.mqtt.connect(o.url, {
        username: o.username, password: o.password, clientId: this.clientId, protocolVersion: 4,
        clean: true, keepalive: o.keepalive || 15, reconnectPeriod: o.reconnectPeriod || 1000,
        connectTimeout: 5000, resubscribe: false,
      });
      this.client.on("connect", () => this._onConnect());
      this.client.on("message", (topic, body) => this._onMessage(topic, body));
      this.client.on("offline", () => this._setState("offline"));
      this.client.on("close", () => { if (this.state !== "refused") this._setState("offline"); });
      this.client.on("error", (err) => {
        if (err && (err.code === 4 || err.code === 5 || /Not authorized|Bad user/i.test(err.message))) {
          this._setState("refused");
          this.client.end(true);
        }
      });
      return this;
    }

    stop() { if (this.client) this.client.end(true); }

    _setState(state) {
      if (this.state === state) return;
      this.state = state;
      if (this.opts.onState) this.opts.onState(state);
    }

    _onConnect() {
      this.syncing = true;  // live messages from here on are held until they fit; no second request
      this._setState("syncing");
      const p = this.prefix;
      const topics = [`${p}/orders/#`, this.eventsTopic, `${p}/errors/${this.username}`,
                      `${p}/presence/+`, `${p}/notify/${this.username}`];
      this.client.subscribe(topics, { qos: 1 }, () => this.sync());
    }

    /** Ask for everything after the cursor (all location fixes too: the pages draw the track). */
    sync() {
      this.syncing = true;
      this.requestId = randomId("sync");
      const topic = `${this.prefix}/sync/${this.username}/${this.clientId}/request`;
      const body = { id: this.requestId, since: this.cursor, sender: this.username, collapse: false };
      this.client.publish(topic, JSON.stringify(body), { qos: 1 });
    }

    _onMessage(topic, body) {
      let payload;
      try { payload = JSON.parse(new TextDecoder().decode(body)); } catch (e) { return; }
      if (payload === null || typeof payload !== "object") return;
      const p = this.prefix + "/";
      if (topic === this.eventsTopic) this._onPage(payload);
      else if (topic.startsWith(p + "orders/")) this._accept(topic, payload, true);
      else if (topic.startsWith(p + "presence/")) { if (this.opts.onPresence) this.opts.onPresence(payload); }
      else if (topic.startsWith(p + "notify/")) this._notify(payload);
      else if (topic.startsWith(p + "errors/") && this.opts.onError) this.opts.onError(payload);
    }

    _notify(payload) {
      if (!payload.id || this.seen.has(payload.id)) return;
      this.seen.add(payload.id);
      if (this.opts.onNotify) this.opts.onNotify(payload);
    }

    _onPage(page) {
      if (page.request_id !== this.requestId) return;  // a reply to a request from before a reconnect
      for (const ev of page.events || []) {
        const payload = Object.assign({}, ev.payload, { seq: ev.seq, order_seq: ev.order_seq });
        if (ev.topic.startsWith(this.prefix + "/notify/")) this._notify(payload);
        else this._accept(ev.topic, payload, false);
      }
      if (!page.done) return;
      this.cursor = Math.max(this.cursor, page.next_since || 0);
      if (page.more) { this.sync(); return; }
      this.syncing = false;
      this._settle();
      this._setState("online");
    }

    _parse(topic) {
      const rest = topic.slice(this.prefix.length + "/orders/".length).split("/");
      return { order: rest[0], channel: rest[1], leaf: rest[2] || null };
    }

    /** One event, live or replayed: drop it if seen, hand it over if it is next, else hold it. */
    _accept(topic, payload, live) {
      if (!payload.id || this.seen.has(payload.id)) return;
      const ref = this._parse(topic);
      const ev = { order: ref.order, channel: ref.channel, leaf: ref.leaf, topic, payload, live };
      const os = payload.order_seq;
      if (typeof os !== "number") { this._deliver(ev); return; }  // a broker that does not stamp
      if (os <= (this.last.get(ref.order) || 0)) return;             // its place is taken: a replay
      if (!this.held.has(ref.order)) this.held.set(ref.order, new Map());
      this.held.get(ref.order).set(os, ev);
      this._drain(ref.order);
      if (this.held.get(ref.order).size && !this.syncing) this.sync();  // a hole: fetch what is missing
    }

    _drain(order) {
      const held = this.held.get(order);
      if (!held) return;
      let next = (this.last.get(order) || 0) + 1;
      while (held.has(next)) {
        const ev = held.get(next);
        held.delete(next);
        this._deliver(ev);
        next += 1;
      }
    }

    _deliver(ev) {
      this.seen.add(ev.payload.id);
      if (typeof ev.payload.order_seq === "number") this.last.set(ev.order, ev.payload.order_seq);
      if (this.opts.onEvent) this.opts.onEvent(ev);
    }

    /**
     * After a completed sync every stored event up to the cursor that this user may read has been
     * handed to us: a hole below the cursor can never fill (e.g. events from before a rider could
     * read the order), so skip it. A hole above it is a live event racing its predecessors: one more
     * sync; if that leaves the same hole, skip it too rather than freeze the order.
     */
    _settle() {
      let again = false;
      for (const [order, held] of this.held) {
        if (!held.size) continue;
        const keys = Array.from(held.keys()).sort((a, b) => a - b);
        const first = held.get(keys[0]);
        const belowCursor = first.payload.seq !== undefined && first.payload.seq <= this.cursor;
        if (belowCursor || this.stuck.get(order) === keys[0]) {
          this.last.set(order, keys[0] - 1);
          this.stuck.delete(order);
          this._drain(order);
        } else {
          this.stuck.set(order, keys[0]);
          again = true;
        }
      }
      if (again) this.sync();
    }

    /** Publish an envelope (id, ts, sender added) on an order's channel; resolves on PUBACK. */
    publish(order, channel, fields, options) {
      const leaf = channel === "chat" || channel === "receipts" ? "/" + this.username : "";
      const topic = `${this.prefix}/orders/${order}/${channel}${leaf}`;
      const body = Object.assign({ id: randomId(channel.slice(0, 1)), ts: Date.now(), sender: this.username }, fields);
      const retain = channel === "status" || channel === "receipts" || channel === "location";
      return new Promise((resolve, reject) => {
        this.client.publish(topic, JSON.stringify(body), { qos: 1, retain: retain && !(options && options.noRetain) },
          (err) => (err ? reject(err) : resolve(body)));
      });
    }
  }

  FishimSync.randomId = randomId;
  root.FishimSync = FishimSync;
  if (typeof module !== "undefined" && module.exports) module.exports = FishimSync;
})(typeof window !== "undefined" ? window : globalThis);
