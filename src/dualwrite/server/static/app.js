// The dualwrite chat page: no framework, no download. Message text is only ever set with
// textContent, never parsed as HTML.
"use strict";

const state = {
  token: sessionStorage.getItem("dualwrite.token"),
  me: JSON.parse(sessionStorage.getItem("dualwrite.me") || "null"),
  channels: ["general", "random"],
  channel: "general",
  socket: null,
  lastId: null,
  failedSend: null,   // {text, clientMessageId} to resend on "Retry?"
  unsaved: new Map(), // message id -> channel, delivered but not saved yet
};

const $ = (id) => document.getElementById(id);

function api(path, options = {}) {
  return fetch(path, {
    ...options,
    headers: { "content-type": "application/json", authorization: `Bearer ${state.token}`, ...(options.headers || {}) },
  });
}

function newClientMessageId() {
  return (crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random().toString(36).slice(2)}`);
}

// ---- sign-in -------------------------------------------------------------
$("sign-in-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = new FormData(event.target);
  const body = Object.fromEntries(form.entries());
  const response = await fetch("/api/dev/token", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
  const payload = await response.json();
  if (!response.ok) { $("sign-in-error").textContent = payload.error || "sign-in failed"; return; }
  state.token = payload.token;
  state.me = body;
  sessionStorage.setItem("dualwrite.token", state.token);
  sessionStorage.setItem("dualwrite.me", JSON.stringify(body));
  start();
});

function start() {
  $("sign-in").hidden = true;
  $("chat").hidden = false;
  $("workspace-name").textContent = state.me.workspaceId;
  $("who").textContent = `${state.me.userName} (${state.me.userId})`;
  renderChannels();
  openChannel(state.channel);
}

// ---- channels ------------------------------------------------------------
function renderChannels() {
  const list = $("channels");
  list.replaceChildren(...state.channels.map((name) => {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = `# ${name}`;
    button.dataset.channel = name;
    button.setAttribute("aria-current", String(name === state.channel));
    button.addEventListener("click", () => openChannel(name));
    item.append(button);
    return item;
  }));
}

$("add-channel").addEventListener("submit", (event) => {
  event.preventDefault();
  const name = event.target.channel.value.trim();
  if (name && !state.channels.includes(name)) state.channels.push(name);
  event.target.reset();
  if (name) openChannel(name);
});

async function openChannel(name) {
  state.channel = name;
  state.lastId = null;
  hide("send-failed"); hide("not-saved");
  renderChannels();
  $("channel-name").textContent = `# ${name}`;
  $("messages").replaceChildren();
  if (state.socket) { state.socket.onclose = null; state.socket.close(); }
  const response = await api(`/api/workspaces/${enc(state.me.workspaceId)}/channels/${enc(name)}/messages?limit=100`);
  if (response.ok) {
    const page = await response.json();
    for (const message of page.messages.slice().reverse()) upsertMessage(message);
  }
  connect();
}

function enc(value) { return encodeURIComponent(value); }

// ---- live delivery -------------------------------------------------------
function connect(delay = 500) {
  const channel = state.channel;
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const after = state.lastId ? `&after=${enc(state.lastId)}` : "";
  const socket = new WebSocket(`${scheme}://${location.host}/ws/workspaces/${enc(state.me.workspaceId)}/channels/${enc(channel)}?token=${enc(state.token)}${after}`);
  state.socket = socket;
  socket.onopen = () => { $("live-state").textContent = "live"; delay = 500; };
  socket.onmessage = (event) => {
    const frame = JSON.parse(event.data);
    if (frame.type === "message" && frame.channelId === state.channel) upsertMessage({ ...frame, saved: undefined });
  };
  socket.onclose = (event) => {
    $("live-state").textContent = "reconnecting";
    if (event.code === 4401 || event.code === 4403) { $("live-state").textContent = "not allowed"; return; }
    // Reconnect with the last id seen: the server replays what was missed.
    setTimeout(() => { if (state.channel === channel) connect(Math.min(delay * 2, 10000)); }, delay);
  };
}

// ---- messages ------------------------------------------------------------
function messageElement(key) {
  return document.querySelector(`#messages li[data-key="${CSS.escape(key)}"]`);
}

function upsertMessage(message, key = message.messageId) {
  let item = messageElement(key) || (message.messageId && messageElement(message.messageId));
  if (!item) {
    item = document.createElement("li");
    const author = document.createElement("span");
    author.className = "author";
    const text = document.createElement("span");
    text.className = "text";
    item.append(author, text);
    $("messages").append(item);
  }
  item.dataset.key = message.messageId || key;
  if (message.messageId) item.dataset.messageId = message.messageId;
  item.dataset.testid = "message";
  item.setAttribute("data-testid", "message");
  item.querySelector(".author").textContent = message.userName;
  item.querySelector(".text").textContent = message.text;
  item.classList.toggle("sending", Boolean(message.sending));
  item.classList.toggle("unsaved", Boolean(message.messageId && state.unsaved.has(message.messageId)));
  if (message.messageId && !message.sending && (!state.lastId || message.messageId > state.lastId)) state.lastId = message.messageId;
  $("messages").scrollTop = $("messages").scrollHeight;
  return item;
}

// ---- sending -------------------------------------------------------------
$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = event.target.text.value;
  if (!text.trim()) return;
  event.target.reset();
  send(text, newClientMessageId());
});

$("composer").text.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("composer").requestSubmit(); }
});

async function send(text, clientMessageId) {
  hide("send-failed");
  const pendingKey = `pending-${clientMessageId}`;
  const optimistic = upsertMessage({ userName: state.me.userName, text, sending: true }, pendingKey);
  let response;
  try {
    response = await api(`/api/workspaces/${enc(state.me.workspaceId)}/channels/${enc(state.channel)}/messages`, {
      method: "POST", body: JSON.stringify({ text, clientMessageId }),
    });
  } catch (error) {
    response = null;
  }
  if (!response || response.status === 503 || response.status >= 500) {
    optimistic.remove();  // roll back: it was not sent
    state.failedSend = { text, clientMessageId };
    show("send-failed");
    return;
  }
  const payload = await response.json();
  if (!response.ok) {
    optimistic.remove();
    alert(payload.error || `send refused (${response.status})`);
    return;
  }
  // The live copy may have arrived first: keep one element per message id.
  const live = messageElement(payload.messageId);
  if (live && live !== optimistic) optimistic.remove();
  if (response.status === 202) { state.unsaved.set(payload.messageId, state.channel); show("not-saved"); }
  upsertMessage({ messageId: payload.messageId, userName: state.me.userName, text }, live && live !== optimistic ? payload.messageId : pendingKey);
}

$("send-failed").querySelector("button").addEventListener("click", () => {
  const failed = state.failedSend;
  if (failed) send(failed.text, failed.clientMessageId);  // same clientMessageId: never a duplicate
});

$("not-saved").querySelector("button").addEventListener("click", async () => {
  for (const [messageId, channel] of [...state.unsaved]) {
    const response = await api(`/api/workspaces/${enc(state.me.workspaceId)}/channels/${enc(channel)}/messages/${enc(messageId)}/persist`, { method: "POST" });
    if (response.status === 200 || response.status === 404) {
      state.unsaved.delete(messageId);
      const item = messageElement(messageId);
      if (item) item.classList.remove("unsaved");
    }
  }
  if (state.unsaved.size === 0) hide("not-saved");
});

function show(id) { $(id).hidden = false; }
function hide(id) { $(id).hidden = true; }

if (state.token && state.me) start();
