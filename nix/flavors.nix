# flavors/*.toml as Nix data, read with builtins only (no nixpkgs): the same files install.sh and
# pie/flavors.py read, so the flake never repeats a torch index, a CUDA release or a FlashInfer build.
#
#   import ./flavors.nix { flavorsDir = ../flavors; }
#   => { cuda12_8 = { name = "cuda12.8"; attr = "cuda12_8"; cuda = "12.8"; torch = { ... }; ... }; ... }
{ flavorsDir }:
let
  isToml = file: builtins.match ".*\\.toml" file != null;
  files = builtins.filter isToml (builtins.attrNames (builtins.readDir flavorsDir));
  load =
    file:
    let
      name = builtins.head (builtins.match "(.*)\\.toml" file);
      # A package attribute: "cuda12.8" -> "cuda12_8", "portable-cuda12.8" -> "portable_cuda12_8".
      attr = builtins.replaceStrings [ "." "-" ] [ "_" "_" ] name;
    in
    builtins.fromTOML (builtins.readFile (flavorsDir + "/${file}")) // { inherit name attr; };
in
builtins.listToAttrs (
  map (
    file:
    let
      flavor = load file;
    in
    {
      name = flavor.attr;
      value = flavor;
    }
  ) files
)
