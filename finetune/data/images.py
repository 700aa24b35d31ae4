"""Image rows, for vision-language models: the shapes users have, brought to one before the text is normalised.

Accepted: OpenAI/TRL content parts (`{"type": "image", "image": PATH|URL|base64}`, `{"type": "image_url",
"image_url": {"url": ...}}`, or a bare `{"type": "image"}` taking the next entry of a row-level `images` list, TRL's
vision datasets' shape) and LLaVA/ShareGPT `<image>` placeholders in the text with an `images` list (LLaMA-Factory's
mllm_demo). Either way a row becomes text with one `<image>` placeholder where each image sits, plus its images in
order, each checked to open as an image now (a broken file refuses its row with file:row, so `max_bad_fraction`
applies), not when a batch is built hours later.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.data.formats import PLACEHOLDER

#: Content-part types that carry an image, and the keys that hold it.
IMAGE_PARTS = {"image": ("image", "url", "path"), "image_url": ("image_url",), "input_image": ("image_url", "image")}
#: Row-level fields listing a row's images (one image may come bare as `image`).
IMAGE_FIELDS = ("images", "image")
#: Turn lists of the conversational formats.
TURNS = ("messages", "conversations", "prompt", "completion")
CONTENT = ("content", "value")
#: Text this long in base64's alphabet alone is an inline image, not a path (no file name is that long).
BARE_BASE64 = 255
BASE64 = re.compile(r"[A-Za-z0-9+/=\s]+")


@dataclass(frozen=True)
class ImageRef:
    """One image of a row: a local file (absolute path), a URL fetched when the data is prepared, or inline bytes."""

    kind: str  # "path", "url" or "bytes"
    value: str | bytes

    def describe(self) -> str:
        return {"path": str(self.value), "url": str(self.value)}.get(self.kind, f"{len(self.value)} inline bytes")

    def record(self) -> dict:
        """For held_out.jsonl: inline bytes as base64, so the saved row reads back as the same image."""
        value = base64.b64encode(self.value).decode() if self.kind == "bytes" else self.value
        return {"kind": self.kind, "value": value}


def extract_images(record: dict, base_dir: Path | None) -> tuple[dict, list[ImageRef]]:
    """The row with each image replaced by a `<image>` placeholder in its turn's text, and its images in order;
    ValueError names what does not add up (images without a place, places without an image, an unreadable image)."""
    listed = _listed(record)
    queue = list(listed)
    found: list[ImageRef] = []
    row = {k: v for k, v in record.items() if k not in IMAGE_FIELDS}
    for key in TURNS:
        if isinstance(row.get(key), list):
            row[key] = [_turn(turn, queue, found, base_dir) for turn in row[key]]
    if queue:
        raise ValueError(f"{len(listed)} image(s) in `images` but {len(listed) - len(queue)} place(s) for them in "
                         f"the text (`{PLACEHOLDER}` placeholders or image content parts); each image needs one")
    return row, [check_image(ref) for ref in found]  # a row without images is text, which a VLM trains too


def _listed(record: dict) -> list[Any]:
    value = next((record[k] for k in IMAGE_FIELDS if record.get(k) not in (None, [], "")), [])
    return value if isinstance(value, list) else [value]


def _turn(turn: Any, queue: list, found: list[ImageRef], base_dir: Path | None) -> Any:
    if not isinstance(turn, dict):
        return turn
    key = next((k for k in CONTENT if k in turn), None)
    content = turn.get(key)
    if isinstance(content, str):
        _placed(content, queue, found, base_dir)
        return turn
    if not isinstance(content, list):
        return turn
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            _placed(part["text"], queue, found, base_dir)
        elif kind in IMAGE_PARTS:
            inline = next((part[k] for k in IMAGE_PARTS[kind] if part.get(k) not in (None, "")), None)
            if inline is None and not queue:
                raise ValueError("an image content part with no image and none left in `images`")
            found.append(image_ref(inline if inline is not None else queue.pop(0), base_dir))
            part = {"type": "text", "text": PLACEHOLDER}
        parts.append(part)
    return {**turn, key: parts}


def _placed(text: str, queue: list, found: list[ImageRef], base_dir: Path | None) -> None:
    """The listed images that `<image>` placeholders in `text` take, in turn."""
    for _ in range(text.count(PLACEHOLDER)):
        if not queue:
            raise ValueError(f"more `{PLACEHOLDER}` placeholders than images in `images`")
        found.append(image_ref(queue.pop(0), base_dir))


def image_ref(value: Any, base_dir: Path | None) -> ImageRef:
    """What an image entry names: {"url": ...} (OpenAI), {"bytes"/"path"} (a `datasets` Image column), a data URI
    or long base64 text, an http(s) URL, else a path (relative to the data file's folder)."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return ImageRef("bytes", bytes(value["bytes"]))
        value = value.get("url") or value.get("path")
    if isinstance(value, bytes):
        return ImageRef("bytes", value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"an image must be a path, a URL or base64 data (got {str(value)[:60]})")
    if value.startswith("data:"):
        return ImageRef("bytes", _base64(value.partition(",")[2]))
    if value.startswith(("http://", "https://")):
        return ImageRef("url", value)
    if len(value) > BARE_BASE64 and BASE64.fullmatch(value):  # as some exports write inline images
        return ImageRef("bytes", _base64(value))
    path = Path(value).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    inline = None if path.exists() else _bare_image_bytes(value)  # a short inline image (a small PNG)
    return ImageRef("bytes", inline) if inline is not None else ImageRef("path", str(path))


#: How image files begin (PNG, JPEG, GIF, WebP's RIFF, BMP, TIFF both ways): base64 text that decodes to one of
#: these is an image, not a file name.
SIGNATURES = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")


def _bare_image_bytes(value: str) -> bytes | None:
    if len(value) < 16 or not BASE64.fullmatch(value):
        return None
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return data if data.startswith(SIGNATURES) else None


def _base64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("an image's base64 data does not decode") from None


def check_image(ref: ImageRef, where: str = " (relative paths are taken from the data file's folder)") -> ImageRef:
    """The image opens and decodes (PIL's verify reads the whole file); URLs are checked when fetched. `where`
    follows a missing file's name (how relative paths were resolved)."""
    if ref.kind == "url":
        return ref
    from PIL import Image, UnidentifiedImageError

    if ref.kind == "path" and Path(ref.value).is_dir():
        raise ValueError(f"image {ref.value}: a folder, not an image file")
    if ref.kind == "path" and not Path(ref.value).is_file():
        raise ValueError(f"image {ref.value}: no such file{where}")
    try:
        with Image.open(ref.value if ref.kind == "path" else io.BytesIO(ref.value)) as image:
            image.verify()
    except UnidentifiedImageError:  # its message names the file object, an address for inline bytes
        raise ValueError(f"image {ref.describe()}: not a readable image (no image format recognises it)") from None
    except (OSError, SyntaxError) as err:  # verify raises SyntaxError on a broken PNG
        raise ValueError(f"image {ref.describe()}: not a readable image ({err})") from None
    return ref
