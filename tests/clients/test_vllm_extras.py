"""vLLM's sampling extensions, sent through the SDK's `extra_body`."""

import openai

from conftest import LONG_ANSWER_PROMPT, SHORT_ANSWER_PROMPT, check_usage, user


def chat(client, model, prompt, **kw):
    return client.chat.completions.create(model=model, messages=user(prompt), **kw)


def test_top_k_1_is_greedy(client: openai.OpenAI, model: str):
    greedy = chat(client, model, LONG_ANSWER_PROMPT, max_tokens=16, temperature=0)
    for seed in (1, 2):
        r = chat(
            client, model, LONG_ANSWER_PROMPT, max_tokens=16, temperature=1.0, seed=seed,
            extra_body={"top_k": 1},
        )
        assert r.choices[0].message.content == greedy.choices[0].message.content


def test_min_p_1_is_greedy(client: openai.OpenAI, model: str):
    # min_p = 1 keeps only tokens as likely as the most likely one.
    greedy = chat(client, model, LONG_ANSWER_PROMPT, max_tokens=16, temperature=0)
    r = chat(
        client, model, LONG_ANSWER_PROMPT, max_tokens=16, temperature=1.0, seed=3,
        extra_body={"min_p": 1.0},
    )
    assert r.choices[0].message.content == greedy.choices[0].message.content


def test_repetition_penalty(client: openai.OpenAI, model: str):
    prompt = "apple, apple, apple, apple, apple,"

    def complete(penalty):
        return client.completions.create(
            model=model, prompt=prompt, max_tokens=12, temperature=0,
            extra_body={"repetition_penalty": penalty},
        ).choices[0].text

    plain, neutral, penalized = complete(None), complete(1.0), complete(1.5)
    assert neutral == plain, "repetition_penalty=1 changes nothing"
    assert plain.count("apple") >= 3, plain  # the model keeps repeating without a penalty
    assert penalized.count("apple") < plain.count("apple"), (plain, penalized)


def test_ignore_eos(client: openai.OpenAI, model: str):
    natural = chat(client, model, SHORT_ANSWER_PROMPT, max_tokens=20, temperature=0)
    assert natural.choices[0].finish_reason == "stop"
    assert natural.usage.completion_tokens < 20
    r = chat(
        client, model, SHORT_ANSWER_PROMPT, max_tokens=20, temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.usage.completion_tokens == 20
    assert r.choices[0].finish_reason == "length"
    check_usage(r.usage, max_completion_tokens=20)


def test_min_tokens(client: openai.OpenAI, model: str):
    natural = chat(client, model, SHORT_ANSWER_PROMPT, max_tokens=30, temperature=0)
    assert natural.choices[0].finish_reason == "stop"
    k = natural.usage.completion_tokens
    min_tokens = k + 6
    r = chat(
        client, model, SHORT_ANSWER_PROMPT, max_tokens=30, temperature=0,
        extra_body={"min_tokens": min_tokens},
    )
    assert r.usage.completion_tokens >= min_tokens, (k, r.usage)
    check_usage(r.usage, max_completion_tokens=30)
    # The greedy answer is still where it starts.
    assert r.choices[0].message.content.startswith(natural.choices[0].message.content)


def test_include_stop_str_in_output(client: openai.OpenAI, model: str):
    ref = chat(client, model, LONG_ANSWER_PROMPT, max_tokens=24, temperature=0)
    text = ref.choices[0].message.content
    words = [w for w in text.split(" ")[3:] if w.isalpha() and len(w) >= 3]
    assert words, text
    stop = " " + words[0]
    cut = text.find(stop)
    r = chat(
        client, model, LONG_ANSWER_PROMPT, max_tokens=24, temperature=0, stop=stop,
        extra_body={"include_stop_str_in_output": True},
    )
    assert r.choices[0].message.content == text[: cut + len(stop)]
    assert r.choices[0].finish_reason == "stop"
