# Evaluates the NixOS module against stub declarations of the NixOS options it sets, with nixpkgs' `lib`
# alone (no nixpkgs package set is needed), and checks what it produces: positive and negative cases.
# Returns a trivial derivation when every check passes (so that it can be a flake check), and throws
# with the names of the failed checks otherwise.
{ lib, module, system ? "x86_64-linux" }:

let
  stubLib = import ./stubs.nix { inherit lib; };
  stubs = stubLib.options;
  inherit (stubLib) pkgs;
  fakePackage = stubLib.package;

  evalWith = extra: services: (lib.evalModules {
    modules = [
      stubs
      module
      { _module.args.pkgs = pkgs; }
      { services.rustmail = { enable = true; package = fakePackage; } // services; }
    ] ++ extra;
  }).config;
  eval = evalWith [ ];
  # The user's own declaration of the certificate, as security.acme needs it.
  declareCert = group: { security.acme.certs."mx.example.org" = { domain = "mx.example.org"; } // lib.optionalAttrs (group != null) { inherit group; }; };

  failedAssertions = config: map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
  anyMessage = needle: config: lib.any (lib.hasInfix needle) (failedAssertions config);

  # The checked config file (it is also the restart trigger) and the settings it was generated from.
  configFileOf = config: lib.head config.systemd.services.rustmail.reloadTriggers;
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

  acmeServices = base // {
    tls.acmeHost = "mx.example.org";
    listeners.submissions.enable = true;
    listeners.pop3s.enable = true;
  };
  withAcme = evalWith [ (declareCert null) ] acmeServices;
  acmeService = withAcme.systemd.services.rustmail.serviceConfig;
  sharedCert = (evalWith [ (declareCert "certs") ] acmeServices).systemd.services.rustmail.serviceConfig;
  # nginx gives an enableACME vhost's certificate its group with mkDefault.
  nginxCert = evalWith [ (declareCert (lib.mkDefault "nginx")) ] acmeServices;

  custom = eval (base // {
    user = "mail";
    group = "mail";
    dataDir = "/srv/mail";
    openFirewall = true;
    listeners.smtp.listen = [ "192.0.2.10:25" ];
    settings = base.settings // { limits.shutdown_timeout_secs = 60; };
    accounts."bob@example.org" = {
      hashedPassword = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaA";
      apopSecretFile = "/run/keys/bob-apop";
    };
  });
  customService = custom.systemd.services.rustmail.serviceConfig;
  customSettings = settingsOf custom;
  listenersUnit = good.systemd.services.rustmail-listeners;

  withDkim = eval (base // {
    dkim = [{ domain = "example.org"; selector = "rm1"; keyFile = "/run/keys/dkim.pem"; }];
  });
  dkimSettings = settingsOf withDkim;
  noOutbound = eval (base // { settings = base.settings // { outbound.enable = false; }; });

  checks = {
    "good config has no failed assertion" = failedAssertions good == [ ];
    "units come from the package" = good.systemd.packages == [ fakePackage ];
    "service is a drop-in" = service.overrideStrategy == "asDropin";
    "notify-reload replaces ExecReload" =
      service.serviceConfig.Type == "notify-reload" && service.serviceConfig.ExecReload == [ "" ];
    "ExecStart resets and serves the checked config at a stable path" =
      lib.head service.serviceConfig.ExecStart == ""
      && lib.last service.serviceConfig.ExecStart
      == "${fakePackage}/bin/rustmail serve --config /etc/rustmail/rustmail.toml"
      && good.environment.etc."rustmail/rustmail.toml".source == configFileOf good;
    "config is checked at build time" =
      lib.hasInfix "/bin/rustmail check-config --skip-secret-files --config ${(configFileOf good).unchecked}"
        (configFileOf good).script;
    "a settings change changes the configuration's store path (the reload trigger)" =
      (configFileOf good).outPath != (configFileOf smtpOnly).outPath;
    "a config change reloads, a unit change restarts without stopping the sockets" =
      lib.length service.reloadTriggers == 1 && !(service ? restartTriggers) && service.stopIfChanged == false;
    "listener changes restart rustmail-listeners, which re-applies the sockets" =
      listenersUnit.stopIfChanged == false && listenersUnit.wantedBy == [ "multi-user.target" ]
      && listenersUnit.restartTriggers != (smtpOnly.systemd.services.rustmail-listeners.restartTriggers)
      && lib.hasInfix "systemctl restart" listenersUnit.serviceConfig.ExecStart.text
      && lib.hasInfix "stopped+=(rustmail-pop3.socket)" smtpOnly.systemd.services.rustmail-listeners.serviceConfig.ExecStart.text;
    "the package is on the system PATH" = good.environment.systemPackages == [ fakePackage ];
    "TimeoutStopSec follows shutdown_timeout_secs" =
      service.serviceConfig.TimeoutStopSec == "45s" && customService.TimeoutStopSec == "75s";
    "state in the StateDirectory by default" =
      service.serviceConfig.StateDirectory == [ "" "rustmail" ] && good.systemd.tmpfiles.rules == [ ];
    "custom user, group and data directory" =
      customService.User == "mail" && customService.Group == "mail" && customSettings.storage_root == "/srv/mail"
      && customService.ReadWritePaths == [ "/srv/mail" ] && customService.StateDirectory == [ "" ]
      && custom.systemd.tmpfiles.rules == [ "d /srv/mail 0700 mail mail - -" ]
      && !(custom.users.users ? rustmail) && !(custom.users.groups ? rustmail);
    "inline hash and APOP secret" =
      customSettings.accounts."bob@example.org".password_hash == "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaA"
      && lib.hasPrefix "/run/credentials/rustmail.service/apop-" customSettings.accounts."bob@example.org".apop_secret_file
      && lib.length customService.LoadCredential == 1
      && lib.any (lib.hasSuffix ":/run/keys/bob-apop") customService.LoadCredential;
    "both hash options are refused" = anyMessage "exactly one of hashedPasswordFile and hashedPassword" (eval (base // {
      accounts."alice@example.org" = { hashedPasswordFile = "/run/keys/alice"; hashedPassword = "$2b$x"; };
    }));
    "no hash is refused" = anyMessage "exactly one of hashedPasswordFile and hashedPassword" (eval (base // {
      accounts."alice@example.org" = { };
    }));
    "firewall opens the configured ports" = lib.sort lib.lessThan custom.networking.firewall.allowedTCPPorts == [ 25 110 ];
    "a Unix socket path is refused" = anyMessage "TCP sockets only" (eval (base // { listeners.smtp.listen = [ "/run/smtp.sock" ]; }));
    "an enabled listener without addresses is refused" = anyMessage "listeners.pop3.listen is empty" (eval (base // { listeners.pop3.listen = [ ]; }));
    "each socket records what it listens on" =
      lib.hasInfix "printf '%s' '0.0.0.0:110 [::]:110' > /run/rustmail-listeners/pop3"
        good.systemd.sockets.rustmail-pop3.socketConfig.ExecStartPost.text
      && lib.hasInfix "rm -f /run/rustmail-listeners/pop3" smtpOnly.systemd.services.rustmail-listeners.serviceConfig.ExecStart.text;
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
    "state in /var/lib/rustmail" = goodSettings.storage_root == "/var/lib/rustmail" && service.serviceConfig.User == "rustmail";
    "socket listens where configured" =
      good.systemd.sockets.rustmail-pop3.socketConfig.ListenStream == [ "" "0.0.0.0:110" "[::]:110" ]
      && good.systemd.sockets.rustmail-smtp.socketConfig.ListenStream == [ "" "25" ]
      && good.systemd.sockets.rustmail-smtp.wantedBy == [ "sockets.target" ];
    "firewall opens the listeners' ports" = lib.sort lib.lessThan good.networking.firewall.allowedTCPPorts == [ 25 110 110 ];
    "firewall closed by default" = smtpOnly.networking.firewall.allowedTCPPorts == [ ];
    "system user" = good.users.users.rustmail.isSystemUser && good.users.groups ? rustmail;
    "disabled listener: socket masked" = smtpOnly.systemd.sockets.rustmail-pop3.enable == false;
    "disabled listener: left out of the config" = (settingsOf smtpOnly).listen.pop3 == [ ];

    "no TLS listener by default" = good.systemd.sockets.rustmail-submissions.enable == false && goodSettings.listen.submissions == [ ];
    "ACME certificate is used in place" = (settingsOf withAcme).tls == {
      certificate = "/var/lib/acme/mx.example.org/fullchain.pem";
      key = "/var/lib/acme/mx.example.org/key.pem";
    };
    "ACME renewal reloads rustmail" = withAcme.security.acme.certs."mx.example.org".reloadServices == [ "rustmail.service" ];
    "ACME certificate belongs to rustmail's own group, not the acme group" =
      withAcme.security.acme.certs."mx.example.org".group == "rustmail" && acmeService.SupplementaryGroups == [ ]
      && !(acmeService ? PrivateUsers);
    "a certificate shared under another group is read through it" =
      sharedCert.SupplementaryGroups == [ "certs" ] && sharedCert.PrivateUsers == false;
    "a certificate nginx shares (group set with mkDefault) does not conflict" =
      nginxCert.security.acme.certs."mx.example.org".group == "nginx"
      && nginxCert.systemd.services.rustmail.serviceConfig.SupplementaryGroups == [ "nginx" ];
    "rustmail starts after the ACME unit made the certificate" =
      withAcme.systemd.services.rustmail.after == [ "acme-mx.example.org.service" "rustmail-listeners.service" ]
      && withAcme.systemd.services.rustmail.wants == [ "acme-mx.example.org.service" ];
    "an undeclared ACME certificate is refused" = anyMessage ''security.acme.certs."mx.example.org" is not declared'' (eval acmeServices);
    "enabled TLS listeners get their sockets" =
      (settingsOf withAcme).listen.submissions == [ "systemd:submissions" ]
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
    "no listener is refused, naming every listener" = anyMessage "listeners.{pop3,pop3s,smtp,submission,submissions}" (eval (base // {
      listeners.smtp.enable = false;
      listeners.pop3.enable = false;
    }));
    "settings.listen is refused" = anyMessage "settings.listen is set by the module" (eval (base // {
      settings.domains = [ "example.org" ];
      settings.listen.smtp = [ "0.0.0.0:25" ];
    }));
    "outbound delivery has the network by default" =
      service.serviceConfig.PrivateNetwork == false
      && service.serviceConfig.RestrictAddressFamilies == [ "" "AF_UNIX" "AF_INET" "AF_INET6" ];
    "without outbound delivery the service has no network" =
      noOutbound.systemd.services.rustmail.serviceConfig.PrivateNetwork == true
      && noOutbound.systemd.services.rustmail.serviceConfig.RestrictAddressFamilies == [ "" "AF_UNIX" ]
      && (settingsOf noOutbound).outbound.enable == false;
    "a DKIM key reaches the service through LoadCredential" =
      let
        cred = lib.last withDkim.systemd.services.rustmail.serviceConfig.LoadCredential;
        key = lib.head dkimSettings.outbound.dkim;
      in
      lib.hasSuffix ":/run/keys/dkim.pem" cred && key.domain == "example.org" && key.selector == "rm1"
      && key.key_file == "/run/credentials/rustmail.service/${lib.head (lib.splitString ":" cred)}";
    "a DKIM key in the Nix store is refused" = anyMessage "is in the Nix store" (eval (base // {
      dkim = [{ domain = "example.org"; keyFile = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-dkim.pem"; }];
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
