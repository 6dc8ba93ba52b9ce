// medmllm web page: upload a file, preview it (server-rendered PNG, window presets, slice slider),
// ask questions and read the answer as it streams (fetch + ReadableStream over the SSE endpoint).
// No framework, no build step, no third-party code.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, b64: null, sent: false, history: [], modelId: null, busy: false, previewUrl: null };
const IMAGE_MIME = { png: "image/png", jpg: "image/jpeg", jpeg: "image/jpeg", dcm: "application/dicom", dicom: "application/dicom" };

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setStatus(text) { $("status").textContent = text; }

async function errorText(res) {
  try { const body = await res.json(); return (body.error && body.error.message) || res.statusText; }
  catch (e) { return res.status + " " + res.statusText; }
}

function extension(name) {
  const lower = name.toLowerCase();
  if (lower.endsWith(".nii.gz")) return "nii.gz";
  const dot = lower.lastIndexOf(".");
  return dot < 0 ? "" : lower.slice(dot + 1);
}

function guessKind(name) {
  const ext = extension(name);
  if (ext in IMAGE_MIME) return "image";
  if (ext === "nii" || ext === "nii.gz") return "volume";
  if (ext === "zip" || ext === "hea") return "signal";
  if (ext === "csv") return /ecg|ekg|signal|lead/i.test(name) ? "signal" : "ehr";
  return "ehr";
}

// The kind a ZIP holds, from the file names in its central directory: a .hea means a WFDB record
// (signal); otherwise DICOM slices (volume). Unreadable ZIPs: "signal" (the server then says why).
async function zipKind(file) {
  try {
    const tailLen = Math.min(file.size, 65557);                       // EOCD (22 bytes) + longest comment
    const tail = new DataView(await file.slice(file.size - tailLen).arrayBuffer());
    let eocd = -1;
    for (let i = tailLen - 22; i >= 0; i--) { if (tail.getUint32(i, true) === 0x06054b50) { eocd = i; break; } }
    if (eocd < 0) return "signal";
    const count = tail.getUint16(eocd + 10, true), size = tail.getUint32(eocd + 12, true);
    const offset = tail.getUint32(eocd + 16, true);
    const cd = new DataView(await file.slice(offset, offset + size).arrayBuffer());
    const decoder = new TextDecoder();
    let pos = 0, names = [];
    for (let k = 0; k < count && pos + 46 <= cd.byteLength && cd.getUint32(pos, true) === 0x02014b50; k++) {
      const n = cd.getUint16(pos + 28, true), extra = cd.getUint16(pos + 30, true), note = cd.getUint16(pos + 32, true);
      names.push(decoder.decode(new Uint8Array(cd.buffer, pos + 46, n)).toLowerCase());
      pos += 46 + n + extra + note;
    }
    return names.some(n => n.endsWith(".hea")) ? "signal" : names.length ? "volume" : "signal";
  } catch (e) { return "signal"; }
}

async function loadModel() {
  try {
    const res = await fetch("/v1/models", { headers: headers() });
    if (res.status === 401) { $("model").textContent = "enter the API key"; return; }
    if (!res.ok) { $("model").textContent = await errorText(res); return; }
    const m = (await res.json()).data[0];
    state.modelId = m.id;
    $("model").textContent = m.id + " · takes " + m.modalities.join(", ") + " · context " + m.max_model_len;
  } catch (e) { $("model").textContent = "server unreachable"; }
}

function readBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function onFile() {
  const file = $("file").files[0];
  if (!file) return;
  state.file = file; state.sent = false; state.b64 = null;
  $("slice-row").hidden = true;
  $("slice").value = 0;
  $("kind").value = extension(file.name) === "zip" ? await zipKind(file) : guessKind(file.name);
  $("file-status").textContent = file.name + " (" + Math.round(file.size / 1024) + " KiB) — loading…";
  state.b64 = await readBase64(file);
  await refreshPreview(null);
}

function clearFile() {
  state.file = null; state.b64 = null; state.sent = false;
  $("file").value = "";
  $("preview").hidden = true; $("ehr-table").hidden = true; $("slice-row").hidden = true;
  $("file-status").textContent = "no file";
}

async function refreshPreview(slice) {
  if (!state.file) return;
  const q = new URLSearchParams({ kind: $("kind").value, window: $("window").value, filename: state.file.name });
  if (slice !== null) q.set("slice", String(slice));
  const res = await fetch("/v1/preview?" + q.toString(), {
    method: "POST", headers: headers({ "Content-Type": "application/octet-stream" }), body: state.file });
  if (!res.ok) {
    $("preview").hidden = true; $("ehr-table").hidden = true;
    $("file-status").textContent = state.file.name + ": " + await errorText(res);
    return;
  }
  const type = res.headers.get("Content-Type") || "";
  if (type.startsWith("application/json")) { showEhr(await res.json()); return; }
  const blob = await res.blob();
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = URL.createObjectURL(blob);
  const img = $("preview");
  img.src = state.previewUrl; img.hidden = false; $("ehr-table").hidden = true;
  const n = parseInt(res.headers.get("X-Medmllm-Slices") || "1", 10);
  const i = parseInt(res.headers.get("X-Medmllm-Slice") || "0", 10);
  $("slice-row").hidden = !(n > 1);
  $("slice").max = String(Math.max(0, n - 1)); $("slice").value = String(i);
  $("slice-label").textContent = (i + 1) + " / " + n;
  $("file-status").textContent = state.file.name + " — " + $("kind").value + (n > 1 ? ", " + n + " slices" : "");
}

function showEhr(summary) {
  const table = $("ehr-table");
  table.replaceChildren();
  for (const [name, value] of Object.entries(summary.features)) {
    const tr = document.createElement("tr");
    const unit = summary.units[name] ? " " + summary.units[name] : "";
    for (const text of [name, value === null ? "—" : value + unit]) {
      const td = document.createElement("td"); td.textContent = text; tr.appendChild(td);
    }
    table.appendChild(tr);
  }
  table.hidden = false; $("preview").hidden = true;
  $("file-status").textContent = state.file.name + " — EHR, " + Object.keys(summary.features).length +
    " features, " + summary.notes + " notes";
}

let sliceTimer = null;
function onSlice() {
  const i = parseInt($("slice").value, 10);
  $("slice-label").textContent = (i + 1) + " / " + (parseInt($("slice").max, 10) + 1);
  clearTimeout(sliceTimer);
  sliceTimer = setTimeout(() => refreshPreview(i), 120);
}

function filePart() {
  const kind = $("kind").value, win = $("window").value, ext = extension(state.file.name);
  if (kind === "image" && ext in IMAGE_MIME && win === "auto") {
    return { type: "image_url", image_url: { url: "data:" + IMAGE_MIME[ext] + ";base64," + state.b64 } };
  }
  const part = { type: "input_file", input_file: { kind: kind, data: state.b64, filename: state.file.name } };
  if (win !== "auto" && (kind === "image" || kind === "volume")) part.input_file.window = win;
  return part;
}

function bubble(role, text, attachment) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  if (attachment) { const a = document.createElement("span"); a.className = "att"; a.textContent = attachment; div.appendChild(a); }
  const body = document.createElement("span"); body.className = "body"; body.textContent = text;
  div.appendChild(body);
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return body;
}

async function ask(event) {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question || state.busy) return;
  if (state.file && !state.b64) { setStatus("the file is still loading"); return; }
  const content = [];
  let attachment = null;
  if (state.file && !state.sent) { content.push(filePart()); attachment = "attached: " + state.file.name; }
  content.push({ type: "text", text: question });
  const messages = state.history.concat([{ role: "user", content: content }]);
  bubble("user", question, attachment);
  $("question").value = "";
  const out = bubble("assistant", "");
  state.busy = true; $("ask").disabled = true; setStatus("thinking…");
  const body = { messages: messages, stream: true, stream_options: { include_usage: true },
                 max_tokens: parseInt($("max-tokens").value, 10) || 64,
                 temperature: parseFloat($("temperature").value) || 0 };
  if (state.modelId) body.model = state.modelId;
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body) });
    if (!res.ok) throw new Error(await errorText(res));
    const result = await readStream(res, (text) => {
      out.textContent += text; $("log").scrollTop = $("log").scrollHeight; setStatus("answering…");
    });
    state.history = messages.concat([{ role: "assistant", content: out.textContent }]);
    if (attachment) state.sent = true;
    setStatus("done" + (result.usage ? " · " + result.usage.prompt_tokens + " prompt + " +
      result.usage.completion_tokens + " answer tokens" : "") + (result.finish ? " · " + result.finish : ""));
  } catch (e) {
    out.parentElement.classList.add("error");
    out.textContent = String(e.message || e);
    setStatus("error");
  } finally {
    state.busy = false; $("ask").disabled = false;
  }
}

async function readStream(res, onText) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", usage = null, finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return { usage: usage, finish: finish };
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        const choice = chunk.choices && chunk.choices[0];
        if (choice && choice.delta && choice.delta.content) onText(choice.delta.content);
        if (choice && choice.finish_reason) finish = choice.finish_reason;
      }
    }
  }
  return { usage: usage, finish: finish };
}

function reset() {
  state.history = []; state.sent = false;
  $("log").replaceChildren();
  setStatus("ready");
}

$("file").addEventListener("change", () => onFile().catch((e) => { $("file-status").textContent = String(e); }));
$("kind").addEventListener("change", () => refreshPreview(null));
$("window").addEventListener("change", () => refreshPreview($("slice-row").hidden ? null : parseInt($("slice").value, 10)));
$("slice").addEventListener("input", onSlice);
$("clear-file").addEventListener("click", clearFile);
$("ask-form").addEventListener("submit", ask);
$("reset").addEventListener("click", reset);
$("api-key").addEventListener("change", loadModel);
loadModel();
