// The dualwrite chat page: no framework, no download, no inline script or style (it runs under
// `default-src 'self'`). Message text is only ever set with textContent, never parsed as HTML.
//
// What it promises the person typing:
// - no text is lost: every send is an entry of the outbox (sessionStorage) until the server has
//   it; a failed one stays in the list, "Not sent", with its own Retry and Delete; a retry reuses
//   its clientMessageId, so it never makes a second message; a rate-limited one waits for
//   Retry-After and goes out by itself. Drafts are kept per channel.
// - honest states: "not saved" until the server says the message is saved (over the socket,
//   from whichever process saved it); a history that fails to load says so, with Retry.
// - a 401 anywhere returns to sign-in with drafts and unsent messages kept.
//
// The WebSocket contract: the token is the first frame, never in the URL; frames carry `type`
// ("message" with its `cursor`, "saved", "channels"); a reconnect resumes with `?cursor=` the
// last cursor received, else `?after=` the last message id; 4410 means the cursor is too old:
// reload history, then connect without one.
"use strict";

const RENEW_BEFORE_MS = 5 * 60 * 1000;   // renew the token this long before it expires
const GROUP_GAP_MS = 5 * 60 * 1000;      // consecutive messages of one author this close share a header
const PAGE_SIZE = 50;
const STICK_PX = 48;                     // "at the bottom" within this many pixels

const state = {
  token: sessionStorage.getItem("dualwrite.token"),
  me: JSON.parse(sessionStorage.getItem("dualwrite.me") || "null"),
  channels: new Set(),
  channel: null,
  messages: new Map(),     // messageId -> message of the open channel
  nodes: new Map(),        // messageId -> {look, node}: the element drawn for it
  nextBefore: null,        // history cursor of the next older page (null: none, undefined: unknown)
  historyLoaded: false,
  loadingOlder: false,
  historyFailed: false,
  socket: null,
  cursor: null,            // the last `cursor` of a received frame (resume point)
  lastId: null,            // the last message id received (fallback resume point)
  connectedOnce: false,
  backoffMs: 500,
  outbox: [],              // [{clientMessageId, workspaceId, channelId, text, state, error, until}]
  drafts: {},              // channelId -> text
  pumping: false,
  unreadFrom: null,        // the first message that arrived while scrolled up
  renewTimer: null,
  reconnectTimer: null,
  persistRunning: false,
};

const $ = (id) => document.getElementById(id);
const enc = encodeURIComponent;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

class SignedOut extends Error {}

// ---- storage: per user and workspace, so two people sharing a tab keep their texts apart ----
function storageKey(kind) { return `dualwrite.${kind}.${state.me.workspaceId}.${state.me.userId}`; }
function loadStored() {
  state.outbox = JSON.parse(sessionStorage.getItem(storageKey("outbox")) || "[]");
  state.drafts = JSON.parse(sessionStorage.getItem(storageKey("drafts")) || "{}");
  // A send that was on its way when the page went away is sent again (same clientMessageId).
  for (const item of state.outbox) if (item.state === "sending" || item.state === "waiting") item.state = "queued";
}
function saveOutbox() { sessionStorage.setItem(storageKey("outbox"), JSON.stringify(state.outbox)); }
function saveDrafts() { sessionStorage.setItem(storageKey("drafts"), JSON.stringify(state.drafts)); }

// ---- HTTP ----------------------------------------------------------------
async function api(path, options = {}) {
  const token = state.token;
  if (!token) throw new SignedOut();
  const response = await fetch(path, {
    ...options,
    headers: { "content-type": "application/json", authorization: `Bearer ${token}`, ...(options.headers || {}) },
  });
  if (response.status === 401) {
    // A request that left before a new sign-in says nothing about the new token.
    if (state.token !== token) throw new SignedOut();
    signOut("Your session has ended (the server may have restarted). Sign in again: your drafts and unsent messages are kept.");
    throw new SignedOut();
  }
  return response;
}

function channelPath(channelId) {
  return `/api/workspaces/${enc(state.me.workspaceId)}/channels/${enc(channelId)}`;
}

function newClientMessageId() {
  return crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random().toString(36).slice(2)}`;
}

// ---- sign-in, sign-out, token renewal -------------------------------------
$("sign-in-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const body = Object.fromEntries(new FormData(event.target).entries());
  $("sign-in-error").textContent = "";
  let response;
  try {
    response = await fetch("/api/dev/token", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
  } catch (error) {
    $("sign-in-error").textContent = "The server does not answer. Try again.";
    return;
  }
  const payload = await response.json().catch(() => ({}));
  if (!response.ok) { $("sign-in-error").textContent = payload.error || `Sign-in failed (${response.status}).`; return; }
  state.token = payload.token;
  state.me = body;
  sessionStorage.setItem("dualwrite.token", state.token);
  sessionStorage.setItem("dualwrite.me", JSON.stringify(body));
  start();
});

$("sign-out").addEventListener("click", () => signOut(""));

function signOut(note) {
  state.token = null;
  sessionStorage.removeItem("dualwrite.token");
  clearTimeout(state.renewTimer);
  clearTimeout(state.reconnectTimer);
  closeSocket();
  if (state.me) {
    const form = $("sign-in-form");
    form.userId.value = state.me.userId;
    form.userName.value = state.me.userName;
    form.workspaceId.value = state.me.workspaceId;
  }
  $("sign-in-note").textContent = note;
  $("sign-in-note").hidden = !note;
  $("chat").hidden = true;
  $("sign-in").hidden = false;
  setLive("signed out");
}

function tokenExpiry(token) {
  try {
    const payload = JSON.parse(atob(token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/")));
    return typeof payload.exp === "number" ? payload.exp * 1000 : null;
  } catch (error) {
    return null;
  }
}

function scheduleRenewal() {
  clearTimeout(state.renewTimer);
  const expiresAt = tokenExpiry(state.token);
  if (!expiresAt) return;
  const left = expiresAt - Date.now();
  // Some minutes before expiry; a short-lived token at four fifths of its life.
  const wait = left > 2 * RENEW_BEFORE_MS ? left - RENEW_BEFORE_MS : Math.max(1000, left * 0.8);
  state.renewTimer = setTimeout(renew, wait);
}

async function renew() {
  let response;
  try {
    response = await api("/api/auth/renew", { method: "POST" });
  } catch (error) {
    if (error instanceof SignedOut) return;
    state.renewTimer = setTimeout(renew, 30_000);  // the network: try again soon
    return;
  }
  if (response.status === 404 || response.status === 405) return;  // not offered by this server
  if (!response.ok) { state.renewTimer = setTimeout(renew, 30_000); return; }
  const payload = await response.json();
  state.token = payload.token;
  sessionStorage.setItem("dualwrite.token", state.token);
  scheduleRenewal();
}

// ---- start and routing ------------------------------------------------------
function start() {
  $("sign-in").hidden = true;
  $("sign-in-note").hidden = true;
  $("chat").hidden = false;
  $("workspace-name").textContent = state.me.workspaceId;
  $("who").textContent = `${state.me.userName} (${state.me.userId})`;
  loadStored();
  scheduleRenewal();
  state.channels = new Set(["general"]);
  refreshChannels();
  const routed = route();
  const channel = routed && routed.workspaceId === state.me.workspaceId ? routed.channelId : (state.channel || "general");
  navigate(channel, true);
  openChannel(channel, true);
  pump();
}

function route() {
  const match = /^#\/([^/]+)\/([^/]+)$/.exec(location.hash);
  if (!match) return null;
  try {
    return { workspaceId: decodeURIComponent(match[1]), channelId: decodeURIComponent(match[2]) };
  } catch (error) {
    return null;
  }
}

function navigate(channelId, replace = false) {
  const hash = `#/${enc(state.me.workspaceId)}/${enc(channelId)}`;
  if (replace) history.replaceState(null, "", hash);
  else if (location.hash !== hash) location.hash = hash;
}

window.addEventListener("hashchange", () => {
  if (!state.token) return;
  const routed = route();
  if (!routed || routed.workspaceId !== state.me.workspaceId) { navigate(state.channel || "general", true); return; }
  if (routed.channelId !== state.channel) openChannel(routed.channelId);
});

// ---- channels ---------------------------------------------------------------
async function refreshChannels() {
  try {
    const response = await api(`/api/workspaces/${enc(state.me.workspaceId)}/channels`);
    if (!response.ok) throw new Error(String(response.status));
    const payload = await response.json();
    for (const name of payload.channels) state.channels.add(name);
    $("channels-error").hidden = true;
  } catch (error) {
    if (error instanceof SignedOut) return;
    $("channels-error").textContent = "Could not load the channel list; it is retried when the connection is back.";
    $("channels-error").hidden = false;
  }
  renderChannels();
}

function renderChannels() {
  if (state.channel) state.channels.add(state.channel);
  const names = [...state.channels].sort();
  $("channels").replaceChildren(...names.map((name) => {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = `# ${name}`;
    button.dataset.channel = name;
    button.setAttribute("aria-current", String(name === state.channel));
    button.addEventListener("click", () => { document.body.classList.remove("nav-open"); navigate(name); });
    item.append(button);
    return item;
  }));
}

$("add-channel").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = event.target.channel;
  const name = input.value.trim().replace(/^#\s*/, "");
  if (!name) return;
  let response;
  try {
    response = await api(`/api/workspaces/${enc(state.me.workspaceId)}/channels`, { method: "POST", body: JSON.stringify({ channelId: name }) });
  } catch (error) {
    if (!(error instanceof SignedOut)) showChannelError("The server does not answer: the channel was not created. Try again.");
    return;
  }
  if (!response.ok) {
    const payload = await response.json().catch(() => ({}));
    showChannelError(response.status === 422 ? `"${name}" cannot be a channel name: ${payload.error}` : "The channel was not created. Try again.");
    return;
  }
  input.value = "";
  $("channels-error").hidden = true;
  state.channels.add(name);
  document.body.classList.remove("nav-open");
  navigate(name);
});

function showChannelError(text) {
  $("channels-error").textContent = text;
  $("channels-error").hidden = false;
}

$("menu").addEventListener("click", () => {
  const open = document.body.classList.toggle("nav-open");
  $("menu").setAttribute("aria-expanded", String(open));
});

// ---- opening a channel: history, then live ------------------------------
function openChannel(name, first = false) {
  if (!first) saveDraft();
  state.channel = name;
  state.messages = new Map();
  state.nodes = new Map();
  state.nextBefore = undefined;
  state.historyLoaded = false;
  state.historyFailed = false;
  state.cursor = null;
  state.lastId = null;
  state.connectedOnce = false;
  state.unreadFrom = null;
  closeSocket();
  renderChannels();
  $("channel-name").textContent = `# ${name}`;
  document.title = `#${name} · dualwrite chat`;
  $("text").placeholder = `Message #${name}`;
  $("text").value = state.drafts[name] || "";
  $("not-saved-status").textContent = "";
  render({ stick: true });
  loadLatest().then(() => { if (state.channel === name) connect(); });
}

async function loadLatest() {
  const channel = state.channel;
  $("history-state").textContent = state.historyLoaded ? "" : "Loading messages…";
  let page;
  try {
    const response = await api(`${channelPath(channel)}/messages?limit=${PAGE_SIZE}`);
    if (!response.ok) throw new Error(String(response.status));
    page = await response.json();
  } catch (error) {
    if (channel !== state.channel || error instanceof SignedOut) return;
    state.historyFailed = true;
    $("history-state").textContent = "";
    render({});
    return;
  }
  if (channel !== state.channel) return;
  state.historyFailed = false;
  for (const message of page.messages) upsert(message);
  if (!state.historyLoaded) state.nextBefore = page.nextBefore;
  state.historyLoaded = true;
  render({ stick: true });
  fillScreen();
}

async function loadOlder() {
  if (!state.historyLoaded || !state.nextBefore || state.loadingOlder) return;
  const channel = state.channel;
  state.loadingOlder = true;
  $("history-state").textContent = "Loading older messages…";
  try {
    const response = await api(`${channelPath(channel)}/messages?limit=${PAGE_SIZE}&before=${enc(state.nextBefore)}`);
    if (!response.ok) throw new Error(String(response.status));
    const page = await response.json();
    if (channel !== state.channel) return;
    for (const message of page.messages) upsert(message);
    state.nextBefore = page.nextBefore;
    state.loadingOlder = false;
    render({ keepAnchor: true });
  } catch (error) {
    if (channel === state.channel) $("history-state").textContent = "Could not load older messages. Scroll up to try again.";
    return;
  } finally {
    state.loadingOlder = false;
  }
  fillScreen();
}

// Load older pages until the list can scroll, so "scroll up for more" is possible.
function fillScreen() {
  const scroller = $("scroller");
  if (state.nextBefore && scroller.scrollHeight <= scroller.clientHeight + 8) loadOlder();
}

$("scroller").addEventListener("scroll", () => {
  const scroller = $("scroller");
  if (scroller.scrollTop < 120) loadOlder();
  if (atBottom()) clearUnread();
});

$("history-error").querySelector("button").addEventListener("click", () => {
  $("history-error").hidden = true;
  loadLatest().then(() => { if (!state.socket) connect(); });
});

// ---- live delivery ----------------------------------------------------------
function connect() {
  const channel = state.channel;
  if (!state.token || !channel) return;
  clearTimeout(state.reconnectTimer);
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  let query = "";
  if (state.cursor) query = `?cursor=${enc(state.cursor)}`;
  else if (state.lastId) query = `?after=${enc(state.lastId)}`;
  const socket = new WebSocket(`${scheme}://${location.host}/ws/workspaces/${enc(state.me.workspaceId)}/channels/${enc(channel)}${query}`);
  state.socket = socket;
  const sentToken = state.token;
  socket.onopen = () => {
    socket.send(JSON.stringify({ token: sentToken }));  // the token travels in a frame, never in the URL
    setLive("live");
    state.backoffMs = 500;
    if (state.connectedOnce) {
      // Notices are not replayed: what was saved or created while away comes from the server.
      loadLatest();
      refreshChannels();
    }
    state.connectedOnce = true;
  };
  socket.onmessage = (event) => {
    let frame;
    try { frame = JSON.parse(event.data); } catch (error) { return; }
    if (frame.cursor) state.cursor = frame.cursor;
    if (frame.type === "message" && frame.channelId === state.channel) {
      if (!state.lastId || frame.messageId > state.lastId) state.lastId = frame.messageId;
      const known = state.messages.has(frame.messageId);
      if (frame.userId === state.me.userId) resolveUnknown(frame);
      upsert({ ...frame, saved: state.messages.get(frame.messageId)?.saved });
      if (!known && !atBottom()) markUnread(frame.messageId);
      render({});
    } else if (frame.type === "saved" && frame.channelId === state.channel) {
      const message = state.messages.get(frame.messageId);
      if (message) { message.saved = true; render({}); }
    } else if (frame.type === "channels" && Array.isArray(frame.added)) {
      for (const name of frame.added) state.channels.add(name);
      renderChannels();
    }
  };
  socket.onclose = (event) => {
    if (state.socket !== socket) return;  // replaced on purpose
    state.socket = null;
    switch (event.code) {
      case 4401:
        // The server closes a socket when the token it was opened with expires: if that token
        // has been renewed since, open a new socket (resuming at the cursor) with the new one.
        if (sentToken !== state.token) { connect(); return; }
        signOut("Your session has ended. Sign in again: your drafts and unsent messages are kept.");
        return;
      case 4403:
        setLive("not allowed in this workspace");
        return;
      case 4410:
        // The cursor is older than the realtime tier keeps: history has it all; start afresh.
        setLive("catching up");
        state.cursor = null;
        state.lastId = null;
        loadLatest().then(() => { if (state.channel === channel && !state.socket) connect(); });
        return;
      case 4422:
        state.cursor = null;  // refused resume point: fall back to the last id
        break;
      case 1013:
        setLive("catching up");
        connect();  // too slow: resume at once from the last cursor, nothing before it dropped
        return;
      default:
        break;
    }
    setLive("reconnecting…");
    const delay = state.backoffMs;
    state.backoffMs = Math.min(state.backoffMs * 2, 10_000);
    state.reconnectTimer = setTimeout(() => { if (state.channel === channel && !state.socket) connect(); }, delay);
  };
}

// A send whose answer was lost may have landed: when a message of mine with its text comes
// back, send it again with its clientMessageId, which either finds the first send or sends it.
function resolveUnknown(frame) {
  const entry = state.outbox.find((candidate) => candidate.state === "failed" && candidate.unknown && candidate.channelId === frame.channelId && candidate.text === frame.text);
  if (entry) retryEntry(entry.clientMessageId);
}

function closeSocket() {
  const socket = state.socket;
  state.socket = null;
  if (socket) { socket.onclose = null; socket.close(); }
  clearTimeout(state.reconnectTimer);
}

function setLive(text) { $("live-state").textContent = text; }

// ---- messages ---------------------------------------------------------------
function upsert(message) {
  const known = state.messages.get(message.messageId);
  const saved = message.saved === undefined ? known?.saved : message.saved;
  state.messages.set(message.messageId, { ...known, ...message, saved: known?.saved === true ? true : saved });
}

function byTime(a, b) {
  return a.timestamp - b.timestamp || (a.messageId < b.messageId ? -1 : a.messageId > b.messageId ? 1 : 0);
}

function atBottom() {
  const scroller = $("scroller");
  return scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < STICK_PX;
}

function markUnread(messageId) {
  if (!state.unreadFrom) state.unreadFrom = messageId;
  $("new-messages").hidden = false;
}

function clearUnread() {
  if (!state.unreadFrom && $("new-messages").hidden) return;
  state.unreadFrom = null;
  $("new-messages").hidden = true;
  render({});
}

$("new-messages").addEventListener("click", () => {
  const scroller = $("scroller");
  scroller.scrollTop = scroller.scrollHeight;
  clearUnread();
});

// Formatters are built once: building one per message made a long list slow to draw.
const FORMAT = {
  full: new Intl.DateTimeFormat(undefined, { dateStyle: "full", timeStyle: "medium" }),
  day: new Intl.DateTimeFormat(undefined, { weekday: "long", month: "long", day: "numeric" }),
  dayWithYear: new Intl.DateTimeFormat(undefined, { weekday: "long", month: "long", day: "numeric", year: "numeric" }),
  monthDay: new Intl.DateTimeFormat(undefined, { month: "short", day: "numeric" }),
};

function dayLabel(ms) {
  const day = new Date(ms);
  const today = new Date();
  const yesterday = new Date(); yesterday.setDate(today.getDate() - 1);
  if (day.toDateString() === today.toDateString()) return "Today";
  if (day.toDateString() === yesterday.toDateString()) return "Yesterday";
  return (day.getFullYear() === today.getFullYear() ? FORMAT.day : FORMAT.dayWithYear).format(day);
}

function relativeTime(ms) {
  const seconds = Math.max(0, (Date.now() - ms) / 1000);
  if (seconds < 60) return "just now";
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  return FORMAT.monthDay.format(new Date(ms));
}

function timeElement(ms) {
  const element = document.createElement("time");
  element.dateTime = new Date(ms).toISOString();
  element.title = FORMAT.full.format(new Date(ms));
  element.dataset.ms = String(ms);
  element.textContent = relativeTime(ms);
  return element;
}

setInterval(() => {
  for (const element of document.querySelectorAll("#messages time")) element.textContent = relativeTime(Number(element.dataset.ms));
}, 30_000);

function messageItem(message, grouped, extraClasses, status) {
  const item = document.createElement("li");
  item.className = ["message", grouped ? "grouped" : "first", ...extraClasses].join(" ");
  item.dataset.testid = "message";
  item.setAttribute("data-testid", "message");
  if (message.messageId) item.dataset.messageId = message.messageId;
  if (!grouped) {
    const meta = document.createElement("div");
    meta.className = "meta";
    const author = document.createElement("span");
    author.className = "author";
    author.textContent = message.userName;
    meta.append(author, timeElement(message.timestamp));
    item.append(meta);
  }
  const text = document.createElement("div");
  text.className = "text";
  text.textContent = message.text;
  if (grouped) text.title = FORMAT.full.format(new Date(message.timestamp));
  const line = document.createElement("div");
  line.className = "status";
  line.append(...status);
  item.append(text, line);
  return item;
}

function badge(text) {
  const element = document.createElement("span");
  element.className = "badge";
  element.textContent = text;
  return element;
}

function linkButton(label, accessibleName, onClick, testid) {
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = label;
  button.setAttribute("aria-label", accessibleName);
  button.dataset.testid = testid;
  button.setAttribute("data-testid", testid);
  button.addEventListener("click", onClick);
  return button;
}

// Put ``items`` in ``list`` touching only what changed: elements already in place stay, so the
// browser lays out only the new ones.
function patchList(list, items) {
  const wanted = new Set(items);
  for (const child of [...list.children]) if (!wanted.has(child)) child.remove();
  items.forEach((item, index) => {
    const current = list.children[index];
    if (current !== item) list.insertBefore(item, current || null);
  });
}

function render({ stick = false, keepAnchor = false }) {
  const scroller = $("scroller");
  const wasAtBottom = atBottom();
  const oldHeight = scroller.scrollHeight;
  const oldTop = scroller.scrollTop;
  // The list is rebuilt: remember which of its buttons had the keyboard focus, to give it back.
  const focused = document.activeElement && document.activeElement.closest("#messages li") ? document.activeElement : null;
  const focusedItem = focused && focused.closest("li");
  const focusKey = focused && (focusedItem.dataset.clientMessageId || focusedItem.dataset.messageId);
  const items = [];
  let previous = null;
  const mine = (message) => message.userId === state.me.userId;
  let unsaved = 0;
  // My message may come back over the socket before its POST answers: until then the outbox
  // entry stands for it, so that it shows once.
  const inFlight = state.outbox.filter((entry) => entry.channelId === state.channel && entry.state !== "failed").map((entry) => entry.text);
  for (const message of [...state.messages.values()].sort(byTime)) {
    if (mine(message) && !message.confirmed && inFlight.includes(message.text)) {
      inFlight.splice(inFlight.indexOf(message.text), 1);
      continue;
    }
    const day = dayLabel(message.timestamp);
    if (!previous || dayLabel(previous.timestamp) !== day) {
      let separator = state.nodes.get(`day:${day}`)?.node;
      if (!separator) {
        separator = document.createElement("li");
        separator.className = "day";
        separator.setAttribute("role", "separator");
        separator.textContent = day;
        state.nodes.set(`day:${day}`, { node: separator });
      }
      items.push(separator);
      previous = null;
    }
    if (message.messageId === state.unreadFrom) {
      const marker = document.createElement("li");
      marker.className = "unread-marker";
      marker.dataset.testid = "unread-marker";
      marker.setAttribute("data-testid", "unread-marker");
      marker.textContent = "New";
      items.push(marker);
      previous = null;
    }
    const grouped = Boolean(previous && previous.userId === message.userId && message.timestamp - previous.timestamp < GROUP_GAP_MS);
    const notSaved = message.saved === false && mine(message);
    if (notSaved) unsaved += 1;
    // A delivered message's element is reused while it looks the same: a long list redraws fast.
    const look = `${grouped}|${notSaved}|${message.userName}|${message.timestamp}`;
    let cached = state.nodes.get(message.messageId);
    if (!cached || cached.look !== look) {
      cached = { look, node: messageItem(message, grouped, notSaved ? ["unsaved"] : [], notSaved ? [badge("Not saved yet")] : []) };
      state.nodes.set(message.messageId, cached);
    }
    items.push(cached.node);
    previous = message;
  }
  let failed = 0;
  for (const entry of state.outbox) {
    if (entry.workspaceId !== state.me.workspaceId || entry.channelId !== state.channel) continue;
    const message = { userId: state.me.userId, userName: state.me.userName, text: entry.text, timestamp: entry.createdAt };
    const status = [];
    if (entry.state === "failed") {
      failed += 1;
      status.push(
        badge(`Not sent${entry.error ? `: ${entry.error}` : ""}`),
        linkButton("Retry", `Retry sending "${entry.text.slice(0, 40)}"`, () => retryEntry(entry.clientMessageId), "message-retry"),
        linkButton("Delete", `Delete unsent "${entry.text.slice(0, 40)}"`, () => deleteEntry(entry.clientMessageId), "message-delete"),
      );
    } else if (entry.state === "waiting") {
      status.push(badge("Sending too fast: this one goes out by itself in a moment"));
    } else {
      status.push(badge("Sending…"));
    }
    const grouped = previous && previous.userId === message.userId && message.timestamp - previous.timestamp < GROUP_GAP_MS;
    const item = messageItem(message, grouped, ["outbox", entry.state], status);
    item.dataset.clientMessageId = entry.clientMessageId;
    items.push(item);
    previous = message;
  }
  patchList($("messages"), items);
  if (focused) {
    const again = items.find((item) => (item.dataset.clientMessageId || item.dataset.messageId) === focusKey);
    const target = again && again.querySelector(`[data-testid="${focused.dataset.testid}"]`);
    (target || $("text")).focus();
  }
  $("send-failed").hidden = failed === 0;
  $("not-saved").hidden = unsaved === 0 && !$("not-saved-status").textContent;
  $("history-error").hidden = !state.historyFailed;
  if (state.historyLoaded && !state.loadingOlder) {
    $("history-state").textContent = state.nextBefore ? "" : (state.messages.size ? "This is the beginning of the channel." : "No messages yet: say hello.");
  }
  if (stick || wasAtBottom) scroller.scrollTop = scroller.scrollHeight;
  else if (keepAnchor) scroller.scrollTop = oldTop + (scroller.scrollHeight - oldHeight);
}

// ---- sending: the outbox ----------------------------------------------------
function saveDraft() {
  if (!state.channel) return;
  const text = $("text").value;
  if (text) state.drafts[state.channel] = text; else delete state.drafts[state.channel];
  saveDrafts();
}

$("text").addEventListener("input", saveDraft);

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("text").value;
  if (!text.trim()) return;
  $("text").value = "";
  saveDraft();
  state.outbox.push({
    clientMessageId: newClientMessageId(),
    workspaceId: state.me.workspaceId,
    channelId: state.channel,
    text,
    state: "queued",
    createdAt: Date.now(),
  });
  saveOutbox();
  render({ stick: true });
  pump();
});

$("text").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); $("composer").requestSubmit(); }
});

function findEntry(clientMessageId) { return state.outbox.find((entry) => entry.clientMessageId === clientMessageId); }

function retryEntry(clientMessageId) {
  const entry = findEntry(clientMessageId);
  if (!entry) return;
  entry.state = "queued";  // same clientMessageId: the server never makes a second message
  entry.error = "";
  entry.unknown = false;
  saveOutbox();
  render({});
  pump();
}

function deleteEntry(clientMessageId) {
  state.outbox = state.outbox.filter((entry) => entry.clientMessageId !== clientMessageId);
  saveOutbox();
  render({});
}

$("send-failed").querySelector("button").addEventListener("click", () => {
  for (const entry of state.outbox) {
    if (entry.state === "failed" && entry.channelId === state.channel) { entry.state = "queued"; entry.error = ""; }
  }
  saveOutbox();
  render({});
  pump();
});

// One send at a time, in order: a rate-limited send waits for its Retry-After and goes out by
// itself; a failed one is marked and the next goes on.
async function pump() {
  if (state.pumping) return;
  state.pumping = true;
  try {
    for (;;) {
      if (!state.token) return;
      const entry = state.outbox.find((candidate) => candidate.state === "queued" && candidate.workspaceId === state.me.workspaceId);
      if (!entry) return;
      entry.state = "sending";
      saveOutbox();
      render({});
      await sendEntry(entry);
      saveOutbox();
      render({});
    }
  } catch (error) {
    if (!(error instanceof SignedOut)) throw error;
  } finally {
    state.pumping = false;
  }
}

async function sendEntry(entry) {
  let response;
  try {
    response = await api(`${channelPath(entry.channelId)}/messages`, {
      method: "POST", body: JSON.stringify({ text: entry.text, clientMessageId: entry.clientMessageId }),
    });
  } catch (error) {
    if (error instanceof SignedOut) { entry.state = "queued"; saveOutbox(); throw error; }
    entry.state = "failed";
    entry.error = "the server does not answer";
    entry.unknown = true;  // it may have landed all the same
    const echoed = [...state.messages.values()].some((m) => m.userId === state.me.userId && !m.confirmed && m.text === entry.text && m.timestamp >= entry.createdAt - 60_000);
    if (echoed && !entry.resolving) { entry.resolving = true; entry.state = "queued"; entry.error = ""; }
    return;
  }
  if (response.status === 429) {
    const waitS = Math.max(1, Number(response.headers.get("Retry-After")) || 1);
    entry.state = "waiting";
    saveOutbox();
    render({});
    await sleep(waitS * 1000);
    if (findEntry(entry.clientMessageId) && entry.state === "waiting") entry.state = "queued";
    return;
  }
  const payload = await response.json().catch(() => ({}));
  if (!response.ok) {
    entry.state = "failed";
    entry.error = response.status >= 500 ? "" : (payload.error || `refused (${response.status})`);
    return;
  }
  state.outbox = state.outbox.filter((candidate) => candidate !== entry);
  if (entry.channelId === state.channel && entry.workspaceId === state.me.workspaceId) {
    upsert({
      messageId: payload.messageId,
      workspaceId: entry.workspaceId,
      channelId: entry.channelId,
      userId: state.me.userId,
      userName: state.me.userName,
      text: entry.text,
      timestamp: payload.timestamp,
      saved: payload.status === "saved",
      confirmed: true,
    });
  }
}

// ---- the yellow banner's Retry: save the unsaved messages now -----------------
$("not-saved").querySelector("button").addEventListener("click", async () => {
  if (state.persistRunning) return;
  const channel = state.channel;
  const unsaved = [...state.messages.values()].filter((m) => m.saved === false && m.userId === state.me.userId);
  if (!unsaved.length) return;
  state.persistRunning = true;
  const status = $("not-saved-status");
  const button = $("not-saved").querySelector("button");
  button.disabled = true;
  let saved = 0;
  let gone = 0;
  let failed = 0;
  try {
    for (const [index, message] of unsaved.entries()) {
      status.textContent = `Saving ${index + 1} of ${unsaved.length}…`;
      let response;
      try {
        response = await api(`${channelPath(channel)}/messages/${enc(message.messageId)}/persist`, { method: "POST" });
      } catch (error) {
        if (error instanceof SignedOut) return;
        failed += 1;
        continue;
      }
      if (response.status === 200) { message.saved = true; saved += 1; }
      else if (response.status === 404) { message.saved = undefined; gone += 1; }
      else failed += 1;
    }
    if (channel !== state.channel) return;
    if (failed) status.textContent = `Still not saved (${failed}): the store is not answering. It is retried automatically; try again later.`;
    else status.textContent = gone ? `Saved ${saved}; ${gone} had expired.` : "Saved.";
  } finally {
    state.persistRunning = false;
    button.disabled = false;
    render({});
  }
  if (!failed) setTimeout(() => { if (status.textContent.startsWith("Saved")) { status.textContent = ""; render({}); } }, 4000);
});

if (state.token && state.me) start();
