"""Client side of SSH-key authentication: load a private key, sign the server's challenge.

Signatures as the server verifies them: Ed25519; RSA PKCS#1 v1.5 with
SHA-256; ECDSA with SHA-256 (P-256), SHA-384 (P-384) or SHA-512 (P-521),
DER-encoded.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from pie.errors import AuthError

PrivateKey = ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
DEFAULT_KEY_FILES = ("id_ed25519", "id_ecdsa", "id_rsa")
_EC_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "secp256r1": hashes.SHA256, "secp384r1": hashes.SHA384, "secp521r1": hashes.SHA512,
}


def load_private_key(path: Path | str, password: bytes | None = None) -> PrivateKey:
    """An OpenSSH (`-----BEGIN OPENSSH PRIVATE KEY-----`) or PEM private key file."""
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except OSError as error:
        raise AuthError(f"cannot read private key {path}: {error.strerror}") from None
    key: object
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            key = serialization.load_ssh_private_key(data, password)
        else:
            key = serialization.load_pem_private_key(data, password)
    except (ValueError, TypeError) as error:
        raise AuthError(f"cannot load private key {path}: {error}; pass an unencrypted Ed25519, ECDSA or RSA "
                        "key, or its password") from None
    if not isinstance(key, PrivateKey):
        raise AuthError(f"{path} holds a {type(key).__name__}; use an Ed25519, ECDSA or RSA key")
    return key


def default_key_path(ssh_dir: Path | None = None) -> Path | None:
    """The first of ~/.ssh/id_ed25519, id_ecdsa, id_rsa that exists."""
    ssh_dir = ssh_dir or Path.home() / ".ssh"
    return next((ssh_dir / name for name in DEFAULT_KEY_FILES if (ssh_dir / name).is_file()), None)


def sign(key: PrivateKey, message: bytes) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(message)
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    algorithm = _EC_HASHES.get(key.curve.name)
    if algorithm is None:
        raise AuthError(f"ECDSA curve {key.curve.name} is not supported; use P-256, P-384 or P-521")
    return key.sign(message, ec.ECDSA(algorithm()))
