"""crypto, store, egress and decision: the envelope, the fail-closed store, the one decision point."""

import os
import stat
import time

import pytest

from sealgate import crypto, decision, origins, placeholders, sessions, validate
from sealgate.decision import Allow, Block, Destination, LookupFailed, RequestFacts
from sealgate.egress import EgressPolicy, parse_cidrs
from sealgate.store import SecretStore, StoreError


# --- crypto ---------------------------------------------------------------------------------

def test_envelope_round_trip_and_fresh_nonce():
    key = os.urandom(32)
    a = crypto.seal(key, "alice", "K", "sk-value-1234")
    b = crypto.seal(key, "alice", "K", "sk-value-1234")
    assert a.nonce != b.nonce and a.ciphertext != b.ciphertext
    assert crypto.open_envelope({a.key_id: key}, "alice", "K", a) == "sk-value-1234"


@pytest.mark.parametrize("owner, name", [("bob", "K"), ("alice", "OTHER")])
def test_envelope_bound_to_owner_and_name(owner, name):
    key = os.urandom(32)
    env = crypto.seal(key, "alice", "K", "sk-value-1234")
    with pytest.raises(crypto.EnvelopeError, match="tampered with or moved"):
        crypto.open_envelope({env.key_id: key}, owner, name, env)


def test_envelope_tamper_and_unknown_key():
    key = os.urandom(32)
    env = crypto.seal(key, "alice", "K", "sk-value-1234")
    bad = crypto.Envelope(env.key_id, env.nonce, bytes([env.ciphertext[0] ^ 1]) + env.ciphertext[1:])
    with pytest.raises(crypto.EnvelopeError):
        crypto.open_envelope({env.key_id: key}, "alice", "K", bad)
    with pytest.raises(crypto.EnvelopeError, match="not loaded"):
        crypto.open_envelope({}, "alice", "K", env)


# --- store ----------------------------------------------------------------------------------

def test_store_keeps_values_encrypted(tmp_path, value):
    store = SecretStore(tmp_path)
    store.add_secret("alice", "K", value, [origins.parse("https://a.example")])
    assert stat.S_IMODE((tmp_path / "master.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "sealgate.db").stat().st_mode) == 0o600
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o700
    for f in tmp_path.iterdir():
        assert value.encode() not in f.read_bytes(), f
    assert store.secrets_for("alice", {"K", "MISSING"})["K"].value == value
    assert value not in repr(store.secrets_for("alice", {"K"}))
    assert [i.name for i in store.list_secrets("alice")] == ["K"]
    with pytest.raises(StoreError, match="exists already"):
        store.add_secret("alice", "K", value, [origins.parse("https://a.example")])


def test_store_refuses_swapped_ciphertext(tmp_path, value):
    store = SecretStore(tmp_path)
    store.add_secret("alice", "K", value, [origins.parse("https://a.example")])
    store.add_secret("mallory", "K", "sk-mallory-000", [origins.parse("https://evil.example")])
    with store.backend.write() as tx:  # a database write, without the key
        nonce, ciphertext = tx.one("select nonce, ciphertext from secrets where owner = 'alice'")
        tx.one("update secrets set nonce = ?, ciphertext = ? where owner = 'mallory'", [nonce, ciphertext])
    with pytest.raises(StoreError, match="K of user mallory (failed authentication|was changed without the master key)"):
        store.secrets_for("mallory", {"K"})


def test_store_refuses_readable_or_broken_key(tmp_path):
    SecretStore(tmp_path).key
    key = tmp_path / "master.key"
    key.chmod(0o644)
    with pytest.raises(StoreError, match="readable by others"):
        SecretStore(tmp_path).key
    key.chmod(0o600)
    key.write_text("not hex")
    with pytest.raises(StoreError, match="cannot be read"):
        SecretStore(tmp_path).key


# --- egress ---------------------------------------------------------------------------------

@pytest.mark.parametrize("ip, port, allowed", [
    ("93.184.215.14", 443, True),
    ("2606:4700::1111", 443, True),
    ("127.0.0.1", 443, False),
    ("127.9.9.9", 443, False),
    ("::1", 443, False),
    ("10.1.2.3", 443, False),
    ("172.16.0.1", 443, False),
    ("192.168.1.1", 443, False),
    ("169.254.169.254", 80, False),
    ("fd00:ec2::254", 80, False),
    ("100.64.0.1", 443, False),
    ("0.0.0.0", 443, False),
    ("224.0.0.1", 443, False),
    ("::ffff:127.0.0.1", 443, False),
    ("::ffff:169.254.169.254", 443, False),
    ("64:ff9b::a9fe:a9fe", 443, False),
    ("2002:7f00:1::", 443, False),
    ("fe80::1", 443, False),
])
def test_egress_defaults(ip, port, allowed):
    assert (EgressPolicy().refusal_reason(ip, port) is None) is allowed


def test_egress_allow_private_and_own_ports():
    p = EgressPolicy(tuple(parse_cidrs("127.0.0.1/32, 10.0.0.0/8")), frozenset({8080, 8081}))
    assert p.refusal_reason("127.0.0.1", 9443) is None
    assert p.refusal_reason("10.9.9.9", 443) is None
    assert "own port" in p.refusal_reason("127.0.0.1", 8080)
    assert "own port" in p.refusal_reason("::ffff:127.0.0.1", 8081)
    assert "SEALGATE_ALLOW_PRIVATE" in p.refusal_reason("127.0.0.2", 9443)
    with pytest.raises(ValueError, match="'nope' is not a CIDR"):
        parse_cidrs("10.0.0.0/8,nope")


# --- decision -------------------------------------------------------------------------------

class FakeSecret:
    header_form = None
    refresh_due = expired = False
    broken = None

    def __init__(self, value, allowed, scope=None):
        from sealgate.policy import Scope
        self.value = value
        self.origins = tuple(origins.parse(o, allow_http=True) for o in allowed)
        self.scope = scope or Scope()


@pytest.fixture
def session():
    now = time.time()
    rec = sessions.SessionRecord("s" * 16, "", os.urandom(32), "signed-in", "rc", "in", "alice", now, now + 60)
    return sessions.Session(rec)


def facts(session, names, dest="https://api.example.com", hosts=None, sni=None, tls_error=None, sid=None, key=None):
    o = origins.parse(dest, allow_http=True)
    found = tuple(
        placeholders.find(placeholders.mint(key or session.record.mac_key, sid or session.id, n).encode())[0].placeholder
        for n in names
    )
    return RequestFacts(Destination(o.scheme, o.host, o.port), tuple(hosts or ()), sni, tls_error, found)


def lookup_of(secrets):
    return lambda names: {n: secrets[n] for n in names if n in secrets}


SECRETS = {"K": FakeSecret("sk-live-value", ["https://api.example.com"]),
           "H": FakeSecret("sk-http-value", ["http://intranet.example"])}


def decide(session, f, secrets=SECRETS):
    return decision.decide(f, session, lookup_of(secrets))


def test_allow_to_allowed_origin(session):
    r = decide(session, facts(session, ["K"], hosts=["api.example.com", "API.example.com.:443"], sni="api.example.com"))
    assert isinstance(r, Allow) and list(r.values.values()) == ["sk-live-value"] and r.secret_names == ("K",)
    assert "sk-live-value" not in repr(r)


@pytest.mark.parametrize("kw, code, says", [
    (dict(dest="https://evil.example"), "origin_not_allowed", "K may not go to https://evil.example"),
    (dict(dest="https://api.example.com:8443"), "origin_not_allowed", "https://api.example.com:8443"),
    (dict(dest="http://api.example.com"), "insecure_upstream", "only go over https"),
    (dict(hosts=["evil.example"]), "host_mismatch", "'evil.example'"),
    (dict(hosts=["api.example.com", "evil.example"]), "host_mismatch", "evil.example"),
    (dict(hosts=["api.example.com:8443"]), "host_mismatch", "8443"),
    (dict(sni="evil.example"), "host_mismatch", "TLS SNI"),
    (dict(tls_error="certificate verify failed"), "insecure_upstream", "could not be verified"),
    (dict(sid="t" * 16), "unknown_placeholder", "does not belong to this session"),
    (dict(key=os.urandom(32)), "unknown_placeholder", "does not belong to this session"),
])
def test_block(session, kw, code, says):
    r = decide(session, facts(session, ["K"], **kw))
    assert isinstance(r, Block) and r.refusal.code == code and says in r.refusal.detail
    assert "sk-live-value" not in r.refusal.detail


def test_unknown_secret_and_store_failure(session):
    r = decide(session, facts(session, ["NOPE"]))
    assert r.refusal.code == "unknown_placeholder" and "no secret named NOPE" in r.refusal.detail

    def broken(names):
        raise LookupFailed("master key unreadable")
    r = decision.decide(facts(session, ["K"]), session, broken)
    assert r.refusal.code == "store_unavailable" and r.refusal.status == 503


def test_http_origin_allows_plain_http(session):
    assert isinstance(decide(session, facts(session, ["H"], dest="http://intranet.example")), Allow)


def test_globals_go_anywhere_without_the_store(session):
    def broken(names):
        raise AssertionError("globals need no lookup")
    r = decision.decide(facts(session, ["RUNCHAT_ID", "USER_ID"], dest="https://anything.example", hosts=["x"]),
                        session, broken)
    assert isinstance(r, Allow) and sorted(r.values.values()) == ["alice", "rc"] and r.secret_names == ()


def test_idna_destination_matches_its_punycode_origin(session):
    secrets = {"K": FakeSecret("sk-live-value", ["https://bücher.example"])}
    f = facts(session, ["K"], dest="https://xn--bcher-kva.example", hosts=["BÜCHER.example."])
    assert isinstance(decide(session, f, secrets), Allow)
    f = facts(session, ["K"], dest="https://xn--bcher-kva.example.evil.test")
    assert decide(session, f, secrets).refusal.code == "origin_not_allowed"


# --- ids match in full; what reaches a log line or a terminal is quoted and escaped ------------------

@pytest.mark.parametrize("check, text", [
    (lambda t: validate.user_id(t), "alice\n"),
    (lambda t: validate.run_id(t, "runchat id"), "rc1\n"),
    (lambda t: validate.secret_name(t), "RUNCHAT_ID\n"),
    (lambda t: validate.secret_name(t), "KEY\n"),
])
def test_ids_with_a_trailing_newline_are_refused(check, text):
    with pytest.raises(ValueError):
        check(text)


def test_port_text_matches_in_full():
    from sealgate import origins
    assert origins.is_port_text("443") and not origins.is_port_text("443\n")


@pytest.mark.parametrize("raw, shown", [
    ("/v1/things", "/v1/things"),
    ("/a b decision=allow principal=bob", '"/a b decision=allow principal=bob"'),
    ("/x\x1b]52;c;ZXZpbA==\x07", '"/x\\x1b]52;c;ZXZpbA\\=\\=\\x07"'.replace("\\=", "=")),
    ('/q"uote\\', '"/q\\"uote\\\\"'),
    ("", '""'),
])
def test_log_fields_are_quoted_and_escaped(raw, shown):
    from sealgate import logfmt
    assert logfmt.field(raw) == shown
    assert not any(ord(c) < 0x20 or ord(c) == 0x7f for c in logfmt.field(raw))
    assert not any(ord(c) < 0x20 for c in logfmt.text(raw))


def test_an_unexpected_argument_is_never_echoed(capsys, tmp_path, value):
    from sealgate import cli
    with pytest.raises(SystemExit) as exit_:
        cli.main(["secret", "add", "--user", "u", "--name", "K", "--origins", "https://a.example", value],
                 env={"SEALGATE_DATA_DIR": str(tmp_path)})
    out = capsys.readouterr()
    leaked = value in out.out + out.err
    assert exit_.value.code == 2 and not leaked
    assert out.err.startswith("sealgate: error: unexpected arguments (not shown")


@pytest.mark.parametrize("argv", [
    ["secret", "add", "--user", "u", "--name", "N", "--origins", "https://a.example", "--replace={V}"],
    ["secret", "add", "--user", "u", "--name", "N", "--origins", "{V}"],
    ["secret", "{V}"],
    ["{V}"],
    ["audit", "--limit", "{V}"],
])
def test_no_error_echoes_what_was_typed_where_a_value_might_be(capsys, tmp_path, value, argv):
    from sealgate import cli
    try:
        code = cli.main([a.replace("{V}", value) for a in argv], env={"SEALGATE_DATA_DIR": str(tmp_path)})
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    echoed = value in out.out + out.err
    assert code != 0 and not echoed and out.err.startswith("sealgate: error:")
