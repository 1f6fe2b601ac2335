/* console.js: the shop console (/console). Logs in over MQTT/WebSocket with a staff or owner account,
 * syncs every order through FishimSync and keeps a live board, order detail and rider list. */
(function () {
  "use strict";
  const W = window.FishimWeb;
  const { t, el, clock, toMs } = W;
  const cfg = W.config();
  const $ = (id) => document.getElementById(id);
  const OPEN = ["placed", "confirmed", "picking", "packed", "assigned", "picked_up", "delivering", "failed"];
  const CLOSED = ["delivered", "cancelled"];
  const PRIORITY = { urgent: 0, high: 1, normal: 2, low: 3 };

  const orders = new Map();
  const riders = new Map();   // name -> presence payload (or {})
  let me = null;
  let auth = null;
  let sync = null;
  let selected = null;

  document.documentElement.lang = W.LANG === "zh" ? "zh-CN" : "en";
  for (const n of document.querySelectorAll("[data-t]")) n.textContent = t(n.dataset.t);
  $("login-user").placeholder = t("username");
  $("login-pass").placeholder = t("password");

  function order(id) {
    if (!orders.has(id)) {
      orders.set(id, { id, state: null, customer: null, rider: null, eta: null, etaFrom: 0, items: [], placedAt: 0,
        updatedAt: 0, events: [], chat: [], lastCustomerChat: 0, lastStaffChat: 0, alerts: new Map(), fixes: 0 });
    }
    return orders.get(id);
  }

  const isCustomer = (o, sender) => sender === o.customer || sender === `t-${o.id}`;

  // -- events ------------------------------------------------------------------------------------

  function onEvent(ev) {
    const o = order(ev.order);
    const p = ev.payload;
    const ts = toMs(p.ts);
    o.updatedAt = Math.max(o.updatedAt, ts);
    if (ev.channel === "status") {
      o.state = p.state;
      if (p.state === "placed") { o.placedAt = ts; o.customer = p.customer; o.items = p.items || []; }
      if (p.rider) { o.rider = p.rider; if (!riders.has(p.rider)) riders.set(p.rider, {}); }
      if (p.eta !== undefined) { o.eta = p.eta; o.etaFrom = ts; }
      if (p.sender !== o.customer && p.state !== "placed") closeAlerts(o, ts);
      o.events.push(ev);
    } else if (ev.channel === "chat") {
      o.chat.push(p);
      if (isCustomer(o, p.sender)) o.lastCustomerChat = p.order_seq || ts;
      else { o.lastStaffChat = p.order_seq || ts; closeAlerts(o, ts, "unanswered_customer"); }
      if (selected === o.id) appendChat(o, p);
    } else if (ev.channel === "location") {
      o.fixes += 1;
      o.lastFix = p;
    } else {
      o.events.push(ev);
    }
    if (ev.channel !== "chat" && ev.channel !== "location" && selected === o.id) appendTimeline(ev);
    if (ev.channel === "receipts" && ev.leaf === me) o.readSent = Math.max(o.readSent || 0, p.read_up_to);
    if ((ev.channel === "chat" || ev.channel === "status") && p.sender !== me) o.readable = Math.max(o.readable || 0, p.order_seq || 0);
    if (selected === o.id) scheduleReceipt(o);
    schedule();
  }

  /** A read receipt for the order on screen: the customer sees its messages were read. */
  function scheduleReceipt(o) {
    if (o.receiptTimer || document.visibilityState !== "visible") return;
    o.receiptTimer = setTimeout(() => {
      o.receiptTimer = null;
      if (selected === o.id && (o.readable || 0) > (o.readSent || 0)) {
        o.readSent = o.readable;
        sync.publish(o.id, "receipts", { read_up_to: o.readable }).catch(() => {});
      }
    }, 400);
  }

  function closeAlerts(o, ts, reason) {
    for (const [id, a] of o.alerts) if (toMs(a.ts) <= ts && (!reason || a.reason === reason)) o.alerts.delete(id);
  }

  function onNotify(n) {
    if (!n.order || !n.alert) return;
    const o = order(n.order);
    const closedLater = o.updatedAt > toMs(n.ts) && n.reason !== "unanswered_customer";
    if (!closedLater) o.alerts.set(n.alert, n);
    schedule();
  }

  function onPresence(p) {
    if (!p.user) return;
    riders.set(p.user, p);  // staff read everyone's presence; the list shows those who ride
    schedule();
  }

  // -- derived -------------------------------------------------------------------------------------

  function isLate(o) {
    const eta = W.etaMs(o.eta, o.etaFrom);
    return OPEN.includes(o.state) && eta !== null && eta < Date.now();
  }

  function flags(o) {
    const out = [];
    const alerts = [...o.alerts.values()].sort((a, b) => PRIORITY[a.priority] - PRIORITY[b.priority]);
    for (const a of alerts) out.push({ cls: a.priority === "urgent" ? "urgent" : "warn", text: a.reason.replace(/_/g, " ") });
    if (isLate(o) && !o.alerts.size) out.push({ cls: "urgent", text: t("late") });
    if (OPEN.includes(o.state) && o.lastCustomerChat > o.lastStaffChat && !alerts.some((a) => a.reason === "unanswered_customer")) {
      out.push({ cls: "warn", text: t("waiting") });
    }
    if (o.state === "failed") out.push({ cls: "urgent", text: t("failed") });
    return out;
  }

  function rank(o) {
    const alerts = [...o.alerts.values()].map((a) => PRIORITY[a.priority] ?? 3);
    return Math.min(isLate(o) ? 1 : 9, ...alerts, 9);
  }

  // -- rendering (batched per frame: a sync from 0 hands over thousands of events) ---------------

  let queued = false;
  function schedule() {
    if (queued) return;
    queued = true;
    requestAnimationFrame(() => { queued = false; renderBoard(); renderRiders(); renderHead(); });
  }

  function card(o) {
    const f = flags(o);
    const unread = o.chat.filter((c) => isCustomer(o, c.sender) && (c.order_seq || 0) > o.lastStaffChat).length;
    return el("button", { class: "order-card" + (selected === o.id ? " selected" : ""), dataset: { order: o.id, state: o.state || "" },
      onclick: () => select(o.id) },
      el("div", { class: "row1" }, el("b", { text: o.id }),
        el("span", {}, unread ? el("span", { class: "badge", text: String(unread) }) : null, " ",
          el("span", { class: "chip", dataset: { state: o.state || "" }, text: t(o.state) }))),
      el("div", { class: "row2" }, el("span", { text: `${t("customer")} ${o.customer || t("none")}` }),
        el("span", { text: `· ${o.rider ? t("rider") + " " + o.rider : t("no_rider")}` }),
        o.eta ? el("span", { text: `· ${t("eta")} ${clock(W.etaMs(o.eta, o.etaFrom) || 0)}` }) : null),
      f.length ? el("div", { class: "row2" }, ...f.map((x) => el("span", { class: "flag " + x.cls, text: x.text }))) : null);
  }

  function renderBoard() {
    const all = [...orders.values()].filter((o) => o.state);
    const open = all.filter((o) => OPEN.includes(o.state));
    const attention = open.filter((o) => flags(o).length).sort((a, b) => rank(a) - rank(b) || a.placedAt - b.placedAt);
    const rest = open.filter((o) => !attention.includes(o));
    const groups = [[t("attention"), attention, "attention"]];
    for (const s of OPEN) groups.push([t(s), rest.filter((o) => o.state === s).sort((a, b) => a.placedAt - b.placedAt), s]);
    groups.push([t("closed"), all.filter((o) => CLOSED.includes(o.state)).sort((a, b) => b.updatedAt - a.updatedAt).slice(0, 20), "closed"]);
    $("board").replaceChildren(...groups.filter(([, list]) => list.length).map(([title, list, key]) =>
      el("div", { class: "board-group", dataset: { group: key } },
        el("h2", {}, el("span", { text: title }), el("span", { class: "count", text: String(list.length) })),
        ...list.map(card))));
    $("summary").textContent = open.length ? `${open.length} ${t("orders_count")}` : t("no_orders");
  }

  function renderRiders() {
    const list = [...riders.entries()].filter(([name, p]) => [...orders.values()].some((o) => o.rider === name) || p.state)
      .filter(([name]) => [...orders.values()].some((o) => o.rider === name))
      .sort((a, b) => (a[1].state === "online" ? 0 : 1) - (b[1].state === "online" ? 0 : 1) || a[0].localeCompare(b[0]));
    $("riders").replaceChildren(...list.map(([name, p]) => {
      const mine = [...orders.values()].filter((o) => o.rider === name && OPEN.includes(o.state)).map((o) => o.id);
      return el("div", { class: "rider", dataset: { rider: name, presence: p.state || "unknown" } },
        el("div", {}, el("div", { class: "name", text: name }),
          el("div", { class: "orders", text: p.state === "online" ? t("online") : p.last_seen ? `${t("last_seen")} ${clock(p.last_seen)}` : "" })),
        el("div", { class: "orders", text: mine.length ? mine.join(", ") : "—" }));
    }));
    $("rider-names").replaceChildren(...list.map(([name]) => el("option", { value: name })));
  }

  function select(id) {
    selected = id;
    renderDetail();
    scheduleReceipt(orders.get(id));
    schedule();
  }

  function renderHead() {
    const o = selected && orders.get(selected);
    if (!o || !$("detail-head")) return;
    const eta = W.etaMs(o.eta, o.etaFrom);
    $("detail-head").replaceChildren(
      el("div", {}, el("h1", {}, el("span", { text: `${t("order")} ${o.id}` }), el("span", { class: "chip", id: "detail-state", dataset: { state: o.state }, text: t(o.state) })),
        el("div", { class: "facts" },
          el("span", {}, el("span", { class: "muted", text: t("customer") + " " }), el("b", { text: o.customer || t("none") })),
          el("span", {}, el("span", { class: "muted", text: t("rider") + " " }), el("b", { id: "detail-rider", text: o.rider || t("none") })),
          el("span", {}, el("span", { class: "muted", text: t("eta") + " " }), el("b", { text: eta ? clock(eta) : t("none") })),
          el("span", { class: "muted", text: o.items.map((i) => `${i.name || i.sku} × ${i.qty || 1}`).join(", ") }))),
      actions(o));
  }

  function actions(o) {
    if (!OPEN.includes(o.state)) return el("div");
    const input = el("input", { id: "assign-input", list: "rider-names", placeholder: t("rider_name") });
    const canAssign = o.state === "packed" || o.state === "assigned";
    return el("div", { class: "actions" },
      canAssign ? input : null,
      canAssign ? el("button", { class: "btn", id: "assign-btn", text: o.rider ? t("reassign") : t("assign"), onclick: () => {
        const rider = input.value.trim();
        if (rider) sync.publish(o.id, "status", { state: "assigned", rider }).catch(() => {});
      } }) : null,
      el("button", { class: "btn ghost", id: "cancel-btn", text: t("cancel_order"), onclick: () => {
        if (window.confirm(t("confirm_cancel"))) sync.publish(o.id, "status", { state: "cancelled", note: "cancelled by " + me }).catch(() => {});
      } }));
  }

  function renderDetail() {
    const o = orders.get(selected);
    const chat = el("ol", { class: "chat", id: "detail-chat" });
    const timeline = el("ol", { class: "timeline", id: "detail-timeline" });
    const input = el("input", { type: "text", id: "console-chat-input", placeholder: t("type_message"), maxlength: 4000 });
    const photo = el("input", { type: "file", accept: "image/*", hidden: true, id: "console-photo" });
    const form = el("form", { class: "composer", onsubmit: (e) => {
      e.preventDefault();
      const text = input.value.trim();
      if (!text) return;
      input.value = "";
      sync.publish(o.id, "chat", { text }).catch(() => { input.value = text; });
    } }, el("label", { class: "icon-btn", title: t("photo") }, W.icon("camera"), photo), input,
      el("button", { class: "send", type: "submit", id: "console-send", text: t("send") }));
    photo.addEventListener("change", async () => {
      const file = photo.files[0];
      photo.value = "";
      if (file) sync.publish(o.id, "chat", { text: "", media: [await W.upload(o.id, file, auth)] }).catch(() => {});
    });
    $("detail").dataset.order = o.id;
    $("detail").replaceChildren(el("div", { class: "detail" },
      el("div", { class: "detail-head", id: "detail-head" }),
      el("div", { class: "detail-grid" },
        el("div", {}, el("h2", { text: t("chat_short") }), chat, form),
        el("div", {}, el("h2", { text: t("timeline") }), timeline))));
    for (const p of o.chat) appendChat(o, p);
    for (const ev of o.events) appendTimeline(ev);
    renderHead();
  }

  function appendChat(o, p) {
    const list = $("detail-chat");
    if (!list) return;
    const mine = !isCustomer(o, p.sender) && p.sender !== o.rider;
    const who = isCustomer(o, p.sender) ? `${t("customer")} ${o.customer || ""}` : p.sender === o.rider ? `${t("rider")} ${p.sender}` : p.sender;
    list.append(el("li", { class: mine ? "mine" : "theirs", dataset: { id: p.id } },
      el("div", { class: "bubble" }, p.text ? el("div", { class: "text", text: p.text }) : null, ...W.mediaNodes(p.media, auth)),
      el("div", { class: "meta" }, el("span", { text: `${who} · ${clock(toMs(p.ts))}` }))));
    list.scrollTop = list.scrollHeight;
  }

  function appendTimeline(ev) {
    const list = $("detail-timeline");
    if (!list) return;
    const p = ev.payload;
    let text;
    if (ev.channel === "status") text = t(p.state) + (p.rider ? ` · ${p.rider}` : "") + (p.note ? ` · ${p.note}` : "");
    else if (ev.channel === "picks") text = `${t("picks")} ${p.sku} × ${p.qty}`;
    else if (ev.channel === "receipts") text = `${ev.leaf} ${t("receipt")} #${p.read_up_to}`;
    else text = ev.channel;
    list.prepend(el("li", { dataset: { id: p.id, channel: ev.channel } }, el("time", { text: clock(toMs(p.ts)) }),
      el("span", {}, el("b", { text: text }), el("span", { class: "muted", text: ` · ${p.sender}` }))));
  }

  // -- connection --------------------------------------------------------------------------------

  function onState(state) {
    const c = $("conn");
    c.className = "conn conn-" + state;
    c.dataset.state = state;
    c.textContent = t("conn_" + state);
    $("offline").hidden = state !== "offline";
    $("offline").textContent = t("conn_offline");
    document.body.dataset.conn = state;
    if (state === "refused") {
      $("login").hidden = false;
      $("login-error").textContent = t("bad_login");
    } else if (state === "syncing" || state === "online") {
      $("login").hidden = true;
    }
  }

  function base64(text) {
    return btoa(String.fromCharCode(...new TextEncoder().encode(text)));
  }

  /** Ask the http side who this is first: a wrong password or a customer's account is told so here,
   * before an MQTT connection opens (the broker would only hand a customer its own orders). */
  $("login-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    if (sync) sync.stop();
    const user = $("login-user").value.trim();
    const password = $("login-pass").value;
    const basic = "Basic " + base64(`${user}:${password}`);
    $("login-error").textContent = "";
    let answer;
    try {
      answer = await fetch("/console/me", { headers: { Authorization: basic } });
    } catch (err) {
      $("login-error").textContent = t("conn_offline");
      return;
    }
    if (answer.status !== 200) {
      $("login-error").textContent = t(answer.status === 403 ? "not_staff" : "bad_login");
      return;
    }
    me = user;
    auth = basic;
    $("me").textContent = `${t("signed_in_as")} ${me}`;
    sync = new FishimSync({ url: cfg.ws_url, username: me, password, prefix: cfg.prefix,
      onEvent, onState, onPresence, onNotify, onError: (err) => toast(err.detail || err.error) });
    sync.start();
    window.fishimConsole = { sync, orders, riders };
  });

  /** What fishim refused (errors/{me}): an illegal transition, a bad rider name... */
  function toast(text) {
    const n = el("div", { class: "toast", role: "alert", text });
    document.body.append(n);
    setTimeout(() => n.remove(), 6000);
  }
  setInterval(schedule, 30000);  // "late" is a matter of time passing, not only of events
})();
