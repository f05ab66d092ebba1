"""Shard writer and loaders: folder/CSV/Fashion-MNIST/torchvision -> shards -> loaders, key order, labels join,
rank x worker splitting (also under a real torchrun), reproducibility of the resampled stream."""
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mlcd.data import fashion_mnist
from mlcd.data.labels import write_shard_labels
from mlcd.data.tars import expand_urls, iter_samples
from mlcd.data.loader import make_extract_loader, make_train_loader
from mlcd.data.make_shards import (main as make_shards_main, shards_from_fashion_mnist, shards_from_folder,
                                   shards_from_table, shards_from_torchvision)
from mlcd.data.transforms import CLIP_MEAN, CLIP_STD, EvalTransform

REPO = Path(__file__).resolve().parents[1]


def _image_bytes(i: int, fmt: str, size=(20, 16), mode="RGB") -> bytes:
    rng = np.random.default_rng(i)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, format=fmt)
    return buf.getvalue()


def make_folder(root: Path, n_per_class=6) -> dict:
    """Two classes in sub-dirs, JPEG/PNG/BMP/grayscale, some with caption sidecars; returns rel path -> bytes."""
    files = {}
    for c, cname in enumerate(["cats", "dogs"]):
        for i in range(n_per_class):
            fmt, ext = [("JPEG", "jpg"), ("PNG", "png"), ("BMP", "bmp")][i % 3]
            rel = f"{cname}/img {i}.{ext}"
            data = _image_bytes(100 * c + i, fmt, mode="L" if i == 4 else "RGB")
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
            files[rel] = data
            if i % 2 == 0:
                (root / rel).with_suffix(".txt").write_text(f"a photo of {cname} {i}\n")
    return files


def read_tar(path):
    with tarfile.open(path) as t:
        return {m.name: t.extractfile(m).read() for m in t}


def test_folder_to_shards_copies_bytes_and_keeps_captions_and_classes(tmp_path):
    files = make_folder(tmp_path / "imgs")
    m = shards_from_folder(tmp_path / "imgs", tmp_path / "out", prefix="toy", max_per_shard=5, class_from_dir=True)
    assert m["total"] == 12 and [s["count"] for s in m["shards"]] == [5, 5, 2]
    assert m["class_names"] == ["cats", "dogs"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == m
    assert not list((tmp_path / "out").glob("*.tmp"))
    members = {}
    for s in m["shards"]:
        tar = read_tar(tmp_path / "out" / s["name"])
        names = list(tar)
        assert names[0].startswith(s["first_key"] + ".") and names[-1].startswith(s["last_key"] + ".")
        members.update(tar)
    for rel, data in files.items():
        key = rel.rsplit(".", 1)[0].replace("/", "__").replace(" ", "_")
        if rel.endswith(".bmp"):  # not JPEG/PNG/WEBP: re-encoded losslessly as PNG
            assert f"{key}.bmp" not in members
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(members[f"{key}.png"]))),
                                          np.asarray(Image.open(io.BytesIO(data))))
        else:  # byte for byte
            assert members[f"{key}.{rel.rsplit('.', 1)[1]}"] == data
        assert members[f"{key}.cls"] == (b"0" if rel.startswith("cats") else b"1")
        cap = members.get(f"{key}.txt")
        i = int(rel.split(" ")[1].split(".")[0])
        assert (cap == f"a photo of {rel.split('/')[0]} {i}".encode()) if i % 2 == 0 else cap is None
    # the same input gives byte-identical shards (fixed tar metadata)
    m2 = shards_from_folder(tmp_path / "imgs", tmp_path / "out2", prefix="toy", max_per_shard=5, class_from_dir=True)
    for s in m2["shards"]:
        assert (tmp_path / "out" / s["name"]).read_bytes() == (tmp_path / "out2" / s["name"]).read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        shards_from_folder(tmp_path / "imgs", tmp_path / "out", prefix="toy")


def test_folder_keys_unique_when_sanitised_names_collide(tmp_path):
    d = tmp_path / "imgs"
    (d / "a").mkdir(parents=True)
    for rel in ["a/b.jpg", "a_b.jpg", "a__b.png", "a/b.png"]:
        (d / rel).write_bytes(_image_bytes(len(rel), "JPEG" if rel.endswith("jpg") else "PNG"))
    m = shards_from_folder(d, tmp_path / "out", prefix="c")
    keys = [n.split(".")[0] for n in read_tar(tmp_path / "out" / "c-000000.tar")]
    assert len(set(keys)) == 4 and all("." not in k and "/" not in k for k in keys)
    assert m["total"] == 4


@pytest.mark.slow
def test_table_sources_and_cli(tmp_path):
    files = make_folder(tmp_path / "imgs", n_per_class=3)
    rels = sorted(files)
    (tmp_path / "list.tsv").write_text("".join(f"imgs/{r}\tcaption {i}\n" for i, r in enumerate(rels)))
    m = shards_from_table(tmp_path / "list.tsv", tmp_path / "out")
    assert m["total"] == len(rels) and m["prefix"] == "list"
    tar = read_tar(tmp_path / "out" / "list-000000.tar")
    assert tar["list-000000002.txt"] == b"caption 2"
    assert tar.get(f"list-000000000.{rels[0].rsplit('.', 1)[1]}") == files[rels[0]]
    # CSV with a header row (any column order) through the CLI
    (tmp_path / "t.csv").write_text("caption,path\n" + "".join(f"c{i},imgs/{r}\n" for i, r in enumerate(rels)))
    make_shards_main(["--source", "csv", "--input", str(tmp_path / "t.csv"), "--out", str(tmp_path / "o2"),
                      "--prefix", "p", "--max-per-shard", "4"])
    m2 = json.loads((tmp_path / "o2" / "manifest.json").read_text())
    assert [s["count"] for s in m2["shards"]] == [4, 2] and m2["total"] == 6
    assert read_tar(tmp_path / "o2" / "p-000001.tar")["t-000000005.txt"] == b"c5"
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        try:
            import pandas  # noqa: F401
        except ImportError:
            with pytest.raises(ImportError, match="pyarrow"):
                shards_from_table(tmp_path / "t.parquet", tmp_path / "o3")
    out = subprocess.run([sys.executable, "-m", "mlcd.data.make_shards", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--max-per-shard" in out.stdout and "fashion_mnist" in out.stdout


@pytest.mark.slow
def test_fashion_mnist_to_shards(tmp_path):
    """Fashion-MNIST test split (10k) -> shards; .cls kept. ('all' = 70k: 10.8 s CPU, 29-32 s wall on the shared
    2-core machine, over the ~20 s budget, so the test converts the test split; `make demo` converts train.)"""
    images, labels = fashion_mnist.load("test")
    t0 = time.time()
    m = shards_from_fashion_mnist(tmp_path / "fm", split="test", max_per_shard=4000)
    took = time.time() - t0
    assert m["total"] == 10000 and [s["count"] for s in m["shards"]] == [4000, 4000, 2000]
    assert m["class_names"] == list(fashion_mnist.CLASSES)
    assert m["shards"][1]["first_key"] == "fmnist-test-0004000" and m["shards"][2]["last_key"] == "fmnist-test-0009999"
    for i in (0, 4321, 9999):  # lossless PNG, class member matches
        shard = read_tar(tmp_path / "fm" / m["shards"][i // 4000]["name"])
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(shard[f"fmnist-test-{i:07d}.png"]))),
                                      images[i])
        assert int(shard[f"fmnist-test-{i:07d}.cls"]) == labels[i]
    print(f"fashion-mnist test split (10k) -> shards in {took:.1f} s")


def test_torchvision_source(tmp_path):
    root = tmp_path / "tv" / "FashionMNIST" / "raw"  # torchvision's layout, from the Debian package's files
    root.mkdir(parents=True)
    import gzip
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte",
                 "train-labels-idx1-ubyte"):
        src = fashion_mnist.DEBIAN_ROOT / f"{name}.gz"
        if name.startswith("train"):  # only existence is checked for the split we do not read
            (root / name).write_bytes(b"")
        else:
            (root / name).write_bytes(gzip.decompress(src.read_bytes()))
    m = shards_from_torchvision("FashionMNIST", tmp_path / "tv", tmp_path / "out", split="test", limit=300,
                                max_per_shard=200)
    images, labels = fashion_mnist.load("test")
    assert m["total"] == 300 and m["class_names"][0] == "T-shirt/top"
    shard = read_tar(tmp_path / "out" / "fashionmnist-test-000001.tar")
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(shard["fashionmnist-test-0000250.png"]))),
                                  images[250])
    assert int(shard["fashionmnist-test-0000250.cls"]) == labels[250]


# ------------------------------------------------------------------ extraction loader

@pytest.fixture(scope="module")
def fm_shards(tmp_path_factory):
    """600 Fashion-MNIST test images in 5 shards of 120 (real data, fast)."""
    out = tmp_path_factory.mktemp("fm")
    m = shards_from_fashion_mnist(out, split="test", limit=600, max_per_shard=120)
    return out, m


def _manifest_keys(out, m):
    keys = []
    for s in m["shards"]:
        keys += [x["__key__"] for x in iter_samples(str(out / s["name"]), None)]
    return keys


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a 2-core machine, on purpose
@pytest.mark.parametrize("num_workers", [0, 3])
def test_extract_loader_order_is_shard_then_tar_order(fm_shards, num_workers):
    out, m = fm_shards
    urls = str(out / "fmnist-test-{000000..000004}.tar")
    loader = make_extract_loader(urls, EvalTransform(32), batch_size=50, num_workers=num_workers)
    keys, batches = [], []
    for images, k in loader:
        assert images.shape == (len(k), 3, 32, 32) and images.dtype == torch.float32
        keys += k
        batches.append(images)
    assert keys == [f"fmnist-test-{i:07d}" for i in range(600)] == _manifest_keys(out, m)
    assert [len(b) for b in batches] == [50, 50, 20] * 5  # batches do not span shards
    # pixels: grayscale replicated to RGB, bicubic 28 -> 32 resize, CLIP mean/std (independent reference)
    images, _ = fashion_mnist.load("test")
    ref = np.asarray(Image.fromarray(images[103]).resize((32, 32), Image.BICUBIC), np.float32) / 255
    for c in range(3):
        np.testing.assert_allclose(batches[2][3][c].numpy(), (ref - CLIP_MEAN[c]) / CLIP_STD[c], atol=1e-5)
    assert loader.skip_counts() == {k: 0 for k in loader.skip_counts()}


def test_expand_urls(tmp_path, fm_shards):
    out, _ = fm_shards
    a = expand_urls(f"{out}/fmnist-test-{{000000..000001}}.tar::{out}/fmnist-test-00000[34].tar")
    assert [Path(u).name for u in a] == ["fmnist-test-000000.tar", "fmnist-test-000001.tar",
                                         "fmnist-test-000003.tar", "fmnist-test-000004.tar"]
    assert expand_urls(["pipe:cat x.tar"]) == ["pipe:cat x.tar"]
    with pytest.raises(FileNotFoundError, match="do not exist"):
        expand_urls(f"{out}/fmnist-test-{{000000..000009}}.tar")
    # pipe: URLs are read through webdataset's gopen
    loader = make_extract_loader(f"pipe:cat {out}/fmnist-test-000002.tar", EvalTransform(28), 64, 0)
    assert sum(len(k) for _, k in loader) == 120


# ------------------------------------------------------------------ training loader

N_IMG = 40  # image i is uniform gray 10 + 5 i: its pixels say which sample it is, whatever the crop


def _value_to_index(images: torch.Tensor) -> list[int]:
    v = (images[:, 0, 0, 0] * CLIP_STD[0] + CLIP_MEAN[0]) * 255
    return [int(round((x - 10) / 5)) for x in v.tolist()]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """40 images -> 8 shards of 5 (folder source), labels [i, 1000 + i % 7] joined by key."""
    root = tmp_path_factory.mktemp("lab")
    for i in range(N_IMG):
        (root / "imgs").mkdir(exist_ok=True)
        Image.new("L" if i % 3 else "RGB", (12, 10), (10 + 5 * i) if i % 3 else (10 + 5 * i,) * 3).save(
            root / "imgs" / f"im{i:03d}.png")
    m = shards_from_folder(root / "imgs", root / "shards", prefix="lab", max_per_shard=5)
    for s in m["shards"]:
        keys = [x["__key__"] for x in iter_samples(str(root / "shards" / s["name"]), None)]
        idx = np.array([int(k[2:]) for k in keys])
        write_shard_labels(root / "labels", s["name"][:-4], keys[::-1],  # file row order != tar order
                           np.stack([idx, 1000 + idx % 7], 1)[::-1].astype(np.int32),
                           np.ones((len(keys), 2), np.float32))
    return str(root / "shards" / "lab-{000000..000007}.tar"), str(root / "labels")


def _run(loader, n_batches=None):
    ids, labels = [], []
    for b, (x, y) in enumerate(loader):
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and y.shape == (len(x), 2)
        ids += _value_to_index(x)
        labels += y.tolist()
        if n_batches and b + 1 == n_batches:
            break
    return ids, labels


@pytest.mark.parametrize("num_workers,augment", [(0, False), (2, True)])
def test_single_pass_yields_every_sample_once_with_its_labels(labelled, num_workers, augment):
    urls, labels_dir = labelled
    loader = make_train_loader(urls, labels_dir, batch_size=6, num_workers=num_workers, image_size=8, seed=3,
                               resampled=False, shuffle_buffer=7, augment=augment)
    ids, labels = _run(loader)
    assert sorted(ids) == list(range(N_IMG))
    assert labels == [[i, 1000 + i % 7] for i in ids]  # labels joined by key, not by position
    assert ids != sorted(ids)  # shuffled (shards and buffer)
    assert _run(make_train_loader(urls, labels_dir, 6, num_workers, 8, seed=3, resampled=False,
                                  shuffle_buffer=7, augment=augment))[0] == ids  # deterministic for a seed
    assert sum(loader.skip_counts().values()) == 0


def test_two_ranks_two_workers_partition_the_shards(labelled):
    urls, labels_dir = labelled
    per_rank = [_run(make_train_loader(urls, labels_dir, 4, 2, 8, seed=0, resampled=False, rank=r, world_size=2))[0]
                for r in range(2)]
    assert sorted(per_rank[0] + per_rank[1]) == list(range(N_IMG))
    assert len(per_rank[0]) == len(per_rank[1]) == N_IMG // 2  # 8 shards of 5 over 2 x 2 streams


def test_resampled_streams_read_disjoint_shards_per_pass(labelled):
    """8 shards over 2 ranks x 2 workers: each stream cycles its own 2 shards (10 samples); one pass of every
    stream (first 4 batches of 5 per rank, workers interleaved) covers the data exactly once."""
    urls, labels_dir = labelled
    ids = []
    for r in range(2):
        ids += _run(make_train_loader(urls, labels_dir, 5, 2, 8, seed=4, shuffle=False, rank=r, world_size=2),
                    n_batches=4)[0]
    assert sorted(ids) == list(range(N_IMG))


_DIST_SCRIPT = """
import json, sys
from mlcd import dist
from mlcd.data.loader import make_train_loader
dist.init()
loader = make_train_loader(sys.argv[1], sys.argv[2], 4, 0, 8, seed=0, resampled=False)  # rank/world from mlcd.dist
ids = []
for x, y in loader:
    ids += y[:, 0].tolist()
json.dump({"rank": dist.rank(), "world": dist.world_size(), "ids": ids}, open(f"{sys.argv[3]}/{dist.rank()}.json", "w"))
dist.cleanup()
"""


@pytest.mark.slow
def test_torchrun_ranks_split_shards_via_mlcd_dist(labelled, tmp_path):
    urls, labels_dir = labelled
    (tmp_path / "w.py").write_text(_DIST_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                          str(tmp_path / "w.py"), urls, labels_dir, str(tmp_path)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    res = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert [(r["rank"], r["world"]) for r in res] == [(0, 2), (1, 2)]
    assert len(res[0]["ids"]) == len(res[1]["ids"]) == N_IMG // 2
    assert sorted(res[0]["ids"] + res[1]["ids"]) == list(range(N_IMG))


def test_resampled_stream_is_reproducible_and_seed_dependent(labelled):
    urls, labels_dir = labelled

    def first(seed, n=12, **kw):
        loader = make_train_loader(urls, labels_dir, 5, kw.pop("num_workers", 2), 8, seed=seed, shuffle_buffer=6,
                                   scale=(0.3, 1.0), **kw)
        out = []
        for b, (x, y) in enumerate(loader):
            out.append((x, y))
            if b + 1 == n:
                return out

    torch.manual_seed(1)
    a = first(7)
    torch.manual_seed(2)
    import random
    random.seed(5)
    np.random.seed(5)
    b = first(7)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    c = first(8)
    assert not all(torch.equal(ya, yc) for (_, ya), (_, yc) in zip(a, c))
    # in-process stream (num_workers=0) leaves torch's global RNG alone and is reproducible too
    state = torch.get_rng_state()
    d = first(7, num_workers=0)
    assert torch.equal(state, torch.get_rng_state())
    e = first(7, num_workers=0)
    assert all(torch.equal(xd, xe) for (xd, _), (xe, _) in zip(d, e))
    # resampled = re-drawn passes: without a shuffle buffer the first 40 samples are one pass over all data
    ids, labels = _run(make_train_loader(urls, labels_dir, 5, 0, 8, seed=1, shuffle=False), n_batches=8)
    assert sorted(ids) == list(range(N_IMG)) and labels == [[i, 1000 + i % 7] for i in ids]


def test_k_columns(labelled):
    urls, labels_dir = labelled
    x, y = next(iter(make_train_loader(urls, labels_dir, 4, 0, 8, seed=0, k=1, resampled=False, augment=False)))
    assert y.shape == (4, 1) and y[:, 0].tolist() == _value_to_index(x)
    with pytest.raises(ValueError, match=r"lab-0000\d\d.*k=2 columns, 3 are needed"):
        next(iter(make_train_loader(urls, labels_dir, 4, 0, 8, seed=0, k=3)))


def test_eval_transform_matches_torchvision_with_a_floor_crop():
    """EvalTransform (the one eval transform: probe, extraction, monitor) against torchvision's Resize(bicubic) +
    ToTensor + Normalize with the crop box computed independently (floor offset), on non-square images of every
    offset parity, grayscale included; and the probe backbone uses it."""
    import numpy as np
    from PIL import Image
    from torchvision import transforms as T

    from mlcd.data.transforms import CLIP_MEAN, CLIP_STD, EvalTransform
    from mlcd.models.backbones import build_backbone

    rng = np.random.default_rng(0)
    resize, tail = T.Resize(24, interpolation=T.InterpolationMode.BICUBIC), T.Compose([T.ToTensor(),
                                                                                      T.Normalize(CLIP_MEAN, CLIP_STD)])
    for w, h, mode in [(31, 24, "RGB"), (27, 24, "RGB"), (24, 37, "RGB"), (50, 29, "L"), (24, 24, "RGB"), (90, 61, "RGB")]:
        shape = (h, w, 3) if mode == "RGB" else (h, w)
        img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
        r = resize(img.convert("RGB"))
        left, top = (r.width - 24) // 2, (r.height - 24) // 2
        want = tail(r.crop((left, top, left + 24, top + 24)))
        got = EvalTransform(24)(img)
        assert got.shape == (3, 24, 24) and float((got - want).abs().max()) < 1e-5, (w, h)
    model = {"image_size": 24, "patch_size": 8, "width": 32, "layers": 1, "heads": 2, "mlp_dim": 64}
    assert repr(build_backbone({"type": "random", "model": model}).transform) == repr(EvalTransform(24))


# ------------------------------------------------------------------ data.decode=gpu (device-side decode), on the CPU

def _photo(i: int, size) -> Image.Image:
    """A photo-like image (smooth gradient, blurred shapes, mild noise): what the interpolation bounds are stated on."""
    from PIL import ImageDraw, ImageFilter

    rng = np.random.default_rng(i)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)
    t = (t - t.min()) / (np.ptp(t) + 1e-6)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    img = Image.fromarray((c0 * (1 - t[..., None]) + c1 * t[..., None]).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        draw.ellipse([x0, y0, x0 + int(rng.integers(4, w // 2)), y0 + int(rng.integers(4, h // 2))],
                     fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    arr = np.asarray(img.filter(ImageFilter.GaussianBlur(1.0))).astype(np.int16) + rng.integers(-6, 7, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _encode(img: Image.Image, fmt="JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


N_JPEG = 48


@pytest.fixture(scope="module")
def jpeg_shards(tmp_path_factory):
    """48 photo-like images of varied sizes in 6 shards of 8: JPEGs (RGB, one grayscale, one progressive, one CMYK)
    and two PNGs; labels [i, 1000 + i % 7]."""
    root = tmp_path_factory.mktemp("jpeg")
    (root / "imgs").mkdir()
    for i in range(N_JPEG):
        img = _photo(i, (40 + 7 * (i % 9), 30 + 11 * (i % 5)))
        if i == 5:
            data = _encode(img.convert("L"), quality=90)
        elif i == 6:
            data = _encode(img, quality=90, progressive=True)
        elif i == 7:
            data = _encode(img.convert("CMYK"), quality=90)
        else:
            data = _encode(img, quality=90) if i not in (8, 9) else _encode(img, "PNG")
        (root / "imgs" / f"im{i:03d}.{'png' if i in (8, 9) else 'jpg'}").write_bytes(data)
    m = shards_from_folder(root / "imgs", root / "shards", prefix="jp", max_per_shard=8)
    for s in m["shards"]:
        keys = [x["__key__"] for x in iter_samples(str(root / "shards" / s["name"]), None)]
        idx = np.array([int(k[2:]) for k in keys])
        write_shard_labels(root / "labels", s["name"][:-4], keys, np.stack([idx, 1000 + idx % 7], 1).astype(np.int32),
                           np.ones((len(keys), 2), np.float32))
    return str(root / "shards" / "jp-{000000..000005}.tar"), str(root / "labels")


# decode=gpu vs decode=cpu, same crop box: PIL's bicubic resize vs torch's antialiased bicubic (the same kernel,
# a = -0.5); the decoders are bit-identical on the CPU (both libjpeg-turbo). In normalised units (one grey level =
# 1 / (255 * std) ~ 0.015), on 40 crops of 500x375 photo-like JPEGs to 224: uint8 resize (what the CPU runs) mean
# |diff| 8e-5, 99% of values equal, max 0.045; float resize (what CUDA runs) mean 0.0024, max 0.058. Bounds:
SAME_BOX_MEAN_ABS = 0.002   # uint8: ~0.13 grey level (loader comparison at 32 px too)
SAME_BOX_MEAN_ABS_FLOAT = 0.005
SAME_BOX_MAX_ABS = 0.25     # ~16 grey levels: one pixel at a crop border, where PIL reads pixels outside the box


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])
def test_gpu_decode_gives_the_cpu_paths_batches(jpeg_shards, num_workers):
    """Same seed: the same samples in the same batches with the same boxes and flips (the worker draws them from
    the same RNG stream), images equal within the interpolation difference; and reproducible."""
    urls, labels_dir = jpeg_shards
    cpu = list(make_train_loader(urls, labels_dir, 8, num_workers, 32, seed=5, shuffle_buffer=6, resampled=False))
    gpu = list(make_train_loader(urls, labels_dir, 8, num_workers, 32, seed=5, shuffle_buffer=6, resampled=False,
                                 decode="gpu", device="cpu"))
    assert len(cpu) == len(gpu) == N_JPEG // 8
    for (xc, yc), (xg, yg) in zip(cpu, gpu):
        assert torch.equal(yc, yg)
        assert xg.shape == xc.shape and xg.dtype == torch.float32
        d = (xg - xc).abs()
        assert float(d.mean()) < SAME_BOX_MEAN_ABS and float(d.max()) < SAME_BOX_MAX_ABS, (float(d.mean()), float(d.max()))
    again = list(make_train_loader(urls, labels_dir, 8, num_workers, 32, seed=5, shuffle_buffer=6, resampled=False,
                                   decode="gpu", device="cpu"))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(gpu, again))
    # the resampled (training) stream too
    res = [make_train_loader(urls, labels_dir, 8, num_workers, 32, seed=6, decode=dec, device="cpu")
           for dec in ("cpu", "gpu")]
    for b, ((xc, yc), (xg, yg)) in enumerate(zip(*res)):
        assert torch.equal(yc, yg) and float((xg - xc).abs().mean()) < SAME_BOX_MEAN_ABS
        if b == 9:
            break


def test_gpu_decode_of_png_shards_is_the_cpu_path_exactly(labelled):
    """PNG (and grayscale) images are decoded and transformed in the workers by decode=cpu's own code: batches
    equal bit for bit, worker batches with no JPEG at all included."""
    urls, labels_dir = labelled
    a, b = (list(make_train_loader(urls, labels_dir, 6, 2, 8, seed=3, resampled=False, shuffle_buffer=7,
                                   decode=dec, device="cpu")) for dec in ("cpu", "gpu"))
    assert sum(len(y) for _, y in b) == N_IMG
    xa, ya, xb, yb = torch.cat([x for x, _ in a]), torch.cat([y for _, y in a]), torch.cat([x for x, _ in b]), \
        torch.cat([y for _, y in b])
    assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("resize_uint8", [True, False])
def test_gpu_decode_for_a_fixed_box_matches_pil(resize_uint8):
    """DeviceDecoder on given boxes and flips vs PIL resize(box=...) + flip + normalise (decode=cpu's transform),
    on 500x375 photo-like JPEGs: mean and max |diff| within the stated interpolation bounds, for the uint8 resize
    the CPU runs and the float one CUDA runs; worker-transformed images land in their slots untouched."""
    import random

    from mlcd.data.device_decode import DeviceDecoder, pack
    from mlcd.data.transforms import TrainTransform, to_normalized_tensor

    t = TrainTransform(224)
    rng = random.Random(0)
    items, ref = [], []
    for i in range(12):
        img = _photo(i, (500, 375))
        data = _encode(img, quality=90)
        left, top, w, h, flip = t.params(500, 375, rng)
        flip = bool(i % 2)  # both kinds, whatever the draw
        items.append((data, (left, top, w, h, flip)))
        out = Image.open(io.BytesIO(data)).convert("RGB").resize((224, 224), Image.BICUBIC,
                                                                 box=(left, top, left + w, top + h))
        ref.append(to_normalized_tensor(out.transpose(Image.FLIP_LEFT_RIGHT) if flip else out))
    ready = torch.randn(3, 224, 224)
    items.insert(3, ready)
    n = len(items)
    batch = pack(items, [np.array([i]) for i in range(n)], [f"k{i}" for i in range(n)], ["u"] * n, shared=False)
    decoder = DeviceDecoder(224, "cpu")
    decoder.resize_uint8 = resize_uint8
    got, failed = decoder(batch)
    assert failed == [] and got.shape == (n, 3, 224, 224)
    assert torch.equal(got[3], ready)
    d = (torch.cat([got[:3], got[4:]]) - torch.stack(ref)).abs()
    bound = SAME_BOX_MEAN_ABS if resize_uint8 else SAME_BOX_MEAN_ABS_FLOAT
    assert float(d.mean()) < bound and float(d.max()) < SAME_BOX_MAX_ABS, (float(d.mean()), float(d.max()))
    interior = d[..., 8:-8, 8:-8]  # away from the crop border both read the same pixels: a grey level or two
    assert float(interior.max()) < 0.05


@pytest.mark.slow
def test_gpu_decode_boxes_follow_the_cpu_paths_distribution():
    """The boxes decode=gpu's workers draw (prepare_encoded on JPEG headers) vs torchvision's RandomResizedCrop
    sampler (an independent implementation, torch's RNG): two-sample KS tests on area fraction, log aspect ratio
    and horizontal centre, p > 0.001 each, over 4 image shapes x 1,500 draws (fixed seeds: deterministic). And the
    RNG stream: decode=gpu's worker consumes exactly the draws TrainTransform makes (the same stream as decode=cpu)."""
    import random

    from scipy.stats import ks_2samp
    from torchvision.transforms import RandomResizedCrop

    from mlcd.data.loader import prepare_encoded
    from mlcd.data.transforms import TrainTransform

    t = TrainTransform(32)
    torch.manual_seed(0)
    rng = random.Random(0)
    for w, h in [(500, 375), (375, 500), (64, 48), (900, 200)]:
        sample = {"__key__": "k", "jpg": _encode(_photo(w, (w, h)), quality=90)}
        ours, ref, flips = [], [], 0
        for _ in range(1500):
            data, (left, top, cw, ch, flip) = prepare_encoded(sample, t, rng)
            ours.append((cw * ch / (w * h), np.log(cw / ch), (left + cw / 2) / w))
            flips += flip
            top_r, left_r, ch_r, cw_r = RandomResizedCrop.get_params(torch.empty(3, h, w), [0.08, 1.0], [3 / 4, 4 / 3])
            ref.append((cw_r * ch_r / (w * h), np.log(cw_r / ch_r), (left_r + cw_r / 2) / w))
        ours, ref = np.array(ours), np.array(ref)
        for j, what in enumerate(("area fraction", "log aspect", "centre x")):
            p = ks_2samp(ours[:, j], ref[:, j]).pvalue
            assert p > 1e-3, (w, h, what, p)
        assert abs(flips / 1500 - 0.5) < 4 * np.sqrt(0.25 / 1500)
    # the stream: JPEGs (header only) and PNG/CMYK (transformed in the worker) consume what TrainTransform consumes
    samples = [{"__key__": f"k{i}", fmt: _encode(img, fmt.upper().replace("JPG", "JPEG"))}
               for i, (fmt, img) in enumerate([("jpg", _photo(1, (60, 40))), ("png", _photo(2, (30, 50))),
                                               ("jpg", _photo(3, (50, 50)).convert("CMYK")),
                                               ("jpg", _photo(4, (80, 30)).convert("L"))])]
    a, b = random.Random(7), random.Random(7)
    for s in samples * 3:
        prepare_encoded(s, t, a)
        ext = "jpg" if "jpg" in s else "png"
        t(Image.open(io.BytesIO(s[ext])).convert("RGB"), b)
        assert a.getstate() == b.getstate()


def test_prepare_encoded_routes_each_kind_of_image():
    """Worker side of decode=gpu: RGB/grayscale JPEGs go to the device as bytes with a box; PNG, CMYK, a JPEG cut
    short (no end marker) are decoded here by PIL (a cut one fails: 'bad_image', as on decode=cpu); garbage and
    an empty member are 'bad_image'; no image member is 'no_image'."""
    import random

    from mlcd.data.loader import prepare_encoded
    from mlcd.data.transforms import TrainTransform

    t, rng = TrainTransform(16), random.Random(0)
    jpg = _encode(_photo(0, (40, 30)), quality=90)
    cases = {"jpg": (jpg, "device"), "gray": (_encode(_photo(1, (40, 30)).convert("L")), "device"),
             "cmyk": (_encode(_photo(2, (40, 30)).convert("CMYK")), "worker"),
             "png": (_encode(_photo(3, (40, 30)), "PNG"), "worker"), "cut": (jpg[: len(jpg) // 2], "bad_image"),
             "garbage": (b"\xff\xd8\xff\xe0" + bytes(100), "bad_image"), "empty": (b"", "bad_image")}
    for name, (data, want) in cases.items():
        got = prepare_encoded({"__key__": name, "jpg": data}, t, rng)
        kind = ("device" if isinstance(got, tuple) else "worker" if isinstance(got, torch.Tensor) else got)
        assert kind == want, name
        if kind == "device":
            assert got[0] == data and len(got[1]) == 5
        if kind == "worker":
            assert got.shape == (3, 16, 16)
    assert prepare_encoded({"__key__": "x", "txt": b"no image"}, t, rng) == "no_image"
    with pytest.raises(ValueError, match="decode must be one of"):
        make_train_loader([], ".", 4, 0, 8, seed=0, decode="nvjpeg")


@pytest.mark.slow
def test_gpu_decode_trains_on_cpu(tmp_path):
    """train.py's loop with data.decode=gpu on the CPU (in process, as tests/test_train.py runs it): the same losses
    as decode=cpu within the interpolation difference, the corrupt images counted in the log."""
    import webdataset as wds

    from helpers import _compose, _run_inprocess

    shard_dir, labels_dir = tmp_path / "shards", tmp_path / "labels"
    shard_dir.mkdir()
    for s in range(2):
        keys, labels = [], []
        with wds.TarWriter(str(shard_dir / f"train-{s:06d}.tar")) as sink:
            for j in range(25):
                key = f"s{s}-{j:03d}"
                data = b"not a jpeg" if j == 3 else _encode(_photo(100 * s + j, (40 + j, 36)), quality=90)
                sink.write({"__key__": key, "jpg": data})
                keys.append(key)
                labels.append([j % 23, 10 + (j * 7) % 13])
        write_shard_labels(labels_dir, f"train-{s:06d}", keys, np.array(labels, np.int32),
                           np.ones((len(keys), 2), np.float32))
    (labels_dir / "manifest.json").write_text(json.dumps({"num_classes": 23}))
    dataset = (f"{shard_dir}/train-{{000000..000001}}.tar", str(labels_dir))
    rows = {}
    for decode in ("cpu", "gpu"):
        cfg = _compose(dataset, tmp_path / decode, **{"data.decode": decode, "train.total_steps": 4,
                                                      "train.ckpt_every": 4, "train.log_every": 1})
        _run_inprocess(cfg)
        rows[decode] = [json.loads(l) for l in (tmp_path / decode / "metrics.jsonl").read_text().splitlines()]
    losses = {k: [r["loss"] for r in v] for k, v in rows.items()}
    assert len(losses["gpu"]) == 4 and all(np.isfinite(losses["gpu"]))
    np.testing.assert_allclose(losses["gpu"], losses["cpu"], rtol=1e-3)
    assert rows["gpu"][-1]["skipped/bad_image"] == rows["cpu"][-1]["skipped/bad_image"] >= 1
