"""Images from the URLs of OpenAI chat `image_url` parts, and vLLM's `--limit-mm-per-prompt`.

A URL is one of

* `data:image/<type>;base64,<data>`: decoded in memory;
* `file:///abs/path` or a plain absolute path: read only when the server was started with
  `--allowed-local-media-path DIR` and the path, symlinks resolved, lies inside DIR;
* `http://` / `https://`: fetched with urllib within `fetch_timeout_s` (redirects only to
  http(s)).

Every failure is a MediaError (a ValueError) whose message names the problem: the server
answers it with HTTP 400. Limits are checked before the expensive step: the byte count before
decoding, the pixel count from the image header before the pixels are decoded (a small file
can claim a huge image). EXIF orientation is applied, as transformers' `load_image` does, so
a phone photo is upright; conversion to RGB is left to the image processor.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import os
import re
import stat
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import unquote, urlsplit

from PIL import Image, ImageOps

__all__ = [
    "KNOWN_MODALITIES",
    "LoadedImage",
    "MediaError",
    "MediaLimits",
    "load_image",
    "parse_limit_mm_per_prompt",
]

KNOWN_MODALITIES = ("image",)
"""Modalities `--limit-mm-per-prompt` may name."""

_READ_CHUNK = 1 << 16
_URL_IN_ERRORS = 200  # characters of a URL quoted in an error message


class MediaError(ValueError):
    """A media URL that cannot be turned into an image; the message says why (HTTP 400)."""


@dataclass(frozen=True, slots=True)
class MediaLimits:
    """What a request's media may cost the server."""

    max_bytes: int = 20 * 1024 * 1024  # encoded size of one image
    max_pixels: int = 50_000_000  # width * height, read from the header before decoding
    fetch_timeout_s: float = 5.0  # an http(s) fetch, connect to last byte
    allowed_local_media_path: Path | None = None  # None: no file:// or path URLs

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_pixels < 1 or self.fetch_timeout_s <= 0:
            raise ValueError(f"media limits must be positive, got max_bytes={self.max_bytes}, "
                             f"max_pixels={self.max_pixels}, fetch_timeout_s={self.fetch_timeout_s}")


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image and the identity of its bytes."""

    image: Image.Image  # fully loaded, any mode (the processor converts to RGB)
    digest: str  # sha256 hex of the encoded bytes: equal bytes, equal digest (a cache key)
    source: str  # "data URL", "file", "http" or "https"


def _short(url: str) -> str:
    return url if len(url) <= _URL_IN_ERRORS else url[:_URL_IN_ERRORS] + "..."


def _too_large(size: str, limits: MediaLimits) -> MediaError:
    return MediaError(f"image is too large: {size} bytes, the limit is {limits.max_bytes}")


def _from_data_url(url: str, limits: MediaLimits) -> bytes:
    header, comma, payload = url[len("data:"):].partition(",")
    if not comma:
        raise MediaError("data URL has no ',' before its data (expected data:image/png;base64,...)")
    params = [p.strip().lower() for p in header.split(";")]
    media_type = params[0]
    if not media_type.startswith("image/"):
        raise MediaError(f"data URL media type {media_type or '(none)'!r} is not an image "
                         "(expected image/png, image/jpeg, image/webp, ...)")
    if "base64" not in params[1:]:
        raise MediaError("data URL must be base64-encoded (data:image/png;base64,...)")
    compact = "".join(payload.split())
    if len(compact) > 4 * -(-limits.max_bytes // 3):  # base64 of n bytes has 4 * ceil(n / 3) chars
        raise _too_large(f"about {len(compact) * 3 // 4}", limits)
    try:
        data = base64.b64decode(compact, validate=True)
    except ValueError as e:  # binascii.Error, or non-ASCII text
        raise MediaError(f"invalid base64 in data URL: {e}") from e
    if len(data) > limits.max_bytes:
        raise _too_large(str(len(data)), limits)
    return data


def _local_path(url: str) -> str:
    if not url.startswith("file:"):
        return url
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise MediaError(f"file URL {_short(url)!r} names host {parts.netloc!r}; only local files "
                         "(file:///path) can be read")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise MediaError(f"file URL {_short(url)!r} must hold an absolute path (file:///path)")
    return path


def _from_file(url: str, limits: MediaLimits) -> bytes:
    root = limits.allowed_local_media_path
    if root is None:
        raise MediaError("local image files can be read only when the server is started with "
                         "--allowed-local-media-path")
    path = _local_path(url)
    if "\0" in path:
        raise MediaError("image path contains a NUL character")
    real = Path(os.path.realpath(path))  # symlinks resolved: a link cannot lead out of root
    if not real.is_relative_to(os.path.realpath(root)):
        raise MediaError(f"image path {path!r} is outside --allowed-local-media-path")
    try:
        info = real.stat()
        if not stat.S_ISREG(info.st_mode):
            raise MediaError(f"image path {path!r} is not a regular file")
        if info.st_size > limits.max_bytes:
            raise _too_large(str(info.st_size), limits)
        with real.open("rb") as f:
            data = f.read(limits.max_bytes + 1)
    except FileNotFoundError as e:
        raise MediaError(f"image file {path!r} does not exist") from e
    except OSError as e:
        raise MediaError(f"cannot read image file {path!r}: {e.strerror or e}") from e
    if len(data) > limits.max_bytes:  # grew since the stat
        raise _too_large(f"more than {limits.max_bytes}", limits)
    return data


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows redirects to ftp:// too; an image fetch follows only http(s)."""

    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
                         headers: http.client.HTTPMessage, newurl: str) -> urllib.request.Request | None:
        if urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise urllib.error.URLError(f"redirect to a non-HTTP URL {_short(newurl)!r}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch(url: str, limits: MediaLimits) -> bytes:
    """The body of an http(s) URL, at most max_bytes of it. The socket timeout bounds each
    connect / read; the deadline bounds the whole body (a server dripping bytes)."""
    failed = f"could not fetch image from {_short(url)}"
    deadline = time.monotonic() + limits.fetch_timeout_s
    request = urllib.request.Request(url, headers={"User-Agent": "specdec", "Accept": "image/*"})
    try:
        opener = urllib.request.build_opener(_HttpOnlyRedirects())
        with opener.open(request, timeout=limits.fetch_timeout_s) as response:
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > limits.max_bytes:
                raise _too_large(length, limits)
            chunks: list[bytes] = []
            total = 0
            while chunk := response.read(min(_READ_CHUNK, limits.max_bytes + 1 - total)):
                chunks.append(chunk)
                total += len(chunk)
                if total > limits.max_bytes:
                    raise _too_large(f"more than {limits.max_bytes}", limits)
                if time.monotonic() > deadline:
                    raise MediaError(f"{failed}: timed out after {limits.fetch_timeout_s:g} s")
    except MediaError:
        raise
    except urllib.error.HTTPError as e:
        raise MediaError(f"{failed}: HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise MediaError(f"{failed}: {e.reason}") from e
    except TimeoutError as e:
        raise MediaError(f"{failed}: timed out after {limits.fetch_timeout_s:g} s") from e
    except (OSError, http.client.HTTPException, ValueError) as e:  # reset, bad status line, bad URL
        raise MediaError(f"{failed}: {e}") from e
    return b"".join(chunks)


def _decode(data: bytes, limits: MediaLimits) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
        width, height = image.size
        if width * height > limits.max_pixels:
            raise MediaError(f"image has too many pixels: {width}x{height} = {width * height}, the "
                             f"limit is {limits.max_pixels}")
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
    except MediaError:
        raise
    except Image.DecompressionBombError as e:  # PIL's own bound, above ours only if raised
        raise MediaError(f"image has too many pixels: {e}") from e
    # PIL reports malformed input with many types (OSError, SyntaxError, struct.error,
    # zlib.error, ...); every one means these bytes are not an image it can decode.
    except Exception as e:
        raise MediaError(f"cannot decode image: {e}") from e
    return image


def load_image(url: str, limits: MediaLimits) -> LoadedImage:
    """The image an `image_url` part's URL names, decoded; MediaError if it cannot be had."""
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError as e:  # e.g. an unclosed [IPv6] host
        raise MediaError(f"malformed image URL {_short(url)!r}: {e}") from e
    if scheme == "data":
        data, source = _from_data_url(url, limits), "data URL"
    elif scheme == "file" or url.startswith("/"):
        data, source = _from_file(url, limits), "file"
    elif scheme in ("http", "https"):
        data, source = _fetch(url, limits), scheme
    else:
        raise MediaError(f"unsupported image URL scheme {scheme or '(none)'!r}: use data:, "
                         "http(s):// or (with --allowed-local-media-path) file://")
    return LoadedImage(image=_decode(data, limits), digest=hashlib.sha256(data).hexdigest(),
                       source=source)


def parse_limit_mm_per_prompt(spec: str | Mapping[str, object]) -> dict[str, int]:
    """vLLM's `--limit-mm-per-prompt`: the most items of each modality one prompt may carry,
    written `image=10` (comma-separated pairs) or as JSON, `{"image": 10}`; a mapping (the
    option set from Python) is checked the same way. Only "image" is known; counts are
    integers >= 0 (0 turns the modality off)."""
    flag = "--limit-mm-per-prompt"
    pairs: list[tuple[object, object]] = []
    if isinstance(spec, Mapping):
        pairs = list(spec.items())
    elif not spec.strip():
        raise ValueError(f'{flag} is empty; expected image=N or {{"image": N}}')
    elif spec.strip().startswith("{"):  # a JSON object (nothing else starts with "{")
        try:  # as pairs, so that a repeated key is seen rather than silently overwritten
            pairs = json.loads(spec, object_pairs_hook=lambda items: items)
        except json.JSONDecodeError as e:
            raise ValueError(f"{flag} {spec!r} is not valid JSON: {e}") from e
    else:
        for part in spec.split(","):
            key, eq, value = part.partition("=")
            if not eq or not re.fullmatch(r"[+-]?\d+", value.strip(), re.ASCII):
                raise ValueError(f"{flag}: {part.strip()!r} is not MODALITY=COUNT (e.g. image=10)")
            pairs.append((key.strip(), int(value)))
    limits: dict[str, int] = {}
    for modality, count in pairs:
        if not isinstance(modality, str) or modality not in KNOWN_MODALITIES:
            raise ValueError(f"{flag}: unknown modality {modality!r} (known: "
                             f"{', '.join(KNOWN_MODALITIES)})")
        if modality in limits:
            raise ValueError(f"{flag}: modality {modality!r} is given twice")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f"{flag}: the count for {modality!r} must be an integer >= 0, got {count!r}")
        limits[modality] = count
    return limits
