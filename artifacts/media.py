"""Image and video inputs: data URIs and http(s) URLs, within byte (and, for images, pixel) limits. One
implementation for the service (requests' images and videos) and the trainer (datasets' image URLs and data
URIs): the same address policy, caps and timeout on both sides.

Images are decoded here to RGB PIL images; videos are fetched here, under the same address policy, byte cap
and timeout, and decoded by the engine's own video loader (frames sampled as the model's processor expects).

Every refusal is a typed error naming its parameter: `MediaError` for what cannot be an image (bad base64,
unknown format, truncated file, a URL we will not fetch; the service answers 400), `MediaTooLarge` for what is
too large (bytes before decoding, pixels before the full decode, so decompression bombs are refused from the
header alone; 413). PIL and httpx are imported where they are used (this package needs neither to import).

URL fetching resolves the host and refuses loopback, private, link-local, multicast, reserved and other
non-public addresses (unless allowlisted), re-checks every redirect, streams with a byte cap and a
timeout, and accepts only image content types.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import socket
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit


class MediaError(ValueError):
    """Input that is not an acceptable image or video (or a URL that will not be fetched)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param


class MediaTooLarge(MediaError):
    """Input over a byte or pixel limit."""


ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP", "GIF"}
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class MediaLimits:
    max_image_bytes: int
    max_image_pixels: int
    fetch_timeout_s: float = 10.0
    max_redirects: int = 3
    allowlist: tuple[str, ...] = ()
    max_video_bytes: int = 64 * 1024 * 1024

    def max_bytes(self, kind: str) -> int:
        return self.max_video_bytes if kind == "video" else self.max_image_bytes


# -- address policy (pure functions: no connection is ever made here) ---------------------------------

def _unmapped(addr: IPAddress) -> IPAddress:
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return addr.ipv4_mapped
        if addr.sixtofour is not None:
            return addr.sixtofour
        if addr.teredo is not None:
            return addr.teredo[1]
    return addr


def address_is_public(addr: IPAddress) -> bool:
    """True only for globally routable unicast addresses (IPv4-mapped/6to4/Teredo judged by their IPv4)."""
    addr = _unmapped(addr)
    return bool(addr.is_global) and not (addr.is_multicast or addr.is_reserved or addr.is_unspecified)


def parse_allowlist_entry(entry: str) -> tuple[str, int | None]:
    """`HOST`, `CIDR`, `HOST:PORT`, `CIDR:PORT` or `[IPv6]:PORT` -> (host or network, port or None)."""
    entry = entry.strip()
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif entry.count(":") == 1:
        host, _, port = entry.partition(":")
    else:
        host, port = entry, ""
    if port and not port.isdigit():
        raise ValueError(f"allowlist entry '{entry}' has a bad port")
    return host, (int(port) if port else None)


def address_allowed(addr: IPAddress, host: str, allowlist: Iterable[str], port: int | None = None) -> bool:
    """Public addresses are allowed; others only when an allowlist entry names the host or its network
    (and, when the entry has a port, that port)."""
    for entry in allowlist:
        try:
            allowed_host, allowed_port = parse_allowlist_entry(entry)
        except ValueError:
            continue
        if allowed_port is not None and allowed_port != port:
            continue
        if allowed_host.lower() == host.lower():
            return True
        try:
            if _unmapped(addr) in ipaddress.ip_network(allowed_host, strict=False):
                return True
        except ValueError:
            continue
    return address_is_public(addr)


Resolver = Callable[[str, int], list[str]]


def system_resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


def check_url(url: str, allowlist: Iterable[str], resolve: Resolver = system_resolve,
              kind: str = "image") -> tuple[str, int, str]:
    """Validate scheme and every resolved address of `url`; returns (host, port, address to connect to)."""
    param = f"{kind}_url"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise MediaError(f"{kind} URL scheme '{parts.scheme}' is not allowed (only http and https)", param=param)
    host = parts.hostname
    if not host:
        raise MediaError(f"{kind} URL has no host", param=param)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        addresses = resolve(host, port)
    except (OSError, UnicodeError) as exc:
        raise MediaError(f"{kind} URL host '{host}' does not resolve: {exc}", param=param) from None
    if not addresses:
        raise MediaError(f"{kind} URL host '{host}' does not resolve", param=param)
    for text in addresses:
        addr = ipaddress.ip_address(text.split("%")[0])
        if not address_allowed(addr, host, allowlist, port):
            raise MediaError(f"{kind} URL host '{host}' resolves to a non-public address ({addr}); refused",
                             param=param)
    return host, port, addresses[0]


# -- decoding -------------------------------------------------------------------------------------------

def decode_image(data: bytes, limits: MediaLimits):
    """An RGB PIL image, within the limits."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > limits.max_image_bytes:
        raise MediaTooLarge(f"image is {len(data)} bytes; the limit is {limits.max_image_bytes}", param="image_url")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
            if image.format not in ALLOWED_FORMATS:
                raise MediaError(f"image format {image.format} is not supported (PNG, JPEG, WebP, GIF)",
                                 param="image_url")
            width, height = image.size
            if width * height > limits.max_image_pixels:
                raise MediaTooLarge(f"image is {width}x{height} = {width * height} pixels; the limit is "
                                      f"{limits.max_image_pixels}", param="image_url")
            if image.format == "GIF":
                image.seek(0)
            image.load()
            return image.convert("RGB")
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MediaTooLarge(f"image refused before decoding ({exc}); the limit is {limits.max_image_pixels} "
                              "pixels", param="image_url") from None
    except UnidentifiedImageError:
        raise MediaError("image data is not a decodable image", param="image_url") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise MediaError(f"image could not be decoded: {exc}", param="image_url") from None


def decode_data_uri(uri: str, limits: MediaLimits, kind: str = "image") -> bytes:
    param, cap = f"{kind}_url", limits.max_bytes(kind)
    header, sep, payload = uri.partition(",")
    if not sep or not header.startswith("data:"):
        raise MediaError("malformed data URI", param=param)
    media_type = header[5:].split(";")[0].strip().lower()
    if media_type and not media_type.startswith(f"{kind}/"):
        raise MediaError(f"data URI media type '{media_type}' is not {'an' if kind == 'image' else 'a'} {kind}",
                         param=param)
    if ";base64" not in header:
        raise MediaError(f"{kind} data URIs must be base64-encoded", param=param)
    # Refuse from the encoded length, before allocating the decoded bytes.
    if len(payload) * 3 // 4 > cap + 3:
        raise MediaTooLarge(f"{kind} data URI decodes to more than {cap} bytes", param=param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"{kind} data URI is not valid base64", param=param) from None


def pin_to_address(url: str, host: str, port: int, address: str, kind: str = "image") -> tuple[str, dict, dict]:
    """The request for `url` sent to the address that was checked, not to a second DNS answer (no DNS
    rebinding between check and connect): the URL names the IP, `Host` and TLS SNI/verification keep the
    original host name."""
    parts = urlsplit(url)
    ip = ipaddress.ip_address(address.split("%")[0])
    netloc = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
    default_port = 443 if parts.scheme == "https" else 80
    host_header = host if port == default_port else f"{host}:{port}"
    if ":" in host and not host.startswith("["):
        host_header = f"[{host}]" if port == default_port else f"[{host}]:{port}"
    pinned = parts._replace(netloc=netloc).geturl()
    extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
    return pinned, {"Accept": f"{kind}/*", "Host": host_header}, extensions


async def fetch_url(url: str, limits: MediaLimits, resolve: Resolver = system_resolve, kind: str = "image") -> bytes:
    """GET an image (or video) over http(s), checking the address policy on the first URL and every redirect."""
    import httpx

    param, cap = f"{kind}_url", limits.max_bytes(kind)
    deadline = time.monotonic() + limits.fetch_timeout_s
    timeout = httpx.Timeout(limits.fetch_timeout_s, connect=min(5.0, limits.fetch_timeout_s))
    async with httpx.AsyncClient(follow_redirects=False, timeout=timeout, trust_env=False) as client:
        for _ in range(limits.max_redirects + 1):
            host, port, address = await asyncio.to_thread(check_url, url, limits.allowlist, resolve, kind)
            pinned, headers, extensions = pin_to_address(url, host, port, address, kind)
            try:
                async with client.stream("GET", pinned, headers=headers, extensions=extensions) as response:
                    if response.is_redirect:
                        location = response.headers.get("location")
                        if not location:
                            raise MediaError(f"{kind} URL redirected without a location", param=param)
                        url = urljoin(url, location)
                        continue
                    if response.status_code != 200:
                        raise MediaError(f"{kind} URL answered HTTP {response.status_code}", param=param)
                    ctype = response.headers.get("content-type", "").split(";")[0].strip().lower()
                    if not ctype.startswith(f"{kind}/"):
                        raise MediaError(f"{kind} URL content type '{ctype or 'missing'}' is not "
                                         f"{'an' if kind == 'image' else 'a'} {kind}", param=param)
                    declared = int(response.headers.get("content-length") or 0)
                    if declared > cap:
                        raise MediaTooLarge(f"{kind} URL body is {declared} bytes; the limit is {cap}", param=param)
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body.extend(chunk)
                        if len(body) > cap:
                            raise MediaTooLarge(f"{kind} URL body exceeds {cap} bytes", param=param)
                        if time.monotonic() > deadline:
                            raise MediaError(f"{kind} URL download timed out", param=param)
                    return bytes(body)
            except httpx.TimeoutException:
                raise MediaError(f"{kind} URL download timed out", param=param) from None
            except httpx.HTTPError as exc:
                raise MediaError(f"{kind} URL could not be fetched: {type(exc).__name__}", param=param) from None
        raise MediaError(f"{kind} URL redirected more than {limits.max_redirects} times", param=param)


async def load_bytes(url: str, limits: MediaLimits, kind: str = "image") -> bytes:
    """An image's or video's bytes from a data URI or an http(s) URL, within that kind's byte cap."""
    if url.startswith("data:"):
        return decode_data_uri(url, limits, kind)
    return await fetch_url(url, limits, kind=kind)


async def load_video_bytes(url: str, limits: MediaLimits) -> bytes:
    """A video's bytes (decoded by the engine's video loader)."""
    return await load_bytes(url, limits, "video")


def header_pixels(data: bytes) -> int | None:
    """width x height from the image header alone (None when the header does not parse)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            width, height = Image.open(io.BytesIO(data)).size
        return width * height
    except Exception:  # the full decode reports what is wrong
        return None


def load_bytes_sync(url: str, limits: MediaLimits, kind: str = "image") -> bytes:
    """`load_bytes` outside an event loop (the trainer's data workers)."""
    return asyncio.run(load_bytes(url, limits, kind))
