// Small DOM helpers. Text always goes in as text nodes or textContent, never parsed as HTML.

export const $ = (id) => document.getElementById(id);

/** An element with attributes, listeners (`onclick`...), `class`, `text` and children. */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = String(value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

/** Show a message (or hide the element when `text` is empty); `kind` is a CSS class. */
export function say(node, text, kind = "") {
  node.textContent = text ?? "";
  node.hidden = !text;
  node.classList.toggle("ok", kind === "ok");
  node.classList.toggle("error", kind === "error");
}
