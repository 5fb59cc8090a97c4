"""narinfo: parse, validate, render, and the fingerprint that signatures cover."""

from dataclasses import dataclass, field, replace

from agent.nix.hashes import Hash, HashError
from agent.nix.storepath import STORE_DIR, StorePath, StorePathError

# Compression name -> file extension after ".nar", as Nix names them.
COMPRESSIONS = {
    "xz": ".xz", "zstd": ".zst", "bzip2": ".bz2", "br": ".br", "gzip": ".gz", "none": "",
}
MAX_NARINFO_BYTES = 1 << 20


class NarInfoError(ValueError):
    pass


@dataclass(frozen=True)
class NarInfo:
    store_path: StorePath
    url: str
    compression: str
    nar_hash: Hash
    nar_size: int
    file_hash: Hash | None = None
    file_size: int | None = None
    references: tuple[StorePath, ...] = ()
    deriver: str | None = None
    sigs: tuple[str, ...] = ()
    ca: str | None = None
    # Fields this code does not know, kept in order so a re-render loses nothing.
    extra: tuple[tuple[str, str], ...] = field(default=())

    @property
    def hash_part(self) -> str:
        return self.store_path.hash_part

    def fingerprint(self, store_dir: str = STORE_DIR) -> bytes:
        refs = ",".join(r.path(store_dir) for r in self.references)
        return (
            f"1;{self.store_path.path(store_dir)};{self.nar_hash.algo}:{self.nar_hash.nix32};"
            f"{self.nar_size};{refs}"
        ).encode()

    def with_file(self, url: str, compression: str, file_hash: Hash, file_size: int) -> "NarInfo":
        return replace(self, url=url, compression=compression, file_hash=file_hash,
                       file_size=file_size)

    def with_sigs(self, sigs: tuple[str, ...]) -> "NarInfo":
        return replace(self, sigs=sigs)

    def render(self, store_dir: str = STORE_DIR) -> str:
        return (f"StorePath: {self.store_path.path(store_dir)}\n"
                + file_fields(self.url, self.compression, self.file_hash, self.file_size)
                + self.render_path_fields())

    def render_path_fields(self) -> str:
        """The lines about the store path itself: everything but StorePath and the file
        fields (which a cache may change when it re-encodes the file)."""
        lines = [
            ("NarHash", str(self.nar_hash)),
            ("NarSize", str(self.nar_size)),
            ("References", " ".join(r.base_name for r in self.references)),
        ]
        if self.deriver:
            lines.append(("Deriver", self.deriver))
        lines += [("Sig", s) for s in self.sigs]
        if self.ca:
            lines.append(("CA", self.ca))
        lines += list(self.extra)
        return "".join(f"{k}: {v}\n" for k, v in lines)


def file_fields(url: str, compression: str, file_hash: Hash | None,
                file_size: int | None) -> str:
    """The narinfo lines about the (compressed) file: URL, Compression, FileHash, FileSize."""
    text = f"URL: {url}\nCompression: {compression}\n"
    if file_hash is not None:
        text += f"FileHash: {file_hash}\n"
    if file_size is not None:
        text += f"FileSize: {file_size}\n"
    return text


def parse(text: str, store_dir: str = STORE_DIR) -> NarInfo:
    if len(text) > MAX_NARINFO_BYTES:
        raise NarInfoError("narinfo is too large")
    fields: dict[str, str] = {}
    sigs: list[str] = []
    extra: list[tuple[str, str]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        key, sep, value = line.partition(": ")
        if not sep:
            key, sep, value = line.partition(":")
        if not sep or not key or any(c.isspace() for c in key):
            raise NarInfoError(f"line {n} is not 'Key: value'")
        value = value.strip()
        if key == "Sig":
            sigs.append(value)
        elif key in _KNOWN:
            if key in fields:
                raise NarInfoError(f"duplicate field {key}")
            fields[key] = value
        else:
            extra.append((key, value))
    for required in ("StorePath", "URL", "NarHash", "NarSize"):
        if required not in fields:
            raise NarInfoError(f"missing field {required}")
    try:
        store_path = StorePath.parse(fields["StorePath"], store_dir)
        refs = tuple(StorePath.from_base_name(r) for r in fields.get("References", "").split())
        nar_hash = Hash.parse(fields["NarHash"])
        file_hash = Hash.parse(fields["FileHash"]) if "FileHash" in fields else None
    except (StorePathError, HashError) as e:
        raise NarInfoError(str(e)) from None
    compression = fields.get("Compression", "bzip2")
    if compression not in COMPRESSIONS:
        raise NarInfoError(f"unknown compression {compression!r}")
    if file_hash is None and compression == "none":
        file_hash = nar_hash
    return NarInfo(
        store_path=store_path,
        url=_url(fields["URL"]),
        compression=compression,
        nar_hash=nar_hash,
        nar_size=_size(fields, "NarSize"),
        file_hash=file_hash,
        file_size=_size(fields, "FileSize") if "FileSize" in fields else None,
        references=refs,
        deriver=fields.get("Deriver") or None,
        sigs=tuple(sigs),
        ca=fields.get("CA") or None,
        extra=tuple(extra),
    )


def parse_for(text: str, hash_part: str, store_dir: str = STORE_DIR) -> NarInfo:
    """A source's answer for `hash_part`: a narinfo of that very path, or NarInfoError."""
    info = parse(text, store_dir)
    if info.hash_part != hash_part:
        raise NarInfoError(f"StorePath {info.store_path} does not match {hash_part}")
    return info


# Anything else (e.g. `System`) is kept in `extra`, so a re-render loses nothing.
_KNOWN = {"StorePath", "URL", "Compression", "FileHash", "FileSize", "NarHash", "NarSize",
          "References", "Deriver", "CA"}


def _size(fields: dict[str, str], key: str) -> int:
    value = fields[key]
    # ASCII only: str.isdigit() also accepts "²" (int() then fails) and other scripts' digits.
    if not (value.isascii() and value.isdigit()) or len(value) > 19:
        raise NarInfoError(f"{key} {value!r} is not a size")
    return int(value)


def _url(value: str) -> str:
    if not value or any(ord(c) < 0x21 for c in value):
        raise NarInfoError(f"bad URL {value!r}")
    return value
