"""The Responses API through the official SDK (`client.responses`): create, streaming (raw events
and the SDK's stream helper), `previous_response_id`, retrieve, input items, delete, a function
tool round trip, a JSON-schema `text.format`, and the 400s for what spindle does not run."""

from __future__ import annotations

import json

import openai
import pytest

TOOLS = [{"type": "function", "name": "get_weather", "description": "Current weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]


def test_create_and_retrieve(client: openai.OpenAI, model: str) -> None:
    r = client.responses.create(model=model, input="Say hi.", max_output_tokens=8, temperature=0)
    assert r.object == "response" and r.id.startswith("resp_")
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].type == "message" and r.output_text
    assert r.usage.output_tokens == 8 and r.usage.total_tokens == r.usage.input_tokens + 8
    got = client.responses.retrieve(r.id)
    assert (got.id, got.output_text) == (r.id, r.output_text)


def test_streams_assemble_to_the_same_answer(client: openai.OpenAI, model: str) -> None:
    kwargs = dict(model=model, input="Say hi.", max_output_tokens=120, temperature=0)
    whole = client.responses.create(**kwargs)
    assert whole.status == "completed"
    types, text = [], ""
    for e in client.responses.create(stream=True, **kwargs):
        types.append(e.type)
        if e.type == "response.output_text.delta":
            text += e.delta
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed"
    assert text == whole.output_text
    with client.responses.stream(**kwargs) as s:
        for _ in s:
            pass
        final = s.get_final_response()
    assert final.output_text == whole.output_text
    assert client.responses.retrieve(final.id).output_text == whole.output_text


def test_previous_response_id_continues_the_conversation(client: openai.OpenAI, model: str) -> None:
    first = client.responses.create(model=model, input="My name is Ada.", max_output_tokens=16, temperature=0)
    second = client.responses.create(model=model, input="What is my name?", previous_response_id=first.id,
                                     max_output_tokens=16, temperature=0)
    assert second.previous_response_id == first.id
    # The first exchange is part of the second prompt.
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    items = client.responses.input_items.list(second.id)
    assert [i.type for i in items.data] == ["message"]
    assert items.data[0].content[0].text == "What is my name?"
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=model, input="x", previous_response_id="resp_nope")


def test_function_tool_round_trip(client: openai.OpenAI, model: str) -> None:
    r = client.responses.create(model=model, input="What is the weather in Paris?", tools=TOOLS,
                                tool_choice="required", temperature=0)
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert isinstance(json.loads(calls[0].arguments)["city"], str)
    done = client.responses.create(model=model, previous_response_id=r.id, max_output_tokens=32, temperature=0,
                                   input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                                           "output": "18C and sunny"}])
    assert done.output[-1].type == "message" and done.output_text
    # Streamed: the arguments arrive as deltas and the final item carries them whole.
    args = ""
    with client.responses.stream(model=model, input="What is the weather in Paris?", tools=TOOLS,
                                 tool_choice={"type": "function", "name": "get_weather"}, temperature=0) as s:
        for e in s:
            if e.type == "response.function_call_arguments.delta":
                args += e.delta
        final = s.get_final_response()
    assert final.output[0].type == "function_call" and final.output[0].arguments == args
    assert "city" in json.loads(args)


def test_json_schema_text_format(client: openai.OpenAI, model: str) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    r = client.responses.create(model=model, input="Describe a person.", temperature=0,
                                text={"format": {"type": "json_schema", "name": "person", "schema": schema}})
    person = json.loads(r.output_text)
    assert isinstance(person["name"], str) and isinstance(person["age"], int)


def test_delete(client: openai.OpenAI, model: str) -> None:
    r = client.responses.create(model=model, input="Hi", max_output_tokens=4)
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(r.id)


def test_background_responses_are_polled_and_cancelled(client: openai.OpenAI, model: str) -> None:
    import time
    r = client.responses.create(model=model, input="Say hi.", max_output_tokens=30, temperature=0, background=True)
    assert r.status == "queued" and r.background
    deadline = time.time() + 60
    while r.status in ("queued", "in_progress") and time.time() < deadline:
        time.sleep(0.1)
        r = client.responses.retrieve(r.id)
    foreground = client.responses.create(model=model, input="Say hi.", max_output_tokens=30, temperature=0)
    assert r.status == foreground.status and r.output_text == foreground.output_text
    long = client.responses.create(model=model, input="Write a long story about a cat.", max_output_tokens=1500,
                                   background=True)
    cancelled = client.responses.cancel(long.id)
    assert cancelled.status == "cancelled" == client.responses.retrieve(long.id).status
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(r.id)  # finished


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools"),
    ({"background": True, "store": False}, "background"),
    ({"background": True, "stream": True}, "background"),
    ({"truncation": "auto"}, "truncation"),
    ({"text": {"format": {"type": "yaml"}}}, "text.format"),
])
def test_unsupported_requests_are_400s_naming_the_field(client: openai.OpenAI, model: str, extra, param) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=model, input="x", **extra)
    assert e.value.body["param"] == param
