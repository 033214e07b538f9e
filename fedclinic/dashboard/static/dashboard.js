// fedclinic dashboard: polls the JSON API and fills the page. Read-only.
//
// Every string from a run (hospital names, error messages, config values) is set with
// textContent, never parsed as HTML; the Content-Security-Policy allows no inline script.
"use strict";

(function () {
  const body = document.body;
  const POLL_MS = Number(body.dataset.pollMs) || 2000;
  const IDLE_MS = 15000; // once a run has ended
  const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
    "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
  const ACTIVE = new Set(["running", "waiting"]);

  // ---------------------------------------------------------------- helpers
  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function td(value, className) {
    if (value instanceof Node) {
      const cell = el("td", null, className);
      cell.append(value);
      return cell;
    }
    return el("td", value === null || value === undefined || value === "" ? "—" : value, className);
  }

  function row(values, className) {
    const tr = el("tr", null, className);
    for (const value of values) tr.append(value instanceof HTMLTableCellElement ? value : td(value));
    return tr;
  }

  function link(href, text) {
    const a = el("a", text);
    a.href = href;
    return a;
  }

  function badge(status) {
    return el("span", status || "unknown", "badge status-" + String(status || "unknown").replace(/[^a-z-]/g, ""));
  }

  function when(t) {
    return t === null || t === undefined ? "—" : new Date(t * 1000).toLocaleString();
  }

  function ago(t) {
    if (t === null || t === undefined) return "—";
    const seconds = Math.max(0, Date.now() / 1000 - t);
    if (seconds < 90) return Math.round(seconds) + " s ago";
    if (seconds < 5400) return Math.round(seconds / 60) + " min ago";
    return when(t);
  }

  function seconds(s) {
    if (s === null || s === undefined) return "—";
    return s < 60 ? s.toFixed(1) + " s" : (s / 60).toFixed(1) + " min";
  }

  function num(v, digits) {
    return v === null || v === undefined ? "—" : Number(v).toFixed(digits === undefined ? 3 : digits);
  }

  function signed(v) {
    return v === null || v === undefined ? "—" : (v >= 0 ? "+" : "−") + Math.abs(v).toFixed(3);
  }

  function percent(v) {
    return v === null || v === undefined ? "—" : (100 * v).toFixed(1) + " %";
  }

  function fill(id, rows) {
    document.querySelector("#" + id + " tbody").replaceChildren(...rows);
  }

  function setLive(text, ok) {
    const live = document.getElementById("live");
    live.textContent = text;
    live.classList.toggle("bad", !ok);
  }

  // Poll url; render(data) on every new version (ETag), again every tick for "ago" times.
  function poll(url, render, missing) {
    let etag = null;
    let data = null;
    async function tick() {
      let delay = POLL_MS;
      try {
        const response = await fetch(url, {
          headers: etag ? { "If-None-Match": etag } : {},
          credentials: "same-origin",
          cache: "no-cache",
        });
        if (response.status === 200) {
          etag = response.headers.get("ETag");
          data = await response.json();
          body.dataset.updates = String(Number(body.dataset.updates || 0) + 1);
          setLive("live · updated " + new Date().toLocaleTimeString(), true);
        } else if (response.status === 304) {
          setLive("live · checked " + new Date().toLocaleTimeString(), true);
        } else if (response.status === 404 && missing) {
          missing();
          setLive("waiting for the run · " + new Date().toLocaleTimeString(), true);
        } else if (response.status === 401 || response.status === 403) {
          setLive("access denied: open this dashboard with ?token=…", false);
          delay = IDLE_MS;
        } else {
          setLive("the dashboard answered " + response.status, false);
        }
      } catch (error) {
        setLive("the dashboard is unreachable; trying again", false);
      }
      if (data) {
        render(data);
        if (!data.active) delay = Math.max(delay, IDLE_MS);
      }
      setTimeout(tick, delay);
    }
    tick();
  }

  // ---------------------------------------------------------------- runs page
  function renderRuns(data) {
    const runs = data.runs;
    data.active = runs.some((r) => ACTIVE.has(r.status));
    document.getElementById("no-runs").hidden = runs.length > 0;
    fill("runs", runs.map((r) => row([
      td(link("/runs/" + encodeURIComponent(r.id), r.id)),
      r.algorithm, r.task, td(badge(r.status)),
      (r.completed_rounds || 0) + " / " + (r.rounds === null ? "?" : r.rounds),
      r.hospitals, when(r.started), ago(r.updated),
      r.client_average === null ? "—" : num(r.client_average) + " " + r.metric,
    ])));
  }

  // ---------------------------------------------------------------- run page
  const chart = { plot: null, key: null, metrics: null };

  function renderFacts(run) {
    const status = document.getElementById("status");
    status.replaceWith(Object.assign(badge(run.status), { id: "status" }));
    document.getElementById("status-detail").textContent = run.status_detail || "";
    const facts = [
      ["algorithm", run.algorithm], ["task", run.task],
      ["round", (run.completed_rounds || 0) + " of " + (run.rounds === null ? "?" : run.rounds) + " completed"],
      ["started", when(run.started)], ["last change", ago(run.updated)],
      ["selected round", run.selection.round === null ? "—" :
        run.selection.round + " (" + run.selection.metric + ", " + run.selection.note + ")"],
      ["config SHA-256", run.config_sha256],
      ["code", run.code ? run.code.fedclinic + " @ " + String(run.code.git_commit).slice(0, 12) : null],
    ];
    const list = document.getElementById("facts");
    const items = [];
    for (const [key, value] of facts) {
      items.push(el("dt", key), el("dd", value === null || value === undefined ? "—" : value));
    }
    list.replaceChildren(...items);
  }

  function renderHospitals(run) {
    fill("hospitals", run.hospitals.map((h) => {
      const where = run.rounds !== null && h.outcome_round > run.rounds ? "final evaluation" :
        "round " + h.outcome_round;
      const outcome = h.last_outcome ? h.last_outcome + " (" + where + ")" : null;
      const problem = h.last_problem ? "round " + h.last_problem.round + ": " + h.last_problem.reason : null;
      return row([
        td(h.name, "hospital-name"), h.node_id,
        h.superlink_status ? td(badge(h.superlink_status)) : (run.superlink.configured ? "not listed" : "—"),
        ago(h.last_seen), outcome,
        h.num_train === null ? "—" : h.num_train + " (" + percent(h.share) + ")",
        h.device, h.data_source, h.refusals, h.failures, td(problem, "reason"),
      ], "hospital");
    }));
    const superlink = run.superlink;
    let text = "Node status: the SuperLink's node list is not configured (fedclinic dashboard --superlink); " +
      "'last seen' is the last reply the coordinator recorded.";
    if (superlink.configured) {
      const unknown = superlink.nodes.filter((n) => n.hospital === null).map((n) => n.node_id + " " + n.status);
      text = "Node status from the SuperLink, checked " + ago(superlink.checked) + "." +
        (superlink.error ? " " + superlink.error : "") +
        (unknown.length ? " Nodes not in this run: " + unknown.join(", ") + "." : "");
    }
    document.getElementById("superlink").textContent = text;
  }

  function renderTimeline(run) {
    let longest = 0;
    for (const entry of run.timeline) {
      for (const cell of Object.values(entry.hospitals)) {
        longest = Math.max(longest, (cell.train_seconds || 0) + (cell.eval_seconds || 0));
      }
    }
    const rows = run.timeline.slice().reverse().map((entry) => {
      const list = el("div", null, "round-hospitals");
      for (const [name, cell] of Object.entries(entry.hospitals).sort()) {
        const item = el("div", null, "round-hospital outcome-" + String(cell.outcome || "none"));
        const total = (cell.train_seconds || 0) + (cell.eval_seconds || 0);
        item.append(el("span", name, "name"));
        const bar = el("span", null, "bar");
        bar.style.width = (longest > 0 ? Math.max(2, (100 * total) / longest) : 0) + "px";
        item.append(bar);
        item.append(el("span", seconds(cell.train_seconds) + " train + " + seconds(cell.eval_seconds) +
          " eval" + (cell.outcome ? " · " + cell.outcome : ""), "muted"));
        list.append(item);
      }
      const duration = entry.seconds !== null ? seconds(entry.seconds) :
        entry.state === "running" && entry.started ? seconds(Date.now() / 1000 - entry.started) + " so far" : null;
      return row([entry.final ? "final evaluation" : entry.round, td(badge(entry.state)),
        when(entry.started), duration, td(list)], "round");
    });
    fill("timeline", rows);
  }

  function renderChart(curves, headline) {
    const select = document.getElementById("metric");
    const names = JSON.stringify(curves.metrics);
    if (chart.metrics !== names) {
      const previous = select.value;
      select.replaceChildren(...curves.metrics.map((m) => Object.assign(el("option", m), { value: m })));
      select.value = curves.metrics.includes(previous) ? previous : (headline || curves.metrics[0] || "");
      chart.metrics = names;
    }
    const metric = select.value;
    const container = document.getElementById("chart");
    const key = JSON.stringify([metric, curves.x, curves.hospitals, curves.values[metric] || null]);
    if (key === chart.key) return;
    chart.key = key;
    if (!metric || curves.x.length === 0) {
      if (chart.plot) chart.plot.destroy();
      chart.plot = null;
      container.replaceChildren(el("p", "No evaluations yet.", "muted"));
      return;
    }
    const data = [curves.x, ...curves.hospitals.map((h) => curves.values[metric][h])];
    const labels = JSON.stringify(curves.hospitals);
    if (chart.plot && chart.labels === labels && chart.metric === metric) {
      chart.plot.setData(data);
      return;
    }
    if (chart.plot) chart.plot.destroy();
    container.replaceChildren();
    chart.labels = labels;
    chart.metric = metric;
    chart.plot = new uPlot({
      width: Math.max(320, container.clientWidth || 800),
      height: 320,
      // whole rounds from 0; one round so far still gets a visible axis
      scales: { x: { time: false, range: (u, min, max) => [Math.min(0, min), Math.max(max, 1)] } },
      axes: [{ label: "model round", incrs: [1, 2, 5, 10, 20, 50, 100] }, { label: metric }],
      series: [{ label: "model round" }, ...curves.hospitals.map((h, i) => ({
        label: h, stroke: PALETTE[i % PALETTE.length], width: 2, spanGaps: true,
        points: { show: true, size: 6 },
      }))],
    }, data, container);
  }

  function renderEvents(run) {
    document.getElementById("no-events").hidden = run.events.length > 0;
    fill("events", run.events.map((e) => row([e.round === null ? "—" : e.round, when(e.time),
      td(e.hospital, "hospital-name"), e.what, td(e.reason, "reason")], "event")));
  }

  function renderEquity(run) {
    const equity = run.equity;
    const summary = document.getElementById("equity-summary");
    if (!equity.metric) {
      summary.textContent = "No evaluations yet.";
      fill("equity", []);
      document.getElementById("equity-note").textContent = "";
      return;
    }
    const direction = equity.lower_is_better ? "lower is better" : "higher is better";
    let text = "On " + equity.metric + " (" + direction + ", the selected model's test split once the run is done): ";
    text += equity.worst ? "worst hospital " + equity.worst.hospital + " at " + num(equity.worst.value) + "." : "no scores yet.";
    if (equity.small_gain !== null) {
      text += " Small hospitals (under " + percent(equity.small_share) + " of the training samples) gain " +
        signed(equity.small_gain) + " over training alone (local-only run " + equity.baseline + ").";
    }
    summary.textContent = text;
    fill("equity", equity.hospitals.map((h) => row([
      td(h.hospital + (h.small ? " (small)" : ""), "hospital-name"), percent(h.share), num(h.value),
      num(h.local_only), signed(h.gain),
    ], h.small ? "small" : "")));
    const note = document.getElementById("equity-note");
    note.replaceChildren();
    if (equity.baseline) {
      note.append("Baseline: ", link("/runs/" + encodeURIComponent(equity.baseline), equity.baseline),
        " (local-only, same config). ");
    }
    if (equity.note) note.append(equity.note);
  }

  function renderModels(run) {
    const models = run.models.global;
    document.getElementById("no-models").hidden = models.length > 0;
    const base = "/runs/" + encodeURIComponent(run.id) + "/models/";
    fill("models", models.map((m) => row([
      m.role === "selected" ? "selected (round " + run.selection.round + ")" : "final",
      m.present ? td(link(base + encodeURIComponent(m.name), m.name)) : m.name + " (missing)",
      td(m.sha256, "hash"), td(m.content_sha256, "hash"),
      m.size === null ? "—" : (m.size / 1e6).toFixed(2) + " MB",
      m.verified ? "file matches its SHA-256" : (m.present ? "MISMATCH" : "—"),
    ])));
    const site = document.getElementById("site-models");
    site.hidden = run.models.site.length === 0;
    fill("site-models", run.models.site.map((m) => row([td(m.hospital, "hospital-name"), m.model,
      td(m.sha256, "hash")])));
  }

  function renderConfig(run) {
    const entries = Object.entries(run.config || {}).sort();
    fill("config", entries.map(([key, value]) => row([key, JSON.stringify(value)])));
  }

  function renderRun(run) {
    run.active = ACTIVE.has(run.status);
    document.title = run.id + " · " + run.status + " · fedclinic dashboard";
    renderFacts(run);
    renderHospitals(run);
    renderChart(run.curves, run.headline_metric);
    renderTimeline(run);
    renderEvents(run);
    renderEquity(run);
    renderModels(run);
    renderConfig(run);
    body.dataset.status = run.status;
  }

  // ---------------------------------------------------------------- start
  if (body.dataset.page === "runs") {
    poll("/api/runs", renderRuns);
  } else if (body.dataset.page === "run") {
    const id = body.dataset.runId;
    let last = null;
    document.getElementById("metric").addEventListener("change", () => {
      if (last) renderChart(last.curves, last.headline_metric);
    });
    poll("/api/runs/" + encodeURIComponent(id), (run) => {
      last = run;
      renderRun(run);
    }, () => {
      document.getElementById("status-detail").textContent =
        "No run directory of this name yet; this page shows it once the coordinator starts writing.";
    });
  }
})();
