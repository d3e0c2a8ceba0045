"""Master keys and data keys.

The master key comes from a `KeySource`: a file (default, mode 0600), the environment variable
SEALGATE_MASTER_KEY, or a hook that unwraps it with a KMS (envelope encryption, below). It seals
the rows' deciding fields, the key check (the canary) and the data keys, and nothing else.

Values are sealed under data keys, kept in the store wrapped by the master key: `sealgate key
rotate` adds one, makes it the one new writes use and re-encrypts every value under it in batches,
while proxies keep serving (an envelope under a key a proxy has not loaded yet makes it reload the
keyring); `sealgate key retire` drops an old one once no value uses it. Values written before data
keys existed are sealed under the master key itself, until a rotation moves them.

A KMS: set SEALGATE_KEY_HOOK to `module:object`, an object with `wrap(bytes) -> bytes` and
`unwrap(bytes) -> bytes` that call the KMS; the file then holds the master key wrapped by the KMS
(written by `wrap` when the store is made), and only the KMS can open it.
"""

from __future__ import annotations

import importlib
import os
import stat
import time
from pathlib import Path
from typing import Any, Protocol

from . import crypto
from .errors import StoreError

CANARY = ("sealgate", "canary")  # the owner and name the key check is sealed under
DATA_KEY_OWNER = "sealgate-data-key"  # a data key is sealed under the master key as (this, its id)
SEALED_MARK = "sealed-rows"  # second line of a key file whose store seals its rows (schema 3 and later)
ENV_VAR = "SEALGATE_MASTER_KEY"
HOOK_VAR = "SEALGATE_KEY_HOOK"


class KeySource(Protocol):
    where: str  # says which key, in messages

    def read(self) -> bytes | None: ...  # the key, or None when there is none yet
    def create(self) -> bytes: ...  # a new key, for a store that holds nothing sealed
    def marks_sealed(self) -> bool: ...  # the source says its store seals rows (a set-back schema is noticed)
    def may_seal_old_rows(self) -> bool: ...  # it may upgrade a store from before row seals
    def mark_sealed(self, key: bytes) -> None: ...


class FileKey:
    """The key in hex on the first line of a file only its owner reads; the mark on the second."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = f"master key {path}"

    def read(self) -> bytes | None:
        text = self._text()
        return None if text is None else _parse(text.split("\n", 1)[0].strip(), self.where)

    def create(self) -> bytes:
        return self._write(os.urandom(crypto.KEY_BYTES), exclusive=True)

    def marks_sealed(self) -> bool:
        try:
            return SEALED_MARK in self.path.read_text().split("\n")[1:]
        except OSError:
            return False

    def may_seal_old_rows(self) -> bool:
        """Only a key file from before row seals (no mark): every key made since carries the mark."""
        return not self.marks_sealed()

    def mark_sealed(self, key: bytes) -> None:
        if self.path.exists() and not self.marks_sealed():
            self._write(key, exclusive=False)

    def _text(self) -> str | None:
        try:
            mode = self.path.stat().st_mode
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"{self.where} cannot be read: {e.__class__.__name__}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise StoreError(f"{self.where} is readable by others (mode {oct(mode & 0o777)}); run chmod 600 on it")
        try:
            return self.path.read_text()
        except (OSError, ValueError) as e:
            raise StoreError(f"{self.where} cannot be read: {e.__class__.__name__}") from None

    def _write(self, key: bytes, *, exclusive: bool) -> bytes:
        """Written whole (0600) beside the target, then moved over it: never half a key."""
        return _write_file(self.path, f"{self._encode(key)}\n{SEALED_MARK}\n", exclusive=exclusive, where=self.where,
                           key=key)

    def _encode(self, key: bytes) -> str:
        return key.hex()


class HookKey(FileKey):
    """The key in the file wrapped by a KMS: the hook's unwrap opens it, its wrap makes it."""

    def __init__(self, path: Path, hook: Any) -> None:
        super().__init__(path)
        self.hook = hook
        self.where = f"master key {path} (wrapped by {hook.__class__.__name__})"

    def read(self) -> bytes | None:
        text = self._text()
        if text is None:
            return None
        try:
            key = self.hook.unwrap(bytes.fromhex(text.split("\n", 1)[0].strip()))
        except Exception as e:  # noqa: BLE001 - whatever the KMS client raises
            raise StoreError(f"{self.where} cannot be unwrapped: {e.__class__.__name__}") from None
        return _parse(key.hex(), self.where)

    def _encode(self, key: bytes) -> str:
        return self.hook.wrap(key).hex()


class EnvKey:
    """The key in hex in an environment variable (a secret manager's injection); never made here."""

    def __init__(self, text: str) -> None:
        self.where = f"master key in {ENV_VAR}"
        self._key = _parse(text.strip(), self.where)

    def read(self) -> bytes | None:
        return self._key

    def create(self) -> bytes:
        return self._key

    def marks_sealed(self) -> bool:
        return False

    def may_seal_old_rows(self) -> bool:
        return False  # newer than row seals: a store "from before" them was set back

    def mark_sealed(self, key: bytes) -> None:
        pass


def source(key_file: Path, master_key: str | None = None, hook: str | None = None) -> KeySource:
    """The master key's source: SEALGATE_MASTER_KEY's text, else the file (unwrapped by the hook if set)."""
    if master_key:
        return EnvKey(master_key)
    if hook:
        return HookKey(key_file, _load_hook(hook))
    return FileKey(key_file)


def _load_hook(spec: str) -> Any:
    module, _, name = spec.partition(":")
    try:
        hook = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise StoreError(f"{HOOK_VAR}={spec!r} cannot be loaded ({e.__class__.__name__}); "
                         "write module:object, an object with wrap() and unwrap()") from None
    if not (callable(getattr(hook, "wrap", None)) and callable(getattr(hook, "unwrap", None))):
        raise StoreError(f"{HOOK_VAR}={spec!r} has no wrap() and unwrap()")
    return hook


def _parse(text: str, where: str) -> bytes:
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise StoreError(f"{where} cannot be read: it is not hex") from None
    if len(key) != crypto.KEY_BYTES:
        raise StoreError(f"{where} is not a {crypto.KEY_BYTES}-byte key ({crypto.KEY_BYTES * 2} hex digits)")
    return key


def _write_file(path: Path, text: str, *, exclusive: bool, where: str, key: bytes) -> bytes:
    tmp = path if exclusive else path.with_name(path.name + ".new")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        if tmp != path:
            tmp.replace(path)
    except OSError as e:
        raise StoreError(f"{where} cannot be written: {e.__class__.__name__}") from None
    return key


# --- the keyring: the master key and the data keys it wraps ---------------------------------------------

def canary_row(master: bytes) -> dict:
    env = crypto.seal(master, *CANARY, os.urandom(16).hex())
    return {"name": "canary", "key_id": env.key_id, "nonce": env.nonce, "ciphertext": env.ciphertext}


def open_canary(master: bytes, row: tuple, where: str, store: str) -> None:
    try:
        crypto.open_envelope({crypto.key_id(master): master}, *CANARY, crypto.Envelope(*row))
    except (crypto.EnvelopeError, TypeError):
        raise StoreError(f"{where} does not open the store {store}: it is another store's key, "
                         "or the store was edited") from None


def _data_key_name(key_id: str, created_at: object) -> str:
    """What a data key is sealed as: its id and its time (which decides the current key) bound in."""
    return f"{key_id}@{created_at!r}"


def new_data_key(master: bytes) -> dict:
    """A data key's row: the key sealed under the master key, bound to its own id and time."""
    key = os.urandom(crypto.KEY_BYTES)
    kid, now = crypto.key_id(key), time.time()
    env = crypto.seal(master, DATA_KEY_OWNER, _data_key_name(kid, now), key.hex())
    return {"key_id": kid, "nonce": env.nonce, "wrapped": env.ciphertext, "created_at": now}


def open_data_keys(master: bytes, rows: list[dict]) -> dict[str, bytes]:
    """key id -> key, for the master key and each data key row (one that does not open is refused)."""
    ring = {crypto.key_id(master): master}
    for r in rows:
        try:
            ring[r["key_id"]] = bytes.fromhex(crypto.open_envelope(
                ring, DATA_KEY_OWNER, _data_key_name(r["key_id"], r["created_at"]),
                crypto.Envelope(crypto.key_id(master), r["nonce"], r["wrapped"])))
        except (crypto.EnvelopeError, ValueError, TypeError):
            raise StoreError(f"data key {r['key_id']} does not open with the master key: it was edited") from None
    return ring
