# Evaluates the NixOS module against stub declarations of the NixOS options it sets, with nixpkgs' `lib`
# alone (no nixpkgs package set is needed), and checks what it produces: positive and negative cases.
# Returns a trivial derivation when every check passes (so that it can be a flake check), and throws
# with the names of the failed checks otherwise.
{ lib, module, system ? "x86_64-linux" }:

let
  inherit (lib) mkOption types;
  anything = types.attrsOf types.anything;
  unit = types.attrsOf (types.submodule { freeformType = anything; });

  # The NixOS options the module sets or reads, declared loosely.
  stubs = {
    options = {
      assertions = mkOption { type = types.listOf types.unspecified; default = [ ]; };
      warnings = mkOption { type = types.listOf types.str; default = [ ]; };
      systemd.packages = mkOption { type = types.listOf types.unspecified; default = [ ]; };
      systemd.services = mkOption { type = unit; default = { }; };
      systemd.sockets = mkOption { type = unit; default = { }; };
      users.users = mkOption { type = unit; default = { }; };
      users.groups = mkOption { type = unit; default = { }; };
      networking.fqdnOrHostName = mkOption { type = types.str; default = "server"; };
      networking.firewall.allowedTCPPorts = mkOption { type = types.listOf types.port; default = [ ]; };
      security.acme.certs = mkOption {
        default = { };
        type = types.attrsOf (types.submodule ({ name, ... }: {
          freeformType = anything;
          options.directory = mkOption { type = types.str; default = "/var/lib/acme/${name}"; };
          options.group = mkOption { type = types.str; default = "acme"; };
        }));
      };
    };
  };

  # Just enough of pkgs. Nothing is written to the store (pure evaluation could not read it back):
  # the generator keeps the settings and runCommand its script, for the checks below to look at.
  fakeStorePath = name: "${builtins.storeDir}/00000000000000000000000000000000-${name}";
  pkgs = {
    formats.toml = _: {
      type = anything;
      generate = name: value: { outPath = fakeStorePath name; inherit value; };
    };
    runCommand = name: env: script: { outPath = fakeStorePath name; inherit name script; } // (env.passthru or { });
  };
  fakePackage = {
    type = "derivation";
    name = "rustmail";
    outPath = fakeStorePath "rustmail";
    meta.mainProgram = "rustmail";
  };

  eval = services: (lib.evalModules {
    modules = [
      stubs
      module
      { _module.args.pkgs = pkgs; }
      { services.rustmail = { enable = true; package = fakePackage; } // services; }
    ];
  }).config;

  failedAssertions = config: map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
  anyMessage = needle: config: lib.any (lib.hasInfix needle) (failedAssertions config);

  # The checked config file (it is also the restart trigger) and the settings it was generated from.
  configFileOf = config: lib.head config.systemd.services.rustmail.restartTriggers;
  settingsOf = config: (configFileOf config).unchecked.value;

  base = {
    settings.domains = [ "example.org" ];
    accounts."alice@example.org" = {
      hashedPasswordFile = "/run/keys/alice";
      aliases = [ "postmaster@example.org" ];
    };
  };

  good = eval (base // {
    openFirewall = true;
    listeners.pop3.listen = [ "0.0.0.0:110" "[::]:110" ];
  });
  goodSettings = settingsOf good;
  service = good.systemd.services.rustmail;
  credential = lib.head service.serviceConfig.LoadCredential;

  smtpOnly = eval (base // { listeners.pop3.enable = false; });

  withAcme = eval (base // {
    tls.acmeHost = "mx.example.org";
    listeners.submissions.enable = true;
    listeners.pop3s.enable = true;
  });
  acmeService = withAcme.systemd.services.rustmail.serviceConfig;

  checks = {
    "good config has no failed assertion" = failedAssertions good == [ ];
    "units come from the package" = good.systemd.packages == [ fakePackage ];
    "service is a drop-in" = service.overrideStrategy == "asDropin";
    "notify-reload replaces ExecReload" =
      service.serviceConfig.Type == "notify-reload" && service.serviceConfig.ExecReload == [ "" ];
    "ExecStart resets and serves the checked config" =
      lib.head service.serviceConfig.ExecStart == ""
      && lib.last service.serviceConfig.ExecStart
      == "${fakeStorePath "rustmail"}/bin/rustmail serve --config ${fakeStorePath "rustmail.toml"}";
    "config is checked at build time" =
      lib.hasInfix "/bin/rustmail check-config --skip-secret-files --config ${fakeStorePath "rustmail-unchecked.toml"}"
        (configFileOf good).script;
    "restart when the config changes" = lib.length service.restartTriggers == 1;
    "hash reaches the service through LoadCredential" =
      lib.length service.serviceConfig.LoadCredential == 1 && lib.hasSuffix ":/run/keys/alice" credential;
    "config points at the credential" =
      goodSettings.accounts."alice@example.org".password_hash_file
      == "/run/credentials/rustmail.service/${lib.head (lib.splitString ":" credential)}";
    "aliases are rendered" = goodSettings.accounts."alice@example.org".aliases == [ "postmaster@example.org" ];
    "listeners use the systemd sockets" = goodSettings.listen == {
      smtp = [ "systemd:smtp" ];
      pop3 = [ "systemd:pop3" ];
      submission = [ ];
      submissions = [ ];
      pop3s = [ ];
    };
    "domains and hostname are rendered" = goodSettings.domains == [ "example.org" ] && goodSettings.hostname == "server";
    "typed limits have their defaults" = goodSettings.limits.max_recipients == 100;
    "state in /var/lib/rustmail" = goodSettings.storage_root == "/var/lib/rustmail";
    "socket listens where configured" =
      good.systemd.sockets.rustmail-pop3.socketConfig.ListenStream == [ "" "0.0.0.0:110" "[::]:110" ]
      && good.systemd.sockets.rustmail-smtp.socketConfig.ListenStream == [ "" "25" ]
      && good.systemd.sockets.rustmail-smtp.wantedBy == [ "sockets.target" ];
    "firewall opens the listeners' ports" = lib.sort lib.lessThan good.networking.firewall.allowedTCPPorts == [ 25 110 110 ];
    "firewall closed by default" = smtpOnly.networking.firewall.allowedTCPPorts == [ ];
    "system user" = good.users.users.rustmail.isSystemUser && good.users.groups ? rustmail;
    "disabled listener: socket masked" = smtpOnly.systemd.sockets.rustmail-pop3.enable == false;
    "disabled listener: left out of the config" = (settingsOf smtpOnly).listen.pop3 == [ ];

    "no TLS listener by default" = service.serviceConfig.Sockets == [ ] && good.systemd.sockets.rustmail-submissions.enable == false;
    "ACME certificate is used in place" = (settingsOf withAcme).tls == {
      certificate = "/var/lib/acme/mx.example.org/fullchain.pem";
      key = "/var/lib/acme/mx.example.org/key.pem";
    };
    "ACME renewal reloads rustmail" = withAcme.security.acme.certs."mx.example.org".reloadServices == [ "rustmail.service" ];
    "ACME group can read the key" = acmeService.SupplementaryGroups == [ "acme" ] && acmeService.PrivateUsers == false;
    "enabled TLS listeners get their sockets" =
      acmeService.Sockets == [ "rustmail-submissions.socket" "rustmail-pop3s.socket" ]
      && (settingsOf withAcme).listen.submissions == [ "systemd:submissions" ]
      && withAcme.systemd.sockets.rustmail-pop3s.socketConfig.ListenStream == [ "" "995" ];
    "TLS listener without certificate is refused" = anyMessage "needs TLS" (eval (base // { listeners.submission.enable = true; }));
    "key in the Nix store is refused" = anyMessage "keyFile is in the Nix store" (eval (base // {
      tls.certificateFile = "/etc/ssl/mx.pem";
      tls.keyFile = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-key.pem";
    }));
    "hash in the Nix store is refused" = anyMessage "is in the Nix store" (eval (base // {
      accounts."alice@example.org".hashedPasswordFile = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-alice.hash";
    }));
    "no domain is refused" = anyMessage "at least one local domain" (eval (base // { settings.domains = [ ]; }));
    "no listener is refused" = anyMessage "enable at least one" (eval (base // {
      listeners.smtp.enable = false;
      listeners.pop3.enable = false;
    }));
    "settings.listen is refused" = anyMessage "settings.listen is set by the module" (eval (base // {
      settings.domains = [ "example.org" ];
      settings.listen.smtp = [ "0.0.0.0:25" ];
    }));
    "relative hash path is a type error" = !(builtins.tryEval (builtins.deepSeq
      (eval (base // { accounts."a@example.org".hashedPasswordFile = "alice.hash"; })).systemd.services.rustmail.serviceConfig.LoadCredential
      true)).success;
  };

  failed = lib.attrNames (lib.filterAttrs (_: ok: !ok) checks);
in
if failed == [ ] then
  derivation
  {
    name = "rustmail-module-eval";
    inherit system;
    builder = "/bin/sh";
    args = [ "-c" "echo ${toString (lib.length (lib.attrNames checks))} module checks passed > $out" ];
  }
else
  throw "rustmail module evaluation: failed checks: ${lib.concatStringsSep "; " failed}"
