"""Checkpoints: named numpy arrays plus JSON metadata in one safetensors file (no pickle).

The metadata (config, optimizer and scheduler position, RNG state, epoch, step, ...) is stored as
one JSON string under the safetensors metadata key "minibvit", together with a format version and a
digest: ``{"format_version": 1, "metadata": {...}, "sha256": "<64 hex digits>"}``. The digest
(``content_digest``) covers every tensor's name, dtype, shape and bytes and the metadata, so a flipped
bit, a truncated copy or a hand edit of a tensor, its dtype or shape, or the metadata is refused on
load. Files written before digests were stored (no "sha256" key) still load, with a
``CheckpointWarning`` saying that they cannot be verified; saving them again adds the digest.

``save_checkpoint`` writes a temporary file in the target's directory, flushes and fsyncs it, then
renames it over the target (``os.replace`` is atomic), so the file at ``path`` is always either the
previous complete checkpoint or the new one. Every minibvit file goes through this module: training
checkpoints (minibvit.train) and packed engine files (minibvit.engine's export and PackedViT.load).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import warnings
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
METADATA_KEY = "minibvit"
DIGEST_KEY = "sha256"
TENSOR_DTYPES = ("bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
                 "float16", "float32", "float64")
_BIT_GENERATORS = {cls.__name__: cls for cls in (np.random.PCG64, np.random.PCG64DXSM,
                                                  np.random.MT19937, np.random.Philox, np.random.SFC64)}


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupt, foreign or of an unsupported version."""


class CheckpointWarning(UserWarning):
    """A checkpoint that loads but cannot be verified (written before digests were stored)."""


def save_checkpoint(path, tensors, metadata):
    """Write `tensors` and `metadata` to the safetensors file `path`, atomically.

    path: target file; its directory must exist. An existing file is replaced only once the new
        one is completely on disk; on any error it is left untouched and the temporary file removed.
    tensors: dict of str -> numpy array (dtypes TENSOR_DTYPES, any shape including () and empty).
    metadata: dict of JSON values only (dict with str keys, list, str, int, finite float, bool,
        None), so that load_checkpoint returns exactly what was saved.
    """
    from safetensors.numpy import save

    if not isinstance(tensors, dict):
        raise TypeError(f"tensors must be a dict of name -> numpy array, got {type(tensors).__name__}")
    arrays = {}
    for name, array in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"tensor names must be non-empty strings other than '__metadata__', "
                             f"got {name!r}")
        if not isinstance(array, np.ndarray) or array.dtype.name not in TENSOR_DTYPES:
            raise TypeError(f"tensor {name!r} must be a numpy array with dtype in {TENSOR_DTYPES}, "
                            f"got {type(array).__name__} {getattr(array, 'dtype', '')}")
        arrays[name] = np.asarray(array, dtype=array.dtype.newbyteorder("="), order="C")  # keeps 0-d
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    _check_json(metadata, "metadata")
    payload = json.dumps({"format_version": FORMAT_VERSION, "metadata": metadata,
                          DIGEST_KEY: content_digest(arrays, metadata)}, allow_nan=False)
    data = save(arrays, metadata={METADATA_KEY: payload})

    path = Path(path)
    directory = path.parent
    if not directory.is_dir():
        raise CheckpointError(f"cannot write checkpoint {path}: directory {directory} does not exist; "
                              f"create it first")
    if path.is_dir():
        raise CheckpointError(f"cannot write checkpoint {path}: it is a directory")
    temporary = directory / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(temporary, "xb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(directory)


def load_checkpoint(path):
    """Read a checkpoint written by save_checkpoint; the file is opened read-only.

    Returns (tensors: dict of str -> numpy array, metadata: dict). Raises CheckpointError for a
    missing file, a truncated or corrupt file, a safetensors file without minibvit metadata, an
    unsupported format version, or contents that do not match the stored digest. A file without a
    digest (written before digests were stored) loads with a CheckpointWarning.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    with open(path, "rb") as file:
        data = file.read()
    header = _read_header(data, path)
    stored = header.get("__metadata__") or {}
    if not isinstance(stored, dict) or METADATA_KEY not in stored:
        raise CheckpointError(f"{path} is a safetensors file but not a minibvit checkpoint (no "
                              f"'{METADATA_KEY}' metadata); pass a checkpoint written by minibvit")
    try:
        payload = json.loads(stored[METADATA_KEY])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: corrupt minibvit metadata ({error})") from error
    if not isinstance(payload, dict) or not isinstance(payload.get("metadata"), dict):
        raise CheckpointError(f"{path}: corrupt minibvit metadata (expected an object with "
                              f"'format_version' and 'metadata')")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {version!r}, but this minibvit "
                              f"reads version {FORMAT_VERSION}; use the minibvit version that wrote it")
    try:
        tensors = load(data)
    except SafetensorError as error:
        raise CheckpointError(f"{path}: corrupt checkpoint ({error})") from error
    metadata = payload["metadata"]
    stored_digest = payload.get(DIGEST_KEY)
    if stored_digest is None:
        warnings.warn(f"{path} has no content digest (it was written by a minibvit from before "
                      f"digests were stored), so corruption in it cannot be detected; loading it "
                      f"anyway. Save it again (continue the run, or re-export a packed file) to "
                      f"add one", CheckpointWarning, stacklevel=2)
    elif stored_digest != content_digest(tensors, metadata):
        raise CheckpointError(
            f"{path} is corrupt: its tensors or metadata do not match the SHA-256 digest stored when "
            f"it was written (a damaged copy, a flipped bit or an edit by hand); do not use it: "
            f"restore a good copy, or write it again (train again, resume from another checkpoint, "
            f"or export again)")
    return tensors, metadata


def content_digest(tensors, metadata):
    """SHA-256 (hex) of a checkpoint's contents, as stored under "sha256" by save_checkpoint.

    tensors: dict of str -> numpy array; metadata: dict of JSON values. The digest covers, in
    name order, each tensor's name, dtype, shape and little-endian C-order bytes, then the metadata
    as canonical JSON (sorted keys), each part length-prefixed so that no two contents collide by
    concatenation. Byte order and memory layout of the arrays do not change it.
    """
    digest = hashlib.sha256()

    def part(data):
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)

    for name in sorted(tensors):
        array = np.asarray(tensors[name])
        little = array.dtype.newbyteorder("<")
        part(json.dumps([name, little.str, list(array.shape)]).encode())
        values = np.ascontiguousarray(array, dtype=little).reshape(-1)
        part(memoryview(values.view(np.uint8)))
    part(json.dumps(metadata, sort_keys=True, allow_nan=False).encode())
    return digest.hexdigest()


def rng_state_to_json(rng):
    """The state of a numpy Generator as JSON values (numpy arrays in it become
    {"__ndarray__": list, "dtype": str}); rng_from_json(rng_state_to_json(rng)) continues the stream."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return _to_json(rng.bit_generator.state)


def rng_from_json(state):
    """A numpy Generator in the state recorded by rng_state_to_json."""
    name = state.get("bit_generator") if isinstance(state, dict) else None
    if name not in _BIT_GENERATORS:
        raise CheckpointError(f"RNG state names bit generator {name!r}; supported: "
                              f"{', '.join(_BIT_GENERATORS)}")
    bit_generator = _BIT_GENERATORS[name]()
    try:
        bit_generator.state = _from_json(state)
    except (TypeError, ValueError, KeyError) as error:
        raise CheckpointError(f"invalid {name} RNG state in the checkpoint: {error}") from error
    return np.random.Generator(bit_generator)


def _to_json(value):
    if isinstance(value, dict):
        return {key: _to_json(item) for key, item in value.items()}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": value.dtype.str}
    if isinstance(value, np.integer):
        return int(value)
    return value


def _from_json(value):
    if isinstance(value, dict):
        if "__ndarray__" in value:
            return np.asarray(value["__ndarray__"], dtype=np.dtype(value["dtype"]))
        return {key: _from_json(item) for key, item in value.items()}
    return value


def _check_json(value, where):
    """Raise unless `value` is made of JSON types only, so that it survives a JSON round trip."""
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} is {value}, which JSON cannot store; use None or a string")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} has the non-string key {key!r}; JSON keys are strings")
            _check_json(item, f"{where}[{key!r}]")
        return
    raise TypeError(f"{where} is a {type(value).__module__}.{type(value).__name__}; checkpoint "
                    f"metadata holds only dict (str keys), list, str, int, float, bool and None "
                    f"(use .item() for numpy scalars, .tolist() for arrays, lists for tuples)")


def _read_header(data, path):
    """The JSON header of safetensors bytes, checking that the file is complete."""
    if len(data) < 8:
        raise CheckpointError(f"{path} is truncated or not a safetensors file ({len(data)} bytes)")
    length = int.from_bytes(data[:8], "little")
    if 8 + length > len(data):
        raise CheckpointError(f"{path} is truncated or not a safetensors file: its header claims "
                              f"{length} bytes but the file has {len(data)}")
    try:
        header = json.loads(data[8:8 + length])
    except (UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(f"{path} is corrupt or not a safetensors file (header is not JSON: "
                              f"{error})") from error
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is corrupt or not a safetensors file (header is not an object)")
    ends = [0]
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if name != "__metadata__" and isinstance(offsets, list) and len(offsets) == 2 \
                and all(isinstance(offset, int) for offset in offsets):
            ends.append(offsets[1])
    needed = 8 + length + max(ends)
    if needed > len(data):
        raise CheckpointError(f"{path} is truncated: its tensors need {needed} bytes but the file "
                              f"has {len(data)}; use an earlier checkpoint")
    return header


def _fsync_directory(directory):
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
