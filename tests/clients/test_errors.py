"""Errors surface as the SDK's typed exceptions, with OpenAI's error body."""

import openai
import pytest

from conftest import LONG_ANSWER_PROMPT, make_client, user


def test_negative_temperature(client: openai.OpenAI, model: str):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=model, messages=user("Hi"), max_tokens=4, temperature=-1
        )
    assert err.value.status_code == 400
    assert "temperature" in err.value.message
    assert isinstance(err.value.body, dict) and err.value.body.get("message")


def test_over_max_model_len(client: openai.OpenAI, model: str, max_model_len: int, tokenize_chat):
    messages = user("hello " * 1000)
    prompt_len = tokenize_chat(messages)
    assert prompt_len < max_model_len
    max_tokens = max_model_len  # prompt + max_tokens > max_model_len
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens)
    msg = err.value.message
    # The message states the numbers: the limit, the prompt and the requested completion.
    assert str(max_model_len) in msg, msg
    assert str(prompt_len) in msg, msg
    assert str(prompt_len + max_tokens) in msg, msg


def test_prompt_alone_over_max_model_len(client: openai.OpenAI, model: str, max_model_len: int):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt="hello " * (max_model_len + 100), max_tokens=1)
    assert str(max_model_len) in err.value.message, err.value.message


def test_empty_messages(client: openai.OpenAI, model: str):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=[], max_tokens=4)
    assert "messages" in err.value.message


def test_n_zero(client: openai.OpenAI, model: str):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=user("Hi"), max_tokens=4, n=0)


def test_unknown_model(client: openai.OpenAI):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-model", messages=user("Hi"), max_tokens=4)
    assert err.value.status_code == 404
    assert "no-such-model" in err.value.message
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="Hi", max_tokens=4)


def test_wrong_api_key(auth_base_url: str, model: str):
    with make_client(auth_base_url, api_key="definitely-wrong") as bad:
        with pytest.raises(openai.AuthenticationError) as err:
            bad.chat.completions.create(model=model, messages=user("Hi"), max_tokens=4)
        assert err.value.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


def test_right_api_key(auth_base_url: str, auth_api_key: str, model: str):
    with make_client(auth_base_url, api_key=auth_api_key) as good:
        assert model in [m.id for m in good.models.list().data]
        r = good.chat.completions.create(
            model=model, messages=user(LONG_ANSWER_PROMPT), max_tokens=4, temperature=0
        )
        assert r.choices[0].message.content
        assert r.usage.completion_tokens == 4
