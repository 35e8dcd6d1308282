# The NixOS VM tests, one per testScript in this directory. Each script opens with a comment saying what
# it proves; the same scripts run under systemd-nspawn through tests/nspawn/driver.py.
{ pkgs, self }:

let
  mailclient = pkgs.writeScriptBin "mailclient" ''
    #!${pkgs.python3.interpreter}
    ${builtins.readFile ./mailclient.py}
  '';
  vmTest = name: pkgs.testers.runNixOSTest {
    name = "rustmail-${name}";
    nodes.server = {
      imports = [ self.nixosModules.default ./server.nix ];
    };
    nodes.client = {
      environment.systemPackages = [ mailclient ];
    };
    testScript = builtins.readFile (./. + "/${name}.py");
  };
  names = [ "basic" "socket_activation" "persistence" "hardening" ];
in
pkgs.lib.listToAttrs (map (name: pkgs.lib.nameValuePair "vm-${name}" (vmTest name)) names)
