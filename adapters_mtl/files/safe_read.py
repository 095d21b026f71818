"""Reading adapter files that may be hostile: paths that stay inside the folder, no symlink followed,
no FIFO or device opened, size limits, no pickle, and tensors whose dtypes and values are checked."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load

__all__ = [
    "LISTABLE_SUFFIXES",
    "MAX_CARD_BYTES",
    "PICKLE_SUFFIXES",
    "STORED_DTYPES",
    "AdapterFileError",
    "parse_tensors",
    "read_regular",
    "safe_relpath",
    "sha256_file",
]


class AdapterFileError(ValueError):
    """An adapter folder that cannot be used: missing/edited/truncated files, pickles, wrong base or shapes."""


MAX_CARD_BYTES = 1 << 20  # a card is a few KiB; a bigger one is not a card
# the only kinds of files an adapter folder may list: tensors and JSON configs (never a pickle)
LISTABLE_SUFFIXES = (".safetensors", ".json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# dtypes an adapter file may store; they are converted to the model's adapter dtype on load, with a
# warning when the conversion loses precision (float64 -> float32, float32 -> bfloat16/float16)
STORED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def safe_relpath(rel: object, where: str) -> str:
    """Check one ``files`` entry of a card: a relative POSIX path inside the folder, of a listable kind.

    Raises:
        AdapterFileError: an absolute path, ``..``, a backslash, an empty part, or a pickle / other suffix.
    """
    if not isinstance(rel, str) or not rel:
        raise AdapterFileError(f"{where}: card lists a file named {rel!r}; expected a relative path string")
    parts = rel.split("/")
    if rel.startswith("/") or "\\" in rel or ":" in parts[0] or any(p in ("", ".", "..") for p in parts):
        raise AdapterFileError(
            f"{where}: card lists {rel!r}, a path outside the folder (absolute, '..', '.' or a backslash); "
            "a card may only list files inside its own folder, e.g. 'adapter_model.safetensors'"
        )
    if rel.lower().endswith(PICKLE_SUFFIXES):
        raise AdapterFileError(
            f"{where}: card lists {rel!r}, a pickle, which adapters_mtl never reads or publishes (it can run "
            "code); convert it to safetensors"
        )
    if not rel.endswith(LISTABLE_SUFFIXES):
        raise AdapterFileError(
            f"{where}: card lists {rel!r}; an adapter folder holds only {LISTABLE_SUFFIXES} files"
        )
    return rel


def read_regular(root: Path, rel: str, limit: int | None = None) -> bytes | None:
    """Bytes of ``root/rel`` if it is a regular file reached without any symlink, else None if missing.

    Each component is opened relative to its parent's descriptor with ``O_NOFOLLOW``, and the file is
    checked on the descriptor it is read from, so swapping a file or a folder on the way for a link, a
    FIFO or a device between a check and the read cannot redirect or hang it.

    Raises:
        AdapterFileError: a symlink (of the file or of a folder on the way), a non-regular file, or a file
            over ``limit`` bytes.
    """
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    parts = rel.split("/")
    fds: list[int] = []
    path = root
    try:
        fds.append(os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)))
        for i, part in enumerate(parts):
            path = path / part
            last = i == len(parts) - 1
            flags = os.O_RDONLY | nofollow | (os.O_NONBLOCK if last else getattr(os, "O_DIRECTORY", 0))
            try:
                fds.append(os.open(part, flags, dir_fd=fds[-1]))
            except FileNotFoundError:
                return None
            except OSError as e:  # ELOOP: a link; ENOTDIR: a link or a file where a folder should be
                if stat.S_ISLNK(os.lstat(path).st_mode):
                    raise AdapterFileError(
                        f"{path} is a symbolic link; adapter folders are read without following links (a "
                        "link can point anywhere on the machine). Copy the real file into the folder."
                    ) from e
                raise AdapterFileError(f"{path} cannot be read as part of an adapter folder ({e})") from e
        st = os.fstat(fds[-1])
        if not stat.S_ISREG(st.st_mode):
            raise AdapterFileError(f"{path} is not a regular file")
        if limit is not None and st.st_size > limit:
            raise AdapterFileError(f"{path} is {st.st_size} bytes; expected at most {limit}")
        with os.fdopen(os.dup(fds[-1]), "rb") as fh:
            data = fh.read() if limit is None else fh.read(limit + 1)
        if limit is not None and len(data) > limit:  # grew since the fstat
            raise AdapterFileError(f"{path} is over {limit} bytes")
        return data
    finally:
        for fd in fds:
            os.close(fd)


def sha256_file(path: str | os.PathLike[str]) -> str:

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_tensors(data: bytes, where: str) -> dict[str, torch.Tensor]:
    try:
        tensors = load(data)
    except Exception as e:  # safetensors raises its own error type for a truncated/corrupt header
        raise AdapterFileError(
            f"{where} is not a readable safetensors file ({e}); it may be truncated"
        ) from e
    problems = []
    bad = sorted(k for k, t in tensors.items() if t.dtype not in STORED_DTYPES)
    if bad:
        problems.append(
            f"tensors {bad[:5]} have dtype {tensors[bad[0]].dtype}; adapter weights are stored as one of "
            f"{[str(d).removeprefix('torch.') for d in STORED_DTYPES]}"
        )
    if bad:
        nonfinite = _nonfinite({k: t for k, t in tensors.items() if k not in bad})
    else:
        nonfinite = [] if _all_finite(data, tensors) else _nonfinite(tensors)
    if nonfinite:
        problems.append(f"tensors {nonfinite[:5]} hold NaN or Inf values (a diverged training run?)")
    if problems:
        raise AdapterFileError(f"{where}: " + "; ".join(problems))
    return tensors


def _nonfinite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the tensors holding NaN or Inf (one check per tensor: exact, and names them)."""
    return sorted(k for k, t in tensors.items() if not bool(torch.isfinite(t).all()))


# numpy's view of each stored dtype for the one-pass check; bfloat16 (no numpy dtype) is read as its bits
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


def _all_finite(data: bytes, tensors: dict[str, torch.Tensor]) -> bool:
    """Whether every value of the safetensors file ``data`` is finite, in one pass over its bytes when all its
    tensors share a dtype (else one check per tensor). A False may be a false alarm (a finite sum that
    overflowed): callers then name the culprits with :func:`_nonfinite`, which is exact.

    ``tensors`` must be ``load(data)``: safetensors has then checked that the data region (after the 8-byte
    header length and the header) holds every tensor end to end with no hole or overlap, so a view of the
    whole region is exactly every stored value. One reduction over it costs ~0.1 ms for a 1.8 MB adapter;
    ``torch.isfinite(t).all()`` per tensor costs ~7 ms for its 120 tensors (two kernels and an allocation
    each). numpy, not torch: a torch reduction this large runs on OpenMP threads, which stall for
    milliseconds on a busy machine.
    """
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1:
        return not _nonfinite(tensors)
    dtype = dtypes.pop()
    start = 8 + int.from_bytes(data[:8], "little")
    if dtype == torch.bfloat16:  # NaN/Inf: every exponent bit set
        bits = np.frombuffer(data, dtype=np.uint16, offset=start)
        return not bool(np.any((bits & 0x7F80) == 0x7F80))
    values = np.frombuffer(data, dtype=_NUMPY_DTYPES[dtype], offset=start)
    # a sum of finite values is finite unless it overflows; any NaN or Inf makes it NaN or Inf (IEEE)
    return bool(
        np.isfinite(np.add.reduce(values, dtype=np.float64 if dtype == torch.float64 else np.float32))
    )
