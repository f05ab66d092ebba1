"""Feature extraction reads every shard once: each DataLoader worker reads whole shards (counted by logging the
loader's open calls from inside the workers), the output stays in shard order then tar order, and the cluster
stage's feature files are byte-identical whatever num_workers and after a resume."""
import io
import tarfile

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import get_worker_info

import mlcd.data.tars as tars_mod
from mlcd.cluster import extract
from mlcd.data.tars import REASONS
from mlcd.data.loader import make_extract_loader
from mlcd.data.transforms import EvalTransform
from mlcd.models.backbones import Backbone

SIZES = [7, 1, 0, 5, 3]  # samples per shard: uneven, one empty tar; the last shard has a garbage image (s4-1)


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(i).integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """(urls, keys in shard then tar order as Python's tarfile lists the good images)."""
    d = tmp_path_factory.mktemp("shards")
    urls, keys = [], []
    for s, n in enumerate(SIZES):
        with tarfile.open(d / f"s{s}.tar", "w") as tar:
            for j in range(n):
                for ext, data in (("jpg", b"garbage" if (s, j) == (4, 1) else _jpeg(10 * s + j)), ("cls", b"1")):
                    info = tarfile.TarInfo(f"s{s}-{j}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        urls.append(str(d / f"s{s}.tar"))
        with tarfile.open(urls[-1]) as tar:
            keys += [m.name[:-4] for m in tar if m.name.endswith(".jpg") and m.name != "s4-1.jpg"]
    return urls, keys


@pytest.fixture
def open_log(tmp_path, monkeypatch):
    """Every shard the loader opens, as (worker id, url); forked DataLoader workers inherit the patch."""
    log, real = tmp_path / "opens.log", tars_mod.open_url

    def logged_open(url):
        info = get_worker_info()
        with open(log, "a") as f:
            f.write(f"{info.id if info else 0} {url}\n")
        return real(url)

    monkeypatch.setattr(tars_mod, "open_url", logged_open)
    return lambda: [(int(w), u) for w, u in (line.split(" ", 1) for line in log.read_text().splitlines())] \
        if log.exists() else []


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a 2-core machine, on purpose
@pytest.mark.parametrize("num_workers", [0, 2, 3])
def test_each_worker_reads_only_its_own_shards_and_order_is_kept(shards, open_log, num_workers):
    urls, keys = shards
    loader = make_extract_loader(urls, EvalTransform(8), batch_size=2, num_workers=num_workers)
    got = []
    for images, ks in loader:
        assert images.shape == (len(ks), 3, 8, 8) and len({k.split("-")[0] for k in ks}) == 1  # no batch spans shards
        got += ks
    assert got == keys
    reads, nw = open_log(), max(num_workers, 1)
    assert sorted(u for _, u in reads) == sorted(urls)  # every shard read once
    assert {w: [u for ww, u in reads if ww == w] for w in range(nw)} == {w: urls[w::nw] for w in range(nw)}
    assert loader.skip_counts() == {**dict.fromkeys(REASONS, 0), "bad_image": 1}


def test_tagged_batches_arrive_in_a_fixed_order_with_per_shard_counts(shards):
    urls, keys = shards
    runs = [list((i, ks, skips) for i, _, ks, skips in make_extract_loader(urls, EvalTransform(8), 2, 2).batches())
            for _ in range(2)]
    assert runs[0] == runs[1]
    assert [i for i, _, skips in runs[0] if skips is not None] != sorted(range(len(urls)))  # interleaved, not ordered
    assert sorted(i for i, _, skips in runs[0] if skips is not None) == list(range(len(urls)))  # one last item each
    per_shard = {i: [k for j, ks, _ in runs[0] if j == i for k in ks] for i in range(len(urls))}
    assert [k for i in range(len(urls)) for k in per_shard[i]] == keys
    last = {i: skips for i, _, skips in runs[0] if skips is not None}
    assert [last[i]["bad_image"] for i in range(len(urls))] == [0, 0, 0, 0, 1]


class _Tiny(torch.nn.Module):
    """Stands in for the open_clip model: a fixed linear map of the pixels."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3 * 8 * 8, 4)
        with torch.no_grad():
            self.lin.weight.copy_(torch.linspace(-1, 1, 4 * 192).reshape(4, 192))
            self.lin.bias.zero_()

    def forward(self, x):
        return self.lin(x.flatten(1))


def _tiny_backbone(cfg, feature):
    tiny = _Tiny()
    return Backbone("tiny", tiny, EvalTransform(8), feature, {}, tiny, name="tiny", pretrained="none")


def _run(urls, out, num_workers, monkeypatch):
    monkeypatch.setattr(extract, "build_backbone", _tiny_backbone)
    cfg = OmegaConf.create({"out_dir": str(out), "seed": 0, "extract": {
        "model": "tiny", "pretrained": None, "model_config": None, "image_size": 8, "text": False, "fusion": "mean",
        "batch_size": 2, "num_workers": num_workers, "precision": "fp32"}})
    extract.run(cfg, {}, urls, torch.device("cpu"))
    return {p.name: p.read_bytes() for p in sorted((out / "features").iterdir()) if p.name != "manifest.json"}


def test_feature_files_do_not_depend_on_workers_or_resume(shards, tmp_path, monkeypatch, open_log):
    urls, keys = shards
    one = _run(urls, tmp_path / "w0", 0, monkeypatch)
    two = _run(urls, tmp_path / "w2", 2, monkeypatch)
    assert one == two and len(one) == 3 * len(urls)
    assert [k for s in range(len(urls)) for k in one[f"s{s}.keys.txt"].decode().split()] == keys
    # reference: the model on each sample alone (single-process ordered loader, batch of 1)
    with torch.no_grad():
        ref = torch.cat([_Tiny()(x) for x, _ in make_extract_loader(urls, EvalTransform(8), 1, 0)])
    feats = np.concatenate([np.load(tmp_path / "w2" / "features" / f"s{s}.npy") for s in range(len(urls))])
    np.testing.assert_allclose(feats, torch.nn.functional.normalize(ref, dim=-1).numpy(), atol=2e-3)
    # resume: one shard's features lost; only that shard is read again, the files come back identical
    for p in ("s3.npy", "s3.keys.txt"):
        (tmp_path / "w2" / "features" / p).unlink()
    n_reads = len(open_log())
    assert _run(urls, tmp_path / "w2", 2, monkeypatch) == one
    assert [u for _, u in open_log()[n_reads:]] == [urls[3]]
