"""The checkpoint signing key from a Prefect Secret block (``IRE_SECRET_KEY_BLOCK``), for the engine.

The engine imports no Prefect: this resolves the block and the caller hands the key to
:func:`engine.signing.use_secret_key`.
"""

from __future__ import annotations

from engine.core import SpecError


def secret_key_from_block(name: str | None) -> str | None:
    """The value of the Secret block ``name`` (None when no block is named)."""
    if not name:
        return None
    from prefect.blocks.system import Secret

    try:
        secret = Secret.load(name)
    except ValueError:
        raise SpecError(
            f"no Secret block {name!r}: create it (`prefect block create secret`) "
            "or unset IRE_SECRET_KEY_BLOCK"
        ) from None
    value = secret.get()
    if not isinstance(value, str):
        raise SpecError(f"Secret block {name!r} must hold a string key, not {type(value).__name__}")
    return value
