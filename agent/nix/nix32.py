"""Nix's base-32 encoding (not RFC 4648: its own alphabet, least significant bits first)."""

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
_INDEX = {c: i for i, c in enumerate(ALPHABET)}


class Nix32Error(ValueError):
    pass


def encoded_length(nbytes: int) -> int:
    return (nbytes * 8 - 1) // 5 + 1 if nbytes else 0


def encode(data: bytes) -> str:
    out = []
    for n in range(encoded_length(len(data)) - 1, -1, -1):
        b = n * 5
        i, j = divmod(b, 8)
        c = data[i] >> j
        if i + 1 < len(data):
            c |= data[i + 1] << (8 - j)
        out.append(ALPHABET[c & 0x1F])
    return "".join(out)


def decoded_length(nchars: int) -> int:
    return nchars * 5 // 8


def decode(text: str) -> bytes:
    size = decoded_length(len(text))
    if encoded_length(size) != len(text):
        raise Nix32Error(f"invalid nix32 length {len(text)}")
    out = bytearray(size)
    for n, ch in enumerate(reversed(text)):
        digit = _INDEX.get(ch)
        if digit is None:
            raise Nix32Error(f"invalid nix32 character {ch!r}")
        i, j = divmod(n * 5, 8)
        out[i] |= (digit << j) & 0xFF
        carry = digit >> (8 - j)
        if carry:
            if i + 1 >= size:
                raise Nix32Error("nix32 value has bits beyond its length")
            out[i + 1] |= carry
    return bytes(out)
