# The NixOS VM tests, one per testScript in this directory. Each script opens with a comment saying what
# it proves; the same scripts run under systemd-nspawn through tests/nspawn/driver.py.
{ pkgs, self }:

let
  mailclient = pkgs.writeScriptBin "mailclient" ''
    #!${pkgs.python3.interpreter}
    ${builtins.readFile ./mailclient.py}
  '';
  # A throw-away certificate for the TLS listeners; tests/nspawn/setup-server makes the same.
  testCert = pkgs.runCommand "rustmail-test-cert" { nativeBuildInputs = [ pkgs.openssl ]; } ''
    mkdir $out
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 -subj /CN=server \
      -addext "subjectAltName=DNS:server,IP:127.0.0.1" -keyout $out/key.pem -out $out/cert.pem
  '';
  vmTest = name: pkgs.testers.runNixOSTest {
    name = "rustmail-${name}";
    nodes.server = {
      imports = [ self.nixosModules.default (import ./server.nix { inherit testCert; }) ];
    };
    nodes.client = {
      environment.systemPackages = [ mailclient ];
      # The server's test certificate, for the client to verify it (tls.py passes it as --cafile).
      environment.etc."rustmail-test/cert.pem".source = "${testCert}/cert.pem";
    };
    testScript = builtins.readFile (./. + "/${name}.py");
  };
  names = [ "basic" "socket_activation" "persistence" "hardening" "tls" ];
in
pkgs.lib.listToAttrs (map (name: pkgs.lib.nameValuePair "vm-${name}" (vmTest name)) names)
