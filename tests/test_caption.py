"""caption.py with the tiny random Mllama on CPU: LoRA-only training, the label mask, the image reaching the
text through cross-attention, loss going down, adapter save/load/resume, submission.json, clean_caption on real
instruction-model outputs, every caption of an image trained on, and data errors. The 4-bit path is in
test_caption_4bit.py, faults and the command line in test_caption_faults.py."""
import io
import json
import os
import random
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import caption
from conftest import ROOT, real_data_path

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}


def jpeg(colour, size=48):
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, "JPEG")
    return buffer.getvalue()


def write_parquet(path, n, kind="train", binary_images=False):
    names = list(COLOURS)
    images = [jpeg(COLOURS[names[i % 4]]) for i in range(n)]
    image_column = images if binary_images else [{"bytes": b, "path": f"{i}.jpg"} for i, b in enumerate(images)]
    columns = {"image": image_column}
    if kind == "test":
        columns["idx"] = list(range(n))
    else:
        columns["caption"] = [f"A {names[i % 4]} square ." for i in range(n)]
        columns["references"] = [[f"A {names[i % 4]} square .", f"The {names[i % 4]} box ."] for i in range(n)]
    pq.write_table(pa.table(columns), path)
    return str(path)


@pytest.fixture
def data_dir(tmp_path):
    write_parquet(tmp_path / "train_data.parquet", 16)
    write_parquet(tmp_path / "valid_data.parquet", 4)
    write_parquet(tmp_path / "test_data.parquet", 6, kind="test")
    return str(tmp_path)


@pytest.fixture
def tiny(monkeypatch):
    settings = dict(tiny=True, backend="transformers", load_in_4bit=False, precision="fp32",
                    gradient_checkpointing=False, batch_size=2,
                    grad_accum=2, lr=5e-3, warmup_steps=1, max_steps=4, eval_every=2, save_every=2, val_samples=0,
                    max_new_tokens=4, predict_batch_size=4, log_every=1, max_minutes=0.0, lora_r=8, lora_alpha=16)
    for name, value in settings.items():
        monkeypatch.setattr(caption, name, value)


def image(colour):
    return Image.new("RGB", (224, 224), COLOURS[colour])


def load(**kwargs):
    """(model, processor, backend) of caption.load_model on the configured model (the tiny one under the fixtures)."""
    return caption.load_model(**kwargs)[:3]


def rows_of_test_file(data_dir):
    """caption.py's rows of data_dir/test_data.parquet, as main reads them for --predict."""
    return caption.load_split(os.path.join(data_dir, "test_data.parquet"), need_caption=False)


def saved_folder(out_dir, which="last"):
    """The step folder out_dir/checkpoint.json names as the last (or the best)."""
    return os.path.join(out_dir, json.loads(open(os.path.join(out_dir, "checkpoint.json")).read())[which])


def saved_state(out_dir):
    return torch.load(os.path.join(saved_folder(out_dir), "state.pt"), weights_only=True)


# ----------------------------------------------------------------------------- model
def test_only_lora_parameters_train_on_every_projection(tiny):
    model, _, backend = load()
    assert backend == "transformers"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    adapted = {n.split(".lora_")[0] for n in trainable}
    for part in ["language_model.layers.0.self_attn.q_proj", "language_model.layers.1.cross_attn.k_proj",
                 "language_model.layers.3.cross_attn.o_proj", "language_model.layers.2.mlp.down_proj",
                 "vision_model.transformer.layers.0.self_attn.v_proj", "vision_model.global_transformer.layers.0.mlp.fc1"]:
        assert any(n.endswith(part) for n in adapted), part
    assert not any("lm_head" in n or "embed_tokens" in n or "multi_modal_projector" in n for n in adapted)
    # 4 language layers x 7 projections + 3 vision layers x 6 projections
    assert len(adapted) == 4 * 7 + 3 * 6


def test_language_only_lora_leaves_the_vision_encoder_alone(tiny, monkeypatch):
    monkeypatch.setattr(caption, "finetune_vision", False)
    model, _, _ = load()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any("vision_model" in n for n in trainable)


PROMPT = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>" + caption.instruction +
          "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_the_tiny_prompt_is_the_llama_3_2_vision_chat_format(tiny):
    _, processor = caption.build_tiny_model()
    batch = caption.make_batch(processor, [image("red")])           # a generation batch: the prompt alone
    assert processor.tokenizer.decode(batch["input_ids"][0]) == PROMPT


def test_label_mask_covers_exactly_the_caption_tokens(tiny):
    _, processor = caption.build_tiny_model()
    captions = ["A dog runs .", "Two children play football on the beach at sunset ."]
    batch = caption.make_batch(processor, [image("red"), image("blue")], captions)
    tokenizer = processor.tokenizer
    prompt_length = len(tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
    for row, text in enumerate(captions):
        labels, ids = batch["labels"][row], batch["input_ids"][row]
        kept = (labels != caption.IGNORE_INDEX).nonzero().flatten()
        expected = tokenizer(text + caption.EOT, add_special_tokens=False)["input_ids"]
        assert labels[kept].tolist() == expected                       # the caption and its end of turn ...
        assert kept.tolist() == list(range(prompt_length, prompt_length + len(expected)))  # ... and nothing else
        assert (ids[kept] == labels[kept]).all()
    # the shorter caption's row is padded on the right, and the padding is masked
    assert (batch["attention_mask"][0] == 0).sum() > 0
    assert (batch["labels"][0][batch["attention_mask"][0] == 0] == caption.IGNORE_INDEX).all()
    # the image token sits inside the masked prompt
    image_token = tokenizer.convert_tokens_to_ids("<|image|>")
    assert (batch["input_ids"][:, :prompt_length] == image_token).sum(1).tolist() == [1, 1]


def test_the_image_reaches_the_text_through_cross_attention(tiny):
    model, processor = caption.build_tiny_model()
    red = caption.make_batch(processor, [image("red")], ["A square ."])
    blue = caption.make_batch(processor, [image("blue")], ["A square ."])
    with torch.no_grad():
        assert not torch.allclose(model(**red).logits[0, -3:], model(**blue).logits[0, -3:])


def test_a_few_steps_on_a_repeated_batch_lower_the_loss(tiny):
    model, processor, _ = load()
    batch = caption.make_batch(processor, [image("red"), image("green")], ["A red square .", "A green square ."])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_clean_caption_gives_one_sentence():
    assert caption.clean_caption(" A dog runs on grass. Another dog watches.\nMore") == "A dog runs on grass."
    assert caption.clean_caption("Caption: two  men   ride bikes") == "two men ride bikes ."
    assert caption.clean_caption('"A child jumps!" He laughs.') == 'A child jumps!'
    assert caption.clean_caption("") == ""


@pytest.mark.parametrize("output, expected", [
    # the cases named in issue 12: a preamble line ending in ':' before a quoted caption, a markdown label,
    # quotes, an abbreviation inside the sentence
    ('Here is a one-sentence caption for this image:\n\n"A brown dog runs through the tall grass."',
     "A brown dog runs through the tall grass."),
    ("**Caption:** A man in a red jacket climbs a rock wall.", "A man in a red jacket climbs a rock wall."),
    ('"Two children play on a swing set in a park."', "Two children play on a swing set in a park."),
    ("A man in St. Louis walks his dog .", "A man in St. Louis walks his dog ."),
    # more real shapes of chat answers
    ("Sure! Here's a caption for the image:\nA woman holds an umbrella in the rain.",
     "A woman holds an umbrella in the rain."),
    ("Here is a caption: A dog catches a frisbee on the beach.", "A dog catches a frisbee on the beach."),
    ("**Caption:**\nA surfer rides a large wave.", "A surfer rides a large wave."),
    ("Caption:\n\nA girl in a pink dress smiles.", "A girl in a pink dress smiles."),
    ("*A black dog* jumps over a **wooden** fence.", "A black dog jumps over a wooden fence."),
    ("“A cyclist speeds down a mountain road.”", "A cyclist speeds down a mountain road."),
    ("Mr. Smith walks his dog past the U.S. Capitol. The sky is blue.",
     "Mr. Smith walks his dog past the U.S. Capitol."),
    ("A statue of J. Edgar Hoover stands in a hall. It is old.", "A statue of J. Edgar Hoover stands in a hall."),
    ('A boy shouts "hello." to his friend. They laugh.', 'A boy shouts "hello." to his friend.'),
    ("Dr. Brown walks on Main St. in the snow", "Dr. Brown walks on Main St. in the snow ."),
    ("A dog runs on the beach!  Waves crash behind it.", "A dog runs on the beach!"),
    ("Is this a dog? Yes.", "Is this a dog?"),
    ("  a   dog\trunning  ", "a dog running ."),
    ("The image shows a man riding a horse. In the background there are trees.",
     "The image shows a man riding a horse."),
])
def test_clean_caption_survives_instruction_model_outputs(output, expected):
    assert caption.clean_caption(output) == expected


LIST_MARKERS = {"numbered with a full stop": ["1. ", "2. ", "3. "], "numbered with a parenthesis": ["1) ", "2) ", "3) "],
                "dashes": ["- ", "- ", "- "], "stars": ["* ", "* ", "* "], "bullets": ["• ", "• ", "• "],
                "lettered": ["a) ", "b) ", "c) "]}
ITEMS = ["A brown dog runs through the tall grass.", "Two dogs play in a field", "A dog is outside ."]
EXPECTED = ["A brown dog runs through the tall grass.", "Two dogs play in a field .", "A dog is outside ."]


@pytest.mark.parametrize("kind", LIST_MARKERS)
@pytest.mark.parametrize("items", [1, 3])
@pytest.mark.parametrize("preamble", ["", "Here are some captions for this image:\n", "Sure! Here is a caption:\n\n"])
def test_a_caption_written_as_a_list_item_is_kept(kind, items, preamble):
    """An instruction model may answer as a list: the markers go, the first item's sentence stays."""
    for first in range(len(ITEMS) - items + 1):
        output = preamble + "\n".join(marker + item for marker, item in zip(LIST_MARKERS[kind],
                                                                           ITEMS[first:first + items]))
        assert caption.clean_caption(output) == EXPECTED[first], output


@pytest.mark.parametrize("output, expected", [
    ("1.\nA dog runs on the beach.", "A dog runs on the beach."),            # the marker alone on its line
    ("**Caption:** 1. A man climbs a rock wall.", "A man climbs a rock wall."),
    ("1. **A man** climbs a rock wall. 2. A dog.", "A man climbs a rock wall."),
    ("Here is a caption: - A girl smiles", "A girl smiles ."),
    ("1. 2. A cat sleeps.", "A cat sleeps."),
    ("3 dogs run in the snow.", "3 dogs run in the snow."),                  # a number that is no marker stays
    ("a) 1.", "a) 1."),                                                      # nothing but markers: the line itself
])
def test_list_markers_and_the_fallback_to_a_line_with_a_word(output, expected):
    assert caption.clean_caption(output) == expected


def test_every_output_with_a_word_gives_a_caption_with_a_word():
    """Property: for any model output that holds a word (a letter), the cleaned caption holds one too. Checked on
    20,000 outputs drawn by a seeded generator from the pieces chat answers are made of."""
    pieces = ["1.", "2)", "a)", "b.", "-", "*", "•", "**", "__", "#", ">", "Caption:", "**Caption:**", "Answer -",
              "Here is a caption:", "Sure!", "Certainly.", "Of course:", ".", "!", "?", ":", '"', "'", "“", "”", "(",
              ")", "…", "St.", "Mr.", "U.S.", "J.", "A", "a", "dog", "Dog", "runs", "é", "ß", "Ж", "犬", "7", "42",
              "_", "x", " ", "  ", "\t", "\n", "\n\n"]
    rng = random.Random(31)
    checked = 0
    for _ in range(20000):
        output = "".join(rng.choice(pieces) + rng.choice(["", " ", "\n"]) for _ in range(rng.randint(1, 10)))
        if re.search(r"[^\W\d_]", output):
            checked += 1
            cleaned = caption.clean_caption(output)
            assert re.search(r"[^\W\d_]", cleaned), (output, cleaned)
    assert checked > 15000


# ----------------------------------------------------------------------------- training, resume, prediction
def logits_of(model, processor):
    batch = caption.make_batch(processor, [image("yellow")], ["A yellow square ."])
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_train_saves_an_adapter_that_reloads_to_the_same_logits(tiny, data_dir, tmp_path):
    out_dir = str(tmp_path / "out")
    caption.train_model(data_dir, out_dir)
    assert os.path.exists(os.path.join(saved_folder(out_dir, "best"), "adapter_config.json"))
    assert saved_state(out_dir)["step"] == 4 and saved_folder(out_dir).endswith("step_4")
    # only the folders the pointer names are kept
    assert sorted(os.listdir(out_dir)) == sorted({"checkpoint.json", "step_4", os.path.basename(saved_folder(out_dir,
                                                                                                             "best"))})
    trained, processor, _ = load(adapter_dir=saved_folder(out_dir), trainable=False)
    fresh, _, _ = load()
    assert not torch.allclose(logits_of(trained, processor), logits_of(fresh, processor))   # training changed it
    again, _, _ = load(adapter_dir=saved_folder(out_dir), trainable=False)
    torch.testing.assert_close(logits_of(trained, processor), logits_of(again, processor), rtol=0, atol=0)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_resume_continues_exactly(tiny, data_dir, tmp_path, monkeypatch, dropout):
    """Also with LoRA dropout: its masks come from (seed, step), not from where a run (re)started."""
    monkeypatch.setattr(caption, "lora_dropout", dropout)
    straight = str(tmp_path / "straight")
    caption.train_model(data_dir, straight)
    interrupted = str(tmp_path / "interrupted")
    caption.max_minutes = 1e-9                      # out of time after every step
    caption.train_model(data_dir, interrupted)
    assert saved_state(interrupted)["step"] == 1
    caption.max_minutes = 0.0
    caption.train_model(data_dir, interrupted)
    assert saved_state(interrupted)["step"] == 4
    a, _, _ = load(adapter_dir=saved_folder(straight), trainable=False)
    b, _, _ = load(adapter_dir=saved_folder(interrupted), trainable=False)
    state_a, state_b = lora_state(a), lora_state(b)
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        torch.testing.assert_close(state_a[name], state_b[name], rtol=0, atol=1e-7, msg=name)


def test_predict_writes_every_idx_once_in_order(tiny, data_dir, tmp_path):
    out_dir = str(tmp_path / "out")
    caption.train_model(data_dir, out_dir)
    test_path = os.path.join(data_dir, "test_data.parquet")
    table = pq.read_table(test_path)
    pq.write_table(table.take([5, 2, 0, 4, 1, 3]), test_path)      # the file's order is not idx order
    caption.write_submission(rows_of_test_file(data_dir), out_dir, str(tmp_path / "submission.json"))
    submission = json.loads((tmp_path / "submission.json").read_text())
    assert [s["idx"] for s in submission] == list(range(6))
    assert all(set(s) == {"idx", "output"} and isinstance(s["output"], str) for s in submission)


@pytest.mark.slow
def test_predict_on_the_shared_test_parquet(tiny, tmp_path, monkeypatch):
    caption_dir = real_data_path("caption")
    if caption_dir is None:
        pytest.skip("DL_DATA not set")
    monkeypatch.setattr(caption, "max_steps", 1)
    monkeypatch.setattr(caption, "val_samples", 4)
    monkeypatch.setattr(caption, "max_new_tokens", 4)
    monkeypatch.setattr(caption, "predict_batch_size", 25)
    out_dir = str(tmp_path / "out")
    caption.train_model(caption_dir, out_dir)
    caption.write_submission(rows_of_test_file(caption_dir), out_dir, str(tmp_path / "submission.json"))
    submission = json.loads((tmp_path / "submission.json").read_text())
    sample = json.loads(open(os.path.join(caption_dir, "sample_submission.json")).read())
    assert [s["idx"] for s in submission] == [s["idx"] for s in sample] == list(range(250))
    assert all(isinstance(s["output"], str) for s in submission)


def test_command_line_train_and_predict(data_dir, tmp_path):
    common = [f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}", "--tiny", "--backend=transformers",
              "--max_new_tokens=6", "--val_samples=2"]
    for command in (["--train", "--max_steps=2", "--batch_size=2", "--grad_accum=1"],
                    ["--predict", f"--submission={tmp_path / 's.json'}"]):
        result = subprocess.run([sys.executable, "caption.py", *command, *common], cwd=ROOT,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
    assert "validation BLEU" in result.stdout or (tmp_path / "s.json").exists()
    assert len(json.loads((tmp_path / "s.json").read_text())) == 6


# ----------------------------------------------------------------------------- data
def test_plain_binary_image_column_is_accepted(tmp_path):
    rows = caption.load_split(write_parquet(tmp_path / "t.parquet", 3, binary_images=True), need_caption=True)
    assert [r["image"].size for r in rows] == [(48, 48)] * 3 and rows[0]["caption"] == "A red square ."


def test_bad_data_is_one_clear_error(tmp_path):
    path = str(tmp_path / "bad.parquet")
    pq.write_table(pa.table({"image": [{"bytes": jpeg("red"), "path": "a.jpg"}]}), path)
    with pytest.raises(ValueError, match=r"bad.parquet: row 0: field 'caption' or 'references' is empty or not text"):
        caption.load_split(path, need_caption=True)
    with pytest.raises(ValueError, match=r"bad.parquet: row 0: field 'idx' must be an integer, got None"):
        caption.load_split(path, need_caption=False)
    pq.write_table(pa.table({"image": [{"bytes": jpeg("red"), "path": "a"}] * 2, "idx": [3, 3]}), path)
    with pytest.raises(ValueError, match=r"bad.parquet: row 1: idx 3 appears more than once"):
        caption.load_split(path, need_caption=False)
    pq.write_table(pa.table({"caption": ["A red square ."]}), path)
    with pytest.raises(ValueError, match=r"bad.parquet: row 0: field 'image' is missing or has no bytes"):
        caption.load_split(path, need_caption=True)
    pq.write_table(pa.table({"image": [{"bytes": jpeg("red"), "path": "a"}, {"bytes": b"not a jpeg", "path": "b"}],
                             "caption": ["A red square .", "x"]}), path)
    with pytest.raises(ValueError, match=r"bad.parquet: row 1: cannot decode image"):
        caption.load_split(path, need_caption=True)
    pq.write_table(pa.table({"image": [{"bytes": jpeg("red"), "path": "a"}] * 2, "caption": ["A red square .", "  "]}),
                   path)
    with pytest.raises(ValueError, match=r"bad.parquet: row 1: field 'caption' or 'references' is empty"):
        caption.load_split(path, need_caption=True)
    for references in ("A red square .", '["A red square .", "The red box ."]'):   # text, not a list (a CSV trip)
        pq.write_table(pa.table({"image": [{"bytes": jpeg("red"), "path": "a"}], "references": [references]}), path)
        with pytest.raises(ValueError, match=r"bad.parquet: row 0: field 'references' must be a list of captions, "
                                             r"got '"):
            caption.load_split(path, need_caption=True)
    pq.write_table(pa.table({"image": [{"bytes": jpeg("red"), "path": "a"}], "idx": ["7"]}), path)
    with pytest.raises(ValueError, match=r"bad.parquet: row 0: field 'idx' must be an integer, got '7'"):
        caption.load_split(path, need_caption=False)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"junk.parquet: cannot read parquet"):
        caption.load_split(str(tmp_path / "junk.parquet"), need_caption=True)


def test_bad_data_from_the_command_line_is_one_line(tmp_path):
    pq.write_table(pa.table({"image": [{"bytes": jpeg("red"), "path": "a"}]}), tmp_path / "train_data.parquet")
    result = subprocess.run([sys.executable, "caption.py", "--train", "--tiny", f"--data_dir={tmp_path}",
                             f"--out_dir={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: train_data.parquet: row 0: field 'caption'")


@pytest.mark.slow
def test_shared_parquets_load(tmp_path):
    caption_dir = real_data_path("caption")
    if caption_dir is None:
        pytest.skip("DL_DATA not set")
    train_rows = caption.load_split(os.path.join(caption_dir, "train_data.parquet"), need_caption=True)
    test_rows = caption.load_split(os.path.join(caption_dir, "test_data.parquet"), need_caption=False)
    assert len(train_rows) == 2000 and len(test_rows) == 250
    assert train_rows[0]["image"].size == (224, 224) and len(train_rows[0]["references"]) == 5
