// The hub's dashboard: reads the hub's own JSON API and draws it. No build step beyond the
// charting library (uPlot, loaded as a global by index.html). Routes: #/ (the run),
// #/contributor/ID, #/ledger (the ledger explorer, which checks inclusion proofs in the browser),
// #/governance (a steered run's rules, proposals, tallies and what changed when).

const page = document.getElementById("page");

async function json(path) {
  const r = await fetch(path);
  if (!r.ok) throw new Error(`${path}: ${r.status} ${await r.text()}`);
  return r.json();
}

function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function card(k, v) {
  return `<div class="card"><div class="k">${esc(k)}</div><div class="v">${v}</div></div>`;
}

function table(head, rows, id = "") {
  return `<table${id ? ` id="${id}"` : ""}><thead><tr>${head.map((h) => `<th>${esc(h)}</th>`).join("")}</tr></thead><tbody>${rows.join("")}</tbody></table>`;
}

/// A line chart of `ys` over `xs` in `el`; `el.dataset.points` says how many points it drew.
function chart(el, title, xs, series) {
  el.dataset.points = String(xs.length);
  if (!xs.length) { el.innerHTML = `<p class="muted">${esc(title)}: no data yet</p>`; return; }
  const colors = ["#3366cc", "#b42318", "#067647"];
  new uPlot({
    title, width: 540, height: 240, scales: { x: { time: false } },
    series: [{ label: "round" }, ...series.map((s, i) => ({ label: s.label, stroke: colors[i % colors.length], width: 2, dash: s.dash }))],
  }, [xs, ...series.map((s) => s.ys)], el);
}

async function validatorStatus(run) {
  if (!run.spec.trust) return `<p class="muted" id="validator-status">Not a sealed run: submissions travel in the clear and need no attested validator.</p>`;
  const r = await fetch("/v1/validator");
  if (r.status === 503) return `<p class="muted">No attested validator has registered.</p>`;
  if (!r.ok) return `<p class="muted">Not a sealed run: no validator attestation is needed.</p>`;
  const v = await r.json();
  if (v.insecure) {
    return `<div class="insecure" id="validator-status">INSECURE development attestation: no TEE stands behind this validator; nothing about it is proven.</div>`;
  }
  return `<p id="validator-status" class="ok">Attested: ${esc(v.verified.kind)} measurement <code>${esc(v.verified.measurement)}</code>, TCB ${esc(v.verified.tcb)} (ledger entry ${v.ledger_seq}).</p>`;
}

async function overview() {
  const [status, board, run, economy] = await Promise.all([json("/v1/status"), json("/v1/leaderboard"), json("/v1/run"), json("/v1/economy")]);
  const phases = (run.spec.phases || []).length + 1;
  const rounds = status.history.filter((h) => h.mean_inner_loss != null);
  const timeline = status.history.slice().reverse().map((h) => {
    const secs = h.closed_ms ? ((h.closed_ms - h.opened_ms) / 1000).toFixed(1) : "";
    return `<tr><td>${h.round}</td><td>${esc(h.state)}</td><td>${h.accepted}</td><td>${h.mean_inner_loss?.toFixed(4) ?? ""}</td><td>${bytes(h.bytes_up)}</td><td>${esc(h.closed_by ?? "")}</td><td>${secs}</td></tr>`;
  });
  const leaderRow = (r) => `<tr data-id="${r.id}"><td>${r.rank || "–"}</td><td><a href="#/contributor/${r.id}">${esc(r.name)}</a></td><td>${r.ordinal.toFixed(2)}</td><td>${r.rewards}</td><td>${r.accepted}</td><td>${r.rejected}</td><td>${r.mean_score?.toFixed(5) ?? "–"}</td><td>${r.qualified ? "yes" : ""}</td></tr>`;
  const leaders = board.rows.map(leaderRow);
  const unrated = (board.unrated || []).map(leaderRow);
  const epochs = Object.entries(economy.epochs).map(([e, x]) => `<tr><td>${e}</td><td>${x.revenue}</td><td>${x.funding}</td><td>${x.payable}</td><td>${x.holders}</td></tr>`);
  page.innerHTML = `
    <h1>Run ${esc(run.spec.name)} <span class="muted"><code>${esc(status.run_id)}</code></span></h1>
    <div class="cards">
      ${card("state", status.finished ? "finished" : "training")}
      ${card("phase", `${run.phase + 1} / ${phases}`)}
      ${card("round", `${status.round} / ${status.rounds}`)}
      ${card("parameters", status.num_params.toLocaleString())}
      ${card("contributors", status.contributors.length)}
      ${card("bytes up", bytes(status.bytes_up))}
      ${card("bytes down", bytes(status.bytes_down))}
    </div>
    <h2>Validator</h2>${await validatorStatus(run)}
    ${(run.operator_trusted_with || []).length ? `<h3>What this run trusts its operator with</h3><ul id="operator-trust">${run.operator_trusted_with.map((t) => `<li>${esc(t)}</li>`).join("")}</ul>` : ""}
    <h2>Training</h2>
    <div class="charts"><div class="chart" id="loss-chart"></div><div class="chart" id="throughput-chart"></div><div class="chart" id="bytes-chart"></div></div>
    <h2>Leaderboard</h2>
    ${board.rows.length ? table(["rank", "contributor", "μ − 3σ", "reward units", "accepted", "rejected", "mean score", "qualified"], leaders, "leaderboard") : `<p class="muted">Nobody is rated yet (unscored run, or no round scored).</p>`}
    ${unrated.length ? `<h3>Not yet rated</h3><p class="muted">No scored round yet: unranked, listed by id.</p>${table(["rank", "contributor", "μ − 3σ", "reward units", "accepted", "rejected", "mean score", "qualified"], unrated, "unrated")}` : ""}
    <h2>Serving: usage and revenue</h2>
    ${epochs.length ? table(["epoch", "revenue (µ)", "funding (µ)", "paid out (µ)", "holders"], epochs) : `<p class="muted">No epoch of served usage has closed.</p>`}
    <h2>Rounds</h2>
    ${table(["round", "state", "accepted", "mean inner loss", "uploaded", "closed by", "seconds"], timeline)}`;
  const lossSeries = [{ label: "mean inner loss", ys: rounds.map((h) => h.mean_inner_loss) }];
  const floor = run.spec.data.loss_floor;
  if (floor != null) lossSeries.push({ label: "entropy floor", ys: rounds.map(() => floor), dash: [6, 4] });
  chart(document.getElementById("loss-chart"), "mean inner loss per round", rounds.map((h) => h.round), lossSeries);
  document.getElementById("loss-chart").dataset.floor = floor ?? "";
  // Tokens trained into each round (accepted submissions × H × batch × sequence) over its time open.
  const perSubmission = run.spec.inner_steps * run.spec.inner.batch_size * run.spec.inner.seq_len;
  const closed = status.history.filter((h) => h.closed_ms && h.closed_ms > h.opened_ms);
  chart(document.getElementById("throughput-chart"), "tokens trained per second", closed.map((h) => h.round), [
    { label: "tokens/s", ys: closed.map((h) => (h.accepted * perSubmission) / ((h.closed_ms - h.opened_ms) / 1000)) },
  ]);
  chart(document.getElementById("bytes-chart"), "bytes uploaded per round (MiB)", status.history.map((h) => h.round), [{ label: "MiB", ys: status.history.map((h) => h.bytes_up / 1048576) }]);
}

async function contributor(id) {
  const [status, board, history, rewards] = await Promise.all([json("/v1/status"), json("/v1/leaderboard"), json(`/v1/contributors/${id}/history`), json(`/v1/contributors/${id}/rewards?last=50`)]);
  const c = status.contributors.find((x) => String(x.id) === id);
  if (!c) { page.innerHTML = `<p class="fail">No contributor ${esc(id)}.</p>`; return; }
  const row = board.rows.find((r) => String(r.id) === id);
  const unratedRow = (board.unrated || []).find((r) => String(r.id) === id);
  page.innerHTML = `
    <h1>${esc(c.name)} <span class="muted">contributor ${c.id}</span></h1>
    <div class="cards">
      ${card("rank", row ? `${row.rank} / ${board.rows.length}` : unratedRow ? "not yet rated" : "–")}
      ${card("rating μ − 3σ", row ? row.ordinal.toFixed(2) : "–")}
      ${card("reward units", row ? row.rewards : 0)}
      ${card("mean score", row?.mean_score?.toFixed(5) ?? "–")}
      ${card("accepted", c.accepted)}
      ${card("rejected", c.rejected)}
      ${card("uploaded", bytes(c.bytes_up))}
      ${card("mean inner loss", c.mean_inner_loss?.toFixed(4) ?? "–")}
    </div>
    <h2>Rating</h2>
    <div class="charts"><div class="chart" id="rating-chart"></div></div>
    <h2>Scored submissions</h2>
    ${history.scores.length ? table(["round", "trained from", "score", "data fit", "weight", "reward units", "earned nothing because"], history.scores.map((s) =>
      `<tr><td>${s.round}</td><td>${s.base_round}</td><td>${s.score?.toFixed(5) ?? "–"}</td><td>${s.data_fit?.toFixed(5) ?? "–"}</td><td>${s.weight.toFixed(3)}</td><td>${s.reward}</td><td>${esc(s.flag ?? "")}</td></tr>`), "scores") : `<p class="muted">No scored submission yet (unscored run, or none scored).</p>`}
    <h2>How the reward units were computed</h2>
    ${rewards.length ? table(["round", "score", "fit factor", "weight", "share of the round", "reward units", "the rule, with its numbers", "reproduced"], rewards.slice().reverse().map((e) =>
      `<tr><td>${e.round}</td><td>${e.score?.toFixed(5) ?? "–"}</td><td>${e.fit_factor?.toFixed(3) ?? "–"}</td><td>${e.weight.toFixed(3)}</td><td>${e.round_shares > 0 ? (100 * e.share / e.round_shares).toFixed(2) + "%" : "–"}</td><td>${e.reward}</td><td class="formula">${esc(e.formula)}</td><td class="${e.reproduced ? "ok" : "fail"}">${e.reproduced ? "✓" : "✗ differs"}</td></tr>`), "rewards") : `<p class="muted" id="rewards">No scored submission to explain.</p>`}
    <h2>Refused submissions</h2>
    ${history.rejections.length ? table(["round open", "code", "reason", "received"], history.rejections.map((j) =>
      `<tr><td>${j.round ?? "–"}</td><td>${esc(j.code)}</td><td>${esc(j.message)}</td><td>${new Date(j.received_ms).toISOString()}</td></tr>`), "rejections") : `<p class="muted" id="rejections">None.</p>`}
    <h2>Rounds submitted</h2>
    <p id="submitted-rounds">${c.submitted_rounds.join(", ") || "none yet"}</p>`;
  const r = history.ratings;
  chart(document.getElementById("rating-chart"), "rating after each round", r.map((x) => x[0]), [
    { label: "μ", ys: r.map((x) => x[1]) },
    { label: "μ − 3σ (ranked by)", ys: r.map((x) => x[1] - 3 * x[2]) },
  ]);
}

// ---- The ledger explorer: entries decoded from /v1/ledger, proofs checked here, in the browser.

const KINDS = ["genesis", "validator", "receipt", "emission", "usage", "payout", "root", "allocation", "epoch close", "funding",
  "validator fault", "spec", "proposal", "vote", "outcome", "applied change"];
const hex = (b) => Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
const unhex = (s) => new Uint8Array(s.match(/../g).map((h) => parseInt(h, 16)));
const u64 = (b, at) => new DataView(b.buffer, b.byteOffset + at, 8).getBigUint64(0, true);

/// Splits a ledger's bytes into entries (see docs/trust.md for the layout).
function entries(bytes) {
  const out = [];
  let at = 0;
  while (at + 8 <= bytes.length) {
    const n = new DataView(bytes.buffer, at + 4, 4).getUint32(0, true);
    const raw = bytes.subarray(at, at + 8 + n);
    out.push({ seq: Number(u64(raw, 8)), round: Number(u64(raw, 16)), kind: KINDS[raw[65]] ?? `kind ${raw[65]}`, insecure: raw[64] === 1, signer: hex(raw.subarray(raw.length - 96, raw.length - 64)), raw });
    at += 8 + n;
  }
  return out;
}

async function sha256(...parts) {
  const all = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) { all.set(p, at); at += p.length; }
  return new Uint8Array(await crypto.subtle.digest("SHA-256", all));
}

/// RFC 9162 §2.1.3.2: does `path` lead from `leaf` (at `index` of a tree of `size`) to `root`?
async function verifyInclusion(leaf, index, size, path, root) {
  if (index >= size) return false;
  let fn = BigInt(index), sn = BigInt(size - 1);
  let r = await sha256(new Uint8Array([0]), leaf);
  for (const p of path) {
    if (sn === 0n) return false;
    if ((fn & 1n) === 1n || fn === sn) {
      r = await sha256(new Uint8Array([1]), p, r);
      while ((fn & 1n) === 0n && fn !== 0n) { fn >>= 1n; sn >>= 1n; }
    } else {
      r = await sha256(new Uint8Array([1]), r, p);
    }
    fn >>= 1n; sn >>= 1n;
  }
  return sn === 0n && hex(r) === hex(root);
}

/// Checks a proof from /v1/ledger/proof/{seq}: the entry is in the tree the root entry commits
/// to, and the root entry is signed (Ed25519, WebCrypto) by `trusted` keys. Returns a verdict.
async function checkProof(proof, trusted, tamper) {
  const entry = unhex(proof.entry);
  if (tamper) entry[entry.length - 70] ^= 1;
  const rootEntry = unhex(proof.root_entry);
  if (rootEntry[65] !== 6) return { ok: false, why: "the committing entry is not a root" };
  const size = Number(u64(rootEntry, 66));
  const root = rootEntry.subarray(74, 106);
  const path = [];
  for (let i = 0; i < proof.path.length; i += 64) path.push(unhex(proof.path.slice(i, i + 64)));
  if (Number(u64(entry, 8)) !== proof.seq || !(await verifyInclusion(entry, proof.seq, size, path, root))) {
    return { ok: false, why: `entry ${proof.seq} is not in the tree of ${size} entries under root ${hex(root).slice(0, 16)}…` };
  }
  const signer = rootEntry.subarray(rootEntry.length - 96, rootEntry.length - 64);
  const signature = rootEntry.subarray(rootEntry.length - 64);
  const message = new Uint8Array([...new TextEncoder().encode("tessera-ledger-v1"), ...rootEntry.subarray(0, rootEntry.length - 64)]);
  const key = await crypto.subtle.importKey("raw", signer, { name: "Ed25519" }, false, ["verify"]);
  if (!(await crypto.subtle.verify({ name: "Ed25519" }, key, signature, message))) return { ok: false, why: "the root's signature does not verify" };
  if (!trusted.includes(hex(signer))) return { ok: false, why: `the root is signed by ${hex(signer).slice(0, 16)}…, neither the hub nor the validator` };
  return { ok: true, why: `included in the ${size} entries under root ${hex(root).slice(0, 16)}…, signed by ${hex(signer).slice(0, 16)}…` };
}

async function ledger() {
  const [run, raw] = await Promise.all([json("/v1/run"), fetch("/v1/ledger").then((r) => r.arrayBuffer())]);
  const all = entries(new Uint8Array(raw));
  const trusted = [run.hub_key];
  const v = run.spec.trust ? await fetch("/v1/validator") : null;
  if (v?.ok) trusted.push((await v.json()).attestation.signing_key);
  const rows = all.map((e) => `<tr data-seq="${e.seq}"><td>${e.seq}</td><td>${esc(e.kind)}${e.insecure ? ' <span class="fail">INSECURE</span>' : ""}</td><td>${e.round}</td><td><code>${e.signer.slice(0, 16)}…</code></td>
    <td><button class="check">check proof</button> <button class="tamper">check a tampered copy</button> <span class="verdict"></span></td></tr>`);
  page.innerHTML = `<h1>Ledger <span class="muted">${all.length} entries</span></h1>
    <p class="muted">Each check fetches the entry's inclusion proof and verifies it here: the RFC 6962 path to the signed root (SHA-256) and the root's Ed25519 signature (WebCrypto). The tampered copy flips one bit of the entry first and must fail.</p>
    ${table(["seq", "kind", "round", "signer", "inclusion proof"], rows, "ledger")}`;
  for (const tr of page.querySelectorAll("tr[data-seq]")) {
    for (const [cls, tamper] of [["check", false], ["tamper", true]]) {
      tr.querySelector(`.${cls}`).addEventListener("click", async () => {
        const out = tr.querySelector(".verdict");
        out.textContent = "checking…";
        try {
          const r = await fetch(`/v1/ledger/proof/${tr.dataset.seq}`);
          if (!r.ok) throw new Error((await r.json()).message);
          const verdict = await checkProof(await r.json(), trusted, tamper);
          out.className = `verdict ${verdict.ok ? "ok" : "fail"}`;
          out.textContent = `${verdict.ok ? "✓ valid" : "✗ invalid"}: ${verdict.why}`;
        } catch (e) {
          out.className = "verdict fail";
          out.textContent = `✗ no proof: ${e.message}`;
        }
      });
    }
  }
}

// ---- Governance: a steered run's rules and proposals, as GET /v1/governance/proposals gives them.

function tallyBar(t) {
  const pct = (x) => (t.power > 0 ? (100 * x) / t.power : 0);
  return `<span class="tally" title="yes ${t.yes}, no ${t.no}, abstain ${t.abstain} of ${t.power}">` +
    `<span class="yes" style="width:${pct(t.yes).toFixed(1)}%"></span><span class="no" style="width:${pct(t.no).toFixed(1)}%"></span>` +
    `<span class="abstain" style="width:${pct(t.abstain).toFixed(1)}%"></span></span>`;
}

/// Parts per million as a percentage, exact to the ppm (500001 → 50.0001%).
const pct = (ppm) => `${(ppm / 1e4).toFixed(4).replace(/\.?0+$/, "")}%`;

async function governance() {
  const list = await json("/v1/governance/proposals");
  const g = list.governance;
  if (!g) {
    page.innerHTML = `<h1>Governance</h1><p class="muted" id="not-steered">This run is not steered by its holders: its spec stays as created.</p>`;
    return;
  }
  const bounds = Object.entries(g.bounds).map(([k, v]) => `<li><code>${esc(k)}</code>: ${esc(Array.isArray(v) ? (typeof v[0] === "number" ? `[${v.join(", ")}]` : v.join(", ")) : String(v))}</li>`);
  const row = (p) => `<tr data-id="${esc(p.id)}" data-state="${esc(p.state)}"><td><code title="${esc(p.id)}">${esc(p.id.slice(0, 12))}…</code></td><td>${esc(p.title)}</td><td>${esc(p.description)}</td>
    <td class="${p.state === "rejected" ? "fail" : p.state === "applied" || p.state === "passed" ? "ok" : ""}">${esc(p.state)}</td><td>${p.recorded_round ?? "next boundary"}</td><td>${p.closes}</td><td>${p.apply_at}</td>
    <td class="votes">${tallyBar(p.tally)} yes ${p.tally.yes} · no ${p.tally.no} · abstain ${p.tally.abstain} of ${p.tally.power}</td><td>${p.voters}</td></tr>`;
  const open = list.proposals.filter((p) => p.state === "pending" || p.state === "open");
  const closed = list.proposals.filter((p) => !(p.state === "pending" || p.state === "open"));
  const head = ["id", "title", "change", "state", "recorded at round", "vote closes at round", "applies at round", "tally (power at the snapshot)", "voters"];
  const changes = list.proposals.filter((p) => p.state === "applied").sort((a, b) => a.apply_at - b.apply_at).map((p) =>
    `<li data-round="${p.apply_at}">round ${p.apply_at}: ${esc(p.description)} <span class="muted">(proposal <code>${esc(p.id.slice(0, 12))}…</code>, ledger entry ${p.applied_seq})</span></li>`);
  page.innerHTML = `<h1>Governance <span class="muted">round ${list.round}</span></h1>
    <p>Votes stay open ${g.voting_rounds} round(s). A proposal passes when at least ${pct(g.quorum_ppm)} of the power votes and at least ${pct(g.threshold_ppm)} of yes + no says yes; power is each holder's balance at the proposal's snapshot. Every proposal, vote, tally and change is in the <a href="#/ledger">ledger</a>, where <code>tessera ledger verify</code> recounts it.</p>
    <h2>What may be changed</h2><ul id="bounds">${bounds.join("") || "<li>nothing</li>"}</ul>
    <h2>Open</h2>${open.length ? table(head, open.map(row), "open-proposals") : `<p class="muted" id="open-proposals">No open proposal.</p>`}
    <h2>Closed</h2>${closed.length ? table(head, closed.map(row), "closed-proposals") : `<p class="muted" id="closed-proposals">No closed proposal.</p>`}
    <h2>What changed when</h2><ul id="changes">${changes.join("") || `<li class="muted">Nothing yet.</li>`}</ul>`;
}

async function route() {
  const hash = location.hash || "#/";
  document.body.dataset.ready = "";
  try {
    const m = hash.match(/^#\/contributor\/(\d+)$/);
    if (m) await contributor(m[1]);
    else if (hash === "#/ledger") await ledger();
    else if (hash === "#/governance") await governance();
    else await overview();
  } catch (e) {
    page.innerHTML = `<p class="fail">Could not load this page: ${esc(e.message)}</p>`;
    console.error(e);
  }
  document.body.dataset.ready = "1";
}

window.addEventListener("hashchange", route);
route();
