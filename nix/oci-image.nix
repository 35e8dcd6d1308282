# An OCI image that runs rustmail without systemd: it binds the addresses of its configuration itself.
# Mount a configuration at /etc/rustmail/rustmail.toml (with listen addresses such as "0.0.0.0:25" and
# storage_root = "/var/lib/rustmail") and a volume at /var/lib/rustmail. It runs as the unprivileged
# user 2525:2525, which owns /var/lib/rustmail; binding ports below 1024 as that user works where the
# container runtime sets net.ipv4.ip_unprivileged_port_start=0 in the container (Docker and Podman do).
{ dockerTools, rustmail }:

let
  uid = "2525";
in
dockerTools.buildLayeredImage {
  name = "rustmail";
  tag = rustmail.version;
  contents = [ rustmail ];
  extraCommands = ''
    mkdir -p var/lib/rustmail etc/rustmail
    echo "rustmail:x:${uid}:${uid}:rustmail:/var/lib/rustmail:/sbin/nologin" > etc/passwd
    echo "rustmail:x:${uid}:" > etc/group
  '';
  fakeRootCommands = ''
    chown ${uid}:${uid} var/lib/rustmail
    chmod 0700 var/lib/rustmail
  '';
  config = {
    Entrypoint = [ "${rustmail}/bin/rustmail" ];
    Cmd = [ "serve" "--config" "/etc/rustmail/rustmail.toml" ];
    User = "${uid}:${uid}";
    # SMTP, submission, submissions, POP3 and POP3S.
    ExposedPorts = {
      "25/tcp" = { };
      "587/tcp" = { };
      "465/tcp" = { };
      "110/tcp" = { };
      "995/tcp" = { };
    };
    Volumes."/var/lib/rustmail" = { };
    WorkingDir = "/var/lib/rustmail";
  };
}
