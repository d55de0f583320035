"""The integrity policy a load (or ``verify``) applies, and the keyed seal.

A checkpoint of ours carries a seal in its ``.metadata`` (``metadata_check``): a digest of
everything that decides what loads and how it is verified. Anyone who can write the
checkpoint can recompute an unkeyed digest, so it tells accidents and naive edits from
the checkpoint that was saved, not a forger. With a key, the writer adds an HMAC-SHA256
of the digest (stdlib ``hmac``, compared in constant time); only a holder of the key can
make one that verifies. What a reader demands is its :class:`IntegrityPolicy`:

* ``if-present`` (the default): a seal, where there is one, must match; a checkpoint
  without one (stock DCP, or its seal removed) loads unverified.
* ``required``: refuse anything not verified end to end -- no seal, saved without
  checksums, a data file without checksums.
* a key (``DataStatesConfig.integrity_key`` or :data:`KEY_ENV`): ``required``, and the
  seal's HMAC must verify under the key.

See docs/integrity.md for what each protects against, and what it does not.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

#: Environment variable holding the integrity key when ``DataStatesConfig.integrity_key`` is not given.
KEY_ENV = "DCP_DATASTATES_INTEGRITY_KEY"
#: Shortest key accepted (HMAC-SHA256 keys shorter than this are guessable).
MIN_KEY_BYTES = 16
_MAC_CONTEXT = b"dcp-datastates seal 2\n"
_KEY_ID_CONTEXT = b"dcp-datastates key id\n"


def key_id(key: bytes) -> str:
    """A short, public name for ``key`` (an HMAC of a constant: it reveals nothing of the key)."""
    return hmac.new(key, _KEY_ID_CONTEXT, hashlib.sha256).hexdigest()[:16]


def seal_mac(key: bytes, digest: str) -> str:
    """HMAC-SHA256 of a seal's digest under ``key`` (hex)."""
    return hmac.new(key, _MAC_CONTEXT + digest.encode("ascii"), hashlib.sha256).hexdigest()


def mac_matches(key: bytes, digest: str, mac: str) -> bool:
    return hmac.compare_digest(seal_mac(key, digest), mac)


@dataclass(frozen=True)
class IntegrityPolicy:
    """What a reader demands of a checkpoint before it loads (see the module docstring)."""

    required: bool = False
    key: bytes | None = field(default=None, repr=False)  # never printed

    @classmethod
    def of(cls, config: object) -> "IntegrityPolicy":
        """The policy of a :class:`~dcp_datastates.DataStatesConfig` (its key may come from :data:`KEY_ENV`)."""
        secret = getattr(config, "integrity_key", None)
        key = secret.get_secret_value() if secret is not None else None
        return cls(required=getattr(config, "integrity", "if-present") == "required", key=key)

    @classmethod
    def default(cls) -> "IntegrityPolicy":
        """What a reader with a default config applies: ``if-present``, keyed if :data:`KEY_ENV` is set."""
        from dcp_datastates.config import DataStatesConfig  # config imports this module

        return cls.of(DataStatesConfig())

    @property
    def enforced(self) -> bool:
        """Whether a checkpoint not verified end to end is refused (``required``, or any key)."""
        return self.required or self.key is not None

    @property
    def key_id(self) -> str | None:
        return None if self.key is None else key_id(self.key)

    @property
    def name(self) -> str:
        """How a message names this policy."""
        return f"an integrity key (key id {self.key_id})" if self.key is not None else "integrity='required'"

    def __repr__(self) -> str:
        return f"IntegrityPolicy(required={self.required}, key_id={self.key_id})"
