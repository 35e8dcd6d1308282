# The NixOS VM tests, one per testScript in this directory. Each script opens with a comment saying what
# it proves; the same scripts run under systemd-nspawn through tests/nspawn/driver.py.
{ pkgs, self }:

let
  # dkimpy and dnspython for `mailclient dkim-verify` (two_servers.py).
  python = pkgs.python3.withPackages (p: [ p.dkimpy p.dnspython ]);
  mailclient = pkgs.writeScriptBin "mailclient" ''
    #!${python.interpreter}
    ${builtins.readFile ./mailclient.py}
  '';
  testCert = import ./test-cert.nix { inherit (pkgs) runCommand openssl; };
  vmTest = name: pkgs.testers.runNixOSTest {
    name = "rustmail-${name}";
    nodes.server = {
      imports = [ self.nixosModules.default (import ./server.nix { inherit testCert; }) ];
    };
    nodes.client = {
      environment.systemPackages = [ mailclient ];
      # The server's test certificate, for the client to verify it (tls.py passes it as --cafile).
      environment.etc."rustmail-test/cert.pem".source = "${testCert}/cert.pem";
      # tls.py's receiving server for outbound delivery (mailclient sink).
      networking.firewall.allowedTCPPorts = [ 2526 ];
    };
    testScript = builtins.readFile (./. + "/${name}.py");
  };
  names = [ "basic" "socket_activation" "persistence" "hardening" "tls" "switch" ];

  # Two servers on the test network: the sender (a.test) delivers to the receiver (b.test), looking
  # the MX up on the client's DNS server (the script starts dnsmasq there).
  twoServers = pkgs.testers.runNixOSTest {
    name = "rustmail-two-servers";
    nodes.sender.imports = [ self.nixosModules.default (import ./sender.nix { inherit testCert; }) ];
    nodes.receiver.imports = [ self.nixosModules.default (import ./receiver.nix { inherit testCert; }) ];
    nodes.client = {
      environment.systemPackages = [ mailclient pkgs.dnsmasq ];
      environment.etc."rustmail-test/ca.pem".source = "${testCert}/ca.pem";
      networking.firewall.allowedTCPPorts = [ 53 ];
      networking.firewall.allowedUDPPorts = [ 53 ];
    };
    testScript = builtins.readFile ./two_servers.py;
  };
in
pkgs.lib.listToAttrs (map (name: pkgs.lib.nameValuePair "vm-${name}" (vmTest name)) names)
  // { vm-two-servers = twoServers; }
