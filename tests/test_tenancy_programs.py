"""Program namespaces: an upload belongs to its uploader. Bob's upload under alice's name@version, or under
a standard inferlet's, never runs for alice or for the OpenAI endpoint; force_overwrite replaces only
bob's own programs."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from server_support import MODEL, running_server

from pie.errors import ProgramError
from pie.runtime.programs import ProgramRegistry, stdlib_path

STANDARD = "text-completion@0.1.0"


def manifest(name: str, version: str) -> str:
    return f'[package]\nname = "{name}"\nversion = "{version}"\n'


def says(word: str) -> dict[str, bytes]:
    return {"main.py": f"def main(input):\n    return {word!r}\n".encode()}


def source(registry: ProgramRegistry, spec: str, user: str | None) -> str:
    return registry.resolve(spec, user).source()


def test_an_upload_is_its_uploaders_alone(tmp_path: Path) -> None:
    registry = ProgramRegistry([tmp_path], standard=stdlib_path())
    registry.add("tool", "1.0.0", says("alice's"), manifest("tool", "1.0.0"), owner="alice")
    registry.add("tool", "1.0.0", says("bob's"), manifest("tool", "1.0.0"), owner="bob")  # his own copy
    registry.add("tool", "1.0.0", says("bob's, forced"), manifest("tool", "1.0.0"), owner="bob", force=True)
    assert "alice's" in source(registry, "tool@1.0.0", "alice")
    assert "alice's" in source(registry, "tool", "alice")
    assert "bob's, forced" in source(registry, "tool@1.0.0", "bob")
    assert not registry.has("tool", "carol") and not registry.has("tool")  # nobody else sees either
    assert [p.name for p in registry.programs("carol")].count("tool") == 0
    assert {p.version for p in registry.programs("alice") if p.name == "tool"} == {"1.0.0"}
    with pytest.raises(ProgramError, match="already installed with different files"):  # force only own
        registry.add("tool", "1.0.0", says("alice again"), manifest("tool", "1.0.0"), owner="alice")


def test_no_upload_replaces_a_standard_inferlet(tmp_path: Path) -> None:
    registry = ProgramRegistry([tmp_path], standard=stdlib_path())
    name, version = STANDARD.split("@")
    for force in (False, True):
        with pytest.raises(ProgramError, match="is a standard inferlet and cannot be replaced"):
            registry.add(name, version, says("hijacked"), manifest(name, version), owner="bob", force=force)
    # The same bytes again are harmless (a client re-uploading what is installed).
    original = registry.resolve(STANDARD)
    registry.add(name, version, original.files(), (original.root / "Pie.toml").read_text(),  # type: ignore[operator]
                 owner="bob")
    # A higher version of a standard name is bob's own: it never shadows the standard one for alice.
    registry.add(name, "99.0.0", says("hijacked"), manifest(name, "99.0.0"), owner="bob")
    assert "hijacked" not in source(registry, name, "alice")
    assert "hijacked" in source(registry, name, "bob")


def test_standard_library_before_the_operators_folders(tmp_path: Path) -> None:
    name, version = STANDARD.split("@")
    (tmp_path / "shadow").mkdir()
    (tmp_path / "shadow" / "Pie.toml").write_text(manifest(name, version))
    (tmp_path / "shadow" / "main.py").write_text("def main(input):\n    return 'operator'\n")
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "Pie.toml").write_text(manifest("extra-tool", "0.1.0"))
    (tmp_path / "extra" / "main.py").write_text("def main(input):\n    return 'operator'\n")
    registry = ProgramRegistry([tmp_path], standard=stdlib_path())
    assert "operator" not in source(registry, STANDARD, "alice")
    assert "operator" in source(registry, "extra-tool", "alice")


def test_a_pinned_spec_names_the_standard_inferlet_by_content(tmp_path: Path) -> None:
    registry = ProgramRegistry([tmp_path], standard=stdlib_path())
    pinned = registry.standard_spec("openai-compat")
    assert pinned.startswith("openai-compat@") and "#sha256=" in pinned
    name = pinned.split("@")[0]
    registry.add(name, "9.9.9", says("hijacked"), manifest(name, "9.9.9"), owner="openai")
    assert registry.resolve(pinned, "openai").origin == str(stdlib_path() / "openai-compat")
    with pytest.raises(ProgramError, match="no standard inferlet"):
        registry.resolve(pinned[:-4] + "0000", "openai")  # another hash: not silently something else


async def test_uploads_never_run_for_another_user_or_the_openai_endpoint() -> None:
    async with running_server() as server:
        assert server.state is not None
        runtime = server.state.runtime
        runtime.add_program("tool", "1.0.0", says("alice's"), manifest("tool", "1.0.0"), owner="alice")
        runtime.add_program("tool", "1.0.0", says("bob's"), manifest("tool", "1.0.0"), owner="bob", force=True)
        for user in ("openai", "bob"):  # a higher version under the endpoint's own inferlet name
            runtime.add_program("openai-compat", "9.9.9", says("hijacked"), manifest("openai-compat", "9.9.9"),
                                owner=user)
        process = await runtime.launch("tool@1.0.0", "{}", username="alice")
        assert (await process.wait()).value == "alice's"
        process = await runtime.launch("tool@1.0.0", "{}", username="bob")
        assert (await process.wait()).value == "bob's"
        async with httpx.AsyncClient(base_url=server.http_url, timeout=120) as http:
            reply = await http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
        assert reply.status_code == 200, reply.text
        assert "hijacked" not in reply.text and json.loads(reply.text)["object"] == "text_completion"
