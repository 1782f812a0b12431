"""Training data: text files -> token ids in a memory-mapped cache file -> resumable batches.

- Corpus: any text files or folders (walked recursively).  With none given, the ``.py``
  sources of the Python standard library: a corpus every machine has, so training runs
  anywhere without downloads.
- Tokenizer: byte-level by default (UTF-8 bytes 0..255, plus <|endoftext|> = 256 between
  documents), or an HF ``tokenizers`` tokenizer.json.
- Cache: the token ids of a corpus are written once, streaming file by file, to
  ``<cache_dir>/<key>.bin`` (uint16, or uint32 for vocabularies > 65535) and then read through
  ``numpy.memmap``, so a corpus larger than RAM works.  The key hashes the tokenizer and every
  file's path, size and mtime.  Files are written to a temporary name and renamed (atomic),
  and the ``.json`` metadata is written last: a killed build leaves no half cache behind.  The
  metadata's ``fingerprint`` (blake2b of the token bytes, hashed while they are written) tells
  one token stream from another: a training checkpoint stores it and a resume compares it.
- Split: documents are concatenated in a fixed pseudo-random order (a hash of each path) and
  the last ``val_fraction`` of the token stream is the validation set: deterministic, and a
  mix of documents rather than the alphabetically last ones.
- Batches: the training stream is cut into windows of seqlen + 1 tokens (inputs and shifted
  targets); each epoch visits them in a seeded random order.  ``BatchSampler.state_dict()`` is
  (epoch, index): a checkpoint stores it and a resumed run sees the same batches.
"""
import hashlib
import json
import os
import sysconfig

import numpy as np

from fastlm._io import atomic_open

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", ".git", ".hg", ".svn", "node_modules"}


# --------------------------------------------------------------------------- tokenizers
class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255; <|endoftext|> = 256 separates documents."""

    name = "bytes"
    vocab_size = 257
    eot_id = 256
    identity = "bytes-v1"

    def encode_bytes(self, data):
        return np.frombuffer(data, dtype=np.uint8)

    def encode(self, text):
        return self.encode_bytes(text.encode("utf-8")).astype(np.int64)

    def decode(self, ids):
        ids = [int(i) for i in ids if 0 <= int(i) < 256]
        return bytes(ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """An HF `tokenizers` tokenizer.json (needs the `tokenizers` package)."""

    EOT_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>")

    def __init__(self, path):
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path} (--tokenizer expects a tokenizer.json or its "
                                    "folder)")
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ImportError("a tokenizer.json needs the `tokenizers` package (pip install tokenizers, or "
                              "pip install 'fastlm[hf]')") from e
        try:
            self.tok = Tokenizer.from_file(path)
        except Exception as e:
            raise ValueError(f"could not read tokenizer {path}: {e}") from e
        self.name = path
        # ids can go past get_vocab_size() (a sparse vocab): the model needs an embedding row for the largest
        vocab = self.tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(self.tok.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)
        self.eot_id = next((self.tok.token_to_id(t) for t in self.EOT_NAMES if self.tok.token_to_id(t) is not None), None)
        # Corpus text is data: a literal "<|endoftext|>" in a file must not become a document boundary
        # (HF tokenizers match special tokens even with add_special_tokens=False; tiktoken's encode_ordinary
        # is the same idea).  Prompts (encode) keep HF's parsing, as tokenizer(prompt) does.
        self.corpus_tok = Tokenizer.from_file(path)
        self.corpus_tok.encode_special_tokens = True
        with open(path, "rb") as f:
            self.identity = "hf2-" + hashlib.sha256(f.read()).hexdigest()[:16]  # hf2: special tokens kept as text

    def encode_bytes(self, data):
        ids = self.corpus_tok.encode(data.decode("utf-8", errors="replace"), add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.int64)

    def encode(self, text):
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids):
        return self.tok.decode([int(i) for i in ids])


def load_tokenizer(spec=None):
    """None or "bytes" -> ByteTokenizer; a path to tokenizer.json (or its folder) -> HFTokenizer."""
    if spec in (None, "", "bytes"):
        return ByteTokenizer()
    return HFTokenizer(spec)


# --------------------------------------------------------------------------- corpus files
def stdlib_files():
    """The .py files of the Python standard library (no site-packages)."""
    root = sysconfig.get_paths()["stdlib"]
    return _walk(root, (".py",))


def _walk(root, exts, exclude=frozenset()):
    out = []
    for d, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS and not x.startswith(".")
                         and os.path.realpath(os.path.join(d, x)) not in exclude)
        for f in sorted(files):
            if f.startswith("."):
                continue
            p = os.path.join(d, f)
            if exts is not None and not f.endswith(tuple(exts)):
                continue
            if not os.path.isfile(p):  # FIFOs, sockets, devices, broken links: never opened (a FIFO would block)
                continue
            if exts is None and _is_binary(p):
                continue
            out.append(p)
    return out


def _is_binary(path):
    try:
        with open(path, "rb") as f:
            return b"\0" in f.read(8192)
    except OSError:
        return True


def list_files(paths=None, exts=None, exclude=()):
    """Files of the corpus: `paths` (files and/or folders) or, if None/empty, the stdlib sources.
    Folders in `exclude` (a run's out_dir, the token cache) are skipped inside a given folder, so
    a run's own metrics and caches never become its training data."""
    if not paths:
        files = stdlib_files()
        if not files:
            raise ValueError(f"empty corpus: no .py files under the stdlib folder {sysconfig.get_paths()['stdlib']}")
        return files
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    exclude = frozenset(os.path.realpath(os.fspath(e)) for e in exclude if e)
    files = []
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            files += _walk(p, exts, exclude)
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"corpus path not found: {p}")
    # Overlapping paths (a folder and its subfolder, `data` and `./data`) list a file more than once:
    # keep its first listing, so no document repeats (nor lands in both the train and the val split).
    seen = set()
    return [f for f in files if not ((r := os.path.realpath(f)) in seen or seen.add(r))]


# --------------------------------------------------------------------------- token cache
def default_cache_dir():
    base = os.environ.get("FASTLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fastlm"
    )
    return os.path.join(base, "tokens")


def _doc_order(files):
    """The files in a fixed pseudo-random order (so the validation tail samples the whole corpus,
    not its last folder), keyed on each file's path relative to the corpus root: the same corpus
    gives the same order, and the same train/val split, wherever it lives."""
    absf = [os.path.abspath(f) for f in files]
    root = os.path.commonpath(absf) if len(absf) > 1 else os.path.dirname(absf[0])
    keyed = sorted((hashlib.sha256(os.path.relpath(a, root).encode()).hexdigest(), i) for i, a in enumerate(absf))
    return [files[i] for _, i in keyed]


def _cache_key(files, tokenizer):
    h = hashlib.sha256(f"fastlm-tokens-v1|{tokenizer.identity}".encode())
    for p in sorted(files, key=os.path.abspath):  # (the token stream does not depend on the listing order)
        st = os.stat(p)
        h.update(f"|{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def _atomic_write_text(path, text):
    with atomic_open(path, "w") as f:
        f.write(text)


CHUNK = 16 << 20  # read files in 16 MiB pieces (split at newlines for non-byte tokenizers)


def _read_chunks(path, split_lines):
    with open(path, "rb") as f:
        rest = b""
        while True:
            data = f.read(CHUNK)
            if not data:
                if rest:
                    yield rest
                return
            if not split_lines:
                yield data
                continue
            data = rest + data
            cut = data.rfind(b"\n") + 1
            if cut == 0:  # no newline in a whole chunk: keep reading
                rest = data
                continue
            rest = data[cut:]
            yield data[:cut]


def build_token_cache(files, tokenizer, cache_dir=None, log=None):
    """Tokenize `files` once into a memory-mappable .bin file; returns (bin_path, meta dict)."""
    if not files:
        raise ValueError("empty corpus: no input files")
    cache_dir = cache_dir or default_cache_dir()
    if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):  # (makedirs would say only "File exists")
        raise NotADirectoryError(f"the token cache folder (cache_dir, --cache-dir) {cache_dir} is a file, not a folder")
    os.makedirs(cache_dir, exist_ok=True)
    key = _cache_key(files, tokenizer)
    bin_path, meta_path = os.path.join(cache_dir, key + ".bin"), os.path.join(cache_dir, key + ".json")
    if os.path.exists(meta_path) and os.path.exists(bin_path):
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            # (a cache written before the fingerprint was recorded is rebuilt, so every cache has one)
            if os.path.getsize(bin_path) == meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize and meta["fingerprint"]:
                return bin_path, meta
        except (ValueError, KeyError, OSError):
            pass  # stale, corrupt or without a fingerprint: rebuild
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    byte_level = isinstance(tokenizer, ByteTokenizer)
    if log:
        log(f"tokenizing {len(files)} files into {bin_path}")
    n_tokens = n_docs = 0
    digest = hashlib.blake2b(digest_size=16)  # of the bytes as written: no second pass over the file
    with atomic_open(bin_path, "wb") as out:  # a kill mid-way leaves no partial cache file
        for path in _doc_order(files):
            doc = 0
            for chunk in _read_chunks(path, split_lines=not byte_level):
                ids = tokenizer.encode_bytes(chunk)
                if ids.size and not 0 <= ids.min() <= ids.max() < tokenizer.vocab_size:  # never wrap in astype
                    raise ValueError(f"tokenizer {tokenizer.name} produced ids outside [0, {tokenizer.vocab_size}) "
                                     f"(its vocab_size) for {path}: min {ids.min()}, max {ids.max()}")
                b = ids.astype(dtype).tobytes()
                out.write(b)
                digest.update(b)
                doc += len(ids)
            if doc and tokenizer.eot_id is not None:
                b = np.asarray([tokenizer.eot_id], dtype=dtype).tobytes()
                out.write(b)
                digest.update(b)
                doc += 1
            n_tokens += doc
            n_docs += doc > 0
        if n_tokens == 0:
            raise ValueError(f"empty corpus: the {len(files)} input file(s) contain no text (e.g. {files[0]})")
    meta = dict(key=key, n_tokens=n_tokens, n_docs=n_docs, n_files=len(files), dtype=np.dtype(dtype).name,
                tokenizer=tokenizer.identity, vocab_size=tokenizer.vocab_size, fingerprint=digest.hexdigest())
    _atomic_write_text(meta_path, json.dumps(meta))
    return bin_path, meta


class TokenData:
    """The memory-mapped token stream of a corpus, split into train and validation."""

    def __init__(self, paths=None, tokenizer=None, cache_dir=None, val_fraction=0.01, exts=None, log=None,
                 exclude=()):
        """exclude: folders never read as corpus (the token cache always is; train adds its out_dir)."""
        if not 0.0 <= val_fraction < 1.0:  # before any tokenizing or cache folder
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.tokenizer = tokenizer or ByteTokenizer()
        cache_dir = cache_dir or default_cache_dir()
        files = list_files(paths, exts, exclude=(cache_dir, *exclude))
        if not files:
            raise ValueError(f"empty corpus: no files found in {paths}")
        self.bin_path, self.meta = build_token_cache(files, self.tokenizer, cache_dir, log=log)
        self.tokens = np.memmap(self.bin_path, dtype=np.dtype(self.meta["dtype"]), mode="r")
        n = len(self.tokens)
        n_val = int(n * val_fraction)
        self.train = self.tokens[: n - n_val]
        self.val = self.tokens[n - n_val :]

    def __len__(self):
        return len(self.tokens)


# --------------------------------------------------------------------------- batches
class BatchSampler:
    """Global batches of (seqlen + 1)-token windows in a seeded random order per epoch.

    Window w holds tokens[w * seqlen : w * seqlen + seqlen + 1]; inputs are its first seqlen
    tokens and targets its last seqlen.  State (epoch, index) resumes the exact sequence.
    """

    def __init__(self, tokens, seqlen, seed=0, name="train"):
        self.tokens, self.seqlen, self.seed = tokens, seqlen, seed
        self.n_windows = (len(tokens) - 1) // seqlen
        if self.n_windows < 1:
            raise ValueError(
                f"the {name} split has {len(tokens)} tokens, fewer than seqlen + 1 = {seqlen + 1}: "
                "use more data, a shorter seqlen, or a different val_fraction"
            )
        self.epoch, self.index = 0, 0
        self._perm_epoch, self._perm = None, None

    def _order(self, epoch):
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._perm_epoch = epoch
        return self._perm

    def next_indices(self, batch_size):
        """Window indices of the next global batch (advances the state)."""
        out = np.empty(batch_size, dtype=np.int64)
        for i in range(batch_size):
            if self.index >= self.n_windows:
                self.epoch, self.index = self.epoch + 1, 0
            out[i] = self._order(self.epoch)[self.index]
            self.index += 1
        return out

    def fetch(self, indices):
        """(len(indices), seqlen + 1) int64 array of the windows."""
        T = self.seqlen
        return np.stack([np.asarray(self.tokens[w * T : w * T + T + 1], dtype=np.int64) for w in indices])

    def state_dict(self):
        return {"epoch": int(self.epoch), "index": int(self.index), "seed": int(self.seed), "n_windows": int(self.n_windows)}

    def load_state_dict(self, state):
        if state.get("n_windows", self.n_windows) != self.n_windows:
            raise ValueError(
                f"checkpoint data position was saved for {state['n_windows']} windows but this corpus/seqlen has "
                f"{self.n_windows}: resume with the same data, tokenizer and seqlen"
            )
        self.epoch, self.index, self.seed = int(state["epoch"]), int(state["index"]), int(state["seed"])


def eval_windows(n_windows, count):
    """`count` window indices spread evenly over a split (repeats if the split is small)."""
    if count <= n_windows:
        return np.linspace(0, n_windows - 1, count).round().astype(np.int64)
    return np.arange(count, dtype=np.int64) % n_windows
