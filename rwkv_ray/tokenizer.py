"""RWKV "World" tokenizer (vocab ``rwkv_vocab_v20230424``), pure Python + numpy.

The tokenization is a greedy longest byte-prefix match over the UTF-8 bytes of the text,
exactly like the official ``rwkv.rwkv_tokenizer.TRIE_TOKENIZER``. Every byte 0..255 is a
token, so every input is encodable; id 0 is padding / end-of-text and is not in the file.

Speed: instead of walking a Python trie byte by byte, the vocab trie is compiled once into
a single regular expression over bytes, e.g. for the tokens {a, ab, abc, b, bd, bde}::

    a(?:bc?|)|b(?:de?|)     (childless siblings are also merged into one class)

Sibling alternatives start with distinct bytes, so at most one of them can match; a
child's continuation is optional (``?`` or an empty alternative) only where the node is
itself a token, so the C ``re`` engine, which tries the deeper branch first and backtracks,
returns exactly the longest prefix that is a token. ``findall`` then yields the token byte
strings, which a dict maps to ids. The compiled tables are cached per vocab file for the process.
"""

from __future__ import annotations

import ast
import os
import re
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np

VOCAB_FILENAME = "rwkv_vocab_v20230424.txt"
DEFAULT_VOCAB_PATH = Path(__file__).resolve().parent / "assets" / VOCAB_FILENAME

# Embedding rows of the RWKV World models: the 65,529 vocab entries plus id 0, rounded up.
VOCAB_SIZE = 65536
PAD_ID = 0

# Bytes that are regex metacharacters (the same set `re.escape` uses); all other bytes,
# including control and non-ASCII bytes, stand for themselves in a bytes pattern.
_SPECIAL = frozenset(b"()[]{}?*+-|^$\\.&~# \t\n\r\v\f")
_LIT = [b"\\" + bytes([b]) if b in _SPECIAL else bytes([b]) for b in range(256)]


def _parse_token(body: str) -> str | bytes:
    """Parse the Python repr of one vocab entry (``'abc'``, ``"it's"`` or ``b'\\xff'``)."""
    # Fast path: a quoted str repr without backslashes is its own content; this is most of
    # the file and skips ~65k `literal_eval` calls (about 0.6 s).
    if len(body) >= 2 and body[0] == body[-1] and body[0] in "'\"" and "\\" not in body:
        inner = body[1:-1]
        if body[0] not in inner:
            return inner
    value = ast.literal_eval(body)  # safe: literals only, unlike the official eval()
    if not isinstance(value, str | bytes):
        raise ValueError(f"expected a str or bytes literal, got {type(value).__name__}")
    return value


def load_vocab(path: str | os.PathLike) -> dict[int, bytes]:
    """Read a vocab file of lines ``id repr(str|bytes) byte_len`` into ``{id: token}``."""
    vocab: dict[int, bytes] = {}
    seen: set[bytes] = set()
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.rstrip("\n")
            if not line.strip():
                continue
            try:
                head, rest = line.split(" ", 1)
                body, length = rest.rsplit(" ", 1)
                idx = int(head)
                value = _parse_token(body)
                token = value.encode("utf-8") if isinstance(value, str) else value
                if len(token) != int(length):
                    raise ValueError(f"byte length {len(token)} != declared {length}")
                if idx <= PAD_ID or idx >= VOCAB_SIZE or idx in vocab:
                    raise ValueError(f"id {idx} is reserved, out of range or repeated")
                if not token or token in seen:
                    raise ValueError(f"empty or repeated token {token!r}")
            except (ValueError, SyntaxError) as e:
                raise ValueError(f"{path}:{lineno}: bad vocab line {line!r}: {e}") from e
            vocab[idx] = token
            seen.add(token)
    missing = set(range(256)) - {t[0] for t in vocab.values() if len(t) == 1}
    if missing:
        # Without every single byte some inputs would be unencodable.
        raise ValueError(f"{path}: vocab lacks single-byte tokens for {sorted(missing)[:8]}")
    return vocab


# Children of one trie node are tried in order by `re` (a literal mismatch is skipped
# cheaply, but each skip still reads the alternative's header, which lies after the whole
# previous subtree in the compiled code). Nodes with many children (the root has 256) are
# therefore split into buckets of this many, each behind a lookahead character class, so a
# rare byte costs a few class tests instead of up to 255 skips. Bucketing the root gave
# 1.1-1.4x on code, emoji and non-vocab Unicode; the exact sizes matter little (+-5%).
_BUCKET = 32
_BUCKET_MIN_CHILDREN = 64


def _char_class(lits: Sequence[bytes]) -> bytes:
    return lits[0] if len(lits) == 1 else b"[" + b"".join(lits) + b"]"


def _children(tokens: Sequence[bytes], depth: int) -> list[tuple[int, Sequence[bytes]]]:
    """Split a sorted run of tokens into one group per byte at ``depth`` (a trie child)."""
    groups: list[tuple[int, Sequence[bytes]]] = []
    i, n = 0, len(tokens)
    while i < n:
        b, j = tokens[i][depth], i + 1
        while j < n and tokens[j][depth] == b:
            j += 1
        groups.append((b, tokens[i:j]))
        i = j
    # Children with the most tokens below them first: a proxy for how often they occur.
    groups.sort(key=lambda g: -len(g[1]))
    return groups


def _trie_pattern(tokens: Sequence[bytes], depth: int = 0) -> tuple[bytes, str]:
    """Regex for ``tokens`` (sorted, sharing their first ``depth`` bytes) minus that prefix.

    Returns the pattern and its kind: "atom" (one literal or class), "seq" (a
    concatenation) or "alt" (a top-level alternation), which decides how callers wrap it.
    """
    items: list[tuple[bytes, list[bytes]]] = []  # (branch, its first-byte literals)
    leaves: list[bytes] = []
    for b, group in _children(tokens, depth):
        lit = _LIT[b]
        is_token = len(group[0]) == depth + 1  # sorted: the node itself comes first
        below = group[1:] if is_token else group
        if not below:
            leaves.append(lit)
            continue
        sub, kind = _trie_pattern(below, depth + 1)
        if is_token and kind == "atom":
            branch = lit + sub + b"?"
        elif is_token:
            # The empty alternative makes the deeper match optional; `(?:x|)` runs faster
            # in `re` than `(?:x)?`, which compiles to a REPEAT with extra bookkeeping.
            branch = lit + b"(?:" + sub + b"|)"
        else:
            branch = lit + (b"(?:" + sub + b")" if kind == "alt" else sub)
        items.append((branch, [lit]))
    if leaves:
        # Childless tokens collapse into one class, tested first: one bitmap lookup.
        items.insert(0, (_char_class(leaves), leaves))
    if len(items) == 1:
        return items[0][0], ("atom" if leaves else "seq")
    if (depth == 0 and len(items) > _BUCKET) or len(items) >= _BUCKET_MIN_CHILDREN:
        buckets = []
        for k in range(0, len(items), _BUCKET):
            chunk = items[k : k + _BUCKET]
            firsts = _char_class([lit for _, lits in chunk for lit in lits])
            buckets.append(b"(?=" + firsts + b")(?:" + b"|".join(br for br, _ in chunk) + b")")
        return b"|".join(buckets), "alt"
    return b"|".join(br for br, _ in items), "alt"


def compile_trie_regex(tokens: Iterable[bytes]) -> re.Pattern[bytes]:
    """Compile tokens into a bytes regex whose ``findall`` is the greedy longest-match split.

    The split is gapless only if every single byte is a token (true of the World vocab);
    otherwise ``findall`` skips bytes that start no token.

    Nesting depth equals the longest token (128 bytes in the World vocab), well inside the
    recursion limits of ``re``'s parser and compiler.
    """
    ordered = sorted(set(tokens))
    if not ordered or b"" in ordered:
        raise ValueError("tokens must be non-empty byte strings")
    return re.compile(_trie_pattern(ordered)[0])


class _Tables(NamedTuple):
    id_to_token: dict[int, bytes]
    token_to_id: dict[bytes, int]
    regex: re.Pattern[bytes]


# Building the regex costs ~2 s (mostly `re`'s pure-Python parser), so tables are shared by
# every tokenizer of the same file in this process; the key notices an edited file.
_CACHE: dict[tuple[str, int, int], _Tables] = {}
_CACHE_LOCK = threading.Lock()


def _load_tables(path: Path) -> _Tables:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _CACHE_LOCK:
        tables = _CACHE.get(key)
        if tables is None:
            vocab = load_vocab(path)
            token_to_id = {tok: idx for idx, tok in vocab.items()}
            # Pad decodes to nothing, so generated ids can be decoded with their padding.
            id_to_token = {PAD_ID: b"", **vocab}
            tables = _Tables(id_to_token, token_to_id, compile_trie_regex(token_to_id))
            _CACHE[key] = tables
    return tables


class WorldTokenizer:
    """Tokenizer of the RWKV World models (exactly matches the official TRIE_TOKENIZER).

    >>> tok = WorldTokenizer()
    >>> tok.encode("Hello world")
    [33155, 40213]
    >>> tok.decode([33155, 40213])
    'Hello world'
    """

    vocab_size: int = VOCAB_SIZE
    pad_id: int = PAD_ID

    def __init__(self, vocab_path: str | os.PathLike | None = None) -> None:
        self._custom_path = vocab_path is not None
        self.vocab_path = Path(vocab_path) if vocab_path is not None else DEFAULT_VOCAB_PATH
        tables = _load_tables(self.vocab_path)
        self._id_to_token = tables.id_to_token
        self._token_to_id = tables.token_to_id
        self._findall = tables.regex.findall

    def __reduce__(self) -> tuple[type[WorldTokenizer], tuple[str | None]]:
        # Pickle (e.g. to Ray workers) by path, not as MBs of tables plus a regex that would
        # be recompiled anyway; the packaged vocab resolves on the receiving side.
        return type(self), (str(self.vocab_path) if self._custom_path else None,)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_path={str(self.vocab_path)!r})"

    def __len__(self) -> int:
        """Number of real tokens in the vocab file (pad excluded)."""
        return len(self._token_to_id)

    # ---- encoding -------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (its UTF-8 bytes); no pad / end-of-text id is added."""
        if not isinstance(text, str):
            raise TypeError(f"encode() expects str, got {type(text).__name__}")
        # Strict UTF-8, like the official tokenizer: a lone surrogate raises
        # UnicodeEncodeError (a ValueError) instead of being silently altered.
        return self.encode_bytes(text.encode("utf-8"))

    def encode_bytes(self, data: bytes | bytearray | memoryview) -> list[int]:
        """Token ids of raw bytes (any bytes: every single byte is a token)."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"encode_bytes() expects bytes, got {type(data).__name__}")
        # The regex matches at every position (all 256 bytes are alternatives), so findall
        # returns a gapless split of `data`.
        return list(map(self._token_to_id.__getitem__, self._findall(data)))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` of each text."""
        if isinstance(texts, str | bytes):
            # A bare string is a Sequence too; encoding it per character is never intended.
            raise TypeError("encode_batch() expects a sequence of str, got a single str/bytes")
        return [self.encode(t) for t in texts]

    # ---- decoding -------------------------------------------------------------------

    def decode_bytes(self, ids: Iterable[int] | np.ndarray) -> bytes:
        """Concatenated bytes of ``ids`` (pad id 0 decodes to nothing)."""
        if not isinstance(ids, np.ndarray) and hasattr(ids, "__array__"):
            ids = np.asarray(ids)  # a JAX / torch / TF array of ids
        if isinstance(ids, np.ndarray):
            if ids.dtype.kind not in "iu":
                raise TypeError(f"decode expects integer ids, got an array of {ids.dtype}")
            ids = ids.ravel().tolist()  # python ints: much faster dict lookups
        elif isinstance(ids, int | np.integer):
            ids = [ids]
        elif not isinstance(ids, list | tuple):
            ids = list(ids)  # a generator could not be re-read by the error path below
        table = self._id_to_token
        try:
            return b"".join(map(table.__getitem__, ids))
        except (KeyError, TypeError):
            pass
        for i in ids:  # slow path, only to name the offending id
            if isinstance(i, bool) or not isinstance(i, int | np.integer):
                raise TypeError(f"token ids must be integers, got {type(i).__name__}: {i!r}")
            if int(i) not in table:
                raise ValueError(f"unknown token id {int(i)} (vocab ids are 0..{len(self)})")
        raise AssertionError("unreachable")  # pragma: no cover

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of ``ids``; invalid UTF-8 (e.g. a cut multi-byte char) becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ---- batching -------------------------------------------------------------------

    def pad_left(
        self,
        batch: Sequence[Sequence[int]],
        length: int | None = None,
        *,
        truncate: Literal["left", "error"] = "left",
    ) -> np.ndarray:
        """Left-pad rows with ``pad_id`` into an int32 array ``[len(batch), length]``.

        ``length`` defaults to the longest row. A longer row keeps its last ``length``
        tokens (``truncate="left"``: the most recent context) or raises (``"error"``).
        Left padding keeps every row's last token in the last column, which is where
        generation continues.
        """
        if truncate not in ("left", "error"):
            raise ValueError(f"truncate must be 'left' or 'error', got {truncate!r}")
        rows = [r.tolist() if isinstance(r, np.ndarray) else list(r) for r in batch]
        if length is None:
            length = max((len(r) for r in rows), default=0)
        elif isinstance(length, bool) or not isinstance(length, int | np.integer) or length < 0:
            raise ValueError(f"length must be a non-negative int, got {length!r}")
        length = int(length)
        out = np.full((len(rows), length), self.pad_id, dtype=np.int32)
        for i, row in enumerate(rows):
            if len(row) > length:
                if truncate == "error":
                    raise ValueError(f"row {i} has {len(row)} tokens > length {length}")
                row = row[len(row) - length :]
            if row:
                ids = np.asarray(row)
                if ids.dtype.kind not in "iu":  # floats would be truncated, bools taken as 0/1
                    raise TypeError(f"row {i}: token ids must be integers, got {ids.dtype}")
                low, high = int(ids.min()), int(ids.max())
                if low < 0 or high > np.iinfo(np.int32).max:
                    bad = low if low < 0 else high
                    raise ValueError(f"row {i}: token id {bad} is outside 0..2**31-1")
                out[i, length - len(row) :] = ids
        return out
