"""Image and video inputs of requests: `artifacts.media` (the address policy, caps, fetching and decoding the
trainer uses too) with its refusals as HTTP errors (`MediaTooLarge` -> 413, any other `MediaError` -> 400), and
the event-loop policy of image decoding.

Images are decoded here to RGB PIL images; videos are fetched here and decoded by the engine's own video loader.
"""

from __future__ import annotations

import asyncio
import functools
import inspect

from artifacts import media as core
from artifacts.media import (  # noqa: F401 - the policy's pure functions, as the service's
    ALLOWED_FORMATS,
    MediaLimits,
    address_allowed,
    address_is_public,
    header_pixels,
    parse_allowlist_entry,
    pin_to_address,
    system_resolve,
)
from service.errors import APIError, BadRequest, PayloadTooLarge


def http_error(exc: core.MediaError) -> APIError:
    kind = PayloadTooLarge if isinstance(exc, core.MediaTooLarge) else BadRequest
    return kind(exc.message, param=exc.param)


def _http(fn):
    """`fn` with its media refusals raised as the service's HTTP errors."""
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def wrapper(*args, **kwargs):
            try:
                return await fn(*args, **kwargs)
            except core.MediaError as exc:
                raise http_error(exc) from None
    else:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except core.MediaError as exc:
                raise http_error(exc) from None
    return wrapper


check_url = _http(core.check_url)
decode_image = _http(core.decode_image)
decode_data_uri = _http(core.decode_data_uri)
fetch_url = _http(core.fetch_url)
load_bytes = _http(core.load_bytes)
load_video_bytes = _http(core.load_video_bytes)

# Images up to this many pixels are decoded on the event loop: that takes about a millisecond, less than
# the hand-off to a worker thread and back costs on a busy host. Bigger ones go to a thread.
INLINE_DECODE_PIXELS = 512 * 512


async def load_image(url: str, limits: MediaLimits):
    data = await load_bytes(url, limits)
    pixels = header_pixels(data)  # a header only; decode_image checks bytes and pixels again, either way
    if pixels is not None and pixels <= INLINE_DECODE_PIXELS:
        return decode_image(data, limits)
    return await asyncio.to_thread(decode_image, data, limits)
