"""Names of per-key states: a keyed digest of the tenant's key, never the key itself.

The driver names a document's state ``HMAC-SHA256(salt, key)`` (32 hex digits) as soon as it has
parsed the record; readers, spill files, checkpoint manifests, results (``state_key``) and
tombstones only ever hold that name. The salt is random, one per stream, kept as a tag of the
stream's registered model (``ttt.key_salt``): a name matches in one stream only, and nothing
stored with a version says which key it belongs to. Whoever can read the registry can still
check a guessed key against a name (that is what lets ``forget KEY`` find it); the key itself
is gone once its state files are (``CheckpointStore.erase``).
"""

from __future__ import annotations

import hashlib
import hmac

SALT_TAG = "ttt.key_salt"
TOMBSTONE_TAG = "ttt.forgotten."  # + a state key: the registered model's tag of its tombstone


class TenantKeys:
    def __init__(self, salt: bytes):
        self.salt = salt

    @classmethod
    def unpersisted(cls, stream: str) -> "TenantKeys":
        """A stream without checkpoints keeps no state across runs: its names need no secret salt."""
        return cls(hashlib.sha256(f"ttt-stream/{stream}".encode()).digest())

    def state_key(self, key: str | None) -> str | None:
        """The name of the state of a record's tenant (``pipeline.stream_io.messages.tenant_key``;
        None: a document without a key keeps None)."""
        if key is None:
            return None
        return hmac.new(self.salt, key.encode(), hashlib.sha256).hexdigest()[:32]

    def state_key_of(self, key: str) -> str:
        """The name of the state of ``key`` as a user gives it (``forget KEY``, ``export --key``):
        the tenant a record with that key is, then its name."""
        from pipeline.stream_io.messages import tenant_key

        return self.state_key(tenant_key(key.encode()))

    def draw(self, purpose: str, partition: int, offset: int) -> float:
        """A number in [0, 1) for the record at this position of the stream's documents topic,
        keyed with the stream's salt: the base shadow's and the held-out slice's samples. Fixed by
        the position (a replay draws the same), and nobody without the salt can choose ids, keys or
        contents that land in or out of them."""
        message = f"{purpose}\0{partition}\0{offset}".encode()
        return int.from_bytes(hmac.new(self.salt, message, hashlib.sha256).digest()[:8], "big") / 2**64
