// tokenbridge admin page: read-only, no framework, no build step.
// Everything shown comes from GET /v1/admin/overview; values are put in the page with textContent only.
"use strict";

(() => {
  const STORAGE_KEY = "tokenbridge.admin.secret";
  const REFRESH_MS = 2000;
  const OVERVIEW_URL = "/v1/admin/overview";

  const $ = (id) => document.getElementById(id);
  let timer = null;
  let generation = 0; // bumped at sign-in and sign-out, so that a late answer from an old session is dropped
  let seenAudit = null; // audit sequence numbers already shown (null before the first render)

  // ------------------------------------------------------------------ formatting

  const dateTime = new Intl.DateTimeFormat("en-GB", {
    day: "2-digit", month: "short", year: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit",
    hour12: false,
  });
  const dateOnly = new Intl.DateTimeFormat("en-GB", { day: "2-digit", month: "short", year: "numeric" });
  const timeOnly = new Intl.DateTimeFormat("en-GB", {
    hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false,
  });

  function sameDay(a, b) {
    return a.getFullYear() === b.getFullYear() && a.getMonth() === b.getMonth() && a.getDate() === b.getDate();
  }

  function when(iso) {
    if (!iso) return "never";
    const d = new Date(iso);
    return sameDay(d, new Date()) ? `today ${timeOnly.format(d)}` : dateTime.format(d);
  }

  function ago(iso) {
    if (!iso) return "";
    const seconds = Math.max(0, (Date.now() - new Date(iso).getTime()) / 1000);
    if (seconds < 90) return "just now";
    if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
    if (seconds < 86400 * 2) return `${Math.round(seconds / 3600)} h ago`;
    return `${Math.round(seconds / 86400)} days ago`;
  }

  const yesNo = (value) => (value ? "Yes" : "No");

  const KINDS = { client: "API client", workstation: "Workstation" };
  const kindText = (kind) => KINDS[kind] || kind || "API client";

  // An actor as the overview splits it: {kind, name, via}; e.g. a client's request through a workstation.
  function actorCell(who) {
    const notes = [who.kind ? kindText(who.kind) : null, who.via ? `via workstation ${who.via}` : null];
    const note = notes.filter(Boolean).join(", ");
    return h("span", {}, who.name, note ? h("span", { class: "small" }, note) : null);
  }

  // ------------------------------------------------------------------ DOM helpers

  function h(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === undefined || child === null || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const badge = (text, tone) => h("span", { class: `badge ${tone || ""}`.trim() }, text);
  const chips = (items, tone) => h("ul", { class: "chips" }, items.map((item) => h("li", { class: tone }, item)));

  function setText(id, text) {
    $(id).textContent = text;
  }

  function fillTable(id, rows, emptyText, columns) {
    const body = $(id).tBodies[0];
    if (!rows.length) {
      body.replaceChildren(h("tr", { class: "empty" }, h("td", { colspan: columns }, emptyText)));
    } else {
      body.replaceChildren(...rows);
    }
  }

  // ------------------------------------------------------------------ rendering

  const STATE_LABELS = {
    ready: ["Ready", "ok"], needs_pin: ["Needs PIN", "warn"], locked: ["PIN locked", "bad"],
    absent: ["Absent", "bad"], foreign: ["Unknown token", "bad"], error: ["Error", "bad"],
    starting: ["Starting", "neutral"],
  };

  function renderToken(token) {
    const [label, tone] = STATE_LABELS[token.state] || [token.state, "neutral"];
    const state = $("token-state");
    state.textContent = label;
    state.className = `badge ${tone}`;
    state.dataset.state = token.state;
    setText("token-state-text", token.state_text);
    const message = $("token-message");
    message.textContent = token.message || "";
    message.hidden = !token.message;
    setText("token-label", token.label || "—");
    setText("token-serial", token.serial || "—");
    setText("token-model", [token.manufacturer, token.model].filter(Boolean).join(" / ") || "—");
    setText("token-present", yesNo(token.present));
    setText("token-logged-in", yesNo(token.logged_in));
    const pin = token.pin;
    const flags = [];
    if (pin.locked) flags.push(badge("locked", "bad"));
    if (pin.final_try) flags.push(badge("final try", "bad"));
    if (pin.count_low) flags.push(badge("a wrong PIN was entered: fewer tries left", "warn"));
    if (pin.to_be_changed) flags.push(badge("must be changed", "warn"));
    if (token.protected_authentication_path) flags.push(badge("entered on the reader's pin pad", "neutral"));
    const pinCell = $("token-pin");
    if (flags.length) pinCell.replaceChildren(...flags);
    else pinCell.replaceChildren(badge("OK", "ok"));
  }

  function renderQueue(queue) {
    setText("queue-depth", String(queue.depth));
    setText("queue-service-time", `${queue.service_time_ms.toFixed(1)} ms`);
    const rows = queue.by_client.map((q) =>
      h("tr", { dataset: { actor: q.actor } }, h("th", { scope: "row" }, actorCell(q.who)),
        h("td", { class: "num" }, q.depth)));
    fillTable("queue", rows, "No request is waiting.", 2);
  }

  const daysText = (days) => (days <= 0 ? "less than a day" : days === 1 ? "1 day" : `${days} days`);

  // The certificate's standing in words, with its dates: the same rule as /metrics and `tokenbridge doctor`.
  function validityText(c) {
    const end = dateOnly.format(new Date(c.not_after));
    if (c.status === "expired") {
      return `${c.label}: the certificate expired on ${end}; by default it no longer signs. Renew it.`;
    }
    if (c.status === "not_yet_valid") {
      return `${c.label}: the certificate is not valid before ${dateOnly.format(new Date(c.not_before))}.`;
    }
    return `${c.label}: the certificate expires on ${end}, in ${daysText(c.days_left)}. Renew it before then.`;
  }

  // Amber for certificates to renew soon, red for those that no longer work: success is never red.
  function renderCertificateWarnings(certificates) {
    for (const [id, failing] of [["certificates-warning", false], ["certificates-failing", true]]) {
      const shown = certificates.filter((c) => c.warning && (c.status !== "expiring") === failing);
      const banner = $(id);
      banner.replaceChildren(...shown.map((c) => h("span", { class: "line", dataset: { key: c.label } },
        validityText(c))));
      banner.hidden = !shown.length;
    }
  }

  function daysCell(c) {
    if (c.status === "expired") return badge(`expired ${dateOnly.format(new Date(c.not_after))}`, "bad");
    if (c.status === "not_yet_valid") {
      return badge(`not valid before ${dateOnly.format(new Date(c.not_before))}`, "bad");
    }
    if (c.status === "expiring") {
      return [badge(`${daysText(c.days_left)} left — renew soon`, "warn"),
        h("span", { class: "small" }, `warning from ${c.warning_days} days before expiry`)];
    }
    return String(c.days_left);
  }

  function renderCertificates(certificates) {
    renderCertificateWarnings(certificates);
    const rows = certificates.map((c) => {
      const type = `${c.key_type.toUpperCase()} ${c.key_size}`;
      return h("tr", { dataset: { key: c.label, status: c.status }, class: c.warning ? "warning" : null },
        h("th", { scope: "row" }, h("span", { class: "strong" }, c.label), h("span", { class: "small" }, type)),
        h("td", {},
          h("span", { class: "strong" }, c.common_name || c.subject),
          h("span", { class: "small", title: c.issuer ? `Issued by ${c.issuer}` : null }, c.subject)),
        h("td", { class: "usages" }, chips(c.usages, "usage"),
          c.extended_usages.length ? chips(c.extended_usages, "eku") : null),
        h("td", { title: c.not_after, class: "expires" }, dateOnly.format(new Date(c.not_after))),
        h("td", { class: "num days-left" }, daysCell(c)));
    });
    fillTable("certificates", rows, "No certificate found on the token (yet).", 5);
  }

  function renderClients(clients) {
    const rows = clients.map((c) => {
      const status = c.revoked ? badge(`revoked ${dateOnly.format(new Date(c.revoked))}`, "bad") : badge("active", "ok");
      const seen = c.last_seen
        ? h("span", { title: c.last_seen }, when(c.last_seen), h("span", { class: "small" }, ago(c.last_seen)))
        : h("span", { class: "muted" }, "never");
      return h("tr", { dataset: { client: c.name }, class: c.revoked ? "revoked" : null },
        h("th", { scope: "row" }, c.name),
        h("td", {}, kindText(c.kind), c.cert_sha256
          ? h("span", { class: "small", title: `certificate SHA-256 ${c.cert_sha256}` },
            `certificate ${c.cert_sha256.slice(0, 16)}…`)
          : null),
        h("td", {}, chips(c.grants || [], "grant"),
          c.keys && c.keys.length ? h("span", { class: "small" }, `keys: ${c.keys.join(", ")}`) : null),
        h("td", {}, seen),
        h("td", { class: "num ops-today" }, c.operations_today),
        h("td", {}, status));
    });
    fillTable("clients", rows, "No client yet: add one with `tokenbridge clients add`.", 6);
  }

  function renderAudit(entries) {
    const first = seenAudit === null;
    const seen = new Set(entries.map((e) => e.seq));
    const rows = entries.map((e) => {
      const fresh = !first && !seenAudit.has(e.seq);
      const key = e.key_label || e.key || "";
      const outcome = e.outcome === "ok" || e.outcome === "ready" ? badge(e.outcome, "ok") : badge(e.outcome, "bad");
      return h("tr", { dataset: { seq: e.seq, actor: e.actor, event: e.event }, class: fresh ? "fresh" : null },
        h("td", { class: "num muted" }, e.seq),
        h("td", { title: e.ts, class: "nowrap" }, when(e.ts)),
        h("td", {}, actorCell(e.who)),
        h("td", { class: "event" }, e.event),
        h("td", {}, key, e.algorithm ? h("span", { class: "small" }, e.algorithm) : null),
        h("td", { class: "outcome" }, outcome),
        h("td", { class: "detail" }, e.detail || ""));
    });
    seenAudit = seen;
    fillTable("audit", rows, "The audit log is empty.", 7);
  }

  function render(data) {
    renderToken(data.token);
    renderQueue(data.queue);
    renderCertificates(data.certificates);
    renderClients(data.clients);
    renderAudit(data.audit);
    setText("version", `tokenbridge ${data.version}`);
    setText("updated", `Updated at ${timeOnly.format(new Date())}`);
    $("connection").hidden = true;
  }

  // ------------------------------------------------------------------ API

  class ApiError extends Error {
    constructor(status, problem) {
      super((problem && problem.detail) || `HTTP ${status}`);
      this.status = status;
      this.code = problem && problem.code;
    }
  }

  async function fetchOverview(secret) {
    let response;
    try {
      response = await fetch(OVERVIEW_URL, {
        headers: { Authorization: `Bearer ${secret}`, Accept: "application/json" },
        cache: "no-store",
        credentials: "omit",
      });
    } catch (err) {
      throw new ApiError(0, { detail: "the tokenbridge service cannot be reached" });
    }
    if (!response.ok) {
      let problem = null;
      try { problem = await response.json(); } catch (err) { problem = null; }
      throw new ApiError(response.status, problem);
    }
    return response.json();
  }

  function explain(err) {
    if (err.status === 401) {
      return "This secret was not accepted: it is unknown or has been revoked. Check that you pasted the whole " +
        "secret (it starts with tb_).";
    }
    if (err.status === 403) {
      return "This secret is valid but its client has no admin grant. Use the secret of a client created with " +
        "--grant admin.";
    }
    if (err.status === 0) return "The tokenbridge service cannot be reached. Is it running?";
    return `The service answered with an error (${err.status}): ${err.message}`;
  }

  // ------------------------------------------------------------------ session

  function showLogin(message) {
    clearTimeout(timer);
    generation += 1;
    seenAudit = null;
    $("dashboard").hidden = true;
    $("session").hidden = true;
    $("login-view").hidden = false;
    const error = $("login-error");
    error.textContent = message || "";
    error.hidden = !message;
    $("secret").value = "";
    $("secret").focus();
  }

  function showDashboard() {
    $("login-view").hidden = true;
    $("dashboard").hidden = false;
    $("session").hidden = false;
  }

  async function refresh(run) {
    const secret = sessionStorage.getItem(STORAGE_KEY);
    if (!secret || run !== generation) return;
    try {
      const data = await fetchOverview(secret);
      if (run !== generation) return;
      render(data);
    } catch (err) {
      if (run !== generation) return;
      if (err.status === 401 || err.status === 403) {
        sessionStorage.removeItem(STORAGE_KEY);
        showLogin(`You were signed out. ${explain(err)}`);
        return;
      }
      const banner = $("connection");
      banner.textContent = `${explain(err)} Last attempt at ${timeOnly.format(new Date())}; retrying every ` +
        `${REFRESH_MS / 1000} seconds. The figures below may be out of date.`;
      banner.hidden = false;
    }
    if (run === generation) timer = setTimeout(() => refresh(run), REFRESH_MS);
  }

  async function signIn(event) {
    event.preventDefault();
    const secret = $("secret").value.trim();
    const error = $("login-error");
    if (!secret) {
      error.textContent = "Enter an API secret.";
      error.hidden = false;
      return;
    }
    const button = $("login-button");
    button.disabled = true;
    error.hidden = true;
    try {
      const data = await fetchOverview(secret);
      sessionStorage.setItem(STORAGE_KEY, secret);
      generation += 1;
      seenAudit = null;
      showDashboard();
      render(data);
      const run = generation;
      timer = setTimeout(() => refresh(run), REFRESH_MS);
    } catch (err) {
      error.textContent = explain(err);
      error.hidden = false;
      $("secret").select();
    } finally {
      button.disabled = false;
    }
  }

  function signOut() {
    sessionStorage.removeItem(STORAGE_KEY);
    showLogin("");
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", signIn);
    $("logout").addEventListener("click", signOut);
    if (sessionStorage.getItem(STORAGE_KEY)) {
      generation += 1;
      showDashboard();
      refresh(generation);
    } else {
      showLogin("");
    }
  });
})();
