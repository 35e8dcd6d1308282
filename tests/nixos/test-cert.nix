# A throw-away certificate for the TLS listeners of the system tests. The derivation is cached across
# runs, so it is made to last (100 years) rather than for the length of one test.
{ runCommand, openssl }:

runCommand "rustmail-test-cert" { nativeBuildInputs = [ openssl ]; } ''
  mkdir $out
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 36500 -subj /CN=server \
    -addext "subjectAltName=DNS:server,IP:127.0.0.1" -keyout $out/key.pem -out $out/cert.pem
''
