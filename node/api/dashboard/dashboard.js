// idlefleet live dashboard: renders /api/fleet snapshots pushed over server-sent events.
// Peer records come from other machines: every value is written with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function shortId(peerId) {
  return peerId.length > 12 ? ".." + peerId.slice(-10) : peerId;
}

function batteryCell(soc) {
  const td = el("td");
  if (typeof soc !== "number") { td.textContent = "-"; return td; }
  const bar = el("span", null, soc < 0.2 ? "bar low" : "bar");
  const fill = el("span");
  fill.style.width = Math.round(Math.max(0, Math.min(1, soc)) * 100) + "%";
  bar.appendChild(fill);
  td.appendChild(bar);
  td.appendChild(document.createTextNode((soc * 100).toFixed(1) + "%"));
  return td;
}

function renderPeers(snapshot) {
  const body = $("peers").tBodies[0];
  const rows = [];
  for (const p of snapshot.peers) {
    const tr = el("tr", null, p.self ? "self" : "");
    tr.dataset.peerId = p.peer_id;
    const id = el("td", shortId(p.peer_id), "mono");
    id.title = p.peer_id;
    tr.appendChild(id);
    const state = el("td", null);
    state.appendChild(el("span", p.state, "state-" + p.state));
    if (p.reason) state.appendChild(el("span", p.reason, "reason"));
    tr.appendChild(state);
    tr.appendChild(batteryCell(p.battery_soc));
    tr.appendChild(el("td", p.plugged_in ? "yes" : "no"));
    tr.appendChild(el("td", p.region, "mono"));
    tr.appendChild(el("td", p.blocks ? p.blocks[0] + "–" + p.blocks[1] : "-", "mono"));
    tr.appendChild(el("td", typeof p.load === "number" ? Math.round(p.load * 100) + "%" : "-"));
    tr.appendChild(el("td", p.self ? "-" : (p.rtt_ms === null ? "?" : p.rtt_ms.toFixed(1) + " ms")));
    rows.push(tr);
  }
  body.replaceChildren(...rows);
  $("peer-count").textContent = snapshot.mode === "local"
    ? "(local mode: every block runs in this process)" : "(" + snapshot.peers.length + " alive)";
  $("no-peers").hidden = snapshot.peers.length > 0 || snapshot.mode === "local";
}

function renderCoverage(snapshot) {
  const cells = snapshot.coverage.map((hosts, block) => {
    const cell = el("div", hosts, "cov-" + Math.min(hosts, 3));
    cell.title = "block " + block + ": " + hosts + " host" + (hosts === 1 ? "" : "s");
    cell.dataset.block = block;
    return cell;
  });
  $("coverage").replaceChildren(...cells);
  const n = snapshot.coverage.length;
  const min = n ? Math.min(...snapshot.coverage) : 0;
  $("coverage-summary").textContent = n
    ? "(" + n + " blocks, fewest hosts " + min + (min === 0 ? ": the model is not covered" : "") + ")"
    : "(no model announced yet)";
}

function renderGenerations(snapshot) {
  const rows = snapshot.generations.map((g) => {
    const tr = el("tr");
    tr.appendChild(el("td", g.id, "mono"));
    tr.appendChild(el("td", g.endpoint + (g.stream ? " (stream)" : "")));
    tr.appendChild(el("td", g.tokens + " / " + g.max_tokens));
    tr.appendChild(el("td", g.tokens_per_s.toFixed(1)));
    tr.appendChild(el("td", g.elapsed_s.toFixed(1) + " s"));
    tr.appendChild(el("td", g.route.map((h) => shortId(h.peer_id) + "[" + h.blocks[0] + ":" + h.blocks[1] + "]")
      .join(" → ") || "-", "mono"));
    return tr;
  });
  $("generations").tBodies[0].replaceChildren(...rows);
  $("no-generations").hidden = rows.length > 0;
  $("throughput").textContent = "(" + snapshot.tokens_per_s.toFixed(1) + " tokens/s over 10 s; "
    + snapshot.totals.generations + " finished, " + snapshot.totals.completion_tokens + " tokens)";
}

function render(snapshot) {
  $("mode").textContent = snapshot.mode === "local" ? "local" : "fleet";
  $("model").textContent = snapshot.model ? snapshot.model.id : "model loading…";
  renderCoverage(snapshot);
  renderPeers(snapshot);
  renderGenerations(snapshot);
  document.body.dataset.updated = String(snapshot.time);
}

function setLink(on) {
  const link = $("link");
  link.textContent = on ? "live" : "reconnecting";
  link.className = on ? "tag on" : "tag off";
}

function connect() {
  // EventSource reconnects by itself after an error; the tag shows the state meanwhile.
  const source = new EventSource("/api/events");
  source.onopen = () => setLink(true);
  source.onerror = () => setLink(false);
  source.onmessage = (event) => {
    try {
      render(JSON.parse(event.data));
    } catch (err) {
      setLink(false);
      console.warn("bad dashboard snapshot", err);
    }
  };
}

connect();
