{
  description = "rustmail: a small, hard-to-break mail server (SMTP in, Maildir, POP3 out), native to systemd";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs = { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [ "x86_64-linux" "aarch64-linux" ];
      # The package set of each system. CI on machines without nixpkgs evaluates this flake against
      # nixpkgs' `lib` alone (tests/nix/check); there is no package set then, and only the checks that
      # need none remain.
      pkgsFor = lib.genAttrs systems (system: nixpkgs.legacyPackages.${system} or null);
      withPkgs = f: lib.mapAttrs f (lib.filterAttrs (_: pkgs: pkgs != null) pkgsFor);
    in
    {
      overlays.default = final: _prev: {
        rustmail = final.callPackage ./nix/package.nix { };
      };

      # The package is built with the system's own pkgs (its overlays, config and platform), not with
      # this flake's package set.
      nixosModules.default = { lib, pkgs, ... }: {
        imports = [ ./nixos-module ];
        services.rustmail.package = lib.mkDefault (pkgs.callPackage ./nix/package.nix { });
      };

      packages = withPkgs (system: pkgs: {
        default = pkgs.callPackage ./nix/package.nix { };
        oci-image = pkgs.callPackage ./nix/oci-image.nix { rustmail = self.packages.${system}.default; };
      });

      apps = withPkgs (system: _pkgs: {
        default = {
          type = "app";
          program = lib.getExe self.packages.${system}.default;
        };
      });

      checks = lib.mapAttrs
        (system: pkgs:
          {
            module-eval = import ./tests/nix/module-eval.nix {
              inherit lib system;
              module = ./nixos-module;
            };
          }
          // lib.optionalAttrs (pkgs != null) {
            package = self.packages.${system}.default;
            formatting = pkgs.runCommand "rustmail-formatting"
              { nativeBuildInputs = [ pkgs.nixpkgs-fmt pkgs.cargo pkgs.rustfmt ]; } ''
              cd ${self}
              nixpkgs-fmt --check $(find . -name '*.nix')
              cargo fmt --check
              touch $out
            '';
          }
          // lib.optionalAttrs (pkgs ? testers) (import ./tests/nixos { inherit pkgs self; }))
        pkgsFor;

      devShells = withPkgs (system: pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ self.packages.${system}.default ];
          packages = [ pkgs.clippy pkgs.rustfmt pkgs.nixpkgs-fmt pkgs.swaks (pkgs.python3.withPackages (p: [ p.pytest p.pytest-timeout ])) ];
        };
      });

      formatter = withPkgs (_system: pkgs: pkgs.nixpkgs-fmt);
    };
}
