"""Anthropic's Messages API through the official `anthropic` SDK: messages, streaming (the SDK's
stream helper assembles the same text), tools (forced and a tool_result round trip),
stop sequences, count_tokens, Anthropic-shaped errors, and `x-api-key` on a keyed server.
Sampling fields go in `extra_body`: this SDK version has no `temperature` argument."""

from __future__ import annotations

import anthropic
import pytest

GREEDY = {"temperature": 0}
TOOLS = [{"name": "get_weather", "description": "Current weather in a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
HI = [{"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def claude(base_url: str) -> anthropic.Anthropic:
    c = anthropic.Anthropic(base_url=base_url, api_key="unused", max_retries=0)
    yield c
    c.close()


def test_message_and_its_stream(claude: anthropic.Anthropic, model: str) -> None:
    m = claude.messages.create(model=model, max_tokens=20, messages=HI, extra_body=GREEDY)
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_")
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 20
    assert [b.type for b in m.content] == ["text"] and m.content[0].text
    with claude.messages.stream(model=model, max_tokens=20, messages=HI, extra_body=GREEDY) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == m.content[0].text == final.content[0].text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 20
    assert final.usage.input_tokens == m.usage.input_tokens


def test_stop_sequences_and_count_tokens(claude: anthropic.Anthropic, model: str) -> None:
    m = claude.messages.create(model=model, max_tokens=30, messages=HI, stop_sequences=["!"], extra_body=GREEDY)
    assert (m.stop_reason, m.stop_sequence) == ("stop_sequence", "!")
    assert "!" not in m.content[0].text
    counted = claude.messages.count_tokens(model=model, messages=HI)
    assert counted.input_tokens == m.usage.input_tokens


def test_tools(claude: anthropic.Anthropic, model: str) -> None:
    t = claude.messages.create(model=model, max_tokens=60, tools=TOOLS, tool_choice={"type": "any"},
                               messages=[{"role": "user", "content": "Weather in Paris?"}], extra_body=GREEDY)
    assert t.stop_reason == "tool_use"
    use = [b for b in t.content if b.type == "tool_use"]
    assert len(use) == 1 and use[0].name == "get_weather" and isinstance(use[0].input["city"], str)
    with claude.messages.stream(model=model, max_tokens=60, tools=TOOLS,
                                tool_choice={"type": "tool", "name": "get_weather"},
                                messages=[{"role": "user", "content": "Weather in Paris?"}], extra_body=GREEDY) as s:
        final = s.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[-1].input == use[0].input
    # The result goes back as a tool_result block; the model answers in text (tool_choice
    # "auto" would need the server's --enable-auto-tool-choice, as in chat).
    r = claude.messages.create(model=model, max_tokens=30, tools=TOOLS, tool_choice={"type": "none"},
                               extra_body=GREEDY, messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": t.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use[0].id, "content": "18C"}]}])
    assert r.content and r.content[0].type == "text"


@pytest.mark.parametrize("extra", [
    {"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
    {"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]},
    {"messages": [{"role": "system", "content": "x"}]},
    {"max_tokens": 0},
])
def test_bad_requests_get_anthropic_errors(claude: anthropic.Anthropic, model: str, extra) -> None:
    kwargs = {"model": model, "max_tokens": 5, "messages": HI, **extra}
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(**kwargs)
    assert e.value.body["type"] == "error"
    assert e.value.body["error"]["type"] == "invalid_request_error" and e.value.body["error"]["message"]


def test_x_api_key(auth_base_url: str, auth_api_key: str, model: str) -> None:
    keyed = anthropic.Anthropic(base_url=auth_base_url, api_key=auth_api_key, max_retries=0)
    assert keyed.messages.create(model=model, max_tokens=2, messages=HI).content
    wrong = anthropic.Anthropic(base_url=auth_base_url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as e:
        wrong.messages.create(model=model, max_tokens=2, messages=HI)
    assert e.value.body["error"]["type"] == "authentication_error"
