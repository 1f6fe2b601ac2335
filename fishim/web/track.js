/* track.js: the customer's tracking page (/t/{token}). Logs in over MQTT/WebSocket as t-{order} with
 * the link's token, syncs the order through FishimSync and draws it; everything live. */
(function () {
  "use strict";
  const W = window.FishimWeb;
  const { t, el, clock, toMs } = W;
  const cfg = W.config();
  const token = decodeURIComponent(location.pathname.split("/").pop());
  const auth = "Bearer " + token;
  const me = cfg.user;
  const $ = (id) => document.getElementById(id);
  const STEPS = ["placed", "confirmed", "packed", "picked_up", "delivered"];
  const ORDER = ["placed", "confirmed", "picking", "packed", "assigned", "picked_up", "delivering", "delivered"];

  const view = {
    state: null, eta: null, etaFrom: 0, rider: null, items: [], dropoff: null,
    statuses: [], fixes: [], chat: new Map(), readBy: new Map(), presence: new Map(),
    lastReadSent: 0, readable: 0,
  };

  document.documentElement.lang = W.LANG === "zh" ? "zh-CN" : "en";
  document.title = `${t("order")} ${cfg.order}`;
  for (const n of document.querySelectorAll("[data-t]")) n.textContent = t(n.dataset.t);
  for (const n of document.querySelectorAll("[data-t-title]")) n.title = t(n.dataset.tTitle);
  $("order-id").textContent = cfg.order;
  $("chat-input").placeholder = t("type_message");

  // -- events -----------------------------------------------------------------------------------

  function onEvent(ev) {
    const p = ev.payload;
    if (ev.channel === "status") onStatus(p);
    else if (ev.channel === "chat") onChat(p);
    else if (ev.channel === "location") onFix(p);
    else if (ev.channel === "receipts") onReceipt(ev.leaf, p);
    if ((ev.channel === "chat" || ev.channel === "status") && p.sender !== me) {
      view.readable = Math.max(view.readable, p.order_seq || 0);
      scheduleReceipt();
    }
  }

  function onStatus(p) {
    view.statuses.push(p);
    view.state = p.state;
    if (p.items) view.items = p.items;
    if (p.dropoff && typeof p.dropoff === "object" && "lat" in p.dropoff) view.dropoff = p.dropoff;
    if (p.eta !== undefined) { view.eta = p.eta; view.etaFrom = toMs(p.ts); }
    if (p.rider) view.rider = p.rider;
    renderStatus();
    renderTimeline(p);
    renderItems();
    renderMap();
    const s = $("state");
    s.dataset.renderedAt = String(performance.timeOrigin + performance.now());
    s.dataset.statusId = p.id;
  }

  function onChat(p) {
    const pending = view.chat.get(p.id);
    view.chat.set(p.id, p);
    const node = chatNode(p);
    if (pending && pending.node) pending.node.replaceWith(node);
    else $("chat").append(node);
    p.node = node;
    updateTicks();
    const list = $("chat");
    list.scrollTop = list.scrollHeight;  // the list scrolls, never the page under the customer's thumb
  }

  function onFix(p) {
    view.fixes.push(p);
    renderMap();
  }

  function onReceipt(member, p) {
    if (member === me) { view.lastReadSent = Math.max(view.lastReadSent, p.read_up_to); return; }
    view.readBy.set(member, Math.max(view.readBy.get(member) || 0, p.read_up_to));
    updateTicks();
  }

  function onPresence(p) {
    view.presence.set(p.user, p);
    renderPresence();
  }

  // -- read receipts: what the customer has seen, while the page is in front -------------------

  let receiptTimer = null;
  function scheduleReceipt() {
    if (receiptTimer || document.visibilityState !== "visible") return;
    receiptTimer = setTimeout(() => {
      receiptTimer = null;
      if (view.readable > view.lastReadSent && sync.state !== "offline") {
        view.lastReadSent = view.readable;
        sync.publish(cfg.order, "receipts", { read_up_to: view.readable }).catch(() => {});
      }
    }, 400);
  }
  document.addEventListener("visibilitychange", scheduleReceipt);

  // -- rendering -------------------------------------------------------------------------------

  function renderStatus() {
    const s = $("state");
    s.textContent = t(view.state);
    s.dataset.state = view.state;
    const eta = W.etaMs(view.eta, view.etaFrom);
    $("eta").textContent = view.state === "delivered" ? t("delivered") : eta ? clock(eta) : "—";
    const at = ORDER.indexOf(view.state);
    $("steps").replaceChildren(...STEPS.map((step) => {
      const idx = ORDER.indexOf(step);
      const cls = view.state === "cancelled" || view.state === "failed" ? "" : idx < at ? "done" : idx === at ? "now" : "";
      return el("li", { class: cls }, el("span", { class: "dot" }), el("span", { class: "lbl", text: t(step) }));
    }));
    $("rider-box").hidden = !view.rider;
    $("rider-name").textContent = view.rider || "";
    renderPresence();
    renderArriving();
  }

  function renderTimeline(p) {
    const li = el("li", { dataset: { id: p.id, state: p.state } },
      el("time", { text: clock(toMs(p.ts)) }), el("b", { text: t(p.state) }),
      p.note ? el("span", { class: "muted", text: " · " + p.note }) : null);
    $("timeline").prepend(li);
  }

  function renderItems() {
    $("items").replaceChildren(...view.items.map((i) =>
      el("li", {}, el("span", { text: i.name || i.sku }), el("span", { class: "muted", text: "× " + (i.qty || 1) }))));
  }

  function renderPresence() {
    const pres = view.rider && view.presence.get(view.rider);
    const n = $("presence");
    if (!pres) { n.textContent = ""; n.dataset.state = "unknown"; return; }
    n.dataset.state = pres.state;
    n.textContent = pres.state === "online" ? t("online") : `${t("last_seen")} ${clock(pres.last_seen)}`;
  }

  function chatNode(p) {
    const mine = p.sender === me;
    const who = mine ? t("you") : p.sender === view.rider ? `${t("rider")} ${p.sender}` : t("shop");
    const bubble = el("div", { class: "bubble" },
      p.text ? el("div", { class: "text", text: p.text }) : null, ...W.mediaNodes(p.media, auth));
    const meta = el("div", { class: "meta" }, el("span", { text: `${who} · ${clock(toMs(p.ts))}` }),
      mine ? el("span", { class: "tick", text: p.pending ? t("sending") : t("sent") }) : null);
    return el("li", { class: mine ? "mine" : "theirs", dataset: { id: p.id, orderSeq: p.order_seq || "" } }, bubble, meta);
  }

  function updateTicks() {
    const read = Math.max(0, ...view.readBy.values());
    for (const p of view.chat.values()) {
      if (p.sender !== me || !p.node || p.pending) continue;
      const tick = p.node.querySelector(".tick");
      const isRead = p.order_seq && p.order_seq <= read;
      tick.textContent = isRead ? "✓✓ " + t("read") : "✓ " + t("sent");
      tick.classList.toggle("read", !!isRead);
    }
  }

  function metres(a, b) {
    const k = Math.PI / 180;
    const x = (b.lon - a.lon) * k * Math.cos(((a.lat + b.lat) / 2) * k);
    const y = (b.lat - a.lat) * k;
    return Math.sqrt(x * x + y * y) * 6371000;
  }

  function distanceText(m) { return m < 1000 ? `${Math.round(m / 10) * 10} m` : `${(m / 1000).toFixed(1)} km`; }

  /** The sketch: the drop-off in the middle, rings every so many metres, the rider's track and dot. */
  function renderMap() {
    const svg = $("map");
    const NS = "http://www.w3.org/2000/svg";
    const node = (tag, attrs) => { const n = document.createElementNS(NS, tag); for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v); return n; };
    const fixes = view.fixes;
    const center = view.dropoff || fixes[fixes.length - 1];
    svg.replaceChildren();
    svg.append(node("rect", { x: 0, y: 0, width: 320, height: 220, class: "map-bg" }));
    if (!center) { $("map-note").textContent = t("no_fix"); svg.classList.add("empty"); return; }
    svg.classList.remove("empty");
    const k = Math.PI / 180;
    const xy = (p) => [(p.lon - center.lon) * k * Math.cos(center.lat * k) * 6371000, -(p.lat - center.lat) * k * 6371000];
    let far = 200;
    for (const f of fixes) { const [x, y] = xy(f); far = Math.max(far, Math.abs(x) * 220 / 320, Math.abs(y)); }
    const scale = 95 / far;  // metres -> px, the farthest point stays inside
    const px = (p) => { const [x, y] = xy(p); return [160 + x * scale, 110 + y * scale]; };
    const ringStep = [100, 250, 500, 1000, 2000, 5000, 10000].find((s) => s * scale >= 28) || 20000;
    for (let r = ringStep, i = 0; r * scale < 200 && i < 6; r += ringStep, i += 1) {
      svg.append(node("circle", { cx: 160, cy: 110, r: r * scale, class: "ring" }));
      const ly = 110 - r * scale * 0.71 - 3;
      if (ly < 12) continue;  // a ring whose label would leave the sketch keeps its line only
      const label = node("text", { x: 160 + r * scale * 0.71 + 3, y: ly, class: "ring-label" });
      label.textContent = distanceText(r);
      svg.append(label);
    }
    if (fixes.length) {
      const pts = fixes.map(px);
      svg.append(node("polyline", { points: pts.map((p) => p.join(",")).join(" "), class: "track" }));
      const [x, y] = pts[pts.length - 1];
      svg.append(node("circle", { cx: x, cy: y, r: 12, class: "rider-halo" }));
      svg.append(node("circle", { cx: x, cy: y, r: 6.5, class: "rider-dot", id: "rider-dot" }));
    }
    if (view.dropoff) {
      svg.append(node("path", { d: "M160 110 l-9 -14 a11 11 0 1 1 18 0 z", class: "pin" }));
      svg.append(node("circle", { cx: 160, cy: 89, r: 4, class: "pin-hole" }));
    }
    const last = fixes[fixes.length - 1];
    if (last && view.dropoff) {
      const d = metres(last, view.dropoff);
      view.distance = d;
      $("map-note").textContent = `${t("rider")} · ${distanceText(d)} ${W.LANG === "zh" ? "" : t("away")}`.trim();
    } else {
      $("map-note").textContent = last ? `${t("rider")} · ${clock(toMs(last.ts))}` : t("no_fix");
    }
    renderArriving();
  }

  function renderArriving() {
    const eta = W.etaMs(view.eta, view.etaFrom);
    const near = view.distance !== undefined ? view.distance < 400 : eta !== null && eta - Date.now() < 5 * 60000;
    $("arriving").hidden = !(view.state === "delivering" && near);
  }

  // -- connection ------------------------------------------------------------------------------

  function onState(state) {
    const c = $("conn");
    c.className = "conn conn-" + state;
    c.dataset.state = state;
    c.textContent = t("conn_" + state);
    const off = $("offline");
    off.hidden = !(state === "offline" || state === "refused");
    off.textContent = t(state === "refused" ? "conn_refused" : "conn_offline");
    document.body.dataset.conn = state;
  }

  const sync = new FishimSync({
    url: cfg.ws_url, username: me, password: token, prefix: cfg.prefix,
    onEvent, onState, onPresence,
  });
  onState("connecting");
  renderMap();
  sync.start();
  window.fishimTrack = { sync, view };

  // -- sending ---------------------------------------------------------------------------------

  async function send(fields) {
    const body = await sync.publish(cfg.order, "chat", fields);
    if (!view.chat.has(body.id)) {
      const pending = Object.assign({ pending: true }, body);
      pending.node = chatNode(pending);
      view.chat.set(body.id, pending);
      $("chat").append(pending.node);
    }
  }

  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const input = $("chat-input");
    const text = input.value.trim();
    if (!text) return;
    input.value = "";
    send({ text }).catch(() => { input.value = text; });
  });

  $("photo-input").addEventListener("change", async (e) => {
    const file = e.target.files[0];
    e.target.value = "";
    if (!file) return;
    try {
      const ref = await W.upload(cfg.order, file, auth);
      await send({ text: "", media: [ref] });
      $("chat-note").textContent = "";
    } catch (err) {
      $("chat-note").textContent = t("upload_failed");
    }
  });

  let recording = null;
  $("voice-btn").addEventListener("click", async () => {
    const btn = $("voice-btn");
    if (recording) {
      const blob = await recording.stop();
      recording = null;
      btn.classList.remove("recording");
      $("chat-note").textContent = "";
      try { await send({ text: "", media: [await W.upload(cfg.order, blob, auth)] }); } catch (err) { $("chat-note").textContent = t("upload_failed"); }
      return;
    }
    try {
      recording = await W.recordVoice();
      btn.classList.add("recording");
      $("chat-note").textContent = t("recording");
    } catch (err) {
      $("chat-note").textContent = t("mic_denied");
    }
  });
})();
