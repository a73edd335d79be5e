# What tests and linters need beyond pie's own dependencies, shared by the dev shell and the checks.
# Dev extras of pyproject.toml that nixpkgs lacks are left out, and the tests that need them skip.
{ pkgs }:
let
  project = import ./pyproject.nix { pyprojectFile = ../pyproject.toml; };
in
{
  pythonPackages = ps: builtins.filter (p: p != null) (map (name: ps.${name} or null) project.optionalDependencies.dev);
  programs = [
    pkgs.shellcheck
    pkgs.nix
    pkgs.systemd
    pkgs.ruff
  ];
}
