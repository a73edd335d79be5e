# The development shell: pie's dependencies (from the portable package), the test tools that
# nixpkgs has, and the linters the tests call (shellcheck, nix, systemd-analyze).
# `nix develop`, then: python -m pytest -q
{
  pkgs,
  pie, # the portable package
}:
let
  devTools = import ./dev-tools.nix { inherit pkgs; };
in
pkgs.mkShell {
  packages = [
    (pkgs.python3.withPackages (ps: pie.passthru.pythonDependencies ++ devTools.pythonPackages ps))
  ] ++ devTools.programs;
  shellHook = ''
    # Import pie from this checkout, not from the store.
    export PYTHONPATH="$PWD''${PYTHONPATH:+:$PYTHONPATH}"
  '';
}
