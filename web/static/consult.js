"use strict";
// Chat consultation: start a case, watch its steps stream in (server-sent events), then ask questions.

const $ = (id) => document.getElementById(id);
let source = null;
let threadId = null;

function showError(msg) { $("error").textContent = msg || ""; }

function stepClass(text) {
  if (text.startsWith("tool ")) return "tool";
  if (text.startsWith("verdict")) return "verdict";
  return "";
}

function addStep(text, cls) {
  const li = el("li", { class: cls || stepClass(text), text });
  $("steps").append(li);
  return li;
}

function renderOpinion(d) {
  // The step line ("round 1 radiologist-1 (model): ...") gains the differential and the cited rationale.
  const prefix = `round ${d.round} ${d.agent} `;
  const li = [...$("steps").children].reverse().find((x) => x.textContent.startsWith(prefix)) || addStep(prefix);
  li.classList.add("opinion");
  li.dataset.agent = d.agent;
  li.append(el("div", { class: "muted", text: "differential: " + d.differential.map((x) => `${x.diagnosis} ${pct(x.probability)}`).join(", ") }));
  if (d.rationale && d.rationale.length) {
    li.append(el("ul", {}, d.rationale.map((c) =>
      el("li", {}, c.statement, " ", (c.cites || []).map((id) => el("span", { class: "cite", text: id }))))));
  }
}

function renderVerdict(v) {
  $("outcome").append(el("div", { class: "card verdict", id: "verdict" },
    el("h3", { text: `Verdict: ${v.diagnosis_name}` }),
    el("p", {}, `confidence ${v.confidence.toFixed(2)} — ${v.decided_by}`),
    el("p", { class: "muted", text: "differential: " + v.differential.map((d) => `${d.diagnosis} ${pct(d.probability)}`).join(", ") }),
    v.rationale.length ? el("ul", {}, v.rationale.map((c) => el("li", {}, c.statement, " ",
      (c.cites || []).map((id) => el("span", { class: "cite", text: id })), c.valid ? "" : el("span", { class: "error", text: " (unsupported)" })))) : null,
    v.tool_failures.length ? el("p", { class: "error", text: "tool failures: " + v.tool_failures.join("; ") }) : null,
    (v.warnings || []).length ? el("p", { class: "error", text: "warnings: " + v.warnings.join("; ") }) : null));
}

function renderReview(d) {
  $("outcome").append(el("div", { class: "card review", id: "awaiting-review" },
    el("h3", { text: "The panel did not agree: waiting for human review" }),
    el("p", { text: `round ${d.round}; votes: ` + Object.entries(d.votes).map(([a, x]) => `${a}: ${x}`).join(", ") }),
    el("a", { href: "/review/" + encodeURIComponent(threadId), text: "Open it in the review queue" })));
}

function watch(tid, caseId) {
  if (source) source.close();
  threadId = tid;
  $("consultation").hidden = false;
  $("chat").hidden = true;
  $("steps").replaceChildren();
  $("images").replaceChildren();
  $("outcome").replaceChildren();
  $("answers").replaceChildren();
  $("thread").textContent = `${caseId} · ${tid}`;
  $("status").textContent = "running…";
  source = new EventSource(`/api/threads/${encodeURIComponent(tid)}/events`);
  const on = (kind, fn) => source.addEventListener(kind, (e) => fn(JSON.parse(e.data)));
  on("step", (d) => addStep(d.text));
  on("opinion", renderOpinion);
  on("image", (d) => $("images").append(el("figure", {}, el("img", { src: d.src, alt: d.caption, "data-source": d.source }),
    el("figcaption", { text: d.caption }))));
  on("verdict", (d) => renderVerdict(d.verdict));
  on("review", renderReview);
  on("error", (d) => { addStep("error: " + d.message, "error"); showError(d.message); });
  on("ready", () => { $("chat").hidden = false; });
  on("end", () => { source.close(); source = null; $("status").textContent = "finished"; setBusy(false); });
  source.onerror = () => {
    // The browser reconnects on its own (with Last-Event-ID); after a logout or restart it gives up.
    if (source && source.readyState === EventSource.CLOSED) $("status").textContent = "disconnected";
  };
}

function setBusy(busy) {
  $("run-example").disabled = busy;
  $("run-upload").disabled = busy;
  $("run-form").disabled = busy;
}

async function start(form) {
  showError("");
  setBusy(true);
  try {
    const res = await fetch("/api/consultations", { method: "POST", body: form, credentials: "same-origin" });
    if (res.status === 401) return toLogin();
    const data = await res.json().catch(() => ({}));
    if (!res.ok) throw new Error(data.error || `${res.status} ${res.statusText}`);
    watch(data.thread_id, data.case_id);
  } catch (e) {
    showError(e.message);
    setBusy(false);
  }
}

$("pick").addEventListener("submit", (e) => {
  e.preventDefault();
  const f = new FormData();
  f.append("case", $("case").value);
  start(f);
});

$("upload").addEventListener("submit", (e) => {
  e.preventDefault();
  const file = $("zip").files[0];
  if (!file) return showError("file: choose a .zip of one case folder");
  const f = new FormData();
  f.append("file", file, file.name);
  start(f);
});

// Images + a form: one modality choice per chosen image ("auto" takes it from the file type).
$("form-images").addEventListener("change", () => {
  const options = [["auto", "modality from the file type"], ["XR", "radiograph"], ["CT", "CT"], ["MR", "MR"], ["WSI", "slide"]];
  $("image-list").replaceChildren(...[...$("form-images").files].map((f) => el("li", {}, el("label", { class: "inline" }, f.name + " ",
    el("select", { name: "modality", "aria-label": "modality of " + f.name },
      options.map(([v, t]) => el("option", { value: v, text: t })))))));
});

$("form-case").addEventListener("submit", (e) => {
  e.preventDefault();
  if (!$("form-images").files.length) return showError("images: choose at least one image");
  start(new FormData($("form-case")));  // the images, their modalities in the same order, and the fields
});

$("ask").addEventListener("submit", async (e) => {
  e.preventDefault();
  const q = $("question").value.trim();
  if (!q || !threadId) return;
  $("question").value = "";
  $("ask-button").disabled = true;
  const answer = el("div", { class: "answer" });
  $("answers").append(el("div", { class: "question", text: "you: " + q }), answer);
  try {
    await postStream(`/api/threads/${encodeURIComponent(threadId)}/ask`, { question: q }, (kind, data) => {
      if (kind === "piece") answer.textContent += data;
      else if (kind === "error") answer.append(el("span", { class: "error", text: data }));
      else if (kind === "end") answer.classList.add("done");
    });
  } catch (err) {
    answer.append(el("span", { class: "error", text: err.message }));
  } finally {
    $("ask-button").disabled = false;
  }
});

(async () => {
  const me = await header("consult");
  if (me.review_only) {
    $("start").replaceChildren(el("p", { class: "notice", text: "This server runs review-only: consultations are off. Use the review queue." }));
    return;
  }
  const { cases } = await api("/api/cases");
  $("case").replaceChildren(...cases.map((c) => el("option", { value: c.name, disabled: !!c.error,
    text: c.error ? `${c.name} (invalid: ${c.error})` : `${c.name} — ${c.complaint} [${c.studies.join(", ")}]` })));
  const mine = (await api("/api/consultations")).consultations;
  if (mine.length) { const last = mine[mine.length - 1]; watch(last.thread_id, last.case_id); }
})().catch((e) => showError(e.message));
