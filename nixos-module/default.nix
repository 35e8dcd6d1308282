# services.rustmail: the NixOS module.
#
# The unit files come from the package (systemd.packages), the same files Debian or Arch users get; this
# module layers the NixOS specifics on top as drop-ins: the generated configuration (checked at build
# time), secrets through LoadCredential, the listen addresses of each socket, and Type=notify-reload.
#
# What `nixos-rebuild switch` does (switch-to-configuration touches only the units whose files changed):
#  - a changed configuration (settings, TLS files) reloads the service: it lives at the stable path
#    /etc/rustmail/rustmail.toml and is a reload trigger, and rustmail applies it on SIGHUP;
#  - a changed unit (new package, accounts added or removed) restarts the service (stopIfChanged = false),
#    while systemd keeps the sockets open: connections wait in the backlog, none is refused;
#  - switch-to-configuration never restarts socket units, so a listener enabled, disabled or moved to
#    other addresses is applied by rustmail-listeners.service, whose restart trigger is the set of
#    listeners: it stops rustmail, restarts exactly the sockets whose addresses changed (stops disabled
#    ones) and lets the next connection start rustmail with the new sockets.
{ config, lib, options, pkgs, ... }:

let
  inherit (lib)
    attrValues
    concatMap
    filterAttrs
    getExe
    hasPrefix
    literalExpression
    mapAttrs
    mapAttrs'
    mapAttrsToList
    mkEnableOption
    mkIf
    mkOption
    mkPackageOption
    nameValuePair
    optional
    optionalAttrs
    types
    ;

  cfg = config.services.rustmail;
  settingsFormat = pkgs.formats.toml { };

  # Listener names follow RFC 8314, so that STARTTLS (smtp, submission, pop3) and implicit TLS
  # (submissions, pop3s) cannot be confused.
  listenerInfo = {
    smtp = {
      port = 25;
      what = "SMTP for incoming mail (port 25, STARTTLS offered when TLS is configured)";
      default = true;
      tls = false;
    };
    submission = {
      port = 587;
      what = "message submission (port 587, STARTTLS required before AUTH)";
      default = false;
      tls = true;
    };
    submissions = {
      port = 465;
      what = "message submission over implicit TLS (port 465)";
      default = false;
      tls = true;
    };
    pop3 = {
      port = 110;
      what = "POP3 for fetching mail (port 110, STLS offered when TLS is configured)";
      default = true;
      tls = false;
    };
    pop3s = {
      port = 995;
      what = "POP3 over implicit TLS (port 995)";
      default = false;
      tls = true;
    };
  };


  acme = cfg.tls.acmeHost != null;
  acmeCert = config.security.acme.certs.${cfg.tls.acmeHost};
  acmeDirectory = acmeCert.directory;
  # This module adds reloadServices to the certificate, which alone would create it with default
  # settings: require that some other module declares it.
  moduleFile = "rustmail/nixos-module/default.nix";
  acmeDeclared = lib.any (def: def.file != moduleFile && def.value ? ${cfg.tls.acmeHost})
    options.security.acme.certs.definitionsWithLocations;
  tlsFiles =
    if acme then {
      certificate = "${acmeDirectory}/fullchain.pem";
      key = "${acmeDirectory}/key.pem";
    } else if cfg.tls.certificateFile != null then {
      certificate = cfg.tls.certificateFile;
      key = cfg.tls.keyFile;
    } else null;

  # Password hashes travel through LoadCredential: never through the Nix store, never on argv.
  credentialsDir = "/run/credentials/rustmail.service";
  credentialName = kind: address: "${kind}-" + builtins.substring 0 16 (builtins.hashString "sha256" address);

  enabledListeners = filterAttrs (_: listener: listener.enable) cfg.listeners;

  # ListenStream= values: a port or an address:port (rustmail serves TCP sockets only).
  portOf = listen: lib.toInt (lib.last (lib.splitString ":" listen));
  isPath = listen: hasPrefix "/" listen || hasPrefix "@" listen;

  # What the sockets are: when it changes, rustmail-listeners.service applies it (see the top).
  listenAddresses = name: lib.concatStringsSep " " (cfg.listeners.${name}.listen);
  stateDir = "/run/rustmail-listeners";
  # Each socket records the addresses it was started with (ExecStartPost=), so the script below sees
  # what systemd really listened on when rustmail got its sockets, even on the first switch after an
  # upgrade that adds this machinery. The record of a disabled listener is removed once rustmail has
  # been stopped (it held that socket too).
  recordListener = name: pkgs.writeShellScript "rustmail-record-${name}" ''
    mkdir -p ${stateDir}
    printf '%s' ${lib.escapeShellArg (listenAddresses name)} > ${stateDir}/${name}
  '';
  applyListeners = pkgs.writeShellScript "rustmail-apply-listeners" (''
    set -euo pipefail
    changed=()
    stopped=()
  '' + lib.concatMapStrings
    (name:
      if cfg.listeners.${name}.enable then ''
        if [ "$(cat ${stateDir}/${name} 2>/dev/null || true)" != ${lib.escapeShellArg (listenAddresses name)} ]; then
          changed+=(rustmail-${name}.socket)
        fi
      '' else ''
        if [ -e ${stateDir}/${name} ]; then
          stopped+=(rustmail-${name}.socket)
        fi
      '')
    (lib.attrNames listenerInfo) + ''
    if [ $(( ''${#changed[@]} + ''${#stopped[@]} )) -gt 0 ]; then
      # rustmail holds the old listening sockets, and systemd refuses to start a socket whose service
      # runs: rustmail must stop first. Not with `systemctl stop`: when the same switch restarts
      # rustmail.service, that job is queued (ordered after this unit) and a stop job would cancel it
      # and fail the switch. A SIGTERM is rustmail's graceful stop; the queued restart (or the next
      # connection) then starts it with the new sockets.
      systemctl kill --kill-whom=main --signal=SIGTERM rustmail.service || true
      for _ in $(seq ${toString ((cfg.settings.limits.shutdown_timeout_secs + 15) * 10)}); do
        case "$(systemctl show -P ActiveState rustmail.service)" in inactive | failed) break ;; esac
        sleep 0.1
      done
      [ ''${#stopped[@]} -eq 0 ] || systemctl stop "''${stopped[@]}"
      [ ''${#changed[@]} -eq 0 ] || systemctl restart "''${changed[@]}"
    fi
  '' + lib.concatMapStrings (name: lib.optionalString (!cfg.listeners.${name}.enable) "rm -f ${stateDir}/${name}\n")
    (lib.attrNames listenerInfo));

  stateDirectory = hasPrefix "/var/lib/" cfg.dataDir;

  # Outbound delivery needs the network; without it the service gets none (PrivateNetwork).
  outbound = (cfg.settings.outbound or { }).enable or true;
  dkimCredential = key: credentialName "dkim" "${key.selector}._domainkey.${key.domain}";

  hashFiles = filterAttrs (_: account: account.hashedPasswordFile != null) cfg.accounts;
  apopFiles = filterAttrs (_: account: account.apopSecretFile != null) cfg.accounts;

  finalSettings = cfg.settings // optionalAttrs (tlsFiles != null) { tls = tlsFiles; } // optionalAttrs (cfg.dkim != [ ]) {
    outbound = (cfg.settings.outbound or { }) // {
      dkim = (cfg.settings.outbound.dkim or [ ]) ++ map
        (key: {
          inherit (key) domain selector;
          key_file = "${credentialsDir}/${dkimCredential key}";
        })
        cfg.dkim;
    };
  } // {
    storage_root = cfg.dataDir;
    listen = mapAttrs (name: listener: optional listener.enable "systemd:${name}") cfg.listeners;
    accounts = mapAttrs
      (address: account: { inherit (account) aliases; }
        // (if account.hashedPasswordFile != null
      then { password_hash_file = "${credentialsDir}/${credentialName "account" address}"; }
      else { password_hash = account.hashedPassword; })
        // optionalAttrs (account.apopSecretFile != null) {
        apop_secret_file = "${credentialsDir}/${credentialName "apop" address}";
      })
      cfg.accounts;
  };

  generatedConfig = settingsFormat.generate "rustmail-unchecked.toml" finalSettings;

  # A bad setting fails the system build, not the running server.
  configFile = pkgs.runCommand "rustmail.toml" { passthru.unchecked = generatedConfig; } ''
    ${getExe cfg.package} check-config --skip-secret-files --config ${generatedConfig}
    cp ${generatedConfig} $out
  '';

  accountModule = {
    options = {
      hashedPasswordFile = mkOption {
        type = types.nullOr (types.strMatching "/.+");
        default = null;
        example = "/run/secrets/rustmail/alice";
        description = ''
          Absolute path of a file holding the account's password hash, as printed by
          `rustmail hash-password` (argon2id; bcrypt and SHA-512-crypt work too). It is read by systemd
          (LoadCredential) when the service starts, so it may be readable by root only. It must not be in
          the Nix store. Exactly one of this and `hashedPassword`.
        '';
      };
      hashedPassword = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "$argon2id$v=19$m=19456,t=2,p=1$…";
        description = ''
          The password hash inline, as printed by `rustmail hash-password`. It ends up in the Nix store,
          which every local user can read (as with `users.users.<name>.hashedPassword`): prefer
          `hashedPasswordFile`.
        '';
      };
      apopSecretFile = mkOption {
        type = types.nullOr (types.strMatching "/.+");
        default = null;
        example = "/run/secrets/rustmail/alice-apop";
        description = ''
          A file holding a shared secret in clear, which enables POP3 APOP for this account (off by
          default and weaker: APOP uses MD5 and the secret is stored reversibly). Read through
          LoadCredential like the password hash; must not be in the Nix store.
        '';
      };
      aliases = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "postmaster@example.org" ];
        description = "More addresses delivered to this account. An alias listed by several accounts reaches them all.";
      };
    };
  };

  dkimModule = {
    options = {
      domain = mkOption {
        type = types.str;
        example = "example.org";
        description = "The domain whose mail is signed (the `d=` of the signature; the From: domain).";
      };
      selector = mkOption {
        type = types.strMatching "[A-Za-z0-9-]+(\\.[A-Za-z0-9-]+)*";
        default = "rustmail";
        description = "The selector: the public key is published at SELECTOR._domainkey.DOMAIN.";
      };
      keyFile = mkOption {
        type = types.strMatching "/.+";
        example = "/run/secrets/rustmail/dkim-example.org.pem";
        description = ''
          The private key (PEM), as written by `rustmail dkim-keygen DOMAIN --selector SELECTOR`, which
          also prints the DNS record to publish. Read by systemd (LoadCredential), so it may be readable
          by root only; it must not be in the Nix store.
        '';
      };
    };
  };

  listenerModule = name: info: {
    enable = mkOption {
      type = types.bool;
      default = info.default;
      description = "Whether to serve ${info.what}.";
    };
    listen = mkOption {
      type = types.listOf types.str;
      default = [ (toString info.port) ];
      example = [ "192.0.2.10:${toString info.port}" "[2001:db8::10]:${toString info.port}" ];
      description = ''
        `ListenStream=` values of the `rustmail-${name}.socket` unit: a port (every address, IPv4 and
        IPv6) or `address:port`.
        systemd owns these sockets, so the service needs no capability to use port ${toString info.port},
        and restarts refuse no connection. A change takes effect on `nixos-rebuild switch`.
      '';
    };
  };
in
{
  # Names this module's definitions, so that the ACME check above can tell them from the user's.
  _file = moduleFile;

  options.services.rustmail = {
    enable = mkEnableOption "rustmail, a small SMTP and POP3 mail server";

    package = mkPackageOption pkgs "rustmail" { };

    user = mkOption {
      type = types.str;
      default = "rustmail";
      description = "The user the service runs as; created when it is the default.";
    };
    group = mkOption {
      type = types.str;
      default = "rustmail";
      description = "The group the service runs as; created when it is the default. TLS keys must be readable by it.";
    };
    dataDir = mkOption {
      type = types.strMatching "/.+";
      default = "/var/lib/rustmail";
      description = ''
        Where the spool and the Maildirs live (`storage_root`). Under /var/lib it is the service's
        StateDirectory; elsewhere it is created for the service's user and made writable in the sandbox.
      '';
    };

    settings = mkOption {
      default = { };
      description = ''
        rustmail's configuration, rendered to TOML; see README.md for every key. The module sets
        `listen`, `accounts` and `storage_root` itself from the options above.
      '';
      example = literalExpression ''
        {
          domains = [ "example.org" ];
          limits.max_message_size = 50 * 1024 * 1024;
        }
      '';
      type = types.submodule {
        freeformType = settingsFormat.type;
        options = {
          hostname = mkOption {
            type = types.str;
            default = config.networking.fqdnOrHostName;
            defaultText = literalExpression "config.networking.fqdnOrHostName";
            description = "The name the server gives itself in the SMTP greeting and in `Received:` headers.";
          };
          domains = mkOption {
            type = types.listOf types.str;
            default = [ ];
            example = [ "example.org" ];
            description = "The local domains: their mail is delivered here; mail for any other domain is refused (never relayed).";
          };
          limits = mkOption {
            default = { };
            description = "Limits (see README.md for all of them and their defaults).";
            type = types.submodule {
              freeformType = settingsFormat.type;
              options = {
                max_message_size = mkOption {
                  type = types.ints.positive;
                  default = 25 * 1024 * 1024;
                  description = "Largest accepted message in octets, advertised as SIZE.";
                };
                max_recipients = mkOption {
                  type = types.ints.positive;
                  default = 100;
                  description = "Recipients per message.";
                };
                max_connections = mkOption {
                  type = types.ints.positive;
                  default = 256;
                  description = "Concurrent connections over all listeners.";
                };
                shutdown_timeout_secs = mkOption {
                  type = types.ints.positive;
                  default = 30;
                  description = "How long a stop waits for sessions to reach a safe point; the unit's TimeoutStopSec is 15 s more.";
                };
              };
            };
          };
        };
      };
    };

    accounts = mkOption {
      type = types.attrsOf (types.submodule accountModule);
      default = { };
      example = literalExpression ''
        {
          "alice@example.org" = {
            hashedPasswordFile = "/run/secrets/rustmail/alice";
            aliases = [ "postmaster@example.org" ];
          };
        }
      '';
      description = "Mail accounts by address; the address is also the POP3 user name.";
    };

    listeners = mapAttrs listenerModule listenerInfo;

    tls = {
      acmeHost = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "mx.example.org";
        description = ''
          Use the certificate of `security.acme.certs.<name>`; rustmail reloads (and serves the new
          certificate to new connections) when it is renewed.
        '';
      };
      certificateFile = mkOption {
        type = types.nullOr (types.strMatching "/.+");
        default = null;
        description = "PEM certificate chain (leaf first), when not using `acmeHost`. Read again on every reload.";
      };
      keyFile = mkOption {
        type = types.nullOr (types.strMatching "/.+");
        default = null;
        description = "PEM private key matching `certificateFile`; readable by the `rustmail` group, not in the Nix store.";
      };
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Whether to open the TCP ports of the enabled listeners in the firewall.";
    };

    dkim = mkOption {
      type = types.listOf (types.submodule dkimModule);
      default = [ ];
      example = [{ domain = "example.org"; selector = "rm1"; keyFile = "/run/secrets/rustmail/dkim.pem"; }];
      description = ''
        DKIM signing keys. Every message leaving for another domain whose From: domain has keys here is
        signed with each of them (publish an RSA key; an Ed25519 key may be added beside it).
      '';
    };
  };

  config = mkIf cfg.enable {
    assertions =
      [
        {
          assertion = cfg.settings.domains != [ ];
          message = "services.rustmail.settings.domains must list at least one local domain.";
        }
        {
          assertion = enabledListeners != { };
          message = "services.rustmail: enable at least one of services.rustmail.listeners.{${lib.concatStringsSep "," (lib.attrNames listenerInfo)}}.";
        }
      ]
      ++ lib.concatLists (mapAttrsToList
        (address: account: [
          {
            assertion = (account.hashedPasswordFile == null) != (account.hashedPassword == null);
            message = ''services.rustmail.accounts."${address}": set exactly one of hashedPasswordFile and hashedPassword.'';
          }
          {
            assertion = account.hashedPasswordFile == null || !(hasPrefix builtins.storeDir account.hashedPasswordFile);
            message = ''services.rustmail.accounts."${address}".hashedPasswordFile is in the Nix store, which every local user can read; keep password hashes outside it (e.g. with agenix or sops-nix).'';
          }
          {
            assertion = account.apopSecretFile == null || !(hasPrefix builtins.storeDir account.apopSecretFile);
            message = ''services.rustmail.accounts."${address}".apopSecretFile is in the Nix store, which every local user can read.'';
          }
        ])
        cfg.accounts)
      ++ [
        {
          assertion = (cfg.tls.certificateFile == null) == (cfg.tls.keyFile == null);
          message = "services.rustmail.tls.certificateFile and keyFile go together.";
        }
        {
          assertion = !(acme && cfg.tls.certificateFile != null);
          message = "services.rustmail.tls: set either acmeHost or certificateFile/keyFile, not both.";
        }
        {
          assertion = !acme || acmeDeclared;
          message = ''services.rustmail.tls.acmeHost = "${toString cfg.tls.acmeHost}", but security.acme.certs."${toString cfg.tls.acmeHost}" is not declared; declare the certificate there (domain, DNS or webroot challenge) or set tls.certificateFile and tls.keyFile.'';
        }
        {
          assertion = cfg.tls.keyFile == null || !(hasPrefix builtins.storeDir cfg.tls.keyFile);
          message = "services.rustmail.tls.keyFile is in the Nix store, which every local user can read.";
        }
      ]
      ++ map
        (key: {
          assertion = !(hasPrefix builtins.storeDir key.keyFile);
          message = "services.rustmail.dkim: the key of ${key.selector}._domainkey.${key.domain} is in the Nix store, which every local user can read.";
        })
        cfg.dkim
      ++ lib.concatLists (mapAttrsToList
        (name: listener: [
          {
            assertion = !listener.enable || listener.listen != [ ];
            message = "services.rustmail.listeners.${name}.listen is empty; set addresses or listeners.${name}.enable = false.";
          }
          {
            assertion = !lib.any isPath listener.listen;
            message = "services.rustmail.listeners.${name}.listen: rustmail serves TCP sockets only, not Unix socket paths.";
          }
        ])
        cfg.listeners)
      ++ mapAttrsToList
        (name: listener: {
          assertion = !(listener.enable && listenerInfo.${name}.tls && tlsFiles == null);
          message = "services.rustmail.listeners.${name} needs TLS: set services.rustmail.tls.acmeHost or tls.certificateFile and tls.keyFile.";
        })
        cfg.listeners
      ++ map
        (key: {
          assertion = !(cfg.settings ? ${key});
          message = "services.rustmail.settings.${key} is set by the module; use services.rustmail.{accounts,listeners,dataDir,tls} instead.";
        }) [ "listen" "accounts" "storage_root" "tls" ];

    # `rustmail hash-password` and `rustmail check-config` for the administrator.
    environment.systemPackages = [ cfg.package ];
    systemd.packages = [ cfg.package ];

    # The configuration at a stable path, so that a change reloads the service instead of restarting it.
    environment.etc."rustmail/rustmail.toml".source = configFile;

    users.users = optionalAttrs (cfg.user == "rustmail") {
      rustmail = {
        isSystemUser = true;
        inherit (cfg) group;
        home = cfg.dataDir;
        description = "rustmail mail server";
      };
    };
    users.groups = optionalAttrs (cfg.group == "rustmail") { rustmail = { }; };

    systemd.tmpfiles.rules = lib.optional (!stateDirectory) "d ${cfg.dataDir} 0700 ${cfg.user} ${cfg.group} - -";

    systemd.services.rustmail = {
      overrideStrategy = "asDropin";
      # Restart, never stop-then-start: switch-to-configuration would stop the sockets along with a
      # socket-activated service, refusing connections during the switch.
      stopIfChanged = false;
      reloadTriggers = [ configFile ];
      wants = lib.optional acme "acme-${cfg.tls.acmeHost}.service";
      # The ACME unit makes a placeholder certificate before the first order: start after it. After
      # rustmail-listeners too, so that a switch that changes listeners and restarts rustmail applies
      # the sockets first (see its script).
      after = lib.optional acme "acme-${cfg.tls.acmeHost}.service" ++ [ "rustmail-listeners.service" ];
      serviceConfig = {
        # systemd >= 253 sends SIGHUP and waits for READY=1 itself.
        Type = "notify-reload";
        ExecReload = [ "" ];
        ExecStart = [ "" "${getExe cfg.package} serve --config /etc/rustmail/rustmail.toml" ];
        LoadCredential =
          mapAttrsToList (address: account: "${credentialName "account" address}:${account.hashedPasswordFile}") hashFiles
            ++ mapAttrsToList (address: account: "${credentialName "apop" address}:${account.apopSecretFile}") apopFiles
            ++ map (key: "${dkimCredential key}:${key.keyFile}") cfg.dkim;
        # The packaged unit allows IPv4/IPv6 sockets for outbound delivery; with outbound.enable = false
        # the service gets no network at all (its listening sockets still come from systemd).
        PrivateNetwork = !outbound;
        RestrictAddressFamilies = if outbound then [ "" "AF_UNIX" "AF_INET" "AF_INET6" ] else [ "" "AF_UNIX" ];
        User = cfg.user;
        Group = cfg.group;
        WorkingDirectory = cfg.dataDir;
        # rustmail waits limits.shutdown_timeout_secs for sessions, then needs a moment to finish.
        TimeoutStopSec = "${toString (cfg.settings.limits.shutdown_timeout_secs + 15)}s";
        # The certificate is read in place, so that a reload picks up a renewal. Its group is the
        # service's own (set below) unless the certificate is shared under another group.
        SupplementaryGroups = lib.optional (acme && acmeCert.group != cfg.group) acmeCert.group;
        PrivateUsers = lib.mkIf (acme && acmeCert.group != cfg.group) false;
      } // (if stateDirectory then {
        StateDirectory = [ "" (lib.removePrefix "/var/lib/" cfg.dataDir) ];
      } else {
        StateDirectory = [ "" ];
        ReadWritePaths = [ cfg.dataDir ];
      });
    };

    # Applies listener changes on switch (see the top of this file).
    systemd.services.rustmail-listeners = {
      description = "Apply rustmail's listener changes to its sockets";
      wantedBy = [ "multi-user.target" ];
      after = [ "sockets.target" ];
      restartTriggers = [ (builtins.toJSON (mapAttrs (_: l: optional l.enable l.listen) cfg.listeners)) ];
      stopIfChanged = false;
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        ExecStart = applyListeners;
      };
    };

    security.acme.certs = lib.mkIf acme {
      ${cfg.tls.acmeHost} = {
        reloadServices = [ "rustmail.service" ];
        # Readable by rustmail alone, not by every service in the catch-all acme group.
        # Weaker than mkDefault: nginx and httpd give a vhost's certificate their group with mkDefault,
        # and a certificate shared with them is then read through that group.
        group = lib.mkOverride 1250 cfg.group;
      };
    };

    # A disabled listener's socket is masked, and its name left out of the configuration.
    systemd.sockets = mapAttrs'
      (name: listener: nameValuePair "rustmail-${name}" (
        if listener.enable then {
          overrideStrategy = "asDropin";
          wantedBy = [ "sockets.target" ];
          socketConfig = {
            ListenStream = [ "" ] ++ listener.listen;
            ExecStartPost = recordListener name;
          };
        } else {
          enable = false;
        }
      ))
      cfg.listeners;

    networking.firewall.allowedTCPPorts = mkIf cfg.openFirewall
      (concatMap (listener: map portOf listener.listen) (attrValues enabledListeners));
  };
}
