"""A peer's identity: the libp2p RSA key that gives its peer id, reused to sign its DHT records.

The key file is hivemind's identity format (a libp2p ``PrivateKey`` protobuf holding a DER RSA key), so the same
file both fixes the peer id across restarts (p2pd loads it) and signs the records the peer publishes. Anyone can
check a signature against a peer id alone: the peer id is the sha2-256 multihash of the public key, so a record
signed by key K is accepted as coming from peer P only if hash(K) == P. Volunteers learn the coordinator's peer
id from the multiaddr they were given (``.../p2p/<peer id>``), which pins the manifest to that coordinator.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from typing import Optional

import base58
import multihash
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hivemind.proto import crypto_pb2

_THROWAWAY_PREFIX = "swarmtrain-throwaway-identity-"
_PADDING = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)


class IdentityError(ValueError):
    """An identity key file is missing, unreadable or not an RSA libp2p key."""


@dataclass(frozen=True)
class Identity:
    """An RSA libp2p identity: ``path`` is the key file handed to p2pd, ``peer_id`` its base58 peer id."""

    path: str
    private_key: rsa.RSAPrivateKey
    peer_id: str
    public_key: bytes  # libp2p PublicKey protobuf bytes

    @classmethod
    def load_or_create(cls, path: Optional[str]) -> "Identity":
        """Load the key at ``path``, creating it (mode 0400) if absent; ``None`` makes a throwaway key file."""
        if path is None:
            fd, path = tempfile.mkstemp(prefix=_THROWAWAY_PREFIX, suffix=".key")
            os.close(fd)
            os.unlink(path)
        if not os.path.exists(path):
            _write_new_key(path)
        return cls.load(path)

    @classmethod
    def load(cls, path: str) -> "Identity":
        try:
            with open(path, "rb") as f:
                data = f.read()
            proto = crypto_pb2.PrivateKey.FromString(data)
            if proto.key_type != crypto_pb2.RSA:
                raise IdentityError(f"identity file {path!r} holds a non-RSA key; swarmtrain needs an RSA key")
            key = serialization.load_der_private_key(proto.data, password=None)
        except IdentityError:
            raise
        except Exception as e:
            raise IdentityError(f"cannot read identity key file {path!r}: {e}") from e
        if not isinstance(key, rsa.RSAPrivateKey):
            raise IdentityError(f"identity file {path!r} does not hold an RSA private key")
        public_key = encode_public_key(key.public_key())
        return cls(path=path, private_key=key, peer_id=peer_id_from_public_key(public_key), public_key=public_key)

    @property
    def is_throwaway(self) -> bool:
        """True for a key made by ``load_or_create(None)`` (a new peer id every run)."""
        return os.path.basename(self.path).startswith(_THROWAWAY_PREFIX)

    def discard(self) -> None:
        """Delete the key file of a throwaway identity; a key file the user gave is never deleted."""
        if self.is_throwaway and os.path.exists(self.path):
            os.unlink(self.path)

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data, _PADDING, hashes.SHA256())


def encode_public_key(public_key: rsa.RSAPublicKey) -> bytes:
    """libp2p PublicKey protobuf of an RSA key (the bytes a peer id is the hash of)."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()


def peer_id_from_public_key(public_key: bytes) -> str:
    """The base58 libp2p peer id of an RSA public key given as libp2p PublicKey protobuf bytes."""
    digest = multihash.encode(hashlib.sha256(public_key).digest(), multihash.coerce_code("sha2-256"))
    return base58.b58encode(digest).decode()


def verify_signature(public_key: bytes, data: bytes, signature: bytes) -> bool:
    """Check ``signature`` over ``data`` with a libp2p RSA PublicKey protobuf; False on any malformed input."""
    try:
        proto = crypto_pb2.PublicKey.FromString(public_key)
        if proto.key_type != crypto_pb2.RSA:
            return False
        key = serialization.load_der_public_key(proto.data)
        if not isinstance(key, rsa.RSAPublicKey):
            return False
        numbers = key.public_numbers()
        if numbers.e != 65537 or not 2048 <= key.key_size <= 4096:
            return False  # keeps verification cheap and bounded for every record a node checks
        key.verify(signature, data, _PADDING, hashes.SHA256())
        return True
    except (InvalidSignature, ValueError, TypeError, Exception):
        return False


def _write_new_key(path: str) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())
    proto = crypto_pb2.PrivateKey(key_type=crypto_pb2.RSA, data=der)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise IdentityError(f"cannot create identity key {path!r}: directory {directory!r} does not exist")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    with os.fdopen(fd, "wb") as f:
        f.write(proto.SerializeToString())
