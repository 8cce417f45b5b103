// Streamed chat completions in OpenAI's format, shown as they arrive: content, reasoning
// (`reasoning_content` or `reasoning`), tool calls, errors, and per-response figures.

import { inference } from "./api.js";
import { el } from "./dom.js";

/** The JSON payloads of a server-sent event stream, until `data: [DONE]`. */
export async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replaceAll("\r\n", "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer
        .slice(0, cut)
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart())
        .join("\n");
      buffer = buffer.slice(cut + 2);
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

const ms = (value) => (value < 1000 ? `${Math.round(value)} ms` : `${(value / 1000).toFixed(2)} s`);

/** One streamed answer: its text, reasoning and tool calls, and TTFT, tokens/s and counts. */
export class ReplyView {
  constructor(title) {
    this.contentText = document.createTextNode("");
    this.reasoningText = document.createTextNode("");
    this.reasoning = el(
      "details",
      { class: "reasoning", hidden: true },
      el("summary", { text: "Reasoning" }),
      el("div", { class: "reasoning-text" }, this.reasoningText),
    );
    this.content = el("div", { class: "content" }, this.contentText);
    this.tools = el("div", { class: "tool-calls" });
    this.error = el("p", { class: "error", role: "alert", hidden: true });
    this.stats = el("div", { class: "stats", text: "waiting for the first token…" });
    this.node = el(
      "article",
      { class: "reply", "data-model": title },
      el("header", { class: "reply-title", text: title }),
      this.reasoning,
      this.content,
      this.tools,
      this.error,
      this.stats,
    );
    this.calls = [];
    this.usage = null;
    this.finishReason = null;
  }

  get text() {
    return this.contentText.data;
  }

  get toolCalls() {
    return this.calls.map((call) => ({
      id: call.id,
      type: "function",
      function: { name: call.name.textContent, arguments: call.args.data },
    }));
  }

  start() {
    this.started = performance.now();
    this.first = null;
    this.node.classList.add("streaming");
  }

  add(chunk) {
    if (chunk.error) {
      this.fail(chunk.error.message ?? "the stream failed");
      return;
    }
    if (chunk.usage) this.usage = chunk.usage;
    for (const choice of chunk.choices ?? []) {
      const delta = choice.delta ?? {};
      const thinking = delta.reasoning_content ?? delta.reasoning;
      if (thinking) {
        this.reasoning.hidden = false;
        this.reasoningText.appendData(thinking);
      }
      if (delta.content) this.contentText.appendData(delta.content);
      for (const call of delta.tool_calls ?? []) this.addToolCall(call);
      if (thinking || delta.content || delta.tool_calls?.length) this.first ??= performance.now();
      if (choice.finish_reason) this.finishReason = choice.finish_reason;
    }
    this.showStats();
  }

  addToolCall(call) {
    const index = call.index ?? this.calls.length;
    let entry = this.calls[index];
    if (!entry) {
      entry = { id: "", name: el("span", { class: "tool-name" }), args: document.createTextNode("") };
      entry.node = el(
        "div",
        { class: "tool-call" },
        el("span", { class: "tool-label", text: "tool call" }),
        entry.name,
        el("pre", {}, entry.args),
      );
      this.calls[index] = entry;
      this.tools.append(entry.node);
    }
    if (call.id) entry.id = call.id;
    if (call.function?.name) entry.name.textContent = call.function.name;
    if (call.function?.arguments) entry.args.appendData(call.function.arguments);
  }

  finish(note) {
    this.ended = performance.now();
    this.node.classList.remove("streaming");
    for (const call of this.calls.filter(Boolean)) {
      try {
        call.args.data = JSON.stringify(JSON.parse(call.args.data), null, 2);
      } catch {
        // not (yet) valid JSON: show it as it came
      }
    }
    if (note) this.finishReason = note;
    this.showStats();
  }

  fail(message) {
    this.error.textContent = message;
    this.error.hidden = false;
    this.finish("error");
  }

  showStats() {
    const parts = [];
    const data = this.node.dataset;
    if (this.first !== null) {
      data.ttftMs = Math.round(this.first - this.started);
      parts.push(`TTFT ${ms(this.first - this.started)}`);
    }
    const completion = this.usage?.completion_tokens;
    if (this.ended && this.first !== null && completion > 1 && this.ended > this.first) {
      // decode speed: tokens after the first, over the time after the first
      parts.push(`${((completion - 1) / ((this.ended - this.first) / 1000)).toFixed(1)} tok/s`);
    }
    if (this.usage) {
      data.promptTokens = this.usage.prompt_tokens;
      data.completionTokens = completion;
      parts.push(`${this.usage.prompt_tokens} prompt + ${completion} completion tokens`);
    }
    if (this.ended) {
      data.done = this.finishReason ?? "stop";
      if (this.finishReason) parts.push(this.finishReason);
    }
    this.stats.textContent = parts.join(" · ") || "waiting for the first token…";
  }
}

/** Stream one chat completion into `view`; resolves when it has finished, failed or stopped. */
export async function streamChat({ model, messages, options, view, signal }) {
  const body = { ...options.sampling, ...options.extra, model, messages, stream: true };
  body.stream_options = { ...body.stream_options, include_usage: true };
  view.start();
  try {
    const response = await inference("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal,
    });
    for await (const chunk of sseEvents(response)) view.add(chunk);
    view.finish();
  } catch (error) {
    if (error.name === "AbortError") view.finish("stopped");
    else view.fail(error.message);
  }
}
