"""Image decoding limits and the URL address policy (pure functions: no connection is made)."""

from __future__ import annotations

import base64
import ipaddress

import pytest

from service.errors import BadRequest, PayloadTooLarge
from service.media import MediaLimits, address_is_public, check_url, decode_data_uri, decode_image
from tests.images import data_uri, encode, shape_image

LIMITS = MediaLimits(max_image_bytes=1_000_000, max_image_pixels=1024 * 1024)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_formats_decode_to_rgb(fmt):
    image = decode_image(encode(shape_image("red", (64, 48)), fmt), LIMITS)
    assert image.mode == "RGB" and image.size == (64, 48)


def test_gif_uses_first_frame():
    frames = [shape_image("red", (32, 32)), shape_image("blue", (32, 32))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert decode_image(data, LIMITS).getpixel((16, 16))[0] > 200  # red, not blue


def test_pixel_limit_checked_before_decode():
    bomb = encode(shape_image("white", (2048, 2048)))  # a few KB on the wire
    assert len(bomb) < LIMITS.max_image_bytes
    with pytest.raises(PayloadTooLarge, match="pixels"):
        decode_image(bomb, LIMITS)


def test_byte_limit():
    with pytest.raises(PayloadTooLarge):
        decode_image(b"\0" * (LIMITS.max_image_bytes + 1), LIMITS)
    with pytest.raises(PayloadTooLarge):
        decode_data_uri("data:image/png;base64," + "A" * (LIMITS.max_image_bytes * 2), LIMITS)


@pytest.mark.parametrize("data", [b"", b"not an image", encode(shape_image(), "JPEG")[:300],
                                  encode(shape_image(), "BMP")])
def test_undecodable_or_unsupported(data):
    with pytest.raises(BadRequest):
        decode_image(data, LIMITS)


@pytest.mark.parametrize("uri", ["data:image/png,rawbytes", "data:text/plain;base64,aGk=", "data:image/png;base64,@@",
                                 "image/png;base64,AAAA"])
def test_bad_data_uris(uri):
    with pytest.raises(BadRequest):
        decode_data_uri(uri, LIMITS)


def test_data_uri_round_trip():
    png = encode(shape_image())
    assert decode_data_uri(data_uri(png), LIMITS) == png
    assert decode_data_uri("data:;base64," + base64.b64encode(png).decode(), LIMITS) == png


@pytest.mark.parametrize("addr", [
    "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
    "224.0.0.1", "255.255.255.255", "192.0.2.1", "198.18.0.1", "240.0.0.1",
    "::1", "::", "fc00::1", "fd12:3456::1", "fe80::1", "ff02::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1",
    "::ffff:169.254.169.254", "64:ff9b::a00:1", "2002:a00:1::", "2001:db8::1",
])
def test_non_public_addresses_refused(addr):
    assert not address_is_public(ipaddress.ip_address(addr))


@pytest.mark.parametrize("addr", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_allowed(addr):
    assert address_is_public(ipaddress.ip_address(addr))


def _resolver(mapping):
    def resolve(host, port):
        return mapping[host]
    return resolve


def test_check_url_policy_with_stubbed_resolution():
    resolve = _resolver({"public.example": ["93.184.216.34"], "internal.example": ["10.0.0.5"],
                         "mixed.example": ["93.184.216.34", "169.254.169.254"], "localhost": ["127.0.0.1", "::1"]})
    assert check_url("https://public.example/a.png", [], resolve)[2] == "93.184.216.34"
    for url in ("http://internal.example/x", "http://mixed.example/x", "http://localhost/x"):
        with pytest.raises(BadRequest, match="non-public"):
            check_url(url, [], resolve)
    for url in ("file:///etc/passwd", "gopher://public.example/", "ftp://public.example/a.png"):
        with pytest.raises(BadRequest, match="scheme"):
            check_url(url, [], resolve)
    # Allowlisting a network or a host name opens exactly that.
    assert check_url("http://internal.example/x", ["10.0.0.0/24"], resolve)
    assert check_url("http://localhost/x", ["localhost"], resolve)
    with pytest.raises(BadRequest):
        check_url("http://internal.example/x", ["10.0.1.0/24"], resolve)


def test_allowlist_entries_with_ports():
    from service.media import address_allowed, parse_allowlist_entry

    assert parse_allowlist_entry("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_allowlist_entry("[::1]:9") == ("::1", 9)
    assert parse_allowlist_entry("fd00::/8") == ("fd00::/8", None)
    assert parse_allowlist_entry("localhost") == ("localhost", None)
    loop = ipaddress.ip_address("127.0.0.1")
    assert address_allowed(loop, "127.0.0.1", ["127.0.0.1:8080"], 8080)
    assert not address_allowed(loop, "127.0.0.1", ["127.0.0.1:8080"], 8081)
    assert address_allowed(loop, "localhost", ["127.0.0.0/8"], 1)
    with pytest.raises(ValueError):
        parse_allowlist_entry("127.0.0.1:http")


def test_requests_are_pinned_to_the_checked_address():
    """The connection goes to the address the policy checked; a second DNS answer is never asked for."""
    from service.media import pin_to_address

    url, headers, ext = pin_to_address("https://images.example/a.png?s=1", "images.example", 443, "93.184.216.34")
    assert url == "https://93.184.216.34:443/a.png?s=1"
    assert headers["Host"] == "images.example" and ext == {"sni_hostname": "images.example"}
    url, headers, ext = pin_to_address("http://img.example:8080/x", "img.example", 8080, "2606:4700::1")
    assert url == "http://[2606:4700::1]:8080/x" and headers["Host"] == "img.example:8080" and ext == {}


def test_small_images_decode_inline_big_ones_in_a_thread(monkeypatch):
    import asyncio

    import service.media as media

    threaded = []
    real_to_thread = asyncio.to_thread

    async def spy(fn, *args):
        threaded.append(fn.__name__)
        return await real_to_thread(fn, *args)

    monkeypatch.setattr(media.asyncio, "to_thread", spy)
    small, big = encode(shape_image("red", (256, 256))), encode(shape_image("red", (1000, 600)))
    assert media.header_pixels(small) == 256 * 256 and media.header_pixels(b"not an image") is None
    assert asyncio.run(media.load_image(data_uri(small), LIMITS)).size == (256, 256)
    assert threaded == []
    assert asyncio.run(media.load_image(data_uri(big), LIMITS)).size == (1000, 600)
    assert threaded == ["decode_image"]
    for bad in (b"not an image", encode(shape_image("white", (2048, 2048)))):  # refusals as before
        with pytest.raises((BadRequest, PayloadTooLarge)):
            asyncio.run(media.load_image(data_uri(bad, "image/png"), LIMITS))


def test_videos_have_their_own_byte_cap_and_the_same_address_policy():
    limits = MediaLimits(max_image_bytes=1 << 20, max_image_pixels=1 << 20, max_video_bytes=2048)
    small = "data:video/mp4;base64," + base64.b64encode(b"\0" * 1000).decode()
    assert decode_data_uri(small, limits, "video") == b"\0" * 1000
    big = "data:video/mp4;base64," + base64.b64encode(b"\0" * 4096).decode()
    with pytest.raises(PayloadTooLarge) as exc:
        decode_data_uri(big, limits, "video")
    assert exc.value.param == "video_url"
    with pytest.raises(BadRequest, match="not a video"):
        decode_data_uri("data:image/png;base64,AAAA", limits, "video")
    with pytest.raises(BadRequest) as exc:  # a private address: refused by the policy, nothing is connected
        check_url("http://10.1.2.3/clip.mp4", [], lambda host, port: ["10.1.2.3"], kind="video")
    assert exc.value.param == "video_url" and "non-public" in exc.value.message
