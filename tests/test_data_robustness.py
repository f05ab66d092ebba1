"""Hand-corrupted shards: truncated / corrupt tars, garbage and truncated JPEGs, a sample without image, missing
and malformed labels. Where skipping is the policy nothing crashes and every skip is counted exactly (also
from worker processes); elsewhere the error names the shard and the key."""
import gzip
import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from mlcd.data.labels import write_shard_labels
from mlcd.data.loader import REASONS, make_extract_loader, make_train_loader
from mlcd.data.transforms import EvalTransform


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(i)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write_tar(path, samples):
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _good(key, idx):
    return key, {"jpg": _jpeg(idx), "cls": str(idx).encode()}


def _labels(d, stem, keys, idx, k=2):
    idx = np.asarray(idx)
    write_shard_labels(d, stem, keys, np.stack([idx] + [idx * 0] * (k - 1), 1).astype(np.int32),
                       np.ones((len(keys), k), np.float32))


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """Shards s0..s6 in `shards/`, labels in `labels/`; returns (dir, expected good ids, expected counts)."""
    root = tmp_path_factory.mktemp("bad")
    sd, ld = root / "shards", root / "labels"
    sd.mkdir()
    idx = iter(range(1000))
    good, keys_of = [], {}

    def shard(name, samples, label_keys=None, label_idx=None):
        _write_tar(sd / f"{name}.tar", samples)
        keys = [k for k, _ in samples] if label_keys is None else label_keys
        keys_of[name] = [k for k, _ in samples]
        if label_keys is not False:
            _labels(ld, name, keys, [int(m["cls"]) for _, m in samples] if label_idx is None else label_idx)

    # s0: clean
    s0 = [_good(f"s0-{j}", next(idx)) for j in range(5)]
    shard("s0", s0)
    good += [int(m["cls"]) for _, m in s0]
    # s1: garbage JPEG (JPEG magic, then noise), a sample without image member, a truncated JPEG
    s1 = [_good(f"s1-{j}", next(idx)) for j in range(6)]
    s1[1][1]["jpg"] = b"\xff\xd8\xff\xe0" + bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8))
    del s1[3][1]["jpg"]
    s1[3][1]["txt"] = b"caption without image"
    s1[4][1]["jpg"] = s1[4][1]["jpg"][: len(s1[4][1]["jpg"]) // 2]
    shard("s1", s1)
    good += [int(m["cls"]) for j, (_, m) in enumerate(s1) if j not in (1, 3, 4)]
    # s2: tar cut in the middle of sample 4's image: samples 0-3 survive, 4 and 5 are lost
    s2 = [_good(f"s2-{j}", next(idx)) for j in range(6)]
    shard("s2", s2)
    with tarfile.open(sd / "s2.tar") as t:
        m4 = t.getmember("s2-4.jpg")
    data = (sd / "s2.tar").read_bytes()
    (sd / "s2.tar").write_bytes(data[: m4.offset_data + m4.size // 2])
    good += [int(m["cls"]) for _, m in s2[:4]]
    # s3: a key (s3-1) missing from the label file, and a label row with an invalid id (-5, for s3-2)
    s3 = [_good(f"s3-{j}", next(idx)) for j in range(4)]
    ids3 = [int(m["cls"]) for _, m in s3]
    shard("s3", s3, label_keys=[k for k, _ in s3 if k != "s3-1"], label_idx=[ids3[0], -5, ids3[3]])
    good += [ids3[0], ids3[3]]
    # s4: label file with k=1 while the loader needs k=2 (shape error for every sample of the shard)
    s4 = [_good(f"s4-{j}", next(idx)) for j in range(3)]
    _write_tar(sd / "s4.tar", s4)
    _labels(ld, "s4", [k for k, _ in s4], [int(m["cls"]) for _, m in s4], k=1)
    # s5: no label file at all
    s5 = [_good(f"s5-{j}", next(idx)) for j in range(2)]
    shard("s5", s5, label_keys=False)
    # s6: header of sample 2's image overwritten (checksum mismatch): sample 0 survives; sample 1 may have had
    # more members (the broken one could have been its own), so it is dropped with the rest
    s6 = [_good(f"s6-{j}", next(idx)) for j in range(3)]
    shard("s6", s6)
    with tarfile.open(sd / "s6.tar") as t:
        off = t.getmember("s6-2.jpg").offset
    data = bytearray((sd / "s6.tar").read_bytes())
    data[off: off + 100] = b"x" * 100
    (sd / "s6.tar").write_bytes(bytes(data))
    good += [int(s6[0][1]["cls"])]
    # s7 (not in s{0..6}): a label row with an invalid id first
    s7 = [_good(f"s7-{j}", next(idx)) for j in range(2)]
    shard("s7", s7, label_idx=[-5, 1])

    counts = dict.fromkeys(REASONS, 0)
    counts.update(truncated_tar=1, corrupt_tar=1, bad_image=2, no_image=1,
                  missing_labels=1 + 2,   # s3-1, all of s5
                  bad_labels=1 + 3)       # s3-2 (id -5), all of s4
    return sd, ld, sorted(good), counts


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_policy_counts_every_skip_exactly(bad, num_workers):
    sd, ld, good, counts = bad
    loader = make_train_loader(str(sd / "s{0..6}.tar"), str(ld), batch_size=4, num_workers=num_workers,
                               image_size=16, seed=0, resampled=False, on_bad_labels="skip", k=2)
    ids = []
    for x, y in loader:
        assert x.shape == (len(y), 3, 16, 16)
        ids += y[:, 0].tolist()
    assert sorted(ids) == good
    assert loader.skip_counts() == counts


def test_resampled_stream_keeps_going_over_bad_shards(bad):
    sd, ld, good, counts = bad
    loader = make_train_loader(str(sd / "s{0..6}.tar"), str(ld), batch_size=4, num_workers=2, image_size=16,
                               seed=0, on_bad_labels="skip", k=2)
    seen = []
    for b, (x, y) in enumerate(loader):
        seen += y[:, 0].tolist()
        if b == 30:
            break
    assert set(seen) == set(good)  # 124 draws from 19 good samples: all seen, no bad one
    c = loader.skip_counts()
    assert c["truncated_tar"] >= 1 and c["bad_image"] >= 2 and c["no_image"] >= 1


@pytest.mark.parametrize("num_workers", [0, 1])
@pytest.mark.parametrize("shard,key,what", [("s3", "s3-1", "missing_labels: key not in the labels of shard s3"),
                                             ("s4", "s4-0", "bad_labels: labels of shard s4 have k=1 columns"),
                                             ("s5", "s5-0", "missing_labels: no labels for shard 's5'"),
                                             ("s7", "s7-0", r"bad_labels: label ids \[-5, 0\]")])
def test_label_errors_name_shard_and_key(bad, num_workers, shard, key, what):
    sd, ld, _, _ = bad
    loader = make_train_loader(str(sd / f"{shard}.tar"), str(ld), batch_size=1, num_workers=num_workers,
                               image_size=16, seed=0, resampled=False, shuffle=False, k=2)
    with pytest.raises(ValueError, match=rf"shard \S*/{shard}\.tar: sample '{key}': {what}"):
        list(loader)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_extract_loader_skips_and_counts_once(bad, num_workers):
    sd, _, _, _ = bad
    urls = [str(sd / f"s{i}.tar") for i in (0, 1, 2, 6)]
    loader = make_extract_loader(urls, EvalTransform(16), batch_size=2, num_workers=num_workers)
    keys = [k for _, ks in loader for k in ks]
    assert keys == [f"s0-{j}" for j in range(5)] + ["s1-0", "s1-2", "s1-5"] + [f"s2-{j}" for j in range(4)] + ["s6-0"]
    expect = dict.fromkeys(REASONS, 0)
    expect.update(truncated_tar=1, corrupt_tar=1, bad_image=2, no_image=1)  # shard problems not counted twice
    assert loader.skip_counts() == expect


def test_gzipped_shard_and_unreadable_pipe(bad, tmp_path):
    sd, _, _, _ = bad
    (tmp_path / "s0.tar.gz").write_bytes(gzip.compress((sd / "s0.tar").read_bytes()))
    loader = make_extract_loader([str(tmp_path / "s0.tar.gz"), "pipe:exit 3"], EvalTransform(16), 4, 0)
    assert [k for _, ks in loader for k in ks] == [f"s0-{j}" for j in range(5)]
    expect = dict.fromkeys(REASONS, 0)
    expect["shard_error"] = 1  # the failing pipe is counted once, not fatal
    assert loader.skip_counts() == expect
