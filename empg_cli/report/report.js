// empg report: renders the audit and the trajectory explorer from the JSON document embedded in the page.
// Steps are columns (one array per statistic, sorted by trajectory then step); only the visible page of the step
// list and the open trajectory are turned into DOM, so a file of 100k steps stays responsive.
"use strict";

(function () {
  const PAGE = 25;          // rows per page of the step list
  const STEP_BATCH = 25;    // steps of an open trajectory rendered at a time
  const SNIPPET = 90;       // characters of a response shown in the step list
  const NUMBERS = [["H", "H_t"], ["A_base", "A_base"], ["A_empg", "A_empg"], ["A_aem", "A_aem"], ["g", "g"],
                   ["w", "w"]];

  const byId = (id) => document.getElementById(id);
  const errors = byId("errors");
  function showError(message) {
    errors.hidden = false;
    errors.textContent += "Script error: " + message + "\n";
  }
  window.addEventListener("error", (event) => showError(event.message));

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function fmt(x) {  // 4 significant digits, like `empg audit`
    if (x === null || x === undefined) return "n/a";
    return String(parseFloat(x.toPrecision(4)));
  }

  const D = JSON.parse(byId("report-data").textContent);
  const S = D.steps, T = D.trajectories, K = D.tokens;
  const nSteps = S.step.length, nTraj = T.start.length;
  const stepTraj = new Int32Array(nSteps);
  for (let t = 0; t < nTraj; t++) stepTraj.fill(t, T.start[t], T.start[t] + T.length[t]);
  const success = (t) => T.reward[t] > 0;
  const groupKey = (t) => T.source[t] + "\u0000" + T.iteration[t] + "\u0000" + T.group[t];
  const groupMembers = new Map();
  for (let t = 0; t < nTraj; t++) {
    const key = groupKey(t);
    if (!groupMembers.has(key)) groupMembers.set(key, []);
    groupMembers.get(key).push(t);
  }

  // Colour scale: light (confident) to dark (uncertain), interpolated between the palette's stops.
  const stops = D.scale.colours.map((hex) => [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16)));
  function colour(h) {
    const x = Math.max(0, Math.min(1, (h || 0) / D.scale.max)) * (stops.length - 1);
    const i = Math.min(stops.length - 2, Math.floor(x)), f = x - i;
    const rgb = stops[i].map((c, j) => Math.round(c + f * (stops[i + 1][j] - c)));
    return {background: `rgb(${rgb.join(",")})`, dark: x / (stops.length - 1) > 0.55};
  }
  function paint(node, h) {
    const c = colour(h);
    node.style.backgroundColor = c.background;
    if (c.dark) node.classList.add("dark");
    return node;
  }

  function legend() {
    const bar = el("div", {class: "legend-bar"});
    bar.style.background = `linear-gradient(to right, ${D.scale.colours.join(", ")})`;
    const ticks = el("div", {class: "legend-ticks"},
      [0, 0.25, 0.5, 0.75, 1].map((f) => el("span", {}, parseFloat((f * D.scale.max).toPrecision(2))
                                                          + (f === 1 ? "+" : ""))));
    const what = {
      token: "token entropy (nats): each response token is coloured by its own entropy",
      step: "step entropy H_t (nats): the file has no token-level entropies, so each step is coloured as a whole",
      "no-tokenizer": "step entropy H_t (nats): the file has token entropies, but the tokenizer of the checkpoint "
        + "named in its metadata was not found (looked up from the current folder and the file's folder), so each "
        + "step is coloured as a whole"}[D.scale.level];
    return el("div", {class: "legend", id: "legend"}, el("div", {class: "legend-title"}, what), bar, ticks);
  }

  // ---- summary, figures, audit --------------------------------------------------------------------------------
  byId("summary").textContent = D.summary;
  for (const f of D.figures) {
    byId("figure-list").append(el("figure", {}, el("img", {src: f.src, alt: f.title, loading: "lazy"}),
                                  el("figcaption", {}, f.title)));
  }

  function table(headers, rows, rowAttrs) {
    return el("table", {},
      el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
      el("tbody", {}, rows.map((cells, i) => el("tr", rowAttrs ? rowAttrs(cells, i) : {},
                                                 cells.map((c) => el("td", {}, c))))));
  }
  for (const s of D.audit_tables) {
    byId("audit-tables").append(el("h3", {}, s.title),
      table(s.headers, s.rows, (cells) => ({class: cells[cells.length - 1] === "FAIL" ? "fail" : null})));
  }
  for (const section of D.top) {
    const rows = section.entries.map((e, i) => el("tr", {class: "link", "data-trajectory": e.trajectory,
                                                         onclick: () => openTrajectory(e.trajectory, e.step)},
      el("td", {}, i + 1),
      el("td", {}, el("a", {href: `#traj=${e.trajectory}&step=${e.step}`,
                            onclick: (event) => event.preventDefault()}, `${e.source} · it ${e.iteration}`)),
      el("td", {}, e.group_id), el("td", {}, e.traj_id), el("td", {class: "num"}, e.step),
      ["step_entropy", "adv_base", "adv_empg", "adv_aem"].map((k) => el("td", {class: "num", title: e[k]},
                                                                       fmt(e[k]))),
      el("td", {class: "snippet"}, e.snippet || "")));
    byId("top-tables").append(el("h3", {}, section.title),
      el("table", {class: "top", id: section.id},
        el("thead", {}, el("tr", {}, ["#", "run · iteration", "group", "trajectory", "step", "H_t", "A_base",
                                      "A_empg", "A_aem", "text"].map((h) => el("th", {}, h)))),
        el("tbody", {}, rows)));
    if (!section.entries.length) byId("top-tables").append(el("p", {class: "note"}, "None."));
  }

  // ---- explorer: filters ---------------------------------------------------------------------------------------
  const controls = {run: byId("f-run"), iteration: byId("f-iteration"), outcome: byId("f-outcome"),
                    group: byId("f-group"), quadrant: byId("f-quadrant")};
  const option = (value, label) => el("option", {value}, label);
  controls.run.append(option("", "all"), ...D.sources.map((s, i) => option(String(i), s)));
  const iterations = [...new Set(T.iteration)].sort((a, b) => a - b);
  controls.iteration.append(option("", "all"), ...iterations.map((it) => option(String(it), it)));
  const perQuadrant = new Array(D.quadrants.length).fill(0);
  for (let i = 0; i < nSteps; i++) perQuadrant[S.quadrant[i]]++;
  controls.quadrant.append(option("", "all"),
    ...D.quadrants.map((q, i) => option(String(i), `${q} (${perQuadrant[i].toLocaleString("en")} steps)`)));
  byId("group-ids").append(...[...new Set(T.group)].slice(0, 5000).map((g) => el("option", {value: g})));

  const state = {page: 0, sort: null, descending: false, matches: null};

  function matching() {
    const run = controls.run.value, iteration = controls.iteration.value, outcome = controls.outcome.value;
    const quadrant = controls.quadrant.value, group = controls.group.value.trim();
    const exactGroup = group !== "" && T.group.includes(group);
    const keep = new Uint8Array(nTraj);
    for (let t = 0; t < nTraj; t++) {
      keep[t] = (run === "" || T.source[t] === +run) && (iteration === "" || T.iteration[t] === +iteration)
        && (outcome === "" || (outcome === "success") === success(t))
        && (group === "" || (exactGroup ? T.group[t] === group : T.group[t].includes(group))) ? 1 : 0;
    }
    const out = [];
    for (let i = 0; i < nSteps; i++) {
      if (keep[stepTraj[i]] && (quadrant === "" || S.quadrant[i] === +quadrant)) out.push(i);
    }
    if (state.sort) {
      const column = S[state.sort], sign = state.descending ? -1 : 1;
      out.sort((a, b) => sign * ((column[a] ?? -Infinity) - (column[b] ?? -Infinity)) || a - b);
    }
    return out;
  }

  function stepText(i) {
    if (S.text[i] !== null) return S.text[i];
    let text = "";
    for (let k = K.start[i]; k < K.start[i + 1]; k++) text += K.pieces[K.piece[k]];
    return K.start[i + 1] > K.start[i] ? text : null;
  }
  const oneLine = (text) => {
    const flat = text.replace(/\s+/g, " ").trim();
    return flat.length <= SNIPPET ? flat : flat.slice(0, SNIPPET) + "…";
  };

  function numberCells(i) {
    return NUMBERS.map(([key]) => el("td", {class: "num", "data-column": key, "data-v": S[key][i],
                                            title: S[key][i] === null ? null : String(S[key][i])}, fmt(S[key][i])));
  }

  function renderList() {
    const matches = state.matches;
    const pages = Math.max(1, Math.ceil(matches.length / PAGE));
    state.page = Math.min(state.page, pages - 1);
    const trajectories = new Set(matches.map((i) => stepTraj[i])).size;
    byId("match-count").textContent = `${matches.length.toLocaleString("en")} steps in `
      + `${trajectories.toLocaleString("en")} trajectories match. Click a step to open its trajectory.`;
    const sortable = (key, label) => el("th", {class: "sortable", "data-sort": key, title: "sort",
      onclick: () => { state.descending = state.sort === key ? !state.descending : true; state.sort = key;
                       refresh(); }}, label + (state.sort === key ? (state.descending ? " ▼" : " ▲") : ""));
    const rows = matches.slice(state.page * PAGE, (state.page + 1) * PAGE).map((i) => {
      const t = stepTraj[i], text = stepText(i);
      const show = () => openTrajectory(t, S.step[i]);
      return el("tr", {class: "link", "data-step-index": i, "data-quadrant": S.quadrant[i], tabindex: 0,
                       onclick: show, onkeydown: (event) => { if (event.key === "Enter") show(); }},
        el("td", {class: "id"}, D.sources[T.source[t]]), el("td", {class: "num"}, T.iteration[t]),
        el("td", {class: "id"}, T.group[t]), el("td", {class: "id"}, T.traj[t]), el("td", {class: "num"}, S.step[i]),
        el("td", {}, success(t) ? "success" : "failure"), el("td", {class: "id"}, D.quadrants[S.quadrant[i]]),
        numberCells(i), el("td", {class: "snippet"}, text === null ? "" : oneLine(text)));
    });
    const head = el("tr", {}, ["run", "iteration", "group", "trajectory", "step", "outcome", "quadrant"]
      .map((h) => el("th", {}, h)), NUMBERS.map(([key, label]) => sortable(key, label)), el("th", {}, "response"));
    byId("step-list").replaceChildren(el("table", {id: "steps"}, el("thead", {}, head), el("tbody", {}, rows)));
    const go = (page) => () => { state.page = page; renderList(); };
    byId("pager").replaceChildren(
      el("button", {type: "button", disabled: state.page === 0, onclick: go(state.page - 1)}, "‹ previous"),
      el("span", {}, ` page ${state.page + 1} of ${pages} `),
      el("button", {type: "button", disabled: state.page >= pages - 1, onclick: go(state.page + 1)}, "next ›"));
  }

  function refresh() {
    state.matches = matching();
    renderList();
    writeHash();
  }

  // ---- explorer: one trajectory ---------------------------------------------------------------------------------
  let open = null;  // {trajectory, step}

  function responseCell(i) {
    const cell = el("td", {class: "response"});
    if (S.input[i] !== null) {
      cell.append(el("details", {class: "input"}, el("summary", {}, S.step[i] === 0 ? "prompt" : "new input"),
                     el("pre", {}, S.input[i])));
    }
    const text = el("div", {class: "tokens"});
    if (K.start[i + 1] > K.start[i]) {
      for (let k = K.start[i]; k < K.start[i + 1]; k++) {
        text.append(paint(el("span", {class: "tok", title: `H = ${K.entropy[k]} nats`}, K.pieces[K.piece[k]]),
                          K.entropy[k]));
      }
    } else if (S.text[i] !== null) {
      text.append(paint(el("span", {class: "tok step-coloured", title: `H_t = ${S.H[i]} nats`}, S.text[i]), S.H[i]));
    } else {
      text.append(el("span", {class: "note"}, "(the file has no response text or tokenizer for this step)"));
    }
    cell.append(text);
    return cell;
  }

  function stepRow(i, highlight) {
    return el("tr", {class: highlight ? "highlight" : null, "data-step": S.step[i], "data-step-index": i},
      el("td", {class: "num"}, S.step[i]), numberCells(i), el("td", {class: "id"}, D.quadrants[S.quadrant[i]]),
      responseCell(i));
  }

  function openTrajectory(t, step, scroll = true) {
    open = {trajectory: t, step: step ?? null};
    const start = T.start[t], length = T.length[t];
    const siblings = groupMembers.get(groupKey(t));
    const body = el("tbody", {});
    let shown = 0;
    const more = el("button", {type: "button", id: "more-steps"});
    function showMore(upTo) {
      const end = Math.min(length, Math.max(shown + STEP_BATCH, upTo));
      for (; shown < end; shown++) body.append(stepRow(start + shown, S.step[start + shown] === step));
      more.hidden = shown >= length;
      more.textContent = `show ${Math.min(STEP_BATCH, length - shown)} more of ${length - shown} remaining steps`;
    }
    more.addEventListener("click", () => showMore(0));
    const view = byId("trajectory");
    view.hidden = false;
    view.replaceChildren(
      el("h3", {id: "trajectory-title"},
         `Trajectory ${T.traj[t]} · group ${T.group[t]} · iteration ${T.iteration[t]} · `
         + `run ${D.sources[T.source[t]]}`),
      el("p", {id: "trajectory-meta"}, `traj_reward ${fmt(T.reward[t])} (${success(t) ? "success" : "failure"}), `
         + `${length} step${length === 1 ? "" : "s"}.`),
      el("p", {class: "siblings"}, `The group's ${siblings.length} trajectories: `,
         siblings.map((s) => el("button", {type: "button", class: s === t ? "current sibling" : "sibling",
                                           "data-trajectory": s, onclick: () => openTrajectory(s, null)},
                                `${T.traj[s]} (${success(s) ? "✓" : "✗"} ${fmt(T.reward[s])})`))),
      legend(),
      el("table", {id: "trajectory-steps"},
         el("thead", {}, el("tr", {}, el("th", {}, "step"), NUMBERS.map(([, label]) => el("th", {}, label)),
                             el("th", {}, "quadrant"), el("th", {}, "response"))),
         body),
      more);
    const target = step === null || step === undefined ? 0 : step + 1;
    showMore(target);
    writeHash();
    if (scroll) {
      const row = body.querySelector("tr.highlight");
      (row || view).scrollIntoView({block: row ? "center" : "start"});
    }
  }

  // ---- the address bar keeps filters and the open trajectory, so a view can be linked -------------------------
  function writeHash() {
    const params = new URLSearchParams();
    for (const [key, control] of Object.entries(controls)) if (control.value) params.set(key, control.value);
    if (open) {
      params.set("traj", open.trajectory);
      if (open.step !== null) params.set("step", open.step);
    }
    history.replaceState(null, "", params.toString() ? "#" + params : location.pathname + location.search);
  }

  function readHash() {
    const params = new URLSearchParams(location.hash.slice(1));
    if (![...params.keys()].length) return false;
    for (const [key, control] of Object.entries(controls)) control.value = params.get(key) || "";
    state.page = 0;
    state.matches = matching();
    renderList();
    const t = parseInt(params.get("traj"), 10);
    if (t >= 0 && t < nTraj) {
      openTrajectory(t, params.has("step") ? parseInt(params.get("step"), 10) : null);
    } else {
      open = null;
      byId("trajectory").hidden = true;
    }
    return true;
  }

  for (const control of Object.values(controls)) {
    control.addEventListener(control.tagName === "INPUT" ? "input" : "change", () => { state.page = 0; refresh(); });
  }
  byId("filters").addEventListener("reset", () => setTimeout(() => { state.page = 0; refresh(); }));
  window.addEventListener("hashchange", readHash);
  if (!readHash()) { state.matches = matching(); renderList(); }
  document.body.dataset.ready = "true";
})();
