"""Signed state: HMAC-SHA256 over what the engine writes and later loads back as code (checkpoints).

A checkpoint can hold a pickle (the CMA-ES state), and the job store is shared by every worker, so
the engine loads only checkpoints signed under a key the deployment holds. The key is, first found:
one handed in by the caller (:func:`use_secret_key`, e.g. from a Prefect Secret block, resolved
outside the engine), ``IRE_SECRET_KEY``, or a key file ``IRE_HOME/secret.key`` created with mode
0600 on first use (enough for one machine; several machines sharing a store share a key).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from engine.core.errors import EngineError, SpecError
from engine.settings import Settings, load_settings

KEY_FILE_NAME = "secret.key"
SIGNATURE_FIELD = "signature"
"""The checkpoint field holding its signature; everything else in the checkpoint is signed."""

_SCHEME = "hmac-sha256:"
_MIN_KEY_LENGTH = 16

_handed_key: bytes | None = None


class CheckpointRefusedError(EngineError):
    """A checkpoint is unsigned or its signature does not match: nothing of it was loaded."""


def use_secret_key(key: str | bytes | None) -> None:
    """Sign and verify with ``key`` in this process from now on (``None``: back to the settings)."""
    global _handed_key
    if key is None:
        _handed_key = None
        return
    raw = key.encode() if isinstance(key, str) else bytes(key)
    if len(raw) < _MIN_KEY_LENGTH:
        raise SpecError(f"the secret key has {len(raw)} characters: give one of {_MIN_KEY_LENGTH} or more")
    _handed_key = raw


def secret_key(settings: Settings | None = None) -> bytes:
    """The signing key: the handed-in one, ``IRE_SECRET_KEY``, or the key file in ``IRE_HOME``."""
    if _handed_key is not None:
        return _handed_key
    settings = settings or load_settings()
    if settings.secret_key is not None:
        return settings.secret_key.get_secret_value().encode()
    return key_file_key(settings.home)


def key_file_key(home: Path) -> bytes:
    """The key in ``home/secret.key``, created (mode 0600, 256 random bits) if missing."""
    path = home / KEY_FILE_NAME
    if not path.exists():
        _create_key_file(path)
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SpecError(f"key file {path} is open to other users: run `chmod 600 {path}`")
    key = path.read_bytes().strip()
    if len(key) < _MIN_KEY_LENGTH:
        raise SpecError(f"key file {path} holds {len(key)} bytes: delete it to have a new one made")
    return key


def _create_key_file(path: Path) -> None:
    # Written in full to a private temporary file, then linked into place: a process racing us
    # sees either no key file or a whole one, and exactly one key wins.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{KEY_FILE_NAME}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        with contextlib.suppress(FileExistsError):  # another process made it first: use theirs
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sign(data: bytes, key: bytes) -> str:
    """The signature of ``data`` under ``key``: ``hmac-sha256:<hex>``."""
    return _SCHEME + hmac.new(key, data, hashlib.sha256).hexdigest()


def verify(data: bytes, signature: object, key: bytes) -> bool:
    """Whether ``signature`` is ``data``'s signature under ``key`` (compared in constant time)."""
    return isinstance(signature, str) and hmac.compare_digest(signature, sign(data, key))


def _checkpoint_bytes(job_id: str, state: Mapping[str, Any]) -> bytes:
    # The job id is signed too, so that one job's checkpoint cannot be planted on another job.
    # Sorted keys and orjson on both sides: the store keeps the state as orjson JSON, and
    # dumps(loads(dumps(x))) == dumps(x) for it, so a state read back signs the same.
    body = {k: v for k, v in state.items() if k != SIGNATURE_FIELD}
    return (
        job_id.encode() + b"\n" + orjson.dumps(body, option=orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY)
    )


def sign_checkpoint(job_id: str, state: Mapping[str, Any], key: bytes) -> dict[str, Any]:
    """``state`` with its signature (under ``key``, bound to ``job_id``) added."""
    body = {k: v for k, v in state.items() if k != SIGNATURE_FIELD}
    return {**body, SIGNATURE_FIELD: sign(_checkpoint_bytes(job_id, body), key)}


def checkpoint_problem(job_id: str, state: Mapping[str, Any], key: bytes) -> str | None:
    """Why ``state`` may not be loaded for ``job_id`` (unsigned, or does not match), or None."""
    signature = state.get(SIGNATURE_FIELD)
    if signature is None:
        return "is not signed"
    if not verify(_checkpoint_bytes(job_id, state), signature, key):
        return "has a signature that does not match (altered, or signed under another secret key)"
    return None


def verified_checkpoint(job_id: str, state: Mapping[str, Any], key: bytes) -> dict[str, Any]:
    """``state`` without its signature, if that matches; else :class:`CheckpointRefusedError`."""
    problem = checkpoint_problem(job_id, state, key)
    if problem is not None:
        raise CheckpointRefusedError(
            f"job {job_id!r}: its checkpoint {problem}, so it was not loaded: if this store is only "
            f"written by your own runs, re-sign it with `irefine checkpoints resign {job_id}`"
        )
    return {k: v for k, v in state.items() if k != SIGNATURE_FIELD}
