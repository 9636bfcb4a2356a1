// The shop page: browse, text / photo / "more like this" search, filter chips, likes -> "Picked for you".
// Talks only to the JSON API of the same server (see /docs).
"use strict";

const FILTER_LABELS = {
  gender: "Gender", masterCategory: "Category", subCategory: "Type", articleType: "Article",
  baseColour: "Colour", season: "Season",
};
const COLOURS = {
  Black: "#111", White: "#fff", Blue: "#2f5fd0", "Navy Blue": "#1f2a5a", Red: "#d22", Grey: "#999",
  Brown: "#7a4a21", Green: "#2e8b57", Pink: "#f7a1c4", Purple: "#7e3fa6", Silver: "#c0c0c0", Yellow: "#f3d21a",
  Beige: "#e8d9b5", Gold: "#d4af37", Maroon: "#7b1e2b", Orange: "#f28c1c", Olive: "#6b7a2b", Cream: "#f6efd6",
  Khaki: "#c3b091", Multi: "linear-gradient(135deg,#e33,#3b3,#33e)", Charcoal: "#36454f",
  "Off White": "#f4f1e8", Teal: "#1b8a8a", Peach: "#ffc8a2", Magenta: "#d0208e", Lavender: "#b9a7e0",
};
const WHY_FIELDS = ["articleType", "baseColour", "gender", "subCategory", "season", "usage"];

const state = {
  info: null, query: { kind: "browse" }, filters: {}, liked: [], disliked: [], photo: null, cache: {},
};
const $ = (id) => document.getElementById(id);

async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({ detail: response.statusText }));
  if (!response.ok) throw new Error(typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail));
  return body;
}

function toast(message) {
  const el = $("toast");
  el.textContent = message;
  el.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { el.hidden = true; }, 5000);
}

function k() { return parseInt($("k-select").value, 10); }
function activeFilters() { return Object.fromEntries(Object.entries(state.filters).filter(([, v]) => v)); }

function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "style") node.style.cssText = value;  // CSSOM: allowed by the CSP (a style attribute is not)
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function whyChips(rec) {
  const chips = [];
  const explanation = rec.explanation;
  if (!explanation) return chips;
  const seen = new Set();
  for (const field of WHY_FIELDS) {
    const value = explanation.shared && explanation.shared[field];
    if (value && !seen.has(value) && chips.length < 4) {
      seen.add(value);
      chips.push(el("span", { text: value, title: `shares ${field} with your ${basisWord(explanation.basis)}` }));
    }
  }
  if (explanation.parts) {
    const { image, text } = explanation.parts;
    chips.push(el("span", { class: "part", text: `image ${image.toFixed(2)} · text ${text.toFixed(2)}`,
      title: "image and text parts of the score" }));
  }
  return chips;
}

function basisWord(basis) {
  return { metadata: "item", history: "likes", predicted: "photo (predicted)", text: "search" }[basis] || basis;
}

function card(item, rec) {
  const id = item.id;
  const liked = state.liked.includes(id), disliked = state.disliked.includes(id);
  const thumb = el("button", { class: "thumb", title: "More like this", onclick: () => moreLike(item) }, [
    el("img", { src: `/items/${id}/image`, alt: item.productDisplayName || `item ${id}`, loading: "lazy" }),
    el("span", { class: "hint", text: "More like this" }),
  ]);
  if (rec) thumb.append(el("span", { class: "match", text: `${Math.max(0, Math.round(rec.score * 100))}% match` }));
  const node = el("article", {
    class: "card" + (liked ? " liked" : ""), "data-id": id, "data-gender": item.gender || "",
    "data-mastercategory": item.masterCategory || "", "data-articletype": item.articleType || "",
    "data-basecolour": item.baseColour || "", "data-season": item.season || "",
    "data-subcategory": item.subCategory || "",
  }, [
    thumb,
    el("div", { class: "info" }, [
      el("div", { class: "name", text: item.productDisplayName || `Item ${id}` }),
      el("div", { class: "sub", text: [item.articleType, item.baseColour, item.gender].filter(Boolean).join(" · ") }),
      el("div", { class: "why" }, rec ? whyChips(rec) : []),
      el("div", { class: "actions" }, [
        el("button", { class: "like" + (liked ? " on" : ""), title: "I like this", text: "♥ Like",
          onclick: () => react(id, "liked") }),
        el("button", { class: "dislike" + (disliked ? " on" : ""), title: "Not for me", text: "✕",
          onclick: () => react(id, "disliked") }),
      ]),
    ]),
  ]);
  return node;
}

function renderGrid(target, entries) {
  const grid = $(target);
  grid.replaceChildren(...entries.map(([item, rec]) => card(item, rec)));
  if (!entries.length) grid.append(el("p", { class: "empty", text: "Nothing matches these filters." }));
}

function describe(result) {
  const t = result.timings || {};
  return `${result.results.length} results · ${(t.server_ms ?? t.total_ms ?? 0).toFixed(1)} ms`;
}

async function run() {
  const query = state.query;
  const filters = activeFilters();
  try {
    if (query.kind === "browse") {
      const params = new URLSearchParams({ limit: k(), filters: JSON.stringify(filters) });
      const page = await api(`/items?${params}`);
      $("results-title").textContent = Object.keys(filters).length ? "Shop the selection" : "New in";
      $("results-note").textContent = `${page.total} products`;
      renderGrid("results", page.items.map((item) => [item, null]));
    } else {
      let result;
      if (query.kind === "photo") {
        const form = new FormData();
        form.append("photo", state.photo, state.photo.name || "photo");
        form.append("k", String(k()));
        form.append("filters", JSON.stringify(filters));
        result = await api("/recommend/image", { method: "POST", body: form });
        const predicted = result.query.predicted || {};
        const guess = [predicted.baseColour, predicted.articleType].filter((v) => v && v.length).map((v) => v[0]);
        $("results-title").textContent = "Similar to your photo";
        $("results-note").textContent = (guess.length ? `looks like: ${guess.join(" ")} · ` : "") + describe(result);
      } else {
        const body = query.kind === "item" ? { item_id: query.item.id } : { text: query.text };
        result = await api("/recommend", {
          method: "POST", headers: { "Content-Type": "application/json" },
          body: JSON.stringify({ ...body, k: k(), filters }),
        });
        $("results-title").textContent = query.kind === "item"
          ? `More like this: ${query.item.productDisplayName || query.item.id}` : `Results for “${query.text}”`;
        $("results-note").textContent = describe(result);
      }
      renderGrid("results", result.results.map((rec) => [rec.metadata, rec]));
    }
  } catch (err) {
    toast(err.message);
  }
  await forYou();
}

async function forYou() {
  const shelf = $("for-you");
  $("like-count").textContent = String(state.liked.length);
  if (!state.liked.length) { shelf.hidden = true; return; }
  try {
    const result = await api("/recommend", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ history: state.liked, disliked: state.disliked, half_life: 4, k: 6,
        filters: activeFilters() }),
    });
    shelf.hidden = false;
    $("for-you-note").textContent =
      `from ${state.liked.length} like(s)` + (state.disliked.length ? `, ${state.disliked.length} pass(es)` : "");
    renderGrid("for-you-grid", result.results.map((rec) => [rec.metadata, rec]));
  } catch (err) {
    toast(err.message);
  }
}

function moreLike(item) {
  state.query = { kind: "item", item };
  window.scrollTo({ top: 0, behavior: "smooth" });
  run();
}

function react(id, list) {
  const other = list === "liked" ? "disliked" : "liked";
  state[other] = state[other].filter((x) => x !== id);
  state[list] = state[list].includes(id) ? state[list].filter((x) => x !== id) : [...state[list], id];
  for (const node of document.querySelectorAll(`.card[data-id="${id}"]`)) {
    node.classList.toggle("liked", state.liked.includes(id));
    node.querySelector(".like").classList.toggle("on", state.liked.includes(id));
    node.querySelector(".dislike").classList.toggle("on", state.disliked.includes(id));
  }
  forYou();
}

function chips(info) {
  const nav = $("chips");
  for (const [field, values] of Object.entries(info.filters)) {
    const group = el("div", { class: "chip-group", "data-field": field }, [el("span", { text: FILTER_LABELS[field] || field })]);
    for (const value of values.slice(0, field === "articleType" || field === "baseColour" ? 10 : 6)) {
      const chip = el("button", { class: "chip", type: "button", "data-value": value, text: value, onclick: () => {
        state.filters[field] = state.filters[field] === value ? null : value;
        for (const c of group.querySelectorAll(".chip")) c.classList.toggle("on", state.filters[field] === c.dataset.value);
        run();
      } });
      if (field === "baseColour" && COLOURS[value]) chip.prepend(el("i", { class: "swatch", style: `background:${COLOURS[value]}` }));
      group.append(chip);
    }
    nav.append(group);
  }
}

function usePhoto(file) {
  if (!file) return;
  state.photo = file;
  state.query = { kind: "photo" };
  const preview = $("drop-preview");
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  run();
}

async function start() {
  try {
    state.info = await api("/info");
  } catch (err) {
    toast(`the service is not answering: ${err.message}`);
    return;
  }
  const info = state.info;
  chips(info);
  $("index-info").textContent = `${info.index.count} products · ${info.model.embedding_name || "model"} · ${info.index.type} index`;
  $("k-select").value = String(info.limits.default_k);
  if (!$("k-select").value) $("k-select").value = "12";
  if (!info.text_queries) {
    $("search-text").placeholder = "Text search needs a CLIP index: try a photo or click a product";
    $("search-text").disabled = true;
    $("search").querySelector("button").disabled = true;
  }
  $("search").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("search-text").value.trim();
    state.query = text ? { kind: "text", text } : { kind: "browse" };
    run();
  });
  $("photo-input").addEventListener("change", (event) => usePhoto(event.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    usePhoto(event.dataTransfer.files[0]);
  });
  drop.addEventListener("click", () => $("photo-input").click());
  $("k-select").addEventListener("change", run);
  $("clear-history").addEventListener("click", () => { state.liked = []; state.disliked = []; run(); });
  run();
}

start();
