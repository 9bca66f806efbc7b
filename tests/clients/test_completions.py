"""`POST /v1/completions` through `client.completions.create`."""

import openai
import pytest

from conftest import check_usage

PROMPT_A = "The capital of France is"
PROMPT_B = "1, 2, 3, 4,"


def test_string_prompt(client: openai.OpenAI, model: str, tokenize):
    r = client.completions.create(model=model, prompt=PROMPT_A, max_tokens=8, temperature=0)
    assert r.object == "text_completion"
    assert r.model == model
    assert r.id.startswith("cmpl-"), r.id
    assert len(r.choices) == 1
    choice = r.choices[0]
    assert choice.index == 0
    assert isinstance(choice.text, str) and choice.text.strip()
    assert choice.finish_reason in ("stop", "length")
    check_usage(r.usage, max_completion_tokens=8)
    assert r.usage.prompt_tokens == len(tokenize(PROMPT_A))


def test_default_max_tokens_is_16(client: openai.OpenAI, model: str):
    # OpenAI and vLLM default `max_tokens` of a text completion to 16.
    r = client.completions.create(
        model=model, prompt=PROMPT_B, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.usage.completion_tokens == 16
    assert r.choices[0].finish_reason == "length"


def test_token_id_prompt_matches_text_prompt(client: openai.OpenAI, model: str, tokenize):
    ids = tokenize(PROMPT_A)
    assert len(ids) > 1
    by_text = client.completions.create(model=model, prompt=PROMPT_A, max_tokens=8, temperature=0)
    by_ids = client.completions.create(model=model, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.usage.prompt_tokens == len(ids)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.choices[0].finish_reason == by_text.choices[0].finish_reason
    check_usage(by_ids.usage, max_completion_tokens=8)


def test_list_of_token_id_prompts(client: openai.OpenAI, model: str, tokenize):
    ids_a, ids_b = tokenize(PROMPT_A), tokenize(PROMPT_B)
    r = client.completions.create(model=model, prompt=[ids_a, ids_b], max_tokens=6, temperature=0)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.usage.prompt_tokens == len(ids_a) + len(ids_b)
    assert all(c.text for c in r.choices)


def test_list_of_prompts(client: openai.OpenAI, model: str, tokenize):
    r = client.completions.create(
        model=model, prompt=[PROMPT_A, PROMPT_B], max_tokens=8, temperature=0
    )
    assert len(r.choices) == 2
    by_index = {c.index: c for c in r.choices}
    assert sorted(by_index) == [0, 1]
    for c in r.choices:
        assert c.text
        assert c.finish_reason in ("stop", "length")
    # Choice i answers prompt i: the counting prompt continues with the next number.
    assert "5" in by_index[1].text, by_index[1].text
    # Prompt tokens are summed over the prompts, completion tokens over the choices.
    assert r.usage.prompt_tokens == len(tokenize(PROMPT_A)) + len(tokenize(PROMPT_B))
    check_usage(r.usage, max_completion_tokens=16)


def test_stream_with_usage(client: openai.OpenAI, model: str):
    params = dict(model=model, prompt=PROMPT_B, max_tokens=8, temperature=0)
    ref = client.completions.create(**params)
    chunks = list(
        client.completions.create(**params, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == ref.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].text for c in chunks[:-1])
    assert text == ref.choices[0].text


def test_logprobs_legacy_format(client: openai.OpenAI, model: str):
    r = client.completions.create(model=model, prompt=PROMPT_A, max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp is not None
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n
    assert "".join(lp.tokens) == r.choices[0].text
    for chosen, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0.0
        # Greedy: the chosen token is among the alternatives with the highest logprob.
        assert chosen in top, (chosen, top)
        assert top[chosen] == pytest.approx(max(top.values()), abs=1e-5)
        assert logprob == pytest.approx(top[chosen], abs=1e-5)


@pytest.mark.parametrize(
    "extra",
    [{"suffix": " and that is all."}, {"extra_body": {"use_beam_search": True}}],
    ids=["suffix", "use_beam_search"],
)
def test_unsupported_fields_rejected(client: openai.OpenAI, model: str, extra: dict):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt=PROMPT_A, max_tokens=4, **extra)
    assert err.value.status_code == 400
    field = next(iter(extra.get("extra_body", extra)))
    assert field in str(err.value.message), err.value.message
    assert err.value.body["param"] == field


def test_echo_scores_the_prompt(client: openai.OpenAI, model: str):
    """`echo` with `logprobs` and `max_tokens=0`: the prompt alone with its logprobs, as
    evaluation harnesses ask for log-likelihoods (the SDK parses the null first logprob)."""
    r = client.completions.create(model=model, prompt=PROMPT_A, max_tokens=0, echo=True, logprobs=1)
    c = r.choices[0]
    assert c.text == PROMPT_A
    assert c.finish_reason == "length"
    assert r.usage.completion_tokens == 0
    lp = c.logprobs
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    assert len(lp.tokens) == r.usage.prompt_tokens
