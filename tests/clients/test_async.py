"""`AsyncOpenAI`: many concurrent streams against one server."""

import asyncio

import openai
import pytest

from conftest import check_usage

N_STREAMS = 32
MAX_TOKENS = 12

TOPICS = ["cats", "dogs", "the sea", "mountains", "rain", "coffee", "trains", "the moon"]


async def one_stream(client: openai.AsyncOpenAI, model: str, i: int) -> tuple[str, object, list]:
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"Write one sentence about {TOPICS[i % len(TOPICS)]}."}],
        max_tokens=MAX_TOKENS,
        temperature=0.7,
        seed=i,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, finishes, roles = [], None, [], []
    async for chunk in stream:
        if chunk.usage is not None:
            assert usage is None, "only one usage chunk"
            assert chunk.choices == []
            usage = chunk.usage
            continue
        assert usage is None, "the usage chunk is the last one"
        for c in chunk.choices:
            assert c.index == 0
            if c.delta.role:
                roles.append(c.delta.role)
            if c.delta.content:
                text.append(c.delta.content)
            if c.finish_reason:
                finishes.append(c.finish_reason)
    return "".join(text), usage, finishes, roles


@pytest.mark.asyncio
async def test_32_concurrent_streams(base_url: str, model: str):
    async with openai.AsyncOpenAI(
        base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=180.0
    ) as client:
        results = await asyncio.wait_for(
            asyncio.gather(*(one_stream(client, model, i) for i in range(N_STREAMS))),
            timeout=240,
        )
    assert len(results) == N_STREAMS
    for i, (text, usage, finishes, roles) in enumerate(results):
        assert text.strip(), f"stream {i} produced no text"
        assert roles == ["assistant"], (i, roles)
        assert len(finishes) == 1 and finishes[0] in ("stop", "length"), (i, finishes)
        assert usage is not None, f"stream {i} had no usage chunk"
        check_usage(usage, max_completion_tokens=MAX_TOKENS)
        assert usage.completion_tokens >= 1
        if finishes[0] == "length":
            assert usage.completion_tokens == MAX_TOKENS
