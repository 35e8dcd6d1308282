# Evaluates nix/oci-image.nix with a stub dockerTools and checks its image configuration against the
# OCI image spec's config keys (dockerTools passes `config` through as the image's config, where an
# unknown key such as WorkingDirectory is silently ignored). Throws naming the failed checks.
{ lib }:

let
  image = import ../../nix/oci-image.nix {
    dockerTools.buildLayeredImage = attrs: attrs;
    rustmail = { outPath = "/nix/store/00000000000000000000000000000000-rustmail"; version = "0"; };
  };
  # https://github.com/opencontainers/image-spec/blob/main/config.md, "config" properties.
  ociKeys = [ "User" "ExposedPorts" "Env" "Entrypoint" "Cmd" "Volumes" "WorkingDir" "Labels" "StopSignal" "ArgsEscaped" ];
  checks = {
    "only OCI config keys" = lib.all (k: lib.elem k ociKeys) (lib.attrNames image.config);
    "not root" = (image.config.User or "root") != "root" && !(lib.hasPrefix "0:" (image.config.User or "0:"));
    "working directory is the state volume" = (image.config.WorkingDir or null) == "/var/lib/rustmail";
    "every listener's port is exposed" = lib.attrNames image.config.ExposedPorts
      == [ "110/tcp" "25/tcp" "465/tcp" "587/tcp" "995/tcp" ];
    "the state directory belongs to the image's user" = image.config ? User && lib.hasInfix "chown ${image.config.User} var/lib/rustmail" (image.fakeRootCommands or "");
  };
  failed = lib.attrNames (lib.filterAttrs (_: ok: !ok) checks);
in
if failed == [ ] then "${toString (lib.length (lib.attrNames checks))} OCI image checks passed"
else throw "nix/oci-image.nix: failed checks: ${lib.concatStringsSep "; " failed}"
