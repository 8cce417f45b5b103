"""The playground page in a real browser (Debian's chromium, driven by Selenium) on the real server.

The server runs the tiny Gemma 4 on the real engine with inference and admin keys, on a real
socket; the browser does what a user does (types, clicks, picks files) and the page's results are
compared with the same requests made through the official `openai` client. Only the `<script>`
check uses a fake engine, because the tiny model cannot be made to print chosen text.
Screenshots are left in tests/artifacts/.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import subprocess
import tarfile
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio
import soundfile
from selenium import webdriver
from selenium.webdriver import Chrome as WebDriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

from server.app import create_app
from server.engine.protocol import (
    AUDIO_SAMPLE_RATE,
    AdapterActivity,
    AdapterRef,
    CompletionDelta,
    GenerationChunk,
    Prompt,
    ResidentAdapter,
    Sampling,
)
from server.playground.api_router import CONTENT_SECURITY_POLICY, STATIC_DIR
from server.settings import Settings
from server.testbed.default_model import DefaultModel
from server.testbed.demo_adapters import DEMO_ADAPTERS, write_demo_adapter
from server.testbed.demo_training import trained_adapter_specs
from tests.conftest import engine_settings
from tests.live_server import LiveServer, live_server
from tests.media import seeded_audio, seeded_image

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "tests" / "artifacts"
USER = "playground-user-key"
ADMIN = "playground-admin-key"
BASE = "tiny-gemma4"
# Every adapter `make run` serves: the random demo adapters and the trained ones.
DEMO_NAMES = [spec.name for spec in (*DEMO_ADAPTERS, *trained_adapter_specs())]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = [
    # a fake microphone (a beep) that needs no permission prompt, for the recording test
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LAPTOP = {"width": 1366, "height": 850, "deviceScaleFactor": 1, "mobile": False}
PHONE = {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True}
WAIT = 120.0  # seconds; generous, the machine is shared
XSS_TEXT = '<script>window.__xss = 1</script><img src="x" onerror="window.__xss = 2"><b>bold</b>'


# --- the browser ---


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    """Headless chromium with a fresh profile; installed by scripts/install-browser if missing."""
    subprocess.run([str(REPO / "scripts" / "install-browser")], check=True)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(
    driver: WebDriver, condition: Callable[[WebDriver], Any], timeout: float = WAIT
) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def find(driver: WebDriver, css: str) -> WebElement:
    return driver.find_element(By.CSS_SELECTOR, css)


def find_all(driver: WebDriver, css: str) -> list[WebElement]:
    return driver.find_elements(By.CSS_SELECTOR, css)


def listed_models(driver: WebDriver) -> list[str]:
    return [item.get_attribute("data-model") or "" for item in find_all(driver, "#model-list li")]


def open_page(driver: WebDriver, url: str, key: str | None = USER, size: dict = LAPTOP) -> None:
    """Load the page, answer the key prompt it shows on the server's 401, wait for the models."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", size)
    driver.get(url)
    if key is not None:
        wait_for(driver, lambda d: find(d, "#key-dialog").get_attribute("open") is not None)
        find(driver, "#key-input").send_keys(key)
        find(driver, "#key-save").click()
    wait_for(driver, lambda d: len(listed_models(d)) >= 1 + len(DEMO_NAMES))
    driver.get_log("browser")  # start each test with an empty console log


def set_field(driver: WebDriver, css: str, value: str) -> None:
    field = find(driver, css)
    field.clear()
    field.send_keys(value)


def set_options(driver: WebDriver, max_tokens: int, extra: str = "") -> None:
    options = find(driver, "#options")
    if options.get_attribute("open") is None:
        find(driver, "#options summary").click()
    set_field(driver, "#opt-max-tokens", str(max_tokens))
    set_field(driver, "#opt-extra", extra)
    find(driver, "#options summary").click()  # closed again; the values stay


def send(driver: WebDriver, text: str) -> None:
    find(driver, "#prompt").send_keys(text)
    find(driver, "#send").click()


def finished_replies(driver: WebDriver, scope: str) -> list[WebElement]:
    return find_all(driver, f"{scope} .reply[data-done]")


def screenshot(driver: WebDriver, name: str, size: dict) -> Path:
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", size)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path


def metrics_row(driver: WebDriver, model: str) -> list[str]:
    """Requests and mean TTFT of `model` in the live metrics panel."""
    rows: list[list[str]] = driver.execute_script(  # at once: the panel redraws every few seconds
        "return [...document.querySelectorAll('#metrics-table tbody tr')]"
        ".map((row) => [...row.cells].map((cell) => cell.textContent))"
    )
    return next((cells[1:] for cells in rows if cells and cells[0] == model), [])


def console_errors(driver: WebDriver) -> list[str]:
    """Console errors except the 401 that makes the page ask for a key."""
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE" and "401 (Unauthorized)" not in entry["message"]
    ]


def assert_no_key_stored(driver: WebDriver, *keys: str) -> None:
    stored = driver.execute_script(
        "return [location.href, document.cookie, JSON.stringify({...localStorage}),"
        " JSON.stringify({...sessionStorage})].join(' ')"
    )
    for key in keys:
        assert key not in stored


# --- the server ---


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def playground(
    engine: Any, tiny: DefaultModel, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[LiveServer]:
    settings = engine_settings(
        cache_dir=tiny.model_dir.parent,
        state_dir=tmp_path_factory.mktemp("playground-state"),
        api_keys=[USER],
        admin_keys=[ADMIN],
    )
    async with live_server(settings, engine, first_adapter_id=70_000) as server:
        yield server


def client(server: LiveServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.v1, api_key=USER, max_retries=0)


async def api_reply(
    server: LiveServer, model: str, content: Any, max_tokens: int, **extra: Any
) -> tuple[str, int]:
    """The text and prompt tokens the API gives for the page's request."""
    reply = await client(server).chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        temperature=0,
        extra_body=extra or None,
    )
    assert reply.usage is not None
    return reply.choices[0].message.content or "", reply.usage.prompt_tokens


# --- tests ---


async def test_page_asks_for_the_key_and_lists_every_model(
    playground: LiveServer, browser: WebDriver
) -> None:
    def scenario() -> tuple[list[str], str]:
        open_page(browser, playground.base_url)
        note = find(browser, "#models-note").text
        assert_no_key_stored(browser, USER)
        return listed_models(browser), note

    models, note = await asyncio.to_thread(scenario)
    expected = [model.id async for model in client(playground).models.list()]
    assert sorted(models) == sorted(expected) == sorted([BASE, *DEMO_NAMES])
    assert "Unlock the Admin tab" in note  # details need the admin key
    assert await asyncio.to_thread(console_errors, browser) == []


async def test_chat_streams_an_adapter_reply_with_its_figures(
    playground: LiveServer, browser: WebDriver
) -> None:
    prompt, max_tokens = "Tell me about the river.", 160

    def scenario() -> tuple[str, dict[str, str], bool, str]:
        open_page(browser, playground.base_url)
        Select(find(browser, "#chat-model")).select_by_value("demo-attn")
        set_options(browser, max_tokens, '{"ignore_eos": true}')
        send(browser, prompt)
        # Text arrives while the reply is still streaming.
        partial = wait_for(
            browser,
            lambda d: any(
                reply.find_element(By.CSS_SELECTOR, ".content").text
                for reply in find_all(d, "#chat-log .reply.streaming")
            ),
        )
        [reply] = wait_for(browser, lambda d: finished_replies(d, "#chat-log"))
        figures = {
            key: reply.get_attribute(f"data-{key}") or ""
            for key in ("model", "ttft-ms", "prompt-tokens", "completion-tokens", "done")
        }
        stats = reply.find_element(By.CSS_SELECTOR, ".stats").text
        text = browser.execute_script("return arguments[0].textContent", find(reply, ".content"))
        # The live panel counts the request (it reads /metrics every few seconds).
        wait_for(browser, lambda d: metrics_row(d, "demo-attn")[:1] == ["1"], timeout=30)
        screenshot(browser, "playground-chat-laptop.png", LAPTOP)
        return text, figures, bool(partial), stats

    text, figures, streamed, stats = await asyncio.to_thread(scenario)

    assert streamed
    expected, prompt_tokens = await api_reply(
        playground, "demo-attn", prompt, max_tokens, ignore_eos=True
    )
    assert text == expected and text
    assert figures["model"] == "demo-attn"
    assert figures["completion-tokens"] == str(max_tokens)
    assert figures["prompt-tokens"] == str(prompt_tokens)
    assert figures["done"] == "length"
    assert int(figures["ttft-ms"]) > 0
    assert "TTFT" in stats and "tok/s" in stats


async def test_compare_shows_base_and_adapter_side_by_side(
    playground: LiveServer, browser: WebDriver
) -> None:
    prompt, max_tokens, models = "Write a poem about the sea.", 48, [BASE, "demo-mlp"]

    def scenario() -> dict[str, str]:
        open_page(browser, playground.base_url)
        find(browser, "#tab-compare").click()
        for box in find_all(browser, "#compare-models input"):
            if box.is_selected() != (box.get_attribute("value") in models):
                box.click()
        set_options(browser, max_tokens)
        send(browser, prompt)
        replies = wait_for(
            browser, lambda d: (r := finished_replies(d, "#compare-grid")) and len(r) == 2 and r
        )
        texts = {
            reply.get_attribute("data-model") or "": browser.execute_script(
                "return arguments[0].querySelector('.content').textContent", reply
            )
            for reply in replies
        }
        # The live panel (it reads /metrics every few seconds) counts both requests.
        wait_for(browser, lambda d: metrics_row(d, "demo-mlp")[:1] == ["1"], timeout=30)
        screenshot(browser, "playground-compare-laptop.png", LAPTOP)
        screenshot(browser, "playground-compare-phone.png", PHONE)
        return texts

    texts = await asyncio.to_thread(scenario)
    assert sorted(texts) == sorted(models)
    assert texts[BASE] != texts["demo-mlp"]
    for model in models:  # greedy by default: exactly what the API answers
        assert texts[model] == (await api_reply(playground, model, prompt, max_tokens))[0]


async def test_attached_image_and_audio_go_into_the_request(
    playground: LiveServer, browser: WebDriver, tmp_path: Path
) -> None:
    image, clip = tmp_path / "noise.png", tmp_path / "tone.wav"
    seeded_image(3, 48).save(image)
    soundfile.write(clip, seeded_audio(3, 0.5), AUDIO_SAMPLE_RATE)
    prompt, max_tokens = "What is in the picture and the clip?", 24

    def scenario() -> tuple[str, str, int, int]:
        open_page(browser, playground.base_url)
        Select(find(browser, "#chat-model")).select_by_value("demo-all")
        set_options(browser, max_tokens)
        find(browser, "#file-input").send_keys(str(image))
        wait_for(browser, lambda d: find_all(d, "#attachments .chip img"))
        find(browser, "#file-input").send_keys(str(clip))
        wait_for(browser, lambda d: find_all(d, "#attachments .chip audio"))
        send(browser, prompt)
        [reply] = wait_for(browser, lambda d: finished_replies(d, "#chat-log"))
        images = len(find_all(browser, "#chat-log .user-message img"))
        audios = len(find_all(browser, "#chat-log .user-message audio"))
        text = browser.execute_script("return arguments[0].textContent", find(reply, ".content"))
        screenshot(browser, "playground-media-phone.png", PHONE)
        return text, reply.get_attribute("data-prompt-tokens") or "", images, audios

    text, prompt_tokens, images, audios = await asyncio.to_thread(scenario)
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    content = [
        {"type": "text", "text": prompt},
        {"type": "image_url", "image_url": {"url": url}},
        {
            "type": "input_audio",
            "input_audio": {"data": base64.b64encode(clip.read_bytes()).decode(), "format": "wav"},
        },
    ]
    expected, expected_tokens = await api_reply(playground, "demo-all", content, max_tokens)
    _, text_only_tokens = await api_reply(playground, "demo-all", prompt, max_tokens)
    assert (images, audios) == (1, 1)
    assert int(prompt_tokens) == expected_tokens > text_only_tokens
    assert text == expected


async def test_dropped_files_are_attached(playground: LiveServer, browser: WebDriver) -> None:
    image = io.BytesIO()
    seeded_image(4, 32).save(image, "PNG")
    script = """
        const [data, name] = arguments;
        const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
        const files = new DataTransfer();
        files.items.add(new File([bytes], name, { type: "image/png" }));
        files.items.add(new File(["plain text"], "notes.txt", { type: "text/plain" }));
        const composer = document.getElementById("composer");
        composer.dispatchEvent(new DragEvent("dragover", { dataTransfer: files, bubbles: true }));
        composer.dispatchEvent(new DragEvent("drop", { dataTransfer: files, bubbles: true }));
    """

    def scenario() -> tuple[list[str], str]:
        open_page(browser, playground.base_url)
        browser.execute_script(script, base64.b64encode(image.getvalue()).decode(), "drop.png")
        wait_for(browser, lambda d: find_all(d, "#attachments .chip img"))
        wait_for(browser, lambda d: find(d, "#composer-error").text)
        names = [chip.text for chip in find_all(browser, "#attachments .chip-name")]
        return names, find(browser, "#composer-error").text

    names, error = await asyncio.to_thread(scenario)
    assert names == ["drop.png"]
    assert error.startswith("notes.txt: attach PNG, JPEG or WebP images, or audio")


async def test_microphone_recording_becomes_a_wav_clip(
    playground: LiveServer, browser: WebDriver
) -> None:
    """Chromium's fake microphone (a beep); the page turns its WebM/Opus into 16 kHz WAV."""
    prompt, max_tokens = "What do you hear?", 8

    def scenario() -> tuple[str, str]:
        open_page(browser, playground.base_url)
        Select(find(browser, "#chat-model")).select_by_value(BASE)
        set_options(browser, max_tokens)
        find(browser, "#mic").click()
        wait_for(browser, lambda d: find(d, "#mic").get_attribute("aria-pressed") == "true")
        time.sleep(1.0)
        find(browser, "#mic").click()
        wait_for(browser, lambda d: find_all(d, "#attachments .chip audio"))
        send(browser, prompt)
        [reply] = wait_for(browser, lambda d: finished_replies(d, "#chat-log"))
        error = browser.execute_script("return arguments[0].textContent", find(reply, ".error"))
        return reply.get_attribute("data-prompt-tokens") or "", error

    prompt_tokens, error = await asyncio.to_thread(scenario)
    _, text_only_tokens = await api_reply(playground, BASE, prompt, max_tokens)
    # The server reads WAV, FLAC, OGG and MP3 only: WebM/Opus sent as it was would be refused.
    assert error == ""
    assert int(prompt_tokens) > text_only_tokens  # the clip's audio tokens came with the prompt


async def test_reasoning_and_tool_calls_render_from_openai_chunks(
    playground: LiveServer, browser: WebDriver
) -> None:
    """The page's stream view on OpenAI-format chunks (as vLLM streams them) in the browser."""
    chunks = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "reasoning_content": "Think"}}]},
        {"choices": [{"index": 0, "delta": {"reasoning": "ing <b>hard</b>"}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{
            "index": 0, "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": '},
        }]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{
            "index": 0, "function": {"arguments": '"Paris"}'},
        }]}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}},
    ]  # fmt: skip
    script = """
        const [chunks, done] = arguments;
        import("/playground/assets/stream.js").then(({ ReplyView }) => {
          const view = new ReplyView("demo-attn");
          document.body.append(view.node);
          view.start();
          chunks.forEach((chunk) => view.add(chunk));
          view.finish();
          done({
            reasoning: view.node.querySelector(".reasoning-text").textContent,
            reasoningShown: !view.node.querySelector(".reasoning").hidden,
            tool: view.node.querySelector(".tool-name").textContent,
            args: view.node.querySelector(".tool-call pre").textContent,
            calls: view.toolCalls,
            stats: view.node.querySelector(".stats").textContent,
            elements: view.node.querySelectorAll(".reasoning-text *").length,
          });
        });
    """

    def scenario() -> dict[str, Any]:
        open_page(browser, playground.base_url)
        result: dict[str, Any] = browser.execute_async_script(script, chunks)
        return result

    shown = await asyncio.to_thread(scenario)
    assert shown["reasoning"] == "Thinking <b>hard</b>" and shown["reasoningShown"]
    assert shown["elements"] == 0
    assert shown["tool"] == "get_weather"
    assert json.loads(shown["args"]) == {"city": "Paris"}
    assert shown["calls"] == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": shown["args"]},
        }
    ]
    assert "9 prompt + 5 completion tokens" in shown["stats"] and "tool_calls" in shown["stats"]


def adapter_archive(folder: Path, out: Path) -> Path:
    with tarfile.open(out, "w:gz") as archive:
        for file in sorted(folder.iterdir()):
            archive.add(file, arcname=file.name)
    return out


async def test_admin_upload_needs_the_admin_key_and_lists_the_adapter(
    playground: LiveServer, browser: WebDriver, tiny: DefaultModel, tmp_path: Path
) -> None:
    spec = DEMO_ADAPTERS[1]  # demo-mlp's shape, fresh weights
    folder = await asyncio.to_thread(
        write_demo_adapter, tiny.model_dir, tmp_path / "fresh", spec, seed=7
    )
    archive = adapter_archive(folder, tmp_path / "fresh.tar.gz")

    def upload(name: str, path: Path, css: str = "#upload-files") -> str:
        set_field(browser, "#upload-name", name)
        find(browser, css).send_keys(str(path))
        find(browser, "#admin-upload button[type=submit]").click()
        return wait_for(
            browser,
            lambda d: (m := find(d, "#admin-message")).text not in ("", "Working…") and m.text,
        )

    def scenario() -> dict[str, Any]:
        open_page(browser, playground.base_url)
        find(browser, "#tab-admin").click()
        seen: dict[str, Any] = {"locked": not find(browser, "#admin-body").is_displayed()}
        set_field(browser, "#admin-key", USER)  # an inference key is not enough
        find(browser, "#admin-unlock button[type=submit]").click()
        wait_for(browser, lambda d: find(d, "#admin-unlock-message").text)
        seen["refused"] = find(browser, "#admin-unlock-message").text
        seen["still_locked"] = not find(browser, "#admin-body").is_displayed()
        set_field(browser, "#admin-key", ADMIN + "\n")
        wait_for(browser, lambda d: find(d, "#admin-body").is_displayed())
        seen["key_field"] = find(browser, "#admin-key").get_attribute("value")
        seen["uploaded"] = upload("uploaded-mlp", archive)
        wait_for(browser, lambda d: "uploaded-mlp" in listed_models(d))
        seen["facts"] = find(browser, "#model-list li[data-model='uploaded-mlp']").text
        seen["row"] = find(browser, "#admin-table tr[data-name='uploaded-mlp']").text
        seen["duplicate"] = upload("uploaded-mlp", archive)  # the server's 409, as it is
        seen["folder"] = upload("uploaded-folder", folder, "#upload-folder")  # the directory picker
        screenshot(browser, "playground-admin-laptop.png", LAPTOP)
        assert_no_key_stored(browser, ADMIN, USER)
        return seen

    seen = await asyncio.to_thread(scenario)
    assert seen["locked"] and seen["still_locked"]
    assert seen["refused"].startswith("403: ") and "admin key" in seen["refused"]
    assert seen["key_field"] == ""  # the key is not left in the form
    assert seen["uploaded"].startswith("Uploaded uploaded-mlp: version 1, rank 8")
    assert f"rank {spec.rank}" in seen["facts"] and "down_proj" in seen["facts"]
    assert "uploaded-mlp" in seen["row"]
    assert seen["duplicate"].startswith("409: ")
    models = [model.id async for model in client(playground).models.list()]
    assert "uploaded-mlp" in models
    assert seen["folder"].startswith("Uploaded uploaded-folder: version 1, rank 8")
    assert "uploaded-folder" in models
    # the uploaded adapter answers like the same weights loaded by the API would: it is served
    reply = await client(playground).chat.completions.create(
        model="uploaded-mlp", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert reply.choices[0].message.content


async def test_page_and_assets_carry_a_strict_content_security_policy() -> None:
    transport = httpx.ASGITransport(app=create_app(Settings()))  # no lifespan: no engine needed
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        paths = ["/", "/playground", "/playground/assets/app.js", "/playground/assets/style.css"]
        paths += ["/playground/assets/..%2Fapi_router.py", "/playground/assets/nope.js"]
        answers = {path: await http.get(path) for path in paths}
    for path in ["/", "/playground", "/playground/assets/app.js", "/playground/assets/style.css"]:
        response = answers[path]
        assert response.status_code == 200
        assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert response.headers["x-content-type-options"] == "nosniff"
    assert answers["/"].headers["content-type"].startswith("text/html")
    assert (
        answers["/playground/assets/app.js"].headers["content-type"].startswith("text/javascript")
    )
    assert answers["/playground/assets/..%2Fapi_router.py"].status_code == 404
    assert answers["/playground/assets/nope.js"].status_code == 404

    directives = dict(d.split(" ", 1) for d in CONTENT_SECURITY_POLICY.split("; "))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == directives["style-src"] == directives["connect-src"]
    assert directives["script-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"
    assert "unsafe" not in CONTENT_SECURITY_POLICY
    # Nothing in the page that the policy would have to allow: no inline code or style, no eval,
    # no HTML from strings.
    html = (STATIC_DIR / "index.html").read_text()
    assert "<script>" not in html and "<style" not in html and " style=" not in html
    assert re.search(r"\son[a-z]+\s*=", html) is None  # no inline event handlers
    for script in STATIC_DIR.glob("*.js"):
        code = script.read_text()
        for unsafe in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert unsafe not in code, (script.name, unsafe)
        assert "new Function" not in code and "document.cookie" not in code
        assert re.search(r"\b(localStorage|sessionStorage)\s*[.\[]", code) is None


async def test_no_playground_flag_turns_the_page_off() -> None:
    off = Settings(_cli_parse_args=["--no-playground"])
    assert off.playground is False and Settings().playground is True

    async def status(settings: Settings, path: str) -> int:
        transport = httpx.ASGITransport(app=create_app(settings))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return (await http.get(path)).status_code

    for path in ["/", "/playground", "/playground/assets/app.js"]:
        assert await status(off, path) == 404
        assert await status(Settings(), path) == 200


# --- model output that holds HTML is shown as text (fake engine: chosen output) ---


class ScriptEngine:
    """An engine whose every answer is XSS_TEXT; only for the escaping check."""

    max_model_len = 1024

    async def generate(
        self, request_id: str, prompt: Prompt, sampling: Sampling, adapter: AdapterRef | None
    ) -> AsyncIterator[GenerationChunk]:
        for index, piece in enumerate([XSS_TEXT[:20], XSS_TEXT[20:]]):
            last = index == 1
            yield GenerationChunk(
                request_id=request_id,
                prompt_token_count=3,
                completions=[CompletionDelta(0, piece, [index], None, "stop" if last else None)],
                finished=last,
            )

    async def abort(self, request_id: str) -> None:
        return None

    async def add_adapter(self, adapter: AdapterRef) -> None:
        return None

    async def remove_adapter(self, int_id: int) -> bool:
        return True

    async def pin_adapter(self, int_id: int) -> bool:
        return True

    async def list_adapters(self) -> set[int]:
        return set()

    async def adapter_residency(self) -> list[ResidentAdapter]:
        return []

    def adapter_activity(self) -> AdapterActivity:
        return AdapterActivity()

    def running_request_count(self) -> int:
        return 0

    async def check_health(self) -> None:
        return None

    async def shutdown(self) -> None:
        return None


async def test_model_output_with_script_is_shown_as_text(
    tiny: DefaultModel, browser: WebDriver
) -> None:
    with tempfile.TemporaryDirectory() as state:
        settings = Settings(cache_dir=tiny.model_dir.parent, state_dir=Path(state))
        async with live_server(settings, ScriptEngine(), first_adapter_id=71_000) as server:

            def scenario() -> tuple[str, int, Any, list[str]]:
                open_page(browser, server.base_url, key=None)
                send(browser, "Say something dangerous.")
                [reply] = wait_for(browser, lambda d: finished_replies(d, "#chat-log"))
                content = find(reply, ".content")
                text = browser.execute_script("return arguments[0].textContent", content)
                elements = len(content.find_elements(By.CSS_SELECTOR, "*"))
                ran = browser.execute_script("return window.__xss")
                return text, elements, ran, console_errors(browser)

            text, elements, ran, errors = await asyncio.to_thread(scenario)
    assert text == XSS_TEXT
    assert elements == 0  # no <script>, <img> or <b> was made
    assert ran is None
    assert errors == []
