# The rustmail package: the daemon built from Cargo.lock with its Rust tests run in the build, plus the
# systemd units and sysusers.d entry from systemd/ (the same files every distribution ships).
# `cargo test` runs in the build sandbox: no network but loopback, no HOME, no program outside the Rust
# toolchain and stdenv (test certificates are made in Rust). tests/nix/sandbox-build imitates it in CI.
{ lib, rustPlatform }:

let
  cargoToml = lib.importTOML ../Cargo.toml;
  # One list of the files the build needs, shared with tests/nix/sandbox-build (which imitates this
  # build's sandbox with exactly these files): lines of paths, `#` starts a comment.
  sourceFiles = lib.filter (line: line != "")
    (map (line: lib.trim (lib.head (lib.splitString "#" line)))
      (lib.splitString "\n" (builtins.readFile ./source-files)));
in
rustPlatform.buildRustPackage {
  pname = cargoToml.package.name;
  inherit (cargoToml.package) version;

  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions (map (path: ../. + "/${path}") sourceFiles);
  };

  cargoLock.lockFile = ../Cargo.lock;

  postInstall = ''
    install -Dm644 -t $out/lib/systemd/system systemd/rustmail.service systemd/rustmail-*.socket
    install -Dm644 systemd/rustmail.sysusers $out/lib/sysusers.d/rustmail.conf
    install -Dm644 systemd/rustmail.toml $out/share/doc/rustmail/rustmail.toml.example
    substituteInPlace $out/lib/systemd/system/rustmail.service \
      --replace-fail /usr/bin/rustmail $out/bin/rustmail
  '';

  meta = {
    description = "Small, hard-to-break mail server: SMTP in, Maildir, POP3 out, native to systemd";
    mainProgram = "rustmail";
    platforms = lib.platforms.linux;
  };
}
