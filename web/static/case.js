"use strict";
// One waiting case: the opinions side by side with the evidence they cite; approve, override or send back.

const $ = (id) => document.getElementById(id);
const threadId = decodeURIComponent(location.pathname.replace(/^\/review\//, ""));
const url = `/api/reviews/${encodeURIComponent(threadId)}`;

function cite(id, evidence) {
  const known = evidence.has(id);
  return el("a", { class: "cite" + (known ? "" : " unknown"), href: known ? `#ev-${id}` : null,
    title: known ? evidence.get(id) : "not a tool result of this case", text: id });
}

function renderDecisions(rows, names) {
  document.querySelector("#decisions tbody").replaceChildren(...rows.map((d) => el("tr", {},
    el("td", { text: `v${d.version}`, title: `decision #${d.id}` }), el("td", { text: d.created_at.replace("T", " ").slice(0, 19) }),
    el("td", { text: d.reviewer }), el("td", { text: d.action }),
    el("td", { text: d.diagnosis ? (names[d.diagnosis] || d.diagnosis) : "" }), el("td", { text: d.reason }),
    el("td", { text: d.applied ? "yes" : `no${d.note ? " — " + d.note : ""}` }))));
}

async function load() {
  const data = await api(url);
  $("case-id").textContent = data.case_id || "";
  $("thread").textContent = threadId;
  renderDecisions(data.decisions, data.names);
  if (!data.waiting) {
    $("state").textContent = data.verdict
      ? `Decided: ${data.verdict.diagnosis_name} — ${data.verdict.decided_by}`
      : "This case is not waiting for review.";
    $("opinions-section").hidden = true;
    $("decide-section").hidden = true;
    return;
  }
  const r = data.review;
  $("summary").textContent = r.summary;
  $("round").textContent = `round ${r.round}; ${data.reads_required} read(s) required`;
  const evidence = new Map(r.tool_results.map((t) => [t.id, t.status === "ok" ? t.summary : `FAILED: ${t.error}`]));
  $("opinions").replaceChildren(...r.opinions.map((o) => el("div", { class: "opinion-col", "data-agent": o.agent },
    el("h3", { text: o.agent }),
    el("div", { class: "muted", text: o.model }),
    el("p", {}, el("strong", { text: data.names[o.diagnosis] || o.diagnosis }),
      o.changed_from ? el("span", { class: "muted", text: ` (was ${data.names[o.changed_from] || o.changed_from})` }) : null),
    el("table", {}, o.differential.map((d) => el("tr", {},
      el("td", { text: data.names[d.diagnosis] || d.diagnosis }),
      el("td", { style: "width:40%" }, el("div", { class: "bar", style: `width:${Math.round(d.probability * 100)}%` })),
      el("td", { text: pct(d.probability) })))),
    o.rationale.length
      ? el("ul", {}, o.rationale.map((c) => el("li", {}, c.statement, " ", c.cites.map((id) => cite(id, evidence)))))
      : el("p", { class: "muted", text: "no written rationale" }))));
  $("evidence").replaceChildren(...(r.tool_results.length ? r.tool_results.map((t) => el("li", { id: `ev-${t.id}` },
    el("strong", { text: `[${t.id}] ` }), t.status === "ok" ? t.summary : el("span", { class: "error", text: `failed: ${t.error}` })))
    : [el("li", { class: "muted", text: "no tool results (the panel saw the presentation only)" })]));
  $("images").replaceChildren(...data.images.map((i) => el("figure", {}, el("img", { src: i.src, alt: i.caption }),
    el("figcaption", { text: i.caption }))));

  const panel = [...new Set(r.opinions.map((o) => o.diagnosis))];
  const choice = (value, label, checked) => el("label", { class: "row", style: "flex-direction:row;align-items:center" },
    el("input", { type: "radio", name: "choice", value, checked }), label);
  $("choices").replaceChildren($("choices").querySelector("legend"),
    ...panel.map((k, i) => choice(`approve:${k}`, `Approve: ${data.names[k] || k}`, i === 0)),
    choice("override", "Override: the diagnosis chosen below", false),
    choice("send_back", "Send back to the panel for another round", false));
  $("override").replaceChildren(...data.diseases.map((d) => el("option", { value: d.key, text: d.name })));
}

$("decide").addEventListener("submit", async (e) => {
  e.preventDefault();
  $("error").textContent = "";
  $("result").textContent = "";
  const picked = document.querySelector("input[name=choice]:checked");
  if (!picked) return;
  const [action, key] = picked.value.split(":");
  const body = { action, reason: $("reason").value };
  if (action === "approve") body.diagnosis = key;
  if (action === "override") body.diagnosis = $("override").value;
  $("submit-decision").disabled = true;
  try {
    const res = await api(url + "/decisions", { json: body });
    $("result").textContent = res.message;
    await load();
  } catch (err) {
    $("error").textContent = err.message;
  } finally {
    $("submit-decision").disabled = false;
  }
});

header("review").then(load).catch((e) => { $("error").textContent = e.message; });
