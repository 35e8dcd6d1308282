# Just enough of NixOS and nixpkgs to evaluate services.rustmail with nixpkgs' `lib` alone: loose
# declarations of the NixOS options the module (and the VM tests' server node) set or read, and fake
# pkgs functions. Nothing is written to the store: each fake derivation keeps what it was made from
# (`fake` says how), and its store path is named after a hash of that, so that a change of content
# changes the path exactly as a rebuild would. Used by module-eval.nix and render.nix.
{ lib }:

let
  inherit (lib) mkOption types;
  anything = types.attrsOf types.anything;
  unit = types.attrsOf (types.submodule { freeformType = anything; });

  fakeStorePath = content: name:
    "${builtins.storeDir}/${builtins.substring 0 32 (builtins.hashString "sha256" (builtins.toJSON content))}-${name}";
  fake = kind: name: content: extra: {
    outPath = fakeStorePath [ kind content ] name;
    inherit name;
    fake = kind;
  } // extra;
in
{
  inherit fakeStorePath;

  options = {
    options = {
      assertions = mkOption { type = types.listOf types.unspecified; default = [ ]; };
      warnings = mkOption { type = types.listOf types.str; default = [ ]; };
      systemd.packages = mkOption { type = types.listOf types.unspecified; default = [ ]; };
      systemd.services = mkOption { type = unit; default = { }; };
      systemd.sockets = mkOption { type = unit; default = { }; };
      systemd.tmpfiles.rules = mkOption { type = types.listOf types.str; default = [ ]; };
      environment.systemPackages = mkOption { type = types.listOf types.unspecified; default = [ ]; };
      environment.etc = mkOption { type = unit; default = { }; };
      users.users = mkOption { type = unit; default = { }; };
      users.groups = mkOption { type = unit; default = { }; };
      networking.fqdnOrHostName = mkOption { type = types.str; default = "server"; };
      networking.firewall.allowedTCPPorts = mkOption { type = types.listOf types.port; default = [ ]; };
      security.acme.certs = mkOption {
        default = { };
        type = types.attrsOf (types.submodule ({ name, ... }: {
          freeformType = anything;
          options.directory = mkOption { type = types.str; default = "/var/lib/acme/${name}"; };
          options.group = mkOption { type = types.str; default = "acme"; };
        }));
      };
      specialisation = mkOption {
        default = { };
        type = types.attrsOf (types.submodule {
          options.configuration = mkOption { type = types.deferredModule; default = { }; };
        });
      };
    };
  };

  pkgs = {
    formats.toml = _: {
      type = anything;
      generate = name: value: fake "toml" name value { inherit value; };
    };
    runCommand = name: env: script:
      fake "runCommand" name [ env script ] { inherit script; } // (env.passthru or { });
    writeShellScript = name: text: fake "script" name text { inherit text; };
    openssl = "/usr";
  };

  package = {
    type = "derivation";
    name = "rustmail";
    outPath = fakeStorePath "package" "rustmail";
    fake = "package";
    meta.mainProgram = "rustmail";
  };
}
