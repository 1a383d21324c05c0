"""How the engine backend's stream shares the event loop: an output already queued lets other tasks run before
it goes on (a fast stream never starves health checks and other requests); an output that waited for an engine
step goes on at once (the loop ran while it waited, and another turn would only add to the time per token).
The engine is a stand-in here: what is tested is the backend's loop, not vLLM."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from service.engine import vllm_engine
from service.engine.base import GenerationRequest
from service.main import build_settings


class _Engine:
    """AsyncLLM's generate and abort: `tokens` outputs, each `gap_s` after the stream asks for it (0: queued)."""

    def __init__(self, tokens: int, gap_s: float):
        self.tokens, self.gap_s = tokens, gap_s

    async def generate(self, prompt, params, request_id, **kwargs):
        for i in range(self.tokens):
            if self.gap_s:
                await asyncio.sleep(self.gap_s)
            choice = SimpleNamespace(index=0, text="x", token_ids=[i], logprobs=None,
                                     finish_reason="length" if i == self.tokens - 1 else None)
            yield SimpleNamespace(prompt_token_ids=[1, 2], prompt_logprobs=None, num_cached_tokens=0, outputs=[choice],
                                  finished=i == self.tokens - 1)

    async def abort(self, request_id):
        pass


def _stream(demo_assets, tokens: int, gap_s: float) -> tuple[int, int]:
    """(outputs, turns another task got while they were read)."""
    engine = vllm_engine.VLLMEngine(build_settings(["--model", str(demo_assets["model"])]), {})
    engine._llm = _Engine(tokens, gap_s)

    async def run():
        turns = 0
        stop = asyncio.Event()

        async def other():
            nonlocal turns
            while not stop.is_set():
                turns += 1
                await asyncio.sleep(0)

        ticker = asyncio.create_task(other())
        await asyncio.sleep(0)
        before = turns
        outputs = [d async for d in engine.generate(GenerationRequest(request_id="r", prompt="hi"))]
        stop.set()
        await ticker
        return len(outputs), turns - before

    return asyncio.run(run())


def test_queued_outputs_let_other_tasks_run_between_them(demo_assets):
    outputs, turns = _stream(demo_assets, tokens=200, gap_s=0)
    assert outputs == 200
    assert turns >= 200  # a turn of the loop before every queued output


@pytest.mark.parametrize(("gap_s", "turns"), [(0, 20), (vllm_engine.QUEUED_OUTPUT_S * 4, 0)])
def test_the_stream_turns_the_loop_only_before_queued_outputs(demo_assets, monkeypatch, gap_s, turns):
    calls = 0
    real = vllm_engine._let_others_run

    async def counted():
        nonlocal calls
        calls += 1
        await real()

    monkeypatch.setattr(vllm_engine, "_let_others_run", counted)
    outputs, _ = _stream(demo_assets, tokens=20, gap_s=gap_s)
    assert (outputs, calls) == (20, turns)
