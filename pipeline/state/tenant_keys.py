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


class TenantKeys:
    def __init__(self, salt: bytes):
        self.salt = salt

    @classmethod
    def unpersisted(cls, stream: str) -> "TenantKeys":
        """A stream without checkpoints keeps no state across runs: its names need no secret salt."""
        return cls(hashlib.sha256(f"ttt-stream/{stream}".encode()).digest())

    def state_key(self, key: str | None) -> str | None:
        """The name of ``key``'s state (None: a document without a key keeps None)."""
        if key is None:
            return None
        return hmac.new(self.salt, key.encode(), hashlib.sha256).hexdigest()[:32]
