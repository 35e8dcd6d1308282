# The NixOS VM tests, one per testScript in this directory. Each script opens with a comment saying what
# it proves; the same scripts run under systemd-nspawn through tests/nspawn/driver.py.
{ pkgs, self }:

let
  mailclient = pkgs.writeScriptBin "mailclient" ''
    #!${pkgs.python3.interpreter}
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
in
pkgs.lib.listToAttrs (map (name: pkgs.lib.nameValuePair "vm-${name}" (vmTest name)) names)
