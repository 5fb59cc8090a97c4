"""The NAR format: a streaming reader (feed chunks, get events or a `.ls` listing) and a writer.

A NAR is `nix-archive-1` then one node, each string a u64 little-endian length, the bytes, and
zero padding to a multiple of 8:

    ( type regular [executable ""] contents <bytes> )
    ( type symlink target <text> )
    ( type directory entry ( name <n> node <node> ) ... )

Directory entries are strictly sorted by name (bytes), and names are never empty, `.`, `..`,
or contain `/` or NUL. The reader checks all of that, and that nothing follows the root node.
"""

import json
import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAGIC = b"nix-archive-1"
# Longest token or name/target accepted (contents are streamed and may be of any size).
MAX_STRING = 1 << 16
MAX_DEPTH = 256


class NarFormatError(ValueError):
    pass


# --- events ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Directory:
    path: tuple[str, ...]


@dataclass(frozen=True)
class Symlink:
    path: tuple[str, ...]
    target: str


@dataclass(frozen=True)
class File:
    """A regular file starts; its bytes follow as Data events, at `offset` in the NAR."""
    path: tuple[str, ...]
    size: int
    executable: bool
    offset: int


@dataclass(frozen=True)
class Data:
    path: tuple[str, ...]
    data: bytes


Event = Directory | Symlink | File | Data


# --- reader ----------------------------------------------------------------------------------

class _Need(Exception):
    """Not enough bytes buffered yet; retry once more arrive."""


class NarReader:
    """Incremental NAR parser: `feed(chunk)` yields events as soon as they are complete;
    `finish()` checks the archive ended exactly at the end of the root node. With
    `contents=False` file bytes are skipped, not copied, and no Data events are made (a
    listing needs only the structure)."""

    def __init__(self, contents: bool = True) -> None:
        self._contents_wanted = contents
        self._buf = bytearray()
        self._pos = 0  # absolute offset of _buf[0] in the NAR
        self._done = False
        # The parser is a stack of pending steps (generators would not survive a partial read
        # with bounded buffering, so state is explicit).
        self._stack: list[_Frame] = [_Frame("archive", ())]
        self._file_left = 0
        self._file_pad = 0
        self._file_path: tuple[str, ...] = ()

    @property
    def offset(self) -> int:
        """Bytes consumed so far."""
        return self._pos

    def feed(self, chunk: bytes) -> Iterator[Event]:
        view = memoryview(chunk)
        if not self._contents_wanted and self._file_left and not self._buf:
            skipped = min(self._file_left, len(view))  # the bulk of a NAR: never buffered
            self._file_left -= skipped
            self._pos += skipped
            view = view[skipped:]
        self._buf += view
        while True:
            try:
                event = self._step()
            except _Need:
                return
            if event is not None:
                yield event

    def finish(self) -> None:
        if not self._done:
            raise NarFormatError(f"truncated NAR: ends at byte {self._pos + len(self._buf)} "
                                 f"inside {self._where()}")
        if self._buf:
            raise NarFormatError(f"{len(self._buf)} bytes of trailing data after the NAR")

    # --- low-level reads (raise _Need without consuming when short) ---

    def _take(self, n: int) -> bytes:
        if len(self._buf) < n:
            raise _Need
        out = bytes(self._buf[:n])
        del self._buf[:n]
        self._pos += n
        return out

    def _peek_string(self, limit: int = MAX_STRING) -> bytes:
        if len(self._buf) < 8:
            raise _Need
        (n,) = struct.unpack_from("<Q", self._buf)
        if n > limit:
            raise NarFormatError(f"string of {n} bytes at offset {self._pos} is too long")
        padded = 8 + n + (-n % 8)
        if len(self._buf) < padded:
            raise _Need
        if any(self._buf[8 + n:padded]):
            raise NarFormatError(f"non-zero padding after string at offset {self._pos}")
        value = bytes(self._buf[8:8 + n])
        del self._buf[:padded]
        self._pos += padded
        return value

    def _expect(self, token: bytes) -> None:
        at = self._pos
        got = self._peek_string()
        if got != token:
            raise NarFormatError(f"expected {token.decode()!r} at offset {at}, got {got!r:.80}")

    # --- the state machine ---

    def _where(self) -> str:
        path = self._stack[-1].path if self._stack else ()
        return "/" + "/".join(path)

    def _step(self) -> Event | None:
        if self._file_left or self._file_pad:
            return self._contents()
        if not self._stack:
            if self._buf:
                raise NarFormatError(f"trailing data at offset {self._pos} after the NAR")
            raise _Need
        frame = self._stack[-1]
        return getattr(self, f"_state_{frame.state}")(frame)

    def _contents(self) -> Event | None:
        if self._file_left:
            n = min(self._file_left, len(self._buf))
            if n == 0:
                raise _Need
            self._file_left -= n
            if not self._contents_wanted:
                del self._buf[:n]
                self._pos += n
                return None
            return Data(self._file_path, self._take(n))
        pad = self._take(self._file_pad)
        self._file_pad = 0
        if any(pad):
            raise NarFormatError(f"non-zero padding after file contents at offset {self._pos}")
        return None

    def _state_archive(self, frame: "_Frame") -> None:
        self._expect(MAGIC)
        frame.state = "end"
        self._stack.append(_Frame("node", ()))

    def _state_end(self, frame: "_Frame") -> None:
        self._stack.pop()
        self._done = True

    def _state_node(self, frame: "_Frame") -> Event | None:
        if len(frame.path) > MAX_DEPTH:
            raise NarFormatError(f"directories nested deeper than {MAX_DEPTH}")
        self._need_tokens(3)
        self._expect(b"(")
        self._expect(b"type")
        at = self._pos
        kind = self._peek_string()
        if kind == b"regular":
            frame.state = "regular"
            return None
        if kind == b"symlink":
            frame.state = "symlink"
            return None
        if kind == b"directory":
            frame.state = "dir_entry"
            return Directory(frame.path)
        raise NarFormatError(f"unknown node type {kind!r:.40} at offset {at}")

    def _state_regular(self, frame: "_Frame") -> Event | None:
        # Check the whole header is buffered first, so a short read never half-consumes it.
        first = self._peek_first()
        executable = first == b"executable"
        if not executable and first != b"contents":
            raise NarFormatError(f"expected 'contents' at offset {self._pos}, got {first!r:.80}")
        self._need_tokens(3 if executable else 1, extra=8)
        if executable:
            self._expect(b"executable")
            self._expect(b"")
            self._expect(b"contents")
        else:
            self._expect(b"contents")
        size = struct.unpack("<Q", self._take(8))[0]
        frame.state = "close"
        self._file_path, self._file_left, self._file_pad = frame.path, size, -size % 8
        return File(frame.path, size, executable, self._pos)

    def _state_symlink(self, frame: "_Frame") -> Event:
        self._need_tokens(2)
        self._expect(b"target")
        target = self._peek_string(4096)
        if not target or b"\0" in target:
            raise NarFormatError(f"bad symlink target {target!r:.80} at {self._where()}")
        frame.state = "close"
        return Symlink(frame.path, _text(target, "symlink target"))

    def _state_close(self, frame: "_Frame") -> None:
        self._expect(b")")
        self._stack.pop()

    def _state_dir_entry(self, frame: "_Frame") -> None:
        token = self._peek_first()
        if token == b")":
            self._expect(b")")
            self._stack.pop()
            return
        if token != b"entry":
            raise NarFormatError(f"expected 'entry' or ')' at offset {self._pos}, "
                                 f"got {token!r:.80}")
        self._need_tokens(5)
        self._expect(b"entry")
        self._expect(b"(")
        self._expect(b"name")
        at = self._pos
        name = self._peek_string(255)
        _check_name(name, at)
        if frame.last is not None and name <= frame.last:
            what = "duplicate" if name == frame.last else "unsorted"
            raise NarFormatError(f"{what} directory entry {name!r} after {frame.last!r} at "
                                 f"offset {at}")
        frame.last = name
        self._expect(b"node")
        frame.state = "entry_close"
        self._stack.append(_Frame("node", (*frame.path, _text(name, "name"))))

    def _state_entry_close(self, frame: "_Frame") -> None:
        self._expect(b")")
        frame.state = "dir_entry"

    def _need_tokens(self, count: int, extra: int = 0) -> None:
        """Check `count` strings (then `extra` bytes) are buffered, so a multi-token step
        never half-runs."""
        off = 0
        for _ in range(count):
            if len(self._buf) < off + 8:
                raise _Need
            (n,) = struct.unpack_from("<Q", self._buf, off)
            if n > MAX_STRING:
                raise NarFormatError(f"string of {n} bytes at offset {self._pos + off} is too "
                                     "long")
            off += 8 + n + (-n % 8)
        if len(self._buf) < off + extra:
            raise _Need

    def _peek_first(self) -> bytes:
        """The first buffered string's bytes, without consuming (padding unchecked)."""
        self._need_tokens(1)
        (n,) = struct.unpack_from("<Q", self._buf)
        return bytes(self._buf[8:8 + n])


@dataclass
class _Frame:
    state: str
    path: tuple[str, ...]
    last: bytes | None = None


def _check_name(name: bytes, at: int) -> None:
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise NarFormatError(f"invalid directory entry name {name!r} at offset {at}")


def _text(raw: bytes, what: str) -> str:
    # Store paths hold UTF-8 names in practice; surrogateescape keeps any bytes round-trippable.
    return raw.decode("utf-8", "surrogateescape")


# --- listings --------------------------------------------------------------------------------

class Listing:
    """Builds Nix's `.ls` JSON shape from events as a reader yields them (Data is skipped)."""

    def __init__(self) -> None:
        self.root: dict[str, Any] | None = None

    def add(self, event: Event) -> None:
        if isinstance(event, Data):
            return
        if isinstance(event, Directory):
            node: dict[str, Any] = {"type": "directory", "entries": {}}
        elif isinstance(event, Symlink):
            node = {"type": "symlink", "target": event.target}
        else:
            node = {"type": "regular", "size": event.size, "narOffset": event.offset}
            if event.executable:
                node["executable"] = True
        if not event.path:
            self.root = node
            return
        assert self.root is not None
        parent = self.root
        for part in event.path[:-1]:
            parent = parent["entries"][part]
        parent["entries"][event.path[-1]] = node

    def result(self) -> dict[str, Any]:
        if self.root is None:
            raise NarFormatError("empty NAR")
        return self.root


def listing(events: Iterator[Event]) -> dict[str, Any]:
    """Nix's `.ls` JSON shape from a stream of events."""
    builder = Listing()
    for event in events:
        builder.add(event)
    return builder.result()


def listing_file(root: dict[str, Any]) -> bytes:
    """The `<hash>.ls` document a binary cache serves (as Nix writes with write-nar-listing)."""
    return json.dumps({"version": 1, "root": root}, separators=(",", ":")).encode()


class ListingReader:
    """Feed a NAR's bytes, get its listing: a NarReader and a Listing together."""

    def __init__(self) -> None:
        self._reader = NarReader(contents=False)
        self._listing = Listing()

    def feed(self, chunk: bytes) -> None:
        for event in self._reader.feed(chunk):
            self._listing.add(event)

    def result(self) -> dict[str, Any]:
        self._reader.finish()
        return self._listing.result()


def list_nar(data: bytes, chunk: int = 1 << 16) -> dict[str, Any]:
    """Parse a whole NAR (fed in `chunk`-sized pieces) into its listing."""
    reader = ListingReader()
    for i in range(0, len(data), chunk):
        reader.feed(data[i:i + chunk])
    return reader.result()


# --- writer ----------------------------------------------------------------------------------

def _str(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data + b"\0" * (-len(data) % 8)


def _tokens(*items: bytes) -> bytes:
    return b"".join(_str(i) for i in items)


def build(tree: Any) -> bytes:
    """A NAR from a tree: bytes (a file), ("x", bytes) (an executable file), ("link", target),
    or a dict name -> tree (a directory; names are sorted here, as `nix-store --dump` does)."""
    return _str(MAGIC) + _node(tree)


def _node(tree: Any) -> bytes:
    if isinstance(tree, bytes):
        return _tokens(b"(", b"type", b"regular", b"contents", tree, b")")
    if isinstance(tree, tuple) and tree[0] == "x":
        return _tokens(b"(", b"type", b"regular", b"executable", b"", b"contents", tree[1],
                       b")")
    if isinstance(tree, tuple) and tree[0] == "link":
        return _tokens(b"(", b"type", b"symlink", b"target", tree[1].encode(), b")")
    if isinstance(tree, dict):
        out = [_tokens(b"(", b"type", b"directory")]
        for name in sorted(tree, key=lambda n: n.encode("utf-8", "surrogateescape")):
            out.append(_tokens(b"entry", b"(", b"name",
                               name.encode("utf-8", "surrogateescape"), b"node"))
            out.append(_node(tree[name]))
            out.append(_str(b")"))
        return b"".join(out) + _str(b")")
    raise TypeError(f"not a NAR tree: {tree!r:.80}")


def tree_of(path: Path) -> Any:
    """The `build` tree of a file, symlink or directory on disk."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return ("link", os.readlink(path))
    if stat.S_ISDIR(st.st_mode):
        return {child.name: tree_of(child) for child in Path(path).iterdir()}
    data = Path(path).read_bytes()
    return ("x", data) if st.st_mode & 0o100 else data


def dump(path: Path) -> bytes:
    """`nix-store --dump path`, in Python."""
    return build(tree_of(path))
