"""trillm serve's chat page (trillm/server/page.html) in a real browser: Debian's Chromium driven by Playwright
against a server in this process. A reply streams into the page as the API gives it, the conversation's
history goes with each turn, Stop keeps the partial reply, and a gpt-oss model's reasoning is folded apart
from its answer, with its effort setting sent. Without /usr/bin/chromium the tests are skipped, unless
TRILLM_REQUIRE_BROWSER=1 (CI) makes that a failure. TRILLM_SCREENSHOT=1 rewrites docs/serve-chat-page.png."""

import json
import os
import urllib.request
from pathlib import Path

import pytest
import torch

import trillm
from server_support import running_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "serve-chat-page.png"
REPLY_TIMEOUT_MS = 30_000  # a reply on a slow machine; Playwright's expect polls, so a fast one waits not


def no_browser(reason: str):
    if os.environ.get("TRILLM_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason}, and TRILLM_REQUIRE_BROWSER=1 needs it")
    pytest.skip(reason)


try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # collected anyway, so that each test can say why it does not run
    expect = sync_playwright = None


@pytest.fixture(scope="module")
def browser():
    if sync_playwright is None:
        no_browser("the playwright package is not installed")
    if not CHROMIUM.exists():
        no_browser(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 860, "height": 620})  # its own localStorage
    page = context.new_page()
    page.set_default_timeout(REPLY_TIMEOUT_MS)
    expect.set_options(timeout=REPLY_TIMEOUT_MS)
    yield page
    context.close()


@pytest.fixture(scope="module")
def smollm_model():
    return trillm.load(None)  # SmolLM2-135M


@pytest.fixture(scope="module")
def smollm(smollm_model):
    with running_server(smollm_model) as (url, server):
        yield url, server


def complete(url: str, messages: list[dict], **fields) -> dict:
    """The API's whole (not streamed) reply to these messages."""
    body = json.dumps({"messages": messages, "stream": False, **fields}).encode()
    request = urllib.request.Request(f"{url}/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["choices"][0]["message"]


def ask(page, text: str, press_enter: bool = True):
    """Type `text` and send it; the new assistant bubble."""
    bubble = page.locator(".assistant").nth(page.locator(".assistant").count())
    page.fill("#prompt", text)
    if press_enter:
        page.press("#prompt", "Enter")
    else:
        page.click("#send")
    return bubble


def open_chat(page, url: str, temperature: str, max_tokens: str):
    page.goto(url)
    page.fill("#temperature", temperature)
    page.fill("#max-tokens", max_tokens)


def test_a_reply_streams_as_the_api_answers_and_the_history_goes_with_it(page, smollm):
    url, server = smollm
    open_chat(page, url, "0", "16")
    expect(page.locator("#model")).to_have_text(server.model_id)
    expect(page.locator("#effort")).to_be_hidden()  # not a harmony model

    first = ask(page, "What is the capital of France?")
    expect(first).to_have_attribute("data-state", "done")
    expect(page.locator("#stop")).to_be_hidden()
    expect(page.locator("#send")).to_be_visible()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    answer = first.locator(".answer").text_content()
    assert answer and answer == complete(url, messages, temperature=0, max_tokens=16)["content"]
    expect(first.locator("details.reasoning")).to_have_count(0)

    second = ask(page, "And of Italy?", press_enter=False)
    expect(second).to_have_attribute("data-state", "done")
    expect(page.locator(".assistant")).to_have_count(2)
    expect(page.locator(".user")).to_have_count(2)
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And of Italy?"}]
    assert second.locator(".answer").text_content() == complete(url, messages, temperature=0, max_tokens=16)["content"]

    if os.environ.get("TRILLM_SCREENSHOT") == "1":
        page.set_viewport_size({"width": 860, "height": 440})
        page.screenshot(path=str(SCREENSHOT))

    page.click("#new-chat")
    expect(page.locator(".message")).to_have_count(0)


def test_shift_enter_is_a_new_line(page, smollm):
    url, _ = smollm
    open_chat(page, url, "0", "4")
    page.fill("#prompt", "one")
    page.press("#prompt", "Shift+Enter")
    page.keyboard.type("two")
    expect(page.locator("#prompt")).to_have_value("one\ntwo")
    expect(page.locator(".message")).to_have_count(0)  # not sent
    page.press("#prompt", "Enter")
    expect(page.locator(".user")).to_have_text("one\ntwo")  # its line break kept (pre-wrap)
    expect(page.locator(".assistant")).to_have_attribute("data-state", "done")


def test_stop_keeps_the_partial_reply_and_the_server_answers_on(page, smollm):
    url, server = smollm
    open_chat(page, url, "0", "400")
    reply = ask(page, "Write a long story about a dragon who learns to bake bread.")
    expect(page.locator("#stop")).to_be_visible()
    expect(reply.locator(".answer")).not_to_be_empty()  # the first tokens are in
    page.click("#stop")
    expect(reply).to_have_attribute("data-state", "stopped")
    expect(page.locator("#stop")).to_be_hidden()
    partial = reply.locator(".answer").text_content()
    assert partial
    expect(reply.locator(".note")).to_have_text("stopped")

    page.fill("#max-tokens", "8")
    after = ask(page, "Thanks!")
    expect(after).to_have_attribute("data-state", "done")
    assert reply.locator(".answer").text_content() == partial  # the partial reply stays
    messages = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."},
                {"role": "assistant", "content": partial}, {"role": "user", "content": "Thanks!"}]
    assert after.locator(".answer").text_content() == complete(url, messages, temperature=0, max_tokens=8)["content"]
    registry = server.scheduler.metrics.registry
    assert registry.get_sample_value("trillm_requests_total", {"outcome": "cancelled"}) >= 1


def test_an_api_error_is_a_line_in_the_conversation(page, smollm):
    url, _ = smollm
    open_chat(page, url, "0", "100000")  # more than the context
    ask(page, "Hello")
    expect(page.locator(".error")).to_contain_text("context")
    expect(page.locator(".assistant")).to_have_count(0)
    expect(page.locator("#send")).to_be_visible()


def test_the_api_key_is_kept_and_sent(browser, smollm_model):
    with running_server(smollm_model, api_key="sesame") as (url, server):
        context = browser.new_context()
        page = context.new_page()
        page.goto(url)
        expect(page.locator(".error")).to_contain_text("API key")
        page.fill("#api-key", "sesame")
        page.press("#api-key", "Tab")  # change: saved, and the model asked for again
        expect(page.locator("#model")).to_have_text(server.model_id)
        page.reload()
        expect(page.locator("#api-key")).to_have_value("sesame")
        page.fill("#max-tokens", "2")
        expect(ask(page, "Hi")).to_have_attribute("data-state", "done")
        context.close()


# ---- gpt-oss: reasoning apart from the answer -----------------------------------------------------------

REPLY = "<|channel|>analysis<|message|>Thinking it over.<|end|><|start|>assistant<|channel|>final" \
        "<|message|>Hello there!<|return|>"


class ScriptedNetwork:
    """The model's network, but its logits make it say `script` (token ids) after each prompt: one request
    at a time, its prompt (more than one token) starting the script over."""

    def __init__(self, network, script: list[int]):
        self.network, self.script, self.config = network, script, network.config
        self.step = 0

    def new_cache(self, batch, max_length):
        return self.network.new_cache(batch, max_length)

    def __call__(self, input_ids, cache, start, last_only=True):
        assert isinstance(start, int), "one request at a time"
        if input_ids.shape[1] > 1:
            self.step = 0
        logits = torch.zeros(1, 1, self.config.vocab_size)
        logits[0, 0, self.script[min(self.step, len(self.script) - 1)]] = 1.0
        self.step += 1
        return logits


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    from trillm.synth.gpt_oss import gpt_oss_config, has_vocabulary, write_gpt_oss

    if not has_vocabulary():
        pytest.skip("quicktok (o200k_harmony) missing")
    return trillm.load(write_gpt_oss(tmp_path_factory.mktemp("gpt-oss-tiny"), gpt_oss_config("gpt-oss-tiny")))


def test_a_harmony_models_reasoning_is_folded_and_its_effort_sent(page, gpt_oss, monkeypatch):
    model = gpt_oss
    monkeypatch.setenv("TRILLM_PLAN", "0")  # decode steps by the (scripted) forward, not a recorded plan
    monkeypatch.setattr(model, "network", ScriptedNetwork(model.network, model.tokenizer.encode(
        REPLY, add_special_tokens=False)))
    rendered = []  # (messages, effort) of each prompt
    render = model.harmony.render
    monkeypatch.setattr(model.harmony, "render", lambda messages, effort="medium", tools=None: (
        rendered.append((messages, effort)), render(messages, effort, tools))[1])
    with running_server(model) as (url, server):
        open_chat(page, url, "0", "64")
        expect(page.locator("#model")).to_have_text(server.model_id)
        expect(page.locator("#effort")).to_be_visible()
        expect(page.locator("#effort")).to_have_value("medium")

        reply = ask(page, "Hi")
        expect(reply).to_have_attribute("data-state", "done")
        reasoning = reply.locator("details.reasoning")
        expect(reasoning).to_have_count(1)
        assert reasoning.evaluate("details => !details.open")  # closed
        expect(reasoning.locator(".reasoning-text")).to_have_text("Thinking it over.")
        expect(reasoning.locator(".reasoning-text")).to_be_hidden()  # folded
        expect(reply.locator(".answer")).to_have_text("Hello there!")
        reasoning.locator("summary").click()
        expect(reasoning.locator(".reasoning-text")).to_be_visible()

        page.select_option("#effort", "high")
        again = ask(page, "Hi again")
        expect(again).to_have_attribute("data-state", "done")
        expect(again.locator(".answer")).to_have_text("Hello there!")
    assert rendered == [([{"role": "user", "content": "Hi"}], "medium"),
                        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"},
                          {"role": "user", "content": "Hi again"}], "high")]  # answers only, not reasoning
