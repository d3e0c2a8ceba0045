"""The `sealgate` CLI as users run it: clear one-line errors, values only from stdin and
never printed, settings from config, SEALGATE_* variables and flags."""

from __future__ import annotations

import json
import os
import stat
import subprocess

import pytest

from conftest import SEALGATE, make_proxy


@pytest.fixture
def p(request, tmp_path, pki):
    """A fresh sealgate, called in this process; for a test marked e2e, the real executable."""
    return make_proxy(tmp_path, pki, process=request.node.get_closest_marker("e2e") is not None)


# argv, stdin and one-line errors: checked in this process, and on the real executable (e2e)
in_process_and_executable = pytest.mark.parametrize(
    "p", ["in-process", pytest.param("executable", marks=pytest.mark.e2e)], indirect=True)


def refused(p, *args, input=None, says: str):
    r = p.cli(*args, input=input, check=False)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sealgate: error:"), r.stderr
    assert "Traceback" not in r.stderr
    assert says in r.stderr, r.stderr
    return r


def test_add_list_set_origins_rm(p, user, value):
    r = p.cli("secret", "add", "--user", user, "--name", "OPENAI_KEY", "--origins",
              "https://API.openai.com:443/, https://b.example", input=value + "\n")
    assert "https://api.openai.com, https://b.example" in r.stdout
    listed = p.cli("secret", "list", "--user", user, "--json").stdout
    assert json.loads(listed)[0]["origins"] == ["https://api.openai.com", "https://b.example"]
    p.cli("secret", "set-origins", "--user", user, "--name", "OPENAI_KEY", "--origins", "https://c.example")
    plain = p.cli("secret", "list", "--user", user).stdout
    assert plain.startswith("OPENAI_KEY\thttps://c.example\t")
    p.cli("secret", "rm", "--user", user, "--name", "OPENAI_KEY")
    assert p.cli("secret", "list", "--user", user).stdout == ""
    everything = r.stdout + r.stderr + listed + plain + p.visible_to_operators().decode("latin-1")
    assert value not in everything


@pytest.mark.parametrize("origins, says", [
    ("", "at least one allowed origin"),
    ("api.example.com", "no scheme"),
    ("https://api.example.com/v1", "a path"),
    ("https://u:p@api.example.com", "userinfo"),
    ("http://api.example.com", "--allow-http"),
    ("https://api.example.com:99999", "invalid port"),
    ("https://a.example,ftp://b.example", "scheme 'ftp'"),
])
def test_bad_origins(p, user, value, origins, says):
    refused(p, "secret", "add", "--user", user, "--name", "K", "--origins", origins, input=value, says=says)
    assert p.cli("secret", "list", "--user", user).stdout == ""


def test_missing_origins_flag(p, user, value):
    r = p.cli("secret", "add", "--user", user, "--name", "K", input=value, check=False)
    assert r.returncode == 2 and "--origins" in r.stderr and value not in r.stderr


def test_wildcard_warns(p, user, value):
    r = p.cli("secret", "add", "--user", user, "--name", "K", "--origins", "https://*.example.com", input=value)
    assert "warning" in r.stderr and "every subdomain" in r.stderr


@pytest.mark.parametrize("bad, says", [
    ("ab3c5", "too short"),
    ("x" * 20000, "too long"),
    ("sk-line1\nline2-xxxx", "control"),
    ("sk-abc\r\nX-Evil: 1xxx", "control"),
    ("sk-abc\x00defghij", "control"),
    ("sk-abc\u2028defghij", "U+2028"),
    ("sk-abc\u200bdefghij", "U+200B"),
    (" sk-abcdefghij", "white space"),
])
def test_bad_values(p, user, bad, says):
    r = refused(p, "secret", "add", "--user", user, "--name", "K", "--origins", "https://a.example",
                input=bad + "\n", says=says)
    assert bad.strip() not in r.stderr


@in_process_and_executable
def test_empty_stdin(p, user):
    refused(p, "secret", "add", "--user", user, "--name", "K", "--origins", "https://a.example", input="",
            says="no value")


@in_process_and_executable
def test_value_never_taken_from_argv(p, user):
    r = p.cli("secret", "add", "--user", user, "--name", "K", "--origins", "https://a.example",
              "--value", "sk-in-argv-0000", check=False)
    assert r.returncode == 2 and "unexpected arguments (not shown" in r.stderr
    assert "sk-in-argv-0000" not in r.stderr + r.stdout  # argparse would have echoed it


@pytest.mark.parametrize("name, says", [
    ("1ABC", "invalid"), ("A-B", "invalid"), ("A" * 65, "at most 64"), ("RUNCHAT_ID", "reserved"),
])
def test_bad_names(p, user, value, name, says):
    refused(p, "secret", "add", "--user", user, "--name", name, "--origins", "https://a.example", input=value,
            says=says)


def test_existing_secret_needs_replace(p, user, value):
    p.add_secret(user, "K", value, "https://a.example")
    refused(p, "secret", "add", "--user", user, "--name", "K", "--origins", "https://a.example",
            input=value + "2", says="exists already")
    p.cli("secret", "add", "--user", user, "--name", "K", "--origins", "https://a.example", "--replace",
          input=value + "2")
    refused(p, "secret", "rm", "--user", user, "--name", "NOPE", says="has no secret named NOPE")
    refused(p, "secret", "set-origins", "--user", user, "--name", "NOPE", "--origins", "https://a.example",
            says="has no secret named NOPE")


def test_session_issue_contract(p, user, value):
    p.add_secret(user, "K", value, "https://a.example")
    s = p.issue(user=user, runchat="rc-1", instance="in-1")
    assert set(s) >= {"proxy_url", "ca_cert", "env", "expires_at"}
    assert s["proxy_url"].startswith("http://") and s["proxy_url"].endswith(f"@127.0.0.1:{p.port}")
    assert os.path.exists(s["ca_cert"]) and s["ca_cert"] == str(p.ca_cert)
    assert sorted(s["env"]) == ["INSTANCE_ID", "K", "RUNCHAT_ID", "USER_ID"]
    assert all(set(v) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
               for v in s["env"].values())
    assert s["expires_at"].endswith("Z")
    assert value not in json.dumps(s)
    ca_key = p.ca_cert.parent / "mitmproxy-ca.pem"
    assert stat.S_IMODE(ca_key.stat().st_mode) & 0o077 == 0
    # the credential is stored only as a hash
    cred = s["proxy_url"].split("@")[0].rsplit(":", 1)[1]
    assert cred.encode() not in p.visible_to_operators()


@pytest.mark.parametrize("args, says", [
    (["--access", "signed-in"], "needs --user"),
    (["--access", "api"], "needs --user"),
    (["--access", "app-view"], "needs --author"),
    (["--access", "signed-in", "--user", "bad user"], "user id"),
    (["--access", "signed-in", "--user", "u", "--ttl", "5"], "--ttl"),
])
def test_session_issue_errors(p, args, says):
    refused(p, "session", "issue", "--runchat", "r", "--instance", "i", *args, says=says)


def test_bad_access_mode(p):
    r = p.cli("session", "issue", "--access", "root", "--runchat", "r", "--instance", "i", check=False)
    assert r.returncode == 2 and "invalid choice" in r.stderr


@pytest.mark.e2e  # the executable itself
def test_environment_and_flags_override(p, tmp_path):
    other = tmp_path / "other-data"
    env_port = 18555
    r = subprocess.run([str(SEALGATE), "session", "issue", "--access", "signed-in", "--user", "u",
                        "--runchat", "r", "--instance", "i"], capture_output=True, text=True,
                       env={**p.env, "SEALGATE_LISTEN_PORT": str(env_port), "SEALGATE_DATA_DIR": str(other)})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["proxy_url"].endswith(f":{env_port}")
    assert (other / "sealgate.db").exists()
    r = p.cli("session", "issue", "--access", "signed-in", "--user", "u", "--runchat", "r", "--instance", "i",
              "--listen-port", "18556", "--listen-host", "127.0.0.9")
    assert json.loads(r.stdout)["proxy_url"].endswith("@127.0.0.9:18556")


@pytest.mark.parametrize("var, val, says", [
    ("SEALGATE_LISTEN_PORT", "eighty", "environment variable SEALGATE_LISTEN_PORT: must be a port"),
    ("SEALGATE_ALLOW_PRIVATE", "10.0.0.0/8,nope", "SEALGATE_ALLOW_PRIVATE: 'nope' is not a CIDR"),
])
def test_bad_environment(p, var, val, says):
    p.env[var] = val
    refused(p, "secret", "list", "--user", "u", says=says)


@pytest.mark.parametrize("text, says", [
    ("listen_port: [1]\n", "key 'listen_port': must be a port"),
    ("lisen_port: 8080\n", "unknown key 'lisen_port'"),
    ("listen_port: 8080\n  bad: indent\n", "not valid YAML at line"),
    ("- a\n- b\n", "must be a mapping"),
    ("session_ttl: 5\n", "key 'session_ttl'"),
])
def test_bad_config_names_file_and_key(p, tmp_path, text, says):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    p.env["SEALGATE_CONFIG"] = str(cfg)
    r = refused(p, "secret", "list", "--user", "u", says=says)
    assert str(cfg) in r.stderr


def test_run_refuses_bad_upstream_ca_and_key(p, tmp_path):
    bad = tmp_path / "not-a-ca.pem"
    bad.write_text("hello")
    p.env["SEALGATE_UPSTREAM_CA"] = str(bad)
    refused(p, "run", "--no-web", says="holds no PEM certificate")
    p.env["SEALGATE_UPSTREAM_CA"] = str(tmp_path / "missing.pem")
    refused(p, "run", "--no-web", says="cannot be read")
    del p.env["SEALGATE_UPSTREAM_CA"]
    p.data_dir.mkdir(parents=True, exist_ok=True)
    (p.data_dir / "master.key").write_text("zz")
    (p.data_dir / "master.key").chmod(0o600)
    refused(p, "run", "--no-web", says="master key")


@in_process_and_executable
def test_argparse_errors_are_one_line(p):
    r = p.cli("secret", "add", "--user", "u", "--name", "K", input="sk-abcdefgh", check=False)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("sealgate: error:") and "--origins" in r.stderr


@pytest.mark.parametrize("var", ["SEALGATE_LISTEN_PORT", "SEALGATE_WEB_PORT"])
def test_port_zero_is_refused(p, var):
    p.env[var] = "0"
    refused(p, "session", "issue", "--access", "api", "--user", "u", "--runchat", "r", "--instance", "i",
            says=f"{var}: must be a port number from 1 to 65535")


def test_config_file_paths_are_relative_to_that_file(p, tmp_path):
    cfg_dir = tmp_path / "cfg" / "sub"
    cfg_dir.mkdir(parents=True)
    (cfg_dir / "s.yaml").write_text("data_dir: mydata\n")
    p.env["SEALGATE_CONFIG"] = str(cfg_dir / "s.yaml")
    del p.env["SEALGATE_DATA_DIR"]
    p.cli("secret", "list", "--user", "u")
    assert (cfg_dir / "mydata" / "sealgate.db").exists()


@in_process_and_executable
def test_unusable_data_dir_is_one_line(p, tmp_path):
    (tmp_path / "afile").write_text("x")
    p.env["SEALGATE_DATA_DIR"] = str(tmp_path / "afile" / "data")
    refused(p, "secret", "list", "--user", "u", says="cannot be opened")


def test_existing_data_dir_keeps_its_mode(p, tmp_path):
    d = tmp_path / "shared-dir"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    p.env["SEALGATE_DATA_DIR"] = str(d)
    p.cli("secret", "list", "--user", "u")
    assert stat.S_IMODE(d.stat().st_mode) == 0o755
    assert stat.S_IMODE((d / "sealgate.db").stat().st_mode) == 0o600


@pytest.mark.e2e  # the executable itself
def test_non_utf8_value_is_refused(p, user):
    r = subprocess.run([str(SEALGATE), "secret", "add", "--user", user, "--name", "K", "--origins",
                        "https://a.example"], input=b"sk-\xff\xfe-abcdefgh", capture_output=True, env=p.env)
    assert r.returncode == 1 and b"not UTF-8" in r.stderr and b"Traceback" not in r.stderr


@pytest.mark.e2e  # a stock mitmdump process
@pytest.mark.parametrize("option", ["--map-remote=|//a.example/|//b.example/", "--modify-headers=/~q/Host/b.example",
                                    "--set=stream_large_bodies=1m", "--mode=upstream:http://127.0.0.1:9"])
def test_stock_mitmdump_refuses_options_that_act_after_sealgate(p, option):
    from conftest import ROOT
    r = subprocess.run([str(ROOT / ".venv" / "bin" / "mitmdump"), "-s", str(ROOT / "scripts" / "mitmdump_addon.py"),
                        "--set", f"sealgate_data_dir={p.data_dir}", "-p", "0", option],
                       capture_output=True, text=True, env=p.env, timeout=30)
    assert r.returncode != 0
    assert "sealgate refuses" in r.stdout + r.stderr or "regular (forward) proxy" in r.stdout + r.stderr
