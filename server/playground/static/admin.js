// The admin panel: usable only after the user enters an admin key, which stays in memory.
// Server answers (and errors) are shown as they come.

import { admin, adminUnlocked, setAdminKey } from "./api.js";
import { $, el, say } from "./dom.js";

const ARCHIVE = /\.(tar\.gz|tgz|zip)$/i;
const FILES = new Set(["adapter_config.json", "adapter_model.safetensors"]);

export class AdminPanel {
  constructor({ onChange }) {
    this.onChange = onChange;
    this.body = $("admin-body");
    this.message = $("admin-message");
    this.table = $("admin-table").tBodies[0];
    $("admin-unlock").addEventListener("submit", (event) => this.unlock(event));
    $("admin-lock").addEventListener("click", () => this.lock());
    $("admin-refresh").addEventListener("click", () => this.run(() => this.refresh()));
    $("admin-upload").addEventListener("submit", (event) => this.upload(event));
    $("admin-path").addEventListener("submit", (event) => this.loadPath(event));
  }

  async unlock(event) {
    event.preventDefault();
    const input = $("admin-key");
    setAdminKey(input.value);
    input.value = ""; // the key lives in api.js's memory only, not in the form
    try {
      await this.refresh();
    } catch (error) {
      setAdminKey(null);
      say($("admin-unlock-message"), error.message, "error");
      return;
    }
    say($("admin-unlock-message"), "");
    $("admin-unlock").hidden = true;
    this.body.hidden = false;
    say(this.message, "Unlocked. The key is forgotten when you lock or reload the page.", "ok");
    this.onChange();
  }

  lock() {
    setAdminKey(null);
    this.body.hidden = true;
    this.table.replaceChildren();
    $("admin-unlock").hidden = false;
    this.onChange();
  }

  /** The registered adapters, from GET /v1/adapters; also returned for the model list. */
  async refresh() {
    const { data } = await admin("/v1/adapters");
    this.table.replaceChildren(
      ...data.map((a) =>
        el(
          "tr",
          { "data-name": a.name },
          el("th", { scope: "row", text: a.name }),
          el("td", { text: `v${a.version}` }),
          el("td", { text: a.rank }),
          el("td", { class: "targets", text: a.target_modules.join(", ") }),
          el("td", { text: a.resident ? "yes" : "no" }),
          el("td", { text: a.pinned ? "yes" : "no" }),
          el("td", { text: a.request_count }),
          el("td", {}, el("button", {
            type: "button", class: "ghost small danger", text: "Unload",
            "aria-label": `Unload ${a.name}`, onclick: () => this.unload(a.name),
          })),
        ),
      ),
    );
    if (!data.length) this.table.append(el("tr", {}, el("td", { colspan: 8, class: "muted", text: "no adapters" })));
    return data;
  }

  async run(action) {
    if (!adminUnlocked()) return;
    say(this.message, "Working…");
    try {
      say(this.message, await action(), "ok");
    } catch (error) {
      say(this.message, error.message, "error");
    }
  }

  async changed(record, verb) {
    await this.refresh();
    this.onChange();
    return `${verb} ${record.name}: version ${record.version}, rank ${record.rank}.`;
  }

  upload(event) {
    event.preventDefault();
    this.run(async () => {
      const form = new FormData();
      form.append("name", $("upload-name").value.trim());
      const files = [...$("upload-folder").files, ...$("upload-files").files];
      const archive = files.find((file) => ARCHIVE.test(file.name));
      if (archive) form.append("archive", archive);
      else files.filter((file) => FILES.has(file.name)).forEach((file) => form.append(file.name, file));
      if (!form.has("archive") && !form.has("adapter_config.json")) {
        throw new Error("choose a folder with adapter_config.json and adapter_model.safetensors, or an archive");
      }
      if ($("upload-replace").checked) form.append("replace", "true");
      if ($("upload-pin").checked) form.append("pin", "true");
      const record = await admin("/v1/adapters", { method: "POST", body: form });
      event.target.reset();
      return this.changed(record, "Uploaded");
    });
  }

  loadPath(event) {
    event.preventDefault();
    this.run(async () => {
      const body = {
        name: $("path-name").value.trim(),
        path: $("path-path").value.trim(),
        replace: $("path-replace").checked,
        pin: $("path-pin").checked,
      };
      const record = await admin("/v1/adapters", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      });
      return this.changed(record, "Loaded");
    });
  }

  unload(name) {
    if (!window.confirm(`Unload ${name}? Requests running on it finish first.`)) return;
    this.run(async () => {
      await admin(`/v1/adapters/${encodeURIComponent(name)}`, { method: "DELETE" });
      await this.refresh();
      this.onChange();
      return `Unloaded ${name}.`;
    });
  }
}
