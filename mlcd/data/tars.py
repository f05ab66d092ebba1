"""Reading webdataset tar shards: shard lists (local paths, brace patterns, `pipe:` commands and URLs via
webdataset's gopen), a small tar reader that can tell a clean end from a truncated or corrupt file, members grouped
into samples by `__key__` (webdataset's rule: the name up to the first '.' of the basename), and the skip counts
(REASONS) every stream keeps. mlcd/data/loader.py decodes and batches what this reads; its docstring states the
skip policy."""
import glob
import gzip
import json
import logging
import os
import struct
import zlib
from pathlib import Path

log = logging.getLogger("mlcd.data")

# Why samples were skipped. Always all present in skip_counts(), so ranks can all-reduce the same keys.
REASONS = (
    "truncated_tar",     # samples lost because the shard's bytes stop early (a cut .tar or .tar.gz)
    "corrupt_tar",       # samples lost at a bad tar header checksum or a failing read (corrupt gzip, I/O error)
    "shard_error",       # samples of a shard that cannot be opened, is empty, or is not a tar archive
    "duplicate_key",     # a repeat of a key seen earlier in the same shard (the first one is kept)
    "no_image",          # sample without a jpg/jpeg/png/webp member
    "bad_image",         # image bytes PIL cannot decode (garbage, empty, cut)
    "missing_labels",    # on_bad_labels='skip': no labels for this key / shard
    "bad_labels",        # on_bad_labels='skip': labels of the wrong shape, dtype or value
    "uncounted_shards",  # SHARDS, not samples: broken shards that lost a number of samples no manifest tells
)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_MAX_WARNINGS = 20  # per stream; the counts keep going
_READ_ERRORS = (OSError, ValueError, zlib.error)  # disk or pipe failures, corrupt gzip data, undecodable names


# ---------------------------------------------------------------- shard lists and tar reading

def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def expand_urls(urls) -> list[str]:
    """'d/s-{000..009}.tar', 'a.tar::b/{0..3}.tar', a glob, or a list of any of these -> a list of shards.

    Local paths must exist (the error names the missing ones)."""
    from webdataset.shardlists import expand_urls as wds_expand

    items = urls.split("::") if isinstance(urls, str) else list(urls)
    out = []
    for item in items:
        for u in wds_expand(str(item)):
            if not _is_remote(u) and any(c in u for c in "*?["):
                found = sorted(glob.glob(os.path.expanduser(u)))
                if not found:
                    raise FileNotFoundError(f"no shards match {u!r}")
                out.extend(found)
            else:
                out.append(u if _is_remote(u) else os.path.expanduser(u))
    if not out:
        raise ValueError(f"no shards in {urls!r}")
    missing = [u for u in out if not _is_remote(u) and not os.path.isfile(u)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(out)} shards do not exist, e.g. {missing[:3]}")
    return out


def open_url(url: str):
    if _is_remote(url):
        import webdataset as wds
        return wds.gopen(url, "rb")
    return open(url, "rb")


def manifest_count(url: str) -> int | None:
    """The sample count mlcd.data.make_shards recorded for this shard in the manifest.json beside it, if any."""
    if _is_remote(url):
        return None
    try:
        rows = json.loads((Path(url).parent / "manifest.json").read_text())["shards"]
        return next((int(r["count"]) for r in rows if r.get("name") == Path(url).name), None)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


class TarError(Exception):
    def __init__(self, reason: str, msg: str, name: str | None = None, detail: str = ""):
        super().__init__(msg)
        self.reason, self.name, self.detail = reason, name, detail  # name: the regular member the problem cut


def _read_exact(f, n: int) -> bytes:
    """n bytes, fewer only where the stream ends (a cut .gz stream ends here too instead of raising)."""
    chunks, got = [], 0
    while got < n:
        try:
            b = f.read(n - got)
        except EOFError:  # gzip: compressed stream ended before its end marker = the file is cut
            break
        if not b:
            break
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def _octal(field: bytes) -> int | None:
    s = field.rstrip(b"\0 ").strip()
    try:
        return int(s, 8) if s else 0
    except ValueError:
        return None


def _header_ok(hdr: bytes) -> bool:
    """The checksum field parses and matches the header's byte sum (unsigned, or signed as old tars wrote it)."""
    stored = _octal(hdr[148:156]) if hdr[148:156].strip(b"\0 ") else None
    rest = hdr[:148] + b" " * 8 + hdr[156:]
    return stored is not None and stored in (sum(rest), sum(struct.unpack("512b", rest)))


def _ustar_name(hdr: bytes) -> str:
    name = hdr[0:100].rstrip(b"\0").decode("utf-8")
    prefix = hdr[345:500].rstrip(b"\0").decode("utf-8") if hdr[257:262] == b"ustar" else ""
    return f"{prefix}/{name}" if prefix else name


def _pax_path(data: bytes):
    """The 'path' record of a PAX extended header ('%d path=...\\n' records), if any."""
    i = 0
    while i < len(data):
        sp = data.index(b" ", i)
        n = int(data[i:sp])
        rec = data[sp + 1: i + n - 1]
        k, _, v = rec.partition(b"=")
        if k == b"path":
            return v.decode("utf-8")
        i += n
    return None


def iter_tar(f):
    """Yield (name, bytes) of the regular files in a tar stream (ustar, PAX and GNU long names).

    Raises TarError: 'shard_error' for an empty stream or one that does not start with a tar header,
    'truncated_tar' when the bytes stop before the end-of-archive block, 'corrupt_tar' on a header whose
    checksum does not match or a read that fails. A member is yielded as soon as its data is whole."""
    long_name, first, cur = None, True, None  # cur: the regular member whose data is being read
    try:
        while True:
            hdr = _read_exact(f, 512)
            if first and not hdr:
                raise TarError("shard_error", "empty (0 bytes)", detail="a failed download or pipe command?")
            if hdr.count(0) == 512:
                return
            if first and (len(hdr) < 512 or not _header_ok(hdr)):
                raise TarError("shard_error", "not a tar archive", detail=f"no header in the first {len(hdr)} bytes")
            first = False
            if not hdr:
                raise TarError("truncated_tar", "the bytes stop after a member, without the end-of-archive block")
            if len(hdr) < 512:
                raise TarError("truncated_tar", f"the bytes stop inside a tar header ({len(hdr)} of 512 bytes)")
            if not _header_ok(hdr):
                raise TarError("corrupt_tar", "tar header checksum mismatch")
            size, kind = _octal(hdr[124:136]), hdr[156:157]
            if size is None or hdr[124] & 0x80:
                raise TarError("corrupt_tar", f"unreadable or base-256 size field {hdr[124:136]!r}")
            if kind in (b"0", b"\0", b"7"):
                cur = long_name or _ustar_name(hdr)
            data = _read_exact(f, size)
            if len(data) < size:
                raise TarError("truncated_tar", f"the bytes stop inside member {cur or '(an extended header)'} "
                                                f"({len(data)} of {size} bytes)", cur)
            name, cur = cur, None
            if kind == b"x":
                long_name = _pax_path(data) or long_name
            elif kind == b"L":
                long_name = data.rstrip(b"\0").decode("utf-8")
            else:  # a regular file uses the long name; directories, links, global headers are not samples
                long_name = None
            if name is not None:
                yield name, data
            pad = (-size) % 512
            if len(_read_exact(f, pad)) < pad:
                raise TarError("truncated_tar", "the bytes stop inside the padding after a member")
    except _READ_ERRORS as e:
        detail = f"{type(e).__name__}: {e}"
        if first:
            what = "not a tar archive" if isinstance(e, (gzip.BadGzipFile, zlib.error)) else "cannot read"
            raise TarError("shard_error", what, detail=detail) from e
        raise TarError("corrupt_tar", "unreadable data", cur, detail) from e


def split_key(name: str):
    """webdataset's rule: 'dir/abc.seg.jpg' -> ('dir/abc', 'seg.jpg')."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


class Counts(dict):
    """Skip counts per reason; the first _MAX_WARNINGS skips are logged. A child (one shard's counts) also
    adds to its parent, which does the logging."""

    def __init__(self, parent: "Counts | None" = None):
        super().__init__({r: 0 for r in REASONS})
        self.parent, self.warned = parent, 0

    def add(self, reason: str, where: str, detail: str = "", n: int = 1) -> None:
        self[reason] += n
        if self.parent is not None:
            self.parent.add(reason, where, detail, n)
        elif self.warned < _MAX_WARNINGS:
            self.warned += 1
            log.warning("skipped (%s) %s %s%s", reason, where, detail,
                        " [further skip warnings from this stream suppressed]" if self.warned == _MAX_WARNINGS else "")


def _starts_sample(sample, key: str, ext: str) -> bool:
    """A member starts a new sample unless it adds a new extension to the sample being read."""
    return sample is None or sample["__key__"] != key or ext in sample


def _count_lost(counts: Counts, url: str, e: TarError, read: int, cut: bool) -> None:
    """Count what a broken shard lost: from its manifest.json count when known, else 'uncounted_shards'."""
    where, n = f"{e}: {url}" + (f" ({e.detail});" if e.detail else ";"), manifest_count(url)
    if n is not None and n >= read + cut:
        counts.add(e.reason, where, f"{n - read} of its {n} samples (manifest.json) lost", n - read)
        return
    if cut:
        counts.add(e.reason, where, "the sample being read was cut")
    why = "no count in a manifest.json beside it" if n is None else f"manifest.json says {n} samples, {read} read"
    counts.add("uncounted_shards", where, f"an unknown number of samples lost ({why})")


def iter_samples(url: str, counts: Counts | None):
    """Samples {'__key__', '__url__', ext: bytes} of one shard in tar order; skips counted (module docstring)."""
    sample, seen, read, problem = None, set(), 0, None  # read: samples finished (yielded or duplicates)

    def first_time(s) -> bool:
        nonlocal read
        read += 1
        if s["__key__"] not in seen:
            seen.add(s["__key__"])
            return True
        if counts is not None:
            counts.add("duplicate_key", url, f"{s['__key__']}: key repeated in the shard, the first one was kept")
        return False

    try:
        f = open_url(url)
    except Exception as e:  # noqa: BLE001 - a shard that cannot be opened mid-run is skipped and counted
        problem = TarError("shard_error", "cannot open", detail=f"{type(e).__name__}: {e}")
    else:
        complete = False
        try:
            gz = url.endswith((".gz", ".tgz")) or (hasattr(f, "peek") and f.peek(2)[:2] == b"\x1f\x8b")
            for name, data in iter_tar(gzip.GzipFile(fileobj=f) if gz else f):
                if name.rsplit("/", 1)[-1].startswith("."):
                    continue
                key, ext = split_key(name)
                if _starts_sample(sample, key, ext):
                    if sample is not None and first_time(sample):
                        yield sample
                    sample = {"__key__": key, "__url__": url}
                sample[ext] = data
            complete = True
        except TarError as e:
            problem = e
        except _READ_ERRORS as e:  # from peeking at the first bytes
            problem = TarError("shard_error", "cannot read", detail=f"{type(e).__name__}: {e}")
        finally:
            try:
                f.close()  # a `pipe:` command's non-zero exit status surfaces here
            except Exception as e:  # noqa: BLE001
                if complete:  # the end-of-archive block was read: nothing is missing
                    log.warning("%s: closing the stream failed after a complete tar: %s: %s", url, type(e).__name__, e)
                elif problem is None:
                    problem = TarError("shard_error", "closing the stream failed", detail=f"{type(e).__name__}: {e}")
    cut = sample is not None and problem is not None and problem.name is not None \
        and not _starts_sample(sample, *split_key(problem.name))
    if sample is not None and not cut and first_time(sample):
        yield sample
    if problem is not None and counts is not None:
        _count_lost(counts, url, problem, read, cut)
