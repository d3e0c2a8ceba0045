"""A stand-in KMS for the key hook's test: wrap/unwrap with a key that only this module holds (a real
hook would call AWS KMS, GCP KMS or Vault transit here)."""

import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_KEK = AESGCM(bytes(range(32)))


class KMS:
    @staticmethod
    def wrap(key: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + _KEK.encrypt(nonce, key, b"sealgate-master-key")

    @staticmethod
    def unwrap(blob: bytes) -> bytes:
        return _KEK.decrypt(blob[:12], blob[12:], b"sealgate-master-key")
