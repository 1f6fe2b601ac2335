/* common.js: what the tracking page and the console share: language, times, media over /media, DOM. */
(function (root) {
  "use strict";

  const STRINGS = {
    en: {
      placed: "Order placed", confirmed: "Confirmed", picking: "Being picked", packed: "Packed",
      assigned: "Rider assigned", picked_up: "Picked up", delivering: "On the way", delivered: "Delivered",
      cancelled: "Cancelled", failed: "Delivery attempt failed",
      order: "Order", eta: "Expected", rider: "Rider", online: "online", offline: "offline",
      last_seen: "last seen", progress: "Progress", items: "Items", chat: "Chat with the shop",
      type_message: "Write a message…", send: "Send", photo: "Photo", voice: "Voice", stop: "Stop",
      read: "Read", sent: "Sent", sending: "Sending…", you: "You", shop: "Shop",
      conn_online: "Live", conn_offline: "Offline: reconnecting…", conn_syncing: "Catching up…",
      conn_connecting: "Connecting…", conn_refused: "This link no longer works",
      arriving: "Your rider is almost there", away: "away", no_fix: "The rider's position shows here once the delivery starts",
      dropoff: "You", voice_note: "Voice note", recording: "Recording… tap to stop",
      upload_failed: "Could not send the file", mic_denied: "The microphone is not available",
      // console
      sign_in: "Sign in", username: "Username", password: "Password", shop_console: "Shop console",
      attention: "Needs attention", open_orders: "Open orders", closed: "Closed", riders: "Riders",
      assign: "Assign", reassign: "Reassign", cancel_order: "Cancel order", rider_name: "rider",
      late: "late", waiting: "customer waiting", no_rider: "no rider", alert: "alert",
      select_order: "Select an order", timeline: "Timeline", customer: "Customer", none: "—",
      confirm_cancel: "Cancel this order?", not_staff: "Only staff and owner accounts can use the console",
      bad_login: "Wrong username or password", orders_count: "open orders", no_orders: "no open orders",
      picked: "picked", location: "location", receipt: "read up to", signed_in_as: "Signed in as",
      confirm: "Confirm", pack: "Packed", picks: "Picks", chat_short: "Chat",
    },
    zh: {
      placed: "已下单", confirmed: "已确认", picking: "拣货中", packed: "已打包", assigned: "已分配骑手",
      picked_up: "骑手已取货", delivering: "配送中", delivered: "已送达", cancelled: "已取消", failed: "配送未成功",
      order: "订单", eta: "预计送达", rider: "骑手", online: "在线", offline: "离线", last_seen: "最后在线",
      progress: "订单进度", items: "商品", chat: "联系店家", type_message: "输入消息…", send: "发送",
      photo: "照片", voice: "语音", stop: "停止", read: "已读", sent: "已发送", sending: "发送中…", you: "我",
      shop: "店家", conn_online: "实时", conn_offline: "网络断开，正在重连…", conn_syncing: "正在同步…",
      conn_connecting: "连接中…", conn_refused: "此链接已失效", arriving: "骑手即将到达",
      away: "距离", no_fix: "开始配送后，这里会显示骑手的位置", dropoff: "收货地址",
      voice_note: "语音消息", recording: "录音中…点击停止", upload_failed: "文件发送失败",
      mic_denied: "无法使用麦克风",
      sign_in: "登录", username: "用户名", password: "密码", shop_console: "店铺控制台",
      attention: "需要处理", open_orders: "进行中的订单", closed: "已结束", riders: "骑手",
      assign: "分配", reassign: "改派", cancel_order: "取消订单", rider_name: "骑手",
      late: "超时", waiting: "顾客等待回复", no_rider: "未分配骑手", alert: "提醒",
      select_order: "请选择订单", timeline: "时间线", customer: "顾客", none: "—",
      confirm_cancel: "确定取消此订单？", not_staff: "只有店员和店主账号可以使用控制台",
      bad_login: "用户名或密码错误", orders_count: "个进行中的订单", no_orders: "没有进行中的订单",
      picked: "已拣", location: "位置", receipt: "已读到", signed_in_as: "当前账号",
      confirm: "确认", pack: "已打包", picks: "拣货", chat_short: "聊天",
    },
  };

  /** The browser's language decides (zh-* -> Chinese); ?lang=en|zh overrides for sharing a screen. */
  function language() {
    const asked = new URLSearchParams(root.location.search).get("lang");
    if (asked === "zh" || asked === "en") return asked;
    const langs = root.navigator.languages && root.navigator.languages.length ? root.navigator.languages
      : [root.navigator.language || "en"];
    for (const l of langs) {
      if (/^zh/i.test(l)) return "zh";
      if (/^en/i.test(l)) return "en";
    }
    return "en";
  }

  const LANG = language();
  const t = (key) => (STRINGS[LANG][key] !== undefined ? STRINGS[LANG][key] : STRINGS.en[key] || key);

  function toMs(ts) {
    if (typeof ts === "number") return ts;
    const ms = Date.parse(ts);
    return Number.isNaN(ms) ? Date.now() : ms;
  }

  function clock(ms) {
    return new Date(ms).toLocaleTimeString(LANG === "zh" ? "zh-CN" : "en-GB", { hour: "2-digit", minute: "2-digit" });
  }

  /** `eta` as the shop wrote it: "18:30", minutes from the status, or epoch ms. Returns epoch ms or null. */
  function etaMs(eta, fromMs) {
    if (eta === undefined || eta === null || eta === "") return null;
    if (typeof eta === "number") return eta > 1e11 ? eta : fromMs + eta * 60000;
    const hm = /^(\d{1,2}):(\d{2})$/.exec(String(eta).trim());
    if (hm) {
      const d = new Date(fromMs);
      d.setHours(Number(hm[1]), Number(hm[2]), 0, 0);
      return d.getTime();
    }
    const parsed = Date.parse(eta);
    return Number.isNaN(parsed) ? null : parsed;
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else if (k === "dataset") Object.assign(node.dataset, v);
      else node.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c.nodeType ? c : String(c));
    return node;
  }

  /** Fetch a /media blob with the page's credentials (an <img src> cannot send them): an object URL. */
  const mediaCache = new Map();
  function mediaUrl(sha256, auth) {
    if (!mediaCache.has(sha256)) {
      mediaCache.set(sha256, fetch(`/media/${sha256}`, { headers: { Authorization: auth } }).then((r) => {
        if (!r.ok) throw new Error(`media ${r.status}`);
        return r.blob();
      }).then((blob) => URL.createObjectURL(blob)).catch((err) => { mediaCache.delete(sha256); throw err; }));
    }
    return mediaCache.get(sha256);
  }

  /** POST /media?order=ID: the reference to put in a chat's `media`. */
  async function upload(order, blob, auth) {
    const mime = (blob.type || "application/octet-stream").split(";")[0];
    const r = await fetch(`/media?order=${encodeURIComponent(order)}`, {
      method: "POST", body: blob, headers: { Authorization: auth, "Content-Type": mime },
    });
    if (r.status !== 201) throw new Error(`upload ${r.status}`);
    const ref = await r.json();
    return { kind: ref.kind, sha256: ref.sha256, mime: ref.mime, size: ref.size };
  }

  /** The media of a chat message as DOM: images and voice notes fetched with credentials. */
  function mediaNodes(media, auth) {
    return (media || []).filter((m) => m.sha256).map((m) => {
      if (m.kind === "image") {
        const img = el("img", { class: "chat-photo", alt: t("photo"), dataset: { sha256: m.sha256 } });
        mediaUrl(m.sha256, auth).then((u) => { img.src = u; img.classList.add("loaded"); }).catch(() => img.classList.add("broken"));
        return img;
      }
      if (m.kind === "voice" || m.kind === "video") {
        const player = el(m.kind === "voice" ? "audio" : "video", { controls: true, class: "chat-" + m.kind, dataset: { sha256: m.sha256 } });
        mediaUrl(m.sha256, auth).then((u) => { player.src = u; }).catch(() => player.classList.add("broken"));
        return el("div", { class: "voice-note" }, m.kind === "voice" ? icon("mic") : null, player);
      }
      return el("span", { class: "chat-file" }, m.mime || m.kind);
    });
  }

  /** Record a voice note with MediaRecorder; resolves to a Blob when stop() is called. */
  async function recordVoice() {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    const types = ["audio/webm;codecs=opus", "audio/ogg;codecs=opus", "audio/mp4", "audio/webm"];
    const mimeType = types.find((x) => root.MediaRecorder && MediaRecorder.isTypeSupported(x));
    const recorder = new MediaRecorder(stream, mimeType ? { mimeType } : undefined);
    const chunks = [];
    recorder.ondataavailable = (e) => { if (e.data.size) chunks.push(e.data); };
    const done = new Promise((resolve) => {
      recorder.onstop = () => {
        stream.getTracks().forEach((tr) => tr.stop());
        resolve(new Blob(chunks, { type: (recorder.mimeType || "audio/webm").split(";")[0] }));
      };
    });
    recorder.start();
    return { stop: () => { recorder.stop(); return done; } };
  }

  const ICONS = {
    camera: '<svg class="ico" viewBox="0 0 24 24" aria-hidden="true"><path d="M4 7h3l2-2.5h6L17 7h3a1 1 0 0 1 1 1v10a1 1 0 0 1-1 1H4a1 1 0 0 1-1-1V8a1 1 0 0 1 1-1z" fill="none" stroke="currentColor" stroke-width="1.8"/><circle cx="12" cy="13" r="3.6" fill="none" stroke="currentColor" stroke-width="1.8"/></svg>',
    mic: '<svg class="ico" viewBox="0 0 24 24" aria-hidden="true"><rect x="9" y="3" width="6" height="11" rx="3" fill="none" stroke="currentColor" stroke-width="1.8"/><path d="M5.5 11a6.5 6.5 0 0 0 13 0M12 17.5V21" fill="none" stroke="currentColor" stroke-width="1.8" stroke-linecap="round"/></svg>',
  };
  /** An inline SVG icon (no emoji font needed, nothing fetched). */
  function icon(name) {
    const tpl = document.createElement("template");
    tpl.innerHTML = ICONS[name];
    return tpl.content.firstChild;
  }

  function config() {
    return JSON.parse(document.getElementById("fishim-config").textContent);
  }

  root.FishimWeb = { icon, LANG, t, toMs, clock, etaMs, el, mediaUrl, mediaNodes, upload, recordVoice, config };
})(window);
