"""Stored responses of the Responses API: `store`, `previous_response_id`, and GET / DELETE
`/v1/responses/{id}` with its input items, held in this process's memory per tenant, bounded by bytes.

OpenAI stores a response unless the request says `store: false`; vLLM's server stores none unless an
environment variable is set, and then never evicts (its own warning says so). Here the store is on by
default (following OpenAI), bounded by `--responses-store-bytes` (the least recently used response is
evicted first; 0 turns storing off, and answers then say `store: false`), and a tenant sees only its own
responses: another tenant's id is the same 404 as an unknown one. Each entry holds its own input items and
output and the id it continued from, so an image sent in the first turn is held once however long the
conversation grows; a follow-up walks the chain, and a chain that lost a link (evicted or deleted) is refused
as not found. The store lives in one process: behind several replicas, route a conversation to one pod or
send the whole conversation as input. A finished background stream's events, kept so that the stream can be
resumed (`hold`), count against the same bound as part of their response and go when it goes.

Written by hand: a least-recently-used dict by bytes is a few lines, and cache libraries (cachetools'
LRUCache with getsizeof) would bound it but neither scope it per tenant nor walk a chain of entries.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger("vlora.responses")


@dataclass
class Stored:
    owner: str
    response: dict  # the Response as answered
    items: list[dict]  # this turn's input items (each with an id), as input_items lists them
    previous: str | None  # the response this one continued
    size: int  # all of it, held bytes included
    held: int = 0  # bytes kept elsewhere for it (its finished event stream): see ResponseStore.hold


def as_input(output: list[dict]) -> list[dict]:
    """A response's output items as the input items of the next turn: the message as an assistant turn,
    function calls as they are; reasoning items are not sent back (the chat templates of thinking models
    drop earlier turns' reasoning too)."""
    items = []
    for item in output:
        if item["type"] == "message":
            items.append({"type": "message", "role": "assistant", "content": [
                {"type": "output_text", "text": part["text"]} for part in item["content"]]})
        elif item["type"] == "function_call":
            items.append({k: item[k] for k in ("type", "call_id", "name", "arguments")})
    return items


class ResponseStore:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, Stored] = OrderedDict()
        # told the id of an entry evicted or deleted (or whose held bytes no longer fit): let go what it held
        self.on_drop: Callable[[str], None] | None = None

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def put(self, owner: str, response: dict, items: list[dict], previous: str | None) -> bool:
        """Keep a response; False when it alone is over the bound (then it is not kept)."""
        size = len(json.dumps(response)) + len(json.dumps(items))
        if size > self.max_bytes:
            logger.warning("response not stored: %d bytes, over --responses-store-bytes %d", size, self.max_bytes)
            return False
        old = self._entries.pop(response["id"], None)  # replaced (a background response's next status)
        held = old.held if old is not None else 0
        if old is not None:
            self.bytes -= old.size
        if held and size + held > self.max_bytes:  # its held bytes no longer fit with it: they go
            held = 0
            if self.on_drop is not None:
                self.on_drop(response["id"])
        self._make_room(size + held)
        self._entries[response["id"]] = Stored(owner, response, items, previous, size + held, held)
        self.bytes += size + held
        return True

    def hold(self, response_id: str, nbytes: int) -> bool:
        """Count `nbytes` kept elsewhere for a stored response (its finished event stream) as part of it, so
        that the bound covers them and they are evicted with it (`on_drop`); False when it is not stored or
        would not fit with them (then nothing is counted, and the caller should let them go)."""
        entry = self._entries.get(response_id)
        if entry is None or entry.size + nbytes > self.max_bytes:
            return False
        self._entries.move_to_end(response_id)  # the newest: what makes room is everything older
        self._make_room(nbytes, keep=response_id)
        entry.size += nbytes
        entry.held += nbytes
        self.bytes += nbytes
        return True

    def release(self, response_id: str) -> None:
        """The held bytes of a stored response are gone (its event stream expired): no longer counted."""
        entry = self._entries.get(response_id)
        if entry is not None:
            self.bytes -= entry.held
            entry.size -= entry.held
            entry.held = 0

    def get(self, owner: str, response_id: str) -> Stored | None:
        entry = self._entries.get(response_id)
        if entry is None or entry.owner != owner:
            return None
        self._entries.move_to_end(response_id)
        return entry

    def delete(self, owner: str, response_id: str) -> bool:
        if self.get(owner, response_id) is None:
            return False
        self._drop(response_id)
        return True

    def conversation(self, owner: str, response_id: str) -> list[dict] | None:
        """The input items a follow-up to `response_id` continues: every earlier turn's input and output, oldest
        first; None when the response, or any response it continued, is not (or no longer) stored."""
        turns, seen = [], set()
        next_id: str | None = response_id
        while next_id is not None:
            entry = self.get(owner, next_id)
            if entry is None or next_id in seen:
                return None
            seen.add(next_id)
            turns.append(entry.items + as_input(entry.response["output"]))
            next_id = entry.previous
        return [item for turn in reversed(turns) for item in turn]

    def _make_room(self, size: int, keep: str | None = None) -> None:
        """Evict the least recently used entries (never `keep`) until `size` more bytes fit."""
        while self.bytes + size > self.max_bytes:
            oldest = next(iter(self._entries))
            if oldest == keep:
                return  # nothing older left (hold checked that it fits alone)
            self._drop(oldest)

    def _drop(self, response_id: str) -> None:
        entry = self._entries.pop(response_id, None)
        if entry is not None:
            self.bytes -= entry.size
            if self.on_drop is not None:
                self.on_drop(response_id)
