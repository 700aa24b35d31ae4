"""Image rows for vision-language models: both shapes users have (content parts, `<image>` placeholders with an
`images` list) read to one, each image opened now, every problem refusing its row with file:row; text-only reading
refuses them as before."""

import base64
import io
import json
from pathlib import Path

from PIL import Image

from finetune.data.formats import PLACEHOLDER
from finetune.data.images import ImageRef
from finetune.data.rows import read_saved_conversations, read_source, save_conversations


def png(path: Path, color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 16), color).save(path)
    return path


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 0, 255)).save(buffer, format="PNG")
    return buffer.getvalue()


def write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat(*parts, answer="red"):
    return [{"role": "user", "content": list(parts)}, {"role": "assistant", "content": answer}]


def read(path: Path, media: bool = True):
    return read_source(str(path), "train", "auto", media=media)


def test_content_parts_and_placeholders_read_to_one_shape_with_images_in_order(tmp_path):
    a, b = png(tmp_path / "pics" / "a.png"), png(tmp_path / "pics" / "b.png", (0, 200, 0))
    inline = png_bytes()
    messages = read(write(tmp_path / "messages.jsonl", [
        {"images": ["pics/a.png", "pics/b.png"],  # TRL: bare image parts take the listed images in turn
         "messages": chat({"type": "image"}, {"type": "text", "text": " and "}, {"type": "image"},
                          {"type": "text", "text": " which is red?"})},
        {"messages": chat({"type": "image_url",  # OpenAI, inline as a data URI
                           "image_url": {"url": "data:image/png;base64," + base64.b64encode(inline).decode()}},
                          {"type": "text", "text": "What color?"}, answer="blue")},
        {"messages": [{"role": "user", "content": "No picture"}, {"role": "assistant", "content": "fine"}],
         "images": []}]))  # text rows train too
    assert messages.problems == []
    trl, openai, text = messages.rows
    assert trl.messages[0]["content"] == f"{PLACEHOLDER} and {PLACEHOLDER} which is red?"
    assert trl.images == [ImageRef("path", str(a)), ImageRef("path", str(b))]  # relative to the data file
    assert openai.messages[0]["content"] == f"{PLACEHOLDER}What color?" and openai.images == [ImageRef("bytes", inline)]
    assert text.images == []
    llava = read(write(tmp_path / "llava.jsonl", [
        {"conversations": [{"from": "human", "value": f"{PLACEHOLDER}What color?"}, {"from": "gpt", "value": "red"}],
         "images": [str(a)]}]))
    (row,) = llava.rows
    assert row.messages == [{"role": "user", "content": f"{PLACEHOLDER}What color?"},
                            {"role": "assistant", "content": "red"}] and row.images == [ImageRef("path", str(a))]
    save_conversations([trl, openai], tmp_path / "held_out.jsonl")  # held-out rows keep their images, bytes too
    assert [r.images for r in read_saved_conversations(tmp_path / "held_out.jsonl")] == [trl.images, openai.images]


def test_each_problem_refuses_its_row_with_file_and_row(tmp_path):
    png(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_text("not an image")
    data = write(tmp_path / "rows.jsonl", [
        {"messages": chat({"type": "image"}, {"type": "text", "text": "?"}), "images": ["ok.png"]},
        {"messages": chat({"type": "image"}, {"type": "text", "text": "?"}), "images": ["missing.png"]},
        {"messages": chat({"type": "image"}, {"type": "text", "text": "?"}), "images": ["broken.png"]},
        {"messages": chat({"type": "text", "text": f"{PLACEHOLDER}?"}), "images": ["ok.png", "ok.png"]},
        {"messages": chat({"type": "image"}, {"type": "image"}, {"type": "text", "text": "?"}),
         "images": ["ok.png"]},
        {"messages": chat({"type": "image", "image": "Zm9v" * 100}, {"type": "text", "text": "?"})},
        {"messages": chat({"type": "text", "text": f"{PLACEHOLDER}{PLACEHOLDER}?"}), "images": ["ok.png"]}])
    result = read(data)
    assert [r.row for r in result.rows] == [1]
    expected = {2: "missing.png: no such file", 3: "broken.png: not a readable image",
                4: "2 image(s) in `images` but 1 place(s)", 5: "an image content part with no image and none left",
                6: "inline bytes: not a readable image", 7: "more `<image>` placeholders than images"}
    assert len(result.problems) == len(expected)
    for (row, words), problem in zip(expected.items(), result.problems):
        assert problem.startswith(f"{data}:{row}: ") and words in problem, problem


def test_without_a_vision_language_model_image_rows_are_refused_as_before(tmp_path):
    png(tmp_path / "ok.png")
    parts = write(tmp_path / "parts.jsonl", [
        {"messages": chat({"type": "image"}, {"type": "text", "text": "?"}), "images": ["ok.png"]}])
    llava = write(tmp_path / "llava.jsonl", [
        {"conversations": [{"from": "human", "value": f"{PLACEHOLDER}?"}, {"from": "gpt", "value": "red"}]}])
    for data in (parts, llava):
        result = read(data, media=False)
        assert result.rows == [] and "multimodal rows are not supported" in result.problems[0], result.problems
