"""
Part 2-3's files from the public original: Flickr8k (Hodosh, Young and Hockenmaier 2013; 8,091 images with 5
captions each and the standard train/dev/test lists) to the homework's data/caption: train_data.parquet and
valid_data.parquet (image, caption, references), test_data.parquet (idx, image), sample_submission.json, and
test_references.json, the hidden test captions, so that a submission can be scored locally with bleu.py.

    python data/prepare_flickr8k.py --source=path/to/Flickr8k --out_dir=data/caption
    python bleu.py submission.json data/caption/test_references.json

`--source` is the folder holding the text files and the image folder, in either form it is published in:
  jbrownlee's release (Flickr8k_Dataset.zip, Flickr8k_text.zip unpacked): Flickr8k.token.txt
      ("1000268201_693b08cb0e.jpg#0<TAB>A child in a pink dress ..."), Flickr_8k.trainImages.txt,
      Flickr_8k.devImages.txt, Flickr_8k.testImages.txt, and the images in Flicker8k_Dataset/ (sic);
  Kaggle's adityajn105/flickr8k: captions.txt (CSV, header `image,caption`) and Images/; it has no split lists,
      so put the three Flickr_8k.*Images.txt files from Flickr8k_text.zip beside it.
Each split takes `n_*` images of its list (0 = all), chosen with `seed`, in file-name order, as the homework's
are. Images become 224x224 RGB JPEGs (bicubic resize of the whole image; quality 90, 4:2:0, as the homework's
files are encoded) in the struct {bytes, path}; `caption` is an image's first caption, `references` all five.
The same seed gives the same files, byte for byte.
"""
import csv
import io
import json
import os
import random
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for bleu.py's parser
from bleu import parse_overrides

# -----------------------------------------------------------------------------
# configuration: every constant below can be overridden as --name=value
source = "Flickr8k"     # folder with Flickr8k.token.txt or captions.txt, the split lists and the image folder
out_dir = "data/caption"
n_train = 2000          # images from Flickr_8k.trainImages.txt (6,000); 0 = all
n_valid = 250           # from Flickr_8k.devImages.txt (1,000); 0 = all
n_test = 250            # from Flickr_8k.testImages.txt (1,000); 0 = all
seed = 0                # which images
image_size = 224        # output side, pixels
# -----------------------------------------------------------------------------

CAPTION_FILES = ("Flickr8k.token.txt", "captions.txt")
SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "valid": "Flickr_8k.devImages.txt",
               "test": "Flickr_8k.testImages.txt"}
TEXT_FOLDERS = ("", "Flickr8k_text")                          # where the text files may sit under source
IMAGE_FOLDERS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images", "Flickr8k_Dataset/Flicker8k_Dataset")
CAPTIONS_PER_IMAGE = 5
JPEG_OPTIONS = dict(format="JPEG", quality=90, subsampling=2)  # subsampling 2 = 4:2:0, as the homework's files
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SCHEMAS = {  # the homework's parquet schemas, column for column
    "train": pa.schema([("image", IMAGE_TYPE), ("caption", pa.string()), ("references", pa.list_(pa.string()))]),
    "test": pa.schema([("idx", pa.int64()), ("image", IMAGE_TYPE)]),
}


# ----------------------------------------------------------------------------- finding the original's files
def find_file(names, folders, what):
    for folder in folders:
        for name in names:
            path = os.path.join(source, folder, name)
            if os.path.isfile(path):
                return path
    places = ", ".join(os.path.normpath(os.path.join(source, folder)) for folder in folders)
    raise SystemExit(f"error: no {what} ({' or '.join(names)}) in {places}")


def find_image_folder():
    for folder in IMAGE_FOLDERS:
        path = os.path.join(source, folder)
        if os.path.isdir(path):
            return path
    raise SystemExit(f"error: {source}: no image folder ({', '.join(IMAGE_FOLDERS[:3])}): unpack Flickr8k_Dataset.zip "
                     f"or Kaggle's download there")


def read_text(path):
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise SystemExit(f"error: {path}: not UTF-8 text (byte {e.start})") from None


# ----------------------------------------------------------------------------- captions and splits
def read_token_file(path):
    """{image: [captions in #0..#4 order]} from Flickr8k.token.txt ("name.jpg#k<TAB>caption" lines)."""
    numbered = {}
    for number, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        image, hash_sign, k = key.partition("#")
        if not tab or not hash_sign or not k.isdigit():
            raise SystemExit(f"error: {path}: line {number}: expected 'NAME.jpg#K<TAB>caption', got {line[:60]!r}")
        # the original file has one slip: "2258277193_586949ec62.jpg.1#0" is that image's caption #0
        if image.endswith(".jpg.1"):
            image = image[:-2]
        numbered.setdefault(image, []).append((int(k), caption.strip()))
    return {image: [c for _, c in sorted(pairs)] for image, pairs in numbered.items()}


def read_captions_csv(path):
    """{image: [captions in file order]} from Kaggle's captions.txt (CSV `image,caption`, commas in a caption
    quoted or not)."""
    rows = list(csv.reader(io.StringIO(read_text(path))))
    if not rows or [c.strip() for c in rows[0][:2]] != ["image", "caption"]:
        raise SystemExit(f"error: {path}: the first line must be the header image,caption")
    captions = {}
    for number, row in enumerate(rows[1:], 2):
        if not row:
            continue
        if len(row) < 2 or not row[0].lower().endswith(".jpg"):
            raise SystemExit(f"error: {path}: line {number}: expected 'NAME.jpg,caption', got {','.join(row)[:60]!r}")
        captions.setdefault(row[0].strip(), []).append(",".join(row[1:]).strip())
    return captions


def read_split(path):
    names = [line.strip() for line in read_text(path).splitlines() if line.strip()]
    bad = [name for name in names if not name.lower().endswith(".jpg")]
    if not names or bad:
        raise SystemExit(f"error: {path}: expected one image name (NAME.jpg) a line"
                         f"{', got ' + repr(bad[0]) if bad else ', the file is empty'}")
    return names


def choose(names, count, split):
    """count of the names chosen with seed (0 = all), in name order; each split draws from its own stream."""
    if count > len(names):
        raise SystemExit(f"error: --n_{split}={count}, but its list has only {len(names)} images")
    names = sorted(set(names))
    return sorted(random.Random(f"{seed}/{split}").sample(names, count)) if count else names


# ----------------------------------------------------------------------------- images and files
def make_image(path):
    """An original image file -> the homework's JPEG bytes at image_size x image_size."""
    try:
        with Image.open(path) as image:
            resized = image.convert("RGB").resize((image_size, image_size), Image.BICUBIC)
    except FileNotFoundError:
        raise SystemExit(f"error: {path}: the image is listed but not in the image folder") from None
    except Exception as e:  # PIL raises several kinds for a broken file
        raise SystemExit(f"error: {path}: cannot decode the image ({type(e).__name__}: {e})") from None
    buffer = io.BytesIO()
    resized.save(buffer, **JPEG_OPTIONS)
    return buffer.getvalue()


def write_atomic(path, write):
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def json_bytes(rows):
    """A JSON array with indent 1, non-ASCII characters as they are, no final newline: the homework's layout."""
    return json.dumps(rows, indent=1, ensure_ascii=False).encode("utf-8")


def write_json(path, rows):
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(json_bytes(rows))
    write_atomic(path, write)


def main():
    if not os.path.isdir(source):
        raise SystemExit(f"error: {source}: not a folder: give the folder holding Flickr8k's text files and images")
    caption_path = find_file(CAPTION_FILES, TEXT_FOLDERS, "caption file")
    captions = (read_token_file if caption_path.endswith(".token.txt") else read_captions_csv)(caption_path)
    image_folder = find_image_folder()
    text_folders = tuple(dict.fromkeys((os.path.relpath(os.path.dirname(caption_path), source),) + TEXT_FOLDERS))
    counts = {"train": n_train, "valid": n_valid, "test": n_test}
    splits = {}
    for split, filename in SPLIT_FILES.items():
        path = find_file([filename], text_folders, "split list (it comes in Flickr8k_text.zip)")
        splits[split] = choose(read_split(path), counts[split], split)
        for name in splits[split]:
            if len(captions.get(name, [])) != CAPTIONS_PER_IMAGE:
                raise SystemExit(f"error: {caption_path}: {name} (in {filename}) has {len(captions.get(name, []))} "
                                 f"captions, expected {CAPTIONS_PER_IMAGE}")
    try:   # checked before the images, the long part
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:   # a file of that name, or an empty --out_dir
        raise SystemExit(f"error: --out_dir={out_dir}: cannot make the folder ({e.strerror})") from None
    if not os.access(out_dir, os.W_OK):
        raise SystemExit(f"error: {out_dir}: not writable")
    total = sum(len(names) for names in splits.values())
    print(f"{len(captions):,} captioned images in {caption_path}; images from {image_folder}/; writing "
          f"{', '.join(f'{split} {len(names):,}' for split, names in splits.items())} to {out_dir}/")
    start, done, tables = time.time(), 0, {}
    for split, names in splits.items():
        images = []
        for name in names:
            images.append({"bytes": make_image(os.path.join(image_folder, name)), "path": name})
            done += 1
            if done % 250 == 0 or done == total:
                print(f"  {done:,}/{total:,} images ({done / (time.time() - start + 1e-9):.0f}/s)")
        if split == "test":
            tables[split] = pa.table({"idx": list(range(len(names))), "image": images}, schema=SCHEMAS["test"])
        else:
            tables[split] = pa.table({"image": images, "caption": [captions[name][0] for name in names],
                                      "references": [captions[name] for name in names]}, schema=SCHEMAS["train"])
    for split, table in tables.items():  # only now, so that a bad image leaves the old files as they were
        write_atomic(os.path.join(out_dir, f"{split}_data.parquet"), lambda tmp: pq.write_table(table, tmp))
    write_json(os.path.join(out_dir, "sample_submission.json"),
               [{"idx": i, "output": ""} for i in range(len(splits["test"]))])
    write_json(os.path.join(out_dir, "test_references.json"),
               [{"idx": i, "references": captions[name]} for i, name in enumerate(splits["test"])])
    print(f"wrote train_data.parquet, valid_data.parquet, test_data.parquet, sample_submission.json and "
          f"test_references.json to {out_dir}/")
    print(f"next: python caption.py --train --data_dir={out_dir}; then score a submission with "
          f"python bleu.py submission.json {out_dir}/test_references.json")


if __name__ == "__main__":
    if parse_overrides(sys.argv[1:], globals(), {
            "n_train": (lambda v: v >= 0, "an integer >= 0"), "n_valid": (lambda v: v >= 0, "an integer >= 0"),
            "n_test": (lambda v: v >= 0, "an integer >= 0"), "image_size": (lambda v: v >= 1, "an integer >= 1")}):
        raise SystemExit("error: no positional arguments: use --source=DIR --out_dir=DIR (--help lists the options)")
    main()
