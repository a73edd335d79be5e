{
  description = "pie: programmable LLM serving. One package per flavor; `nix run` starts the server";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      # flavors/*.toml, the files install.sh and pie/flavors.py read.
      flavors = import ./nix/flavors.nix { flavorsDir = ./flavors; };
      systems = [ "x86_64-linux" "aarch64-linux" "aarch64-darwin" ];
      forAllSystems = lib.genAttrs systems;
      isCuda = flavor: flavor.cuda != "";

      # nixpkgs for one flavor: a CUDA flavor builds torch and FlashInfer against its CUDA release
      # ("12.8" -> cudaPackages_12_8), which is unfree and not in the default binary cache.
      pkgsFor =
        system: flavor:
        import nixpkgs (
          { inherit system; }
          // lib.optionalAttrs (isCuda flavor) {
            config = {
              allowUnfree = true;
              cudaSupport = true;
            };
            overlays = [
              (final: _: { cudaPackages = final."cudaPackages_${lib.replaceStrings [ "." ] [ "_" ] flavor.cuda}"; })
            ];
          }
        );

      packagesFor =
        system:
        let
          available = lib.filterAttrs (_: flavor: !(isCuda flavor) || lib.hasSuffix "-linux" system) flavors;
        in
        lib.mapAttrs (
          _: flavor:
          (pkgsFor system flavor).callPackage ./nix/package.nix {
            inherit flavor;
            src = self;
          }
        ) available;
    in
    {
      # packages.<system>.{default,portable,cuda12_6,cuda12_8,cuda13_0,portable_cuda12_6,...}
      packages = forAllSystems (system: packagesFor system // { default = (packagesFor system).portable; });

      apps = forAllSystems (
        system:
        let
          pkgs = nixpkgs.legacyPackages.${system};
          pie = self.packages.${system}.default;
        in
        {
          # `nix run` = `pie serve` (arguments after `--` go to it); `nix run .#pie -- doctor` = any command.
          default = {
            type = "app";
            program = "${pkgs.writeShellScript "pie-serve" ''exec ${lib.getExe pie} serve "$@"''}";
          };
          pie = {
            type = "app";
            program = lib.getExe pie;
          };
        }
      );

      # The dev shell and the checks use the portable package's nixpkgs, so one Python set serves all.
      devShells = forAllSystems (system: {
        default = import ./nix/shell.nix {
          pkgs = pkgsFor system flavors.portable;
          pie = self.packages.${system}.portable;
        };
      });

      checks = forAllSystems (
        system:
        import ./nix/checks.nix {
          pkgs = pkgsFor system flavors.portable;
          pie = self.packages.${system}.portable;
          src = self;
        }
      );

      # services.pie; `package` defaults to this flake's package of `services.pie.flavor`.
      nixosModules.default =
        { config, lib, pkgs, ... }:
        {
          imports = [ ./nix/module.nix ];
          services.pie.package = lib.mkDefault
            self.packages.${pkgs.stdenv.hostPlatform.system}.${lib.replaceStrings [ "." "-" ] [ "_" "_" ] config.services.pie.flavor};
        };

      overlays.default = final: _: { pie = self.packages.${final.stdenv.hostPlatform.system}.default; };
    };
}
