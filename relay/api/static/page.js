// relay status page: /v1/status every 5 s, /v1/events live; the token in this tab only.
"use strict";

(() => {
  const KEY = "relay.token";
  const REFRESH = 5000; // ms between two /v1/status
  const FEED_SIZE = 50; // events kept in the live feed
  const BACKOFF = [1000, 10000]; // the stream's reconnection delay, doubling from the first
  const SERIES = [["delivered", "Delivered"], ["deferred", "Deferred"], ["bounced", "Bounced"]];
  const SVG = "http://www.w3.org/2000/svg";

  const $ = (id) => document.getElementById(id);
  let timer = null; // the next /v1/status
  let stream = null; // the live feed's AbortController
  let lastId = null; // the last event id the feed saw (Last-Event-ID on reconnection)
  let shown = null; // the last /v1/status answer (the chart is drawn again on a resize)
  let generation = 0; // bumped at each sign-in and sign-out: an older refresh stops there

  // --- small helpers ---------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    return node;
  }

  const number = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"));

  function age(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    const s = Math.floor(seconds);
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
    if (s < 172800) return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
    return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
  }

  const since = (iso) => (iso ? age((Date.now() - Date.parse(iso)) / 1000) + " ago" : "–");
  const clock = (iso) => new Date(iso).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
  const hhmm = (iso) => new Date(iso).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", hour12: false });
  const tag = (word, extra) => el("span", { class: `tag ${word}${extra ? " " + extra : ""}` }, word.replace("_", " "));
  const empty = (text) => el("p", { class: "empty" }, text);

  function table(head, rows) {
    return el("table", {},
      el("thead", {}, el("tr", {}, head.map(([text, cls]) => el("th", { class: cls }, text)))),
      el("tbody", {}, rows));
  }

  function fill(id, ...nodes) {
    $(id).replaceChildren(...nodes);
  }

  // --- the token -------------------------------------------------------------------------

  const token = () => sessionStorage.getItem(KEY);

  function takeTokenFromAddress() {
    const url = new URL(window.location.href);
    const given = url.searchParams.get("token");
    if (given === null) return;
    if (given.trim()) sessionStorage.setItem(KEY, given.trim());
    url.searchParams.delete("token");
    window.history.replaceState(null, "", url.pathname + url.search + url.hash);
  }

  class SignIn extends Error {} // the token is refused: ask for another

  async function api(path) {
    const answer = await fetch(path, { headers: { Authorization: `Bearer ${token()}` }, cache: "no-store" });
    if (answer.status === 401 || answer.status === 403) {
      const body = await answer.json().catch(() => ({}));
      throw new SignIn(body.detail || `${answer.status} ${answer.statusText}`);
    }
    if (!answer.ok) {
      const body = await answer.json().catch(() => ({}));
      throw new Error(body.detail || `${answer.status} ${answer.statusText}`);
    }
    return answer.json();
  }

  function signIn(message) {
    stop();
    sessionStorage.removeItem(KEY);
    $("dashboard").hidden = true;
    for (const id of ["scheduler", "updated", "signout"]) $(id).hidden = true;
    $("login").hidden = false;
    $("login-error").hidden = !message;
    $("login-error").textContent = message || "";
    $("token").value = "";
    $("token").focus();
  }

  function stop() {
    generation += 1;
    clearTimeout(timer);
    timer = null;
    if (stream) stream.abort();
    stream = null;
  }

  function start() {
    stop();
    $("login").hidden = true;
    $("dashboard").hidden = false;
    $("signout").hidden = false;
    lastId = null;
    fill("feed", el("li", { class: "note waiting" }, "Waiting for events: each one shows here as it happens."));
    refresh(generation);
    follow();
  }

  // --- /v1/status ------------------------------------------------------------------------

  async function refresh(mine) {
    try {
      const status = await api("/v1/status");
      if (mine !== generation) return;
      shown = status;
      render(status);
      $("problem").hidden = true;
    } catch (error) {
      if (mine !== generation) return;
      if (error instanceof SignIn) return signIn(error.message);
      $("problem").hidden = false;
      $("problem").textContent = `The relay is not answering (${error.message}); trying again every 5 s. The figures below are from the last answer.`;
    }
    timer = setTimeout(() => refresh(mine), REFRESH);
  }

  function render(status) {
    renderHealth(status);
    renderChart(status.chart);
    renderQueue(status.queue, status.scheduler);
    renderDestinations(status.destinations, status.scheduler);
    renderWebhooks(status.webhooks);
    renderDead(status.dead_letters);
  }

  function renderHealth(status) {
    const pill = $("scheduler");
    const says = {
      running: ["ok", "Scheduler running"],
      starting: ["warn", "Scheduler starting (scanning the queue)"],
      unreachable: ["bad", "Scheduler unreachable"],
    }[status.scheduler] || ["warn", status.scheduler];
    pill.className = `pill ${says[0]}`;
    pill.textContent = says[1];
    pill.hidden = false;
    $("updated").hidden = false;
    $("updated").textContent = `Updated ${clock(status.generated_at)}`;

    const queue = status.queue;
    $("t-queued").textContent = number(queue.total);
    const waiting = Object.entries(queue.by_status).slice(0, 2).map(([k, v]) => `${number(v)} ${k}`);
    $("t-queued-note").textContent = waiting.join(" · ") || "empty";
    $("t-oldest").textContent = queue.oldest_age_seconds === null ? "–" : age(queue.oldest_age_seconds);
    $("t-oldest-note").textContent = queue.oldest_waiting_since ? `waiting since ${clock(queue.oldest_waiting_since)}`
      : queue.total ? "none due yet (scheduled ahead)" : "nothing waits";
    const sums = Object.fromEntries(SERIES.map(([k]) => [k, status.chart.reduce((n, m) => n + m[k], 0)]));
    const outcomes = sums.delivered + sums.bounced;
    for (const [k] of SERIES) $(`t-${k}`).textContent = number(sums[k]);
    const share = (n, digits) => (outcomes ? `${((100 * n) / outcomes).toFixed(digits)}% · ` : "");
    $("t-delivered-note").textContent = `${share(sums.delivered, 0)}last hour`;
    $("t-deferred-note").textContent = "retries · last hour";
    $("t-bounced-note").textContent = `${share(sums.bounced, 1)}last hour`;
    const dead = status.dead_letters;
    $("t-dead").textContent = number(dead.count);
    $("t-dead").parentElement.classList.toggle("alert", dead.count > 0);
    $("t-dead-note").textContent = dead.latest.length ? `latest ${since(dead.latest[0].dead_lettered_at)}` : "none";
  }

  function renderQueue(queue, scheduler) {
    $("queue-source").textContent = queue.source === "history" && scheduler !== "running"
      ? "why each waits: from the history" : "";
    if (!queue.total) return fill("queue", empty("The queue is empty."));
    const lanes = ["high", "normal", "low"]
      .concat(Object.keys(queue.by_lane).filter((lane) => !["high", "normal", "low"].includes(lane)));
    const bar = el("div", { class: "stack", title: "by status" },
      Object.entries(queue.by_status).map(([status, n]) =>
        el("span", { class: `swatch-${status}`, title: `${status}: ${n}`, "data-share": n / queue.total })));
    const rows = Object.entries(queue.by_status).map(([status, n]) => el("tr", {},
      el("td", {}, tag(status)),
      lanes.map((lane) => {
        const count = (queue.by_lane[lane] || {})[status] || 0;
        return el("td", { class: count ? "num" : "num zero" }, number(count));
      }),
      el("td", { class: "num" }, el("b", {}, number(n)))));
    rows.push(el("tr", { class: "total" }, el("td", {}, "Total"),
      lanes.map((lane) => el("td", { class: "num" }, number(Object.values(queue.by_lane[lane] || {}).reduce((a, b) => a + b, 0)))),
      el("td", { class: "num" }, number(queue.total))));
    const head = [["Status"], ...lanes.map((lane) => [lane, "num"]), ["All", "num"]];
    const top = queue.domains.length
      ? el("p", { class: "domains" }, "Most queued: ",
        queue.domains.slice(0, 5).flatMap((d, i) => [i ? ", " : "", el("b", {}, d.domain), ` ${number(d.total)}`]))
      : null;
    fill("queue", bar, table(head, rows), top);
    for (const span of $("queue").querySelectorAll(".stack span")) {
      span.style.width = `${(100 * Number(span.dataset.share)).toFixed(2)}%`; // CSSOM: allowed by the CSP
    }
  }

  // A row, and beneath it a muted line across the table (a last reply, a last error).
  function withNote(row, note, columns) {
    if (!note) return [row];
    row.classList.add("has-note");
    return [row, el("tr", { class: "note-row" }, el("td", { colspan: columns, class: "reply", title: note }, note))];
  }

  function renderDestinations(rows, scheduler) {
    if (scheduler === "unreachable") return fill("destinations", empty("The scheduler is not answering: destinations unknown."));
    if (!rows.length) return fill("destinations", empty("No destination busy, throttled or suspended."));
    fill("destinations", table(
      [["Destination"], ["State"], ["Conns", "num"], ["Rate/s", "num"], ["Level", "num"], ["Waiting", "num"]],
      rows.flatMap((d) => withNote(el("tr", {},
        el("td", { class: "wrap" }, el("b", {}, d.destination)),
        el("td", {}, tag(d.state), d.suspended_until ? el("div", { class: "reply" }, `until ${clock(d.suspended_until)}`) : null),
        el("td", { class: "num", title: `connections in use / allowed now (the limit, ${d.limit}, halved per throttle level)` }, `${d.busy}/${d.connections}`),
        el("td", { class: d.rate === null ? "num zero" : "num" }, d.rate === null ? "–" : d.rate),
        el("td", { class: d.level ? "num" : "num zero", title: "throttle level: 0 is full speed" }, d.level),
        el("td", { class: "num" }, number(d.waiting))), d.last_reply, 6))));
  }

  function renderWebhooks(hooks) {
    if (!hooks.length) return fill("webhooks", empty("No webhooks configured."));
    fill("webhooks", table(
      [["Webhook"], ["State"], ["Pending", "num"], ["Parked", "num"], ["Lag", "num"]],
      hooks.flatMap((h) => withNote(el("tr", {},
        el("td", { class: "wrap", title: h.url }, el("b", {}, h.name)),
        el("td", { title: h.disabled || null }, tag(h.state, h.state === "active" ? "active-hook" : "")),
        el("td", { class: h.pending ? "num" : "num zero" }, number(h.pending)),
        el("td", { class: h.parked ? "num" : "num zero" }, number(h.parked)),
        el("td", { class: h.lag_seconds ? "num" : "num zero" }, h.lag_seconds ? age(h.lag_seconds) : "–")),
      h.last_error ? `last error: ${h.last_error}` : null, 5))));
  }

  function renderDead(dead) {
    $("dead-count").textContent = dead.count > dead.latest.length
      ? `the latest ${dead.latest.length} of ${number(dead.count)}` : "";
    if (!dead.count) return fill("dead", empty("No dead letters."));
    fill("dead", el("ul", { class: "dead" }, dead.latest.map((d) => el("li", { "data-id": d.id },
      d.recipients.map((r) => el("div", { class: "rcpt" },
        el("div", { class: "line" }, el("b", {}, r.address), tag(d.reason),
          el("span", { class: "when", title: d.dead_lettered_at }, since(d.dead_lettered_at))),
        r.reply ? el("div", { class: "reply" }, r.reply) : null)),
      el("div", { class: "meta" }, el("span", { class: "mono" }, d.id), ` · from ${d.sender || "<>"}`,
        d.tenant !== "default" ? ` · tenant ${d.tenant}` : "")))));
  }

  // --- the chart: stacked bars per minute, inline SVG ------------------------------------

  // The axis's top, a little above the highest bar: four whole steps of 1-8 times a power of ten.
  function nice(max) {
    const quarter = Math.max((max * 1.08) / 4, 1);
    const power = 10 ** Math.floor(Math.log10(quarter));
    return 4 * [1, 2, 3, 4, 5, 6, 8, 10].find((m) => m * power >= quarter) * power;
  }

  function renderChart(minutes) {
    const totals = Object.fromEntries(SERIES.map(([k]) => [k, minutes.reduce((n, m) => n + m[k], 0)]));
    fill("legend", ...SERIES.map(([k, label]) =>
      el("li", {}, el("i", { class: `fill-${k}` }), label, el("b", {}, number(totals[k])))));
    const box = $("chart");
    const width = Math.max(box.clientWidth, 320);
    const height = 240;
    const pad = { left: 40, right: 8, top: 10, bottom: 24 };
    const plotW = width - pad.left - pad.right;
    const plotH = height - pad.top - pad.bottom;
    const top = nice(Math.max(...minutes.map((m) => m.delivered + m.deferred + m.bounced), 0));
    const y = (v) => pad.top + plotH - (v / top) * plotH;
    const slot = plotW / minutes.length;
    const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "delivered, deferred and bounced per minute over the last hour" });
    for (let i = 0; i <= 4; i++) {
      const value = (top / 4) * i;
      chart.append(svg("line", { class: i ? "grid-line" : "axis", x1: pad.left, x2: width - pad.right, y1: y(value), y2: y(value) }));
      chart.append(svg("text", { x: pad.left - 6, y: y(value) + 4, "text-anchor": "end" }, number(Math.round(value * 10) / 10)));
    }
    minutes.forEach((m, i) => {
      const x = pad.left + i * slot;
      const group = svg("g", { class: "minute" });
      group.append(svg("title", {}, `${hhmm(m.minute)}: ${m.delivered} delivered, ${m.deferred} deferred, ${m.bounced} bounced`));
      group.append(svg("rect", { class: "hover", x, y: pad.top, width: slot, height: plotH }));
      let base = 0;
      for (const [k] of SERIES) {
        if (!m[k]) continue;
        const h = Math.max((m[k] / top) * plotH, 1.5);
        group.append(svg("rect", { class: k, x: x + slot * 0.14, width: Math.max(slot * 0.72, 1), y: y(base) - h, height: h, rx: 1 }));
        base += m[k];
      }
      chart.append(group);
      const back = minutes.length - 1 - i; // minutes before now
      const round = new Date(m.minute).getMinutes() % 10 === 0;
      if (back === 0 || (round && back > 4)) {
        chart.append(svg("text", { x: x + slot / 2, y: height - 6, "text-anchor": back === 0 ? "end" : "middle" }, back === 0 ? "now" : hhmm(m.minute)));
        chart.append(svg("line", { class: "axis", x1: x + slot / 2, x2: x + slot / 2, y1: pad.top + plotH, y2: pad.top + plotH + 4 }));
      }
    });
    if (!totals.delivered && !totals.deferred && !totals.bounced) {
      chart.append(svg("text", { class: "quiet", x: pad.left + plotW / 2, y: pad.top + plotH / 2, "text-anchor": "middle" }, "No delivery attempt in the last hour"));
    }
    box.replaceChildren(chart);
    box.dataset.minutes = String(minutes.length);
  }

  // --- /v1/events: Server-Sent Events read with fetch (EventSource sends no header) -------

  async function follow() {
    const control = new AbortController();
    stream = control;
    let delay = BACKOFF[0];
    while (stream === control) {
      try {
        const headers = { Authorization: `Bearer ${token()}`, Accept: "text/event-stream" };
        if (lastId) headers["Last-Event-ID"] = lastId;
        const answer = await fetch("/v1/events", { headers, signal: control.signal, cache: "no-store" });
        if (answer.status === 401 || answer.status === 403) {
          const body = await answer.json().catch(() => ({}));
          if (stream === control) signIn(body.detail || "the token was refused");
          return; // else /v1/status has said why already
        }
        if (!answer.ok) throw new Error((await answer.json().catch(() => ({}))).detail || `${answer.status}`);
        feedState("on", "live");
        delay = BACKOFF[0]; // connected: the next drop waits the least again
        await frames(answer.body, take);
        throw new Error("the stream ended");
      } catch (error) {
        if (stream !== control) return;
        feedState("off", `reconnecting in ${delay / 1000}s (${error.message})`);
        await new Promise((resolve) => setTimeout(resolve, delay));
        delay = Math.min(delay * 2, BACKOFF[1]);
      }
    }
  }

  // Split the stream into frames (a blank line ends one), as the SSE specification parses them.
  async function frames(body, each) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer = (buffer + value).replace(/\r\n|\r(?!$)/g, "\n"); // a lone \r at the end may be half of \r\n
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const frame = { event: "message", id: null, data: [] };
        for (const line of block.split("\n")) {
          if (!line || line.startsWith(":")) continue; // a comment: the heartbeat
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "data") frame.data.push(text);
          else if (field === "event") frame.event = text;
          else if (field === "id") frame.id = text;
        }
        if (frame.id !== null) lastId = frame.id;
        if (frame.data.length) each({ ...frame, data: frame.data.join("\n") });
      }
    }
  }

  function take(frame) {
    const list = $("feed");
    for (const note of list.querySelectorAll("li.waiting")) note.remove();
    if (frame.event === "reset") {
      list.prepend(el("li", { class: "note" }, "Some events were missed (the stream restarted from the oldest kept)."));
      return;
    }
    let event;
    try {
      event = JSON.parse(frame.data);
    } catch {
      return;
    }
    const name = event.event || frame.event.replace(/^message\./, "");
    const who = event.rcpt || (event.rcpts ? event.rcpts.join(", ") : "");
    const reply = event.reply || (name === "received" ? `from ${event.sender || "<>"}` : "");
    list.prepend(el("li", { class: "fresh", "data-id": event.id, "data-event": name },
      el("span", { class: "time", title: event.timestamp }, event.timestamp ? clock(event.timestamp) : ""),
      el("span", {}, tag(name)),
      el("span", { class: "id" }, event.id),
      el("span", { class: "who", title: reply ? `${who}: ${reply}` : who }, who, reply ? el("span", { class: "reply" }, reply) : null)));
    while (list.children.length > FEED_SIZE) list.lastElementChild.remove();
  }

  function feedState(kind, text) {
    $("feed-state").className = `live ${kind}`;
    $("feed-state").textContent = text;
  }

  // --- wiring ----------------------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", () => {
    takeTokenFromAddress();
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const given = $("token").value.trim();
      if (!given) return;
      sessionStorage.setItem(KEY, given);
      start();
    });
    $("signout").addEventListener("click", (event) => {
      event.preventDefault();
      signIn("");
    });
    let resized = null;
    window.addEventListener("resize", () => {
      clearTimeout(resized);
      resized = setTimeout(() => { if (shown && !$("dashboard").hidden) renderChart(shown.chart); }, 150);
    });
    if (token()) start();
    else signIn("");
  });
})();
