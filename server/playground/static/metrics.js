// The live panel: a few series of /metrics (Prometheus text format), read every few seconds.

import { metricsText } from "./api.js";
import { el, say } from "./dom.js";

const SAMPLE = /^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/;
const LABEL = /(\w+)="((?:[^"\\]|\\.)*)"/g;

/** Samples of Prometheus' text format: [{name, labels, value}]. */
export function parsePrometheus(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    const match = line.startsWith("#") ? null : SAMPLE.exec(line);
    if (!match) continue;
    const labels = {};
    for (const [, key, value] of (match[2] ?? "").matchAll(LABEL)) {
      labels[key] = value.replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
    }
    samples.push({ name: match[1], labels, value: Number(match[3]) });
  }
  return samples;
}

/** Requests and mean TTFT per model, resident adapters, in flight and mean queue wait. */
export function summarise(samples) {
  const models = new Map();
  const model = (name) => {
    if (!models.has(name)) models.set(name, { name, requests: 0, ttftSum: 0, ttftCount: 0 });
    return models.get(name);
  };
  const totals = { queueSum: 0, queueCount: 0 };
  for (const { name, labels, value } of samples) {
    if (name === "gemma_server_requests_total") model(labels.model).requests += value;
    else if (name === "gemma_server_time_to_first_token_seconds_sum") model(labels.model).ttftSum += value;
    else if (name === "gemma_server_time_to_first_token_seconds_count") model(labels.model).ttftCount += value;
    else if (name === "gemma_server_adapters_resident") totals.resident = value;
    else if (name === "gemma_server_adapters_registered") totals.registered = value;
    else if (name === "gemma_server_requests_in_flight") totals.inFlight = value;
    else if (name === "gemma_server_queue_wait_seconds_sum") totals.queueSum += value;
    else if (name === "gemma_server_queue_wait_seconds_count") totals.queueCount += value;
  }
  return { models: [...models.values()].sort((a, b) => b.requests - a.requests), ...totals };
}

const seconds = (sum, count) => (count ? `${Math.round((sum / count) * 1000)} ms` : "–");

export class MetricsPanel {
  constructor({ summary, table, note }) {
    this.summary = summary;
    this.body = table.tBodies[0];
    this.note = note;
  }

  async refresh() {
    let stats;
    try {
      stats = summarise(parsePrometheus(await metricsText()));
    } catch (error) {
      const needsKey = error.status === 401 || error.status === 403;
      say(this.note, needsKey ? "/metrics needs the admin key: unlock the Admin tab." : error.message, "error");
      return;
    }
    say(this.note, "");
    const items = [
      ["Adapters registered", stats.registered ?? "–"],
      ["Resident in memory", stats.resident ?? "–"],
      ["Requests in flight", stats.inFlight ?? "–"],
      ["Mean queue wait", seconds(stats.queueSum, stats.queueCount)],
    ];
    this.summary.replaceChildren(
      ...items.map(([label, value]) => el("div", {}, el("dt", { text: label }), el("dd", { text: value }))),
    );
    this.body.replaceChildren(
      ...stats.models.map((m) =>
        el("tr", {}, el("td", { text: m.name }), el("td", { text: m.requests }), el("td", { text: seconds(m.ttftSum, m.ttftCount) })),
      ),
    );
    if (!stats.models.length) {
      this.body.append(el("tr", {}, el("td", { colspan: 3, class: "muted", text: "no requests yet" })));
    }
  }

  start(everyMs = 4000) {
    const tick = async () => {
      if (document.visibilityState === "visible") await this.refresh();
      setTimeout(tick, everyMs);
    };
    tick();
  }
}
