# Renders what NixOS would put on disk for a node of the VM tests (tests/nixos/server.nix, or another
# node file given as serverNode, with the module), for tests/nspawn/setup-nixos to lay out in a container under real systemd. Evaluated with
# nixpkgs' lib and the stubs of stubs.nix; the unit text follows nixos/lib/systemd-lib.nix:
#  - units of systemd.packages are symlinked into /etc/systemd/system;
#  - a unit with overrideStrategy = "asDropin" becomes <unit>.d/overrides.conf, any other a whole unit;
#  - a unit with enable = false that a package ships is masked (a symlink to /dev/null);
#  - sections hold one `Key=value` line per list element; restartTriggers and reloadTriggers become
#    X-Restart-Triggers= / X-Reload-Triggers= naming a file of their JSON, stopIfChanged = false
#    X-StopIfChanged=false, and every service gets Environment="PATH=…" from its `path`;
#  - wantedBy becomes a symlink in <target>.wants/;
#  - environment.etc entries are symlinks to their source, or copies where a mode is set.
# Output (JSON): { package, base, specialisations.<name>, derivations }, where package is the store path
# the package's files go to, base and each specialisation are
# { files, systemPackages, users, groups }, and derivations lists every fake derivation to build, dependencies first.
{ lib, module, serverNode, systemdDir }:

let
  inherit (lib) concatStrings concatMapStrings mapAttrsToList optionalString filterAttrs;
  stubs = import ./stubs.nix { inherit lib; };
  inherit (stubs) pkgs;
  testCert = import ../nixos/test-cert.nix { inherit (pkgs) runCommand openssl; };
  node = import serverNode { inherit testCert; };

  eval = extra: (lib.evalModules {
    modules = [
      stubs.options
      module
      node
      { _module.args.pkgs = pkgs; services.rustmail.package = stubs.package; }
    ] ++ extra;
  }).config;

  # systemd-lib.nix: toOption and attrsToSection.
  toOption = x: if x == true then "true" else if x == false then "false" else toString x;
  attrsToSection = attrs: concatStrings (lib.concatLists (mapAttrsToList
    (name: value: map (x: "${name}=${toOption x}\n") (if lib.isList value then value else [ value ]))
    attrs));
  triggerFile = kind: name: triggers:
    stubs.fakeStorePath (map builtins.toJSON triggers) "X-${kind}-Triggers-${name}";

  unitSection = name: def: filterAttrs (_: v: v != "" && v != [ ]) ({
    Description = def.description or "";
    After = toString (def.after or [ ]);
    Before = toString (def.before or [ ]);
    Wants = toString (def.wants or [ ]);
    Requires = toString (def.requires or [ ]);
    X-Restart-Triggers = optionalString ((def.restartTriggers or [ ]) != [ ]) (triggerFile "Restart" name def.restartTriggers);
    X-Reload-Triggers = optionalString ((def.reloadTriggers or [ ]) != [ ]) (triggerFile "Reload" name def.reloadTriggers);
  } // (def.unitConfig or { }));

  serviceText = name: def: ''
    [Unit]
    ${attrsToSection (unitSection name def)}
    [Service]
    Environment="PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
    ${optionalString ((def.stopIfChanged or true) == false) "X-StopIfChanged=false"}
    ${attrsToSection (def.serviceConfig or { })}
  '';
  socketText = name: def: ''
    [Unit]
    ${attrsToSection (unitSection name def)}
    [Socket]
    ${attrsToSection (def.socketConfig or { })}
  '';

  packagedUnits = lib.attrNames (filterAttrs (n: t: t == "regular" && (lib.hasSuffix ".service" n || lib.hasSuffix ".socket" n))
    (builtins.readDir systemdDir));

  layout = config:
    let
      units = lib.mapAttrs' (n: v: lib.nameValuePair "${n}.service" (v // { text = serviceText n v; })) config.systemd.services
        // lib.mapAttrs' (n: v: lib.nameValuePair "${n}.socket" (v // { text = socketText n v; })) config.systemd.sockets;
      fromPackage = name: lib.elem name packagedUnits && config.systemd.packages != [ ];
      dir = "etc/systemd/system";
      unitFiles = lib.concatLists (mapAttrsToList
        (name: def:
          if (def.enable or true) == false then
            lib.optional (fromPackage name) { path = "${dir}/${name}"; link = "/dev/null"; }
          else
            [
              (if (def.overrideStrategy or "asDropinIfExists") == "asDropin" || fromPackage name
              then { path = "${dir}/${name}.d/overrides.conf"; text = def.text; }
              else { path = "${dir}/${name}"; text = def.text; })
            ]
            ++ map (target: { path = "${dir}/${target}.wants/${name}"; link = "../${name}"; }) (def.wantedBy or [ ]))
        units);
      packageLinks = lib.concatMap
        (package: map (name: { path = "${dir}/${name}"; link = "${package}/lib/systemd/system/${name}"; }) packagedUnits)
        config.systemd.packages;
      # A unit masked (or written whole) here replaces the package's file of the same name.
      ownPaths = map (f: f.path) unitFiles;
      etcFiles = mapAttrsToList
        (name: entry:
          if (entry.mode or "symlink") == "symlink"
          then { path = "etc/${name}"; link = toString entry.source; }
          else { path = "etc/${name}"; copy = toString entry.source; inherit (entry) mode; user = entry.user or "root"; group = entry.group or "root"; })
        config.environment.etc;
      tmpfiles = lib.optional (config.systemd.tmpfiles.rules != [ ])
        { path = "etc/tmpfiles.d/00-nixos.conf"; text = lib.concatMapStrings (r: r + "\n") config.systemd.tmpfiles.rules; };
    in
    {
      files = lib.filter (f: !lib.elem f.path ownPaths) packageLinks
        ++ unitFiles ++ etcFiles ++ tmpfiles;
      # NixOS links these into /run/current-system/sw/bin, on every shell's PATH.
      systemPackages = map toString config.environment.systemPackages;
      users = mapAttrsToList (name: u: { inherit name; inherit (u) group; home = u.home or "/var/empty"; }) config.users.users;
      groups = lib.attrNames config.users.groups;
      assertions = map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
    };

  base = eval [ ];
  specialised = lib.mapAttrs (_: s: eval [ s.configuration ]) base.specialisation;
  configs = [ base ] ++ lib.attrValues specialised;

  # The fake derivations to build: whatever environment.etc, the checked configuration (a reload or
  # restart trigger) and the units' Exec*= refer to.
  isFake = v: lib.isAttrs v && v ? fake;
  derivationsOf = config:
    let
      etc = lib.filter isFake (mapAttrsToList (_: e: e.source or null) config.environment.etc);
      configFiles = lib.concatMap (s: lib.filter (t: isFake t && t ? unchecked) (s.reloadTriggers or [ ] ++ s.restartTriggers or [ ])) (lib.attrValues config.systemd.services);
      unitValues = lib.concatMap (u: lib.concatMap lib.toList (lib.attrValues (u.serviceConfig or u.socketConfig or { })))
        (lib.attrValues config.systemd.services ++ lib.attrValues config.systemd.sockets);
      scripts = lib.filter isFake unitValues;
    in
    lib.concatMap (c: [ c.unchecked c ]) configFiles ++ etc ++ scripts;
  # (`out`, not `outPath`: builtins.toJSON would turn the whole set into its path.)
  describe = d: { out = d.outPath; inherit (d) name fake; } // lib.optionalAttrs (d ? script) { inherit (d) script; }
    // lib.optionalAttrs (d ? text) { inherit (d) text; } // lib.optionalAttrs (d ? value) { inherit (d) value; };
in
{
  package = toString stubs.package;
  base = layout base;
  specialisations = lib.mapAttrs (_: layout) specialised;
  derivations = lib.unique (map describe ([ testCert ] ++ lib.concatMap derivationsOf configs));
}
