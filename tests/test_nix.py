"""The Nix files, checked with Debian's nix-bin and no network: every file parses; the pure-builtins
readers agree with Python about flavors/*.toml and pyproject.toml; and the flake's outputs are laid
out as promised (a stub of the six nixpkgs.lib functions the top level uses stands in for nixpkgs,
which cannot be fetched here; package bodies are never forced)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from timing import scaled

from pie.flavors import load_flavors

REPO = Path(__file__).resolve().parent.parent
NIX_FILES = sorted([REPO / "flake.nix", *(REPO / "nix").glob("*.nix")])
pytestmark = pytest.mark.skipif(shutil.which("nix-instantiate") is None,
                                reason="nix-instantiate is not installed (Debian: apt-get install nix-bin)")

# The nixpkgs.lib functions flake.nix calls outside package bodies, written with builtins.
STUB_LIB = """{
  genAttrs = names: f: builtins.listToAttrs (map (n: { name = n; value = f n; }) names);
  mapAttrs = builtins.mapAttrs;
  filterAttrs = pred: set: builtins.listToAttrs (builtins.filter (e: pred e.name e.value)
    (map (n: { name = n; value = set.${n}; }) (builtins.attrNames set)));
  optionalAttrs = cond: set: if cond then set else { };
  hasSuffix = suffix: s: let n = builtins.stringLength s; m = builtins.stringLength suffix;
    in n >= m && builtins.substring (n - m) m s == suffix;
  replaceStrings = builtins.replaceStrings;
}"""


def nix(*args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    # A private state dir: nix-instantiate works without a daemon or /nix/var as any user.
    env = {**os.environ, "NIX_STATE_DIR": str(tmp / "state"), "NIX_CONFIG": "build-users-group ="}
    return subprocess.run(["nix-instantiate", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=scaled(60), check=False)


def evaluate(expression: str, tmp: Path) -> Any:
    result = nix("--eval", "--strict", "--json", "-E", expression, tmp=tmp)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("path", NIX_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_nix_file_parses(path: Path, tmp_path: Path) -> None:
    result = nix("--parse", str(path), tmp=tmp_path)
    assert result.returncode == 0, result.stderr


def test_parse_catches_a_syntax_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.nix"
    broken.write_text((REPO / "nix" / "module.nix").read_text().replace("in\n{", "in\n{{", 1))
    assert nix("--parse", str(broken), tmp=tmp_path).returncode != 0


def test_nix_reads_the_same_flavors(tmp_path: Path) -> None:
    from_nix = evaluate("import ./nix/flavors.nix { flavorsDir = ./flavors; }", tmp_path)
    flavors = load_flavors(REPO / "flavors")
    assert {f["name"] for f in from_nix.values()} == set(flavors)
    for attr, data in from_nix.items():
        flavor = flavors[data["name"]]
        assert attr == flavor.nix_attr
        assert (data["cuda"], data["device"], tuple(data["extras"])) == (flavor.cuda, flavor.device, flavor.extras)
        assert (data["torch"]["build"], data["torch"]["index_url"]) == (flavor.torch_build, flavor.torch_index_url)
        assert data["flashinfer"]["build"] == flavor.flashinfer_build
        assert (data["driver"]["min_version"], data["driver"]["auto"]) == (flavor.min_driver, flavor.auto)


def test_nix_dependencies_are_pyprojects(tmp_path: Path) -> None:
    """nix/pyproject.nix keeps requirements without markers and drops marked ones; every marker must
    therefore be false on the Python the package builds with (3.11+), or the Nix package would miss it."""
    from_nix = evaluate("import ./nix/pyproject.nix { pyprojectFile = ./pyproject.toml; }", tmp_path)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    python311 = {key: str(value) for key, value in default_environment().items()}
    python311.update(python_version="3.11", python_full_version="3.11.0")

    def names(requirements: list[str]) -> list[str]:
        kept: list[str] = []
        for requirement in map(Requirement, requirements):
            if requirement.marker is None:
                kept.append(canonicalize_name(requirement.name))
            else:
                assert not requirement.marker.evaluate(python311), f"{requirement}: teach nix/pyproject.nix"
        return kept

    assert (from_nix["name"], from_nix["version"]) == (project["name"], project["version"])
    assert from_nix["dependencies"] == names(project["dependencies"])
    assert from_nix["optionalDependencies"] == {
        extra: names(requirements) for extra, requirements in project["optional-dependencies"].items()}


def test_flake_outputs_are_laid_out_per_flavor(tmp_path: Path) -> None:
    outputs = f"""
      let
        flake = import ./flake.nix;
        out = flake.outputs {{ self = {{ }}; nixpkgs = {{ lib = {STUB_LIB}; }}; }};
      in {{
        description = flake.description;
        nixpkgs = flake.inputs.nixpkgs.url;
        outputs = builtins.attrNames out;
        linux = builtins.attrNames out.packages.x86_64-linux;
        darwin = builtins.attrNames out.packages.aarch64-darwin;
        apps = builtins.attrNames out.apps.x86_64-linux;
        systems = builtins.attrNames out.checks;
      }}"""
    layout = evaluate(outputs, tmp_path)
    attrs = sorted(f.nix_attr for f in load_flavors(REPO / "flavors").values())
    assert layout["outputs"] == ["apps", "checks", "devShells", "nixosModules", "overlays", "packages"]
    assert layout["linux"] == sorted([*attrs, "default"])
    assert {"default", "portable", "cuda12_6", "cuda12_8", "cuda13_0"} <= set(layout["linux"])
    assert layout["darwin"] == ["default", "portable"]  # CUDA flavors are Linux-only
    assert layout["apps"] == ["default", "pie"]
    assert layout["systems"] == ["aarch64-darwin", "aarch64-linux", "x86_64-linux"]
    assert layout["nixpkgs"].startswith("github:NixOS/nixpkgs/")


MODULE_STUBS = """
  lib = {
    mkOption = option: option;
    mkEnableOption = what: { description = what; };
    mkIf = condition: content: { inherit condition content; };
    mkDefault = value: value;
    optionals = condition: list: if condition then list else [ ];
    findFirst = pred: default: list:
      let found = builtins.filter pred list; in if found == [ ] then default else builtins.head found;
    literalExpression = text: text;
    literalMD = text: text;
    getExe = package: "${package}/bin/pie";
    types = { enum = values: values; package = "package"; str = "str"; bool = "bool";
              attrsOf = type: type; submodule = module: module; };
  };
  pkgs.formats.toml = _: { type = "toml"; generate = name: value: "/nix/store/${name}"; };
"""


def module_service(tmp: Path, settings: str = "{ }") -> dict[str, Any]:
    """Evaluates nix/module.nix with the lib stubs above and a user's `services.pie` values."""
    expression = f"""
      let
        {MODULE_STUBS}
        cfg = {{ enable = true; flavor = "cuda12.8"; package = "/nix/store/pie"; user = "pie"; group = "pie";
                 gpu = true; openFirewall = false; environment = {{ }}; settings = {settings}; }};
        module = import ./nix/module.nix {{ config.services.pie = cfg; inherit lib pkgs; }};
        service = module.config.content.systemd.services.pie;
      in {{
        options = builtins.attrNames module.options.services.pie;
        serviceConfig = service.serviceConfig;
        environment = service.environment;
        defaultModel = module.config.content.services.pie.settings.model;
      }}"""
    return dict(evaluate(expression, tmp))


def test_nixos_module_runs_the_service_as_the_unit_file_does(tmp_path: Path) -> None:
    """services.pie and systemd/pie.service must not drift: same user, sandbox, devices, stop handling,
    environment and command (the module's binary is the package's; /var/lib is what %S means)."""
    from test_systemd import SYSTEM_UNIT, Unit, command_line, environment, substitute

    module = module_service(tmp_path)
    assert module["options"] == sorted(["enable", "flavor", "package", "user", "group", "settings", "gpu",
                                        "openFirewall", "environment"])
    assert module["defaultModel"] == [{"hf_repo": "pie/tiny-random", "device": ["cuda:0"]}]
    unit, specifiers = Unit.read(SYSTEM_UNIT), {"%S": "/var/lib"}
    service = module["serviceConfig"]
    unit_keys = {key for section, key, _ in unit.entries if section == "Service"} - {"Environment", "ExecStart"}
    assert set(service) - {"ExecStart"} == unit_keys
    for key in unit_keys:
        values = service[key] if isinstance(service[key], list) else [service[key]]
        rendered = ["yes" if v is True else "no" if v is False else str(v) for v in values]
        assert rendered == [substitute(v, specifiers) for v in unit.all(key)], key
    assert service["ExecStart"].split()[1:] == command_line(unit, specifiers)[1:]
    assert module["environment"] == environment(unit, specifiers)


def test_nixos_module_stop_timeout_follows_the_settings(tmp_path: Path) -> None:
    service = module_service(tmp_path, "{ shutdown_timeout_s = 60.5; }")["serviceConfig"]
    assert service["TimeoutStopSec"] == "76s"
    service = module_service(tmp_path, "{ server.shutdown_timeout_s = 5; }")["serviceConfig"]
    assert service["TimeoutStopSec"] == "20s"
