# The sending server of two_servers.py (mail for a.test, alice): it delivers what alice submits to
# other domains, looking up their MX on the DNS server of the client node (192.168.1.1: the NixOS test
# driver numbers nodes in the order of their names, client, receiver, sender), over STARTTLS verified
# against the test CA, signing with a DKIM key made at first boot by `rustmail dkim-keygen`, whose DNS
# record the script publishes.
{ testCert }:
{ config, pkgs, ... }:

let
  aliceHash = pkgs.runCommand "alice.hash" { } ''
    echo alice-password | ${config.services.rustmail.package}/bin/rustmail hash-password > $out
  '';
in
{
  environment.etc."rustmail-test/alice.hash".source = aliceHash;
  environment.etc."rustmail-test/ca.pem".source = "${testCert}/ca.pem";
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
      hostname = "mx.a.test";
      domains = [ "a.test" ];
      # The client node fetches over the test network without TLS.
      auth.allow_unencrypted_remote = true;
      outbound = {
        dns_servers = [ "192.168.1.1" ];
        tls_trust_file = "/etc/rustmail-test/ca.pem";
        # b.test is reached over verified TLS or not at all; other domains opportunistically.
        tls_domains."b.test" = "verified";
        # The test waits for a retry of a deferred message.
        retry_intervals_secs = [ 5 ];
      };
    };
    tls.certificateFile = "/etc/rustmail-test/mx-cert.pem";
    tls.keyFile = "/etc/rustmail-test/mx-key.pem";
    listeners.submission.enable = true;
    accounts."alice@a.test".hashedPasswordFile = "/etc/rustmail-test/alice.hash";
    dkim = [{ domain = "a.test"; selector = "vmtest"; keyFile = "/var/lib/rustmail-test/dkim.pem"; }];
  };

  # The key, made once before rustmail first starts (it reads it through LoadCredential=), and the
  # record to publish beside it, as an administrator would with `rustmail dkim-keygen`.
  systemd.services.rustmail-test-dkim = {
    description = "Make the DKIM key of a.test";
    wantedBy = [ "rustmail.service" ];
    before = [ "rustmail.service" ];
    serviceConfig = {
      Type = "oneshot";
      RemainAfterExit = true;
      ExecStart = pkgs.writeShellScript "rustmail-test-dkim" ''
        set -eu
        mkdir -p /var/lib/rustmail-test
        cd /var/lib/rustmail-test
        test -e dkim.pem || ${config.services.rustmail.package}/bin/rustmail dkim-keygen a.test \
          --selector vmtest --out dkim.pem > dkim.txt
      '';
    };
  };
}
