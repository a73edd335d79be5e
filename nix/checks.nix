# `nix flake check`: the test suite on the CPU against the portable package's dependencies, plus
# shellcheck. Left out: tests/test_install.py (pip installs from package indexes, which the build
# sandbox cannot reach) and GPU tests.
{
  pkgs,
  pie, # the portable package
  src,
}:
let
  devTools = import ./dev-tools.nix { inherit pkgs; };
  python = pkgs.python3.withPackages (ps: pie.passthru.pythonDependencies ++ devTools.pythonPackages ps);
in
{
  tests =
    pkgs.runCommand "pie-tests"
      {
        nativeBuildInputs = [ python ] ++ devTools.programs;
      }
      ''
        cp -r ${src} source
        chmod -R u+w source
        cd source
        export HOME="$TMPDIR" NIX_STATE_DIR="$TMPDIR/nix" NIX_STORE_DIR="$TMPDIR/store"
        python -m pytest -q -p no:cacheprovider -m "not gpu" --ignore=tests/test_install.py
        touch "$out"
      '';
  shellcheck = pkgs.runCommand "pie-shellcheck" { nativeBuildInputs = [ pkgs.shellcheck ]; } ''
    shellcheck ${src}/install.sh
    touch "$out"
  '';
}
