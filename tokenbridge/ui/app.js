// tokenbridge admin page: no framework, no build step.
// What it shows comes from GET /v1/admin/overview and, for the mail gateway, GET /v1/mail/messages and
// /v1/mail/replies; values are put in the page with textContent only. Its one action is a mail retry
// (POST /v1/mail/messages/{id}/retry).
"use strict";

(() => {
  const STORAGE_KEY = "tokenbridge.admin.secret";
  const REFRESH_MS = 2000;
  const OVERVIEW_URL = "/v1/admin/overview";
  const MAIL_URL = "/v1/mail";
  const MAIL_LIMIT = 100; // rows per list; older ones: `tokenbridge mail list` or the API
  const NOTE_MS = 60000; // how long a retry's answer stays next to its row

  const $ = (id) => document.getElementById(id);
  let timer = null;
  let generation = 0; // bumped at sign-in and sign-out, so that a late answer from an old session is dropped
  let seenAudit = null; // audit sequence numbers already shown (null before the first render)
  let mailOverview = null; // the overview's "mail" part, from the last refresh
  let mailFilter = ""; // the state the message list is filtered by ("" for every state)
  let mailTicket = 0; // bumped per mail request, so that an answer for an older filter is dropped
  let mailShown = null; // what the mail tables show, to redraw them only when it changes
  const retryNotes = new Map(); // message id -> {text, tone, until}: the answer to a Retry

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

  // Several cards (a group of organisations, or renewal day): one row each. Hidden with a single token.
  function renderTokens(tokens) {
    const several = tokens.length > 1;
    $("tokens-section").hidden = !several;
    if (!several) return;
    const rows = tokens.map((t) => {
      const [label, tone] = STATE_LABELS[t.state] || [t.state, "neutral"];
      const role = t.retiring ? badge("retiring: decrypts only", "neutral")
        : t.required ? badge("in service", "ok") : badge("not required", "neutral");
      return h("tr", { dataset: { token: t.name, state: t.state } },
        h("th", { scope: "row" }, t.name),
        h("td", {}, badge(label, tone), t.message ? h("span", { class: "small" }, t.message) : null),
        h("td", {}, t.label || "—", h("span", { class: "small" }, t.serial || "")),
        h("td", {}, role),
        h("td", { class: "num" }, t.queue_depth));
    });
    fillTable("tokens", rows, "No token.", 5);
  }

  function renderQueue(queue) {
    setText("queue-depth", String(queue.depth));
    setText("queue-service-time", `${queue.service_time_ms.toFixed(1)} ms`);
    const rows = queue.by_client.map((q) =>
      h("tr", { dataset: { actor: q.actor } }, h("th", { scope: "row" }, actorCell(q.who)),
        h("td", { class: "num" }, q.depth)));
    fillTable("queue", rows, "No request is waiting.", 2);
  }

  let severalTokens = false; // set by render(): certificates then show which token they are on

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
      const name = severalTokens ? `${c.token}/${c.label}` : c.label;
      const retiring = c.key_state && c.key_state !== "active"
        ? badge(c.key_state === "retiring" ? "retiring: decrypts only" : "retired", "neutral") : null;
      return h("tr", { dataset: { key: c.label, token: c.token, status: c.status, keyState: c.key_state },
        class: c.warning ? "warning" : null },
        h("th", { scope: "row" }, h("span", { class: "strong" }, name), h("span", { class: "small" }, type),
          retiring),
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

  // Audit outcomes that mean success (a decryption is "done", a verified signature "valid", a reply
  // "delivered"): green. Anything else is a problem code or a failure.
  const SUCCESS_OUTCOMES = new Set(["ok", "ready", "done", "valid", "delivered"]);

  function renderAudit(entries) {
    const first = seenAudit === null;
    const seen = new Set(entries.map((e) => e.seq));
    const rows = entries.map((e) => {
      const fresh = !first && !seenAudit.has(e.seq);
      const key = e.key_label || e.key || "";
      const outcome = badge(e.outcome, SUCCESS_OUTCOMES.has(e.outcome) ? "ok" : "bad");
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
    severalTokens = (data.tokens || []).length > 1;
    renderToken(data.token);
    renderTokens(data.tokens || []);
    renderQueue(data.queue);
    renderCertificates(data.certificates);
    renderClients(data.clients);
    renderAudit(data.audit);
    mailOverview = data.mail || null;
    renderMailSummary(mailOverview);
    setText("version", `tokenbridge ${data.version}`);
    setText("updated", `Updated at ${timeOnly.format(new Date())}`);
    $("connection").hidden = true;
  }

  // ------------------------------------------------------------------ mail gateway

  const plural = (n, one, many) => `${n} ${n === 1 ? one : many}`;

  // Success is never red: answered green, sent and waiting neutral, overdue amber, failed red.
  const OUT_STATES = {
    received: ["received", "neutral", "on disk, not yet signed"],
    queued: ["queued", "neutral", "signed, waiting for delivery"],
    sent: ["sent", "neutral", "awaiting the reply"],
    answered: ["answered", "ok", "the reply came"],
    overdue: ["overdue", "warn", "sent, no reply in time"],
    failed: ["failed", "bad", "bounced: the sender got a delivery report"],
  };
  const REPLY_STATES = {
    received: ["received", "neutral", "being opened"],
    delivered: ["delivered", "ok", "decrypted and put in the mailbox"],
    quarantined: ["quarantined", "bad", "not delivered: kept for the operator"],
  };
  const WAITING = new Set(["received", "queued"]);
  const RETRYABLE = new Set(["received", "queued", "failed"]);

  function mailBadge(states, state, kind) {
    let [label, tone, note] = states[state] || [state, "neutral", ""];
    if (kind === "report" && state === "sent") [tone, note] = ["ok", "delivery report delivered"];
    return [h("span", { class: `badge ${tone}`, dataset: { state } }, label), h("span", { class: "small" }, note)];
  }

  function timeCell(iso) {
    if (!iso) return h("td", { class: "muted" }, "—");
    return h("td", { title: iso, class: "nowrap" }, when(iso), h("span", { class: "small" }, ago(iso)));
  }

  // The sentences that replace the tables when there is nothing to show; `[mail]` and the doc as code.
  function mailOffSentence(mail, hadMail) {
    const doc = h("code", {}, "docs/mail.md");
    if (!mail.configured && hadMail) {
      return ["The mail gateway is no longer set up on this service (no listener nor mailbox in ",
        h("code", {}, "[mail]"), "): the lists below are what it handled before; see ", doc, "."];
    }
    if (!mail.configured) {
      return ["The mail gateway is not set up on this service: to enable it, add a ", h("code", {}, "[mail]"),
        " section to the configuration (a submission listener for the counters, and an inbound listener or an " +
        "IMAP mailbox for the replies) and restart the service; see ", doc, "."];
    }
    if (!mail.store) return ["The mail gateway is set up but has not started yet (it has no queue); see ", doc, "."];
    const port = mail.listeners && mail.listeners.submission;
    return [`The mail gateway is running and no application has gone through it yet: counters send their mail ` +
      `to its submission listener${port ? ` (port ${port})` : ""}; see `, doc, "."];
  }

  function renderMailSummary(mail) {
    const alert = $("mail-alert");
    const counts = mail && mail.counts;
    if (!counts) {
      alert.hidden = true;
      return;
    }
    const tallies = [["overdue", "warn"], ["quarantined", "bad"], ["failed", "bad"], ["queued", null],
      ["awaiting", null]];
    for (const [name, tone] of tallies) {
      const n = counts[name === "awaiting" ? "awaiting_reply" : name] || 0;
      setText(`mail-${name}`, String(n));
      const tally = $(`mail-${name}-tally`);
      tally.classList.remove("warn", "bad");
      if (tone && n > 0) tally.classList.add(tone);
      tally.dataset.count = String(n);
    }
    const parts = [];
    if (counts.overdue) parts.push(`${plural(counts.overdue, "reply is", "replies are")} overdue`);
    if (counts.quarantined) parts.push(`${plural(counts.quarantined, "reply is", "replies are")} quarantined`);
    if (counts.failed) parts.push(`${plural(counts.failed, "outgoing message", "outgoing messages")} bounced`);
    alert.replaceChildren(`Mail: ${parts.join(" · ")}. `, h("a", { href: "#mail-title" }, "See the mail section."));
    alert.hidden = !parts.length;
  }

  function deliveryCell(m) {
    const lines = [];
    if (WAITING.has(m.state)) {
      lines.push(h("span", {}, m.attempts
        ? `${plural(m.attempts, "attempt", "attempts")} so far` : "waiting for its first attempt"));
      if (m.last_error) lines.push(h("span", { class: "small error-text" }, `Last error: ${m.last_error}`));
      if (m.next_attempt) lines.push(h("span", { class: "small" }, `Next attempt ${when(m.next_attempt)}`));
    } else if (m.sent) {
      lines.push(h("span", { title: m.sent }, `Sent ${when(m.sent)}`));
    }
    if (m.failed && m.failed.length) {
      lines.push(h("ul", { class: "reasons" }, m.failed.map((f) =>
        h("li", { dataset: { recipient: f.recipient } }, h("span", { class: "strong" }, f.recipient),
          `${f.status ? `${f.status}: ` : ""}${f.diagnostic || "refused"}`))));
    }
    if (m.reply_due && (m.state === "sent" || m.state === "overdue")) {
      lines.push(h("span", { class: "small", title: m.reply_due }, `Reply due ${when(m.reply_due)}`));
    }
    return h("td", { class: "delivery" }, lines);
  }

  function actionCell(m) {
    const note = retryNotes.get(m.id);
    const button = RETRYABLE.has(m.state)
      ? h("button", { type: "button", class: "row-action", dataset: { retry: m.id },
        title: m.state === "failed" ? "Queue it again for every recipient that refused it"
          : "Try to deliver it now instead of waiting" }, "Retry")
      : null;
    return h("td", { class: "action" }, button,
      note ? h("span", { class: `small note ${note.tone}`, role: "status" }, note.text) : null);
  }

  function messageRow(m) {
    const report = m.kind === "report";
    const subject = report ? "Delivery report" : (m.subject || "(no subject)");
    const names = (m.attachments || []).map((a) =>
      h("li", { title: `${a.size === undefined ? "" : `${a.size} bytes, `}SHA-256 ${a.sha256 || "?"}` },
        a.filename || "(unnamed)"));
    const recipients = (m.recipients || []).join(", ");
    const number = m.registration_number
      ? h("span", { class: "strong number" }, m.registration_number)
      : h("span", { class: "muted" }, "—");
    return h("tr", { dataset: { id: m.id, state: m.state, messageId: m.message_id, kind: m.kind },
      class: m.state === "failed" ? "failed" : null },
    h("td", { class: "num muted" }, m.id),
    h("td", { class: "state" }, mailBadge(OUT_STATES, m.state, m.kind)),
    timeCell(m.received),
    h("td", { class: "route" }, h("span", {}, m.from || "(the gateway)"), h("span", { class: "small" },
      `→ ${recipients}`), m.submitter ? h("span", { class: "small" }, `submitted by ${m.submitter}`) : null),
    h("td", { class: "subject" }, h("span", { class: "strong" }, subject),
      names.length ? h("ul", { class: "chips" }, names) : null,
      report ? h("span", { class: "small" }, "written by the gateway for a bounced message") : null),
    h("td", { class: "registration" }, number, m.answered
      ? h("span", { class: "small", title: m.answered }, `reply #${m.reply_id} ${when(m.answered)}`) : null),
    deliveryCell(m),
    actionCell(m));
  }

  // "Name <address>" as the name, with the address under it.
  function addressCell(value) {
    const parts = /^\s*"?([^"<]*?)"?\s*<([^>]+)>\s*$/.exec(value || "");
    if (!parts || !parts[1]) return h("td", { class: "route" }, value || "—");
    return h("td", { class: "route" }, h("span", {}, parts[1]), h("span", { class: "small" }, parts[2]));
  }

  function replyRow(r, subjects) {
    let answers;
    if (r.outbound_id) {
      const subject = subjects.get(r.outbound_id);
      answers = [h("span", { class: "strong" }, `application #${r.outbound_id}`),
        subject ? h("span", { class: "small" }, subject) : null];
    } else {
      answers = h("span", { class: "muted" }, "not matched to an application");
    }
    let verdict;
    if (r.state === "quarantined") {
      verdict = [h("span", { class: "reason" }, `Why: ${r.reason || "no reason recorded"}`),
        h("span", { class: "small" }, "The original is kept; it was not delivered.")];
    } else {
      const signerShown = r.signer && !(r.verification || "").includes(r.signer);
      verdict = [r.verification ? h("span", {}, r.verification) : null,
        signerShown ? h("span", { class: "small" }, `signed by ${r.signer}`) : null,
        r.state === "received" && r.reason ? h("span", { class: "small error-text" }, `Last error: ${r.reason}`)
          : null];
    }
    return h("tr", { dataset: { id: r.id, state: r.state, messageId: r.message_id || "" },
      class: r.state === "quarantined" ? "failed" : null },
    h("td", { class: "num muted" }, r.id),
    h("td", { class: "state" }, mailBadge(REPLY_STATES, r.state)),
    timeCell(r.received),
    addressCell(r.from),
    h("td", { class: "subject" }, r.subject || "(no subject)"),
    h("td", { class: "answers" }, answers),
    h("td", { class: "registration" }, r.registration_number
      ? h("span", { class: "strong number" }, r.registration_number) : h("span", { class: "muted" }, "—")),
    h("td", { class: "verification" }, verdict));
  }

  function showMailOff(parts) {
    const off = $("mail-off");
    off.replaceChildren(...parts);
    off.hidden = !parts.length;
  }

  // messages and replies are null when there is no queue to read (the gateway is not set up).
  function renderMail(mail, messages, replies) {
    const section = $("mail");
    if (!mail) {
      section.hidden = true;
      return;
    }
    section.hidden = false;
    const error = $("mail-error");
    error.textContent = mail.error || "";
    error.hidden = !mail.error;
    const now = Date.now();
    for (const [id, note] of retryNotes) if (note.until < now) retryNotes.delete(id);
    if (!messages) {
      mailShown = null;
      showMailOff(mailOffSentence(mail, false));
      $("mail-on").hidden = true;
      return;
    }
    if (!mailFilter && !messages.length && !replies.length) {
      mailShown = null;
      showMailOff(mailOffSentence(mail, false));
      $("mail-on").hidden = true;
      return;
    }
    showMailOff(mail.configured ? [] : mailOffSentence(mail, true));
    $("mail-on").hidden = false;
    // Redraw only on a change (or every half minute, for the "… ago" texts): a button keeps its focus.
    const shown = JSON.stringify([messages, replies, [...retryNotes], mailFilter, Math.floor(now / 30000)]);
    if (shown === mailShown) return;
    mailShown = shown;
    const more = messages.length >= MAIL_LIMIT
      ? ` (the ${MAIL_LIMIT} latest; older ones with \`tokenbridge mail list\`)` : "";
    const filtered = mailFilter ? `, ${mailFilter} only` : "";
    setText("mail-messages-caption", `Outgoing applications and delivery reports, newest first${filtered}${more}`);
    fillTable("mail-messages", messages.map(messageRow),
      mailFilter ? `No outgoing message is ${mailFilter}.` : "No outgoing message yet.", 8);
    const subjects = new Map(messages.map((m) => [m.id, m.subject]));
    fillTable("mail-replies", replies.map((r) => replyRow(r, subjects)), "No reply has arrived yet.", 8);
  }

  async function refreshMail(secret, run) {
    const mail = mailOverview;
    if (!mail || !mail.store) {
      renderMail(mail, null, null);
      return;
    }
    mailTicket += 1;
    const ticket = mailTicket;
    try {
      const query = new URLSearchParams({ limit: String(MAIL_LIMIT) });
      if (mailFilter) query.set("state", mailFilter);
      const [messages, replies] = await Promise.all([
        apiFetch(`${MAIL_URL}/messages?${query}`, secret),
        apiFetch(`${MAIL_URL}/replies?limit=${MAIL_LIMIT}`, secret),
      ]);
      if (run !== generation || ticket !== mailTicket) return;
      renderMail(mail, messages, replies);
    } catch (err) {
      if (run !== generation || ticket !== mailTicket) return;
      const error = $("mail-error");
      error.textContent = `The mail lists could not be read. ${explain(err)}`;
      error.hidden = false;
    }
  }

  function showMailAction(text, tone) {
    const banner = $("mail-action");
    banner.textContent = text;
    banner.className = `banner ${tone === "ok" ? "success" : "error"}`;
    banner.hidden = false;
  }

  async function retryMessage(button) {
    const secret = sessionStorage.getItem(STORAGE_KEY);
    const id = Number(button.dataset.retry);
    if (!secret || !Number.isInteger(id)) return;
    const run = generation;
    button.disabled = true;
    let text;
    let tone;
    try {
      const answer = await apiFetch(`${MAIL_URL}/messages/${id}/retry`, secret, { method: "POST" });
      tone = "ok";
      text = answer && answer.retried
        ? `Message #${id}: retry accepted at ${timeOnly.format(new Date())}. It is queued again and will be ` +
          "sent as soon as possible; its state below follows."
        : `Message #${id}: the service answered ${JSON.stringify(answer)}.`;
    } catch (err) {
      tone = "bad";
      text = err.status === 409 || err.status === 404
        ? `Message #${id} was not retried: ${err.message}.`
        : `Message #${id} was not retried. ${explain(err)}`;
    }
    if (run !== generation) return;
    button.disabled = false;
    retryNotes.set(id, { text: tone === "ok" ? "Retry accepted" : "Not retried", tone, until: Date.now() + NOTE_MS });
    showMailAction(text, tone);
    await refreshMail(secret, run);
  }

  // ------------------------------------------------------------------ API

  class ApiError extends Error {
    constructor(status, problem) {
      super((problem && problem.detail) || `HTTP ${status}`);
      this.status = status;
      this.code = problem && problem.code;
    }
  }

  async function apiFetch(url, secret, init) {
    let response;
    try {
      response = await fetch(url, {
        method: (init && init.method) || "GET",
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

  const fetchOverview = (secret) => apiFetch(OVERVIEW_URL, secret);

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
    mailOverview = null;
    mailShown = null;
    retryNotes.clear();
    $("mail-action").hidden = true;
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
      await refreshMail(secret, run);
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
      refreshMail(secret, run);
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
    $("mail-filter").addEventListener("change", (event) => {
      mailFilter = event.target.value;
      const secret = sessionStorage.getItem(STORAGE_KEY);
      if (secret) refreshMail(secret, generation);
    });
    $("mail-messages").addEventListener("click", (event) => {
      const button = event.target.closest("button[data-retry]");
      if (button && !button.disabled) retryMessage(button);
    });
    if (sessionStorage.getItem(STORAGE_KEY)) {
      generation += 1;
      showDashboard();
      refresh(generation);
    } else {
      showLogin("");
    }
  });
})();
