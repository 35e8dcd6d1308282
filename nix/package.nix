# The rustmail package: the daemon built from Cargo.lock with its Rust tests run in the build, plus the
# systemd units and sysusers.d entry from systemd/ (the same files every distribution ships).
{ lib, rustPlatform }:

let
  cargoToml = lib.importTOML ../Cargo.toml;
in
rustPlatform.buildRustPackage {
  pname = cargoToml.package.name;
  inherit (cargoToml.package) version;

  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../src
      ../tests/socket_activation.rs
      ../tests/parsers_never_panic.rs
      ../systemd
    ];
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
