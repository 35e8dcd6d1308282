# Proves: with a certificate, mail is submitted on 587 (STARTTLS + AUTH) and 465 (implicit TLS) and
# fetched with POP3 STLS and POP3S, through the socket units of the TLS listeners; the sender must be
# the account's own; non-local recipients get a temporary refusal until outbound delivery exists.
target = globals().get("SERVER_ADDRESS", "server")
ca = globals().get("CA_FILE", "/etc/rustmail-test/cert.pem")
mc = f"mailclient --host {target} --cafile {ca}"
login = "alice@example.test:alice-password"

start_all()
for unit in ("rustmail-smtp.socket", "rustmail-submission.socket", "rustmail-submissions.socket", "rustmail-pop3s.socket"):
    server.wait_for_unit(unit)

with subtest("587 with STARTTLS and AUTH, 465 with implicit TLS"):
    client.succeed(f"{mc} send --port 587 --starttls --login {login} --sender alice@example.test --to postmaster@example.test --subject sub587")
    client.succeed(f"{mc} --ssl send --port 465 --login {login} --sender alice@example.test --to alice@example.test --subject sub465")

with subtest("POP3 with STLS and POP3S"):
    out = client.succeed(f"{mc} fetch --stls --user alice@example.test --password alice-password")
    assert "Subject: sub587" in out and "Subject: sub465" in out, out
    assert "Message-ID: <" in out and "with ESMTPSA" in out, out
    client.succeed(f"{mc} --pop3-port 995 --ssl fetch --user alice@example.test --password alice-password")

with subtest("submission rules"):
    client.fail(f"{mc} send --port 587 --starttls --login {login} --sender bob@example.test --to alice@example.test")
    client.succeed(f"{mc} --ssl send --port 465 --login {login} --sender alice@example.test --to friend@remote.test --expect-code 451")
