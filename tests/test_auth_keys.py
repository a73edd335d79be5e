"""SSH-key primitives with real keys (from `cryptography` and from `ssh-keygen`): parsing, refusals,
signatures, the keystore file `pie auth` writes and the server reads, and single-use challenges. Last,
the server's real handshake over a socket, on these primitives."""

from __future__ import annotations

import base64
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa

from pie.auth import (
    CHALLENGE_BYTES,
    Challenger,
    KeyStore,
    add_key,
    fingerprint,
    key_type,
    keystore_path,
    open_keystore,
    parse_public_key,
    read_users,
    remove,
    sign_challenge,
    verify_signature,
)
from pie.errors import AuthError, ConfigError

needs_ssh_keygen = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen is not installed")
KEYS = {
    "ed25519": lambda: ed25519.Ed25519PrivateKey.generate(),
    "rsa-2048": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "ecdsa-p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "ecdsa-p384": lambda: ec.generate_private_key(ec.SECP384R1()),
}


@pytest.fixture(scope="module")
def keys() -> dict[str, object]:
    return {name: make() for name, make in KEYS.items()}


def public_text(key: object, fmt: str) -> bytes:
    public = key.public_key()  # type: ignore[attr-defined]
    if fmt == "openssh":
        return public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b" me@host\n"
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def write_private(key: object, path: Path, fmt: str) -> Path:
    encoding = serialization.PrivateFormat.OpenSSH if fmt == "openssh" else serialization.PrivateFormat.PKCS8
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, encoding,  # type: ignore[attr-defined]
                                       serialization.NoEncryption()))
    return path


@pytest.mark.parametrize("name", list(KEYS))
@pytest.mark.parametrize("fmt", ["openssh", "pem"])
def test_keys_parse_and_signatures_verify(keys: dict[str, object], tmp_path: Path, name: str, fmt: str) -> None:
    key = keys[name]
    public = parse_public_key(public_text(key, fmt))
    assert key_type(public) == name
    challenge = b"\x00\xff" * (CHALLENGE_BYTES // 2)
    signature = sign_challenge(write_private(key, tmp_path / "id", fmt), challenge)
    assert verify_signature(public, challenge, signature)
    assert not verify_signature(public, challenge[:-1] + b"x", signature)  # another message
    assert not verify_signature(public, challenge, signature[:-1] + bytes([signature[-1] ^ 1]))  # tampered
    assert not verify_signature(public, challenge, b"")  # garbage, not an exception
    other = next(k for n, k in keys.items() if n != name)
    assert not verify_signature(parse_public_key(public_text(other, "openssh")), challenge, signature)


@needs_ssh_keygen
@pytest.mark.parametrize(("kind", "bits", "name"), [("ed25519", None, "ed25519"), ("rsa", 3072, "rsa-3072"),
                                                    ("ecdsa", 256, "ecdsa-p256"), ("ecdsa", 384, "ecdsa-p384")])
def test_ssh_keygen_keys(tmp_path: Path, kind: str, bits: int | None, name: str) -> None:
    path = tmp_path / f"id_{kind}"
    subprocess.run(["ssh-keygen", "-q", "-t", kind, *(["-b", str(bits)] if bits else []), "-N", "", "-C", "me@host",
                    "-f", str(path)], check=True)
    public = parse_public_key(path.with_suffix(".pub").read_text())
    assert key_type(public) == name
    listed = subprocess.run(["ssh-keygen", "-lf", str(path.with_suffix(".pub"))], capture_output=True, text=True,
                            check=True).stdout.split()
    assert fingerprint(public) == listed[1]  # the fingerprint users see in ssh-keygen -l
    challenge = b"challenge bytes"
    assert verify_signature(public, challenge, sign_challenge(path, challenge))


@pytest.mark.parametrize(("make", "fmt", "expected"), [
    (lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024), "openssh", "RSA key of 1024 bits is too weak"),
    (lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024), "pem", "RSA key of 1024 bits is too weak"),
    (lambda: ec.generate_private_key(ec.SECP521R1()), "openssh", "ECDSA curve secp521r1 is not supported; use P-256"),
    (lambda: ec.generate_private_key(ec.SECP256K1()), "pem", "ECDSA curve secp256k1 is not supported"),
], ids=["rsa-1024-openssh", "rsa-1024-pem", "p521", "secp256k1"])
def test_weak_and_unsupported_keys_are_refused(make: object, fmt: str, expected: str) -> None:
    with pytest.raises(AuthError, match=expected):
        parse_public_key(public_text(make(), fmt))  # type: ignore[operator]


def test_dsa_and_garbage_and_private_keys_are_refused(keys: dict[str, object]) -> None:
    dsa_key = dsa.generate_private_key(key_size=2048)
    with pytest.raises(AuthError, match="DSAPublicKey keys are not supported"):
        parse_public_key(public_text(dsa_key, "pem"))
    with pytest.raises(AuthError, match="no public key given"):
        parse_public_key("  \n")
    with pytest.raises(AuthError, match="not a readable public key"):
        parse_public_key("ssh-ed25519 AAAAnotbase64!!")
    private = keys["ed25519"].private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    with pytest.raises(AuthError, match="this is a private key; give its public half"):
        parse_public_key(private)


def test_keystore_file_is_what_the_docs_say(keys: dict[str, object], tmp_path: Path) -> None:
    path = keystore_path(tmp_path)
    assert path == tmp_path / "authorized_users.toml"
    add_key(path, "alice", public_text(keys["ed25519"], "openssh").decode(), "laptop")
    add_key(path, "alice", public_text(keys["rsa-2048"], "pem").decode(), "ci")
    added = add_key(path, "bob", public_text(keys["ecdsa-p384"], "openssh").decode())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    raw = tomllib.loads(path.read_text())
    assert list(raw) == ["users"] and set(raw["users"]["alice"]["keys"]) == {"laptop", "ci"}
    assert raw["users"]["alice"]["keys"]["laptop"].startswith("ssh-ed25519 AAAA") and \
        raw["users"]["alice"]["keys"]["laptop"].endswith(" me@host")  # the comment is kept
    assert raw["users"]["alice"]["keys"]["ci"].startswith("ssh-rsa AAAA")  # PEM stored as one OpenSSH line
    assert len(added.name) == len("20260101T000000Z") and added.name.endswith("Z")  # default name: a timestamp
    assert {u: sorted(k) for u, k in read_users(path).items()} == {"alice": ["ci", "laptop"], "bob": [added.name]}


def test_keystore_refuses_duplicates_and_bad_names(keys: dict[str, object], tmp_path: Path) -> None:
    path = keystore_path(tmp_path)
    text = public_text(keys["ed25519"], "openssh").decode()
    add_key(path, "alice", text, "laptop")
    with pytest.raises(AuthError, match="already has a key named 'laptop'"):
        add_key(path, "alice", public_text(keys["rsa-2048"], "openssh").decode(), "laptop")
    with pytest.raises(AuthError, match="already has this key \\(as 'laptop'\\)"):
        add_key(path, "alice", text, "again")
    with pytest.raises(AuthError, match="whitespace"):
        add_key(path, "al ice", text, "x")


def test_remove_keys_and_users(keys: dict[str, object], tmp_path: Path) -> None:
    path = keystore_path(tmp_path)
    add_key(path, "alice", public_text(keys["ed25519"], "openssh").decode(), "a")
    add_key(path, "alice", public_text(keys["rsa-2048"], "openssh").decode(), "b")
    add_key(path, "bob", public_text(keys["ecdsa-p256"], "openssh").decode(), "c")
    assert remove(path, "alice", "a") == ["a"]
    with pytest.raises(AuthError, match="user 'alice' has no key named 'a'; its keys: b"):
        remove(path, "alice", "a")
    assert remove(path, "alice", "b") == ["b"]  # the last key: the user goes too
    assert list(read_users(path)) == ["bob"]
    assert remove(path, "bob") == ["c"]
    with pytest.raises(AuthError, match="no user 'bob'"):
        remove(path, "bob")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_the_server_side_store_follows_the_file(keys: dict[str, object], tmp_path: Path) -> None:
    path = keystore_path(tmp_path)
    store = KeyStore(path)  # no file yet: nobody
    assert not store.has_user("alice")
    with pytest.raises(ConfigError, match="authorizes nobody"):
        open_keystore(tmp_path)
    add_key(path, "alice", public_text(keys["ed25519"], "openssh").decode(), "laptop")
    message = b"m" * CHALLENGE_BYTES
    signature = keys["ed25519"].sign(message)  # type: ignore[attr-defined]
    assert store.has_user("alice") and store.verify("alice", message, signature)  # `pie auth add` took effect
    assert not store.verify("bob", message, signature)
    path.write_text(path.read_text().replace("AAAA", "BBBB"))  # a hand edit that breaks the key
    assert not store.has_user("alice") and not store.verify("alice", message, signature)  # fails closed
    with pytest.raises(ConfigError, match=r"users\.alice\.keys\.laptop: .*`pie auth remove alice laptop`"):
        KeyStore(path)
    path.write_text('[users.alice]\nkeys = 3\n')
    with pytest.raises(ConfigError, match=r"users\.alice must hold a \[users\.alice\.keys\] table"):
        KeyStore(path)
    path.write_text('[other]\nx = 1\n')
    with pytest.raises(ConfigError, match=r"only a \[users\.<name>\.keys\] table may be in this file"):
        KeyStore(path)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_challenges_are_fresh_single_use_user_bound_and_expire() -> None:
    clock = Clock()
    challenger = Challenger(ttl_s=30, clock=clock)
    first, second = challenger.issue("alice"), challenger.issue("alice")
    assert len(first) == CHALLENGE_BYTES and first != second
    assert len(base64.b64decode(challenger.issue_b64())) == CHALLENGE_BYTES
    assert challenger.consume(first, "alice")
    assert not challenger.consume(first, "alice")  # no replay
    assert not challenger.consume(second, "bob")  # issued to alice; and the attempt used it up
    assert not challenger.consume(second, "alice")
    late = challenger.issue("alice")
    clock.now += 31
    assert not challenger.consume(late, "alice")  # expired
    assert not challenger.consume(b"x" * CHALLENGE_BYTES)  # never issued


def test_pending_challenges_are_bounded() -> None:
    clock = Clock()
    challenger = Challenger(ttl_s=30, max_pending=3, clock=clock)
    nonces = [challenger.issue() for _ in range(5)]
    assert challenger.pending == 3
    assert not challenger.consume(nonces[0]) and challenger.consume(nonces[4])  # the oldest were dropped
    clock.now += 31
    challenger.issue()
    assert challenger.pending == 1  # expired ones are purged


def test_challenger_verifies_against_any_of_the_users_keys(keys: dict[str, object], tmp_path: Path) -> None:
    path = keystore_path(tmp_path)
    for name in ("ed25519", "ecdsa-p384"):
        add_key(path, "alice", public_text(keys[name], "openssh").decode(), name)
    challenger = Challenger(KeyStore(path))
    for name in ("ed25519", "ecdsa-p384"):
        nonce = challenger.issue("alice")
        signature = sign_challenge(write_private(keys[name], tmp_path / name, "openssh"), nonce)
        assert challenger.verify("alice", nonce, signature)
        assert not challenger.verify("alice", nonce, signature)  # replayed
    nonce = challenger.issue("alice")
    stranger = sign_challenge(write_private(keys["rsa-2048"], tmp_path / "rsa", "pem"), nonce)
    assert not challenger.verify("alice", nonce, stranger)


@pytest.mark.asyncio
async def test_the_server_handshake_runs_on_these_primitives(keys: dict[str, object], tmp_path: Path) -> None:
    """The real server (real socket, real runtime) with auth on, fed by the keystore `pie auth` writes."""
    from server_support import running_server

    from pie.client import PieClient
    from pie.client.signing import load_private_key
    from pie.server.auth import Authenticator

    path = keystore_path(tmp_path)
    add_key(path, "alice", public_text(keys["rsa-2048"], "openssh").decode(), "laptop")
    authenticator = Authenticator(enabled=True, keys=open_keystore(tmp_path), token="t" * 64)
    async with running_server(enable_auth=True, authenticator=authenticator) as server:
        async with PieClient(server.url) as client:
            await client.authenticate("alice", key=load_private_key(write_private(keys["rsa-2048"], tmp_path / "k", "pem")))
            assert await client.list_processes() == []
        async with PieClient(server.url) as client:
            with pytest.raises(AuthError, match="matches none of the keys of user 'alice'"):
                await client.authenticate("alice", key=keys["ed25519"])  # type: ignore[arg-type]
