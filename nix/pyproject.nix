# pyproject.toml's [project] table as Nix data, read with builtins only (no nixpkgs), so that the
# Nix package's dependencies are pyproject.toml's and written nowhere else.
#
#   import ./pyproject.nix { pyprojectFile = ../pyproject.toml; }
#   => { name = "pie"; version = "0.1.0"; dependencies = [ "torch" "numpy" ... ]; optionalDependencies = { cuda = [ ... ]; ... }; }
{ pyprojectFile }:
let
  project = (builtins.fromTOML (builtins.readFile pyprojectFile)).project;
  upper = [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ];
  lower = [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ];
  # PEP 503: lower case, `_` and `.` as `-` (nixpkgs names Python packages this way).
  normalise = name: builtins.replaceStrings ([ "_" "." ] ++ upper) ([ "-" "-" ] ++ lower) name;
  # "transformers>=4.56" -> "transformers"; "pie-client>=0.5,<0.6" -> "pie-client".
  nameOf = requirement: normalise (builtins.head (builtins.match "[[:space:]]*([A-Za-z0-9][A-Za-z0-9._-]*).*" requirement));
  # A requirement with an environment marker applies to some Pythons only; pie's markers are all
  # for Python < 3.11, which this package never builds with (tests/test_nix.py checks that).
  unconditional = builtins.filter (requirement: builtins.match ".*;.*" requirement == null);
  names = requirements: map nameOf (unconditional requirements);
in
{
  inherit (project) name version;
  dependencies = names project.dependencies;
  optionalDependencies = builtins.mapAttrs (_: names) (project.optional-dependencies or { });
}
