// The playground: models, chat, side-by-side comparison, admin and live metrics.
// Everything the server or a model sends is inserted as text, never as HTML.

import { AdminPanel } from "./admin.js";
import { admin, adminUnlocked, inference, onKeyNeeded, setInferenceKey } from "./api.js";
import { $, el, say } from "./dom.js";
import { Attachments, Recorder } from "./media.js";
import { MetricsPanel } from "./metrics.js";
import { ReplyView, streamChat } from "./stream.js";

const state = { mode: "chat", models: [], base: null, history: [], controller: null };
const composerError = $("composer-error");
const showError = (message) => say(composerError, message, "error");

// --- keys: asked for when the server answers 401, kept in memory (api.js) ---

function askForKey(reason) {
  const dialog = $("key-dialog");
  say($("key-dialog-reason"), reason ? `The server said: ${reason}` : "");
  $("key-input").value = "";
  return new Promise((resolve) => {
    const done = (key) => {
      dialog.close();
      $("key-input").value = "";
      $("key-form").onsubmit = $("key-cancel").onclick = dialog.oncancel = null;
      resolve(key);
    };
    $("key-form").onsubmit = (event) => {
      event.preventDefault();
      done($("key-input").value.trim());
    };
    $("key-cancel").onclick = () => done(null);
    dialog.oncancel = () => done(null);
    dialog.showModal();
    $("key-input").focus();
  });
}
onKeyNeeded(askForKey);
$("key-button").addEventListener("click", async () => {
  const key = await askForKey("");
  if (key !== null) setInferenceKey(key);
});

// --- models ---

function modelCard(id, detail) {
  const isBase = id === state.base;
  const facts = isBase
    ? "base model"
    : detail
      ? `v${detail.version} · rank ${detail.rank} · ${detail.pinned ? "pinned" : "not pinned"}`
      : `adapter of ${state.base}`;
  return el(
    "li",
    { class: `model ${isBase ? "base" : "adapter"}`, "data-model": id },
    el("div", { class: "model-head" },
      el("button", { type: "button", class: "model-name", text: id, title: `Chat with ${id}`, onclick: () => chooseModel(id) }),
      detail ? el("span", { class: `badge ${detail.resident ? "on" : "off"}`, text: detail.resident ? "resident" : "on disk" }) : null,
    ),
    el("div", { class: "model-facts", text: facts }),
    detail ? el("div", { class: "model-targets", text: detail.target_modules.join(", ") }) : null,
  );
}

async function loadModels() {
  const { data } = await (await inference("/v1/models")).json();
  state.models = data.map((card) => card.id);
  state.base = data.find((card) => !card.parent)?.id ?? state.models[0];
  const details = new Map();
  if (adminUnlocked()) {
    try {
      for (const adapter of (await admin("/v1/adapters")).data) details.set(adapter.name, adapter);
    } catch {
      // shown in the admin panel; the list still works without details
    }
  }
  $("model-list").replaceChildren(...state.models.map((id) => modelCard(id, details.get(id))));
  say($("models-note"), adminUnlocked() ? "" : "Unlock the Admin tab to see version, rank, targets and residency.");
  renderModelChoices();
}

async function refreshModels() {
  try {
    await loadModels();
  } catch (error) {
    say($("models-note"), error.message, "error");
  }
}

function renderModelChoices() {
  const select = $("chat-model");
  const chosen = select.value;
  select.replaceChildren(...state.models.map((id) => el("option", { value: id, text: id })));
  select.value = state.models.includes(chosen) ? chosen : (state.models.find((id) => id !== state.base) ?? state.base);
  const box = $("compare-models");
  const checked = new Set([...box.querySelectorAll("input:checked")].map((input) => input.value));
  if (!checked.size) [state.base, state.models.find((id) => id !== state.base)].forEach((id) => checked.add(id));
  box.querySelectorAll("label").forEach((label) => label.remove());
  box.append(
    ...state.models.map((id) =>
      el("label", { class: "chip-check" }, el("input", { type: "checkbox", value: id, checked: checked.has(id) }), id),
    ),
  );
}

function chooseModel(id) {
  $("chat-model").value = id;
  setMode("chat");
}

// --- modes (tabs) ---

const TABS = ["chat", "compare", "admin"];
function setMode(mode) {
  state.mode = mode;
  for (const name of TABS) {
    const tab = $(`tab-${name}`);
    tab.setAttribute("aria-selected", String(name === mode));
    tab.tabIndex = name === mode ? 0 : -1;
    $(`pane-${name}`).hidden = name !== mode;
  }
  $("composer").hidden = mode === "admin";
  $("send").textContent = mode === "compare" ? "Compare" : "Send";
}
for (const [index, name] of TABS.entries()) {
  const tab = $(`tab-${name}`);
  tab.addEventListener("click", () => setMode(name));
  tab.addEventListener("keydown", (event) => {
    const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
    if (!step) return;
    const next = TABS[(index + step + TABS.length) % TABS.length];
    setMode(next);
    $(`tab-${next}`).focus();
  });
}

// --- composer ---

const attachments = new Attachments($("attachments"), showError);
new Recorder($("mic"), (clip) => attachments.addFiles([clip]), showError);
$("file-input").addEventListener("change", async (event) => {
  await attachments.addFiles([...event.target.files]);
  event.target.value = "";
});
$("attach-label").addEventListener("keydown", (event) => {
  if (event.key === "Enter" || event.key === " ") {
    event.preventDefault();
    $("file-input").click();
  }
});
const composer = $("composer");
composer.addEventListener("dragover", (event) => {
  event.preventDefault();
  composer.classList.add("dropping");
});
composer.addEventListener("dragleave", () => composer.classList.remove("dropping"));
composer.addEventListener("drop", (event) => {
  event.preventDefault();
  composer.classList.remove("dropping");
  attachments.addFiles([...event.dataTransfer.files]);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    composer.requestSubmit();
  }
});

function readOptions() {
  const sampling = {};
  const temperature = $("opt-temperature").value;
  const maxTokens = $("opt-max-tokens").value;
  if (temperature !== "") sampling.temperature = Number(temperature);
  if (maxTokens !== "") sampling.max_tokens = Number(maxTokens);
  let extra = {};
  const text = $("opt-extra").value.trim();
  if (text) {
    try {
      extra = JSON.parse(text);
    } catch (error) {
      throw new Error(`Extra request fields: ${error.message}`);
    }
    if (typeof extra !== "object" || extra === null || Array.isArray(extra)) {
      throw new Error("Extra request fields must be a JSON object");
    }
  }
  const system = $("opt-system").value.trim();
  return { sampling, extra, system: system ? [{ role: "system", content: system }] : [] };
}

function userBubble(text, previews) {
  return el("div", { class: "user-message" },
    previews.length ? el("div", { class: "previews" }, ...previews) : null,
    text ? el("p", { text }) : null,
  );
}

function busy(on) {
  $("send").disabled = on;
  $("stop").hidden = !on;
}

async function runChat(content, text, previews, options, signal) {
  const log = $("chat-log");
  log.querySelector(".empty")?.remove();
  const model = $("chat-model").value;
  state.history.push({ role: "user", content });
  const view = new ReplyView(model);
  log.append(userBubble(text, previews), view.node);
  view.node.scrollIntoView({ block: "end" });
  await streamChat({ model, messages: [...options.system, ...state.history], options, view, signal });
  const calls = view.toolCalls;
  if (view.text || calls.length) {
    state.history.push({ role: "assistant", content: view.text, ...(calls.length ? { tool_calls: calls } : {}) });
  } else {
    state.history.pop(); // a failed turn is not part of the conversation
  }
}

async function runCompare(content, text, previews, options, signal) {
  const models = [...$("compare-models").querySelectorAll("input:checked")].map((input) => input.value);
  if (!models.length) throw new Error("Choose at least one model to compare");
  const prompt = $("compare-prompt");
  prompt.replaceChildren(userBubble(text, previews));
  prompt.hidden = false;
  const views = models.map((model) => new ReplyView(model));
  $("compare-grid").replaceChildren(...views.map((view) => view.node));
  const messages = [...options.system, { role: "user", content }];
  await Promise.all(views.map((view, i) => streamChat({ model: models[i], messages, options, view, signal })));
}

composer.addEventListener("submit", async (event) => {
  event.preventDefault();
  if (state.controller) return;
  say(composerError, "");
  const text = $("prompt").value.trim();
  let options;
  try {
    options = readOptions();
  } catch (error) {
    showError(error.message);
    return;
  }
  if (!text && !attachments.items.length) return;
  const { parts, previews } = attachments.take();
  const content = parts.length ? [...(text ? [{ type: "text", text }] : []), ...parts] : text;
  $("prompt").value = "";
  state.controller = new AbortController();
  busy(true);
  try {
    const run = state.mode === "compare" ? runCompare : runChat;
    await run(content, text, previews, options, state.controller.signal);
  } catch (error) {
    showError(error.message);
  } finally {
    state.controller = null;
    busy(false);
    $("prompt").focus();
  }
});
$("stop").addEventListener("click", () => state.controller?.abort());
$("chat-clear").addEventListener("click", () => {
  state.history = [];
  $("chat-log").replaceChildren(el("p", { class: "empty", text: "New chat." }));
});

// --- start ---

new AdminPanel({ onChange: refreshModels });
$("models-refresh").addEventListener("click", refreshModels);

async function waitReady() {
  const status = $("server-status");
  for (;;) {
    try {
      const response = await fetch("/ready", { cache: "no-store", credentials: "omit" });
      if (response.ok) break;
      status.textContent = "engine starting…";
    } catch {
      status.textContent = "server unreachable";
    }
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
  status.textContent = "ready";
  status.classList.add("ready");
}

setMode("chat");
new MetricsPanel({ summary: $("metrics-summary"), table: $("metrics-table"), note: $("metrics-note") }).start();
waitReady().then(refreshModels);
