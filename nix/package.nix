# One flavor of pie as a Nix package: pie built from this source with the flavor's torch (CPU, or
# CUDA from the nixpkgs the flake configured for the flavor's CUDA release) and FlashInfer when the
# flavor has it. The dependency list is pyproject.toml's (./pyproject.nix).
{
  lib,
  python3Packages,
  src,
  flavor, # one entry of ./flavors.nix
}:
let
  py = python3Packages;
  project = import ./pyproject.nix { pyprojectFile = src + "/pyproject.toml"; };
  # PEP 503 names whose nixpkgs attribute is spelled differently.
  renamed = {
    flashinfer-python = if py ? flashinfer-python then "flashinfer-python" else "flashinfer";
  };
  pythonPackage =
    name:
    let
      attr = renamed.${name} or name;
    in
    py.${attr}
      or (throw "pie: nixpkgs has no python3Packages.${attr} for pie's dependency '${name}'; map it in nix/package.nix");
  extras = lib.concatMap (extra: project.optionalDependencies.${extra}) flavor.extras;
  dependencies = map pythonPackage (lib.unique (project.dependencies ++ extras));
in
py.buildPythonApplication {
  pname = "pie";
  inherit (project) version;
  inherit src;
  pyproject = true;
  build-system = [ py.setuptools py.wheel ];
  inherit dependencies;
  # nixpkgs pins its own versions; pyproject.toml's ranges are for pip.
  pythonRelaxDeps = true;
  # What pie/flavors.py reads: the flavor this package was built as, and where the flavor files
  # went (the wheel's data files land in $out/share/pie, outside the interpreter's prefix).
  makeWrapperArgs = [
    "--set-default" "PIE_INSTALLED_FLAVOR" flavor.name
    "--set-default" "PIE_FLAVORS_DIR" "${placeholder "out"}/share/pie/flavors"
  ];
  # The test suite runs in the flake's checks (./checks.nix), against this package's dependencies.
  doCheck = false;
  pythonImportsCheck = [ "pie" "pie.flavors" ];
  passthru = {
    inherit flavor;
    pythonDependencies = dependencies;
  };
  meta = {
    description = "pie, programmable LLM serving (${flavor.name}: ${flavor.description})";
    license = lib.licenses.asl20;
    mainProgram = "pie";
    platforms = if flavor.cuda == "" then lib.platforms.unix else lib.platforms.linux;
  };
}
