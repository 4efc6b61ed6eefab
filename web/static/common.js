"use strict";
// Shared helpers. Page text is only ever set with textContent: nothing from the server is parsed as HTML.

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function toLogin() {
  location.href = "/login?next=" + encodeURIComponent(location.pathname);
}

async function api(path, opts = {}) {
  const init = { credentials: "same-origin", ...opts, headers: { Accept: "application/json", ...(opts.headers || {}) } };
  if (opts.json !== undefined) {
    init.method = init.method || "POST";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(opts.json);
    delete init.json;
  }
  const res = await fetch(path, init);
  if (res.status === 401) { toLogin(); throw new Error("login required"); }
  let data = null;
  try { data = await res.json(); } catch (e) { data = null; }
  if (!res.ok) throw new Error((data && (data.error || data.detail)) || `${res.status} ${res.statusText}`);
  return data;
}

// POST a JSON body and read the answer as server-sent events (EventSource only does GET).
async function postStream(path, body, onEvent) {
  const res = await fetch(path, {
    method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/json", Accept: "text/event-stream" }, body: JSON.stringify(body),
  });
  if (res.status === 401) { toLogin(); return; }
  if (!res.ok) {
    let msg = `${res.status} ${res.statusText}`;
    try { msg = (await res.json()).error || msg; } catch (e) { /* not JSON */ }
    throw new Error(msg);
  }
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    const frames = buf.split(/\r?\n\r?\n/);
    buf = frames.pop();
    for (const frame of frames) {
      let event = "message";
      const data = [];
      for (const line of frame.split(/\r?\n/)) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) onEvent(event, JSON.parse(data.join("\n")));
    }
  }
}

async function header(active) {
  const nav = document.getElementById("nav");
  const me = await api("/api/me");
  nav.replaceChildren(
    el("strong", { text: "Grand Rounds" }),
    el("a", { href: "/", class: active === "consult" ? "active" : "", text: "Consultation" }),
    el("a", { href: "/review", class: active === "review" ? "active" : "", text: "Review queue" }),
    el("span", { class: "spacer" }),
    el("span", { id: "user", text: me.user }),
    el("form", { method: "post", action: "/logout" }, el("button", { type: "submit", class: "link", text: "Log out" })),
  );
  return me;
}

function pct(p) { return `${Math.round(p * 100)}%`; }
