# services.rustmail: the NixOS module.
#
# The unit files come from the package (systemd.packages), the same files Debian or Arch users get; this
# module layers the NixOS specifics on top as drop-ins: the generated configuration (checked at build
# time), secrets through LoadCredential, the listen addresses of each socket, and Type=notify-reload.
{ config, lib, pkgs, ... }:

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

  # The packaged service lists only the smtp and pop3 sockets; the others are added when enabled.
  extraSockets = [ "submission" "submissions" "pop3s" ];

  acme = cfg.tls.acmeHost != null;
  acmeDirectory = config.security.acme.certs.${cfg.tls.acmeHost}.directory;
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
  credentialName = address: "account-" + builtins.substring 0 16 (builtins.hashString "sha256" address);

  enabledListeners = filterAttrs (_: listener: listener.enable) cfg.listeners;

  portOf = listen: lib.toInt (lib.last (lib.splitString ":" listen));

  finalSettings = cfg.settings // lib.optionalAttrs (tlsFiles != null) { tls = tlsFiles; } // {
    storage_root = "/var/lib/rustmail";
    listen = mapAttrs (name: listener: optional listener.enable "systemd:${name}") cfg.listeners;
    accounts = mapAttrs
      (address: account: {
        password_hash_file = "${credentialsDir}/${credentialName address}";
        inherit (account) aliases;
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
        type = types.strMatching "/.+";
        example = "/run/secrets/rustmail/alice";
        description = ''
          Absolute path of a file holding the account's password hash, as printed by
          `rustmail hash-password` (argon2id). It is read by systemd (LoadCredential) when the service
          starts, so it may be readable by root only. It must not be in the Nix store.
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
        IPv6) or `address:port`. systemd owns these sockets, so the service needs no capability to use
        port ${toString info.port}, and restarts refuse no connection.
      '';
    };
  };
in
{
  options.services.rustmail = {
    enable = mkEnableOption "rustmail, a small SMTP and POP3 mail server";

    package = mkPackageOption pkgs "rustmail" { };

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
          message = "services.rustmail: enable at least one of services.rustmail.listeners.{smtp,pop3}.";
        }
      ]
      ++ mapAttrsToList
        (address: account: {
          assertion = !(hasPrefix builtins.storeDir account.hashedPasswordFile);
          message = ''services.rustmail.accounts."${address}".hashedPasswordFile is in the Nix store, which every local user can read; keep password hashes outside it (e.g. with agenix or sops-nix).'';
        })
        cfg.accounts
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
          assertion = cfg.tls.keyFile == null || !(hasPrefix builtins.storeDir cfg.tls.keyFile);
          message = "services.rustmail.tls.keyFile is in the Nix store, which every local user can read.";
        }
      ]
      ++ mapAttrsToList
        (name: listener: {
          assertion = !(listener.enable && listenerInfo.${name}.tls && tlsFiles == null);
          message = "services.rustmail.listeners.${name} needs TLS: set services.rustmail.tls.acmeHost or tls.certificateFile and tls.keyFile.";
        })
        cfg.listeners
      ++ map
        (key: {
          assertion = !(cfg.settings ? ${key});
          message = "services.rustmail.settings.${key} is set by the module; use services.rustmail.{accounts,listeners} instead.";
        }) [ "listen" "accounts" "storage_root" "tls" ];

    systemd.packages = [ cfg.package ];

    users.users.rustmail = {
      isSystemUser = true;
      group = "rustmail";
      home = "/var/lib/rustmail";
      description = "rustmail mail server";
    };
    users.groups.rustmail = { };

    systemd.services.rustmail = {
      overrideStrategy = "asDropin";
      restartTriggers = [ configFile ];
      serviceConfig = {
        # systemd >= 253 sends SIGHUP and waits for READY=1 itself.
        Type = "notify-reload";
        ExecReload = [ "" ];
        ExecStart = [ "" "${getExe cfg.package} serve --config ${configFile}" ];
        LoadCredential = mapAttrsToList
          (address: account: "${credentialName address}:${account.hashedPasswordFile}")
          cfg.accounts;
        # Sockets= adds to the packaged list (smtp, pop3).
        Sockets = map (name: "rustmail-${name}.socket")
          (lib.filter (name: cfg.listeners.${name}.enable) extraSockets);
        # The certificate is read in place, so that a reload picks up a renewal: through the ACME
        # group, which PrivateUsers= would map away.
        SupplementaryGroups = lib.optional acme config.security.acme.certs.${cfg.tls.acmeHost}.group;
        PrivateUsers = lib.mkIf acme false;
      };
    };

    security.acme.certs = lib.mkIf acme {
      ${cfg.tls.acmeHost}.reloadServices = [ "rustmail.service" ];
    };

    # A disabled listener's socket is masked, and its name left out of the configuration.
    systemd.sockets = mapAttrs'
      (name: listener: nameValuePair "rustmail-${name}" (
        if listener.enable then {
          overrideStrategy = "asDropin";
          wantedBy = [ "sockets.target" ];
          socketConfig.ListenStream = [ "" ] ++ listener.listen;
        } else {
          enable = false;
        }
      ))
      cfg.listeners;

    networking.firewall.allowedTCPPorts = mkIf cfg.openFirewall
      (concatMap (listener: map portOf listener.listen) (attrValues enabledListeners));
  };
}
