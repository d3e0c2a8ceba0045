"""The envelope around a secret value: AES-256-GCM bound to owner and name (pure).

Each write draws a fresh 96-bit nonce. The associated data binds the ciphertext to its
owner and name, so a ciphertext copied to another row, or tampered with, fails to open.
The key id is stored beside the ciphertext so keys can rotate.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32


class EnvelopeError(Exception):
    """A ciphertext that cannot be opened: tampered, swapped or under an unknown key."""


@dataclass(frozen=True)
class Envelope:
    key_id: str
    nonce: bytes
    ciphertext: bytes


def key_id(key: bytes) -> str:
    return hashlib.sha256(b"sealgate-key-id\x00" + key).hexdigest()[:16]


def _aad(owner: str, name: str) -> bytes:
    return json.dumps(["sealgate-secret-v1", owner, name]).encode()


def seal(key: bytes, owner: str, name: str, value: str) -> Envelope:
    nonce = os.urandom(12)
    ct = AESGCM(key).encrypt(nonce, value.encode("utf-8"), _aad(owner, name))
    return Envelope(key_id(key), nonce, ct)


def open_envelope(keys: dict[str, bytes], owner: str, name: str, env: Envelope) -> str:
    key = keys.get(env.key_id)
    if key is None:
        raise EnvelopeError(f"secret {name} of user {owner} is encrypted under key {env.key_id}, which is not loaded")
    try:
        return AESGCM(key).decrypt(env.nonce, env.ciphertext, _aad(owner, name)).decode("utf-8")
    except (InvalidTag, ValueError, TypeError, UnicodeDecodeError):  # (TypeError: a column of another type)
        raise EnvelopeError(
            f"secret {name} of user {owner} failed authentication: its ciphertext was tampered with or moved"
        ) from None


def row_seal(key: bytes, kind: str, fields: Sequence[object]) -> str:
    """A MAC over the fields of a stored row that decide where, how or for whom a value may go
    (a secret's owner, name and origins; a session's principal, expiry and placeholder key),
    under a key derived from the master key: an edit made without the key does not verify."""
    derived = hmac.new(key, b"sealgate-row-seal-v1", hashlib.sha256).digest()
    return hmac.new(derived, json.dumps([kind, *fields]).encode(), hashlib.sha256).hexdigest()


def seal_matches(key: bytes, kind: str, fields: Sequence[object], seal: str | None) -> bool:
    return seal is not None and hmac.compare_digest(row_seal(key, kind, fields), seal)
