"""
Part 2-2's faces from the public original: CelebA's aligned faces (img_align_celeba, 202,599 JPEGs of 178x218,
named 000001.jpg ...), as a folder or as the zip downloaded, to the homework's data/celeba: `n` faces chosen
with `seed`, each cropped to the box (19, 39, 159, 179) (the centre 140x140), resized to 64x64 (bicubic) and
saved as an RGB JPEG of quality 95 with 4:2:0 chroma under its CelebA name, as the homework's files are.

    python data/prepare_celeba.py --source=img_align_celeba.zip --out_dir=data/celeba
    python data/prepare_celeba.py --source=path/to/img_align_celeba --out_dir=data/celeba --n=20000

`--source` is the folder img_align_celeba (or a folder holding it, as Kaggle's download unpacks:
img_align_celeba/img_align_celeba/), or the zip (the official img_align_celeba.zip, or Kaggle's archive.zip).
The same seed gives the same files, byte for byte. The last line printed is the next command: the FID
reference statistics of the new set (fid.py --save_stats), which ddpm.py --fid_ref and fid.py reuse.
"""
import io
import os
import random
import re
import sys
import time
import zipfile
import zlib

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for bleu.py's parser
from bleu import parse_overrides

# -----------------------------------------------------------------------------
# configuration: every constant below can be overridden as --name=value
source = "img_align_celeba.zip"  # the folder img_align_celeba, a folder holding it, or the original zip
out_dir = "data/celeba"
n = 10000               # faces to write; 0 = all of them
seed = 0                # which faces
crop_box = (19, 39, 159, 179)  # (left, top, right, bottom) in the 178x218 original
size = 64               # output side, pixels
# -----------------------------------------------------------------------------

ORIGINAL_SIZE = (178, 218)       # width, height of every img_align_celeba face
JPEG_OPTIONS = dict(format="JPEG", quality=95, subsampling=2)  # subsampling 2 = 4:2:0, as the homework's files
CELEBA_NAME = re.compile(r"(?:^|/)(\d{6}\.jpg)$")
SUBFOLDERS = ("", "img_align_celeba", "img_align_celeba/img_align_celeba")  # official, and Kaggle's unpacked zip


# ----------------------------------------------------------------------------- finding the originals
def open_source(path):
    """{CelebA name: loader of its bytes} from a folder or a zip, and a short description of where."""
    if os.path.isdir(path):
        for sub in SUBFOLDERS:
            folder = os.path.join(path, sub)
            names = sorted(f for f in os.listdir(folder) if CELEBA_NAME.search(f)) if os.path.isdir(folder) else []
            if names:
                def load(name, folder=folder):
                    with open(os.path.join(folder, name), "rb") as f:
                        return f.read()
                return {name: (lambda name=name: load(name)) for name in names}, folder
        raise SystemExit(f"error: {path}: no CelebA faces (000001.jpg ...) in it, nor in img_align_celeba/ under it: "
                         f"give the folder img_align_celeba or its zip")
    if not zipfile.is_zipfile(path):
        cut = " (a download cut short? download it again)" if path.lower().endswith(".zip") else ""
        raise SystemExit(f"error: {path}: neither a folder nor a complete zip{cut}: give img_align_celeba/ or "
                         f"img_align_celeba.zip")
    archive = zipfile.ZipFile(path)
    members = {}
    for member in archive.namelist():
        match = CELEBA_NAME.search(member)
        if match:
            if match.group(1) in members:
                raise SystemExit(f"error: {path}: {match.group(1)} is there twice ({members[match.group(1)]} and "
                                 f"{member}): unpack it and give the one folder img_align_celeba")
            members[match.group(1)] = member
    if not members:
        raise SystemExit(f"error: {path}: no CelebA faces (img_align_celeba/000001.jpg ...) in the zip")
    return {name: (lambda m=member: archive.read(m)) for name, member in sorted(members.items())}, path


def choose(names, n, seed):
    """n of the names chosen with seed (0 = all), in name order."""
    if n > len(names):
        raise SystemExit(f"error: --n={n}, but the source has only {len(names)} faces")
    return sorted(random.Random(seed).sample(names, n)) if n else list(names)


# ----------------------------------------------------------------------------- one face
def make_face(load, name):
    """The original's bytes (from load()) -> the homework's JPEG bytes: crop, bicubic resize, quality 95, 4:2:0."""
    try:
        data = load()
    except (OSError, zipfile.BadZipFile, zlib.error, EOFError) as e:   # a bad CRC or deflate stream in the zip
        raise SystemExit(f"error: {name}: cannot read it ({type(e).__name__}: {e}): download it again") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.size != ORIGINAL_SIZE:
                raise SystemExit(f"error: {name}: {image.size[0]}x{image.size[1]}, not 178x218: expected the aligned "
                                 f"faces img_align_celeba (not img_celeba, the unaligned originals)")
            face = image.convert("RGB").crop(crop_box).resize((size, size), Image.BICUBIC)
    except SystemExit:
        raise
    except Exception as e:  # PIL raises several kinds for a broken file
        raise SystemExit(f"error: {name}: cannot decode the image ({type(e).__name__}: {e})") from None
    buffer = io.BytesIO()
    face.save(buffer, **JPEG_OPTIONS)
    return buffer.getvalue()


def write_atomic(path, data):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def main():
    if not os.path.exists(source):
        raise SystemExit(f"error: {source}: no such file or folder")
    loaders, where = open_source(source)
    chosen = choose(list(loaders), n, seed)
    try:   # checked before the faces, the long part
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:   # a file of that name, or an empty --out_dir
        raise SystemExit(f"error: --out_dir={out_dir}: cannot make the folder ({e.strerror})") from None
    if not os.access(out_dir, os.W_OK):
        raise SystemExit(f"error: {out_dir}: not writable")
    stale = sorted(set(f for f in os.listdir(out_dir) if f.lower().endswith((".jpg", ".jpeg", ".png")))
                   - set(chosen))
    if stale:  # fid.py and ddpm.py read every image of the folder: other faces would join the set
        raise SystemExit(f"error: {out_dir} holds {len(stale)} images this run does not make ({stale[0]} ...; from "
                         f"another --seed or --n?): give an empty folder")
    print(f"{len(loaders):,} faces in {where}; writing {len(chosen):,} of them (seed {seed}) to {out_dir}/")
    start, made = time.time(), {}
    for i, name in enumerate(chosen, 1):  # all in memory first (3 kB a face), so a bad original writes nothing
        made[name] = make_face(loaders[name], f"{where}/{name}")
        if i % 1000 == 0 or i == len(chosen):
            print(f"  {i:,}/{len(chosen):,} faces ({i / (time.time() - start + 1e-9):.0f}/s)")
    for name, data in made.items():
        write_atomic(os.path.join(out_dir, name), data)
    print(f"wrote {len(chosen):,} faces, {size}x{size} RGB JPEG (quality 95, 4:2:0), crop box {crop_box}")
    stats = os.path.join(os.path.dirname(os.path.normpath(out_dir)), "celeba_stats.npz")
    print(f"next: python fid.py {out_dir} --save_stats={stats}")


def valid_box(box):
    return (isinstance(box, tuple) and len(box) == 4 and all(isinstance(v, int) for v in box)
            and 0 <= box[0] < box[2] <= ORIGINAL_SIZE[0] and 0 <= box[1] < box[3] <= ORIGINAL_SIZE[1])


if __name__ == "__main__":
    if parse_overrides(sys.argv[1:], globals(), {
            "n": (lambda v: v >= 0, "an integer >= 0"), "size": (lambda v: v >= 1, "an integer >= 1"),
            "crop_box": (valid_box, "(left, top, right, bottom), integers inside the 178x218 original")}):
        raise SystemExit("error: no positional arguments: use --source=PATH --out_dir=DIR (--help lists the options)")
    main()
