/* sparsegpt-service: a compression plan's page (templates/plan.html). Draws the plan's chart with
   the vendored Chart.js (app/static/vendor/) from the plan JSON the page embeds in
   <script type="application/json" id="plan-data">, and while the plan is active refreshes it from
   GET /api/v1/plans/{id} every few seconds: the chart is redrawn in place, and the table, the
   counts and the recommendation are swapped for the page's fresh ones (the server formats them,
   so a refreshed page reads exactly as a reloaded one). The Pareto front and the recommended
   point are the server's (the plan JSON's "pareto" and "recommended"), never computed here. */
(function () {
  "use strict";
  var ACTIVE = { queued: 1, running: 1 };
  var REFRESH_MS = 3000;
  var SCHEMES = [
    ["none", "no quantization", "#2563eb"],
    ["W8A16", "W8A16", "#059669"],
    ["W4A16", "W4A16", "#d97706"],
    ["FP8_DYNAMIC", "FP8_DYNAMIC", "#7c3aed"]
  ];
  var SWAPPED = ["plan-head", "plan-counts", "plan-recommended", "plan-table"];

  var main = document.getElementById("plan-main");
  var dataEl = document.getElementById("plan-data");
  var canvas = document.getElementById("plan-chart");
  if (!main || !dataEl || !canvas) return;

  /* --- how values read ---------------------------------------------------------------------- */
  function decimalBytes(n) {  // the x axis: MB = 10^6 bytes
    var units = [[1e12, "TB"], [1e9, "GB"], [1e6, "MB"], [1e3, "kB"]];
    for (var i = 0; i < units.length; i++) {
      if (n >= units[i][0]) return +(n / units[i][0]).toPrecision(3) + " " + units[i][1];
    }
    return Math.round(n) + " B";
  }

  function sparsityText(s) {
    s = String(s);
    if (s.indexOf(":") >= 0) return s;
    var v = parseFloat(s);
    if (isNaN(v)) return s;
    return v === 0 ? "no pruning" : +(v * 100).toPrecision(4) + "%";
  }

  function setting(p) {  // as app/web/plan_view.setting
    if (p.state === "dense") return "dense model";
    var parts = [p.method || "", sparsityText(p.sparsity), p.quantization || "no quantization"];
    if (p.refit) parts.push("refit");
    return parts.filter(Boolean).join(" · ");
  }

  function canon(value) {  // JSON with sorted keys: the embedded and the fetched plan compare equal
    if (Array.isArray(value)) return "[" + value.map(canon).join(",") + "]";
    if (value && typeof value === "object") {
      return "{" + Object.keys(value).sort().map(function (k) { return JSON.stringify(k) + ":" + canon(value[k]); }).join(",") + "}";
    }
    return JSON.stringify(value);
  }

  /* --- the chart's data from the plan JSON --------------------------------------------------- */
  function accuracyMode(plan) { return plan.metric === "accuracy"; }

  function yOf(plan, p) {
    var v = accuracyMode(plan) ? p.mean_accuracy : p.perplexity;
    if (typeof v !== "number" || !isFinite(v)) return null;
    return accuracyMode(plan) ? 100 * v : v;
  }

  function densePerplexity(plan) {
    var figures = (plan.dense && plan.dense.perplexity) || {};
    if (plan.dataset in figures) return figures[plan.dataset];
    var keys = Object.keys(figures);
    return keys.length ? figures[keys[0]] : null;
  }

  function denseY(plan) {
    var v = accuracyMode(plan) ? (plan.dense || {}).mean_accuracy : densePerplexity(plan);
    if (typeof v !== "number" || !isFinite(v)) return null;
    return accuracyMode(plan) ? 100 * v : v;
  }

  function limitY(plan) {
    var b = plan.budget || {}, d = denseY(plan);
    if (d === null) return null;
    if (b.metric === "perplexity" && typeof b.max_increase_pct === "number") return d * (1 + b.max_increase_pct / 100);
    if (b.metric === "accuracy" && typeof b.max_drop_points === "number") return d - b.max_drop_points;
    return null;
  }

  function plotted(plan) {  // the points with a size and a quality figure
    return (plan.points || []).filter(function (p) {
      return typeof p.bytes === "number" && p.bytes > 0 && yOf(plan, p) !== null;
    }).map(function (p) {
      return { x: p.bytes, y: yOf(plan, p), key: p.key, label: setting(p), point: p };
    });
  }

  function datasets(plan) {
    var points = plotted(plan), out = [];
    SCHEMES.forEach(function (s) {
      var mine = points.filter(function (d) { return (d.point.quantization || "none") === s[0]; });
      var listed = (plan.points || []).some(function (p) { return (p.quantization || "none") === s[0]; });
      if (!listed) return;
      out.push({
        type: "scatter", label: s[1], data: mine, order: 1,
        backgroundColor: s[2], borderColor: s[2], pointRadius: 6, pointHoverRadius: 8
      });
    });
    var front = points.filter(function (d) { return d.point.pareto; }).sort(function (a, b) { return a.x - b.x || a.y - b.y; });
    out.push({
      type: "line", label: "Pareto front", data: front, stepped: "before", order: 2,  // across, then down
      borderColor: "#111827", backgroundColor: "#111827", borderWidth: 2, pointRadius: 0, fill: false
    });
    var chosen = points.filter(function (d) { return d.point.recommended; });
    out.push({
      type: "scatter", label: "recommended", data: chosen, order: 0,
      pointRadius: 13, pointHoverRadius: 14, pointStyle: "circle", borderWidth: 3,
      borderColor: "#dc2626", backgroundColor: "rgba(220, 38, 38, 0)"
    });
    var xs = points.map(function (d) { return d.x; });
    var lo = xs.length ? Math.min.apply(null, xs) / 1.6 : 1e5, hi = xs.length ? Math.max.apply(null, xs) * 1.6 : 1e7;
    [[denseY(plan), "dense model", "#6b7280"], [limitY(plan), "budget limit", "#dc2626"]].forEach(function (line) {
      if (line[0] === null) return;
      out.push({
        type: "line", label: line[1], order: 3, borderDash: [6, 5], borderWidth: 1.5, pointRadius: 0, fill: false,
        borderColor: line[2], backgroundColor: line[2],
        data: [{ x: lo, y: line[0], label: line[1] }, { x: hi, y: line[0], label: line[1] }]
      });
    });
    return { sets: out, lo: lo, hi: hi };
  }

  function yText(plan, y) {
    return accuracyMode(plan) ? y.toFixed(1) + "%" : "perplexity " + (y < 1000 ? y.toFixed(2) : y.toPrecision(4));
  }

  function options(plan, range) {
    return {
      responsive: true, maintainAspectRatio: false, animation: false, parsing: true,
      interaction: { mode: "nearest", intersect: true },
      scales: {
        x: {
          type: "logarithmic", min: range.lo, max: range.hi,
          title: { display: true, text: "download size (log scale; MB = 10\u2076 bytes)" },
          ticks: {
            callback: function (value) {
              var m = value / Math.pow(10, Math.floor(Math.log10(value) + 1e-9));
              var lead = Math.round(m);
              return Math.abs(m - lead) < 1e-6 && (lead === 1 || lead === 2 || lead === 5) ? decimalBytes(value) : "";
            }
          }
        },
        y: {
          title: { display: true, text: accuracyMode(plan) ? "mean zero-shot accuracy, % (higher is better)" : "perplexity on " + String(plan.dataset || "the first evaluation set").split("/").pop() + " (lower is better)" }
        }
      },
      plugins: {
        legend: { position: "bottom", labels: { usePointStyle: true } },
        tooltip: {
          callbacks: {
            label: function (ctx) {
              var raw = ctx.raw || {};
              if (!raw.point) return raw.label + ": " + yText(plan, ctx.parsed.y);
              var p = raw.point;
              return raw.label + ": " + yText(plan, ctx.parsed.y) + ", " + decimalBytes(p.bytes) + (typeof p.ratio === "number" ? " (\u00d7" + p.ratio.toFixed(2) + ")" : "");
            }
          }
        }
      }
    };
  }

  var chart = null;

  function draw(plan) {
    var built = datasets(plan);
    if (!window.Chart) {
      canvas.dataset.error = "the chart library did not load";
      return;
    }
    if (chart) {
      chart.data.datasets = built.sets;
      chart.options = options(plan, built);
      chart.update("none");
    } else {
      chart = new window.Chart(canvas, { type: "scatter", data: { datasets: built.sets }, options: options(plan, built) });
    }
    canvas.dataset.points = String(plotted(plan).length);
    canvas.dataset.drawn = "true";
  }

  /* --- refreshing while the plan is active --------------------------------------------------- */
  async function swapPage() {
    var res = await fetch(location.pathname, { credentials: "same-origin", headers: { Accept: "text/html" } });
    if (!res.ok) return;
    var doc = new DOMParser().parseFromString(await res.text(), "text/html");
    SWAPPED.forEach(function (id) {
      var fresh = doc.getElementById(id), old = document.getElementById(id);
      if (fresh && old) old.replaceWith(document.importNode(fresh, true));
    });
  }

  var last = "";

  async function refresh() {
    var plan;
    try {
      var res = await fetch(main.dataset.api, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (!res.ok) throw new Error("HTTP " + res.status);
      plan = await res.json();
    } catch (err) {
      setTimeout(refresh, REFRESH_MS * 2);
      return;
    }
    var text = canon(plan);
    if (text !== last) {
      last = text;
      draw(plan);
      try { await swapPage(); } catch (err) { /* the next round tries again */ }
      main.dataset.status = plan.status;
    }
    if (ACTIVE[plan.status]) {
      setTimeout(refresh, REFRESH_MS);
    } else {
      main.dataset.active = "false";
      var live = document.getElementById("plan-live");
      if (live) live.remove();
    }
  }

  var initial = JSON.parse(dataEl.textContent);
  last = canon(initial);
  draw(initial);
  if (ACTIVE[initial.status]) setTimeout(refresh, REFRESH_MS);
})();
