// vlora playground: one image, the base and adapters answering side by side; a batch check; the adapter console.
// Everything the models or manifests say is put on the page as text (textContent), never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "vlora-api-key";
const MAX_BATCH = 50;
const PUNCT = "!\"#$%&'()*+,\\-./:;<=>?@[\\\\\\]^_`{|}~";
const EDGES = new RegExp(`^[${PUNCT}\\s]+|[${PUNCT}\\s]+$`, "g");
const state = { key: sessionStorage.getItem(KEY) || "", image: null, imageName: "", admin: false, cards: [],
                lastCounts: null, consoleTimer: null };

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function notice(text) {
  const box = $("notice");
  box.textContent = text || "";
  box.hidden = !text;
}

// The same normalisation as the trainer's exact match (trainer/evaluate.py: normalise).
function normalise(text) {
  return String(text || "").toLowerCase().split(/\s+/).filter(Boolean).join(" ").replace(EDGES, "");
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (state.key) h.Authorization = `Bearer ${state.key}`;
  return h;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.body !== undefined) });
  if (response.status === 401) {
    $("key-form").hidden = false;
    $("key-state").textContent = state.key ? "this key was refused" : "this server needs an API key";
    throw new Error("an API key is needed");
  }
  return response;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return `${response.status}: ${body.error ? body.error.message : JSON.stringify(body)}`;
  } catch (_) {
    return `${response.status} ${response.statusText}`;
  }
}

// -- key --------------------------------------------------------------------------------------------------

function setupKey() {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.key = $("api-key").value.trim();
    sessionStorage.setItem(KEY, state.key);
    $("api-key").value = "";
    refreshAll();
  });
  $("key-forget").addEventListener("click", () => {
    state.key = "";
    sessionStorage.removeItem(KEY);
    refreshAll();
  });
}

function showKeyState() {
  $("key-form").hidden = !state.key && !$("key-form").dataset.needed;
  $("key-state").textContent = state.key ? `key set${state.admin ? " (admin)" : ""}` : "";
}

// -- models -----------------------------------------------------------------------------------------------

async function loadModels() {
  const response = await api("/v1/models");
  if (!response.ok) throw new Error(await errorText(response));
  const models = (await response.json()).data.map((m) => m.id);
  const cards = await loadCards();
  const box = $("models");
  const checked = new Set([...box.querySelectorAll("input:checked")].map((i) => i.value));
  box.replaceChildren();
  const choices = [];
  for (const id of models) {
    choices.push(id);
    const card = cards.find((c) => c.name === id);
    for (const rev of (card && card.revisions) || []) choices.push(`${id}@${rev}`);
  }
  for (const id of choices) {
    const label = el("label", null, id.includes("@") ? "pin" : "");
    const input = document.createElement("input");
    input.type = "checkbox";
    input.value = id;
    input.checked = checked.size ? checked.has(id) : !id.includes("@");
    label.append(input, document.createTextNode(` ${id}`));
    box.append(label);
  }
}

async function loadCards() {
  const response = await api("/playground/api/adapters");
  if (!response.ok) throw new Error(await errorText(response));
  const body = await response.json();
  state.admin = body.admin;
  state.cards = body.data;
  state.available = body.available;
  showKeyState();
  return body.data;
}

function chosenModels() {
  return [...$("models").querySelectorAll("input:checked")].map((i) => i.value);
}

// -- image ------------------------------------------------------------------------------------------------

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function useFile(file) {
  if (!file || !file.type.startsWith("image/")) return;
  state.image = await readFile(file);
  state.imageName = file.name || "pasted image";
  $("image-url").value = "";
  $("preview").src = state.image;
  $("preview").hidden = false;
}

function setupImage() {
  const drop = $("drop");
  $("image-file").addEventListener("change", (e) => useFile(e.target.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    useFile(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData ? e.clipboardData.items : [])].find((i) => i.type.startsWith("image/"));
    if (item) useFile(item.getAsFile());
  });
  $("image-url").addEventListener("change", (e) => {
    const url = e.target.value.trim();
    state.image = url || null;
    state.imageName = url;
    $("preview").hidden = true;  // fetched by the server under its image URL policy, not by this page
  });
  $("image-clear").addEventListener("click", () => {
    state.image = null;
    $("image-url").value = "";
    $("image-file").value = "";
    $("preview").hidden = true;
  });
}

// -- compare ----------------------------------------------------------------------------------------------

function chatMessages(system, prompt, image) {
  const messages = [];
  if (system) messages.push({ role: "system", content: system });
  const content = [];
  if (image) content.push({ type: "image_url", image_url: { url: image } });
  content.push({ type: "text", text: prompt });
  messages.push({ role: "user", content });
  return messages;
}

function extraFields() {
  const text = $("extra").value.trim();
  if (!text) return {};
  const parsed = JSON.parse(text);
  if (typeof parsed !== "object" || Array.isArray(parsed) || parsed === null) throw new Error("extra fields: a JSON object");
  return parsed;
}

function makePane(model) {
  const pane = el("article", null, "pane");
  pane.dataset.model = model;
  pane.dataset.state = "waiting";
  const title = el("h2", model);
  const output = el("pre", "", "output");
  const stats = el("p", "waiting for the first token", "stats");
  pane.append(title, output, stats);
  return { pane, output, stats };
}

async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) yield line.slice(6);
      }
    }
  }
}

async function streamOne(model, body, view) {
  const started = performance.now();
  let first = null;
  let text = "";
  let finish = null;
  let usage = null;
  const response = await api("/v1/chat/completions", { method: "POST", body: JSON.stringify({ ...body, model }) });
  if (!response.ok) {
    view.pane.dataset.state = "error";
    view.stats.textContent = await errorText(response);
    return;
  }
  for await (const data of sseEvents(response)) {
    if (data === "[DONE]") break;
    const chunk = JSON.parse(data);
    if (chunk.error) {
      view.pane.dataset.state = "error";
      view.stats.textContent = chunk.error.message;
      return;
    }
    if (chunk.usage) usage = chunk.usage;
    for (const choice of chunk.choices || []) {
      const piece = (choice.delta && choice.delta.content) || "";
      if (piece) {
        if (first === null) first = performance.now();
        text += piece;
        view.output.textContent = text;
        view.pane.dataset.state = "streaming";
        view.stats.textContent = `TTFT ${(first - started).toFixed(0)} ms · streaming`;
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
  }
  const ended = performance.now();
  const tokens = usage ? usage.completion_tokens : 0;
  const rate = first !== null && ended > first && tokens > 1 ? ((tokens - 1) / ((ended - first) / 1000)).toFixed(1) : "–";
  view.stats.textContent = `TTFT ${first === null ? "–" : (first - started).toFixed(0)} ms · ${rate} tok/s · `
    + `prompt ${usage ? usage.prompt_tokens : "?"} / completion ${tokens} tokens · finish: ${finish}`;
  view.pane.dataset.state = "done";
  view.pane.dataset.finish = finish || "";
}

async function runCompare() {
  notice("");
  let extra;
  try {
    extra = extraFields();
  } catch (error) {
    notice(`extra request fields: ${error.message}`);
    return;
  }
  const models = chosenModels();
  if (!models.length) {
    notice("choose at least one model");
    return;
  }
  const temperature = Number($("temperature").value);
  const body = {
    messages: chatMessages($("system").value.trim(), $("prompt").value, state.image),
    temperature, max_tokens: Number($("max-tokens").value), seed: Number($("seed").value), stream: true,
    stream_options: { include_usage: true }, ...extra,
  };
  $("repro").textContent = temperature === 0
    ? "temperature 0: greedy decoding, the same answers on every run"
    : `sampled with seed ${body.seed}: the same seed gives the same answers on this server`;
  const panes = $("panes");
  panes.replaceChildren();
  const views = models.map((model) => {
    const view = makePane(model);
    panes.append(view.pane);
    return view;
  });
  $("run").disabled = true;
  try {
    await Promise.all(models.map((model, i) => streamOne(model, body, views[i]).catch((error) => {
      views[i].pane.dataset.state = "error";
      views[i].stats.textContent = error.message;
    })));
  } finally {
    $("run").disabled = false;
  }
}

// -- batch ------------------------------------------------------------------------------------------------

function partText(content) {
  if (typeof content === "string") return content;
  return (content || []).filter((p) => p.type === "text").map((p) => p.text).join("");
}

function toOpenAI(messages, uploads) {
  return messages.map((m) => {
    if (typeof m.content === "string") return { role: m.role, content: m.content };
    const content = m.content.map((part) => {
      if (part.type === "text") return { type: "text", text: part.text };
      if (part.type === "image_url") return part;
      if (part.type === "image") {
        const ref = typeof part.image === "string" ? part.image : "";
        const name = ref.split("/").pop();
        const url = ref.startsWith("data:") || /^https?:/.test(ref) ? ref : uploads.get(name);
        if (!url) throw new Error(`image '${ref}' is not uploaded (choose it under Images)`);
        return { type: "image_url", image_url: { url } };
      }
      throw new Error(`unsupported part type '${part.type}'`);
    });
    return { role: m.role, content };
  });
}

function parseBatch(text, uploads) {
  const lines = text.split("\n").map((l) => l.trim()).filter(Boolean);
  if (lines.length > MAX_BATCH) throw new Error(`at most ${MAX_BATCH} examples (${lines.length} given)`);
  return lines.map((line, i) => {
    let record;
    try {
      record = JSON.parse(line);
    } catch (error) {
      throw new Error(`line ${i + 1}: not JSON (${error.message})`);
    }
    const messages = record.messages || [];
    const last = messages.map((m) => m.role).lastIndexOf("assistant");
    if (last < 0) throw new Error(`line ${i + 1}: no assistant turn to compare with`);
    try {
      return { prompt: toOpenAI(messages.slice(0, last), uploads), label: partText(messages[last].content) };
    } catch (error) {
      throw new Error(`line ${i + 1}: ${error.message}`);
    }
  });
}

async function pool(jobs, limit) {
  const results = new Array(jobs.length);
  let next = 0;
  async function worker() {
    while (next < jobs.length) {
      const i = next++;
      results[i] = await jobs[i]();
    }
  }
  await Promise.all(Array.from({ length: Math.min(limit, jobs.length) }, worker));
  return results;
}

async function runBatch() {
  notice("");
  const uploads = new Map();
  for (const file of $("batch-images").files) uploads.set(file.name, await readFile(file));
  let examples;
  try {
    examples = parseBatch($("batch-jsonl").value, uploads);
  } catch (error) {
    notice(`batch: ${error.message}`);
    return;
  }
  const models = chosenModels();
  if (!examples.length || !models.length) {
    notice("batch: paste examples and choose at least one model");
    return;
  }
  const maxTokens = Number($("batch-max-tokens").value);
  $("batch-state").textContent = `running ${examples.length * models.length} requests`;
  $("batch-run").disabled = true;
  const jobs = [];
  for (const example of examples) {
    for (const model of models) {
      jobs.push(async () => {
        const response = await api("/v1/chat/completions", { method: "POST", body: JSON.stringify({
          model, messages: example.prompt, temperature: 0, max_tokens: maxTokens, seed: 0 }) });
        if (!response.ok) return { error: await errorText(response) };
        const body = await response.json();
        return { text: body.choices[0].message.content || "" };
      });
    }
  }
  let answers;
  try {
    answers = await pool(jobs, 4);
  } finally {
    $("batch-run").disabled = false;
  }
  renderGrid(examples, models, answers);
  $("batch-state").textContent = `${examples.length} examples × ${models.length} models, greedy`;
}

function renderGrid(examples, models, answers) {
  const head = $("batch-head");
  head.replaceChildren(el("th", "#"), el("th", "label"), ...models.map((m) => el("th", m)));
  const body = $("batch-body");
  body.replaceChildren();
  const hits = models.map(() => 0);
  examples.forEach((example, e) => {
    const row = el("tr");
    row.append(el("td", e + 1), el("td", example.label, "label"));
    const said = new Set();
    models.forEach((model, m) => {
      const answer = answers[e * models.length + m];
      const cell = el("td", answer.error ? answer.error : answer.text);
      const hit = !answer.error && normalise(answer.text) === normalise(example.label);
      cell.className = answer.error ? "error" : hit ? "hit" : "miss";
      if (hit) hits[m] += 1;
      said.add(answer.error ? `error:${m}` : normalise(answer.text));
      row.append(cell);
    });
    if (said.size > 1) row.className = "disagree";
    body.append(row);
  });
  const foot = $("batch-foot");
  foot.replaceChildren(el("th", ""), el("th", "exact match"), ...models.map((model, m) => {
    const cell = el("th", `${((100 * hits[m]) / examples.length).toFixed(1)}% (${hits[m]}/${examples.length})`);
    cell.dataset.model = model;
    cell.dataset.exactMatch = String(hits[m] / examples.length);
    return cell;
  }));
  $("batch-grid").hidden = false;
}

async function loadBatchFile(event) {
  const file = event.target.files[0];
  if (file) $("batch-jsonl").value = await file.text();
}

// -- console ----------------------------------------------------------------------------------------------

function seconds(value) {
  return value === null || value === undefined ? "–" : `${(value * 1000).toFixed(0)} ms`;
}

function evalText(card) {
  const ev = card.eval || {};
  const pct = (f) => (f && typeof f.exact_match === "number" ? `${(100 * f.exact_match).toFixed(1)}%` : "–");
  return ev.adapter || ev.base ? `${pct(ev.adapter)} / ${pct(ev.base)} (n=${(ev.adapter || ev.base).n})` : "–";
}

function goldenText(card) {
  if (!card.golden) return "–";
  if (card.golden.problems.length) return `failing: ${card.golden.problems.join("; ")}`;
  if (!card.golden.samples) return "none";
  return card.golden.checked ? `${card.golden.samples} passed` : `${card.golden.samples} (checked at load)`;
}

async function adminAction(method, path, body) {
  const response = await api(path, { method, body: body === undefined ? undefined : JSON.stringify(body) });
  notice(response.ok ? "" : await errorText(response));
  await refreshConsole();
  await loadModels().catch(() => {});
}

function renderConsole(now) {
  const counts = new Map(state.cards.map((c) => [c.name, c.live ? c.live.requests : 0]));
  const previous = state.lastCounts;
  state.lastCounts = { at: now, counts };
  const body = $("console-body");
  body.replaceChildren();
  document.querySelectorAll(".admin-only").forEach((node) => { node.hidden = !state.admin; });
  $("admin-form").hidden = !state.admin;
  $("admin-available").replaceChildren(...(state.available || []).map((name) => {
    const option = document.createElement("option");
    option.value = name;
    return option;
  }));
  for (const card of state.cards) {
    const row = el("tr");
    row.dataset.adapter = card.name;
    const rate = previous && previous.counts.has(card.name) && now > previous.at
      ? ((counts.get(card.name) - previous.counts.get(card.name)) / ((now - previous.at) / 1000)).toFixed(2) : "–";
    const targets = card.base ? "(base model)" : Object.entries(card.targets || {}).map(([k, v]) => `${k}: ${v.length}`).join(", ");
    row.append(
      el("td", card.name), el("td", card.base ? "–" : card.revision || "not loaded"),
      el("td", card.loaded ? "yes" : "no", card.loaded ? "hit" : ""), el("td", card.rank ?? "–"),
      el("td", targets || "–"), el("td", card.base_weights_sha256 ? card.base_weights_sha256.slice(0, 12) : "–"),
      el("td", card.base ? "–" : evalText(card)), el("td", card.base ? "–" : goldenText(card)),
      el("td", seconds(card.live && card.live.ttft_p50_s)), el("td", seconds(card.live && card.live.ttft_p95_s)),
      el("td", rate),
    );
    if (state.admin) {
      const cell = el("td");
      if (!card.base && card.loaded) {
        const unload = el("button", "Unload");
        unload.type = "button";
        unload.className = "unload";
        unload.addEventListener("click", () => adminAction("DELETE", `/v1/adapters/${encodeURIComponent(card.name)}`));
        cell.append(unload);
      }
      row.append(cell);
    }
    body.append(row);
  }
}

async function refreshConsole() {
  try {
    await loadCards();
    renderConsole(performance.now());
  } catch (error) {
    notice(error.message);
  }
}

function setupConsole() {
  $("console-refresh").addEventListener("click", refreshConsole);
  $("admin-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const revision = $("admin-revision").value.trim();
    adminAction("POST", "/v1/adapters", { name: $("admin-name").value.trim(), ...(revision ? { revision } : {}) });
  });
}

// -- views ------------------------------------------------------------------------------------------------

function show(view) {
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.view === view);
  for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== `view-${view}`;
  clearInterval(state.consoleTimer);
  if (view === "console") {
    refreshConsole();
    state.consoleTimer = setInterval(refreshConsole, 5000);
  }
}

async function refreshAll() {
  notice("");
  try {
    await loadModels();
    $("key-form").hidden = !state.key;
  } catch (error) {
    notice(error.message);
  }
  if (!$("view-console").hidden) refreshConsole();
}

document.addEventListener("DOMContentLoaded", () => {
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => show(tab.dataset.view));
  setupKey();
  setupImage();
  setupConsole();
  $("run").addEventListener("click", runCompare);
  $("batch-run").addEventListener("click", runBatch);
  $("batch-file").addEventListener("change", loadBatchFile);
  refreshAll();
});
