// Unit test of fishim-sync.js's ordering rules, run by tests/test_web_sync_js.py with node.
// The transport is a stand-in that records publishes and lets the test hand messages in, in any order:
// a real broker cannot be made to drop or reorder one chosen message on demand. The browser tests
// (tests/test_web_pages.py) cover the same module end to end against fishim up.
"use strict";
const assert = require("node:assert/strict");
const path = require("node:path");
if (!globalThis.crypto) globalThis.crypto = require("node:crypto").webcrypto;
const FishimSync = require(path.resolve(process.argv[2], "fishim-sync.js"));

class FakeClient {
  constructor() { this.handlers = {}; this.published = []; }
  on(name, fn) { this.handlers[name] = fn; }
  subscribe(topics, opts, cb) { this.subscribed = topics; cb(); }
  publish(topic, body, opts, cb) { this.published.push({ topic, body: JSON.parse(body) }); if (cb) cb(); }
  end() {}
  emit(name, ...args) { this.handlers[name](...args); }
  deliver(topic, obj) { this.emit("message", topic, Buffer.from(JSON.stringify(obj))); }
}

function setup() {
  const client = new FakeClient();
  const shown = [];
  const sync = new FishimSync({
    mqtt: { connect: () => client }, url: "ws://x", username: "t-o-1", clientId: "c1", prefix: "fishim",
    onEvent: (ev) => shown.push(`${ev.order}:${ev.payload.order_seq}:${ev.payload.id}`),
  }).start();
  client.emit("connect");
  return { client, sync, shown };
}

const status = (os, seq, id) => ({ id, ts: 1, sender: "boss", state: "confirmed", seq, order_seq: os });
const T = "fishim/orders/o-1/status";
const EVENTS = "fishim/sync/t-o-1/c1/events";

function lastRequest(client) {
  const reqs = client.published.filter((p) => p.topic.endsWith("/request"));
  return reqs[reqs.length - 1].body;
}

// 1. On connect: subscribed, then one sync request from cursor 0 with every location fix.
{
  const { client, shown } = setup();
  assert.deepEqual(client.subscribed.slice(0, 2), ["fishim/orders/#", EVENTS]);
  const req = lastRequest(client);
  assert.equal(req.since, 0);
  assert.equal(req.collapse, false);
  // a retained status (order_seq 3) arrives before the sync reply: held, not shown out of order
  client.deliver(T, status(3, 30, "s3"));
  assert.deepEqual(shown, []);
  client.deliver(EVENTS, { request_id: req.id, next_since: 30, done: true, events: [
    { seq: 10, order_seq: 1, topic: T, payload: { id: "s1", ts: 1, sender: "boss", state: "placed" } },
    { seq: 20, order_seq: 2, topic: T, payload: { id: "s2", ts: 1, sender: "boss", state: "confirmed" } },
    { seq: 30, order_seq: 3, topic: T, payload: { id: "s3", ts: 1, sender: "boss", state: "confirmed" } },
  ] });
  assert.deepEqual(shown, ["o-1:1:s1", "o-1:2:s2", "o-1:3:s3"]);  // once each, in order
}

// 2. A live jump in order_seq (5 after 3) is held and asks for a sync from the cursor; the reply fills
//    the hole, then both show in order; a duplicate live copy is dropped.
{
  const { client, shown } = setup();
  let req = lastRequest(client);
  client.deliver(EVENTS, { request_id: req.id, next_since: 30, done: true, events: [
    { seq: 30, order_seq: 3, topic: T, payload: { id: "s3", ts: 1, sender: "boss", state: "placed" } }] });
  assert.deepEqual(shown, ["o-1:3:s3"]);  // a hole below the cursor (1, 2 unreadable) is skipped
  const before = client.published.length;
  client.deliver(T, status(5, 50, "s5"));
  assert.deepEqual(shown, ["o-1:3:s3"]);
  assert.equal(client.published.length, before + 1, "a gap triggers one sync request");
  req = lastRequest(client);
  assert.equal(req.since, 30);
  client.deliver(T, status(5, 50, "s5"));  // the same again while syncing: still held once
  client.deliver(EVENTS, { request_id: req.id, next_since: 50, done: true, events: [
    { seq: 40, order_seq: 4, topic: T, payload: { id: "s4", ts: 1, sender: "boss", state: "confirmed" } },
    { seq: 50, order_seq: 5, topic: T, payload: { id: "s5", ts: 1, sender: "boss", state: "confirmed" } }] });
  assert.deepEqual(shown, ["o-1:3:s3", "o-1:4:s4", "o-1:5:s5"]);
  client.deliver(T, status(5, 50, "s5"));
  assert.equal(shown.length, 3);
}

// 3. After a reconnect the request starts from the last completed cursor; replies to an older request
//    are ignored; pages before `done` do not move the cursor.
{
  const { client, sync, shown } = setup();
  const first = lastRequest(client);
  client.deliver(EVENTS, { request_id: first.id, next_since: 10, done: false, events: [
    { seq: 10, order_seq: 1, topic: T, payload: { id: "s1", ts: 1, sender: "boss", state: "placed" } }] });
  assert.equal(sync.cursor, 0);
  client.deliver(EVENTS, { request_id: first.id, next_since: 10, done: true, events: [] });
  assert.equal(sync.cursor, 10);
  client.emit("close");
  assert.equal(sync.state, "offline");
  client.emit("connect");
  const second = lastRequest(client);
  assert.equal(second.since, 10);
  client.deliver(EVENTS, { request_id: first.id, next_since: 99, done: true, events: [] });  // stale
  assert.equal(sync.cursor, 10);
  client.deliver(EVENTS, { request_id: second.id, next_since: 20, done: true, events: [
    { seq: 10, order_seq: 1, topic: T, payload: { id: "s1", ts: 1, sender: "boss", state: "placed" } },
    { seq: 20, order_seq: 2, topic: T, payload: { id: "s2", ts: 1, sender: "boss", state: "confirmed" } }] });
  assert.deepEqual(shown, ["o-1:1:s1", "o-1:2:s2"]);
  assert.equal(sync.state, "online");
}
console.log("ok");
