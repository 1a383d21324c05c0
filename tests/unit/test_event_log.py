"""The event log of a streamed background response: readers from any position, live, each to the end."""

from __future__ import annotations

import asyncio

from service.serving.response_store import ResponseStore
from service.serving.responses import EventLog, ResponsesService


async def _collect(log: EventLog, after: int = -1) -> list[str]:
    return [event async for event in log.read(after)]


def test_readers_start_anywhere_follow_live_and_end_with_the_log():
    async def scenario():
        log = EventLog()
        log.append("e0")
        log.append("e1")
        readers = [asyncio.create_task(_collect(log, after)) for after in (-1, 0, 1, 5)]
        await asyncio.sleep(0)  # every reader has read what is there and waits
        assert not any(r.done() for r in readers)
        for n in range(2, 6):
            log.append(f"e{n}")
            await asyncio.sleep(0)
        log.append("e6")
        log.close()  # the events appended just before it are still read
        return [await r for r in readers], await _collect(log, 3)

    (whole, after0, after1, after5), late = asyncio.run(asyncio.wait_for(scenario(), 10))
    events = [f"e{n}" for n in range(7)]
    assert whole == events
    assert after0 == events[1:] and after1 == events[2:] and after5 == events[6:]
    assert late == events[4:]  # a reader after the end gets the rest at once


def test_a_reader_past_the_end_of_a_closed_log_gets_nothing():
    log = EventLog()
    log.append("e0")
    log.close()
    assert asyncio.run(_collect(log, 10)) == []


def test_an_evicted_response_takes_its_finished_log_but_not_one_still_written():
    """The store's eviction drops a finished log with its response; a log still being written stays, for its
    task stores the response again as it ends (and the log is then counted against the store's bound)."""
    store = ResponseStore(10**6)
    service = ResponsesService(chat=None, store=store)
    running, finished = EventLog(), EventLog()
    finished.close()
    service._logs.update(running=running, finished=finished)
    for response_id in ("running", "finished"):
        store.on_drop(response_id)
    assert service._logs == {"running": running}
