"""The `sealgate` command: secrets, sessions and the proxy.

Values are read from stdin (or a hidden prompt), never from argv, and never printed.
Every error is one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import re
import shutil
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path

from . import (
    backup,
    ca,
    commands,
    logfmt,
    oauth,
    rotation,
    sessions,
    settings,
    tokens,
    validate,
)
from .egress_lock import LockError
from .store import SecretStore, StoreError, open_store


class UsageError(Exception):
    """A user mistake, reported as one line."""


def _settings(args: argparse.Namespace) -> settings.Settings:
    flags = {k: getattr(args, k, None) for k in ("listen_host", "listen_port", "web_port", "web_password",
                                                 "data_dir", "certs_dir", "upstream_ca", "allow_private", "metrics",
                                                 "store_url", "api", "workers")}
    flags["no_web"] = getattr(args, "no_web", False)
    flags["no_metrics"] = getattr(args, "no_metrics", False)
    flags["no_api"] = getattr(args, "no_api", False)
    return settings.load(flags, args.env)


def _store(args: argparse.Namespace, s: settings.Settings | None = None) -> SecretStore:
    """The store the settings name; closed when the command ends (a PostgreSQL pool among them)."""
    store = open_store(s or _settings(args))
    args.opened.append(store)
    return store


def _read_value(name: str) -> str:
    if sys.stdin is None or sys.stdin.closed:
        raise UsageError("the value is read from stdin, and there is none")
    if sys.stdin.isatty():
        value = getpass.getpass(f"Value for {name} (hidden): ")
    else:
        try:
            value = sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError("the value on stdin is not UTF-8 text") from None
        if value.endswith("\n"):
            value = value[:-1]
            if value.endswith("\r"):
                value = value[:-1]
    if not value:
        raise UsageError("no value was given on stdin")
    return value


def _warn(warnings: list[str]) -> None:
    for w in warnings:
        print(f"sealgate: warning: {w}", file=sys.stderr)


def cmd_secret_add(args: argparse.Namespace) -> None:
    scope = _scope(args)
    signing = commands.parse_signing(args.sign, args.sign_header, args.region, args.service)
    info, warnings = commands.add_secret(_store(args), args.user, args.name, lambda: _read_value(args.name),
                                         args.origins, allow_http=args.allow_http, replace=args.replace, scope=scope,
                                         signing=signing)
    _warn(warnings)
    print(f"added {info.name} for {info.owner}, allowed to {', '.join(map(str, info.origins))}"
          + (f" ({info.scope.describe()})" if info.scope.to_json() else ""))


def _scope(args: argparse.Namespace):
    return commands.parse_scope(args.methods, args.paths, args.inject, args.on_disallowed, args.cap, args.rate)


def cmd_secret_check(args: argparse.Namespace) -> None:
    """Exit 1 when it warns (main maps _Warned to 1)."""
    store = _store(args)
    warnings = commands.check_secrets(store, args.user)
    for w in warnings:
        print(f"warning: {w}")
    if warnings:
        raise _Warned(f"{len(warnings)} warning(s)")
    print("no warnings")


class _Warned(Exception):
    pass


def cmd_secret_set_scope(args: argparse.Namespace) -> None:
    info = commands.set_scope(_store(args), args.user, args.name, _scope(args) or commands.Scope())
    print(f"{info.name} of {info.owner}: {info.scope.describe() if info.scope.to_json() else 'no scope beyond its origins'}")


def cmd_secret_list(args: argparse.Namespace) -> None:
    store = _store(args)
    infos = commands.list_secrets(store, args.user)
    usage = store.usage.of(infos[0].owner) if infos else {}
    shown = [{**commands.secret_json(i), **commands.scope_json(store, i, usage)} for i in infos]
    if args.json:
        print(json.dumps(shown, indent=2))
        return
    for i, s in zip(infos, shown, strict=True):
        used = " ".join(f"{kind} used {u}" for kind, u in s["used"].items())
        print(f"{i.name}\t{','.join(map(str, i.origins))}\t{i.scope.describe()}{' (' + used + ')' if used else ''}"
              f"\tupdated {commands.iso(i.updated_at)}")


def cmd_secret_rm(args: argparse.Namespace) -> None:
    commands.remove_secret(_store(args), args.user, args.name)
    print(f"removed {args.name} of {args.user}")


def cmd_secret_set_origins(args: argparse.Namespace) -> None:
    info, warnings = commands.set_origins(_store(args), args.user, args.name, args.origins, allow_http=args.allow_http)
    _warn(warnings)
    print(f"{info.name} of {info.owner} is now allowed to {', '.join(map(str, info.origins))}")


def cmd_session_issue(args: argparse.Namespace) -> None:
    s = _settings(args)
    print(json.dumps(commands.issue_session(_store(args, s), s, access=args.access, runchat=args.runchat,
                                            instance=args.instance, user=args.user, author=args.author,
                                            ttl=args.ttl), indent=2))


def cmd_session_revoke(args: argparse.Namespace) -> None:
    _store(args).revoke_session(args.id)
    print(f"revoked session {args.id}; every proxy on this store refuses it within a second")


def cmd_link_start(args: argparse.Namespace) -> None:
    s = _settings(args)
    print(commands.link_start(_store(args, s), s, user=args.user, provider=args.provider,
                              redirect_uri=args.redirect_uri)["authorization_url"])


def cmd_link_finish(args: argparse.Namespace) -> None:
    s = _settings(args)
    _print_link(commands.link_finish(_store(args, s), s, state=args.state, code=args.code))


def cmd_link_add(args: argparse.Namespace) -> None:
    s = _settings(args)
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError("the token response (JSON) is read from stdin")
    _print_link(commands.link_add(_store(args, s), s, user=args.user, provider=args.provider,
                                  token_json=sys.stdin.buffer.read()))


def _print_link(info) -> None:
    shown = commands.link_json(info)
    print(f"linked {info.provider} for {info.owner} (in a session's env as {shown['env']})"
          + (f", token expires {shown['expires_at']}" if shown["expires_at"] else ""))


def cmd_link_list(args: argparse.Namespace) -> None:
    shown = [commands.link_json(i) for i in commands.link_list(_store(args), args.user)]
    if args.json:
        print(json.dumps(shown, indent=2))
        return
    for link in shown:  # (detail is the store's: text, quoted like anything it holds)
        status = link["status"] + (f" ({logfmt.text(link['detail'])})" if link["detail"] else "")
        print("\t".join([link["provider"], link["env"], status, f"expires {link['expires_at'] or 'never'}"]))


def cmd_link_rm(args: argparse.Namespace) -> None:
    commands.link_remove(_store(args), args.user, args.provider)
    print(f"removed the link of {args.user} to {args.provider}")


def cmd_token_issue(args: argparse.Namespace) -> None:
    scopes = commands.checked("scopes", tokens.parse_scopes, args.scopes)
    name = commands.checked("name", validate.token_name, args.name)
    print(json.dumps({"token": tokens.issue(_store(args), name, scopes)}))


def cmd_token_list(args: argparse.Namespace) -> None:
    for t in tokens.list_tokens(_store(args)):
        print(f"{t.name}\t{','.join(t.scopes)}\tcreated {commands.iso(t.created_at)}")


def cmd_token_revoke(args: argparse.Namespace) -> None:
    tokens.revoke(_store(args), args.name)
    print(f"revoked API token {args.name}")


def cmd_key_rotate(args: argparse.Namespace) -> None:
    store = _store(args)
    key_id = rotation.rotate(store, batch=args.batch)
    print(f"rotated: data key {key_id} now seals every secret; retire older keys with `sealgate key retire KEY_ID`")


def cmd_key_retire(args: argparse.Namespace) -> None:
    rotation.retire(_store(args), args.key_id)
    print(f"retired data key {args.key_id}")


def cmd_key_list(args: argparse.Namespace) -> None:
    for k in rotation.list_keys(_store(args)):
        made = commands.iso(k.created_at) if k.created_at else "-"
        print(f"{k.key_id}\t{k.kind}\t{'current' if k.current else '-'}\t{k.secrets} secret(s)\tcreated {made}")


def cmd_backup(args: argparse.Namespace) -> None:
    counts = backup.backup(_store(args), Path(args.file))
    print(f"backed up {_counted(counts)} to {args.file} (values still sealed under the master key)")


def cmd_restore(args: argparse.Namespace) -> None:
    counts = backup.restore(_store(args), Path(args.file))
    print(f"restored {_counted(counts)} from {args.file}")


def _counted(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {table} row(s)" for table, n in counts.items())


def cmd_run(args: argparse.Namespace) -> None:
    s = _settings(args)
    _store(args, s).key  # create the store and key on first use, or fail before listening
    from mitmproxy.exceptions import OptionsError

    from . import runner  # mitmproxy's master is only needed here

    try:
        if s.workers == 1:
            asyncio.run(runner.serve(s))
        else:
            _run_gateway(s)
    except OptionsError as e:
        raise UsageError(str(e)) from None
    except KeyboardInterrupt:
        pass


def _run_gateway(s: settings.Settings) -> None:
    """`run` with several proxy processes on the port, and a supervisor (this process) for them."""
    from . import workers

    try:
        asyncio.run(workers.serve(s))
    except workers.Failed as e:
        raise UsageError(str(e)) from None


def cmd_egress_lock(args: argparse.Namespace) -> None:
    from . import egress_lock
    if args.remove:
        print(f"removed sealgate's egress rules ({egress_lock.remove()})")
        return
    dns = (commands.checked("dns-server", egress_lock.parse_cidrs, args.dns_server) if args.dns_server
           else egress_lock.resolvers() if args.allow_dns else ())
    lock = egress_lock.Lock(commands.checked("proxy-uid", egress_lock.parse_uid, args.proxy_uid or ""), dns,
                            commands.checked("allow-cidr", egress_lock.parse_cidrs, args.allow_cidr))
    if args.dry_run:
        nft = shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin") or not shutil.which("iptables")
        print(lock.nft() if nft else "\n".join(" ".join(c) for c in lock.iptables()))
        return
    print(f"egress locked ({egress_lock.install(lock)}): only uid {lock.proxy_uid} leaves this network namespace")


def cmd_api(args: argparse.Namespace) -> None:
    s = _settings(args)
    if s.api is None:
        raise UsageError("the platform API is turned off (SEALGATE_API_PORT)")
    from . import api  # FastAPI is only needed here
    api.serve(s, _store(args, s))


def cmd_audit(args: argparse.Namespace) -> None:
    records = commands.audit(_store(args), user=args.user, runchat=args.runchat, since=args.since, limit=args.limit)
    if args.json:
        print(json.dumps(records, indent=2))
        return
    for r in records:
        status = "-" if r["status"] is None else str(r["status"])
        fields = (r["at"], r["decision"], r["code"] or "-", status, r["principal"] or "-", r["runchat"] or "-",
                  r["instance"] or "-", ",".join(r["secrets"]) or "-", f"{r['method']} {r['origin']}{r['path']}")
        print("\t".join(logfmt.text(f) for f in fields))


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line like every other sealgate error, and never echoing
    an argument it did not expect: that is where a value pasted on the command line would be."""

    def error(self, message: str):  # type: ignore[override]
        if message.startswith("unrecognized arguments"):
            message = "unexpected arguments (not shown; a secret value is read from stdin, never from argv)"
        message = _ECHOED.sub(r"\1 (not shown)", message)
        self.exit(2, f"sealgate: error: {message} (see `{self.prog} --help`)\n")


# argparse's errors that quote what was typed
_ECHOED = re.compile(r"(invalid choice|invalid \w+ value|ignored explicit argument|expected one argument|"
                     r"not allowed with argument [^:]*):? ?'(?:[^'\\]|\\.)*'")


def _scope_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scope (beyond the origins)")
    g.add_argument("--methods", help="only these HTTP methods may carry the value, e.g. GET,HEAD")
    g.add_argument("--paths", help="only request paths under these prefixes, e.g. /v1/chat/,/v1/models")
    g.add_argument("--inject", help="where the value may be substituted: headers,query,body")
    g.add_argument("--cap", help="at most this many requests per window, e.g. 1000/day (minute, hour, day)")
    g.add_argument("--rate", help="at most this many requests per second (or window), e.g. 5/s")
    g.add_argument("--on-disallowed", choices=("block", "forward"),
                   help="a request to a destination the secret does not allow: refused (block, the default) "
                        "or sent with the placeholder as it is (forward)")


def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    g = common.add_argument_group("settings (override SEALGATE_* variables and config/sealgate.yaml)")
    g.add_argument("--data-dir", help="store and master key folder [SEALGATE_DATA_DIR]")
    g.add_argument("--certs-dir", help="the proxy's CA folder [SEALGATE_CERTS_DIR]")
    g.add_argument("--listen-host", help="proxy address [SEALGATE_LISTEN_HOST]")
    g.add_argument("--listen-port", help="proxy port [SEALGATE_LISTEN_PORT]")
    g.add_argument("--upstream-ca", help="PEM file of extra CAs trusted upstream [SEALGATE_UPSTREAM_CA]")
    g.add_argument("--allow-private", help="CIDRs reachable although private [SEALGATE_ALLOW_PRIVATE]")
    g.add_argument("--store-url", help="sqlite:///file or postgresql://user@host:port/db [SEALGATE_STORE_URL]")

    def command(parent, name: str, func: Callable, help: str, *positionals: str,
                flags: tuple[str, ...] = ()) -> argparse.ArgumentParser:
        """A subcommand with the common settings, positional arguments, and required flags (--user ...)."""
        parser = parent.add_parser(name, parents=[common], help=help)
        for positional in positionals:
            parser.add_argument(positional)
        for flag in flags:
            parser.add_argument(f"--{flag}", required=True)
        parser.set_defaults(func=func)
        return parser

    p = _Parser(prog="sealgate", description="Secrets that workers use but never read.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    secret = sub.add_parser("secret", help="add, list, remove secrets").add_subparsers(
        dest="action", required=True, parser_class=_Parser)
    add = secret.add_parser("add", parents=[common], help="add a secret; the value is read from stdin")
    add.add_argument("--user", required=True)
    add.add_argument("--name", required=True)
    add.add_argument("--origins", required=True, help='comma-separated, e.g. "https://api.example.com"')
    add.add_argument("--allow-http", action="store_true", help="allow http:// origins (the value goes unencrypted)")
    add.add_argument("--replace", action="store_true", help="replace the value of an existing secret")
    _scope_flags(add)
    g = add.add_argument_group("signing (the value signs requests and never goes in one; set here only)")
    g.add_argument("--sign", choices=("hmac-sha256", "aws-sigv4"),
                   help="hmac-sha256: the placeholder in a header becomes the hex HMAC of the body; aws-sigv4: an "
                        "Authorization header that is the placeholder becomes an AWS SigV4 signature (value "
                        "ACCESS_KEY_ID:SECRET_ACCESS_KEY)")
    g.add_argument("--sign-header", help="hmac-sha256: the one header its placeholder may stand in, e.g. X-Signature")
    g.add_argument("--region", help="aws-sigv4: the region, e.g. us-east-1")
    g.add_argument("--service", help="aws-sigv4: the service, e.g. s3, execute-api")
    add.set_defaults(func=cmd_secret_add)
    ls = secret.add_parser("list", parents=[common], help="list a user's secrets (never values)")
    ls.add_argument("--user", required=True)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_secret_list)
    rm = secret.add_parser("rm", parents=[common], help="remove a secret")
    rm.add_argument("--user", required=True)
    rm.add_argument("--name", required=True)
    rm.set_defaults(func=cmd_secret_rm)
    so = secret.add_parser("set-origins", parents=[common], help="replace a secret's allowed origins")
    so.add_argument("--user", required=True)
    so.add_argument("--name", required=True)
    so.add_argument("--origins", required=True)
    so.add_argument("--allow-http", action="store_true")
    so.set_defaults(func=cmd_secret_set_origins)
    ck = secret.add_parser("check", parents=[common], help="lint secrets against the docs' advice (exit 1: warnings)")
    ck.add_argument("--user", help="only this user's secrets (default: every user's)")
    ck.set_defaults(func=cmd_secret_check)
    sc = secret.add_parser("set-scope", parents=[common], help="replace a secret's scope (none given: no scope)")
    sc.add_argument("--user", required=True)
    sc.add_argument("--name", required=True)
    _scope_flags(sc)
    sc.set_defaults(func=cmd_secret_set_scope)

    session = sub.add_parser("session", help="issue worker sessions").add_subparsers(
        dest="action", required=True, parser_class=_Parser)
    si = session.add_parser("issue", parents=[common], help="issue a session: proxy_url, ca_cert, env")
    si.add_argument("--access", required=True, choices=sessions.ACCESS_MODES)
    si.add_argument("--runchat", required=True)
    si.add_argument("--instance", required=True)
    si.add_argument("--user", help="signed-in user, or the API key's owner")
    si.add_argument("--author", help="workflow author (app view while signed out)")
    si.add_argument("--ttl", help="seconds the session lives (60 to 604800)")
    si.set_defaults(func=cmd_session_issue)
    command(session, "revoke", cmd_session_revoke, "revoke a session on every proxy of the store", "id")

    token = sub.add_parser("token", help="bearer tokens of the platform API").add_subparsers(
        dest="action", required=True, parser_class=_Parser)
    ti = token.add_parser("issue", parents=[common], help='print {"token": ...} once; only its hash is kept')
    ti.add_argument("--name", required=True)
    ti.add_argument("--scopes", required=True, help=f"comma-separated: {', '.join(tokens.SCOPES)}")
    ti.set_defaults(func=cmd_token_issue)
    command(token, "list", cmd_token_list, "names and scopes (never a token)")
    command(token, "revoke", cmd_token_revoke, "revoke a token by name", "name")

    link = sub.add_parser("link", help="linked accounts: OAuth tokens the proxy keeps fresh").add_subparsers(
        dest="action", required=True, parser_class=_Parser)
    command(link, "start", cmd_link_start, "print the authorization URL to send the user to (the provider: one of "
            "config/providers.yaml or SEALGATE_PROVIDERS; the redirect URI: where it sends the user back with a code)",
            flags=("user", "provider", "redirect-uri"))
    command(link, "finish", cmd_link_finish, "exchange the code the redirect URI received", flags=("state", "code"))
    command(link, "add", cmd_link_add, "keep tokens got elsewhere: a token response JSON on stdin",
            flags=("user", "provider"))
    command(link, "list", cmd_link_list, "a user's links and their state (never a token)",
            flags=("user",)).add_argument("--json", action="store_true")
    command(link, "rm", cmd_link_rm, "remove a link", flags=("user", "provider"))

    key = sub.add_parser("key", help="rotate and retire the keys values are sealed under").add_subparsers(
        dest="action", required=True, parser_class=_Parser)
    kr = key.add_parser("rotate", parents=[common], help="add a data key and move every secret under it")
    kr.add_argument("--batch", type=int, default=rotation.BATCH, help="secrets per transaction (100)")
    kr.set_defaults(func=cmd_key_rotate)
    command(key, "retire", cmd_key_retire, "remove a data key that nothing uses any more", "key_id")
    command(key, "list", cmd_key_list, "the keys, which is current, what each seals")
    command(sub, "backup", cmd_backup, "write the store's rows (values still sealed) to FILE", "file")
    command(sub, "restore", cmd_restore, "restore a backup into an empty store", "file")

    audit = sub.add_parser("audit", parents=[common], help="read the audit trail (newest first)")
    audit.add_argument("--user", help="only this principal's decisions")
    audit.add_argument("--runchat", help="only this runchat's decisions")
    audit.add_argument("--since", help="a duration (30m, 2h, 7d) or an ISO 8601 time")
    audit.add_argument("--limit", type=int, default=1000, help="at most this many records (1000)")
    audit.add_argument("--json", action="store_true")
    audit.set_defaults(func=cmd_audit)

    run = sub.add_parser("run", parents=[common], help="run the proxy")
    web = run.add_mutually_exclusive_group()
    web.add_argument("--web-port", help="dashboard port [SEALGATE_WEB_PORT]")
    web.add_argument("--no-web", action="store_true", help="run without the dashboard")
    run.add_argument("--web-password", help="dashboard password [SEALGATE_WEB_PASSWORD]")
    probes = run.add_mutually_exclusive_group()
    probes.add_argument("--metrics-port", dest="metrics", help="[host:]port of the probes [SEALGATE_METRICS_PORT]")
    probes.add_argument("--no-metrics", action="store_true", help="run without the probes and metrics")
    apis = run.add_mutually_exclusive_group()
    apis.add_argument("--api-port", dest="api", help="[host:]port of the platform API [SEALGATE_API_PORT]")
    apis.add_argument("--no-api", action="store_true", help="run without the platform API")
    run.add_argument("--workers", help="proxy processes sharing the listen port, 1 to 64 [SEALGATE_WORKERS]")
    run.set_defaults(func=cmd_run)
    lock = sub.add_parser("egress-lock", help="let only the proxy's uid open connections that leave this network "
                          "namespace (an init container's job; needs NET_ADMIN)")
    lock.add_argument("--proxy-uid", help="the numeric uid `sealgate run` runs as (required unless --remove)")
    lock.add_argument("--allow-dns", action="store_true",
                      help="let every process reach port 53 of the nameservers in /etc/resolv.conf (DNS)")
    lock.add_argument("--dns-server", help="comma-separated: these nameservers instead (implies --allow-dns)")
    lock.add_argument("--allow-cidr", help="comma-separated CIDRs every process may reach (cluster services)")
    lock.add_argument("--dry-run", action="store_true", help="print the rules, change nothing")
    lock.add_argument("--remove", action="store_true", help="take the rules out")
    lock.set_defaults(func=cmd_egress_lock)
    api = sub.add_parser("api", parents=[common], help="serve only the platform API (`run` starts it too)")
    api.add_argument("--api-port", dest="api", help="[host:]port [SEALGATE_API_PORT]")
    api.set_defaults(func=cmd_api)
    return p


def main(argv: list[str] | None = None, env: dict[str, str] | None = None) -> int:
    """Run one command; env stands in for os.environ (for tests that call this in-process)."""
    args = _parser().parse_args(argv)
    args.env, args.opened = env, []
    logging.getLogger("psycopg").setLevel(logging.CRITICAL)  # a store error is the one line below, not its retries
    handler: Callable[[argparse.Namespace], None] = args.func
    try:
        handler(args)
    except KeyboardInterrupt:
        print("sealgate: interrupted", file=sys.stderr)
        return 130
    except _Warned as e:
        print(f"sealgate: {e}", file=sys.stderr)
        return 1
    except commands.Invalid as e:
        print(f"sealgate: error: --{e.field.replace('_', '-')}: {e}", file=sys.stderr)
        return 1
    except (UsageError, ValueError, StoreError, settings.ConfigError, ca.CertError, LockError,
            oauth.TokenUnavailable) as e:
        print(f"sealgate: error: {e}", file=sys.stderr)
        return 1
    except sqlite3.Error as e:
        print(f"sealgate: error: the store cannot be used: {e}", file=sys.stderr)
        return 1
    finally:
        for store in args.opened:
            store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
