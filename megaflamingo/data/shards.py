"""Webdataset shards: listing them, reading samples out of a tar, writing them.

A shard is a tar whose members are grouped into samples by key, webdataset's rule: the key is
the member path up to the first dot of its file name, the extension (lower-cased) is the rest;
consecutive members with the same key form one sample, and a repeated extension starts a new one.
Reading never raises on bad data: a shard that cannot be opened or a member cut short by a
truncated file becomes a `RawSample` with an `error` reason, which the loader counts.
"""

from __future__ import annotations

import glob
import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")


class ShardNotFoundError(ValueError):
    """A configured shard path or pattern matches no file."""


def expand_shards(pattern: str) -> list[str]:
    """Expand a shard spec into a list of existing files.

    Args:
        pattern: brace-expandable path(s) (`data/{000..099}.tar`), globs allowed, several specs
            joined with "::" (webdataset's convention).
    Returns:
        The files, in expansion order.
    Raises:
        ShardNotFoundError: the spec is empty, or a path / glob matches no file.
    """
    import braceexpand

    files: list[str] = []
    for spec in (p for p in pattern.split("::") if p.strip()):
        for path in braceexpand.braceexpand(spec.strip()):
            matches = sorted(glob.glob(path)) if glob.has_magic(path) else [path]
            found = [m for m in matches if os.path.isfile(m)]
            if not found:
                raise ShardNotFoundError(f"data shards: no file matches '{path}' (from '{pattern}')")
            files.extend(found)
    if not files:
        raise ShardNotFoundError(f"data shards: '{pattern}' names no shard")
    return files


@dataclass
class RawSample:
    """One sample read from a shard: its fields, or the reason it could not be read."""

    key: str
    index: int
    """Position of the sample in its shard (0-based, in member order)."""
    fields: dict = field(default_factory=dict)
    """extension -> bytes (empty for samples that were not requested)."""
    error: Optional[str] = None


def split_name(name: str) -> tuple[Optional[str], str]:
    """(key, lower-case extension) of a member name; key None when the name has no extension."""
    match = _KEY_EXT.match(name)
    if not match:
        return None, ""
    return match.group(1), match.group(2).lower()


def read_shard(path: str, wanted: Callable[[int], bool]) -> Iterator[RawSample]:
    """Yield the samples of one tar shard whose index passes `wanted`, in order.

    Member data is read only for wanted samples, so skipping ahead is cheap. A truncated or
    corrupt member ends the shard with one sample carrying error "truncated_member"; a file that
    is not a readable tar yields one sample with error "unreadable_shard" at index 0. Either is
    yielded only if its index is wanted. Plain tars are parsed directly (Python's tarfile spends
    most of a small sample's read time in header objects); compressed ones go through tarfile.

    Args:
        path: the tar file.
        wanted: predicate on the sample index.
    """
    try:
        handle = open(path, "rb")
    except OSError:
        handle = None
    if handle is None:
        if wanted(0):
            yield RawSample(key=os.path.basename(path), index=0, error="unreadable_shard")
        return
    with handle:
        compressed = handle.read(6).startswith(_COMPRESSED)
        handle.seek(0)
        members = _tarfile_members(path) if compressed else _plain_members(handle)
        yield from _group_members(members, wanted, os.path.basename(path))


_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")
_BLOCK = 512


class _BadTar(Exception):
    """A header that does not parse, or member data cut short."""


def _octal(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256 for large values
        return int.from_bytes(field[1:], "big", signed=field[:1] == b"\xff")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise _BadTar("bad number field") from None


def _header_fields(header: bytes) -> tuple[str, int, bytes]:
    """(name, size, type flag) of a 512-byte ustar/gnu header; checks the checksum."""
    stored = _octal(header[148:156])
    if stored != sum(header) - sum(header[148:156]) + 8 * 32:  # the checksum field as spaces
        raise _BadTar("bad header checksum")
    name = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar" and header[345:346] != b"\0":
        name = header[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode("utf-8", "surrogateescape"), _octal(header[124:136]), header[156:157]


def _pax_path(data: bytes) -> Optional[str]:
    """The `path` record of a PAX extended header, if any."""
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
        pos += length
    return None


def _plain_members(f) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(name, read data) of each regular file of an uncompressed tar; raises _BadTar."""
    file_size = os.fstat(f.fileno()).st_size
    long_name = None
    while True:
        header = f.read(_BLOCK)
        if len(header) < _BLOCK:  # a complete tar ends with zero blocks, not mid-stream
            raise _BadTar("file ends without an end-of-archive block")
        if header.count(0) == _BLOCK:
            return
        name, size, kind = _header_fields(header)
        start = f.tell()
        if start + size > file_size:
            raise _BadTar("member data cut short")
        if kind in (b"x", b"L"):  # PAX extended header / GNU long name: applies to the next one
            data = f.read(size)
            long_name = _pax_path(data) if kind == b"x" else data.rstrip(b"\0").decode(
                "utf-8", "surrogateescape")
        elif kind in (b"0", b"\0", b"7"):
            yield long_name or name, lambda start=start, size=size: _read_at(f, start, size)
            long_name = None
        f.seek(start + (size + _BLOCK - 1) // _BLOCK * _BLOCK)


def _read_at(f, start: int, size: int) -> bytes:
    f.seek(start)
    return f.read(size)


def _tarfile_members(path: str) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(name, read data) of each regular file, through tarfile (compressed shards)."""
    try:
        archive = tarfile.open(path, mode="r:*")
    except (tarfile.TarError, OSError) as err:
        raise _BadTar(str(err)) from None
    with archive:
        try:
            for member in archive:
                if member.isfile():
                    yield member.name, lambda member=member: archive.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as err:
            raise _BadTar(str(err)) from None


def _group_members(members, wanted: Callable[[int], bool], shard: str) -> Iterator[RawSample]:
    current: Optional[RawSample] = None
    index = -1
    try:
        for name, read in members:
            key, ext = split_name(name)
            if key is None:
                continue
            if current is None or key != current.key or ext in current.fields:
                if current is not None and wanted(current.index):
                    yield current
                index += 1
                current = RawSample(key=key, index=index)
            current.fields[ext] = read() if wanted(index) else b""
    except (_BadTar, OSError):
        if current is None:
            current = RawSample(key=shard, index=0, error="unreadable_shard")
        else:
            current.error = "truncated_member"
    if current is not None and wanted(current.index):
        yield current


def write_shards(samples, pattern: str, shard_size: int) -> list[str]:
    """Write samples into consecutive tar shards with webdataset's TarWriter.

    Args:
        samples: iterable of dicts with "__key__" and extension -> bytes / str / dict entries.
        pattern: output path with one %-format field for the shard number ("out/%05d.tar").
        shard_size: samples per shard.
    Returns:
        The shard paths written.
    """
    import webdataset as wds

    paths: list[str] = []
    writer = None
    for count, sample in enumerate(samples):
        if count % shard_size == 0:
            if writer is not None:
                writer.close()
            paths.append(pattern % len(paths))
            writer = wds.TarWriter(paths[-1])
        writer.write(sample)
    if writer is not None:
        writer.close()
    return paths
