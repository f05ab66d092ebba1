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
from mlcd.data.loader import expand_urls, iter_samples, make_extract_loader
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


def test_fashion_mnist_to_shards(tmp_path):
    """Fashion-MNIST test split (10k; 'all' = 70k took ~30 s CPU here, see the report) -> shards; .cls kept."""
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
