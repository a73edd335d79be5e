"""SSH public keys: parse (OpenSSH or PEM), name, fingerprint, and verify challenge signatures.

Accepted, as Pie's server accepts them: Ed25519; RSA of at least 2048 bits (PKCS#1 v1.5 with
SHA-256); ECDSA on P-256 (SHA-256) or P-384 (SHA-384) with DER signatures. Anything else is refused
when the key is added, so the keystore only ever holds keys the server can check.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from pie.errors import AuthError

PublicKey = ed25519.Ed25519PublicKey | rsa.RSAPublicKey | ec.EllipticCurvePublicKey
MIN_RSA_BITS = 2048
EC_HASHES: dict[str, type[hashes.HashAlgorithm]] = {"secp256r1": hashes.SHA256, "secp384r1": hashes.SHA384}
_EC_NAMES = {"secp256r1": "p256", "secp384r1": "p384"}
_HOW_TO = "e.g. `pie auth add alice laptop < ~/.ssh/id_ed25519.pub`"


def parse_public_key(text: str | bytes) -> PublicKey:
    """One public key in OpenSSH form (`ssh-ed25519 AAAA... comment`) or PEM (`-----BEGIN PUBLIC KEY-----`)."""
    data = (text.encode() if isinstance(text, str) else text).strip()
    if not data:
        raise AuthError(f"no public key given: pass one on stdin, {_HOW_TO}")
    if b"PRIVATE KEY" in data.split(b"\n", 1)[0]:
        raise AuthError("this is a private key; give its public half instead (the .pub file, or "
                        "`ssh-keygen -y -f KEY`), and keep the private key to yourself")
    try:
        if data.startswith(b"-----BEGIN"):
            key: object = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_ssh_public_key(data.split(b"\n", 1)[0].strip())
    except UnsupportedAlgorithm as error:
        raise AuthError(f"unsupported key type ({error}); use an Ed25519, ECDSA P-256/P-384 or RSA key") from None
    except ValueError as error:
        raise AuthError(f"not a readable public key ({error}); give one line of an OpenSSH .pub file or a PEM "
                        f"public key, {_HOW_TO}") from None
    return check_supported(key)


def check_supported(key: object) -> PublicKey:
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise AuthError(f"RSA key of {key.key_size} bits is too weak; use at least {MIN_RSA_BITS} bits "
                            "(`ssh-keygen -t rsa -b 3072`) or an Ed25519 key")
        return key
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in EC_HASHES:
            raise AuthError(f"ECDSA curve {key.curve.name} is not supported; use P-256 or P-384 "
                            "(`ssh-keygen -t ecdsa -b 256`) or an Ed25519 key")
        return key
    raise AuthError(f"{type(key).__name__} keys are not supported; use Ed25519, ECDSA P-256/P-384 or RSA")


def key_type(key: PublicKey) -> str:
    """Short name: ed25519, rsa-3072, ecdsa-p256."""
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(key, rsa.RSAPublicKey):
        return f"rsa-{key.key_size}"
    return f"ecdsa-{_EC_NAMES.get(key.curve.name, key.curve.name)}"


def openssh_line(key: PublicKey) -> str:
    """The key as one OpenSSH line (no comment): the form the keystore holds."""
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def fingerprint(key: PublicKey) -> str:
    """`SHA256:...` as `ssh-keygen -lf` prints it."""
    blob = base64.b64decode(openssh_line(key).split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def verify_signature(key: PublicKey, message: bytes, signature: bytes) -> bool:
    """Does `signature` sign `message` under `key` (the scheme is fixed by the key type)?"""
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, message)
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
        else:
            algorithm = EC_HASHES.get(key.curve.name)
            if algorithm is None:
                return False
            key.verify(signature, message, ec.ECDSA(algorithm()))
    except (InvalidSignature, ValueError):  # ValueError: a malformed DER or wrong-length signature
        return False
    return True


def sign_challenge(private_key_path: Path | str, challenge: bytes, password: bytes | None = None) -> bytes:
    """The client side: sign the server's raw challenge bytes with an OpenSSH or PEM private key."""
    from pie.client.signing import load_private_key, sign

    return sign(load_private_key(private_key_path, password), challenge)
