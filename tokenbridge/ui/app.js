// tokenbridge admin page: no framework, no build step.
// What it shows comes from GET /v1/admin/overview and, for the mail gateway, GET /v1/mail/messages and
// /v1/mail/replies; values are put in the page with textContent only. Its one action is a mail retry
// (POST /v1/mail/messages/{id}/retry). Its words are in strings.js, in English and French: the browser's
// languages choose, the FR / EN switch overrides (remembered in local storage).
"use strict";

(() => {
  const STORAGE_KEY = "tokenbridge.admin.secret";
  const LANG_KEY = "tokenbridge.admin.lang"; // local storage: the language chosen with the switch
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
  let lastData = null; // the last overview, drawn again when the language changes
  let lastMail = null; // the last mail lists, likewise
  let problemCode = ""; // the refusals list's filters
  let problemWho = "";

  // ------------------------------------------------------------------ language

  const STRINGS = window.TOKENBRIDGE_STRINGS;
  const LANGS = ["fr", "en"];

  function storedLang() {
    try { return localStorage.getItem(LANG_KEY); } catch (err) { return null; }
  }

  // The switch's choice, else the first of the browser's languages (Accept-Language) that the page speaks.
  function chooseLang() {
    const stored = storedLang();
    if (LANGS.includes(stored)) return stored;
    for (const tag of navigator.languages || [navigator.language || ""]) {
      const primary = String(tag).toLowerCase().split("-")[0];
      if (LANGS.includes(primary)) return primary;
    }
    return "en";
  }

  let lang = chooseLang();
  let dict = STRINGS[lang];

  function t(key, ...args) {
    const value = key in dict ? dict[key] : STRINGS.en[key];
    if (value === undefined) return key;
    return typeof value === "function" ? value(...args) : value;
  }

  // ------------------------------------------------------------------ formatting

  let dateTime;
  let dateOnly;
  let timeOnly;
  let relative;
  let decimal;
  let figure; // a number of seconds from the settings (0.5, 2, 10): at most one decimal, in the page's language

  function makeFormats() {
    const locale = t("locale");
    dateTime = new Intl.DateTimeFormat(locale, {
      day: "2-digit", month: "short", year: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit",
      hour12: false,
    });
    dateOnly = new Intl.DateTimeFormat(locale, { day: "2-digit", month: "short", year: "numeric" });
    timeOnly = new Intl.DateTimeFormat(locale, { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
    relative = new Intl.RelativeTimeFormat(locale, { numeric: "always", style: "short" });
    decimal = new Intl.NumberFormat(locale, { minimumFractionDigits: 1, maximumFractionDigits: 1 });
    figure = new Intl.NumberFormat(locale, { maximumFractionDigits: 1 });
  }
  makeFormats();

  function sameDay(a, b) {
    return a.getFullYear() === b.getFullYear() && a.getMonth() === b.getMonth() && a.getDate() === b.getDate();
  }

  function when(iso) {
    if (!iso) return t("never");
    const d = new Date(iso);
    return sameDay(d, new Date()) ? t("today", timeOnly.format(d)) : dateTime.format(d);
  }

  function ago(iso) {
    if (!iso) return "";
    const seconds = Math.max(0, (Date.now() - new Date(iso).getTime()) / 1000);
    if (seconds < 90) return t("justNow");
    if (seconds < 3600) return relative.format(-Math.round(seconds / 60), "minute");
    if (seconds < 86400 * 2) return relative.format(-Math.round(seconds / 3600), "hour");
    return relative.format(-Math.round(seconds / 86400), "day");
  }

  const yesNo = (value) => (value ? t("yes") : t("no"));
  const day = (iso) => dateOnly.format(new Date(iso));

  const kindText = (kind) => (STRINGS.en[`kind.${kind || "client"}`] ? t(`kind.${kind || "client"}`) : kind);

  // An outcome code in words (French) or as it is (English); the code itself stays in the tooltip.
  const outcomeText = (code) => (t("outcome") || {})[code] || code;

  // An actor as the overview splits it: {kind, name, via}; e.g. a client's request through a workstation.
  function actorCell(who) {
    const notes = [who.kind ? kindText(who.kind) : null, who.via ? t("via", who.via) : null];
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

  const STATE_TONES = {
    ready: "ok", needs_pin: "warn", locked: "bad", absent: "bad", foreign: "bad", error: "bad", starting: "neutral",
  };

  function stateLabel(state) {
    return state in STATE_TONES ? [t(`state.${state}`), STATE_TONES[state]] : [state, "neutral"];
  }

  function renderToken(token) {
    const [label, tone] = stateLabel(token.state);
    const state = $("token-state");
    state.textContent = label;
    state.className = `badge ${tone}`;
    state.dataset.state = token.state;
    setText("token-state-text", token.state in STATE_TONES ? t(`stateText.${token.state}`) : token.state_text);
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
    if (pin.locked) flags.push(badge(t("pin.locked"), "bad"));
    if (pin.final_try) flags.push(badge(t("pin.finalTry"), "bad"));
    if (pin.count_low) flags.push(badge(t("pin.countLow"), "warn"));
    if (pin.to_be_changed) flags.push(badge(t("pin.toBeChanged"), "warn"));
    if (token.protected_authentication_path) flags.push(badge(t("pin.pinPad"), "neutral"));
    const pinCell = $("token-pin");
    if (flags.length) pinCell.replaceChildren(...flags);
    else pinCell.replaceChildren(badge(t("pin.ok"), "ok"));
  }

  // Several cards (a group of organisations, or renewal day): one row each. Hidden with a single token.
  function renderTokens(tokens) {
    const several = tokens.length > 1;
    $("tokens-section").hidden = !several;
    if (!several) return;
    const rows = tokens.map((tk) => {
      const [label, tone] = stateLabel(tk.state);
      const role = tk.retiring ? badge(t("role.retiring"), "neutral")
        : tk.required ? badge(t("role.inService"), "ok") : badge(t("role.notRequired"), "neutral");
      return h("tr", { dataset: { token: tk.name, state: tk.state } },
        h("th", { scope: "row" }, tk.name),
        h("td", {}, badge(label, tone), tk.message ? h("span", { class: "small" }, tk.message) : null),
        h("td", {}, tk.label || "—", h("span", { class: "small" }, tk.serial || "")),
        h("td", {}, role),
        h("td", { class: "num" }, tk.queue_depth));
    });
    fillTable("tokens", rows, t("tokens.empty"), 5);
  }

  function renderQueue(queue) {
    setText("queue-depth", String(queue.depth));
    setText("queue-service-time", t("ms", decimal.format(queue.service_time_ms)));
    const rows = queue.by_client.map((q) =>
      h("tr", { dataset: { actor: q.actor } }, h("th", { scope: "row" }, actorCell(q.who)),
        h("td", { class: "num" }, q.depth)));
    fillTable("queue", rows, t("queue.empty"), 2);
  }

  let severalTokens = false; // set by render(): certificates then show which token they are on

  const daysText = (days) => t("days", days);

  // The certificate's standing in words, with its dates: the same rule as /metrics and `tokenbridge doctor`.
  function validityText(c) {
    const end = day(c.not_after);
    if (c.status === "expired") return t("validity.expired", c.label, end);
    if (c.status === "not_yet_valid") return t("validity.notYetValid", c.label, day(c.not_before));
    return t("validity.expiring", c.label, end, daysText(c.days_left));
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
    if (c.status === "expired") return badge(t("days.expired", day(c.not_after)), "bad");
    if (c.status === "not_yet_valid") return badge(t("days.notYetValid", day(c.not_before)), "bad");
    if (c.status === "expiring") {
      return [badge(t("days.expiring", daysText(c.days_left)), "warn"),
        h("span", { class: "small" }, t("days.window", c.warning_days))];
    }
    return String(c.days_left);
  }

  // The API's usage words in English; their RFC 5280 names give the French ones.
  function usageWords(codes, words) {
    const table = t("usageWords") || {};
    if (!codes || codes.length !== words.length) return words;
    return codes.map((code, i) => table[code] || words[i]);
  }

  function renderCertificates(certificates) {
    renderCertificateWarnings(certificates);
    const rows = certificates.map((c) => {
      const type = `${c.key_type.toUpperCase()} ${c.key_size}`;
      const name = severalTokens ? `${c.token}/${c.label}` : c.label;
      const retiring = c.key_state && c.key_state !== "active"
        ? badge(c.key_state === "retiring" ? t("role.retiring") : t("role.retired"), "neutral") : null;
      const usages = c.usage_codes && !c.usage_codes.length ? [t("usage.any")] : usageWords(c.usage_codes, c.usages);
      return h("tr", { dataset: { key: c.label, token: c.token, status: c.status, keyState: c.key_state },
        class: c.warning ? "warning" : null },
        h("th", { scope: "row" }, h("span", { class: "strong" }, name), h("span", { class: "small" }, type),
          retiring),
        h("td", {},
          h("span", { class: "strong" }, c.common_name || c.subject),
          h("span", { class: "small", title: c.issuer ? t("certs.issuedBy", c.issuer) : null }, c.subject)),
        h("td", { class: "usages" }, chips(usages, "usage"),
          c.extended_usages.length ? chips(usageWords(c.extended_usage_codes, c.extended_usages), "eku") : null),
        h("td", { title: c.not_after, class: "expires" }, day(c.not_after)),
        h("td", { class: "num days-left" }, daysCell(c)));
    });
    fillTable("certificates", rows, t("certs.empty"), 5);
  }

  function renderClients(clients) {
    const rows = clients.map((c) => {
      const status = c.revoked ? badge(t("clients.revoked", day(c.revoked)), "bad") : badge(t("clients.active"), "ok");
      const seen = c.last_seen
        ? h("span", { title: c.last_seen }, when(c.last_seen), h("span", { class: "small" }, ago(c.last_seen)))
        : h("span", { class: "muted" }, t("clients.never"));
      return h("tr", { dataset: { client: c.name }, class: c.revoked ? "revoked" : null },
        h("th", { scope: "row" }, c.name),
        h("td", {}, kindText(c.kind), c.cert_sha256
          ? h("span", { class: "small", title: t("clients.certificateTitle", c.cert_sha256) },
            t("clients.certificate", c.cert_sha256.slice(0, 16)))
          : null,
        c.cert_not_after ? h("span", { class: "small" }, t("clients.certExpires", day(c.cert_not_after))) : null),
        h("td", {}, chips(c.grants || [], "grant"),
          c.keys && c.keys.length ? h("span", { class: "small" }, t("clients.keys", c.keys.join(", "))) : null),
        h("td", {}, seen),
        h("td", { class: "num ops-today" }, c.operations_today),
        h("td", {}, status));
    });
    fillTable("clients", rows, t("clients.empty"), 6);
  }

  // Audit outcomes that mean success (a decryption is "done", a verified signature "valid", a reply
  // "delivered"): green. Anything else is a problem code or a failure.
  const SUCCESS_OUTCOMES = new Set(["ok", "ready", "done", "valid", "delivered"]);

  // Success green; any other outcome is a refusal or an error: red.
  function outcomeBadge(code) {
    const node = badge(outcomeText(code), SUCCESS_OUTCOMES.has(code) ? "ok" : "bad");
    node.dataset.outcome = code;
    if (outcomeText(code) !== code) node.title = code;
    return node;
  }

  function auditRow(e, fresh) {
    const key = e.key_label || e.key || "";
    return h("tr", { dataset: { seq: e.seq, actor: e.actor, event: e.event, outcome: e.outcome },
      class: fresh ? "fresh" : null },
    h("td", { class: "num muted" }, e.seq),
    h("td", { title: e.ts, class: "nowrap" }, when(e.ts)),
    h("td", {}, actorCell(e.who)),
    h("td", { class: "event" }, e.event),
    h("td", {}, key, e.algorithm ? h("span", { class: "small" }, e.algorithm) : null),
    h("td", { class: "outcome" }, outcomeBadge(e.outcome)),
    h("td", { class: "detail" }, e.detail || ""));
  }

  function renderAudit(entries) {
    const first = seenAudit === null;
    const seen = new Set(entries.map((e) => e.seq));
    const rows = entries.map((e) => auditRow(e, !first && !seenAudit.has(e.seq)));
    seenAudit = seen;
    fillTable("audit", rows, t("audit.empty"), 7);
  }

  // ------------------------------------------------------------------ refusals and errors

  let problemsShown = null; // what the list shows, to redraw it only on a change (the filter keeps its focus)

  function renderProblems(problems) {
    if (!problems) return;
    const today = problems.today || 0;
    setText("problems-today", t("problems.today", today));
    const tally = $("problems-today-tally");
    tally.classList.toggle("bad", today > 0);
    tally.dataset.count = String(today);
    const codes = $("problems-by-code");
    if (problems.by_outcome.length) {
      codes.replaceChildren(h("span", { class: "small" }, t("problems.byCode")),
        h("ul", { class: "chips" }, problems.by_outcome.map((o) =>
          h("li", { class: "code", dataset: { outcome: o.outcome } },
            h("button", { type: "button", class: "link", dataset: { code: o.outcome }, title: o.outcome },
              `${outcomeText(o.outcome)} × ${o.count}`)))));
    } else {
      codes.replaceChildren(h("span", { class: "small" }, t("problems.noneToday")));
    }
    // The code filter offers every code in the list and today's.
    const select = $("problems-code");
    const known = new Set([...problems.recent.map((e) => e.outcome), ...problems.by_outcome.map((o) => o.outcome)]);
    if (problemCode) known.add(problemCode);
    const options = [...known].sort();
    const wanted = JSON.stringify([lang, options]);
    if (select.dataset.options !== wanted) {
      select.replaceChildren(h("option", { value: "" }, t("problems.everyCode")),
        ...options.map((code) => h("option", { value: code },
          outcomeText(code) === code ? code : `${outcomeText(code)} (${code})`)));
      select.dataset.options = wanted;
    }
    select.value = problemCode;
    const who = problemWho.trim().toLowerCase();
    const shown = problems.recent.filter((e) => (!problemCode || e.outcome === problemCode) &&
      (!who || e.actor.toLowerCase().includes(who)));
    setText("problems-caption", t("problems.caption", problems.limit));
    setText("problems-shown", problemCode || who ? t("problems.shown", shown.length, problems.recent.length) : "");
    const key = JSON.stringify([lang, shown.map((e) => e.seq), problemCode, who, Math.floor(Date.now() / 30000)]);
    if (key === problemsShown) return;
    problemsShown = key;
    fillTable("problems-list", shown.map((e) => auditRow(e, false)),
      problems.recent.length ? t("problems.emptyFiltered") : t("problems.empty"), 7);
  }

  // ------------------------------------------------------------------ TLS certificates

  function validityBadge(v) {
    if (v.status === "unknown") return badge(t("tls.unknown"), "neutral");
    if (v.status === "expired") return badge(t("days.expired", day(v.not_after)), "bad");
    if (v.status === "not_yet_valid") return badge(t("days.notYetValid", day(v.not_before)), "bad");
    if (v.status === "expiring") return badge(t("days.expiring", daysText(v.days_left)), "warn");
    return badge(daysText(v.days_left), "ok");
  }

  function renderTls(tls) {
    if (!tls) return;
    const server = tls.server || {};
    const cell = $("tls-server");
    const lines = { warning: [], failing: [] };
    if (server.error) {
      cell.replaceChildren(h("span", { class: "error-text" }, t("tls.serverError", server.error)));
    } else if (!server.not_after) {
      cell.replaceChildren(h("span", { class: "muted" }, t("tls.serverNone")));
    } else {
      const sentence = t("tls.serverLine", server.status, day(server.status === "not_yet_valid"
        ? server.not_before : server.not_after), daysText(server.days_left));
      cell.replaceChildren(
        h("span", { class: "line", dataset: { status: server.status } }, validityBadge(server), " ", sentence),
        h("span", { class: "small" }, [server.common_name || server.subject,
          server.names && server.names.length ? t("tls.names", server.names.join(", ")) : null,
          server.serving ? t("tls.serving") : t("tls.notServing")].filter(Boolean).join(" · ")),
        h("span", { class: "small" }, server.path || ""));
      cell.dataset.status = server.status;
      if (server.warning) (server.status === "expiring" ? lines.warning : lines.failing).push(sentence);
    }
    const rows = (tls.workstations || []).map((w) => {
      if (w.warning) {
        (w.status === "expiring" ? lines.warning : lines.failing).push(
          t("tls.wsLine", w.name, day(w.not_after), daysText(w.days_left), w.status !== "expiring"));
      }
      const notes = [w.status === "unknown" ? t("tls.unknownNote") : null, w.renewed ? t("tls.renewed") : null];
      return h("tr", { dataset: { workstation: w.name, status: w.status }, class: w.revoked ? "revoked" : null },
        h("th", { scope: "row" }, w.name, w.revoked ? badge(t("tls.revoked"), "neutral") : null),
        h("td", { class: "expires", title: w.not_after || "" }, w.not_after ? day(w.not_after) : t("tls.unknown"),
          notes.filter(Boolean).map((n) => h("span", { class: "small" }, n))),
        h("td", { class: "num days-left" }, validityBadge(w)));
    });
    fillTable("tls-workstations", rows, t("tls.wsEmpty"), 3);
    for (const [id, list] of [["tls-warning", lines.warning], ["tls-failing", lines.failing]]) {
      const banner = $(id);
      banner.replaceChildren(...list.map((text) => h("span", { class: "line" }, text)));
      banner.hidden = !list.length;
    }
  }

  // ------------------------------------------------------------------ several hubs on one database

  // A heartbeat's age in words ("il y a 12 s", "5 min ago"), from the seconds the registry gives.
  function ageText(seconds) {
    const s = Math.max(0, Number(seconds) || 0);
    if (s < 1) return t("justNow");
    if (s < 90) return relative.format(-Math.round(s), "second");
    if (s < 5400) return relative.format(-Math.round(s / 60), "minute");
    if (s < 86400 * 2) return relative.format(-Math.round(s / 3600), "hour");
    return relative.format(-Math.round(s / 86400), "day");
  }

  // Shown only when the hub shares its database with others (the overview's hubs.shared): each hub, alive
  // (green) or down (red, and named in the banner: its keys answer 503 hub_down), its address and keys.
  function renderHubs(view) {
    const shared = Boolean(view && view.shared);
    $("hubs").hidden = !shared;
    if (!shared) return;
    const error = $("hubs-error");
    error.textContent = view.error ? t("hubs.error", view.error) : "";
    error.hidden = !view.error;
    setText("hubs-caption", t("hubs.caption", figure.format(view.heartbeat_interval),
      figure.format(view.down_after)));
    const hubs = view.hubs || [];
    const down = hubs.filter((hub) => !hub.alive);
    const banner = $("hubs-down");
    banner.replaceChildren(...down.map((hub) => h("span", { class: "line", dataset: { hub: hub.name } },
      t("hubs.downLine", hub.name, ageText(hub.heartbeat_age), hub.self))));
    banner.hidden = !down.length;
    const rows = hubs.map((hub) => {
      const keys = (hub.keys || []).map((k) => `${k.token}/${k.label}`).sort();
      return h("tr", { dataset: { hub: hub.name, alive: hub.alive ? "yes" : "no", self: hub.self ? "yes" : "no" },
        class: hub.alive ? null : "down" },
      h("th", { scope: "row" }, hub.name, hub.self ? badge(t("hubs.this"), "neutral") : null),
      h("td", { class: "state" }, badge(hub.alive ? t("hubs.alive") : t("hubs.down"), hub.alive ? "ok" : "bad"),
        h("span", { class: "small", title: t("hubs.ageTitle", decimal.format(hub.heartbeat_age)) },
          t("hubs.heartbeat", ageText(hub.heartbeat_age)))),
      h("td", { class: "url" }, hub.url),
      h("td", { class: "keys" }, t("hubs.keyCount", keys.length), keys.length ? chips(keys, "key") : null));
    });
    fillTable("hubs-list", rows, t("hubs.empty"), 4);
  }

  // ------------------------------------------------------------------ smarthost and upstreams

  function renderSmtp(mail) {
    const box = $("smtp");
    const smtp = mail && mail.smarthost;
    if (!smtp || !smtp.host) {
      box.replaceChildren(h("p", { class: "muted", dataset: { state: "none" } }, t("smtp.none")));
      return;
    }
    const lines = [h("p", { class: "strong" }, t("smtp.host", smtp.host, smtp.port, smtp.security))];
    let state = "unused";
    if (smtp.last) {
      const ok = smtp.last.event === "mail-sent";
      state = ok ? "sent" : "bounced";
      lines.push(h("p", { title: smtp.last.ts }, badge(outcomeText(smtp.last.outcome), ok ? "ok" : "bad"), " ",
        ok ? t("smtp.sent", when(smtp.last.ts)) : t("smtp.bounced", when(smtp.last.ts)),
        h("span", { class: "small" }, ago(smtp.last.ts)),
        smtp.last.detail ? h("span", { class: "small detail" }, smtp.last.detail) : null));
    } else {
      lines.push(h("p", { class: "muted" }, t("smtp.notUsed")));
    }
    if (smtp.waiting) {
      state = "waiting";
      lines.push(h("p", {}, badge(t("smtp.waiting", smtp.waiting.count, smtp.waiting.attempts), "warn"),
        smtp.waiting.last_error ? h("span", { class: "small error-text" }, t("smtp.lastError", smtp.waiting.last_error))
          : null,
        smtp.waiting.next_attempt ? h("span", { class: "small" }, t("smtp.nextAttempt", when(smtp.waiting.next_attempt)))
          : null));
    }
    box.dataset.state = state;
    box.replaceChildren(...lines);
  }

  function renderUpstreams(upstreams) {
    const list = upstreams || [];
    $("upstreams-none").hidden = list.length > 0;
    $("upstreams").hidden = !list.length;
    const unavailable = list.find((u) => u.unavailable);
    const banner = $("upstreams-unavailable");
    banner.textContent = unavailable ? t("upstreams.unavailable", unavailable.unavailable) : "";
    banner.hidden = !unavailable;
    const rows = list.map((u) => {
      let handshake;
      if (u.config_error) {
        handshake = h("span", { class: "error-text" }, t("upstreams.misconfigured", u.config_error));
      } else if (!u.used) {
        handshake = badge(t("upstreams.notUsed"), "neutral");
      } else {
        const last = u.last_handshake;
        handshake = [last
          ? h("span", {}, badge(outcomeText("ok"), "ok"), " ",
            t("upstreams.handshake", last.version, last.cipher, decimal.format(last.seconds)),
            h("span", { class: "small" }, last.resumed ? t("upstreams.resumed") : t("upstreams.signed",
              last.signature_algorithm)))
          : h("span", { class: "muted" }, t("upstreams.noHandshake")),
        u.last_signed ? h("span", { class: "small", title: u.last_signed.ts },
          t("upstreams.lastSigned", when(u.last_signed.ts), outcomeText(u.last_signed.outcome))) : null];
      }
      const errors = (u.errors || []).length
        ? h("ul", { class: "chips" }, u.errors.map((e) => h("li", { class: "code bad", title: e.code },
          `${outcomeText(e.code)} × ${e.count}`)))
        : h("span", { class: "muted" }, t("upstreams.noErrors"));
      return h("tr", { dataset: { upstream: u.name, used: u.used ? "yes" : "no" } },
        h("th", { scope: "row" }, u.name, h("span", { class: "small" }, u.url),
          h("span", { class: "small" }, u.key)),
        h("td", { class: "handshake" }, handshake),
        h("td", { class: "traffic" }, u.requests === undefined ? "—"
          : t("upstreams.counts", u.requests, u.connections, u.resumed, u.token_signatures)),
        h("td", { class: "errors" }, errors));
    });
    fillTable("upstreams", rows, t("upstreams.none"), 4);
  }

  function render(data) {
    lastData = data;
    severalTokens = (data.tokens || []).length > 1;
    renderToken(data.token);
    renderTokens(data.tokens || []);
    renderHubs(data.hubs);
    renderQueue(data.queue);
    renderCertificates(data.certificates);
    renderClients(data.clients);
    renderAudit(data.audit);
    renderProblems(data.problems);
    renderTls(data.tls);
    renderUpstreams(data.upstreams);
    mailOverview = data.mail || null;
    renderSmtp(mailOverview);
    renderMailSummary(mailOverview);
    setText("version", `tokenbridge ${data.version}`);
    setText("updated", t("updated.at", timeOnly.format(new Date())));
    $("connection").hidden = true;
  }

  // ------------------------------------------------------------------ mail gateway

  // Success is never red: answered green, sent and waiting neutral, overdue amber, failed red.
  const OUT_STATES = {
    received: "neutral", queued: "neutral", sent: "neutral", answered: "ok", overdue: "warn", failed: "bad",
  };
  const REPLY_STATES = { received: "neutral", delivered: "ok", quarantined: "bad" };
  const WAITING = new Set(["received", "queued"]);
  const RETRYABLE = new Set(["received", "queued", "failed"]);

  function mailBadge(states, state, kind) {
    const words = t(`mail.${states === OUT_STATES ? "out" : "in"}.${state}`);
    let [label, note] = Array.isArray(words) ? words : [state, ""];
    let tone = states[state] || "neutral";
    if (kind === "report" && state === "sent") [tone, note] = ["ok", t("mail.reportDelivered")];
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
      return [t("mail.off.gone.1"), h("code", {}, "[mail]"), t("mail.off.gone.2"), doc, "."];
    }
    if (!mail.configured) {
      return [t("mail.off.none.1"), h("code", {}, "[mail]"), t("mail.off.none.2"), doc, "."];
    }
    if (!mail.store) return [t("mail.off.notStarted"), doc, "."];
    const port = mail.listeners && mail.listeners.submission;
    return [t("mail.off.idle", port), doc, "."];
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
    if (counts.overdue) parts.push(t("mail.alert.overdue", counts.overdue));
    if (counts.quarantined) parts.push(t("mail.alert.quarantined", counts.quarantined));
    if (counts.failed) parts.push(t("mail.alert.failed", counts.failed));
    alert.replaceChildren(t("mail.alert", parts), h("a", { href: "#mail-title" }, t("mail.alert.link")));
    alert.hidden = !parts.length;
  }

  function deliveryCell(m) {
    const lines = [];
    if (WAITING.has(m.state)) {
      lines.push(h("span", {}, m.attempts ? t("mail.attempts", m.attempts) : t("mail.firstAttempt")));
      if (m.last_error) lines.push(h("span", { class: "small error-text" }, t("mail.lastError", m.last_error)));
      if (m.next_attempt) lines.push(h("span", { class: "small" }, t("mail.nextAttempt", when(m.next_attempt))));
    } else if (m.sent) {
      lines.push(h("span", { title: m.sent }, t("mail.sentAt", when(m.sent))));
    }
    if (m.failed && m.failed.length) {
      lines.push(h("ul", { class: "reasons" }, m.failed.map((f) =>
        h("li", { dataset: { recipient: f.recipient } }, h("span", { class: "strong" }, f.recipient),
          `${f.status ? `${f.status}: ` : ""}${f.diagnostic || t("mail.refused")}`))));
    }
    if (m.reply_due && (m.state === "sent" || m.state === "overdue")) {
      lines.push(h("span", { class: "small", title: m.reply_due }, t("mail.replyDue", when(m.reply_due))));
    }
    return h("td", { class: "delivery" }, lines);
  }

  function actionCell(m) {
    const note = retryNotes.get(m.id);
    const button = RETRYABLE.has(m.state)
      ? h("button", { type: "button", class: "row-action", dataset: { retry: m.id },
        title: m.state === "failed" ? t("mail.retry.failedTitle") : t("mail.retry.waitingTitle") }, t("mail.retry"))
      : null;
    return h("td", { class: "action" }, button,
      note ? h("span", { class: `small note ${note.tone}`, role: "status" },
        note.tone === "ok" ? t("mail.retry.noteOk") : t("mail.retry.noteBad")) : null);
  }

  function messageRow(m) {
    const report = m.kind === "report";
    const subject = report ? t("mail.report") : (m.subject || t("mail.noSubject"));
    const names = (m.attachments || []).map((a) =>
      h("li", { title: t("mail.attachment", a.size, a.sha256 || "?") }, a.filename || t("mail.unnamed")));
    const recipients = (m.recipients || []).join(", ");
    const number = m.registration_number
      ? h("span", { class: "strong number" }, m.registration_number)
      : h("span", { class: "muted" }, "—");
    return h("tr", { dataset: { id: m.id, state: m.state, messageId: m.message_id, kind: m.kind },
      class: m.state === "failed" ? "failed" : null },
    h("td", { class: "num muted" }, m.id),
    h("td", { class: "state" }, mailBadge(OUT_STATES, m.state, m.kind)),
    timeCell(m.received),
    h("td", { class: "route" }, h("span", {}, m.from || t("mail.gateway")), h("span", { class: "small" },
      `→ ${recipients}`), m.submitter ? h("span", { class: "small" }, t("mail.submittedBy", m.submitter)) : null),
    h("td", { class: "subject" }, h("span", { class: "strong" }, subject),
      names.length ? h("ul", { class: "chips" }, names) : null,
      report ? h("span", { class: "small" }, t("mail.reportNote")) : null),
    h("td", { class: "registration" }, number, m.answered
      ? h("span", { class: "small", title: m.answered }, t("mail.replyRef", m.reply_id, when(m.answered))) : null),
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
      answers = [h("span", { class: "strong" }, t("mail.application", r.outbound_id)),
        subject ? h("span", { class: "small" }, subject) : null];
    } else {
      answers = h("span", { class: "muted" }, t("mail.notMatched"));
    }
    let verdict;
    if (r.state === "quarantined") {
      verdict = [h("span", { class: "reason" }, t("mail.why", r.reason || t("mail.noReason"))),
        h("span", { class: "small" }, t("mail.kept"))];
    } else {
      const signerShown = r.signer && !(r.verification || "").includes(r.signer);
      verdict = [r.verification ? h("span", {}, r.verification) : null,
        signerShown ? h("span", { class: "small" }, t("mail.signedBy", r.signer)) : null,
        r.state === "received" && r.reason ? h("span", { class: "small error-text" }, t("mail.lastError", r.reason))
          : null];
    }
    return h("tr", { dataset: { id: r.id, state: r.state, messageId: r.message_id || "" },
      class: r.state === "quarantined" ? "failed" : null },
    h("td", { class: "num muted" }, r.id),
    h("td", { class: "state" }, mailBadge(REPLY_STATES, r.state)),
    timeCell(r.received),
    addressCell(r.from),
    h("td", { class: "subject" }, r.subject || t("mail.noSubject")),
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
    lastMail = [mail, messages, replies];
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
    const shown = JSON.stringify([lang, messages, replies, [...retryNotes], mailFilter, Math.floor(now / 30000)]);
    if (shown === mailShown) return;
    mailShown = shown;
    const stateWord = mailFilter ? (t(`mail.out.${mailFilter}`) || [mailFilter])[0] : "";
    setText("mail-messages-caption", t("mail.caption", stateWord, messages.length >= MAIL_LIMIT ? MAIL_LIMIT : 0));
    fillTable("mail-messages", messages.map(messageRow),
      mailFilter ? t("mail.emptyFiltered", stateWord) : t("mail.empty"), 8);
    const subjects = new Map(messages.map((m) => [m.id, m.subject]));
    fillTable("mail-replies", replies.map((r) => replyRow(r, subjects)), t("mail.noReply"), 8);
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
      error.textContent = t("mail.listsError", explain(err));
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
        ? t("mail.retry.accepted", id, timeOnly.format(new Date()))
        : t("mail.retry.answered", id, JSON.stringify(answer));
    } catch (err) {
      tone = "bad";
      text = err.status === 409 || err.status === 404
        ? t("mail.retry.refused", id, err.message)
        : t("mail.retry.failed", id, explain(err));
    }
    if (run !== generation) return;
    button.disabled = false;
    retryNotes.set(id, { tone, until: Date.now() + NOTE_MS });
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
        headers: { Authorization: `Bearer ${secret}`, Accept: "application/json", "Accept-Language": lang },
        cache: "no-store",
        credentials: "omit",
      });
    } catch (err) {
      throw new ApiError(0, { detail: t("err.unreachable") });
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
    if (err.status === 401) return t("err.401");
    if (err.status === 403) return t("err.403");
    if (err.status === 0) return t("err.0");
    return t("err.other", err.status, err.message);
  }

  // ------------------------------------------------------------------ session

  function showLogin(message) {
    clearTimeout(timer);
    generation += 1;
    seenAudit = null;
    mailOverview = null;
    mailShown = null;
    lastData = null;
    lastMail = null;
    problemsShown = null;
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
        showLogin(t("login.signedOut", explain(err)));
        return;
      }
      const banner = $("connection");
      banner.textContent = t("connection.lost", explain(err), timeOnly.format(new Date()), REFRESH_MS / 1000);
      banner.hidden = false;
    }
    if (run === generation) timer = setTimeout(() => refresh(run), REFRESH_MS);
  }

  async function signIn(event) {
    event.preventDefault();
    const secret = $("secret").value.trim();
    const error = $("login-error");
    if (!secret) {
      error.textContent = t("login.empty");
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

  // ------------------------------------------------------------------ language switch

  // The static texts of index.html (data-i18n and its attribute forms), <html lang> and the switch's state.
  function applyStatic() {
    document.documentElement.lang = lang;
    for (const node of document.querySelectorAll("[data-i18n]")) node.textContent = t(node.dataset.i18n);
    for (const [attr, data] of [["title", "i18nTitle"], ["aria-label", "i18nAriaLabel"],
      ["placeholder", "i18nPlaceholder"]]) {
      for (const node of document.querySelectorAll(`[data-${attr === "aria-label" ? "i18n-aria-label"
        : `i18n-${attr}`}]`)) node.setAttribute(attr, t(node.dataset[data]));
    }
    document.title = t("page.title");
    for (const button of document.querySelectorAll("#lang button[data-lang]")) {
      button.setAttribute("aria-pressed", String(button.dataset.lang === lang));
    }
  }

  function setLang(next) {
    if (!LANGS.includes(next)) return;
    try { localStorage.setItem(LANG_KEY, next); } catch (err) { /* private mode: this page only */ }
    if (next === lang) return;
    lang = next;
    dict = STRINGS[lang];
    makeFormats();
    const error = $("login-error");
    const hadError = !error.hidden;
    applyStatic();
    if (hadError) error.hidden = false;
    mailShown = null;
    problemsShown = null;
    if (lastData) {
      const seen = seenAudit;
      render(lastData);
      seenAudit = seen;
    }
    if (lastMail && lastMail[1]) renderMail(...lastMail);
    else if (lastData) renderMail(mailOverview, null, null);
  }

  document.addEventListener("DOMContentLoaded", () => {
    applyStatic();
    $("lang").addEventListener("click", (event) => {
      const button = event.target.closest("button[data-lang]");
      if (button) setLang(button.dataset.lang);
    });
    $("problems-code").addEventListener("change", (event) => {
      problemCode = event.target.value;
      if (lastData) renderProblems(lastData.problems);
    });
    $("problems-who").addEventListener("input", (event) => {
      problemWho = event.target.value;
      if (lastData) renderProblems(lastData.problems);
    });
    $("problems-by-code").addEventListener("click", (event) => {
      const button = event.target.closest("button[data-code]");
      if (!button) return;
      problemCode = problemCode === button.dataset.code ? "" : button.dataset.code;
      if (lastData) renderProblems(lastData.problems);
    });
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
