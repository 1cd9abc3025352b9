"""The token shards of one directory read as one stream, through a bounded set of open files.

data_prep cuts a corpus's token stream into shards at fixed sizes, mid-document, so the
shards taken in name order are one stream and a position in it is a plain token offset.
A read may continue from one shard into the next. Reads use `os.pread` on file descriptors
kept in a small LRU (at most `max_open` per stream): a corpus of thousands of shards never
holds thousands of descriptors, which memory-mapping every shard did (one descriptor per
map; a process under `ulimit -n 512` failed at 1,307 shards). pread has no shared file
offset, so a forked DataLoader worker may use descriptors it inherited; pickling (spawn)
drops them and the copy opens its own.
"""
from __future__ import annotations

import bisect
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from data_prep.shards import HEADER_SIZE, ShardFormatError, ShardHeader

DEFAULT_MAX_OPEN = 32


class ShardStream:
    """Shards (with their headers) as one stream of tokens; `read(start, n)` gives int64 ids."""

    def __init__(self, shards: list[tuple[Path, ShardHeader]], max_open: int = DEFAULT_MAX_OPEN):
        if max_open < 1:
            raise ValueError(f"max_open must be at least 1, got {max_open}")
        kept = [(Path(p), h) for p, h in shards if h.num_tokens > 0]  # an empty shard holds no position
        self.paths = [p for p, _ in kept]
        self.dtypes = [h.dtype for _, h in kept]
        self.ends = np.cumsum([h.num_tokens for _, h in kept], dtype=np.int64).tolist()
        self.num_tokens = self.ends[-1] if self.ends else 0
        self.max_open = max_open
        self._open: OrderedDict[int, int] = OrderedDict()  # shard number -> descriptor, oldest first

    def read(self, start: int, length: int) -> np.ndarray:
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) are outside the stream's {self.num_tokens}")
        out = np.empty(length, dtype=np.int64)
        shard, done = bisect.bisect_right(self.ends, start), 0
        while done < length:
            begin = self.ends[shard - 1] if shard else 0
            offset = start + done - begin
            n = min(length - done, self.ends[shard] - begin - offset)
            dtype = self.dtypes[shard]
            size = n * dtype.itemsize
            data = os.pread(self._descriptor(shard), size, HEADER_SIZE + offset * dtype.itemsize)
            if len(data) != size:
                raise ShardFormatError(f"{self.paths[shard]}: read {len(data)} of {size} bytes at token {offset}; "
                                       f"the shard is shorter than its header says (changed during the run?)")
            out[done:done + n] = np.frombuffer(data, dtype=dtype)
            done += n
            shard += 1
        return out

    def open_files(self) -> int:
        return len(self._open)

    def _descriptor(self, shard: int) -> int:
        fd = self._open.get(shard)
        if fd is not None:
            self._open.move_to_end(shard)
            return fd
        if len(self._open) >= self.max_open:
            os.close(self._open.popitem(last=False)[1])
        fd = os.open(self.paths[shard], os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._open[shard] = fd
        return fd

    def close(self) -> None:
        while self._open:
            os.close(self._open.popitem()[1])

    def __del__(self):
        # Interpreter shutdown may have torn down os already; then the OS closes them anyway.
        if getattr(self, "_open", None) and os is not None:
            self.close()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()
        return state
