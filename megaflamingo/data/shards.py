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

    Member data is read only for wanted samples, so skipping ahead is cheap. A truncated member
    ends the shard with one sample carrying error "truncated_member" (if that sample is
    wanted); a file that is not a readable tar yields one sample with error "unreadable_shard"
    at index 0 (if index 0 is wanted).

    Args:
        path: the tar file.
        wanted: predicate on the sample index.
    """
    try:
        archive = tarfile.open(path, mode="r:*")
    except (tarfile.TarError, OSError):
        if wanted(0):
            yield RawSample(key=os.path.basename(path), index=0, error="unreadable_shard")
        return
    with archive:
        yield from _group_members(archive, wanted)


def _group_members(archive: tarfile.TarFile, wanted: Callable[[int], bool]) -> Iterator[RawSample]:
    current: Optional[RawSample] = None
    index = -1
    try:
        for member in archive:
            if not member.isfile():
                continue
            key, ext = split_name(member.name)
            if key is None:
                continue
            if current is None or key != current.key or ext in current.fields:
                if current is not None and wanted(current.index):
                    yield current
                index += 1
                current = RawSample(key=key, index=index)
            data = archive.extractfile(member).read() if wanted(index) else b""
            current.fields[ext] = data
    except (tarfile.TarError, OSError, EOFError):
        if current is None:
            current = RawSample(key="", index=index + 1)
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
