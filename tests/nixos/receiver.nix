# The receiving server of two_servers.py (mail for b.test, bob), at 192.168.1.2, MX mx.b.test, with a
# certificate for that name from the test CA.
{ testCert }:
{ config, pkgs, ... }:

let
  bobHash = pkgs.runCommand "bob.hash" { } ''
    echo bob-password | ${config.services.rustmail.package}/bin/rustmail hash-password > $out
  '';
in
{
  environment.etc."rustmail-test/bob.hash".source = bobHash;
  environment.etc."rustmail-test/mx-cert.pem".source = "${testCert}/mx-cert.pem";
  environment.etc."rustmail-test/mx-key.pem" = {
    source = "${testCert}/mx-key.pem";
    mode = "0440";
    group = "rustmail";
  };

  services.rustmail = {
    enable = true;
    openFirewall = true;
    settings = {
      hostname = "mx.b.test";
      domains = [ "b.test" ];
      auth.allow_unencrypted_remote = true;
    };
    tls.certificateFile = "/etc/rustmail-test/mx-cert.pem";
    tls.keyFile = "/etc/rustmail-test/mx-key.pem";
    accounts."bob@b.test".hashedPasswordFile = "/etc/rustmail-test/bob.hash";
  };
}
