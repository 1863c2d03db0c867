// mmloom browse: filters over a columnar index, details loaded page by page.
// Every value from the dataset is data from strangers: it is only ever set as text
// (textContent, attributes), never parsed as HTML; links are http(s) only.
"use strict";

const PER_VIEW = 48;
const state = { index: null, pages: {}, waiting: {}, matches: [], view: 0, order: null, api: false };
const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

const SVG = "http://www.w3.org/2000/svg";
function svgRect(box, cls) {
  const r = document.createElementNS(SVG, "rect");
  r.setAttribute("x", box[0]); r.setAttribute("y", box[1]);
  r.setAttribute("width", Math.max(0, box[2] - box[0])); r.setAttribute("height", Math.max(0, box[3] - box[1]));
  if (cls) r.setAttribute("class", cls);
  return r;
}

// ------------------------------------------------------------------ data loading
window.mmloomIndex = function (index) {
  state.index = index;
  for (const r of index.rules) $("rule").append(el("option", { value: r, text: r }));
  for (const s of index.scores) $("score").append(el("option", { value: s, text: s }));
  for (const p of index.phrases) $("phrases").append(el("option", { value: p }));
  probeApi();
  apply();
};

window.mmloomPage = function (page) {
  state.pages[page.page] = page.samples;
  for (const resolve of state.waiting[page.page] || []) resolve(page.samples);
  delete state.waiting[page.page];
};

function loadPage(p) {
  if (state.pages[p]) return Promise.resolve(state.pages[p]);
  return new Promise((resolve) => {
    if (!state.waiting[p]) {
      state.waiting[p] = [];
      const s = document.createElement("script");
      s.src = "data/page_" + String(p).padStart(5, "0") + ".js";
      document.body.append(s);
    }
    state.waiting[p].push(resolve);
  });
}

async function sample(i) {
  const per = state.index.page;
  const samples = await loadPage(Math.floor(i / per));
  return samples[i % per];
}

// ------------------------------------------------------------------ filters
function apply() {
  const ix = state.index;
  if (!ix) return;
  const verdict = $("verdict").value, rule = $("rule").value;
  const col = $("score").value, lo = parseFloat($("min").value), hi = parseFloat($("max").value);
  const phrase = $("phrase").value.trim().toLowerCase();
  const ruleId = rule ? ix.rules.indexOf(rule) : -1;
  const phraseIds = new Set();
  if (phrase) ix.phrases.forEach((p, k) => { if (p.includes(phrase)) phraseIds.add(k); });
  const values = col ? ix.values[col] : null;
  const candidates = state.order || [...Array(ix.n).keys()];
  state.matches = candidates.filter((i) => {
    if (verdict === "selected" && !ix.selected[i]) return false;
    if (verdict === "rejected" && ix.selected[i]) return false;
    if (ruleId >= 0 && !ix.fails[i].includes(ruleId)) return false;
    if (values && (!isNaN(lo) || !isNaN(hi))) {
      const v = values[i];
      if (v === null || (!isNaN(lo) && v < lo) || (!isNaN(hi) && v > hi)) return false;
    }
    if (phrase && !ix.phrase[i].some((k) => phraseIds.has(k)) && !ix.text[i].includes(phrase)) return false;
    return true;
  });
  state.view = 0;
  render();
}

// ------------------------------------------------------------------ cards
function cropBox(sheet, rect, size) {
  const w = rect[2] - rect[0], h = rect[3] - rect[1], f = Math.min(1, size / Math.max(w, h));
  const d = el("span", { class: "crop", title: "" });
  d.style.width = Math.round(w * f) + "px"; d.style.height = Math.round(h * f) + "px";
  d.style.backgroundImage = "url(" + JSON.stringify(sheet) + ")";
  d.style.backgroundPosition = (-rect[0] * f) + "px " + (-rect[1] * f) + "px";
  d.style.backgroundSize = "auto";
  if (f < 1) {  // scale the whole sheet with the crop
    const img = new Image();
    img.onload = () => { d.style.backgroundSize = (img.naturalWidth * f) + "px " + (img.naturalHeight * f) + "px"; };
    img.src = sheet;
  }
  return d;
}

function card(s) {
  const c = el("article", { class: "card " + (s.selected ? "selected" : "rejected"), "data-key": s.key });
  const verdict = s.selected ? "selected" + (s.build_status ? " · " + s.build_status : "") : "rejected";
  c.append(el("div", {}, el("span", { class: "verdict", text: verdict }), " ", el("span", { class: "key", text: s.key })));
  if (s.img) {
    const pic = el("div", { class: "pic" });
    pic.append(el("img", { src: s.img, loading: "lazy", alt: s.clean_caption || s.caption || s.key, width: "320" }));
    if (s.w && s.crops.length) {
      const svg = document.createElementNS(SVG, "svg");
      svg.setAttribute("viewBox", "0 0 " + s.w + " " + s.h);
      svg.setAttribute("preserveAspectRatio", "none");
      for (const k of s.crops) {
        svg.append(svgRect(k.box, ""));
        if (k.head_box) svg.append(svgRect(k.head_box, "head"));
      }
      pic.append(svg);
    }
    c.append(pic);
  }
  const prompt = el("div", { class: "prompt" });
  for (const seg of s.segments) {
    if (seg.type === "text") { prompt.append(seg.text); continue; }
    const k = s.crops[seg.crop];
    const chip = el("span", { class: "seg-image", title: k.label + " " + k.score });
    if (s.sheet) chip.append(cropBox(s.sheet, k.rect, 48));
    chip.append(k.phrase);
    if (s.sheet && k.head_rect) chip.append(cropBox(s.sheet, k.head_rect, 32));
    prompt.append(chip);
  }
  c.append(prompt);
  if (s.caption && s.caption !== s.clean_caption) c.append(el("div", { class: "key", text: "raw: " + s.caption }));
  if (s.failed.length) {
    const ul = el("ul", { class: "ledger" });
    for (const f of s.failed) ul.append(el("li", { text: f.rule + ": " + f.value + " (threshold " + f.threshold + ")" }));
    c.append(ul);
  }
  const t = el("table", { class: "scores" });
  for (const [k, v] of Object.entries(s.scores)) {
    if (v === null || v === undefined) continue;
    t.append(el("tr", {}, el("td", { text: k }), el("td", { text: typeof v === "number" ? String(Math.round(v * 1e4) / 1e4) : String(v) })));
  }
  c.append(t);
  const foot = el("div", {});
  if (/^https?:\/\//i.test(s.url || "")) foot.append(el("a", { href: s.url, rel: "noopener noreferrer nofollow", target: "_blank", text: "source" }), " ");
  if (state.api) {
    const b = el("button", { type: "button", class: "similar", text: "similar images" });
    b.addEventListener("click", () => search("api/similar?key=" + encodeURIComponent(s.key), "images like " + s.key));
    foot.append(b);
  }
  c.append(foot);
  return c;
}

async function render() {
  const grid = $("grid"), ix = state.index;
  const n = state.matches.length, pages = Math.max(1, Math.ceil(n / PER_VIEW));
  state.view = Math.min(state.view, pages - 1);
  const from = state.view * PER_VIEW, shown = state.matches.slice(from, from + PER_VIEW);
  const sel = state.matches.filter((i) => ix.selected[i]).length;
  $("status").textContent = n + " of " + ix.n + " samples (" + sel + " selected, " + (n - sel) + " rejected)" +
    (state.order ? " · " + state.searchLabel : "");
  for (const w of document.querySelectorAll(".where")) w.textContent = "view " + (state.view + 1) + " of " + pages;
  const token = (state.token = (state.token || 0) + 1);
  const samples = await Promise.all(shown.map(sample));
  if (token !== state.token) return;  // a newer filter won
  grid.replaceChildren(...samples.map(card));
}

// ------------------------------------------------------------------ --serve: search
async function probeApi() {
  if (!location.protocol.startsWith("http")) return;
  try {
    const r = await fetch("api/info");
    if (!r.ok) return;
    const info = await r.json();
    state.api = true;
    $("search").hidden = false;
    if (!info.text) { $("text").disabled = true; $("text").placeholder = "text search off: " + info.text_error; }
    render();
  } catch (e) { /* a static server: no search */ }
}

async function search(url, label) {
  const r = await fetch(url);
  const body = await r.json();
  if (!r.ok) { $("status").textContent = body.error; return; }
  const pos = new Map(state.index.keys.map((k, i) => [k, i]));
  state.order = body.results.map((x) => pos.get(x.key)).filter((i) => i !== undefined);
  state.searchLabel = label;
  $("clear-search").hidden = false;
  apply();
}

// ------------------------------------------------------------------ wiring
for (const id of ["verdict", "rule", "score", "min", "max", "phrase"]) $(id).addEventListener("input", apply);
$("filters").addEventListener("submit", (e) => e.preventDefault());
$("text").addEventListener("change", () => { const q = $("text").value.trim(); if (q) search("api/text?q=" + encodeURIComponent(q), "text: " + q); });
$("clear-search").addEventListener("click", () => { state.order = null; $("clear-search").hidden = true; apply(); });
for (const b of document.querySelectorAll(".prev")) b.addEventListener("click", () => { if (state.view > 0) { state.view--; render(); } });
for (const b of document.querySelectorAll(".next")) b.addEventListener("click", () => {
  if ((state.view + 1) * PER_VIEW < state.matches.length) { state.view++; render(); }
});
