// The studio page: asks the local server for samples and edits, draws masks, shows the decoding.
// Plain JavaScript, no libraries: everything the page needs is served by `python -m studio`.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  info: null,      // /api/info
  samples: [],     // results of the last generate: {png, tokens, strip, fixed}
  current: null,   // the picture in the editor (same shape; tokens null for an upload)
  history: [],     // earlier pictures, for undo
  mask: null,      // Uint8Array(R * R), 1 = marked
  box: null,       // [x0, y0, x1, y1] when the mark is one box, else null (a painted mask)
  drag: null,      // pixel where the pointer went down
  last: null,      // the brush's previous pixel in this stroke
  busy: false,
};

// ---- requests ----
async function api(path, body) {
  const response = await fetch(path, body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
  });
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || `${response.status} ${response.statusText}`);
  return data;
}

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function run(label, work) {
  if (state.busy) return;
  state.busy = true;
  document.body.classList.add("busy");
  status(`${label}…`);
  try {
    await work();
  } catch (error) {
    status(`${label} failed: ${error.message}`, true);
  } finally {
    state.busy = false;
    document.body.classList.remove("busy");
    updateButtons();
  }
}

function sampling() {
  const body = {
    seed: Number($("seed").value), steps: Number($("steps").value), order: $("order").value,
    temperature: Number($("temperature").value),
    temperature_end: $("anneal").checked ? Number($("temperature-end").value) : null,
    choice_temperature: Number($("choice").value), choice_schedule: $("choice-schedule").value,
  };
  if (state.info.conditional && $("use-attrs").checked) {
    body.attrs = {};
    for (const box of document.querySelectorAll("#attrs input")) body.attrs[box.name] = box.checked ? 1 : 0;
    body.cfg = Number($("cfg").value);
    body.cfg_schedule = $("cfg-schedule").value;
    body.cfg_power = Number($("cfg-power").value);
  }
  return body;
}

// ---- sampling ----
function generate() {
  return run("generating", async () => {
    const body = {...sampling(), n: Number($("n").value)};
    const result = await api("/api/generate", body);
    state.samples = result.images;
    const grid = $("grid");
    grid.replaceChildren();
    result.images.forEach((sample, i) => {
      const button = document.createElement("button");
      button.className = "thumb";
      button.type = "button";
      button.title = `sample ${i + 1} (seed ${body.seed}): click to edit`;
      const img = document.createElement("img");
      img.src = sample.png;
      img.alt = `sample ${i + 1}`;
      button.append(img);
      button.addEventListener("click", () => {
        for (const other of grid.children) other.classList.toggle("selected", other === button);
        openEditor(sample, true);
      });
      grid.append(button);
    });
    status(`${result.images.length} samples in ${result.seconds.toFixed(2)} s ` +
           `(seed ${body.seed}, T = ${body.steps}, ${body.order} order)`);
  });
}

// ---- the editor ----
function openEditor(picture, fresh) {
  if (fresh) state.history = [];
  state.current = picture;
  $("editor").hidden = false;
  $("editor").dataset.version = String(Number($("editor").dataset.version || 0) + 1);
  $("download").href = picture.png;
  clearMask();
  showStrip(picture);
}

function clearMask() {
  const r = state.info.resolution;
  state.mask = new Uint8Array(r * r);
  state.box = null;
  draw();
  updateButtons();
}

function draw() {
  const picture = state.current;
  if (!picture) return;
  const r = state.info.resolution;
  const view = $("view");
  const ctx = view.getContext("2d");
  const img = new Image();
  img.onload = () => {
    ctx.imageSmoothingEnabled = false;
    ctx.clearRect(0, 0, view.width, view.height);
    ctx.drawImage(img, 0, 0, view.width, view.height);
    const overlay = new ImageData(r, r);
    state.mask.forEach((on, i) => { if (on) overlay.data.set([255, 60, 60, 100], 4 * i); });
    const small = document.createElement("canvas");
    small.width = small.height = r;
    small.getContext("2d").putImageData(overlay, 0, 0);
    ctx.drawImage(small, 0, 0, view.width, view.height);
  };
  img.src = picture.png;
}

function pixelAt(event) {
  const rect = $("view").getBoundingClientRect();
  const r = state.info.resolution;
  const clamp = (v) => Math.min(r - 1, Math.max(0, Math.floor(v)));
  return [clamp((event.clientX - rect.left) / rect.width * r), clamp((event.clientY - rect.top) / rect.height * r)];
}

function tool() { return document.querySelector("input[name=tool]:checked").value; }

function mark(event) {
  const r = state.info.resolution;
  const [x, y] = pixelAt(event);
  if (tool() === "box") {
    const [x0, y0] = state.drag;
    state.box = [Math.min(x0, x), Math.min(y0, y), Math.max(x0, x) + 1, Math.max(y0, y) + 1];
    state.mask.fill(0);
    for (let j = state.box[1]; j < state.box[3]; j++) state.mask.fill(1, j * r + state.box[0], j * r + state.box[2]);
  } else {
    if (state.box) state.mask.fill(0);  // a stroke after a box starts a new mask
    state.box = null;
    const [px, py] = state.last || [x, y];  // paint along the segment, so fast strokes leave no gaps
    const n = Math.max(Math.abs(x - px), Math.abs(y - py), 1);
    for (let k = 0; k <= n; k++) dab(Math.round(px + (x - px) * k / n), Math.round(py + (y - py) * k / n));
    state.last = [x, y];
  }
  draw();
}

function dab(x, y) {
  const r = state.info.resolution, radius = Number($("brush").value) - 0.5;
  for (let j = Math.max(0, Math.floor(y - radius)); j <= Math.min(r - 1, y + radius); j++) {
    for (let i = Math.max(0, Math.floor(x - radius)); i <= Math.min(r - 1, x + radius); i++) {
      if ((i - x) ** 2 + (j - y) ** 2 <= radius * radius) state.mask[j * r + i] = 1;
    }
  }
}

function maskDataURL() {
  const r = state.info.resolution;
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = r;
  const image = new ImageData(r, r);
  state.mask.forEach((on, i) => image.data.set(on ? [255, 255, 255, 255] : [0, 0, 0, 255], 4 * i));
  canvas.getContext("2d").putImageData(image, 0, 0);
  return canvas.toDataURL("image/png");
}

function regenerate() {
  return run("regenerating", async () => {
    const mode = document.querySelector("input[name=mode]:checked").value;
    const body = {...sampling(), seed: Number($("edit-seed").value), image: state.current.png,
                  tokens: state.current.tokens, mode};
    if (state.box) body.box = state.box; else body.mask = maskDataURL();
    const result = await api("/api/edit", body);
    state.history.push(state.current);
    openEditor(result.images[0], false);
    $("edit-seed").value = String(Number($("edit-seed").value) + 1);  // the next click gives another variant
    status(`${mode === "inpaint" ? "inpainted" : "outpainted"} in ${result.seconds.toFixed(2)} s`);
  });
}

function undo() {
  if (state.history.length) openEditor(state.history.pop(), false);
  updateButtons();
}

function upload(file) {
  // Centre-crop and resize to the model's size here, so the picture shown is the picture kept.
  const r = state.info.resolution;
  const img = new Image();
  img.onload = () => {
    const side = Math.min(img.width, img.height);
    const canvas = document.createElement("canvas");
    canvas.width = canvas.height = r;
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(img, (img.width - side) / 2, (img.height - side) / 2, side, side, 0, 0, r, r);
    openEditor({png: canvas.toDataURL("image/png"), tokens: null, strip: null, fixed: null}, true);
    status(`opened ${file.name} (encoded by the tokenizer when edited)`);
    URL.revokeObjectURL(img.src);
  };
  img.onerror = () => status(`${file.name} is not an image the browser can read`, true);
  img.src = URL.createObjectURL(file);
}

function showStrip(picture) {
  const strip = $("strip");
  strip.replaceChildren();
  $("strip-download").hidden = !picture.strip;
  if (!picture.strip) return;
  $("strip-download").href = picture.strip;
  const r = state.info.resolution, total = state.info.grid[0] * state.info.grid[1];
  const img = new Image();
  img.onload = () => picture.fixed.forEach((count, t) => {
    const figure = document.createElement("figure");
    const canvas = document.createElement("canvas");
    canvas.width = canvas.height = r;
    canvas.getContext("2d").drawImage(img, t * (r + 1), 0, r, r, 0, 0, r, r);
    const caption = document.createElement("figcaption");
    caption.textContent = `${t + 1}: ${count}/${total}`;
    figure.append(canvas, caption);
    strip.append(figure);
  });
  img.src = picture.strip;
}

function updateButtons() {
  const marked = state.mask && state.mask.some((v) => v);
  $("regenerate").disabled = state.busy || !marked;
  $("undo").disabled = state.busy || !state.history.length;
  $("generate").disabled = state.busy;
}

// ---- wiring ----
function bindOutput(id, out, digits) {
  const update = () => { $(out).textContent = Number($(id).value).toFixed(digits); };
  $(id).addEventListener("input", update);
  update();
}

function fillSelect(id, options, value) {
  $(id).replaceChildren(...options.map((name) => new Option(name, name, false, name === value)));
}

function updateSampler() {
  // settings the chosen sampler does not use are shown, but cannot be changed
  const halton = $("order").value === "halton";
  for (const label of document.querySelectorAll("#controls .confidence")) {
    label.classList.toggle("unused", halton);
    label.title = halton ? "unused by the Halton order (it reveals positions without confidences)" : "";
    for (const input of label.querySelectorAll("input, select")) input.disabled = halton;
  }
  $("temperature-end").disabled = !$("anneal").checked;
  $("cfg-power").disabled = $("cfg-schedule").value !== "pow-cosine";
}

function setDefaults(info) {
  // the server's defaults (sample.py's): one place decides them for both
  const d = info.defaults;
  fillSelect("order", info.choices.order, d.order);
  fillSelect("choice-schedule", info.choices.choice_schedule, d.choice_schedule);
  fillSelect("cfg-schedule", info.choices.cfg_schedule, d.cfg_schedule);
  $("temperature").value = String(d.temperature);
  $("anneal").checked = d.temperature_end !== null;
  $("temperature-end").value = String(d.temperature_end ?? d.temperature);
  $("choice").value = String(d.choice_temperature);
  $("cfg").value = String(d.cfg);
  $("cfg-power").value = String(d.cfg_power);
}

async function start() {
  try {
    state.info = await api("/api/info");
  } catch (error) {
    status(`cannot reach the studio server: ${error.message}`, true);
    return;
  }
  const info = state.info;
  $("model").textContent = `${info.resolution}×${info.resolution} pixels, ${info.grid[0]}×${info.grid[1]} tokens of ` +
    `${info.num_codes} codes, ${info.conditional ? "attribute-conditional" : "unconditional"}, on ${info.device}`;
  const view = $("view");
  view.width = view.height = info.resolution * Math.max(1, Math.floor(320 / info.resolution));
  if (info.conditional) {
    $("cond").hidden = false;
    for (const name of info.attr_names) {
      const label = document.createElement("label");
      const box = document.createElement("input");
      box.type = "checkbox";
      box.name = name;
      label.append(box, ` ${name.replaceAll("_", " ")}`);
      $("attrs").append(label);
    }
  }
  $("steps").value = String(info.steps);  // the step count the model was trained to sample with
  setDefaults(info);
  bindOutput("steps", "steps-out", 0);
  bindOutput("temperature", "temperature-out", 2);
  bindOutput("temperature-end", "temperature-end-out", 2);
  bindOutput("choice", "choice-out", 1);
  bindOutput("cfg", "cfg-out", 1);
  bindOutput("cfg-power", "cfg-power-out", 1);
  for (const id of ["order", "anneal", "cfg-schedule"]) $(id).addEventListener("change", updateSampler);
  updateSampler();
  $("generate").addEventListener("click", generate);
  $("dice").addEventListener("click", () => { $("seed").value = String(Math.floor(Math.random() * 1e6)); });
  $("regenerate").addEventListener("click", regenerate);
  $("clear").addEventListener("click", clearMask);
  $("undo").addEventListener("click", undo);
  $("upload").addEventListener("change", (e) => { if (e.target.files[0]) upload(e.target.files[0]); });
  view.addEventListener("pointerdown", (e) => {
    if (!state.current || state.busy) return;
    view.setPointerCapture(e.pointerId);
    state.drag = pixelAt(e);
    mark(e);
  });
  view.addEventListener("pointermove", (e) => { if (state.drag) mark(e); });
  view.addEventListener("pointerup", () => { state.drag = state.last = null; updateButtons(); });
  status("ready");
  generate();
}

start();
