"""`finetune data` on a vision-language model (a saved tiny Idefics3 with its processor): image rows read, each
problem refused with file:row, and the shown sample marks where the image tokens sit, untrained."""

import json

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from benchmarks.tiny_vlm import tiny_idefics3
from finetune.cli import app

#: Loading a model family's modules takes seconds that the edit loop's tier cannot spare.
pytestmark = pytest.mark.slow


def test_finetune_data_shows_image_tokens_untrained_and_refuses_bad_rows(tmp_path):
    model, processor = tiny_idefics3()
    model.save_pretrained(tmp_path / "vlm")
    processor.save_pretrained(tmp_path / "vlm")
    Image.new("RGB", (50, 40), (200, 30, 30)).save(tmp_path / "red.png")
    (tmp_path / "broken.png").write_text("not an image")
    rows = [{"conversations": [{"from": "human", "value": "<image>What color?"}, {"from": "gpt", "value": "red"}],
             "images": ["red.png"]},
            {"conversations": [{"from": "human", "value": "<image>And?"}, {"from": "gpt", "value": "none"}],
             "images": ["broken.png"]},
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "hello"}]}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name_or_path": str(tmp_path / "vlm")},
                                      "data": {"train": str(tmp_path / "rows.jsonl"), "max_length": 512,
                                               "max_bad_fraction": 0.5},
                                      "method": {"name": "lora"}}))
    result = CliRunner().invoke(app, ["data", str(recipe), "--show", "2", "--dump", str(tmp_path / "dump.jsonl")])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "rows: 3 read, 2 kept, 1 refused; 1 images" in out
    assert f"refused 1x (first {tmp_path / 'rows.jsonl'}:2): image {tmp_path / 'broken.png'}: not a readable" in out
    # Idefics3's generation prompt is "Assistant:", so the answer the model generates starts with the space
    assert "<row_1_col_1>⟨image: 4 tokens⟩" in out and "Assistant:⟦ red<end_of_utterance>⟧" in out
    assert "Assistant:⟦ hello<end_of_utterance>⟧" in out
    dumped = [json.loads(line) for line in (tmp_path / "dump.jsonl").read_text().splitlines()]
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert [d["row"] for d in dumped] == [1, 3]
    assert all(label == -100 for d in dumped for token, label in zip(d["input_ids"], d["labels"]) if token == image_id)
