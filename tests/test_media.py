"""Loading `image_url` images (specdec/media.py): data URLs, local files under
--allowed-local-media-path, http(s) from a loopback server started here (no network), every
failure a MediaError with a message naming it; and --limit-mm-per-prompt."""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image, features

from specdec.media import MediaError, MediaLimits, load_image, parse_limit_mm_per_prompt

LIMITS = MediaLimits()


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def sample(w: int = 12, h: int = 8, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


PNG = encode(sample(), "PNG")


# ---------------------------------------------------------------------------------- data URLs

def test_png_data_url_round_trips() -> None:
    loaded = load_image(data_url(PNG), LIMITS)
    assert loaded.source == "data URL"
    assert loaded.image.size == (12, 8)
    assert np.array_equal(np.asarray(loaded.image), np.asarray(sample()))  # lossless
    assert loaded.digest == hashlib.sha256(PNG).hexdigest()


@pytest.mark.parametrize(("fmt", "media_type"), [("JPEG", "image/jpeg"), ("JPEG", "image/jpg"),
                                                 ("WEBP", "image/webp"), ("GIF", "image/gif")])
def test_other_formats(fmt: str, media_type: str) -> None:
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("this Pillow has no WebP support")
    loaded = load_image(data_url(encode(sample(), fmt), media_type), LIMITS)
    assert loaded.image.size == (12, 8)
    assert loaded.image.format == fmt


def test_data_url_tolerates_line_breaks_in_base64() -> None:
    text = base64.b64encode(PNG).decode()
    wrapped = "\n".join(text[i:i + 76] for i in range(0, len(text), 76))
    assert load_image(f"data:image/png;base64,{wrapped}", LIMITS).digest == hashlib.sha256(PNG).hexdigest()


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    jpeg = encode(sample(40, 20), "JPEG", exif=exif)
    assert load_image(data_url(jpeg, "image/jpeg"), LIMITS).image.size == (20, 40)


@pytest.mark.parametrize(("url", "match"), [
    ("data:image/png;base64,@@@@", "invalid base64"),
    ("data:image/png;base64,iVBORw0KGgo", "invalid base64"),  # bad padding
    ("data:image/png;base64,é", "invalid base64"),
    ("data:text/plain;base64,aGVsbG8=", "'text/plain' is not an image"),
    ("data:;base64,aGVsbG8=", "is not an image"),
    ("data:image/png,rawbytes", "must be base64"),
    ("data:image/png;base64", "no ','"),
])
def test_bad_data_urls(url: str, match: str) -> None:
    with pytest.raises(MediaError, match=match):
        load_image(url, LIMITS)


def test_media_error_is_a_value_error() -> None:
    assert issubclass(MediaError, ValueError)


@pytest.mark.parametrize("data", [
    b"not an image at all",
    PNG[: len(PNG) // 2],  # truncated: the header decodes, the pixels do not
    PNG[:16] + bytes(64),  # a PNG signature and garbage
    b"",
])
def test_corrupt_bytes(data: bytes) -> None:
    with pytest.raises(MediaError, match="cannot decode image"):
        load_image(data_url(data), LIMITS)


def _png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height (its data is far too short)."""
    png = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    ihdr = png[12:29]  # b"IHDR" + 13 bytes of fields
    ihdr[4:12] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    png[12:29] = ihdr
    png[29:33] = zlib.crc32(bytes(ihdr)).to_bytes(4, "big")
    return bytes(png)


def test_too_many_pixels_is_refused_from_the_header() -> None:
    with pytest.raises(MediaError, match="too many pixels: 8000x8000"):  # 64M > 50M, never decoded
        load_image(data_url(_png_claiming(8000, 8000)), LIMITS)
    with pytest.raises(MediaError, match="too many pixels"):  # beyond PIL's own bomb guard too
        load_image(data_url(_png_claiming(100_000, 100_000)), LIMITS)
    with pytest.raises(MediaError, match="too many pixels: 12x8 = 96, the limit is 95"):
        load_image(data_url(PNG), MediaLimits(max_pixels=95))
    assert load_image(data_url(PNG), MediaLimits(max_pixels=96)).image.size == (12, 8)


def test_too_many_bytes() -> None:
    with pytest.raises(MediaError, match="too large"):
        load_image(data_url(PNG), MediaLimits(max_bytes=len(PNG) - 1))
    assert load_image(data_url(PNG), MediaLimits(max_bytes=len(PNG))).image.size == (12, 8)
    with pytest.raises(MediaError, match="too large"):  # refused from the base64 length alone
        load_image("data:image/png;base64," + "A" * 4000, MediaLimits(max_bytes=100))


def test_digests_follow_the_bytes() -> None:
    same = load_image(data_url(PNG), LIMITS).digest
    assert load_image(data_url(PNG, "image/png"), LIMITS).digest == same
    other = encode(sample(seed=1), "PNG")
    assert load_image(data_url(other), LIMITS).digest != same
    # the same picture in other bytes is another digest: it keys bytes, not pixels
    assert load_image(data_url(encode(sample(), "PNG", compress_level=1)), LIMITS).digest != same


# ---------------------------------------------------------------------------------- files

@pytest.fixture
def media_dir(tmp_path: Path) -> Path:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "img.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(PNG)
    return allowed


def test_file_inside_the_allowed_dir(media_dir: Path) -> None:
    limits = MediaLimits(allowed_local_media_path=media_dir)
    for url in (str(media_dir / "img.png"), (media_dir / "img.png").as_uri(),
                f"file://localhost{media_dir / 'img.png'}"):
        loaded = load_image(url, limits)
        assert loaded.source == "file" and loaded.image.size == (12, 8)
        assert loaded.digest == load_image(data_url(PNG), LIMITS).digest  # same bytes, same digest


def test_file_name_with_spaces_via_file_url(media_dir: Path) -> None:
    (media_dir / "a b.png").write_bytes(PNG)
    limits = MediaLimits(allowed_local_media_path=media_dir)
    assert load_image((media_dir / "a b.png").as_uri(), limits).image.size == (12, 8)  # a%20b.png


def test_local_files_need_the_flag(media_dir: Path) -> None:
    for url in (str(media_dir / "img.png"), (media_dir / "img.png").as_uri()):
        with pytest.raises(MediaError, match="--allowed-local-media-path"):
            load_image(url, LIMITS)


def test_file_outside_the_allowed_dir(media_dir: Path) -> None:
    limits = MediaLimits(allowed_local_media_path=media_dir)
    for url in (str(media_dir.parent / "secret.png"), str(media_dir / ".." / "secret.png"),
                "/etc/hostname"):
        with pytest.raises(MediaError, match="outside --allowed-local-media-path"):
            load_image(url, limits)


def test_symlink_escaping_the_allowed_dir(media_dir: Path) -> None:
    (media_dir / "link.png").symlink_to(media_dir.parent / "secret.png")
    (media_dir / "sub").symlink_to(media_dir.parent)
    limits = MediaLimits(allowed_local_media_path=media_dir)
    for path in (media_dir / "link.png", media_dir / "sub" / "secret.png"):
        with pytest.raises(MediaError, match="outside"):
            load_image(str(path), limits)
    (media_dir / "inner.png").symlink_to(media_dir / "img.png")  # a link staying inside is fine
    assert load_image(str(media_dir / "inner.png"), limits).image.size == (12, 8)


def test_allowed_dir_given_through_a_symlink(media_dir: Path) -> None:
    alias = media_dir.parent / "alias"
    alias.symlink_to(media_dir)
    limits = MediaLimits(allowed_local_media_path=alias)
    assert load_image(str(media_dir / "img.png"), limits).image.size == (12, 8)
    assert load_image(str(alias / "img.png"), limits).image.size == (12, 8)


def test_missing_file_and_directory(media_dir: Path) -> None:
    limits = MediaLimits(allowed_local_media_path=media_dir)
    with pytest.raises(MediaError, match="does not exist"):
        load_image(str(media_dir / "nope.png"), limits)
    (media_dir / "folder").mkdir()
    with pytest.raises(MediaError, match="not a regular file"):
        load_image(str(media_dir / "folder"), limits)


def test_file_too_large_and_remote_file_url(media_dir: Path) -> None:
    with pytest.raises(MediaError, match="too large"):
        load_image(str(media_dir / "img.png"), MediaLimits(max_bytes=10, allowed_local_media_path=media_dir))
    with pytest.raises(MediaError, match="NUL"):
        load_image(f"{media_dir}/img.png\0", MediaLimits(allowed_local_media_path=media_dir))
    with pytest.raises(MediaError, match="only local files"):
        load_image(f"file://example.com{media_dir / 'img.png'}", MediaLimits(allowed_local_media_path=media_dir))


# ---------------------------------------------------------------------------------- http

class _Handler(http.server.BaseHTTPRequestHandler):
    REDIRECTS: ClassVar[dict[str, str]] = {
        "/to-img": "/img.png", "/to-file": "file:///etc/passwd", "/to-ftp": "ftp://127.0.0.1/x.png",
    }

    def do_GET(self) -> None:
        if self.path == "/img.png":
            self._send(200, PNG)
        elif self.path == "/big":
            self._send(200, bytes(5000))
        elif self.path == "/big-unsized":  # no Content-Length: the read loop must stop it
            self.send_response(200)
            self.end_headers()
            self.wfile.write(bytes(5000))
        elif self.path == "/slow":
            time.sleep(1.0)
            self._send(200, PNG)
        elif self.path in self.REDIRECTS:
            self.send_response(302)
            self.send_header("Location", self.REDIRECTS[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._send(404, b"no")

    def _send(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # the slow handler writes to a client that gave up


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = _QuietServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def test_http_fetch(server: str) -> None:
    loaded = load_image(f"{server}/img.png", LIMITS)
    assert loaded.source == "http" and loaded.image.size == (12, 8)
    assert loaded.digest == hashlib.sha256(PNG).hexdigest()
    assert load_image(f"{server}/to-img", LIMITS).digest == loaded.digest  # an http redirect is followed


@pytest.mark.parametrize(("path", "match"), [
    ("/missing.png", "HTTP 404"),
    ("/big", "too large: 5000 bytes"),  # from Content-Length, before reading
    ("/big-unsized", "too large: more than 1000"),
    ("/to-file", "HTTP 302 .* not allowed"),  # urllib's own rule
    ("/to-ftp", "redirect to a non-HTTP URL"),  # urllib would follow this one
])
def test_http_failures(server: str, path: str, match: str) -> None:
    with pytest.raises(MediaError, match=match):
        load_image(f"{server}{path}", MediaLimits(max_bytes=1000))


def test_http_timeout(server: str) -> None:
    start = time.monotonic()
    with pytest.raises(MediaError, match=r"could not fetch image from .*/slow: timed out"):
        load_image(f"{server}/slow", MediaLimits(fetch_timeout_s=0.2))
    assert time.monotonic() - start < 0.9  # well before the server's 1 s answer


def test_http_connection_refused() -> None:
    start = time.monotonic()
    with pytest.raises(MediaError, match=r"could not fetch image from http://127\.0\.0\.1:9/x\.png: "):
        load_image("http://127.0.0.1:9/x.png", MediaLimits(fetch_timeout_s=2.0))
    assert time.monotonic() - start < 2.5


@pytest.mark.parametrize(("url", "match"), [
    ("ftp://example.com/x.png", "unsupported image URL scheme 'ftp'"),
    ("img.png", "unsupported image URL scheme '\\(none\\)'"),
    ("s3://bucket/key", "'s3'"),
    ("http://[::1/x.png", "malformed image URL"),
])
def test_unsupported_urls(url: str, match: str) -> None:
    with pytest.raises(MediaError, match=match):
        load_image(url, LIMITS)


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        MediaLimits(max_bytes=0)


# ---------------------------------------------------------------------------------- --limit-mm-per-prompt

@pytest.mark.parametrize(("spec", "expected"), [
    ("image=10", {"image": 10}),
    (" image = 0 ", {"image": 0}),
    ('{"image": 3}', {"image": 3}),
    ("{}", {}),
    ({"image": 2}, {"image": 2}),
])
def test_limit_mm_per_prompt(spec: str, expected: dict[str, int]) -> None:
    assert parse_limit_mm_per_prompt(spec) == expected


@pytest.mark.parametrize(("spec", "match"), [
    ("", "empty"),
    ("image", "not MODALITY=COUNT"),
    ("image=x", "not MODALITY=COUNT"),
    ("image=1.5", "not MODALITY=COUNT"),
    ("image=-1", "integer >= 0, got -1"),
    ("video=1", "unknown modality 'video'"),
    ("image=1,image=2", "given twice"),
    ('{"image": -1}', "integer >= 0"),
    ('{"image": true}', "integer >= 0, got True"),
    ('{"image": 1.5}', "integer >= 0"),
    ('{"image": {"count": 3}}', "integer >= 0"),
    ('{"image": 1, "image": 2}', "given twice"),
    ('{"image": 1', "not valid JSON"),
    ({"audio": 1}, "unknown modality 'audio'"),
])
def test_bad_limit_mm_per_prompt(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_limit_mm_per_prompt(spec)
