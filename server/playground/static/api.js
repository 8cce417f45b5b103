// Calls to the service's API, same origin only. Keys live in this module's memory: never in the
// URL, localStorage, sessionStorage or cookies, so a reload forgets them.

const keys = { inference: "", admin: null }; // admin null: locked; "" works with an open admin API
let askKey = async () => null;
let asking = null; // one prompt at a time, even when several requests get 401 together

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** `ask(reason)` resolves to a key, or null when the user cancels. */
export function onKeyNeeded(ask) {
  askKey = ask;
}
export function setInferenceKey(key) {
  keys.inference = key;
}
export function setAdminKey(key) {
  keys.admin = key;
}
export function adminUnlocked() {
  return keys.admin !== null;
}

function request(path, init, key) {
  const headers = new Headers(init.headers);
  if (key) headers.set("Authorization", `Bearer ${key}`);
  return fetch(path, { ...init, headers, credentials: "omit", cache: "no-store" });
}

/** The server's own error message (OpenAI's envelope), prefixed with the status. */
export async function errorOf(response) {
  let message = response.statusText || "request failed";
  try {
    message = (await response.json())?.error?.message ?? message;
  } catch {
    // not JSON: keep the status text
  }
  return new ApiError(response.status, `${response.status}: ${message}`);
}

/** An inference call (the admin key works too); on 401 asks for a key and tries again. */
export async function inference(path, init = {}) {
  for (;;) {
    const response = await request(path, init, keys.inference || keys.admin);
    if (response.ok) return response;
    const error = await errorOf(response);
    if (response.status !== 401) throw error;
    asking ??= askKey(error.message).finally(() => (asking = null));
    const key = await asking;
    if (key === null) throw error;
    keys.inference = key;
  }
}

/** An admin call: only ever made with the admin key the user entered. */
export async function admin(path, init = {}) {
  if (keys.admin === null) throw new ApiError(0, "enter the admin key first");
  const response = await request(path, init, keys.admin);
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

/** Prometheus text of /metrics; with the admin key when the server asks for one. */
export async function metricsText() {
  let response = await request("/metrics", {}, "");
  if ((response.status === 401 || response.status === 403) && keys.admin !== null) {
    response = await request("/metrics", {}, keys.admin);
  }
  if (!response.ok) throw await errorOf(response);
  return response.text();
}
