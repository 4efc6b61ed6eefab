"use strict";
// The review queue: every consultation paused for a human, most disagreement first.

(async () => {
  await header("review");
  const { reviews, reads_required: need } = await api("/api/reviews");
  document.getElementById("reads").textContent = `Each case needs ${need} independent read(s).`;
  const body = document.querySelector("#queue tbody");
  body.replaceChildren(...reviews.map((r) => el("tr", { "data-thread": r.thread_id },
    el("td", {}, el("a", { href: "/review/" + encodeURIComponent(r.thread_id), text: r.case_id }),
      el("div", { class: "muted", text: r.thread_id })),
    el("td", { text: r.round }),
    el("td", { text: r.distinct }),
    el("td", { text: r.uncertainty.toFixed(2) }),
    el("td", { text: r.votes.map((v) => `${v.agent}: ${v.name}`).join("; ") }),
    el("td", { text: `${r.reads.length} of ${r.reads_required}` + (r.reads.length ? ` (${r.reads.join(", ")})` : "") }))));
  document.getElementById("empty").hidden = reviews.length > 0;
})().catch((e) => { document.getElementById("error").textContent = e.message; });
