# The server node of the VM tests. tests/nixos/server.toml is the same configuration for the runs of
# these tests under systemd-nspawn.
{ testCert }:
{ config, pkgs, ... }:

let
  # A test password's hash may live in the store; real ones must not (the module asserts it).
  aliceHash = pkgs.runCommand "alice.hash" { } ''
    echo alice-password | ${config.services.rustmail.package}/bin/rustmail hash-password > $out
  '';
in
{
  environment.etc."rustmail-test/alice.hash".source = aliceHash;
  environment.etc."rustmail-test/cert.pem".source = "${testCert}/cert.pem";
  environment.etc."rustmail-test/key.pem" = {
    source = "${testCert}/key.pem";
    mode = "0440";
    group = "rustmail";
  };

  services.rustmail = {
    enable = true;
    openFirewall = true;
    settings = {
      hostname = "server";
      domains = [ "example.test" ];
      # The client node reaches the server over the test network, and there is no TLS yet.
      auth.allow_unencrypted_remote = true;
      # The test's receiving server (mailclient sink on the client) listens here, not on 25.
      outbound.port = 2526;
    };
    tls.certificateFile = "/etc/rustmail-test/cert.pem";
    tls.keyFile = "/etc/rustmail-test/key.pem";
    listeners.submission.enable = true;
    listeners.submissions.enable = true;
    listeners.pop3s.enable = true;
    accounts."alice@example.test" = {
      hashedPasswordFile = "/etc/rustmail-test/alice.hash";
      aliases = [ "postmaster@example.test" ];
    };
  };

  # The configurations switch.py switches to, one kind of change each.
  specialisation = {
    # Settings only: a reload.
    limits.configuration.services.rustmail.settings.limits.max_recipients = 150;
    # One account more (a LoadCredential= more): a restart, the sockets staying open.
    account.configuration.services.rustmail.accounts."bob@example.test".hashedPasswordFile = "/etc/rustmail-test/alice.hash";
    # POP3 on another port: its socket must move.
    moved.configuration.services.rustmail.listeners.pop3.listen = [ "1110" ];
    # POP3 switched off: its socket masked and stopped, the switch still succeeding.
    nopop3.configuration.services.rustmail.listeners.pop3.enable = false;
  };
}
