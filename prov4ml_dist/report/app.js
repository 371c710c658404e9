/* The report page: reads the JSON model embedded in the page and draws each view the first time
   it is shown (uPlot needs a visible width; drawing lazily also keeps opening fast).
   Charts: uPlot. Lineage graph: cytoscape. Heat map: a canvas (one rectangle per cell). */
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("report-data").textContent);
  const $ = (sel, root) => (root || document).querySelector(sel);
  const el = (tag, attrs, ...kids) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
    }
    for (const k of kids) if (k != null) e.append(k);
    return e;
  };
  const PALETTE = ["#d6542f", "#2e9d55", "#8e44ad", "#c49a00", "#1aa3a3", "#d63f8c", "#6b7a8f",
                   "#7cb342", "#ef6c00", "#2f6fd6"];

  // -- formatting ----------------------------------------------------------------------------
  const num = (v) => v == null || !isFinite(v) ? "-" :
    (Math.abs(v) >= 1e5 || (Math.abs(v) < 1e-3 && v !== 0)) ? v.toExponential(3) : (+v.toPrecision(5)).toString();
  const bytes = (v) => {
    if (v == null) return "-";
    const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0;
    while (Math.abs(v) >= 1024 && i < u.length - 1) { v /= 1024; i++; }
    return (i ? v.toFixed(1) : v) + " " + u[i];
  };
  const dur = (s) => {
    if (s == null) return "-";
    if (s < 1) return (s * 1000).toPrecision(3) + " ms";
    if (s < 120) return s.toFixed(1) + " s";
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = Math.round(s % 60);
    return (h ? h + " h " : "") + m + " min " + (h ? "" : r + " s");
  };
  const when = (t) => t == null ? "-" : new Date(t * 1000).toISOString().replace("T", " ").replace(/\.\d+Z/, " UTC");
  const joules = (j) => j == null ? "-" : j >= 3.6e6 ? (j / 3.6e6).toFixed(3) + " kWh" :
    j >= 1e3 ? (j / 1e3).toFixed(2) + " kJ" : j.toFixed(1) + " J";
  const valueFormat = (unit) => (unit === "B" || unit === "B/s") ? (v) => v == null ? "-" : bytes(v) + unit.slice(1) :
    (v) => v == null ? "-" : num(v) + (unit && unit !== "1" ? " " + unit : "");

  const tip = el("div", {class: "tip"});
  document.body.append(tip);
  const showTip = (ev, text) => {
    tip.textContent = text; tip.style.display = "block";
    tip.style.left = Math.min(ev.clientX + 14, window.innerWidth - 300) + "px"; tip.style.top = (ev.clientY + 14) + "px";
  };
  const hideTip = () => { tip.style.display = "none"; };

  function table(head, rows, opts) {
    const o = opts || {};
    const t = el("table", {}, el("thead", {}, el("tr", {}, ...head.map((h, i) =>
      el("th", {class: (o.numeric || []).includes(i) ? "num" : "", text: h})))));
    const body = el("tbody");
    rows.forEach((r, n) => {
      const tr = el("tr", {class: o.rowClass ? o.rowClass(n) : ""});
      r.forEach((c, i) => tr.append(el("td", {class: ((o.numeric || []).includes(i) ? "num " : "") +
        ((o.mono || []).includes(i) ? "mono" : ""), text: c == null ? "-" : String(c)})));
      body.append(tr);
    });
    t.append(body);
    return el("div", {class: "scroll"}, t);
  }
  const card = (k, v, small) => el("div", {class: "card"}, el("div", {class: "k", text: k}),
    el("div", {class: "v" + (small ? " small" : ""), text: v}));
  const more = (shown, total, what) => total > shown ?
    el("p", {class: "note", text: `${shown} of ${total} ${what} shown; all of them are in merged.h5.`}) : null;

  // -- views ----------------------------------------------------------------------------------
  const views = {
    overview: ["Run at a glance", drawOverview], metrics: ["Metrics", drawMetrics],
    stragglers: ["Stragglers", drawStragglers], system: ["System, GPU & energy", drawSystem],
    params: ["Params", drawParams], artifacts: ["Artifacts & lineage", drawArtifacts],
  };
  const drawn = {};
  window.__charts = [];
  const nav = $("nav"), main = $("main");
  for (const [id, [title]] of Object.entries(views)) {
    nav.append(el("button", {"data-view": id, text: title}));
    main.append(el("section", {class: "view", id: "view-" + id}));
  }
  function show(id) {
    if (!views[id]) id = "overview";
    for (const b of nav.children) b.classList.toggle("active", b.dataset.view === id);
    for (const s of main.children) s.classList.toggle("active", s.id === "view-" + id);
    if (!drawn[id]) { drawn[id] = true; views[id][1]($("#view-" + id)); }
    document.body.dataset.view = id;
  }
  nav.addEventListener("click", (ev) => {
    const id = ev.target.dataset && ev.target.dataset.view;
    if (id) { history.replaceState(null, "", "#" + id); show(id); }
  });
  window.addEventListener("hashchange", () => show(location.hash.slice(1)));

  const O = D.overview;
  $("header h1").textContent = `${O.experiment} / ${O.run_id}`;
  $("header .sub").textContent = `${O.directory} · started ${when(O.start)} · ${O.world_size} ranks`;

  function drawOverview(root) {
    const st = O.states;
    const program = O.program;
    root.append(el("div", {class: "cards"},
      card("Ranks", `${O.ranks.length} of ${O.world_size}`),
      card("Status", `${st.ok || 0} ok · ${st.incomplete || 0} incomplete · ${st.missing || 0} missing`, true),
      card("Nodes", String(O.node_count)), card("GPUs", String(O.gpus)),
      card("Duration", dur(O.duration)), card("Launcher", O.launcher || "-"),
      card("Energy to solution", D.energy.job.total_joules ? joules(D.energy.job.total_joules) : "not measured", true),
      card("Problems", String(O.problem_count))));
    const grid = el("div", {class: "ranks" + (O.ranks.length > 256 ? " many" : ""), id: "rank-grid"});
    for (const [rank, attempt, state, host, why] of O.ranks) {
      const cell = el("span", {class: state});
      cell.addEventListener("mousemove", (ev) => showTip(ev, `rank ${rank} (attempt ${attempt}) on ${host || "?"}\n${state}: ${why}`));
      cell.addEventListener("mouseleave", hideTip);
      grid.append(cell);
    }
    root.append(el("h2", {text: "Status of every rank"}), el("div", {class: "panel"}, grid,
      el("div", {class: "legend-row"}, ...["ok", "incomplete", "missing"].map((s) =>
        el("span", {}, el("i", {style: `background: var(--${s})`}), `${s} (${st[s] || 0})`))),
      el("p", {class: "note", text: "ok: the rank ended its run; incomplete: no end record, merged up to its last " +
        "flush (a crash or a kill); missing: no shard. Hover a square for the rank."})));
    const bad = O.ranks.filter((r) => r[2] !== "ok");
    if (bad.length) root.append(table(["rank", "attempt", "status", "node", "why"],
      bad.slice(0, 200).map((r) => [r[0], r[1], r[2], r[3], r[4]]), {numeric: [0, 1]}));
    const gitState = program.git_dirty == null ? "" : program.git_dirty ? " (dirty: uncommitted changes)" : " (clean)";
    root.append(el("div", {class: "grid2"},
      el("div", {class: "panel"}, el("h3", {text: "Program"}), table(["", ""], [
        ["script", program.script], ["command line", (program.argv || []).join(" ")], ["directory", program.cwd],
        ["git commit", (program.git_commit || "-") + gitState], ["git branch", program.git_branch],
        ["script sha256", program.sha256]], {mono: [1]})),
      el("div", {class: "panel"}, el("h3", {text: "Software"}), Object.keys(O.software).length ?
        table(["", ""], Object.entries(O.software), {mono: [1]}) : el("p", {class: "note", text: "not recorded"}))));
    const slurm = Object.entries(O.slurm);
    root.append(el("div", {class: "grid2"},
      el("div", {class: "panel"}, el("h3", {text: "Nodes"}), table(["node", "ranks", "count", "GPUs"],
        O.nodes.map((n) => [n.host, n.ranks, n.count, n.gpus]), {numeric: [2, 3]}), more(O.nodes.length, O.node_count, "nodes")),
      el("div", {class: "panel"}, el("h3", {text: "Slurm allocation"}), slurm.length ? table(["", ""], slurm, {mono: [1]}) :
        el("p", {class: "note", text: "not a Slurm job (launcher: " + (O.launcher || "-") + ")"}))));
    const problems = el("div", {class: "panel"}, el("h3", {text: `Problems (${O.problem_count})`}));
    if (O.problem_count) problems.append(el("ul", {class: "problems"}, ...O.problems.map((p) => el("li", {text: p}))),
      more(O.problems.length, O.problem_count, "problems") || "");
    else problems.append(el("p", {class: "note", text: "the merge reported none"}));
    if (O.absent_sensors.length) problems.append(el("p", {class: "note", text: "Not measured: " + O.absent_sensors.join("; ")}));
    const m = O.merge || {};
    problems.append(el("p", {class: "note", text: `merged ${m.merged_at ? when(m.merged_at) : "-"} by prov4ml-dist ` +
      `${m.version || "?"}${O.prov ? "" : " · no prov.json next to merged.h5: no lineage graph"}`}));
    root.append(problems);
  }

  // -- charts --------------------------------------------------------------------------------
  function chartWidth(root) { return Math.max(420, Math.min(1340, root.clientWidth - 30)); }

  /* One chart: the cross-rank band (min-max filled, mean line) and the stored rank lines, hidden
     when there are many (click a legend entry, or pick a rank, to show it). */
  function seriesChart(root, c, title) {
    const box = el("div", {class: "chart"});
    const fmt = valueFormat(c.unit);
    const meta = c.meta || `${c.ranks} rank(s) · ${c.series} series · ${c.points.toLocaleString()} points` +
      (c.band ? ` · band over ${c.band.steps.toLocaleString()} steps` : "") +
      (c.nonfinite ? ` · ${c.nonfinite} NaN/inf (gaps)` : "") +
      (c.omitted_lines ? ` · lines of ${c.lines.length} ranks stored (${c.omitted_lines} more in merged.h5)` : "");
    box.append(el("div", {class: "title"}, el("b", {text: title}), el("span", {class: "meta", text: meta})));
    root.append(box);
    const tables = [], series = [{label: c.by_time ? "time [s]" : "step", value: (u, v) => v == null ? "-" : num(v)}];
    const bands = [];
    if (c.band) {
      const names = c.band.labels || ["min", "mean across ranks", "max"];
      tables.push([c.band.x, c.band.min, c.band.mean, c.band.max]);
      series.push({label: names[0], stroke: "rgba(47,111,214,0.35)", width: 1, value: (u, v) => fmt(v), spanGaps: true},
        {label: names[1], stroke: "#1f4fa8", width: 2, value: (u, v) => fmt(v), spanGaps: true},
        {label: names[2], stroke: "rgba(47,111,214,0.35)", width: 1, value: (u, v) => fmt(v), spanGaps: true});
      bands.push({series: [3, 1], fill: "rgba(47,111,214,0.16)"});
    }
    const hideLines = !!c.band && c.lines.length > 8;
    c.lines.forEach((l, i) => {
      tables.push([l.x, l.y]);
      series.push({label: l.label + (l.incomplete ? " (incomplete)" : ""), stroke: PALETTE[i % PALETTE.length],
        width: 1.3, dash: l.incomplete ? [6, 3] : undefined, show: !hideLines, spanGaps: true,
        points: {show: l.x.length < 30}, value: (u, v) => fmt(v)});
    });
    if (!tables.length) { box.append(el("p", {class: "note", text: "no points"})); return; }
    const data = tables.length === 1 ? tables[0] : uPlot.join(tables);
    if (hideLines) {
      const pick = el("select", {}, el("option", {value: "", text: `show a rank's line (${c.lines.length} stored)…`}),
        ...c.lines.map((l, i) => el("option", {value: String(i), text: l.label})));
      box.append(el("div", {class: "controls"}, pick, el("span", {class: "note",
        text: "or click legend entries; drag to zoom, double-click to reset"})));
      pick.addEventListener("change", () => {
        if (pick.value !== "") { plot.setSeries(1 + (c.band ? 3 : 0) + (+pick.value), {show: true}); pick.value = ""; }
      });
    }
    const plot = new uPlot({
      width: c.half ? Math.floor(chartWidth(root) / 2) - 30 : chartWidth(root), height: c.half ? 220 : 300,
      series, bands,
      scales: {x: {time: false}}, legend: {live: true},
      axes: [{label: c.by_time ? "time since the run started [s]" : "step",
              values: c.by_time ? undefined : (u, ticks) => ticks.map((t) => Number.isInteger(t) ? t : "")},
             {label: c.unit && c.unit !== "1" ? c.unit : "", values: (u, ticks) => ticks.map((t) => fmt(t)),
              size: (u, values) => values ? 30 + 7 * Math.max(...values.map((v) => String(v).length)) : 50}],
      cursor: {drag: {x: true, y: false}},
    }, data, box);
    box.dataset.series = String(series.length - 1);
    window.__charts.push(plot);  // every chart drawn, for the browser console (and the tests)
    return plot;
  }

  const chartTitle = (c) => c.by_time ? c.key : `${c.key} (${c.context})` + (c.attempt > 0 ? ` attempt ${c.attempt}` : "");

  function drawMetrics(root) {
    if (!D.metrics.length) { root.append(el("p", {class: "note", text: "no metric points in this run"})); return; }
    root.append(el("p", {class: "note", text: "Per metric and context: the band is the min–max across ranks at " +
      "each step, the dark line their mean. Hover for values, drag to zoom, double-click to reset. " + boundText()}));
    const filter = el("input", {type: "search", placeholder: "filter metrics…"});
    root.append(el("div", {class: "controls"}, filter));
    const boxes = D.metrics.map((c) => { seriesChart(root, c, chartTitle(c)); return [c, root.lastElementChild]; });
    filter.addEventListener("input", () => boxes.forEach(([c, b]) => {
      b.style.display = chartTitle(c).toLowerCase().includes(filter.value.toLowerCase()) ? "" : "none";
    }));
  }

  function drawSystem(root) {
    const energy = D.energy;
    root.append(el("h2", {text: "Energy"}));
    const ej = energy.job;
    root.append(el("div", {class: "cards"}, card("Energy to solution", ej.total_joules ? joules(ej.total_joules) : "not measured"),
      card("GPUs", ej.gpu_joules ? joules(ej.gpu_joules) : "-"), card("CPU packages, DRAM (RAPL)", ej.rapl_joules ? joules(ej.rapl_joules) : "-")));
    if (!ej.total_joules && D.absent.energy) root.append(el("p", {class: "note", text: "No energy counter: " + D.absent.energy}));
    const fields = ["gpu_joules", "rapl_joules", "total_joules"];
    if (energy.nodes.length) root.append(el("div", {class: "panel"}, el("h3", {text: "Per node"}),
      table(["node", "GPUs", "RAPL", "total"], energy.nodes.map((n) => [n.name, ...fields.map((f) => joules(n[f]))]),
        {numeric: [1, 2, 3]})));
    const perRank = energy.ranks.map((r) => r.total_joules || (r.gpu_joules || 0) + (r.rapl_joules || 0));
    if (perRank.some((j) => j > 0)) {
      const box = el("div", {class: "chart"}, el("div", {class: "title"}, el("b", {text: "Energy per rank"}),
        el("span", {class: "meta", text: "GPUs + RAPL measured by each rank"})));
      root.append(box);
      const x = energy.ranks.map((r) => +r.name);
      new uPlot({width: chartWidth(root), height: 240,
        scales: {x: {time: false, range: (u, lo, hi) => [lo - 0.6, hi + 0.6]}, y: {range: (u, lo, hi) => [0, hi * 1.05]}},
        axes: [{label: "rank", values: (u, ticks) => ticks.map((t) => Number.isInteger(t) ? t : "")},
               {label: "kJ", size: 60}],
        series: [{label: "rank"}, {label: "energy [kJ]", stroke: "#d6542f", fill: "rgba(214,84,47,0.55)",
          paths: uPlot.paths.bars({size: [0.7, 60]}), points: {show: false}}]},
        [x, perRank.map((j) => j / 1e3)], box);
    }
    const scopes = [["gpu", "GPU (per device)"], ["process", "Processes (per rank)"], ["node", "Nodes (one sampler per node)"]];
    const seen = new Set();
    for (const [scope, title] of scopes) {
      const charts = D.system.filter((c) => c.scope === scope || (scope === "node" && !["gpu", "process"].includes(c.scope)));
      if (scope === "gpu" && !charts.length) {
        root.append(el("h2", {text: title}), el("p", {class: "note", text: "No GPU series in this run" +
          (D.absent.gpu ? ": " + D.absent.gpu : "")}));
      }
      if (!charts.length) continue;
      const grid = el("div", {class: "grid2"});
      root.append(el("h2", {text: title}), grid);
      for (const c of charts) if (!seen.has(c)) { seen.add(c); seriesChart(grid, {...c, half: true}, c.key); }
    }
  }

  function drawStragglers(root) {
    const S = D.stragglers;
    root.append(el("p", {class: "note", text: "A step's skew is the time between the first and the last rank " +
      "logging it; the slowest rank is the one logging it last."}));
    if (!S.groups.length) { root.append(el("p", {class: "note", text: "no step was logged by two ranks: nothing to compare"})); return; }
    root.append(el("div", {class: "grid2"},
      el("div", {class: "panel"}, el("h3", {text: "Slowest ranks (steps at which each was last, all metrics)"}),
        table(["rank", "steps slowest"], S.slowest, {numeric: [0, 1]})),
      el("div", {class: "panel"}, el("h3", {text: "Per metric"}), table(["metric", "context", "steps", "slowest rank",
        "its steps", "mean skew", "max skew", "@step"], S.groups.map((g) => [g.key, g.context, g.steps, g.slowest, g.share,
        dur(g.skew_mean), dur(g.skew_max), g.skew_max_step]), {numeric: [2, 3, 4, 5, 6, 7]}))));
    if (S.heat) drawHeat(root, S.heat);
    if (S.skew) {
      seriesChart(root, {key: "skew", context: S.skew.context, unit: "s", by_time: false, lines: [],
        meta: `${S.skew.x.length} step positions; between 0 and the highest skew of each bucket`,
        band: {x: S.skew.x, min: S.skew.mean.map(() => 0), mean: S.skew.mean, max: S.skew.max,
               labels: ["0", "mean skew", "max skew"]}},
        `time skew per step of ${S.skew.key} (${S.skew.context}) [s]`);
    }
  }

  function heatColor(f) { // 0 white-ish to 1 dark red
    const a = [255, 247, 236], b = [127, 0, 0];
    return `rgb(${a.map((v, i) => Math.round(v + (b[i] - v) * f)).join(",")})`;
  }

  function drawHeat(root, H) {
    const rows = H.cells.length, cols = H.cells[0].length;
    let max = 0, min = Infinity;
    for (const r of H.cells) for (const v of r) if (v != null) { max = Math.max(max, v); min = Math.min(min, v); }
    if (!isFinite(min)) min = 0;
    const LEFT = 104;  // room for the rank labels
    const cw = Math.max(4, Math.min(40, Math.floor((chartWidth(root) - LEFT - 40) / cols)));
    const ch = Math.max(3, Math.min(22, Math.floor(480 / rows)));
    const canvas = el("canvas", {width: String(cols * cw + LEFT + 10), height: String(rows * ch + 40), id: "heat"});
    const ctx = canvas.getContext("2d");
    ctx.font = "11px system-ui, sans-serif"; ctx.fillStyle = "#5b6575";
    H.cells.forEach((r, i) => {
      r.forEach((v, j) => {
        ctx.fillStyle = v == null ? "#eef0f4" : heatColor(max > min ? Math.sqrt((v - min) / (max - min)) : 0);
        ctx.fillRect(LEFT + j * cw, 4 + i * ch, cw, ch);
      });
    });
    ctx.fillStyle = "#5b6575";
    const every = Math.ceil(13 / ch);  // a label at least every 13 pixels
    ctx.textBaseline = "top";
    H.rank_labels.forEach((l, i) => { if (i % every === 0) ctx.fillText("rank " + l, 2, 4 + i * ch); });
    ctx.textBaseline = "alphabetic";
    const stepEvery = Math.ceil(cols / Math.floor(cols * cw / 60));
    H.step_labels.forEach((l, j) => { if (j % stepEvery === 0) ctx.fillText(l.split("-")[0], LEFT + j * cw, rows * ch + 18); });
    ctx.fillText("step →", LEFT + cols * cw - 40, rows * ch + 34);
    canvas.addEventListener("mousemove", (ev) => {
      const rect = canvas.getBoundingClientRect();
      const j = Math.floor((ev.clientX - rect.left - LEFT) / cw), i = Math.floor((ev.clientY - rect.top - 4) / ch);
      if (i < 0 || j < 0 || i >= rows || j >= cols) { hideTip(); return; }
      const v = H.cells[i][j];
      showTip(ev, `rank ${H.rank_labels[i]}, step ${H.step_labels[j]}\n` +
        (v == null ? "not logged" : `behind the first rank by ${dur(v)}`));
    });
    canvas.addEventListener("mouseleave", hideTip);
    root.append(el("div", {class: "chart"}, el("div", {class: "title"},
      el("b", {text: `Time skew heat map: ${H.key} (${H.context})`}),
      el("span", {class: "meta", text: `${rows} rank rows × ${cols} step columns; darker = later than the step's ` +
        `first rank (mean lag per cell, ${dur(min)} to ${dur(max)})` + (H.thinned ? "; steps sampled from long series" : "")})),
      el("div", {id: "heat-wrap"}, canvas), heatLegend(min, max)));
  }

  function heatLegend(min, max) {
    const stops = [0, 0.25, 0.5, 0.75, 1];
    return el("div", {class: "legend-row"}, el("span", {text: "lag behind the step's first rank:"}),
      ...stops.map((f) => el("span", {}, el("i", {style: `background: ${heatColor(Math.sqrt(f))}`}), dur(min + f * (max - min)))),
      el("span", {}, el("i", {style: "background: #eef0f4"}), "not logged"));
  }

  function drawParams(root) {
    const P = D.params;
    root.append(el("p", {class: "note", text: `${P.keys} params` + (P.disagree ? `; ${P.disagree} differ across ranks ` +
      "(highlighted: the value most ranks hold first, then the others)" : "; every rank logged the same values")}));
    if (!P.rows.length) return;
    root.append(el("div", {class: "panel"}, table(["key", "value", "ranks", "how many"],
      P.rows.map((r) => [r.key, r.value, r.ranks, r.count + (r.disagree ? (r.majority ? " (majority)" : " (differs)") : "")]),
      {mono: [1], rowClass: (n) => P.rows[n].disagree ? (P.rows[n].majority ? "disagree" : "disagree minority") : ""}), more(P.rows.length, P.total, "values")));
  }

  function drawArtifacts(root) {
    const A = D.artifacts, L = D.lineage;
    root.append(el("h2", {text: "Lineage"}));
    if (!L.nodes.length) {
      root.append(el("p", {class: "note", text: O.prov ? "no artifacts or model versions in the PROV document" :
        "no prov.json: run `prov4ml-dist merge` to write it"}));
    } else {
      root.append(el("p", {class: "note", text: "Each node is one content (sha256), however many ranks saved it; " +
        "arrows go from a model version to the next. Scroll to zoom, drag to pan, click a node for its details." +
        (L.grouped ? ` ${L.contents} contents: grouped by name and kind.` : "")}));
      const colors = {model_version: "#2f6fd6", model: "#2e9d55", artifact: "#c49a00"};
      const info = el("div", {class: "panel mono", id: "node-info", text: "click a node"});
      const box = el("div", {id: "lineage"});
      root.append(el("div", {class: "legend-row"}, ...Object.entries(colors).map(([k, c]) =>
        el("span", {}, el("i", {style: `background: ${c}`}), k.replace("_", " ")))), box, info);
      const cy = cytoscape({
        container: box,
        elements: [...L.nodes.map((n) => ({data: {...n, name: `${n.label}\n${n.count > 1 ? "" : n.sha256.slice(0, 12) + " · "}${bytes(n.size)}\nranks ${n.ranks || "-"}` +
          (n.count > 1 ? `\n${n.count} contents` : ""), color: colors[n.item] || "#6b7a8f"}})),
          ...L.edges.map((e, i) => ({data: {id: "e" + i, source: e.source, target: e.target, kind: e.kind}}))],
        style: [
          {selector: "node", style: {"shape": "round-rectangle", "background-color": "data(color)", "label": "data(name)",
            "color": "#fff", "text-wrap": "wrap", "text-valign": "center", "font-size": 11, "width": 170,
            "text-max-width": 160, "height": 60}},
          {selector: "edge", style: {"width": 2, "line-color": "#9aa5b5", "target-arrow-color": "#9aa5b5",
            "target-arrow-shape": "triangle", "curve-style": "bezier"}},
          {selector: "node:selected", style: {"border-width": 3, "border-color": "#1d2430"}}],
        layout: {name: "breadthfirst", directed: true, spacingFactor: 1.1, padding: 20},
      });
      const describe = (n) => `${n.label} (${n.item})\nsha256 ${n.sha256}\nsize ${bytes(n.size)} (${n.size} B)\n` +
        `written by ranks ${n.ranks || "-"}\npath ${n.path}`;
      cy.on("tap", "node", (ev) => { info.style.whiteSpace = "pre-wrap"; info.textContent = describe(ev.target.data()); });
      cy.on("mouseover", "node", (ev) => showTip(ev.originalEvent, describe(ev.target.data())));
      cy.on("mouseout", "node", hideTip);
      window.__lineage = cy;
    }
    root.append(el("h2", {text: `Artifacts (${A.total} contents, ${bytes(A.bytes)}, ${A.missing} missing)`}));
    const present = {1: "yes", 0: "MISSING", "-1": "external"};
    root.append(el("div", {class: "panel"}, table(["name", "kind", "size", "ranks", "present", "model version", "sha256"],
      A.rows.map((a) => [a.name, a.item, bytes(a.size), a.ranks, present[a.present], a.models.join(", "), a.sha256]),
      {mono: [6], numeric: [2]}), more(A.rows.length, A.total, "contents")));
  }

  function boundText() {
    const b = D.bounds;
    return `Downsampled to fit in a mail: each band at most ${b.band_points} steps, each rank's line at most ` +
      `${b.line_points} points (min and max per bucket), lines of at most ${b.lines_per_chart} ranks per chart; ` +
      "the exact points are in merged.h5 (prov4ml-dist export RUN --format csv).";
  }
  $("footer").textContent = boundText();
  show(location.hash.slice(1));
  document.body.dataset.ready = "1";
})();
