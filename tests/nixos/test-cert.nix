# Throw-away certificates for the system tests. The derivation is cached across runs, so they are made
# to last (100 years) rather than for the length of one test.
#  - cert.pem/key.pem: self-signed, for the server node's TLS listeners (clients trust it as itself);
#  - ca.pem, and mx-cert.pem/mx-key.pem that it signed for the two servers of two_servers.py (their
#    names and addresses): the sending server verifies the receiving one's (outbound.tls_trust_file =
#    ca.pem) as it verifies a public CA's certificate on the Internet, and clients both.
{ runCommand, openssl }:

runCommand "rustmail-test-cert" { nativeBuildInputs = [ openssl ]; } ''
  mkdir $out
  cd "$(mktemp -d)"
  ec="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
  openssl req -x509 $ec -days 36500 -subj /CN=server \
    -addext "subjectAltName=DNS:server,IP:127.0.0.1" -keyout $out/key.pem -out $out/cert.pem
  openssl req -x509 $ec -days 36500 -subj "/CN=rustmail test CA" -keyout ca-key.pem -out $out/ca.pem \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign"
  openssl req $ec -subj /CN=mx.b.test -keyout $out/mx-key.pem -out mx.csr
  printf '%s\n' "subjectAltName=DNS:mx.a.test,DNS:mx.b.test,IP:192.168.1.2,IP:192.168.1.3" "basicConstraints=critical,CA:FALSE" \
    "extendedKeyUsage=serverAuth" > mx.ext
  openssl x509 -req -in mx.csr -CA $out/ca.pem -CAkey ca-key.pem -CAcreateserial -days 36500 \
    -extfile mx.ext -out $out/mx-cert.pem
''
