/* Sluiceway status page: draws what the rollout service's JSON endpoints return.
 *
 * URL fragment (never sent to the server): #model=<name>&minutes=<n>&key=<api key>. With API
 * keys configured on the controller, the page sends `key` as the X-API-Key header of its own
 * requests (a viewer key is enough). Data: GET /v1/status (models), GET /v1/status/{model}
 * (traffic, latency, drift, timeline) and GET /v1/rollouts/{model} (the current rollout).
 *
 * Every chart container gets data-state (loading, ready, empty, error) and data-points (how
 * many values it drew) once rendered, so a headless browser can check that it has data.
 */
(function () {
  "use strict";

  const REFRESH_MS = 15000;
  const PALETTE = ["#2563eb", "#ea580c", "#16a34a", "#9333ea", "#db2777", "#0891b2", "#854d0e"];
  const ACTIONS = {
    start: "live", advance: "good", promote: "good", resume: "live",
    wait: "quiet", hold: "hold", pause: "hold",
    rollback: "bad", abort: "bad",
  };
  const PHASES = {
    shadow: "live", canary: "live", ab: "live", pending: "quiet",
    promoted: "good", paused: "hold", rolled_back: "bad", aborted: "bad",
  };
  const MARKED = new Set(["start", "advance", "promote", "rollback", "abort", "pause", "resume",
    "hold"]);

  const charts = {};
  let last = null;
  let timer = null;
  let generation = 0;

  // -- small helpers -------------------------------------------------------------------------

  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "style") node.style.cssText = value;
      else node.setAttribute(name, value);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function fragment() {
    return new URLSearchParams(location.hash.slice(1));
  }

  function setFragment(changes) {
    const params = fragment();
    for (const [name, value] of Object.entries(changes)) params.set(name, value);
    location.hash = params.toString();
  }

  async function getJSON(path) {
    const key = fragment().get("key");
    const response = await fetch(path, {
      headers: key ? { "X-API-Key": key } : {},
      cache: "no-store",
    });
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      body = null;
    }
    if (!response.ok) {
      const error = new Error((body && body.error && body.error.message) || response.statusText);
      error.status = response.status;
      error.code = (body && body.error && body.error.code) || "";
      throw error;
    }
    return body;
  }

  function clock(ms) {
    return new Date(ms).toLocaleTimeString([], { hour12: false });
  }

  function number(value, digits) {
    if (value === null || value === undefined) return "–";
    const abs = Math.abs(value);
    if (digits !== undefined) return value.toFixed(digits);
    if (abs !== 0 && (abs < 0.001 || abs >= 100000)) return value.toExponential(2);
    if (abs >= 100) return value.toFixed(0);
    if (abs >= 1) return value.toFixed(2);
    return value.toFixed(4);
  }

  function percent(value) {
    return value === null || value === undefined ? "–" : `${(value * 100).toFixed(1)}%`;
  }

  function alpha(hex, a) {
    const n = parseInt(hex.slice(1), 16);
    return `rgba(${(n >> 16) & 255}, ${(n >> 8) & 255}, ${n & 255}, ${a})`;
  }

  function versionColors(versions) {
    const sorted = [...new Set(versions)].sort((a, b) =>
      a.localeCompare(b, undefined, { numeric: true }));
    return Object.fromEntries(sorted.map((v, i) => [v, PALETTE[i % PALETTE.length]]));
  }

  function mark(el, state, points) {
    el.dataset.state = state;
    el.dataset.points = String(points);
  }

  function empty(el, text) {
    el.replaceChildren(h("div", { class: "empty" }, text));
    mark(el, "empty", 0);
  }

  function destroyChart(el) {
    if (charts[el.id]) {
      charts[el.id].destroy();
      delete charts[el.id];
    }
  }

  function chartWidth(el) {
    return Math.max(320, el.clientWidth || el.parentNode.clientWidth - 32);
  }

  // -- the rollout card ------------------------------------------------------------------------

  function renderRollout(el, view, colors) {
    if (!view) {
      empty(el, "No rollout of this model has been recorded.");
      return;
    }
    const weights = h("div", { class: "weights", title: "live weights" },
      Object.entries(view.weights).filter(([, w]) => w > 0).map(([version, w]) =>
        h("div", { style: `width:${w * 100}%;background:${colors[version] || "#64748b"}` },
          `v${version} ${Math.round(w * 100)}%`)));
    const summary = h("div", { class: "summary" },
      h("div", {}, h("span", { class: `badge ${PHASES[view.phase] || ""}` }, view.phase), " ",
        h("span", { class: "big" }, view.state)),
      h("div", {}, h("span", { class: "k" }, "candidate"), `v${view.candidate}`, "  ",
        h("span", { class: "k" }, " champion"), `v${view.champion}`),
      h("div", {}, h("span", { class: "k" }, "step"),
        view.step_index >= 0 ? `${view.step_index + 1} of ${view.steps}` : `– of ${view.steps}`),
      weights,
      view.shadow_sample_rate > 0
        ? h("div", {}, h("span", { class: "k" }, "shadow sample"), percent(view.shadow_sample_rate))
        : null,
      h("div", {}, h("span", { class: "k" }, "failures"),
        `${view.consecutive_failures} of ${view.failure_threshold} (then ${view.on_failure})`),
      h("div", {}, h("span", { class: "k" }, "revision"), String(view.revision)),
      h("div", {}, h("span", { class: "k" }, "started"), clock(view.started_ms)));
    const gates = view.gates.length
      ? h("table", { class: "gates" },
        h("tr", {}, ["gate", "value", "threshold", "samples", "status"].map((t) => h("th", {}, t))),
        view.gates.map((g) => h("tr", {},
          h("td", {}, g.name),
          h("td", { class: "num" }, number(g.value)),
          h("td", { class: "num" }, number(g.threshold)),
          h("td", { class: "num" }, String(g.samples)),
          h("td", { class: `st-${g.status}` }, g.status))))
      : null;
    el.replaceChildren(summary, h("div", { class: "reason" }, view.reason || ""), gates);
    mark(el, "ready", view.gates.length + 1);
  }

  // -- traffic split -----------------------------------------------------------------------------

  // The x axis of every time chart: the page's range, local wall-clock times.
  function timeAxis() {
    return { space: 80, values: (u, ticks) => ticks.map((t) => clock(t * 1000)) };
  }

  function timeScale(range) {
    return { time: true, range: () => [range.since_s, range.until_s] };
  }

  function decisionMarkers(decisions) {
    return decisions.filter((d) => MARKED.has(d.action))
      .map((d) => ({ t: d.at_ms / 1000, label: d.action, kind: ACTIONS[d.action] || "" }))
      .sort((a, b) => a.t - b.t);
  }

  function markerPlugin(markers) {
    const tones = { good: "#15803d", bad: "#b91c1c", hold: "#b45309", live: "#1d4ed8" };
    return {
      hooks: {
        draw: [(u) => {
          const { ctx } = u;
          const { left, top, width, height } = u.bbox;
          const ratio = devicePixelRatio || 1;
          let lastLabel = -Infinity;
          ctx.save();
          ctx.font = `${11 * ratio}px "Liberation Sans", sans-serif`;
          for (const m of markers) {
            const x = u.valToPos(m.t, "x", true);
            if (x < left || x > left + width) continue;
            ctx.strokeStyle = tones[m.kind] || "#475569";
            ctx.fillStyle = ctx.strokeStyle;
            ctx.setLineDash([3 * ratio, 3 * ratio]);
            ctx.lineWidth = ratio;
            ctx.beginPath();
            ctx.moveTo(x, top);
            ctx.lineTo(x, top + height);
            ctx.stroke();
            if (x - lastLabel > 60 * ratio) {
              ctx.fillText(m.label, x + 3 * ratio, top + 12 * ratio);
              lastLabel = x;
            }
          }
          ctx.restore();
        }],
      },
    };
  }

  function renderTraffic(el, traffic, decisions, range) {
    destroyChart(el);
    const points = traffic.live.filter((n) => n > 0).length;
    if (!points) {
      empty(el, "No predictions of this model in this range.");
      return;
    }
    const colors = versionColors(traffic.series.map((s) => s.version));
    const live = traffic.series.filter((s) => s.route !== "shadow");
    const shadow = traffic.series.filter((s) => s.route === "shadow");
    const data = [traffic.times];
    const raw = [null];
    const series = [{}];
    const bands = [];
    // Buckets are intervals: each value holds until the next bucket starts.
    const stepped = uPlot.paths.stepped({ align: 1 });
    let below = traffic.times.map(() => 0);
    live.forEach((s, i) => {
      const stacked = s.share.map((share, j) => (share === null ? null : below[j] + share));
      below = stacked.map((v, j) => (v === null ? below[j] : v));
      data.push(stacked);
      raw.push(s.share);
      const color = colors[s.version];
      series.push({
        label: `v${s.version} ${s.route}`,
        stroke: color,
        width: 1.5,
        fill: alpha(color, s.route === "champion" ? 0.45 : 0.3),
        paths: stepped,
        value: (u, v, si, di) => (di === null ? "–" : percent(raw[si][di])),
        points: { show: false },
      });
      if (i > 0) bands.push({ series: [data.length - 1, data.length - 2] });
    });
    for (const s of shadow) {
      data.push(s.share);
      raw.push(s.share);
      series.push({
        label: `v${s.version} shadow`,
        stroke: colors[s.version],
        width: 1.5,
        dash: [6, 4],
        paths: stepped,
        value: (u, v, si, di) => (di === null ? "–" : percent(raw[si][di])),
        points: { show: false },
      });
    }
    const rps = traffic.live.map((n) => n / traffic.bucket_s);
    data.push(rps);
    series.push({
      label: "live req/s",
      stroke: "#94a3b8",
      width: 1,
      scale: "rps",
      paths: stepped,
      value: (u, v) => (v === null ? "–" : v.toFixed(1)),
      points: { show: false },
    });
    const options = {
      width: chartWidth(el),
      height: 230,
      series,
      bands,
      scales: {
        x: timeScale(range),
        y: { range: [0, 1.0001] },
        rps: { range: (u, lo, hi) => [0, hi * 1.15 || 1] },
      },
      axes: [
        timeAxis(),
        { values: (u, ticks) => ticks.map((v) => `${Math.round(v * 100)}%`), size: 50 },
        { side: 1, scale: "rps", grid: { show: false }, size: 50,
          values: (u, ticks) => ticks.map((v) => `${v}/s`) },
      ],
      legend: { live: true },
      cursor: { points: { show: false } },
      plugins: [markerPlugin(decisionMarkers(decisions))],
    };
    el.replaceChildren();
    charts[el.id] = new uPlot(options, data, el);
    mark(el, "ready", points);
  }

  // -- latency ---------------------------------------------------------------------------------

  function renderLatency(el, latency, range) {
    destroyChart(el);
    let points = 0;
    for (const s of latency.series) points += s.p99_ms.filter((v) => v !== null).length;
    if (!points) {
      empty(el, "No health windows of this model in this range (the monitor's analyzer writes " +
        "them as windows close).");
      return;
    }
    const colors = versionColors(latency.series.map((s) => s.version));
    const data = [latency.times];
    const series = [{}];
    for (const s of latency.series) {
      const color = colors[s.version];
      const dash = s.route === "shadow" ? [2, 3] : undefined;
      data.push(s.p99_ms);
      series.push({ label: `v${s.version} ${s.route} p99`, stroke: color, width: 2, dash,
        value: (u, v) => (v === null ? "–" : `${v.toFixed(1)} ms`), points: { size: 4 } });
      data.push(s.p50_ms);
      series.push({ label: `v${s.version} ${s.route} p50`, stroke: color, width: 1, dash: [5, 4],
        value: (u, v) => (v === null ? "–" : `${v.toFixed(1)} ms`), points: { show: false } });
    }
    const options = {
      width: chartWidth(el),
      height: 200,
      series,
      scales: { x: timeScale(range), y: { range: (u, lo, hi) => [0, hi * 1.1 || 1] } },
      axes: [timeAxis(), { values: (u, ticks) => ticks.map((v) => `${v} ms`), size: 60 }],
      cursor: { points: { show: false } },
    };
    el.replaceChildren();
    charts[el.id] = new uPlot(options, data, el);
    mark(el, "ready", points);
  }

  // -- drift heatmap ---------------------------------------------------------------------------

  // Value / threshold -> colour: pale below the threshold, amber at it, dark red at 5x.
  const RAMP = [
    [0, [241, 245, 249]],
    [1, [253, 224, 138]],
    [2.5, [249, 115, 22]],
    [5, [153, 27, 27]],
  ];

  function heat(value, threshold) {
    const x = Math.max(0, value) / (threshold || 0.1);
    for (let i = 1; i < RAMP.length; i++) {
      const [x1, c1] = RAMP[i];
      const [x0, c0] = RAMP[i - 1];
      if (x <= x1 || i === RAMP.length - 1) {
        const f = Math.min(1, (x - x0) / (x1 - x0));
        const c = c0.map((v, k) => Math.round(v + (c1[k] - v) * f));
        return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
      }
    }
    return "#000";
  }

  // One canvas per (version, route): a row per column of the model, a cell per window,
  // placed in time over the page's range (gaps stay visible).
  function heatmap(map, drift, range, width, tooltip, axis) {
    const labelW = 150;
    const cellH = 18;
    const axisH = axis ? 20 : 2;
    const ratio = devicePixelRatio || 1;
    const height = map.rows.length * cellH + axisH;
    const windows = drift.columns;
    const gaps = windows.slice(1).map((t, i) => t - windows[i]);
    const stepS = gaps.length ? Math.max(drift.column_s, Math.min(...gaps)) : drift.column_s;
    const scale = (width - labelW) / Math.max(1, range.until_s - range.since_s);
    const xOf = (t) => labelW + (t - range.since_s) * scale;
    const cellW = Math.max(1, stepS * scale);
    const canvas = h("canvas", { width: Math.round(width * ratio),
      height: Math.round(height * ratio), style: `width:${width}px;height:${height}px` });
    const ctx = canvas.getContext("2d");
    ctx.scale(ratio, ratio);
    ctx.font = '12px "Liberation Sans", sans-serif';
    ctx.textBaseline = "middle";
    let cells = 0;
    map.rows.forEach((row, r) => {
      const y = r * cellH;
      const label = row.kind === "prediction" ? "score (prediction)" : row.feature;
      ctx.fillStyle = row.kind === "prediction" ? "#1d4ed8" : "#1f2933";
      ctx.fillText(label, 4, y + cellH / 2, labelW - 8);
      row.cells.forEach((cell, c) => {
        if (!cell || cell.value === null) return;
        cells += 1;
        const x = xOf(windows[c]);
        ctx.fillStyle = heat(cell.value, cell.threshold);
        ctx.fillRect(x, y + 1, Math.max(1, cellW - 1), cellH - 2);
        if (cell.alert) {
          ctx.strokeStyle = "#7f1d1d";
          ctx.lineWidth = 2;
          ctx.strokeRect(x + 1, y + 2, Math.max(1, cellW - 3), cellH - 4);
        }
      });
    });
    if (axis) {
      ctx.fillStyle = "#6b7785";
      ctx.textBaseline = "top";
      const span = range.until_s - range.since_s;
      const tick = [10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600]
        .find((t) => t * scale >= 90) || 43200;
      for (let t = Math.ceil(range.since_s / tick) * tick; t < range.since_s + span; t += tick) {
        const x = xOf(t);
        ctx.fillRect(x, map.rows.length * cellH, 1, 4);
        ctx.fillText(clock(t * 1000), x + 2, map.rows.length * cellH + 5);
      }
    }
    canvas.addEventListener("mousemove", (event) => {
      const box = canvas.getBoundingClientRect();
      const t = range.since_s + (event.clientX - box.left - labelW) / scale;
      const c = windows.findIndex((start) => t >= start && t < start + stepS);
      const row = map.rows[Math.floor((event.clientY - box.top) / cellH)];
      const cell = row && c >= 0 ? row.cells[c] : null;
      if (!cell) {
        tooltip.hidden = true;
        return;
      }
      tooltip.textContent = [
        `${row.feature}  v${map.version} ${map.route}`,
        cell.windows > 1
          ? `${cell.windows} windows of ${drift.window_s}s from ${clock(windows[c] * 1000)}`
          : `window ${clock(windows[c] * 1000)} + ${drift.window_s}s`,
        `psi ${number(cell.value)} (threshold ${number(cell.threshold)})`,
        `${cell.method} ${number(cell.checked)}` +
          (cell.alert ? `  ALERT in ${cell.alerts} of ${cell.windows}` : ""),
        `${cell.samples} samples`,
      ].join("\n");
      tooltip.style.left = `${event.clientX + 12}px`;
      tooltip.style.top = `${event.clientY + 12}px`;
      tooltip.hidden = false;
    });
    canvas.addEventListener("mouseleave", () => { tooltip.hidden = true; });
    return { canvas, cells };
  }

  function renderDrift(el, drift, range) {
    const tooltip = document.getElementById("tooltip");
    if (!drift.columns.length || !drift.maps.length) {
      empty(el, "No drift windows of this model in this range (the monitor's analyzer writes " +
        "them for versions with a reference profile).");
      return;
    }
    const width = chartWidth(el);
    let cells = 0;
    const parts = drift.maps.map((map, i) => {
      const axis = i === drift.maps.length - 1;
      const drawn = heatmap(map, drift, range, width, tooltip, axis);
      cells += drawn.cells;
      let alerts = 0;
      for (const row of map.rows) alerts += row.cells.filter((c) => c && c.alert).length;
      return h("div", { class: "heatmap", "data-version": map.version, "data-route": map.route },
        h("h3", {}, `v${map.version} ${map.route} · ${map.rows.length} columns · ` +
          `${alerts} flagged cell${alerts === 1 ? "" : "s"}`),
        drawn.canvas);
    });
    const ramp = h("div", { class: "ramp", style: "background:linear-gradient(to right," +
      RAMP.map(([x, c]) => `rgb(${c.join(",")}) ${(x / 5) * 100}%`).join(",") + ")" });
    const scale = h("div", { class: "scale" }, "PSI / threshold: 0", ramp, "5+ (amber: at the " +
      "threshold, 0.1 by default)");
    el.replaceChildren(...parts, scale);
    mark(el, cells ? "ready" : "empty", cells);
  }

  // -- timeline --------------------------------------------------------------------------------

  const SYMBOL = { pass: "✓", fail: "✗", insufficient: "…", skipped: "–", info: "" };

  function evidenceChips(evidence) {
    return h("div", { class: "chips" }, evidence.map((e) => h("span", {
      class: `chip ${e.status}`,
      title: `${e.name}: ${e.status}`,
    }, `${e.name} ${number(e.value)}`,
    e.threshold !== null ? ` · limit ${number(e.threshold)}` : "",
    e.samples ? ` · n=${e.samples}` : "",
    SYMBOL[e.status] ? ` ${SYMBOL[e.status]}` : "")));
  }

  function decisionItem(d) {
    const weights = Object.entries(d.weights).map(([v, w]) => `v${v} ${Math.round(w * 100)}%`)
      .join(" · ");
    const time = h("time", { datetime: new Date(d.at_ms).toISOString() }, clock(d.at_ms));
    if (d.action === "wait") {
      // Waits repeat the step's progress; their numbers are in the tooltip.
      const numbers = d.evidence.map((e) => `${e.name} ${number(e.value)} (n=${e.samples}, ` +
        `${e.status})`).join("\n");
      return h("li", { class: "decision wait", "data-action": d.action, title: numbers }, time,
        h("div", {}, h("span", { class: "badge quiet" }, "wait"), " ",
          h("span", { class: "states" }, d.state_after),
          h("span", { class: "note" }, d.reason)));
    }
    return h("li", { class: `decision ${d.action}`, "data-action": d.action }, time,
      h("div", {},
        h("div", { class: "head" },
          h("span", { class: `badge ${ACTIONS[d.action] || ""}` }, d.action),
          h("span", { class: "states" }, `${d.state_before} → ${d.state_after}`),
          h("span", { class: "meta" }, `${weights} · rev ${d.revision}`)),
        h("div", { class: "who" }, `by ${d.actor} · candidate v${d.candidate} · rollout ` +
          d.rollout_id.slice(0, 8)),
        d.reason ? h("div", { class: "note" }, d.reason) : null,
        d.evidence.length ? evidenceChips(d.evidence) : null));
  }

  function retrainItem(run) {
    const status = run.status === "failed" ? "bad" : run.status === "skipped" ? "quiet" : "good";
    const alert = [run.alert_kind, run.alert_metric, run.feature].filter(Boolean).join(" · ");
    return h("li", { class: "retrain", "data-run": run.run_id },
      h("time", { datetime: new Date(run.updated_ms).toISOString() }, clock(run.updated_ms)),
      h("div", {},
        h("div", { class: "head" },
          h("span", { class: "badge retrain" }, "retrain"),
          h("span", { class: "states" }, `run ${run.run_id.slice(0, 12)}`),
          h("span", { class: `badge ${status}` }, run.status),
          h("span", { class: "meta" }, alert ? `alert ${alert}` : "no alert recorded"),
          run.version ? h("span", { class: "who" }, `new version v${run.version}`) : null,
          run.rollout_id ? h("span", { class: "who" }, `rollout ${run.rollout_id.slice(0, 8)}`)
            : null),
        h("ol", { class: "steps" }, run.steps.map((s) => h("li", {
          class: s.status === "failed" ? "failed" : "ok", "data-step": s.step },
        `${clock(s.at_ms)} ${s.step} (${s.status})`,
        s.version ? ` v${s.version}` : "",
        s.detail ? ` — ${s.detail}` : "")))));
  }

  function renderTimeline(el, timeline) {
    const items = [
      ...timeline.decisions.map((d) => ({ at: d.at_ms, node: () => decisionItem(d) })),
      ...timeline.retrains.map((r) => ({ at: r.updated_ms, node: () => retrainItem(r) })),
    ].sort((a, b) => b.at - a.at);
    el.dataset.decisions = String(timeline.decisions.length);
    el.dataset.retrains = String(timeline.retrains.length);
    if (!items.length) {
      empty(el, "No rollout decisions or retrain runs in this range.");
      return;
    }
    const parts = [h("ol", { class: "timeline" }, items.map((item) => item.node()))];
    if (timeline.decisions_truncated) {
      parts.push(h("div", { class: "empty" }, "Older decisions of this range are not shown."));
    }
    if (!timeline.decisions.length) {
      parts.push(h("div", { class: "empty", "data-empty": "decisions" },
        "No rollout decisions in this range."));
    }
    if (!timeline.retrains.length) {
      parts.push(h("div", { class: "empty", "data-empty": "retrains" },
        "No retrain runs in this range."));
    }
    el.replaceChildren(...parts);
    mark(el, "ready", items.length);
  }

  // -- loading ---------------------------------------------------------------------------------

  function notice(content) {
    const box = document.getElementById("notice");
    if (!content) {
      box.hidden = true;
      box.replaceChildren();
      return;
    }
    box.replaceChildren(...[content].flat());
    box.hidden = false;
  }

  function renderAll() {
    if (!last) return;
    const { data, rollout } = last;
    const versions = [
      ...data.traffic.series.map((s) => s.version),
      ...data.latency.series.map((s) => s.version),
      ...(rollout ? Object.keys(rollout.weights) : []),
    ];
    renderRollout(document.getElementById("rollout"), rollout, versionColors(versions));
    const range = { since_s: data.since_s, until_s: data.until_s };
    renderTraffic(document.getElementById("traffic"), data.traffic, data.timeline.decisions, range);
    renderLatency(document.getElementById("latency"), data.latency, range);
    renderDrift(document.getElementById("drift"), data.drift, range);
    renderTimeline(document.getElementById("timeline"), data.timeline);
  }

  function fillModels(models, current) {
    const select = document.getElementById("model");
    const names = current && !models.includes(current) ? [current, ...models] : models;
    select.replaceChildren(...names.map((m) => h("option", { value: m }, m)));
    if (current) select.value = current;
  }

  function markRange(minutes) {
    for (const button of document.querySelectorAll("#ranges button")) {
      button.classList.toggle("active", Number(button.dataset.minutes) === minutes);
    }
  }

  function failAll(error) {
    for (const id of ["rollout", "traffic", "latency", "drift", "timeline"]) {
      const el = document.getElementById(id);
      destroyChart(el);
      el.replaceChildren(h("div", { class: "error" }, error.message));
      mark(el, "error", 0);
    }
    if (error.status === 401 || error.status === 403) {
      notice(["This controller requires an API key. Open the page as ",
        h("code", {}, `/status#key=<viewer key>`), " (the key stays in your browser and is " +
        "sent as the X-API-Key header)."]);
    } else {
      notice(`Could not load the status: ${error.message}`);
    }
  }

  async function load() {
    const mine = ++generation;
    clearTimeout(timer);
    const params = fragment();
    const minutes = Number(params.get("minutes")) || 60;
    const model = params.get("model");
    markRange(minutes);
    try {
      const listing = await getJSON(`/v1/status?minutes=${Math.max(minutes, 1440)}`);
      if (mine !== generation) return;
      fillModels(listing.models, model);
      if (!model) {
        if (listing.models.length) {
          setFragment({ model: listing.models[0] });
          return;
        }
        for (const id of ["rollout", "traffic", "latency", "drift", "timeline"]) {
          empty(document.getElementById(id), "No model has predictions or rollouts yet.");
        }
      } else {
        const path = encodeURIComponent(model);
        const [data, rollout] = await Promise.all([
          getJSON(`/v1/status/${path}?minutes=${minutes}`),
          getJSON(`/v1/rollouts/${path}`).catch((error) => {
            if (error.status === 404) return null;
            throw error;
          }),
        ]);
        if (mine !== generation) return;
        last = { data, rollout };
        renderAll();
        const missing = data.missing_tables.length
          ? ` · not created yet: ${data.missing_tables.join(", ")}` : "";
        document.getElementById("updated").textContent =
          `${model} · last ${minutes} min · updated ${clock(Date.now())}${missing}`;
      }
      notice(null);
    } catch (error) {
      if (mine !== generation) return;
      failAll(error);
    }
    timer = setTimeout(load, REFRESH_MS);
  }

  document.getElementById("model").addEventListener("change", (event) => {
    setFragment({ model: event.target.value });
  });
  for (const button of document.querySelectorAll("#ranges button")) {
    button.addEventListener("click", () => setFragment({ minutes: button.dataset.minutes }));
  }
  window.addEventListener("hashchange", load);
  let resizing = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizing);
    resizing = setTimeout(renderAll, 150);
  });
  load();
})();
