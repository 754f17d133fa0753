"""The search page of ``mammut serve``: one HTML document with its CSS and JS inline (no build
step, nothing fetched from elsewhere). It talks to the JSON API of :mod:`mammut.apps.server`.
A video result (a name with a video suffix) shows the strip of frames the server draws for it,
on a card two columns wide.

When the served model finds text in images (``/api/info``'s ``locate``: an open-vocabulary
detector), each result of a text search shows where the query is: the boxes of
``/api/images/{id}/locate`` drawn over the picture with their scores (a box is placed in
percent of the picture's own rectangle inside its square, ``object-fit: contain``, frame, so it
follows the picture when the page is resized). "show where" turns them off and on; "min score"
is the lowest score drawn. A result is asked about when it scrolls near the screen, so a long list
costs only what is looked at. With any other model nothing of this appears and nothing is asked."""

from __future__ import annotations

__all__ = ["PAGE"]

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mammut search</title>
<style>
  :root { --fg: #1d232a; --muted: #5f6b76; --line: #d9dee3; --accent: #2f6fde; --bad: #b3261e; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg); background: #f6f7f9; }
  header { padding: 14px 20px; background: #fff; border-bottom: 1px solid var(--line); }
  header h1 { margin: 0 0 2px; font-size: 19px; }
  header p { margin: 0; color: var(--muted); font-size: 13px; }
  main { padding: 16px 20px; max-width: 1200px; }
  form { display: flex; flex-wrap: wrap; gap: 8px; align-items: center; margin-bottom: 10px; }
  input[type=text] { flex: 1 1 320px; padding: 8px 10px; font-size: 15px; border: 1px solid var(--line); border-radius: 6px; }
  input[type=number] { width: 64px; padding: 7px; border: 1px solid var(--line); border-radius: 6px; }
  button { padding: 8px 14px; font-size: 14px; border: 1px solid var(--accent); background: var(--accent); color: #fff;
           border-radius: 6px; cursor: pointer; }
  button.plain { background: #fff; color: var(--accent); }
  button:disabled { opacity: .5; cursor: wait; }
  #status { min-height: 20px; color: var(--muted); font-size: 13px; margin: 4px 0 12px; }
  #status.error { color: var(--bad); }
  #upload { display: none; gap: 14px; align-items: flex-start; background: #fff; border: 1px solid var(--line);
            border-radius: 8px; padding: 10px; margin-bottom: 14px; }
  #upload.shown { display: flex; }
  #upload img { width: 128px; height: 128px; object-fit: contain; image-rendering: pixelated; background: #eee; }
  #grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(180px, 1fr)); gap: 12px; }
  .card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 8px; }
  .card img { width: 100%; aspect-ratio: 1; object-fit: contain; image-rendering: pixelated; background: #eee; border-radius: 4px; }
  .card.video { grid-column: span 2; }
  .card img.strip { aspect-ratio: auto; image-rendering: auto; }
  .head { display: flex; gap: 6px; justify-content: space-between; align-items: baseline; margin-top: 4px; }
  .rank { font-weight: 600; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
  .score { color: var(--muted); font-variant-numeric: tabular-nums; }
  .caption { font-size: 13px; margin: 4px 0; min-height: 18px; }
  .generated { font-size: 13px; color: var(--accent); margin: 4px 0; min-height: 18px; }
  .card button { padding: 4px 8px; font-size: 12px; }
  #locate-controls { display: none; gap: 8px; align-items: center; font-size: 13px; color: var(--muted); }
  #locate-controls.shown { display: flex; }
  #min-score { width: 64px; }
  .frame { position: relative; }
  .frame img { display: block; }
  .boxes { position: absolute; pointer-events: none; }
  #grid.no-boxes .boxes, #grid.no-boxes .where { display: none; }
  .box { position: absolute; border: 2px solid #e6261e; box-shadow: 0 0 0 1px rgba(255,255,255,.7); }
  .box-score { position: absolute; left: -2px; top: -2px; transform: translateY(-100%); padding: 0 3px;
               font-size: 11px; line-height: 14px; color: #fff; background: #e6261e; white-space: nowrap;
               font-variant-numeric: tabular-nums; }
  .where { font-size: 12px; color: var(--muted); margin: 2px 0; }
</style>
</head>
<body>
<header>
  <h1>mammut search</h1>
  <p id="about">loading the index...</p>
</header>
<main>
  <form id="text-form">
    <input id="query" type="text" name="q" placeholder="describe a picture, e.g. a cat left of a dog" autocomplete="off">
    <label>k <input id="k" type="number" min="1" value="12"></label>
    <button id="search" type="submit">Search</button>
    <span id="locate-controls" title="the served model is a detector: it can show where the query is in each result">
      <label><input id="show-boxes" type="checkbox" checked> show where</label>
      <label>min score <input id="min-score" type="number" min="0" max="1" step="0.05" value="0.1"></label>
    </span>
  </form>
  <form id="image-form">
    <input id="file" type="file" accept="image/*">
    <button id="search-image" class="plain" type="button">Search by this image</button>
    <button id="caption-upload" class="plain" type="button">Caption this image</button>
  </form>
  <div id="status" role="status"></div>
  <section id="upload">
    <img id="upload-img" alt="your image">
    <div><div class="rank">Your image</div><div id="upload-caption" class="generated"></div></div>
  </section>
  <div id="grid"></div>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const statusLine = $("status");

function say(text, isError) {
  statusLine.textContent = text;
  statusLine.className = isError ? "error" : "";
}

async function call(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    let detail = body && body.detail;
    if (Array.isArray(detail)) detail = detail.map((d) => (d.loc || []).slice(-1)[0] + ": " + d.msg).join("; ");
    throw new Error(detail || ("HTTP " + response.status));
  }
  return body;
}

const VIDEO = /\.(mp4|webm|mkv|mov|avi|m4v|ogv)$/i;  // mammut.data.video_files.VIDEO_EXTENSIONS

function kValue() { return $("k").value || "12"; }

let canLocate = false;  // /api/info: the model finds text in images (an open-vocabulary detector)

// Draw a result's boxes over its picture: the picture fills its square frame as object-fit: contain does,
// so its own rectangle is centred, max(width, height) wide; boxes are percent of that rectangle.
function drawBoxes(card, out, threshold) {
  const frame = card.querySelector(".frame");
  frame.querySelectorAll(".boxes").forEach((b) => b.remove());
  const w = out.width, h = out.height, m = Math.max(w, h);
  const layer = document.createElement("div");
  layer.className = "boxes";
  const pct = (v) => (100 * v) + "%";
  Object.assign(layer.style, { left: pct((m - w) / (2 * m)), top: pct((m - h) / (2 * m)),
                               width: pct(w / m), height: pct(h / m) });
  out.boxes.forEach((b) => {
    const [x0, y0, x1, y1] = b.box;
    const box = document.createElement("div");
    box.className = "box";
    Object.assign(box.style, { left: pct(x0 / w), top: pct(y0 / h),
                               width: pct((x1 - x0) / w), height: pct((y1 - y0) / h) });
    const label = document.createElement("span");
    label.className = "box-score";
    label.textContent = b.score.toFixed(2);
    box.append(label);
    layer.append(box);
  });
  frame.append(layer);
  const best = out.boxes.length ? out.boxes[0].score.toFixed(2) : null;
  card.querySelector(".where").textContent = best ? out.boxes.length + " box" + (out.boxes.length > 1 ? "es" : "") +
    ", best " + best : "not found above " + Number(threshold).toFixed(2);
}

// Ask where the query is in a result of a text search once it is (nearly) on screen, unless already asked
// at this min score: a long list costs the server only what is looked at.
function locateCard(card) {
  if (!canLocate || !$("show-boxes").checked || !card.dataset.seen) return;
  const threshold = String(Math.min(1, Math.max(0, Number($("min-score").value) || 0)));
  if (card.dataset.located === threshold) return;
  card.dataset.located = threshold;
  const params = new URLSearchParams({ q: card.dataset.query, threshold: threshold, max_boxes: "5" });
  call("/api/images/" + card.dataset.id + "/locate?" + params).then((out) => {
    if (card.dataset.located === threshold) drawBoxes(card, out, threshold);  // not a later min score's
  }).catch((e) => {
    delete card.dataset.located;
    say(e.message, true);
  });
}

function locateCards() { document.querySelectorAll("#grid .card[data-query]").forEach(locateCard); }

const onScreen = "IntersectionObserver" in window ? new IntersectionObserver((entries) => entries.forEach((e) => {
  if (e.isIntersecting) { e.target.dataset.seen = "1"; locateCard(e.target); }
}), { rootMargin: "300px" }) : null;

function render(data, what, query) {
  const grid = $("grid");
  if (onScreen) onScreen.disconnect();
  grid.replaceChildren();
  data.results.forEach((r, i) => {
    const card = document.createElement("div");
    card.className = "card";
    card.dataset.id = r.id;
    const img = document.createElement("img");
    const video = VIDEO.test(r.name);
    if (video) { card.classList.add("video"); img.classList.add("strip"); }
    img.src = r.image_url;
    img.alt = r.name;
    img.title = r.name + " (" + (r.width || "?") + "x" + (r.height || "?") + ")";
    const head = document.createElement("div");
    head.className = "head";
    const rank = document.createElement("span");
    rank.className = "rank";
    rank.textContent = "#" + (i + 1) + " " + r.name;
    rank.title = r.name;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = r.score.toFixed(3);
    head.append(rank, score);
    const caption = document.createElement("div");
    caption.className = "caption";
    caption.textContent = r.caption || "";
    const generated = document.createElement("div");
    generated.className = "generated";
    const button = document.createElement("button");
    button.className = "plain caption-this";
    button.type = "button";
    button.textContent = video ? "Caption this video" : "Caption this image";
    button.addEventListener("click", async () => {
      button.disabled = true;
      generated.textContent = "captioning...";
      try {
        const out = await call("/api/images/" + r.id + "/caption", { method: "POST" });
        generated.textContent = "model: " + out.caption;
      } catch (e) {
        generated.textContent = "";
        say(e.message, true);
      } finally {
        button.disabled = false;
      }
    });
    if (canLocate && query !== undefined && !video) {  // a text search, a model that finds text: room for boxes
      card.dataset.query = query;
      const frame = document.createElement("div");
      frame.className = "frame";
      frame.append(img);
      const where = document.createElement("div");
      where.className = "where";
      card.append(frame, head, where, caption, generated, button);
      if (onScreen) onScreen.observe(card); else card.dataset.seen = "1";
    } else {
      card.append(img, head, caption, generated, button);
    }
    grid.append(card);
  });
  say(data.results.length + " results for " + what);
  if (!onScreen) locateCards();
}

$("text-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const q = $("query").value.trim();
  if (!q) { say("type something to search for", true); return; }
  say("searching...");
  try {
    render(await call("/api/search?" + new URLSearchParams({ q: q, k: kValue() })), "\u201c" + q + "\u201d", q);
  } catch (e) { say(e.message, true); }
});

function chosenFile() {
  const file = $("file").files[0];
  if (!file) { say("choose an image file first", true); return null; }
  $("upload-img").onerror = () => $("upload").classList.remove("shown");  // not a picture the browser shows
  $("upload-img").src = URL.createObjectURL(file);
  $("upload").classList.add("shown");
  return file;
}

function form(file) {
  const data = new FormData();
  data.append("file", file);
  return { method: "POST", body: data };
}

$("search-image").addEventListener("click", async () => {
  const file = chosenFile();
  if (!file) return;
  say("searching...");
  try {
    render(await call("/api/search/image?" + new URLSearchParams({ k: kValue() }), form(file)), file.name);
  } catch (e) { say(e.message, true); }
});

$("caption-upload").addEventListener("click", async () => {
  const file = chosenFile();
  if (!file) return;
  $("upload-caption").textContent = "captioning...";
  try {
    const out = await call("/api/caption", form(file));
    $("upload-caption").textContent = "model: " + out.caption;
    say("captioned " + file.name);
  } catch (e) {
    $("upload-caption").textContent = "";
    say(e.message, true);
  }
});

$("show-boxes").addEventListener("change", () => {
  $("grid").classList.toggle("no-boxes", !$("show-boxes").checked);
  locateCards();
});
$("min-score").addEventListener("change", locateCards);

call("/api/info").then((info) => {
  $("about").textContent = info.size + " images \u00b7 " + info.index + " index \u00b7 model " + info.model +
    (info.locate ? " \u00b7 finds text in images" : "");
  $("k").max = info.max_k;
  canLocate = Boolean(info.locate);
  $("locate-controls").classList.toggle("shown", canLocate);
}).catch((e) => say(e.message, true));
</script>
</body>
</html>
"""
