"""Hand-corrupted shards: truncated / corrupt tars, garbage and truncated JPEGs, a sample without image, missing
and malformed labels. Where skipping is the policy nothing crashes and every skip is counted exactly (also
from worker processes); elsewhere the error names the shard and the key.

The accounting tests cut, corrupt and garble shards of each kind and check, per shard, against what
Python's tarfile finds in the intact original: the samples yielded are exactly the ones the policy keeps
(every sample complete before a cut among them), and yielded + counted = the samples the shard held.
They run on the extraction loader and on the training loader with both decode paths (data.decode=cpu|gpu; gpu
runs its device code on the CPU here): the gpu path's failures found in the training process (a JPEG whose header
reads but whose data does not decode) are counted there and their batch slots refilled."""
import gzip
import io
import json
import logging
import tarfile
import zlib

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mlcd.data.labels import shard_stem, write_shard_labels
from mlcd.data.tars import REASONS, iter_samples
from mlcd.data.loader import make_extract_loader, make_train_loader
from mlcd.data.transforms import EvalTransform


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(i)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _no_scan_jpeg(i: int) -> bytes:
    """A JPEG whose header reads (size, mode) and that ends with the end marker, but has no image data: it passes
    the gpu path's worker check and fails to decode in the training process (device decoder and PIL)."""
    data = _jpeg(i)
    return data[:data.index(b"\xff\xda")] + b"\xff\xd9"


def _write_tar(path, samples):
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _good(key, idx):
    return key, {"jpg": _jpeg(idx), "cls": str(idx).encode()}


def _manifest(d, counts: dict):
    """manifest.json as mlcd.data.make_shards writes it (the loader reads only name and count)."""
    (d / "manifest.json").write_text(json.dumps({"shards": [{"name": n, "count": c} for n, c in counts.items()]}))


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
    good, keys_of, counts_of = [], {}, {}

    def shard(name, samples, label_keys=None, label_idx=None):
        _write_tar(sd / f"{name}.tar", samples)
        counts_of[f"{name}.tar"] = len(samples)
        keys = [k for k, _ in samples] if label_keys is None else label_keys
        keys_of[name] = [k for k, _ in samples]
        if label_keys is not False:
            _labels(ld, name, keys, [int(m["cls"]) for _, m in samples] if label_idx is None else label_idx)

    # s0: clean
    s0 = [_good(f"s0-{j}", next(idx)) for j in range(5)]
    shard("s0", s0)
    good += [int(m["cls"]) for _, m in s0]
    # s1: garbage JPEG (JPEG magic, then noise), a sample without image member, a truncated JPEG
    # and a JPEG without image data (header and end marker only)
    s1 = [_good(f"s1-{j}", next(idx)) for j in range(7)]
    s1[1][1]["jpg"] = b"\xff\xd8\xff\xe0" + bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8))
    del s1[3][1]["jpg"]
    s1[3][1]["txt"] = b"caption without image"
    s1[4][1]["jpg"] = s1[4][1]["jpg"][: len(s1[4][1]["jpg"]) // 2]
    s1[6][1]["jpg"] = _no_scan_jpeg(int(s1[6][1]["cls"]))
    shard("s1", s1)
    good += [int(m["cls"]) for j, (_, m) in enumerate(s1) if j not in (1, 3, 4, 6)]
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
    counts_of["s4.tar"] = 3
    _labels(ld, "s4", [k for k, _ in s4], [int(m["cls"]) for _, m in s4], k=1)
    # s5: no label file at all
    s5 = [_good(f"s5-{j}", next(idx)) for j in range(2)]
    shard("s5", s5, label_keys=False)
    # s6: header of sample 2's image overwritten (checksum mismatch): samples 0 and 1 survive (sample 1 was being
    # read: its members are whole, so it is kept); sample 2 is lost
    s6 = [_good(f"s6-{j}", next(idx)) for j in range(3)]
    shard("s6", s6)
    with tarfile.open(sd / "s6.tar") as t:
        off = t.getmember("s6-2.jpg").offset
    data = bytearray((sd / "s6.tar").read_bytes())
    data[off: off + 100] = b"x" * 100
    (sd / "s6.tar").write_bytes(bytes(data))
    good += [int(m["cls"]) for _, m in s6[:2]]
    # s7 (not in s{0..6}): a label row with an invalid id first
    s7 = [_good(f"s7-{j}", next(idx)) for j in range(2)]
    shard("s7", s7, label_idx=[-5, 1])
    _manifest(sd, counts_of)  # the shards' sample counts before they were damaged

    counts = dict.fromkeys(REASONS, 0)
    counts.update(truncated_tar=2, corrupt_tar=1, bad_image=3, no_image=1,  # s2-4 and s2-5; s6-2
                  missing_labels=1 + 2,   # s3-1, all of s5
                  bad_labels=1 + 3)       # s3-2 (id -5), all of s4
    return sd, ld, sorted(good), counts


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_policy_counts_every_skip_exactly(bad, num_workers, decode):
    sd, ld, good, counts = bad
    loader = make_train_loader(str(sd / "s{0..6}.tar"), str(ld), batch_size=4, num_workers=num_workers,
                               image_size=16, seed=0, resampled=False, on_bad_labels="skip", k=2, decode=decode,
                               device="cpu")
    ids, sizes = [], []
    for x, y in loader:
        assert x.shape == (len(y), 3, 16, 16) and x.dtype == torch.float32 and torch.isfinite(x).all()
        ids += y[:, 0].tolist()
        sizes.append(len(y))
    assert sorted(ids) == good
    assert loader.skip_counts() == counts
    if decode == "gpu":  # one stream of full batches: only the very last one may be short
        assert all(n == 4 for n in sizes[:-1]) and 0 < sizes[-1] <= 4


@pytest.mark.slow
@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_resampled_stream_keeps_going_over_bad_shards(bad, decode):
    sd, ld, good, counts = bad
    loader = make_train_loader(str(sd / "s{0..6}.tar"), str(ld), batch_size=4, num_workers=2, image_size=16,
                               seed=0, on_bad_labels="skip", k=2, decode=decode, device="cpu")
    seen = []
    for b, (x, y) in enumerate(loader):
        assert x.shape == (4, 3, 16, 16) and y.shape == (4, 2)  # every batch full, bad images or not
        seen += y[:, 0].tolist()
        if b == 30:
            break
    assert set(seen) == set(good)  # 124 draws from 19 good samples: all seen, no bad one
    c = loader.skip_counts()
    assert c["truncated_tar"] >= 1 and c["bad_image"] >= 3 and c["no_image"] >= 1


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
    assert keys == ([f"s0-{j}" for j in range(5)] + ["s1-0", "s1-2", "s1-5"] + [f"s2-{j}" for j in range(4)]
                    + ["s6-0", "s6-1"])
    expect = dict.fromkeys(REASONS, 0)
    expect.update(truncated_tar=2, corrupt_tar=1, bad_image=3, no_image=1)  # shard problems not counted twice
    assert loader.skip_counts() == expect


def test_gzipped_shard_and_unreadable_pipe(bad, tmp_path):
    sd, _, _, _ = bad
    (tmp_path / "s0.tar.gz").write_bytes(gzip.compress((sd / "s0.tar").read_bytes()))
    loader = make_extract_loader([str(tmp_path / "s0.tar.gz"), "pipe:exit 3"], EvalTransform(16), 4, 0)
    assert [k for _, ks in loader for k in ks] == [f"s0-{j}" for j in range(5)]
    expect = dict.fromkeys(REASONS, 0)
    expect["uncounted_shards"] = 1  # the failing pipe is counted once, not fatal; no manifest says its size
    assert loader.skip_counts() == expect


# ------------------------------------------------------------------ accounting per corruption kind

N_ACC = 6  # samples per shard in the accounting tests: jpg + cls, like mlcd.data.make_shards writes them


def _intact(path):
    """A clean shard of N_ACC samples; returns its layout from Python's tarfile: [(key, data start, data end)]."""
    _write_tar(path, [_good(f"k{j}", j) for j in range(N_ACC)])
    with tarfile.open(path) as t:
        return [(m.name.split(".")[0], m.offset_data, m.offset_data + m.size) for m in t]


def _kept_after_cut(layout, cut: int) -> list[str]:
    """The policy: a sample is yielded when it has a member whole before `cut` and none of its members is cut
    inside its data (a member whose header lies past the cut is simply absent)."""
    keys = list(dict.fromkeys(k for k, _, _ in layout))
    whole = {k for k, _, end in layout if end <= cut}
    cut_inside = {k for k, start, end in layout if start <= cut < end}
    kept = [k for k in keys if k in whole and k not in cut_inside]
    complete = [k for k in keys if all(end <= cut for kk, _, end in layout if kk == k)]
    assert set(complete) <= set(kept)  # the rule: every sample complete before the cut is yielded
    return kept


def _per_shard(loader):
    """{shard index: (keys yielded, the shard's skip counts)} from the extract loader's tagged batches."""
    out = {}
    for i, _, keys, skips in loader.batches():
        ks, _ = out.get(i, ([], None))
        out[i] = (ks + keys, skips)
    return out


PATHS = ["extract", "cpu", "gpu"]  # the extraction loader; the training loader with data.decode=cpu | gpu


def _check_path(path, urls, expected: dict, total=N_ACC, num_workers=0, keys=None):
    """_check on the extraction loader, or _check_train on the training loader with decode=path."""
    if path == "extract":
        _check(make_extract_loader(urls, EvalTransform(8), 4, num_workers), expected, total)
    else:
        _check_train(urls, expected, path, total, num_workers, keys or [f"k{j}" for j in range(N_ACC)])


def _check_train(urls, expected: dict, decode: str, total: int, num_workers: int, keys: list):
    """The training loader (single pass, tar order) over the same shards, every key labelled: label 1000 * shard +
    key index names each yielded sample. Per shard the keys yielded are the expected ones in tar order; the skip
    counts are the expected reasons' sums, so yielded + counted = total per shard also where decode=gpu counts
    in the training process."""
    ld = Path(urls[0]).parent / "labels"
    for i, u in enumerate(urls):
        _labels(ld, shard_stem(u), keys, [1000 * i + j for j in range(len(keys))])
    loader = make_train_loader(urls, str(ld), batch_size=4, num_workers=num_workers, image_size=8, seed=0,
                               resampled=False, shuffle=False, k=2, decode=decode, device="cpu")
    got = {}
    for x, y in loader:
        assert x.shape == (len(y), 3, 8, 8)
        for v in y[:, 0].tolist():
            got.setdefault(v // 1000, []).append(keys[v % 1000])
    assert set(got) <= set(expected)
    for i, (ks, _) in expected.items():
        assert got.get(i, []) == ks, i
    sums = dict.fromkeys(REASONS, 0)
    for ks, reason in expected.values():
        if reason:
            sums[reason] += total - len(ks)
    assert loader.skip_counts() == sums


def _check(loader, expected: dict, total=N_ACC):
    """expected: {shard index: (keys to yield, reason the others are counted under)}; also checks that
    yielded + counted = total per shard, nothing counted as uncounted, and the loader total is the sum."""
    got = _per_shard(loader)
    assert sorted(got) == sorted(expected)
    sums = dict.fromkeys(REASONS, 0)
    for i, (keys, reason) in expected.items():
        ks, skips = got[i]
        assert ks == keys, i
        assert skips == {**dict.fromkeys(REASONS, 0), **({reason: total - len(keys)} if reason else {})}, i
        for r, v in skips.items():
            sums[r] += v
    assert loader.skip_counts() == sums


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
def test_every_cut_of_a_tar_is_accounted_for(tmp_path, path):
    layout = _intact(tmp_path / "intact.tar")
    data = (tmp_path / "intact.tar").read_bytes()
    cuts = {0, 1, 300, 511, 512}
    for _, start, end in layout:  # around every header and every member's data, the padding, the end marker
        cuts |= {start - 512, start - 400, start - 1, start, start + 1, (start + end) // 2, end - 1, end, end + 1}
    cuts |= {layout[-1][2] + 511, layout[-1][2] + 512, layout[-1][2] + 1000, layout[-1][2] + 1536}
    cuts = sorted(cuts)
    d = tmp_path / "cuts"
    d.mkdir()
    expected, counts = {}, {}
    for i, c in enumerate(cuts):
        (d / f"c{i:03d}.tar").write_bytes(data[:c])
        counts[f"c{i:03d}.tar"] = N_ACC
        expected[i] = (_kept_after_cut(layout, c), "shard_error" if c < 512 else "truncated_tar")
    _manifest(d, counts)
    _check_path(path, [str(d / f"c{i:03d}.tar") for i in range(len(cuts))], expected)


@pytest.mark.parametrize("path", PATHS)
def test_every_cut_of_a_tar_gz_is_accounted_for(tmp_path, path):
    layout = _intact(tmp_path / "intact.tar")
    gz = gzip.compress((tmp_path / "intact.tar").read_bytes())
    cuts = sorted(set(range(0, len(gz), max(len(gz) // 60, 1))) | {len(gz) - 8, len(gz) - 1})
    d = tmp_path / "cuts"
    d.mkdir()
    expected, counts = {}, {}
    for i, c in enumerate(cuts):
        (d / f"c{i:03d}.tar.gz").write_bytes(gz[:c])
        counts[f"c{i:03d}.tar.gz"] = N_ACC
        available = len(zlib.decompressobj(wbits=31).decompress(gz[:c]))  # tar bytes the cut gzip still holds
        kept = _kept_after_cut(layout, available)
        expected[i] = (kept, None if len(kept) == N_ACC else "shard_error" if available < 512 else "truncated_tar")
    _manifest(d, counts)
    assert sum(len(k) for k, _ in expected.values()) > N_ACC * len(cuts) // 3  # the cuts span the whole file
    _check_path(path, [str(d / f"c{i:03d}.tar.gz") for i in range(len(cuts))], expected)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_each_corruption_kind_is_accounted_for(tmp_path, num_workers, path, caplog):
    """Bad header checksum (each member in turn), garbage / empty / missing image / a JPEG with no image data,
    random bytes, an empty file: every shard's samples are yielded or counted under their reason."""
    layout = _intact(tmp_path / "intact.tar")
    with tarfile.open(tmp_path / "intact.tar") as t:
        header_at = [m.offset for m in t]
    data = (tmp_path / "intact.tar").read_bytes()
    keys = [f"k{j}" for j in range(N_ACC)]
    d = tmp_path / "kinds"
    d.mkdir()
    names, expected = [], {}

    def add(name, content, keep, reason):
        (d / name).write_bytes(content)
        expected[len(names)] = (keep, reason)
        names.append(name)

    for m, off in enumerate(header_at):  # header of member m overwritten: the members before it are read
        bad = bytearray(data)
        bad[off: off + 100] = b"x" * 100
        add(f"hdr{m:02d}.tar", bytes(bad), list(dict.fromkeys(k for k, _, _ in layout[:m])),
            "shard_error" if m == 0 else "corrupt_tar")
    samples = [_good(k, j) for j, k in enumerate(keys)]
    samples[1][1]["jpg"] = b"\xff\xd8\xff\xe0" + bytes(200)  # garbage after a JPEG magic
    samples[3][1]["jpg"] = b""                                # empty image member
    samples[4][1]["jpg"] = _no_scan_jpeg(4)                   # header and end marker only (gpu: fails in-process)
    _write_tar(d / "img.tar", samples)
    expected[len(names)] = ([k for j, k in enumerate(keys) if j not in (1, 3, 4)], "bad_image")
    names.append("img.tar")
    samples = [_good(k, j) for j, k in enumerate(keys)]
    del samples[2][1]["jpg"]                                  # missing member: no image
    _write_tar(d / "member.tar", samples)
    expected[len(names)] = ([k for j, k in enumerate(keys) if j != 2], "no_image")
    names.append("member.tar")
    rng = np.random.default_rng(0)
    add("random.tar", rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(), [], "shard_error")
    add("empty.tar", b"", [], "shard_error")
    _manifest(d, dict.fromkeys(names, N_ACC))
    with caplog.at_level(logging.WARNING, logger="mlcd.data"):
        _check_path(path, [str(d / n) for n in names], expected, num_workers=num_workers)
    if num_workers == 0:  # worker processes log to their own stderr
        assert f"not a tar archive: {d / 'random.tar'} (no header in the first 512 bytes);" in caplog.text
        assert "ValueError" not in caplog.text and "invalid literal" not in caplog.text


@pytest.mark.parametrize("path", PATHS)
def test_duplicate_keys_keep_the_first_and_count_the_repeats(tmp_path, path):
    """Repeats of a key, adjacent (same members again) or not, are corrupt samples: first kept, rest counted."""
    a1, b, a2, c1, c2, c3, e = (_good("a", 0), _good("b", 1), _good("a", 2), _good("c", 3), _good("c", 4),
                                ("c", {"cls": b"5"}), _good("e", 6))
    _write_tar(tmp_path / "dup.tar", [a1, b, a2, c1, c2, c3, e])  # 7 samples written, 4 distinct keys
    with tarfile.open(tmp_path / "dup.tar") as t:  # independent check of what was written
        assert [m.name for m in t].count("c.cls") == 3
    got = list(iter_samples(str(tmp_path / "dup.tar"), None))
    assert [s["__key__"] for s in got] == ["a", "b", "c", "e"]
    assert [s["jpg"] for s in got] == [a1[1]["jpg"], b[1]["jpg"], c1[1]["jpg"], e[1]["jpg"]]  # the first ones
    _check_path(path, [str(tmp_path / "dup.tar")], {0: (["a", "b", "c", "e"], "duplicate_key")}, total=7,
                keys=["a", "b", "c", "e"])


def test_without_a_manifest_the_loss_is_flagged_not_guessed(tmp_path):
    """No count to subtract from: the cut sample in progress is counted, the shard goes to 'uncounted_shards';
    a manifest count below what was read (stale) is not trusted either."""
    layout = _intact(tmp_path / "s.tar")
    data = (tmp_path / "s.tar").read_bytes()
    key, start, end = layout[5]  # k2.cls: cut inside the second member of sample k2
    assert key == "k2"
    (tmp_path / "s.tar").write_bytes(data[: (start + end) // 2])
    loader = make_extract_loader(str(tmp_path / "s.tar"), EvalTransform(8), 4, 0)
    assert [k for _, ks in loader for k in ks] == ["k0", "k1"]
    assert loader.skip_counts() == {**dict.fromkeys(REASONS, 0), "truncated_tar": 1, "uncounted_shards": 1}
    _manifest(tmp_path, {"s.tar": 2})  # stale: 3 samples were read
    loader = make_extract_loader(str(tmp_path / "s.tar"), EvalTransform(8), 4, 0)
    assert sum(len(ks) for _, ks in loader) == 2
    assert loader.skip_counts() == {**dict.fromkeys(REASONS, 0), "truncated_tar": 1, "uncounted_shards": 1}
    _manifest(tmp_path, {"s.tar": N_ACC})
    loader = make_extract_loader(str(tmp_path / "s.tar"), EvalTransform(8), 4, 0)
    assert sum(len(ks) for _, ks in loader) == 2
    assert loader.skip_counts() == {**dict.fromkeys(REASONS, 0), "truncated_tar": N_ACC - 2}
