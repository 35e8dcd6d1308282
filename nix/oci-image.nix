# An OCI image that runs rustmail without systemd: it binds the addresses of its configuration itself.
# Mount a configuration at /etc/rustmail/rustmail.toml (with listen addresses such as "0.0.0.0:25" and
# storage_root = "/var/lib/rustmail") and a volume at /var/lib/rustmail.
{ dockerTools, rustmail }:

dockerTools.buildLayeredImage {
  name = "rustmail";
  tag = rustmail.version;
  contents = [ rustmail ];
  extraCommands = ''
    mkdir -p var/lib/rustmail etc/rustmail
  '';
  config = {
    Entrypoint = [ "${rustmail}/bin/rustmail" ];
    Cmd = [ "serve" "--config" "/etc/rustmail/rustmail.toml" ];
    ExposedPorts = {
      "25/tcp" = { };
      "110/tcp" = { };
    };
    Volumes."/var/lib/rustmail" = { };
    WorkingDirectory = "/var/lib/rustmail";
  };
}
