/* sparsegpt-service dashboard: live progress (SSE with polling as the fallback) and a
   self-refreshing jobs table. Served by the app itself; no dependencies. */
(function () {
  "use strict";
  var TERMINAL = { succeeded: 1, failed: 1, cancelled: 1 };
  var page = document.body.dataset.page;

  function duration(s) {
    if (s === null || s === undefined || !isFinite(s)) return "";
    s = Math.max(0, Math.round(s));
    var h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    if (h) return h + "h " + String(m).padStart(2, "0") + "m";
    if (m) return m + "m " + String(sec).padStart(2, "0") + "s";
    return sec + "s";
  }

  function view(p) {
    var hasBlock = typeof p.layer === "number" && typeof p.layers === "number";
    return {
      percent: typeof p.fraction === "number" ? Math.round(1000 * p.fraction) / 10 : null,
      stage: p.stage || "",
      block: hasBlock ? "block " + (p.layer + 1) + " of " + p.layers : "",
      module: p.module || "",
      eta: duration(p.eta_s),
      elapsed: duration(p.elapsed_s),
      message: p.message || ""
    };
  }

  function span(cls, text) {
    var el = document.createElement("span");
    el.className = cls;
    el.textContent = text;
    return el;
  }

  function renderBar(box, p) {
    if (!box || !p) return;
    var v = view(p);
    var fill = box.querySelector(".bar span");
    if (fill) fill.style.width = (v.percent || 0) + "%";
    var text = box.querySelector(".progress-text");
    if (!text) return;
    text.textContent = "";
    text.appendChild(span("stage", v.stage));
    if (v.block) text.appendChild(span("block", v.block));
    if (v.percent !== null) text.appendChild(span("pct", v.percent + "%"));
    if (v.eta) text.appendChild(span("eta", "ETA " + v.eta));
  }

  function setBadge(root, status) {
    var badge = root.querySelector('[data-role="status"]');
    if (badge) {
      badge.textContent = status;
      badge.className = "badge badge-" + status;
    }
  }

  async function fetchDocument(url) {
    var res = await fetch(url, { credentials: "same-origin", headers: { Accept: "text/html" } });
    if (!res.ok) throw new Error("HTTP " + res.status);
    return new DOMParser().parseFromString(await res.text(), "text/html");
  }

  /* --- the jobs table ------------------------------------------------------------------ */
  function jobsPage() {
    var wrap = document.getElementById("jobs-table");
    if (!wrap) return;
    function activeRows() {
      return document.querySelectorAll('#jobs-table tr[data-status="queued"], #jobs-table tr[data-status="running"]').length;
    }
    async function swap() {
      var checked = Array.prototype.map.call(document.querySelectorAll('#jobs-table input[name="ids"]:checked'), function (el) { return el.value; });
      var doc = await fetchDocument(location.href);
      ["jobs-table"].forEach(function (id) {
        var fresh = doc.getElementById(id), old = document.getElementById(id);
        if (fresh && old) old.replaceWith(fresh);
      });
      [".summary", ".filters"].forEach(function (sel) {
        var fresh = doc.querySelector(sel), old = document.querySelector(sel);
        if (fresh && old) old.replaceWith(fresh);
      });
      wrap = document.getElementById("jobs-table");
      checked.forEach(function (v) {
        var box = document.querySelector('#jobs-table input[name="ids"][value="' + v + '"]');
        if (box) box.checked = true;
      });
    }
    async function tick() {
      var size = Number(wrap.dataset.pageSize), pageNo = Number(wrap.dataset.page);
      var params = new URLSearchParams({ limit: String(size), offset: String((pageNo - 1) * size) });
      if (wrap.dataset.status) params.set("status", wrap.dataset.status);
      try {
        var res = await fetch("/api/v1/jobs?" + params, { credentials: "same-origin", headers: { Accept: "application/json" } });
        if (res.ok) {
          var data = await res.json();
          var stale = data.total !== Number(wrap.dataset.total);
          data.items.forEach(function (item) {
            var row = document.getElementById("job-" + item.id);
            if (!row || row.dataset.status !== item.status) { stale = true; return; }
            if (item.progress) renderBar(row.querySelector('[data-role="progress"]'), item.progress);
          });
          if (stale) await swap();
        }
      } catch (err) { /* the next tick tries again */ }
      setTimeout(tick, activeRows() ? 2000 : 5000);
    }
    setTimeout(tick, activeRows() ? 2000 : 5000);
  }

  /* --- one job ------------------------------------------------------------------------- */
  function jobPage() {
    var main = document.getElementById("job-main");
    if (!main || main.dataset.active !== "true") return;
    var id = main.dataset.job;
    var live = { events: 0, progress: [], lines: [], source: null, finished: false };
    window.sparsegptLive = live;  // read by the browser tests
    var last = null, lastAt = 0, es = null, pollTimer = null, polling = false, seenLog = {};

    function text(id, value) {
      var el = document.getElementById(id);
      if (el) el.textContent = value || "–";
    }

    function mode(label) { text("feed-mode", label); }

    function clock(value) {  // as the server writes times: YYYY-MM-DD HH:MM:SS (UTC)
      if (value === null || value === undefined || value === "") return "";
      var d = typeof value === "number" ? new Date(value * 1000)
        : new Date(/[zZ]|[+-]\d\d:?\d\d$/.test(value) ? value : value + "Z");
      return isNaN(d) ? "" : d.toISOString().substr(0, 19).replace("T", " ");
    }

    // The Details card (started, attempts, worker) follows the job, as the progress does.
    function applyDetails(job) {
      if (!job) return;
      if (job.started_at) text("d-started", clock(job.started_at));
      if (typeof job.attempt === "number") text("d-attempts", String(job.attempt));
      if (job.worker) text("d-worker", job.worker);
      if (job.started_at) main.dataset.started = job.started_at;
    }

    var lastLine = "";
    function logLine(label, detail, when) {
      var list = document.getElementById("event-log");
      if (!list) return;
      // An event that says what the line above says (a replayed or repeated one) adds no line.
      var line = label + "\u0000" + (detail || "");
      if (line === lastLine) return;
      lastLine = line;
      live.lines.push(label + (detail ? " — " + detail : ""));
      var li = document.createElement("li");
      var t = when ? new Date(when * 1000) : new Date();
      li.appendChild(span("when", t.toISOString().substr(11, 8)));
      li.appendChild(span("what", label));
      if (detail) li.appendChild(span("detail", detail));
      list.insertBefore(li, list.firstChild);
      while (list.children.length > 50) list.removeChild(list.lastChild);
    }

    function applyProgress(p, fromStream) {
      if (!p) return;
      last = p; lastAt = Date.now();
      var v = view(p);
      renderBar(main.querySelector('#live [data-role="progress"]'), p);
      text("p-stage", v.stage); text("p-block", v.block); text("p-module", v.module);
      text("p-elapsed", v.elapsed); text("p-eta", v.eta);
      if (fromStream) {
        live.events += 1;
        live.progress.push({ stage: v.stage, layer: p.layer, layers: p.layers, fraction: p.fraction });
        logLine(v.stage + (v.block ? " · " + v.block : ""), [v.module, v.message].filter(Boolean).join(" — "), p.ts);
      }
    }

    function tickClock() {
      if (!last || live.finished) return;
      var since = (Date.now() - lastAt) / 1000;
      if (typeof last.elapsed_s === "number") text("p-elapsed", duration(last.elapsed_s + since));
      if (typeof last.eta_s === "number") text("p-eta", duration(Math.max(0, last.eta_s - since)));
    }
    setInterval(tickClock, 1000);

    async function finish(status) {
      if (live.finished) return;
      live.finished = true;
      if (es) es.close();
      if (pollTimer) clearTimeout(pollTimer);
      setBadge(main, status);
      // The finished page (results, charts, download) replaces this one's content, without a reload.
      try {
        var doc = await fetchDocument(location.pathname);
        var fresh = doc.getElementById("job-main");
        if (fresh) main.replaceWith(fresh);
      } catch (err) {
        location.reload();
      }
    }

    function applyStatus(s, fromStream) {
      if (!s || !s.status) return;
      setBadge(main, s.status);
      main.dataset.status = s.status;
      if (s.status === "running") {  // a (new) attempt started: its number, worker and time
        applyDetails({ attempt: s.attempt, worker: s.worker, started_at: s.ts || null });
      }
      if (fromStream && !seenLog[s.status + s.attempt]) {
        seenLog[s.status + s.attempt] = 1;
        logLine(s.status, s.error || "", s.ts);
      }
      if (TERMINAL[s.status]) finish(s.status);
    }

    async function poll() {
      try {
        var res = await fetch("/api/v1/jobs/" + id, { credentials: "same-origin", headers: { Accept: "application/json" } });
        if (res.ok) {
          var job = await res.json();
          applyDetails(job);
          if (job.progress && (!last || job.progress.ts !== last.ts)) applyProgress(job.progress, false);
          applyStatus({ status: job.status, error: job.error }, false);
        }
      } catch (err) { /* next time */ }
      if (!live.finished && polling) pollTimer = setTimeout(poll, 2000);
    }

    function startPolling(why) {
      mode("polling (" + why + ")");
      live.source = "polling";
      if (!polling && !live.finished) { polling = true; poll(); }
    }

    function stopPolling() {
      polling = false;
      if (pollTimer) { clearTimeout(pollTimer); pollTimer = null; }
    }

    if (!window.EventSource) { startPolling("no EventSource"); return; }
    es = new EventSource("/api/v1/jobs/" + id + "/events");
    live.source = "sse";
    mode("streaming");
    function streamed() { stopPolling(); live.source = "sse"; mode("streaming"); }
    es.addEventListener("snapshot", function (e) {
      streamed();
      var job = JSON.parse(e.data);
      applyDetails(job);
      if (job.progress) applyProgress(job.progress, false);
      applyStatus({ status: job.status, error: job.error }, false);
    });
    es.addEventListener("progress", function (e) { streamed(); applyProgress(JSON.parse(e.data), true); });
    es.addEventListener("status", function (e) { streamed(); applyStatus(JSON.parse(e.data), true); });
    es.onerror = function () {
      if (live.finished) return;
      startPolling(es.readyState === EventSource.CLOSED ? "the event stream closed" : "reconnecting");
    };
  }

  // The new-job form: the model field names a model this server pruned before -> about how long.
  function durationHint() {
    var input = document.getElementById("model"), hint = document.getElementById("duration-hint");
    if (!input || !hint) return;
    var rows = document.querySelectorAll("#past-durations tr[data-model]");
    function update() {
      var found = null;
      rows.forEach(function (row) { if (row.dataset.model === input.value.trim()) found = row; });
      hint.hidden = !found;
      if (found) hint.textContent = "This server pruned this model before: a whole job took about " +
        found.dataset.total + " (fewer blocks, samples or evaluation windows take less).";
    }
    input.addEventListener("input", update);
    update();
  }

  if (page === "jobs") jobsPage();
  if (page === "job") jobPage();
  durationHint();
})();
