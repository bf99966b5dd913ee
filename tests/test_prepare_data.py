"""data/prepare_news.py, prepare_celeba.py, prepare_flickr8k.py and score_news.py through their command lines, on
small fixtures made here in each original's exact layout: the outputs load with the scripts that use them
(textcls.load_news, fid.list_images, ddpm.load_images, caption.load_split, bleu.py), their format equals the
homework's (the real files in $DL_DATA when it is set, else the constants measured from them), the same seed
gives the same bytes, and bad input stops with one line."""
import csv
import importlib.util
import io
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, JpegImagePlugin

from conftest import ROOT, real_data_path

LABELS = ["POLITICS", "WELLNESS", "ENTERTAINMENT", "TRAVEL", "STYLE & BEAUTY", "PARENTING", "HEALTHY LIVING",
          "QUEER VOICES", "FOOD & DRINK", "BUSINESS", "COMEDY", "SPORTS", "BLACK VOICES", "HOME & LIVING", "PARENTS"]
# the homework's JPEG luminance quantization tables' first row: quality 95 (celeba/) and 90 (caption/ images)
Q95_FIRST_ROW = [2, 1, 1, 2, 2, 4, 5, 6]
Q90_FIRST_ROW = [3, 2, 2, 3, 5, 8, 10, 12]


def run(script, *args):
    return subprocess.run([sys.executable, os.path.join("data", script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def ok(result):
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def one_line_error(result, *words):
    """The run stopped with exactly one line, 'error: ...', holding every word, and no traceback."""
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def load_script(name):
    """data/NAME.py as a module, for its writers."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "data" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def folder_bytes(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def damage_member(archive, index=0, at=100):
    """Flip one byte inside the data of the archive's member `index` (a bad CRC, or a broken deflate stream)."""
    offset = zipfile.ZipFile(archive).infolist()[index].header_offset
    data = bytearray(archive.read_bytes())
    start = offset + 30 + int.from_bytes(data[offset + 26:offset + 28], "little") + int.from_bytes(
        data[offset + 28:offset + 30], "little")                       # after the local header, its name and extra
    data[start + at] ^= 0xFF
    archive.write_bytes(bytes(data))


def jpeg_format(data):
    with Image.open(io.BytesIO(data)) as image:
        return image.format, image.mode, image.size, JpegImagePlugin.get_sampling(image), image.quantization[0][:8]


# ============================================================================= news (part 2-1)
def v3_record(i, headline, category, description):
    """One line of News_Category_Dataset_v3.json, its fields in the original's order."""
    return {"link": f"https://www.huffpost.com/entry/story-{i}_n_{i:08x}", "headline": headline,
            "category": category, "short_description": description, "authors": "Jane Doe, HuffPost",
            "date": f"2022-09-{1 + i % 28:02d}"}


@pytest.fixture
def news_source(tmp_path):
    """A v3 JSON-lines file: 3 records of each of the 15 categories, 4 of other categories (dropped), and
    spelling variants of two of the 15. Returns (path, {headline: expected label}, [dropped headlines])."""
    rows, expected, dropped = [], {}, []
    for label, category in enumerate(LABELS):
        for k in range(3):
            headline = f"{category.title()} story {k}: café “quoted”"
            rows.append(v3_record(len(rows), headline, category, "" if k == 0 else f"About {category.lower()} {k}."))
            expected[headline] = label
    for category in ("THE WORLDPOST", "WORLDPOST", "STYLE", "ARTS & CULTURE"):
        rows.append(v3_record(len(rows), f"Dropped {category}", category, "gone"))
        dropped.append(f"Dropped {category}")
    for headline, category, label in (("Variant case", "Style & Beauty", 4), ("Variant and", "FOOD AND DRINK", 8)):
        rows.append(v3_record(len(rows), headline, category, "mapped"))
        expected[headline] = label
    rows.append(v3_record(len(rows), "  Padded headline  ", "SPORTS", " padded "))
    expected["Padded headline"] = 11
    path = tmp_path / "News_Category_Dataset_v3.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path, expected, dropped


def test_news_outputs_load_with_textcls_in_the_homeworks_format(tmp_path, news_source):
    import textcls
    source, expected, dropped = news_source
    out = tmp_path / "news"
    stdout = ok(run("prepare_news.py", f"--source={source}", f"--out_dir={out}", "--n_test=10"))
    assert "THE WORLDPOST 1" in stdout and "ARTS & CULTURE 1" in stdout
    train = textcls.load_news(str(out / "News_train.json"))
    test = textcls.load_news(str(out / "News_test.json"), require_label=False)
    assert len(test) == 10 and len(train) == len(expected) - 10
    assert [r["id"] for r in train] == list(range(len(train))) and [r["id"] for r in test] == list(range(10))
    assert all(list(r) == ["id", "headline", "short_description", "label"] for r in train)
    assert all(list(r) == ["id", "headline", "short_description"] for r in test)
    assert all(expected[r["headline"]] == r["label"] for r in train)          # labels by the homework's ids
    assert sorted(r["headline"] for r in train + test) == sorted(expected)   # every other category dropped
    assert not set(dropped) & {r["headline"] for r in train + test}
    assert any(r["short_description"] == "" for r in train + test)           # empty descriptions stay
    labels = list(csv.reader(open(out / "News_test_labels.csv", newline="")))
    assert labels[0] == ["id", "label"]
    assert {int(i): int(l) for i, l in labels[1:]} == {r["id"]: expected[r["headline"]] for r in test}
    sample = (out / "sample_submission.csv").read_bytes()
    assert sample == b"id,label\r\n" + b"".join(b"%d,0\r\n" % i for i in range(10))
    text = (out / "News_train.json").read_bytes()
    assert text.startswith(b'[\n {\n  "id": 0,\n  "headline": "') and "café “quoted”".encode() in text
    real = real_data_path("news")
    if real:  # the homework's own files: the same fields and types, and the writers give their exact bytes
        real_train = json.loads((real / "News_train.json").read_bytes())
        assert [(k, type(v)) for k, v in real_train[0].items()] == [(k, type(v)) for k, v in train[0].items()]
        real_test = (real / "News_test.json").read_bytes()
        assert [(k, type(v)) for k, v in json.loads(real_test)[0].items()] == [(k, type(v)) for k, v in test[0].items()]
        prepare_news = load_script("prepare_news")
        assert prepare_news.json_bytes(json.loads(real_test)) == real_test
        real_sample = (real / "sample_submission.csv").read_bytes()
        rows = list(csv.reader(io.StringIO(real_sample.decode())))[1:]
        assert prepare_news.csv_bytes([(int(i), int(l)) for i, l in rows]) == real_sample


def test_news_same_seed_same_bytes_and_zip_source(tmp_path, news_source):
    source = news_source[0]
    for name in ("a", "b"):
        ok(run("prepare_news.py", f"--source={source}", f"--out_dir={tmp_path / name}", "--n_test=5"))
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")
    archive = tmp_path / "archive.zip"  # Kaggle's download: the JSON-lines file inside a zip
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        z.write(source, "News_Category_Dataset_v3.json")
    ok(run("prepare_news.py", f"--source={archive}", f"--out_dir={tmp_path / 'z'}", "--n_test=5"))
    assert folder_bytes(tmp_path / "z") == folder_bytes(tmp_path / "a")
    ok(run("prepare_news.py", f"--source={source}", f"--out_dir={tmp_path / 'c'}", "--n_test=5", "--seed=2"))
    assert (tmp_path / "c" / "News_train.json").read_bytes() != (tmp_path / "a" / "News_train.json").read_bytes()
    ok(run("prepare_news.py", f"--source={source}", f"--out_dir={tmp_path / 'd'}", "--n_test=5", "--n_train=20"))
    assert len(json.loads((tmp_path / "d" / "News_train.json").read_bytes())) == 20


def test_news_reads_a_mac_repacked_zip_and_line_separators_inside_strings(tmp_path, news_source):
    """A zip re-packed on a Mac holds __MACOSX/._News_Category_Dataset_v3.json beside the file; JSON lines may hold
    U+2028 and U+0085 raw inside a string (News_train.json has 8 U+2028): neither is a line of the file."""
    source = news_source[0]
    lines = source.read_text(encoding="utf-8").splitlines()
    record = json.loads(lines[1])
    record["headline"] = "Line\u2028separator and\x85next line"
    lines[1] = json.dumps(record, ensure_ascii=False)
    raw = tmp_path / "raw.json"
    raw.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with zipfile.ZipFile(tmp_path / "mac.zip", "w") as z:
        z.writestr("News_Category_Dataset_v3.json", raw.read_bytes())
        z.writestr("__MACOSX/._News_Category_Dataset_v3.json", b"\x00\x05\x16\x07 Mac resource fork")
    ok(run("prepare_news.py", f"--source={tmp_path / 'mac.zip'}", f"--out_dir={tmp_path / 'news'}", "--n_test=12"))
    texts = json.loads((tmp_path / "news" / "News_train.json").read_text(encoding="utf-8")) + json.loads(
        (tmp_path / "news" / "News_test.json").read_text(encoding="utf-8"))
    assert "Line\u2028separator and\x85next line" in [r["headline"] for r in texts]


def test_news_scorer_gives_the_leaderboard_accuracy(tmp_path, news_source):
    import textcls
    out = tmp_path / "news"
    ok(run("prepare_news.py", f"--source={news_source[0]}", f"--out_dir={out}", "--n_test=12"))
    truth = [(int(i), int(l)) for i, l in list(csv.reader(open(out / "News_test_labels.csv", newline="")))[1:]]
    submission = tmp_path / "submission.csv"
    submission.write_text("id,label\n" + "".join(f"{i},{l}\n" for i, l in truth))   # LF, as textcls writes it
    stdout = ok(run("score_news.py", submission, f"--labels={out / 'News_test_labels.csv'}"))
    assert stdout.strip().splitlines()[-1] == "accuracy: 1.0000"
    guesses = [(i, (l + 1) % 15 if k < 3 else l) for k, (i, l) in enumerate(truth)]  # 3 of 12 wrong
    submission.write_text("id,label\n" + "".join(f"{i},{l}\n" for i, l in guesses))
    lines = ok(run("score_news.py", submission, f"--labels={out / 'News_test_labels.csv'}")).strip().splitlines()
    metrics = textcls.classification_metrics([l for _, l in guesses], [l for _, l in truth])
    assert lines[-1] == "accuracy: 0.7500" and lines[-2] == f"macro-F1: {metrics['macro_f1']:.4f}"
    submission.write_text("\ufeffid,label\r\n" + "".join(f"{i},{l}\r\n" for i, l in guesses), encoding="utf-8")
    bom = ok(run("score_news.py", submission, f"--labels={out / 'News_test_labels.csv'}"))   # Excel's CSV UTF-8
    assert bom.strip().splitlines()[-1] == "accuracy: 0.7500"
    submission.write_text("id,label\n" + "".join(f"{i},{l}\n" for i, l in truth[1:]))
    one_line_error(run("score_news.py", submission, f"--labels={out / 'News_test_labels.csv'}"), "missing [0]")


def test_news_errors_are_one_line(tmp_path, news_source):
    source = news_source[0]
    out = f"--out_dir={tmp_path / 'out'}"
    one_line_error(run("prepare_news.py", f"--source={tmp_path / 'nope.json'}", out), "no such file")
    one_line_error(run("prepare_news.py", f"--source={tmp_path}", out), "a folder")
    homework = tmp_path / "News_train.json"  # the homework's own file is not the original
    homework.write_text(json.dumps([{"id": 0, "headline": "h", "short_description": "", "label": 3}], indent=1))
    one_line_error(run("prepare_news.py", f"--source={homework}", out), "missing field 'category'", "homework")
    lines = source.read_text(encoding="utf-8").splitlines()
    broken = tmp_path / "broken.json"
    broken.write_text("\n".join(lines[:2] + ["{not json"] + lines[3:]), encoding="utf-8")
    one_line_error(run("prepare_news.py", f"--source={broken}", out), "broken.json: line 3")
    missing = tmp_path / "missing.json"
    record = json.loads(lines[4])
    del record["short_description"]
    missing.write_text("\n".join(lines[:4] + [json.dumps(record)]), encoding="utf-8")
    one_line_error(run("prepare_news.py", f"--source={missing}", out), "line 5", "'short_description'")
    other = tmp_path / "other.json"
    other.write_text(json.dumps(v3_record(0, "x", "CRIME", "y")) + "\n")
    one_line_error(run("prepare_news.py", f"--source={other}", out), "none of its categories")
    one_line_error(run("prepare_news.py", f"--source={source}", out, "--n_test=500"), "--n_test=500")
    one_line_error(run("prepare_news.py", f"--source={source}", out, "--n_test=0"), "--n_test must be")
    one_line_error(run("prepare_news.py", f"--source={source}", out, "stray"), "no positional arguments")
    for compression in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):   # a bad CRC; a broken deflate stream
        damaged = tmp_path / "damaged.zip"
        with zipfile.ZipFile(damaged, "w", compression) as z:
            z.writestr("News_Category_Dataset_v3.json", source.read_bytes())
        damage_member(damaged)
        one_line_error(run("prepare_news.py", f"--source={damaged}", out), "damaged.zip: a damaged zip", "again")
    (tmp_path / "cut.zip").write_bytes(source.read_bytes()[:1000])          # a download cut short
    one_line_error(run("prepare_news.py", f"--source={tmp_path / 'cut.zip'}", out), "not a complete zip")
    (tmp_path / "a_file").write_text("")
    for bad_out in (tmp_path / "a_file", ""):
        one_line_error(run("prepare_news.py", f"--source={source}", f"--out_dir={bad_out}"),
                       f"--out_dir={bad_out}: cannot make the folder")
    assert not (tmp_path / "out" / "News_train.json").exists()
    assert "n_test = 1000" in ok(run("prepare_news.py", "--help"))
    assert "crop_box = (19, 39, 159, 179)" in ok(run("prepare_celeba.py", "--help"))
    assert "n_train = 2000" in ok(run("prepare_flickr8k.py", "--help"))


# ============================================================================= CelebA (part 2-2)
CELEBA_IDS = [1, 7, 13, 22, 40, 41, 58, 77, 78, 80, 99, 104, 150, 151, 160, 173, 190, 202, 233, 240, 262, 270, 281,
              300, 305, 313, 317, 330, 345, 352]
BOX = (19, 39, 159, 179)


def celeba_face(i):
    """A 178x218 'aligned face': a smooth random picture inside the crop box, pure red around it."""
    rng = np.random.default_rng(i)
    array = np.zeros((218, 178, 3), np.uint8)
    array[..., 0] = 255
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    array[BOX[1]:BOX[3], BOX[0]:BOX[2]] = np.asarray(Image.fromarray(small).resize((140, 140), Image.BILINEAR))
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def celeba_sources(tmp_path_factory):
    """The same faces as the folder img_align_celeba/, the official zip, and Kaggle's nested zip and folder."""
    root = tmp_path_factory.mktemp("celeba")
    faces = {f"{i:06d}.jpg": celeba_face(i) for i in CELEBA_IDS}
    for folder in (root / "img_align_celeba", root / "kaggle" / "img_align_celeba" / "img_align_celeba"):
        folder.mkdir(parents=True)
        for name, data in faces.items():
            (folder / name).write_bytes(data)
    with zipfile.ZipFile(root / "img_align_celeba.zip", "w") as z:
        for name, data in faces.items():
            z.writestr(f"img_align_celeba/{name}", data)
    with zipfile.ZipFile(root / "archive.zip", "w") as z:
        z.writestr("list_attr_celeba.csv", "image_id,Smiling\n")
        for name, data in faces.items():
            z.writestr(f"img_align_celeba/img_align_celeba/{name}", data)
    return root, faces


def expected_face(data, box=BOX):
    """The crop and resize, done independently: array slicing of the box, then PIL's bicubic resize."""
    array = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[box[1]:box[3], box[0]:box[2]]
    return np.asarray(Image.fromarray(array).resize((64, 64), Image.BICUBIC)).astype(float)


def test_celeba_folder_and_zips_give_the_homeworks_faces(tmp_path, celeba_sources, capsys):
    import ddpm
    import fid
    root, faces = celeba_sources
    sources = [root / "img_align_celeba", root / "img_align_celeba.zip", root / "archive.zip", root / "kaggle"]
    outputs = []
    for k, src in enumerate(sources):
        stdout = ok(run("prepare_celeba.py", f"--source={src}", f"--out_dir={tmp_path / str(k) / 'celeba'}", "--n=12"))
        assert stdout.strip().splitlines()[-1] == (f"next: python fid.py {tmp_path / str(k) / 'celeba'} "
                                                   f"--save_stats={tmp_path / str(k) / 'celeba_stats.npz'}")
        outputs.append(folder_bytes(tmp_path / str(k) / "celeba"))
    assert all(o == outputs[0] for o in outputs)                       # folder or zip: the same bytes
    names = list(outputs[0])
    assert len(names) == 12 and set(names) <= set(faces)
    real = real_data_path("celeba")
    reference = jpeg_format(open(sorted(real.glob("*.jpg"))[0], "rb").read()) if real else \
        ("JPEG", "RGB", (64, 64), 2, Q95_FIRST_ROW)
    for name, data in outputs[0].items():
        assert jpeg_format(data) == reference
        face = np.asarray(Image.open(io.BytesIO(data))).astype(float)
        error = np.abs(face - expected_face(faces[name])).mean()        # JPEG's loss only: about 3.4 of 255
        shifted = min(np.abs(face - expected_face(faces[name], box)).mean()  # a box 2 pixels off: about 9
                      for box in ((21, 39, 161, 179), (17, 39, 157, 179), (19, 41, 159, 181), (19, 37, 159, 177)))
        assert error < 5 and error < shifted / 2
    folder = str(tmp_path / "0" / "celeba")
    assert fid.list_images(folder) == names and fid.read_image(folder, names[0]).shape == (3, 64, 64)
    capsys.readouterr()
    images = ddpm.load_images(str(tmp_path / "0" / "celeba"))
    assert images.shape == (12, 3, 64, 64) and images.dtype.is_floating_point is False
    assert "resized" not in capsys.readouterr().out


def test_celeba_same_seed_same_bytes(tmp_path, celeba_sources):
    src = celeba_sources[0] / "img_align_celeba.zip"
    out = tmp_path / "celeba"
    ok(run("prepare_celeba.py", f"--source={src}", f"--out_dir={out}", "--n=10"))
    first = folder_bytes(out)
    ok(run("prepare_celeba.py", f"--source={src}", f"--out_dir={out}", "--n=10"))   # rerun in place
    assert folder_bytes(out) == first
    ok(run("prepare_celeba.py", f"--source={src}", f"--out_dir={tmp_path / 'other'}", "--n=10", "--seed=1"))
    assert set(folder_bytes(tmp_path / "other")) != set(first)
    one_line_error(run("prepare_celeba.py", f"--source={src}", f"--out_dir={out}", "--n=10", "--seed=1"),
                   "images this run does not make")
    ok(run("prepare_celeba.py", f"--source={src}", f"--out_dir={tmp_path / 'all'}", "--n=0", "--size=32",
           "--crop_box=(0,0,178,218)"))
    assert len(os.listdir(tmp_path / "all")) == len(CELEBA_IDS)
    assert Image.open(tmp_path / "all" / "000001.jpg").size == (32, 32)


def test_celeba_errors_are_one_line(tmp_path, celeba_sources):
    root, faces = celeba_sources
    out = f"--out_dir={tmp_path / 'out'}"
    (tmp_path / "empty").mkdir()
    one_line_error(run("prepare_celeba.py", f"--source={tmp_path / 'empty'}", out), "no CelebA faces")
    one_line_error(run("prepare_celeba.py", f"--source={tmp_path / 'missing'}", out), "no such file")
    (tmp_path / "notes.txt").write_text("hello")
    one_line_error(run("prepare_celeba.py", f"--source={tmp_path / 'notes.txt'}", out), "neither a folder nor a complete zip")
    one_line_error(run("prepare_celeba.py", f"--source={root / 'img_align_celeba'}", out, "--n=31"), "only 30")
    one_line_error(run("prepare_celeba.py", f"--source={root / 'img_align_celeba'}", out, "--crop_box=(0,0,200,10)"),
                   "--crop_box must be")
    one_line_error(run("prepare_celeba.py", f"--source={root / 'img_align_celeba'}", out, "--crop_box=[0,0,178,218]"),
                   "--crop_box takes tuple (like (19, 39, 159, 179)), got '[0,0,178,218]'")
    damaged = tmp_path / "damaged.zip"
    damaged.write_bytes((root / "img_align_celeba.zip").read_bytes())
    damage_member(damaged, index=3)
    one_line_error(run("prepare_celeba.py", f"--source={damaged}", f"--out_dir={tmp_path / 'd'}", "--n=0"),
                   f"damaged.zip/{sorted(faces)[3]}: cannot read it (BadZipFile", "download it again")
    assert os.listdir(tmp_path / "d") == []
    (tmp_path / "cut.zip").write_bytes((root / "img_align_celeba.zip").read_bytes()[:5000])
    one_line_error(run("prepare_celeba.py", f"--source={tmp_path / 'cut.zip'}", out), "nor a complete zip (a download cut short")
    one_line_error(run("prepare_celeba.py", f"--source={root / 'img_align_celeba'}",
                       f"--out_dir={tmp_path / 'notes.txt'}", "--n=0"), "cannot make the folder (File exists)")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "000001.jpg").write_bytes(faces["000001.jpg"])
    (broken / "000002.jpg").write_bytes(faces["000001.jpg"][:300])     # a truncated download
    one_line_error(run("prepare_celeba.py", f"--source={broken}", f"--out_dir={tmp_path / 'b'}", "--n=0"),
                   "000002.jpg: cannot decode")
    assert os.listdir(tmp_path / "b") == []  # nothing written, not even the good face
    unaligned = tmp_path / "img_celeba"
    unaligned.mkdir()
    Image.new("RGB", (409, 687)).save(unaligned / "000001.jpg")
    one_line_error(run("prepare_celeba.py", f"--source={unaligned}", f"--out_dir={tmp_path / 'c'}", "--n=0"),
                   "000001.jpg: 409x687, not 178x218")


# ============================================================================= Flickr8k (part 2-3)
FLICKR_SIZES = [(100, 75), (75, 100), (100, 66), (90, 90)]


@pytest.fixture(scope="module")
def flickr(tmp_path_factory):
    """12 images with 5 captions each, split 6 / 3 / 3 in unsorted lists, laid out both as jbrownlee's release
    (Flickr8k.token.txt, Flicker8k_Dataset/, with the original's '.jpg.1' slip) and as Kaggle's (captions.txt
    CSV, Images/) with the split lists beside it. Returns (jbrownlee dir, kaggle dir, captions, images, splits)."""
    root = tmp_path_factory.mktemp("flickr")
    rng = np.random.default_rng(0)
    names = [f"{1000268201 + 7919 * i * (1 + i % 3)}_{i * 2654435761 % 16 ** 10:010x}.jpg" for i in range(12)]
    captions = {name: [f"A dog runs number {i} ." if k == 0 else f"Caption {k} of image {i} , with a comma ."
                       for k in range(5)] for i, name in enumerate(names)}
    captions[names[2]][3] = 'A sign that says " welcome " .'
    images = {}
    for i, name in enumerate(names):
        small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(small).resize(FLICKR_SIZES[i % 4], Image.BILINEAR).save(buffer, "JPEG", quality=92)
        images[name] = buffer.getvalue()
    splits = {"trainImages": names[:6][::-1], "devImages": names[6:9][::-1], "testImages": [names[11], names[9],
                                                                                          names[10]]}
    jb, kg = root / "jbrownlee", root / "kaggle"
    for base, folder in ((jb, "Flicker8k_Dataset"), (kg, "Images")):
        (base / folder).mkdir(parents=True)
        for name, data in images.items():
            (base / folder / name).write_bytes(data)
        for split, listed in splits.items():
            (base / f"Flickr_8k.{split}.txt").write_text("".join(n + "\n" for n in listed))
    lines = []
    for name, caps in captions.items():
        for k, caption in enumerate(caps):
            key = name + ".1" if name == names[1] and k == 0 else name  # the original's one slip
            lines.append(f"{key}#{k}\t{caption}\n")
    (jb / "Flickr8k.token.txt").write_text("".join(lines))
    (jb / "Flickr8k.lemma.token.txt").write_text("".join(lines).lower())
    with open(kg / "captions.txt", "w", newline="") as f:  # as Kaggle's: a CSV with minimal quoting, LF ends
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["image", "caption"])
        writer.writerows((name, caption) for name, caps in captions.items() for caption in caps)
    return jb, kg, captions, images, splits


FLAGS = ("--n_train=4", "--n_valid=2", "--n_test=0")
EXPECTED_SCHEMAS = {
    "train": "image: struct<bytes: binary, path: string>\n  child 0, bytes: binary\n  child 1, path: string\n"
             "caption: string\nreferences: list<element: string>\n  child 0, element: string",
    "test": "idx: int64\nimage: struct<bytes: binary, path: string>\n  child 0, bytes: binary\n  child 1, path: string",
}


def test_flickr8k_parquets_load_with_caption_in_the_homeworks_schema(tmp_path, flickr):
    import caption
    jb, kg, captions, images, splits = flickr
    out = tmp_path / "caption"
    ok(run("prepare_flickr8k.py", f"--source={jb}", f"--out_dir={out}", *FLAGS))
    real = real_data_path("caption")
    for split, listed, count in (("train", "trainImages", 4), ("valid", "devImages", 2), ("test", "testImages", 3)):
        path = out / f"{split}_data.parquet"
        schema = pq.read_schema(path).remove_metadata()
        if real:
            assert schema.equals(pq.read_schema(real / f"{split}_data.parquet").remove_metadata())
        assert schema.to_string() == EXPECTED_SCHEMAS["test" if split == "test" else "train"]
        rows = caption.load_split(str(path), need_caption=split != "test")
        stored = pq.read_table(path).to_pylist()
        paths = [r["image"]["path"] for r in stored]
        assert len(rows) == count and paths == sorted(paths) and set(paths) <= set(splits[listed])
        assert all(r["image"].size == (224, 224) and r["image"].mode == "RGB" for r in rows)
        reference = jpeg_format(pq.read_table(real / f"{split}_data.parquet").slice(0, 1).to_pylist()[0]["image"]
                                ["bytes"]) if real else ("JPEG", "RGB", (224, 224), 2, Q90_FIRST_ROW)
        assert all(jpeg_format(r["image"]["bytes"]) == reference for r in stored)
        for row, name in zip(rows, paths):
            original = Image.open(io.BytesIO(images[name])).convert("RGB").resize((224, 224), Image.BICUBIC)
            assert np.abs(np.asarray(row["image"], float) - np.asarray(original, float)).mean() < 4
            if split == "test":
                assert row["idx"] == paths.index(name) and "caption" not in row
            else:
                assert row["caption"] == captions[name][0] and row["references"] == captions[name]
    slipped = sorted(captions)[1]  # its caption #0 is filed under 'NAME.jpg.1' in the token file
    assert slipped in splits["trainImages"]
    submission = json.loads((out / "sample_submission.json").read_bytes())
    assert submission == [{"idx": i, "output": ""} for i in range(3)]
    if real:  # the writer gives the homework's file byte for byte
        real_sample = (real / "sample_submission.json").read_bytes()
        assert load_script("prepare_flickr8k").json_bytes(json.loads(real_sample)) == real_sample
    references = json.loads((out / "test_references.json").read_bytes())
    test_paths = [r["image"]["path"] for r in pq.read_table(out / "test_data.parquet").to_pylist()]
    assert references == [{"idx": i, "references": captions[name]} for i, name in enumerate(test_paths)]


def test_flickr8k_both_caption_forms_and_reruns_give_the_same_bytes(tmp_path, flickr):
    jb, kg, captions, images, splits = flickr
    for name, src in (("a", jb), ("b", kg), ("c", jb)):
        ok(run("prepare_flickr8k.py", f"--source={src}", f"--out_dir={tmp_path / name}", *FLAGS))
    first = folder_bytes(tmp_path / "a")
    assert len(first) == 5 and folder_bytes(tmp_path / "b") == first and folder_bytes(tmp_path / "c") == first
    ok(run("prepare_flickr8k.py", f"--source={jb}", f"--out_dir={tmp_path / 'd'}", *FLAGS, "--seed=1"))
    paths = lambda d: [r["path"] for r in pq.read_table(d / "train_data.parquet").column("image").to_pylist()]
    assert paths(tmp_path / "d") != paths(tmp_path / "a")
    ok(run("prepare_flickr8k.py", f"--source={jb}", f"--out_dir={tmp_path / 'e'}", "--n_train=0", "--n_valid=0",
           "--n_test=0"))
    assert paths(tmp_path / "e") == sorted(splits["trainImages"])


def test_flickr8k_references_score_with_bleu_py(tmp_path, flickr):
    import bleu
    out = tmp_path / "caption"
    ok(run("prepare_flickr8k.py", f"--source={flickr[0]}", f"--out_dir={out}", *FLAGS))
    references = json.loads((out / "test_references.json").read_bytes())
    submission = tmp_path / "submission.json"
    submission.write_text(json.dumps([{"idx": r["idx"], "output": r["references"][0]} for r in references]))
    result = subprocess.run([sys.executable, "bleu.py", str(submission), str(out / "test_references.json")],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip().splitlines()[-1].startswith("BLEU = 100.00 ")
    outputs = ["A dog runs .", "Caption of image , with a sign .", "A dog number 11 runs ."]
    submission.write_text(json.dumps([{"idx": r["idx"], "output": o} for r, o in zip(references, outputs)]))
    result = subprocess.run([sys.executable, "bleu.py", str(submission), str(out / "test_references.json")],
                            cwd=ROOT, capture_output=True, text=True)
    expected = bleu.corpus_bleu(outputs, [list(refs) for refs in zip(*(r["references"] for r in references))])
    assert result.stdout.strip().splitlines()[-1] == str(expected) and 0 < expected.score < 100
    sacrebleu = pytest.importorskip("sacrebleu")  # the grader's tool
    oracle = sacrebleu.corpus_bleu(outputs, [list(refs) for refs in zip(*(r["references"] for r in references))])
    assert abs(oracle.score - expected.score) < 1e-9


def test_flickr8k_errors_are_one_line(tmp_path, flickr):
    import shutil
    jb, kg, captions, images, splits = flickr
    out = f"--out_dir={tmp_path / 'out'}"

    def copy(name, base=jb):
        target = tmp_path / name
        shutil.copytree(base, target)
        return target
    one_line_error(run("prepare_flickr8k.py", f"--source={tmp_path / 'nope'}", out), "not a folder")
    bare = copy("bare")
    shutil.rmtree(bare / "Flicker8k_Dataset")
    one_line_error(run("prepare_flickr8k.py", f"--source={bare}", out, *FLAGS), "no image folder")
    (bare / "Flickr8k.token.txt").unlink()
    one_line_error(run("prepare_flickr8k.py", f"--source={bare}", out, *FLAGS), "no caption file")
    kaggle_only = copy("kaggle_only", kg)  # Kaggle's download alone has no split lists
    (kaggle_only / "Flickr_8k.devImages.txt").unlink()
    one_line_error(run("prepare_flickr8k.py", f"--source={kaggle_only}", out, *FLAGS),
                   "Flickr_8k.devImages.txt", "Flickr8k_text.zip")
    test_name = splits["testImages"][0]
    broken = copy("broken")
    (broken / "Flicker8k_Dataset" / test_name).write_bytes(images[test_name][:200])
    one_line_error(run("prepare_flickr8k.py", f"--source={broken}", out, *FLAGS), test_name, "cannot decode")
    (broken / "Flicker8k_Dataset" / test_name).unlink()
    one_line_error(run("prepare_flickr8k.py", f"--source={broken}", out, *FLAGS), test_name, "not in the image folder")
    token = copy("token")
    lines = (token / "Flickr8k.token.txt").read_text().splitlines(keepends=True)
    (token / "Flickr8k.token.txt").write_text("".join(lines[:6] + ["a line without a tab\n"] + lines[6:]))
    one_line_error(run("prepare_flickr8k.py", f"--source={token}", out, *FLAGS), "Flickr8k.token.txt: line 7")
    (token / "Flickr8k.token.txt").write_text("".join(line for line in lines if not line.startswith(test_name + "#4")))
    one_line_error(run("prepare_flickr8k.py", f"--source={token}", out, *FLAGS), test_name, "has 4 captions")
    header = copy("header", kg)
    text = (header / "captions.txt").read_text()
    (header / "captions.txt").write_text("name,text\n" + text.split("\n", 1)[1])
    one_line_error(run("prepare_flickr8k.py", f"--source={header}", out, *FLAGS), "header image,caption")
    one_line_error(run("prepare_flickr8k.py", f"--source={jb}", out, *FLAGS[:2], "--n_test=4"), "--n_test=4", "only 3")
    (tmp_path / "a_file").write_text("")
    one_line_error(run("prepare_flickr8k.py", f"--source={jb}", f"--out_dir={tmp_path / 'a_file' / 'sub'}", *FLAGS),
                   "cannot make the folder (Not a directory)")
    assert not list((tmp_path / "out").glob("*"))  # no file written by any of these runs
