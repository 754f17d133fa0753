"""The search page of ``mammut serve``: one HTML document with its CSS and JS inline (no build
step, nothing fetched from elsewhere). It talks to the JSON API of :mod:`mammut.apps.server`.
A video result (a name with a video suffix) shows the strip of frames the server draws for it,
on a card two columns wide."""

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

function render(data, what) {
  const grid = $("grid");
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
    card.append(img, head, caption, generated, button);
    grid.append(card);
  });
  say(data.results.length + " results for " + what);
}

$("text-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const q = $("query").value.trim();
  if (!q) { say("type something to search for", true); return; }
  say("searching...");
  try {
    render(await call("/api/search?" + new URLSearchParams({ q: q, k: kValue() })), "\u201c" + q + "\u201d");
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

call("/api/info").then((info) => {
  $("about").textContent = info.size + " images \u00b7 " + info.index + " index \u00b7 model " + info.model;
  $("k").max = info.max_k;
}).catch((e) => say(e.message, true));
</script>
</body>
</html>
"""
