"""One request, sent by a real client through the proxy, as worker code would send it."""

from __future__ import annotations

import base64
import json
import ssl
from urllib.parse import urlencode

import httpx
import requests

from conftest import ClientResult, curl, node_fetch

CLIENTS = ["curl", "requests", "httpx", "node"]


def send(client: str, session: dict, method: str, url: str, *, headers: dict | None = None,
         json_body: object = None, form: dict | None = None, basic: tuple[str, str] | None = None) -> ClientResult:
    headers = dict(headers or {})
    body: str | None = None
    if json_body is not None:
        body, headers["Content-Type"] = json.dumps(json_body), "application/json"
    elif form is not None:
        body, headers["Content-Type"] = urlencode(form), "application/x-www-form-urlencoded"
    if basic is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(basic).encode()).decode()
    if client == "curl":
        args = ["-X", method]
        for k, v in headers.items():
            args += ["-H", f"{k}: {v}"]
        if body is not None:
            args += ["--data-binary", body]
        return curl(session, url, *args)
    if client == "requests":
        with requests.Session() as s:
            s.trust_env = False
            r = s.request(method, url, headers=headers, data=body, verify=session["ca_cert"], timeout=20,
                          proxies={"https": session["proxy_url"], "http": session["proxy_url"]},
                          allow_redirects=False)
        return ClientResult(r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content)
    if client == "httpx":
        ctx = ssl.create_default_context(cafile=session["ca_cert"])
        with httpx.Client(proxy=session["proxy_url"], verify=ctx, trust_env=False, timeout=20) as c:
            r = c.request(method, url, headers=headers, content=body)
        return ClientResult(r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content)
    if client == "node":
        return node_fetch(session, url, method=method, headers=headers, body=body)
    raise ValueError(client)
