// Attachments: images and audio from the file picker, drag and drop or the microphone, as
// OpenAI content parts. Audio the server cannot read (a recording's WebM/Opus) becomes 16 kHz WAV.

import { el } from "./dom.js";

const AUDIO_FORMATS = {
  "audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav", "audio/vnd.wave": "wav",
  "audio/flac": "flac", "audio/x-flac": "flac", "audio/ogg": "ogg", "audio/mpeg": "mp3",
  "audio/mp3": "mp3",
};
const AUDIO_EXTENSIONS = { wav: "wav", flac: "flac", ogg: "ogg", mp3: "mp3" };
const IMAGE_TYPES = new Set(["image/png", "image/jpeg", "image/webp"]);
const WAV_RATE = 16000;

function dataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error("could not read the file"));
    reader.readAsDataURL(blob);
  });
}

/** Any audio the browser can decode, as 16-bit mono WAV at 16 kHz. */
async function toWav(blob) {
  const decoded = await new OfflineAudioContext(1, 1, WAV_RATE).decodeAudioData(await blob.arrayBuffer());
  const context = new OfflineAudioContext(1, Math.max(1, Math.ceil(decoded.duration * WAV_RATE)), WAV_RATE);
  const source = context.createBufferSource();
  source.buffer = decoded;
  source.connect(context.destination);
  source.start();
  const samples = (await context.startRendering()).getChannelData(0);
  const view = new DataView(new ArrayBuffer(44 + samples.length * 2));
  const ascii = (offset, text) => [...text].forEach((c, i) => view.setUint8(offset + i, c.charCodeAt(0)));
  ascii(0, "RIFF");
  view.setUint32(4, 36 + samples.length * 2, true);
  ascii(8, "WAVEfmt ");
  view.setUint32(16, 16, true); // PCM header size
  view.setUint16(20, 1, true); // PCM
  view.setUint16(22, 1, true); // mono
  view.setUint32(24, WAV_RATE, true);
  view.setUint32(28, WAV_RATE * 2, true);
  view.setUint16(32, 2, true);
  view.setUint16(34, 16, true);
  ascii(36, "data");
  view.setUint32(40, samples.length * 2, true);
  samples.forEach((s, i) => view.setInt16(44 + i * 2, Math.max(-1, Math.min(1, s)) * 0x7fff, true));
  return new Blob([view], { type: "audio/wav" });
}

/** The attachments of the next message, shown as removable chips in `tray`. */
export class Attachments {
  constructor(tray, onError) {
    this.tray = tray;
    this.onError = onError;
    this.items = [];
  }

  async addFiles(files) {
    for (const file of files) {
      try {
        await this.add(file);
      } catch (error) {
        this.onError(`${file.name}: ${error.message}`);
      }
    }
  }

  async add(file) {
    const type = file.type.split(";")[0];
    if (IMAGE_TYPES.has(type)) {
      const url = await dataUrl(file);
      const preview = el("img", { src: URL.createObjectURL(file), alt: file.name });
      this.push({ part: { type: "image_url", image_url: { url } }, preview, name: file.name });
      return;
    }
    const extension = file.name.split(".").pop().toLowerCase();
    if (!type.startsWith("audio/") && !(extension in AUDIO_EXTENSIONS)) {
      throw new Error("attach PNG, JPEG or WebP images, or audio");
    }
    let format = AUDIO_FORMATS[type] ?? AUDIO_EXTENSIONS[extension];
    let blob = file;
    if (!format) {
      blob = await toWav(file);
      format = "wav";
    }
    const data = (await dataUrl(blob)).split(",")[1];
    const preview = el("audio", { controls: true, src: URL.createObjectURL(blob), "aria-label": file.name });
    this.push({ part: { type: "input_audio", input_audio: { data, format } }, preview, name: file.name });
  }

  push(item) {
    this.items.push(item);
    item.chip = el(
      "div",
      { class: "chip" },
      item.preview,
      el("span", { class: "chip-name", text: item.name }),
      el("button", {
        type: "button", class: "chip-remove", text: "×", "aria-label": `Remove ${item.name}`,
        onclick: () => this.remove(item),
      }),
    );
    this.tray.append(item.chip);
  }

  remove(item) {
    this.items = this.items.filter((other) => other !== item);
    item.chip.remove();
  }

  /** The content parts and previews of the attachments, emptying the tray. */
  take() {
    const items = this.items;
    this.items = [];
    this.tray.replaceChildren();
    return { parts: items.map((item) => item.part), previews: items.map((item) => item.preview) };
  }
}

/** Microphone recording where the browser allows it (a secure context: https or localhost). */
export class Recorder {
  constructor(button, onClip, onError) {
    this.button = button;
    this.onClip = onClip;
    this.onError = onError;
    if (!navigator.mediaDevices?.getUserMedia || !window.MediaRecorder) {
      button.disabled = true;
      button.title = "Recording needs a browser with MediaRecorder on https or localhost";
    }
    button.addEventListener("click", () => this.toggle());
  }

  async toggle() {
    if (this.recorder) {
      this.recorder.stop();
      return;
    }
    try {
      const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
      const chunks = [];
      this.recorder = new MediaRecorder(stream);
      this.recorder.ondataavailable = (event) => chunks.push(event.data);
      this.recorder.onstop = () => {
        stream.getTracks().forEach((track) => track.stop());
        const type = this.recorder.mimeType || "audio/webm";
        this.recorder = null;
        this.setRecording(false);
        this.onClip(new File([new Blob(chunks, { type })], "recording.webm", { type }));
      };
      this.recorder.start();
      this.setRecording(true);
    } catch (error) {
      this.recorder = null;
      this.onError(`microphone: ${error.message}`);
    }
  }

  setRecording(on) {
    this.button.textContent = on ? "Stop recording" : "Record";
    this.button.setAttribute("aria-pressed", String(on));
    this.button.classList.toggle("recording", on);
  }
}
