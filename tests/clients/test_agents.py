"""The OpenAI Agents SDK (`openai-agents`) running agents against spindle's Responses API: a
function tool the model is made to call (tool_choice required, stop on the first tool), a
plain answer, and a streamed run."""

from __future__ import annotations

import asyncio

import openai
from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

set_tracing_disabled(True)


def test_agent_runs_a_function_tool_and_answers(base_url: str, model: str) -> None:
    calls: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        calls.append(city)
        return f"It is sunny in {city}."

    async def main() -> tuple[str, str, str, int]:
        client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
        responses = OpenAIResponsesModel(model=model, openai_client=client)
        tool_agent = Agent(name="weather", instructions="Use the tool.", tools=[get_weather], model=responses,
                           model_settings=ModelSettings(tool_choice="required", temperature=0),
                           tool_use_behavior="stop_on_first_tool")
        with_tool = await Runner.run(tool_agent, "What is the weather in Paris?")
        plain = Agent(name="plain", instructions="Answer briefly.", model=responses,
                      model_settings=ModelSettings(temperature=0, max_tokens=300))
        answer = await Runner.run(plain, "Say hello.")
        streamed = Runner.run_streamed(plain, "Say hello.")
        events = 0
        async for _ in streamed.stream_events():
            events += 1
        await client.close()
        return with_tool.final_output, answer.final_output, streamed.final_output, events

    tool_output, answer, streamed_answer, events = asyncio.run(main())
    assert len(calls) == 1 and tool_output == f"It is sunny in {calls[0]}."
    assert isinstance(answer, str) and answer
    assert streamed_answer == answer and events > 3
