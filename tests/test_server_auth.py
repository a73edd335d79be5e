"""SSH-key challenge-response over real sockets with real keys: who gets in, who is refused, and that a
signature cannot be replayed. Also the internal token and the OpenAI API's bearer check."""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import msgpack
import pytest
import pytest_asyncio
import websockets
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from server_support import MODEL, running_server
from timing import scaled

from pie.client import PieClient
from pie.client.signing import sign
from pie.errors import AuthError
from pie.server.app import Server
from pie.server.auth import CHALLENGE_BYTES, Authenticator

pytestmark = pytest.mark.asyncio(loop_scope="module")

ALICE_ED25519 = ed25519.Ed25519PrivateKey.generate()
ALICE_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
BOB_ECDSA = ec.generate_private_key(ec.SECP384R1())
STRANGER = ed25519.Ed25519PrivateKey.generate()


class Keys:
    """The authorized keys: a user may have several; any of them may sign."""

    def __init__(self, users: dict[str, list[object]]) -> None:
        self.users = {name: [k.public_key() for k in keys] for name, keys in users.items()}  # type: ignore[attr-defined]

    def has_user(self, username: str) -> bool:
        return username in self.users

    def verify(self, username: str, message: bytes, signature: bytes) -> bool:
        return any(_verifies(key, message, signature) for key in self.users.get(username, []))


def _verifies(key: object, message: bytes, signature: bytes) -> bool:
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, message)
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, message, ec.ECDSA(hashes.SHA384()))
        else:
            return False
    except InvalidSignature:
        return False
    return True


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server() -> Server:
    keys = Keys({"alice": [ALICE_ED25519, ALICE_RSA], "bob": [BOB_ECDSA]})
    authenticator = Authenticator(enabled=True, keys=keys, token="t" * 64)
    async with running_server(enable_auth=True, authenticator=authenticator) as server:
        yield server


@pytest.mark.parametrize(("user", "key"), [("alice", ALICE_ED25519), ("alice", ALICE_RSA), ("bob", BOB_ECDSA)],
                         ids=["ed25519", "rsa", "ecdsa-p384"])
async def test_authorized_keys_get_in(server: Server, user: str, key: object) -> None:
    async with PieClient(server.url) as client:
        await client.authenticate(user, key=key)  # type: ignore[arg-type]
        process = await client.launch("text-completion", {"prompt": "hi", "max_tokens": 2})
        assert (await anext(process.events())).kind in ("message", "return")
        listed = await client.list_processes() + json.loads(await client.query("finished_processes"))
        assert {p["username"] for p in listed} == {user}  # live or finished, only the user's own


async def test_unknown_user_and_unknown_key_are_refused(server: Server) -> None:
    async with PieClient(server.url) as client:
        with pytest.raises(AuthError, match="user 'mallory' is not authorized"):
            await client.authenticate("mallory", key=STRANGER)
    async with PieClient(server.url) as client:
        with pytest.raises(AuthError, match="matches none of the keys of user 'alice'"):
            await client.authenticate("alice", key=STRANGER)
    async with PieClient(server.url) as client:
        with pytest.raises(AuthError, match="requires key authentication"):
            await client.authenticate("alice")


async def _identify(ws: websockets.ClientConnection, corr_id: int, user: str) -> bytes:
    await ws.send(msgpack.packb({"type": "auth_identify", "corr_id": corr_id, "username": user}))
    reply = msgpack.unpackb(await ws.recv())
    assert reply["ok"], reply
    challenge = base64.b64decode(reply["result"])
    assert len(challenge) == CHALLENGE_BYTES
    return challenge


async def _prove(ws: websockets.ClientConnection, corr_id: int, signature: bytes) -> dict:
    await ws.send(msgpack.packb({"type": "auth_prove", "corr_id": corr_id,
                                 "signature": base64.b64encode(signature).decode()}))
    return msgpack.unpackb(await ws.recv())


async def test_wrong_and_replayed_signatures_are_refused(server: Server) -> None:
    async with websockets.connect(server.url) as first:
        challenge = await _identify(first, 1, "alice")
        wrong = await _prove(first, 2, sign(ALICE_ED25519, challenge + b"x"))  # signs something else
        assert not wrong["ok"] and "matches none" in wrong["result"]
        challenge = await _identify(first, 3, "alice")
        good = sign(ALICE_ED25519, challenge)
        assert (await _prove(first, 4, good))["ok"]
        again = await _prove(first, 5, good)  # the same proof again on the same connection
        assert not again["ok"] and "already authenticated" in again["result"]
    async with websockets.connect(server.url) as second:
        await _identify(second, 1, "alice")  # a fresh challenge: the old signature does not answer it
        replayed = await _prove(second, 2, good)
        assert not replayed["ok"] and "matches none" in replayed["result"]
        await second.send(msgpack.packb({"type": "ping", "corr_id": 3}))
        with pytest.raises(TimeoutError):  # still not authenticated: nothing is answered
            await asyncio.wait_for(second.recv(), 0.5)
    async with websockets.connect(server.url) as third:
        stale = await _prove(third, 1, good)  # a proof with no challenge pending
        assert not stale["ok"] and "no challenge is pending" in stale["result"]


async def test_three_failures_close_the_connection(server: Server) -> None:
    async with websockets.connect(server.url) as ws:
        for corr_id in range(3):
            await ws.send(msgpack.packb({"type": "auth_by_token", "corr_id": corr_id, "token": "guess"}))
            assert not msgpack.unpackb(await ws.recv())["ok"]
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), scaled(5))
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401


async def test_the_internal_token_gets_in(server: Server) -> None:
    async with PieClient(server.url) as client:
        with pytest.raises(AuthError, match="token is wrong"):
            await client.authenticate_token("not-the-token")
        await client.authenticate_token(server.token, "operator")
        assert await client.models() == [MODEL]


async def test_the_openai_api_needs_the_bearer_token_when_auth_is_on(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        refused = await http.get("/v1/models")
        allowed = await http.get("/v1/models", headers={"Authorization": f"Bearer {server.token}"})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert allowed.status_code == 200 and allowed.json()["data"][0]["id"] == MODEL
