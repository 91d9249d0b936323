"""Reading and writing ``.npy`` files safely: reading never executes code, writing never leaves half a file.

The seed stores its strategy, width-mask and bias files as ``np.save`` of a dict, i.e. a pickle. A pickle can
run any code when loaded, so :func:`load_npy` parses the ``.npy`` header as a literal and unpickles the payload
with a restricted unpickler that admits numpy arrays, dtypes, scalars and plain containers only; anything else is
refused with one :class:`UsageError` naming the file. :func:`save_npy` writes atomically.

A name ending in ``.gz`` (``strategy.npy.gz``) is the same file gzip-compressed, read and written as such (the
shipped Qwen2.5-Coder-1.5B strategy: 10.4 MB as ``.npy``, 0.65 MB compressed).
"""

from __future__ import annotations

import ast
import builtins
import collections
import contextlib
import gzip
import io
import os
import pickle
from pathlib import Path
from typing import Any, Optional

import numpy as np

from amoeba.errors import UsageError
from amoeba.files import atomic_path


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The globals a pickled dict of numpy arrays needs, under numpy 1.x and 2.x module spellings."""
    try:  # imported here: numpy 2 names the module numpy._core, numpy 1 numpy.core
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for mod in ("numpy.core", "numpy._core"):
        allowed[(f"{mod}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{mod}.multiarray", "scalar")] = multiarray.scalar
        if hasattr(numeric, "_frombuffer"):  # pickle protocol 5 spelling of arrays
            allowed[(f"{mod}.numeric", "_frombuffer")] = numeric._frombuffer
    for name in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "bool", "str", "bytes",
                 "bytearray"):
        allowed[("builtins", name)] = getattr(builtins, name)
        allowed[("__builtin__", name)] = allowed[("builtins", name)]  # Python 2 pickles
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    allowed[("_codecs", "encode")] = _latin1_encode  # how Python 2-compatible pickles spell bytes
    return allowed


def _latin1_encode(text, encoding="latin1", errors="strict"):
    """``_codecs.encode`` restricted to the latin-1 round trip that protocol-2 pickles of bytes use."""
    if not isinstance(text, str) or str(encoding).lower().replace("-", "") not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError("_codecs.encode is admitted only for latin-1 byte strings")
    return text.encode("latin1", errors)


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the numpy/builtin globals of :func:`_numpy_globals`."""

    def __init__(self, file, path: str, flag: Optional[str]):
        super().__init__(file, encoding="latin1")  # latin1: Python 2 numpy pickles decode losslessly
        self._path, self._flag = path, flag
        self._allowed = _numpy_globals()

    def find_class(self, module: str, name: str):  # noqa: D102 (pickle API)
        obj = self._allowed.get((module, name))
        if obj is None:
            raise UsageError(f"{self._path} asks to load '{module}.{name}', which is not an array, dtype or plain "
                             "container; refusing to load it (it could run code)", self._flag)
        return obj

    def persistent_load(self, pid):  # noqa: D102 (pickle API)
        raise UsageError(f"{self._path} holds a persistent reference; refusing to load it", self._flag)


_MAGIC = b"\x93NUMPY"
_MAX_HEADER = 1 << 20  # numpy itself refuses headers over 10,000 bytes by default


def _read_header(f, path: str, flag: Optional[str]) -> tuple[np.dtype, bool, tuple[int, ...]]:
    """Parse a .npy header (versions 1-3) as a literal: (dtype, fortran_order, shape)."""
    magic = f.read(8)
    if len(magic) < 8 or magic[:6] != _MAGIC:
        raise UsageError(f"{path} is not a .npy file (bad magic bytes)", flag)
    major = magic[6]
    if major == 1:
        raw = f.read(2)
        size = int.from_bytes(raw, "little") if len(raw) == 2 else -1
    elif major in (2, 3):
        raw = f.read(4)
        size = int.from_bytes(raw, "little") if len(raw) == 4 else -1
    else:
        raise UsageError(f"{path} has an unknown .npy format version {major}", flag)
    if size > _MAX_HEADER:
        raise UsageError(f"{path} has a corrupt .npy header ({size} bytes long)", flag)
    header = f.read(size) if size >= 0 else b""
    if size < 0 or len(header) != size:
        raise UsageError(f"{path} is truncated (incomplete .npy header)", flag)
    try:
        text = header.decode("utf8" if major == 3 else "latin1")
        meta = ast.literal_eval(text)
        dtype = np.lib.format.descr_to_dtype(meta["descr"])
        fortran = bool(meta["fortran_order"])
        shape = tuple(int(s) for s in meta["shape"])
    except Exception:  # noqa: BLE001 (any malformed header is the same user error)
        raise UsageError(f"{path} has a corrupt .npy header", flag) from None
    return dtype, fortran, shape


# A compressed file may expand to no more than this (a strategy for a 70B model is about 0.2 GB): a small file
# cannot make the reader allocate without bound.
MAX_DECOMPRESSED = 4 << 30


def compressed(path: str | os.PathLike) -> bool:
    """True for a gzip-compressed ``.npy`` (a name ending in ``.gz``)."""
    return Path(path).name.endswith(".gz")


def _decompressed(path: Path, flag: Optional[str]) -> bytes:
    try:
        with gzip.open(path, "rb") as f:
            data = f.read(MAX_DECOMPRESSED + 1)
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise UsageError(f"{path} is not a whole gzip file ({type(err).__name__})", flag) from None
    if len(data) > MAX_DECOMPRESSED:
        raise UsageError(f"{path} expands to more than {MAX_DECOMPRESSED >> 30} GiB", flag)
    return data


def load_npy(path: str | os.PathLike, flag: Optional[str] = None) -> Any:
    """Read a ``.npy`` file without executing code.

    A numeric array comes back as an ``ndarray``; a pickled object (``np.save`` of a dict) comes back as
    that object, unpickled by a restricted unpickler. Missing, truncated, corrupt or code-carrying files
    raise one :class:`UsageError` naming the file (and ``flag``).
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no such file: {path}", flag)
    data = _decompressed(path, flag) if compressed(path) else path.read_bytes()
    f = io.BytesIO(data)
    dtype, fortran, shape = _read_header(f, str(path), flag)
    if dtype.hasobject:
        try:
            arr = _RestrictedUnpickler(f, str(path), flag).load()
        except UsageError:
            raise
        except Exception as err:  # noqa: BLE001 (EOFError, UnpicklingError, ValueError... all mean corrupt)
            kind = "truncated" if isinstance(err, EOFError) or "truncated" in str(err).lower() or \
                "ran out" in str(err).lower() else "corrupt"
            raise UsageError(f"{path} is {kind} (its pickled payload does not load: {type(err).__name__})",
                             flag) from None
        if not isinstance(arr, np.ndarray):
            raise UsageError(f"{path} does not hold a numpy array", flag)
        if arr.shape == ():
            return arr.item()
        return arr
    count = int(np.prod(shape)) if shape else 1
    need = count * dtype.itemsize
    body = data[f.tell():]
    if len(body) < need:
        raise UsageError(f"{path} is truncated ({len(body)} of {need} data bytes)", flag)
    arr = np.frombuffer(body[:need], dtype=dtype, count=count)
    return arr.reshape(shape, order="F" if fortran else "C").copy()


def load_npy_dict(path: str | os.PathLike, flag: Optional[str] = None) -> dict:
    """:func:`load_npy` for files that must hold a pickled dict (the seed's strategy/mask/bias files)."""
    obj = load_npy(path, flag)
    if not isinstance(obj, dict):
        what = f"a {obj.dtype} array of shape {obj.shape}" if isinstance(obj, np.ndarray) else type(obj).__name__
        raise UsageError(f"{path} holds {what}, not a dict", flag)
    return obj


def save_npy(path: str | os.PathLike, obj: Any) -> None:
    """``np.save`` of ``obj`` to ``path`` through a temporary file beside it, renamed over ``path`` once complete,
    so an existing file is only ever replaced by a whole one. A dict (the seed's strategy, mask and bias files) is
    stored pickled, as the seed's own ``np.save`` of a dict stores it."""
    with atomic_path(path, suffix=".npy.gz" if compressed(path) else ".npy") as tmp:
        # a file object: np.save would append ".npy" to a path without it
        with open(tmp, "wb") as raw:
            # gzip: no name and no time in the header, so the same object gives the same bytes
            with (gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) if compressed(path)
                  else contextlib.nullcontext(raw)) as f:
                np.save(f, obj if isinstance(obj, np.ndarray) else np.array(obj, dtype=object))
