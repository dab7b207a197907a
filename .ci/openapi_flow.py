#!/usr/bin/env python3
"""Scripted contract walk of a live verigate against openapi/openapi.json.

schemathesis (run by .ci/openapi.sh) fuzzes each operation, but random input rarely reaches the
states that only a real mail unlocks: a confirm link, a right code, a locked, superseded, expired
or canceled verification, a rate limit, a live outbox entry, the watch stream. This script walks
those flows on both listeners, reading the mail the `file` transport writes, and validates every
answer with schemathesis' own checks (status code, content type, headers and body schema as
documented), plus the few facts of DESIGN.md §3 each step is about.

Usage: openapi_flow.py --spec FILE --api URL --public URL --key KEY --tight-key KEY --mail-dir DIR
Exit status 1 when any step fails; every failure is printed with its request and response.
"""

import argparse
import base64
import email
import glob
import json
import os
import re
import socket
import sys
import time
import urllib.parse

import jsonschema
import requests
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


class Walk:
    def __init__(self, args):
        self.schema = schemathesis.openapi.from_path(args.spec)
        self.api = args.api.rstrip("/")
        self.public = args.public.rstrip("/")
        self.key = args.key
        self.tight_key = args.tight_key
        self.mail_dir = args.mail_dir
        self.http = requests.Session()
        self.failures = []
        self.steps = 0
        self.run_id = f"{int(time.time() * 1000) % 10**9}"
        with open(args.spec) as f:
            components = json.load(f)["components"]
        self.watch_event = jsonschema.Draft202012Validator(
            {"$ref": "#/components/schemas/WatchEvent", "components": components},
            format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
        )

    # -- plumbing ---------------------------------------------------------------------------

    def fail(self, what, resp=None):
        detail = ""
        if resp is not None:
            req = resp.request
            body = req.body if isinstance(req.body, str) else (req.body or b"").decode("utf-8", "replace")
            detail = (
                f"\n    request:  {req.method} {req.url}\n              {body[:300]}"
                f"\n    response: {resp.status_code} {resp.headers.get('content-type')}\n              {resp.text[:500]}"
            )
        self.failures.append(f"{what}{detail}")
        print(f"  FAIL {what}{detail}", flush=True)

    def call(
        self,
        method,
        template,
        params=None,
        *,
        public=False,
        auth="key",
        query=None,
        headers=None,
        body=None,
        raw=None,
        content_type=None,
        expect=None,
        code=None,
        validate=True,
        stream=False,
    ):
        """Sends one request and validates the answer against the document's operation."""
        self.steps += 1
        params = params or {}
        path = template
        for k, v in params.items():
            path = path.replace("{" + k + "}", urllib.parse.quote(str(v), safe=""))
        url = (self.public if public else self.api) + path
        h = dict(headers or {})
        if auth == "key":
            h["Authorization"] = f"Bearer {self.key}"
        elif auth == "tight":
            h["Authorization"] = f"Bearer {self.tight_key}"
        elif auth is not None:
            h["Authorization"] = auth
        data = None
        if body is not None:
            data = json.dumps(body)
            h.setdefault("Content-Type", "application/json")
        elif raw is not None:
            data = raw
        if content_type is not None:
            h["Content-Type"] = content_type
        resp = self.http.request(
            method, url, params=query, headers=h, data=data, allow_redirects=False, timeout=15, stream=stream
        )
        if not stream:
            _ = resp.content
        label = f"{method} {path}"
        if validate:
            op = self.schema[template][method]
            case = op.Case(path_parameters=params or None, query=query, headers=h or None)
            try:
                case.validate_response(resp, checks=CHECKS)
            except (Exception, BaseExceptionGroup) as e:  # schemathesis raises a FailureGroup
                self.fail(f"{label}: does not conform to the document:\n{_indent(str(e))}", resp)
        if expect is not None and resp.status_code != expect:
            self.fail(f"{label}: expected status {expect}, got {resp.status_code}", resp)
        elif code is not None:
            got = _error_code(resp)
            if got != code:
                self.fail(f"{label}: expected error code {code!r}, got {got!r}", resp)
        return resp

    def check(self, cond, what, resp=None):
        if not cond:
            self.fail(what, resp)

    def mail_for(self, vid, n=1, timeout=10.0):
        """The n-th newest .eml of verification `vid` (its Message-ID starts with the id)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = []
            for f in glob.glob(os.path.join(self.mail_dir, "*.eml")):
                try:
                    with open(f, encoding="utf-8", errors="replace") as fh:
                        msg = email.message_from_file(fh)
                except OSError:
                    continue
                if (msg.get("Message-ID") or "").startswith(f"<{vid}."):
                    found.append((os.path.getmtime(f), msg))
            if len(found) >= n:
                found.sort(key=lambda x: x[0])
                msg = found[-1][1]
                for part in msg.walk():
                    if part.get_content_type() == "text/plain":
                        return part.get_payload(decode=True).decode("utf-8")
            time.sleep(0.05)
        self.fail(f"no mail for {vid} in {self.mail_dir} after {timeout} s")
        return ""

    def link_token(self, text):
        m = re.search(r"/v/([A-Za-z0-9_-]+)", text)
        return m.group(1) if m else None

    def code(self, text):
        m = re.search(r"(?<![0-9])([0-9]{6})(?![0-9])", text)
        return m.group(1) if m else None

    def email(self, tag):
        return f"{tag}-{self.run_id}@example.com"

    def create(self, email_addr, expect=202, **members):
        r = self.call("POST", "/v1/verifications", body={"email": email_addr, **members}, expect=expect)
        return r.json() if r.status_code == 202 else {}

    # -- the walk ---------------------------------------------------------------------------

    def probes(self):
        print("== probes (both listeners)", flush=True)
        self.call("GET", "/healthz", auth=None, expect=200)
        self.call("HEAD", "/healthz", auth=None, expect=200)
        self.call("GET", "/healthz", public=True, auth=None, expect=200)
        self.call("HEAD", "/healthz", public=True, auth=None, expect=200)
        self.call("GET", "/readyz", auth=None, expect=200)
        self.call("HEAD", "/readyz", auth=None, expect=200)
        r = self.call("GET", "/metrics", auth=None, expect=200)
        self.check("verigate_http_requests_total" in r.text, "/metrics lacks verigate_http_requests_total", r)

    def request_rules(self):
        print("== auth and request rules (401, 400, 405, 413, 415, 404)", flush=True)
        ok = {"email": self.email("rules")}
        self.call("POST", "/v1/verifications", auth=None, body=ok, expect=401, code="unauthorized")
        self.call("POST", "/v1/verifications", auth="Bearer not-a-key-0123456789", body=ok, expect=401, code="unauthorized")
        self.call("POST", "/v1/verifications", auth=f"Basic {self.key}", body=ok, expect=401, code="unauthorized")
        self.call("GET", "/admin/v1/outbox", auth=None, expect=401, code="unauthorized")
        self.call("POST", "/v1/addresses/validate", auth=None, body=ok, expect=401, code="unauthorized")
        self.call("POST", "/v1/verifications", raw=json.dumps(ok), content_type="text/plain", expect=415, code="unsupported_media_type")
        big = {"email": self.email("big"), "metadata": {"x": "a" * (70 * 1024)}}
        self.call("POST", "/v1/verifications", body=big, expect=413, code="payload_too_large")
        self.call("POST", "/v1/verifications", raw="{", content_type="application/json", expect=400, code="invalid_json")
        self.call("POST", "/v1/verifications", raw="", content_type="application/json", expect=400, code="invalid_json")
        self.call("POST", "/v1/verifications", raw="[1]", content_type="application/json", expect=400, code="invalid_request")
        r = self.call("POST", "/v1/verifications", body={**ok, "colour": "red"}, expect=400, code="unknown_field")
        self.check(_error(r).get("field") == "colour", "unknown_field does not name the field", r)
        r = self.call("POST", "/v1/verifications", body={}, expect=400, code="invalid_request")
        self.check(_error(r).get("field") == "email", "missing email: field is not 'email'", r)
        self.call("POST", "/v1/verifications", body={"email": "not an address"}, expect=400, code="invalid_email")
        self.call("POST", "/v1/verifications", body={**ok, "method": "carrier_pigeon"}, expect=400, code="invalid_request")
        self.call("POST", "/v1/verifications", body={**ok, "purpose": "Sign Up"}, expect=400, code="invalid_request")
        self.call("POST", "/v1/verifications", body={**ok, "ttl_seconds": 0}, expect=400, code="invalid_request")
        self.call("POST", "/v1/verifications", body={**ok, "client_ip": "300.1.1.1"}, expect=400, code="invalid_request")
        self.call("POST", "/v1/verifications", body={**ok, "metadata": [1]}, expect=400, code="invalid_request")
        deep = 1
        for _ in range(32):
            deep = [deep]
        r = self.call("POST", "/v1/verifications", body={**ok, "metadata": {"a": deep}}, expect=400, code="invalid_request")
        self.check(_error(r).get("field") == "metadata", "metadata nested 33 deep: field is not 'metadata'", r)
        self.call("POST", "/v1/verifications", body={**ok, "redirect_url": "https://evil.example.net/"}, expect=400, code="invalid_redirect_url")
        self.call("POST", "/v1/verifications", body=ok, headers={"Idempotency-Key": "k" * 256}, expect=400, code="invalid_idempotency_key")
        self.call("POST", "/v1/verifications/check", body={"code": "123456"}, expect=400, code="invalid_request")
        self.call(
            "POST", "/v1/verifications/check",
            body={"id": "vrf_01M814RRFA1X74K4N7EWHWFFW1", "email": ok["email"], "code": "1"},
            expect=400, code="invalid_request",
        )
        # Methods and paths outside the document: 405 with Allow, 404 not_found.
        for method, path, allow in [
            ("PUT", "/v1/verifications", "POST"),
            ("GET", "/v1/verifications/check", "POST"),
            ("PATCH", "/v1/verifications/vrf_01M814RRFA1X74K4N7EWHWFFW1", "GET, DELETE"),
            ("GET", "/v1/addresses/validate", "POST"),
            ("POST", "/admin/v1/outbox", "GET"),
        ]:
            self.steps += 1
            r = self.http.request(method, self.api + path, headers={"Authorization": f"Bearer {self.key}"})
            self.check(
                r.status_code == 405 and r.headers.get("allow") == allow and _error_code(r) == "method_not_allowed"
                and _error(r).get("allow") == allow,
                f"{method} {path}: expected 405 method_not_allowed with Allow: {allow}",
                r,
            )
        self.steps += 1
        r = self.http.get(self.api + "/v2/nothing")
        self.check(r.status_code == 404 and _error_code(r) == "not_found", "unknown api path: expected 404 not_found", r)

    def link_flow(self):
        print("== link flow: page, HEAD, button, 303 (public listener)", flush=True)
        redirect = "https://app.example.com/welcome/after"
        v = self.create(self.email("link"), method="link", redirect_url=redirect, subject="user-42", metadata={"plan": "pro"})
        if not v:
            return
        vid = v["id"]
        token = self.link_token(self.mail_for(vid))
        if not token:
            self.fail(f"no link in the mail of {vid}")
            return
        r = self.call("GET", "/v/{token}", {"token": token}, public=True, auth=None, headers={"User-Agent": "scanner/1.0"}, expect=200)
        self.check("<form" in r.text.lower(), "confirm page has no form", r)
        r = self.call("HEAD", "/v/{token}", {"token": token}, public=True, auth=None, expect=200)
        self.check(r.content == b"", "HEAD /v/{token} has a body", r)
        r = self.call("GET", "/v1/verifications/{id}", {"id": vid}, expect=200)
        self.check(r.json().get("status") == "pending", "GET /v/{token} changed the verification's state", r)
        self.check(len(r.json().get("prefetches", [])) == 2, "the two pre-click fetches are not recorded", r)
        r = self.call("POST", "/v/{token}", {"token": token}, public=True, auth=None, expect=303)
        loc = r.headers.get("location", "")
        want = f"{redirect}?verification={vid}&status=verified"
        self.check(loc == want, f"303 Location is {loc!r}, expected {want!r}", r)
        r = self.call("POST", "/v/{token}", {"token": token}, public=True, auth=None, expect=303)
        self.check(r.headers.get("location") == want, "a second POST does not redirect with status=verified", r)
        r = self.call("GET", "/v1/verifications/{id}", {"id": vid}, expect=200)
        self.check(r.json().get("status") == "verified" and r.json().get("verified_at"), "not verified after the button", r)
        self.call("GET", "/v/{token}", {"token": token}, public=True, auth=None, expect=200)
        self.call("POST", "/v1/verifications/{id}/resend", {"id": vid}, expect=409, code="verified")
        self.call("DELETE", "/v1/verifications/{id}", {"id": vid}, expect=409, code="verified")
        self.call("POST", "/v1/verifications/check", body={"id": vid, "code": "123456"}, expect=400, code="no_code")

        # Without a redirect_url the button shows the result page.
        v = self.create(self.email("link-noredirect"))
        if v:
            token = self.link_token(self.mail_for(v["id"]))
            r = self.call("POST", "/v/{token}", {"token": token}, public=True, auth=None, expect=200)

        # Forged and malformed tokens: the invalid-link page, never a stack trace.
        forged = (token or "AAAA")[:-4] + ("AAAA" if not (token or "").endswith("AAAA") else "BBBB")
        self.call("GET", "/v/{token}", {"token": forged}, public=True, auth=None, expect=404)
        self.call("HEAD", "/v/{token}", {"token": forged}, public=True, auth=None, expect=404)
        self.call("POST", "/v/{token}", {"token": forged}, public=True, auth=None, expect=404)
        self.call("GET", "/v/{token}", {"token": "x"}, public=True, auth=None, headers={"Accept-Language": "zh-CN"}, expect=404)
        self.steps += 1
        r = self.http.put(f"{self.public}/v/{forged}")
        self.check(r.status_code == 405 and r.headers.get("allow") == "GET, HEAD, POST", "PUT /v/{token}: expected 405 with Allow", r)
        self.steps += 1
        r = self.http.get(f"{self.public}/nothing/here")
        self.check(r.status_code == 404 and r.headers.get("content-type", "").startswith("text/html"), "unknown public path: expected a 404 page", r)

    def code_flow(self):
        print("== code flow: wrong, right, idempotent repeat", flush=True)
        addr = self.email("code")
        v = self.create(addr, method="code", purpose="login", subject="user-7")
        if not v:
            return
        vid = v["id"]
        code = self.code(self.mail_for(vid))
        if not code:
            self.fail(f"no code in the mail of {vid}")
            return
        wrong = f"{(int(code) + 1) % 1000000:06d}"
        r = self.call("POST", "/v1/verifications/check", body={"id": vid, "code": wrong}, expect=400, code="invalid_code")
        self.check(_error(r).get("attempts_remaining") == 4, "invalid_code does not say 4 attempts remain", r)
        spaced = f"{code[:3]} {code[3:]}"
        r = self.call("POST", "/v1/verifications/check", body={"email": addr.upper(), "purpose": "login", "code": spaced}, expect=200)
        self.check(r.json().get("id") == vid and r.json().get("subject") == "user-7", "check answered for another verification", r)
        self.call("POST", "/v1/verifications/check", body={"id": vid, "code": f"{code[:3]}-{code[3:]}"}, expect=200)
        r = self.call("GET", "/v1/verifications/{id}", {"id": vid}, expect=200)
        self.check(r.json().get("status") == "verified" and r.json().get("attempts_remaining") == 3, "GET after check", r)
        self.call("POST", "/v1/verifications/check", body={"email": self.email("nobody"), "code": code}, expect=404, code="not_found")
        self.call("POST", "/v1/verifications/check", body={"id": "vrf_nonsense", "code": code}, expect=404, code="not_found")

    def lock_flow(self):
        print("== lock: the attempt budget", flush=True)
        v = self.create(self.email("lock"), method="link_and_code")
        if not v:
            return
        vid = v["id"]
        code = self.code(self.mail_for(vid))
        wrong = f"{(int(code or '0') + 1) % 1000000:06d}"
        for left in (4, 3, 2, 1, 0):
            r = self.call("POST", "/v1/verifications/check", body={"id": vid, "code": wrong}, expect=400, code="invalid_code")
            self.check(_error(r).get("attempts_remaining") == left, f"attempts_remaining should be {left}", r)
        self.call("POST", "/v1/verifications/check", body={"id": vid, "code": code}, expect=423, code="locked")
        self.call("POST", "/v1/verifications/{id}/resend", {"id": vid}, expect=423, code="locked")
        self.call("DELETE", "/v1/verifications/{id}", {"id": vid}, expect=423, code="locked")
        r = self.call("GET", "/v1/verifications/{id}", {"id": vid}, expect=200)
        self.check(r.json().get("status") == "locked", "not locked after the budget", r)

    def supersede_flow(self):
        print("== supersede: a newer verification for the same address and purpose", flush=True)
        addr = self.email("again")
        redirect = "https://app.example.com/welcome"
        old = self.create(addr, method="link_and_code", redirect_url=redirect)
        if not old:
            return
        text = self.mail_for(old["id"])
        token, code = self.link_token(text), self.code(text)
        new = self.create(addr, method="link_and_code")
        if not new:
            return
        r = self.call("GET", "/v1/verifications/{id}", {"id": old["id"]}, expect=200)
        self.check(r.json().get("status") == "superseded", "the older verification is not superseded", r)
        self.call("POST", "/v1/verifications/check", body={"id": old["id"], "code": code}, expect=409, code="superseded")
        self.call("POST", "/v1/verifications/{id}/resend", {"id": old["id"]}, expect=409, code="superseded")
        self.call("DELETE", "/v1/verifications/{id}", {"id": old["id"]}, expect=409, code="superseded")
        self.call("GET", "/v/{token}", {"token": token}, public=True, auth=None, expect=410)
        r = self.call("POST", "/v/{token}", {"token": token}, public=True, auth=None, expect=303)
        self.check(
            r.headers.get("location") == f"{redirect}?verification={old['id']}&status=superseded",
            "a superseded link does not redirect with status=superseded",
            r,
        )
        r = self.call("POST", "/v1/verifications/{id}/resend", {"id": new["id"]}, expect=202)
        self.mail_for(new["id"], n=2)

    def expiry_flow(self):
        print("== expiry (ttl_seconds 1)", flush=True)
        v = self.create(self.email("expire"), method="link_and_code", ttl_seconds=1)
        if not v:
            return
        vid = v["id"]
        text = self.mail_for(vid)
        token, code = self.link_token(text), self.code(text)
        time.sleep(1.5)
        self.call("POST", "/v1/verifications/check", body={"id": vid, "code": code}, expect=410, code="expired")
        self.call("POST", "/v1/verifications/{id}/resend", {"id": vid}, expect=410, code="expired")
        self.call("DELETE", "/v1/verifications/{id}", {"id": vid}, expect=410, code="expired")
        r = self.call("GET", "/v1/verifications/{id}", {"id": vid}, expect=200)
        self.check(r.json().get("status") == "expired", "not expired past expires_at", r)
        self.call("GET", "/v/{token}", {"token": token}, public=True, auth=None, expect=410)
        self.call("POST", "/v/{token}", {"token": token}, public=True, auth=None, expect=410)

    def cancel_flow(self):
        print("== cancel", flush=True)
        v = self.create(self.email("cancel"), method="code")
        if not v:
            return
        vid = v["id"]
        code = self.code(self.mail_for(vid))
        r = self.call("DELETE", "/v1/verifications/{id}", {"id": vid}, expect=200)
        self.check(r.json() == {"id": vid, "status": "canceled"}, "cancel answer", r)
        self.call("DELETE", "/v1/verifications/{id}", {"id": vid}, expect=409, code="canceled")
        self.call("POST", "/v1/verifications/check", body={"id": vid, "code": code}, expect=409, code="canceled")
        self.call("POST", "/v1/verifications/{id}/resend", {"id": vid}, expect=409, code="canceled")
        for bad in ("vrf_01M814RRFA1X74K4N7EWHWFFW1", "nonsense"):
            self.call("GET", "/v1/verifications/{id}", {"id": bad}, expect=404, code="not_found", validate=bad.startswith("vrf_"))
            self.call("DELETE", "/v1/verifications/{id}", {"id": bad}, expect=404, code="not_found", validate=bad.startswith("vrf_"))
            self.call("POST", "/v1/verifications/{id}/resend", {"id": bad}, expect=404, code="not_found", validate=bad.startswith("vrf_"))

    def idempotency_and_limits(self):
        print("== Idempotency-Key and rate limits (429)", flush=True)
        key = f"order-{self.run_id}"
        body = {"email": self.email("idem"), "method": "code"}
        a = self.call("POST", "/v1/verifications", body=body, headers={"Idempotency-Key": key}, expect=202)
        b = self.call("POST", "/v1/verifications", body=body, headers={"Idempotency-Key": key}, expect=202)
        self.check(a.text == b.text, "a repeated Idempotency-Key did not return the first answer", b)
        self.call(
            "POST", "/v1/verifications", body={**body, "method": "link"}, headers={"Idempotency-Key": key},
            expect=409, code="idempotency_conflict",
        )
        # The app "tight" allows one mail per address per minute.
        addr = self.email("tight")
        self.call("POST", "/v1/verifications", auth="tight", body={"email": addr}, expect=202)
        r = self.call("POST", "/v1/verifications", auth="tight", body={"email": addr}, expect=429, code="rate_limited")
        self.check(_error(r).get("limit") == "per_address", "rate_limited does not name per_address", r)
        self.check((r.headers.get("retry-after") or "").isdigit(), "429 without a numeric Retry-After", r)

    def validate_flow(self):
        print("== address validation", flush=True)
        r = self.call("POST", "/v1/addresses/validate", body={"email": "Someone@GMIAL.com", "check_dns": False}, expect=200)
        j = r.json()
        self.check(j.get("valid") is True and j.get("suggestion") == "Someone@gmail.com" and j.get("deliverability") is None, "validate gmial", r)
        r = self.call("POST", "/v1/addresses/validate", body={"email": "a@"}, expect=200)
        self.check(r.json().get("valid") is False and r.json().get("reason"), "an invalid address is not valid:false with a reason", r)
        r = self.call("POST", "/v1/addresses/validate", body={"email": "someone@example.com", "check_dns": True}, expect=200)
        self.check(isinstance(r.json().get("deliverability"), dict), "check_dns without a deliverability verdict", r)
        self.call("POST", "/v1/addresses/validate", body={"email": "a@example.com", "check_dns": "yes"}, expect=400, code="invalid_request")
        self.call("POST", "/v1/addresses/validate", body={"mail": "a@example.com"}, expect=400, code="unknown_field")
        self.call("POST", "/v1/addresses/validate", raw="email=a", content_type="application/x-www-form-urlencoded", expect=415)

    def admin_flow(self):
        print("== admin outbox", flush=True)
        r = self.call("GET", "/admin/v1/outbox", query={"limit": "1"}, expect=200)
        page = r.json()
        if not page.get("entries"):
            self.fail("the outbox lists no entries after this walk", r)
            return
        self.check(page.get("next_after") == page["entries"][0]["id"], "a full page has no next_after", r)
        r = self.call("GET", "/admin/v1/outbox", query={"after": page["next_after"], "limit": "2", "state": "delivered"}, expect=200)
        self.check(all(e["state"] == "delivered" for e in r.json().get("entries", [])), "state filter", r)
        mid = page["entries"][0]["id"]
        self.call("GET", "/admin/v1/outbox/{id}", {"id": mid}, expect=200)
        r = self.call("POST", "/admin/v1/outbox/{id}/retry", {"id": mid}, expect=200)
        self.check(r.json().get("state") == "scheduled" and r.json().get("attempts") == 0, "retry does not reschedule", r)
        r = self.call("DELETE", "/admin/v1/outbox/{id}", {"id": mid}, expect=200)
        self.check(r.json() == {"id": mid, "deleted": True}, "drop answer", r)
        self.call("GET", "/admin/v1/outbox/{id}", {"id": mid}, expect=404, code="not_found")
        self.call("POST", "/admin/v1/outbox/{id}/retry", {"id": mid}, expect=404, code="not_found")
        self.call("DELETE", "/admin/v1/outbox/{id}", {"id": mid}, expect=404, code="not_found")
        self.call("GET", "/admin/v1/outbox", query={"state": "lost"}, expect=400, code="invalid_request")
        self.call("GET", "/admin/v1/outbox", query={"after": "nonsense"}, expect=400, code="invalid_request")
        self.call("GET", "/admin/v1/outbox", query={"limit": "-1"}, expect=400, code="invalid_request")
        self.call("GET", "/admin/v1/outbox", query={"page": "2"}, expect=400, code="unknown_field")

    def watch_flow(self):
        print("== watch stream and script (public listener)", flush=True)
        r = self.call("GET", "/static/verigate-watch.js", public=True, auth=None, expect=200)
        self.check(len(r.content) > 0, "empty watch script", r)
        self.call("HEAD", "/static/verigate-watch.js", public=True, auth=None, expect=200)
        tmpl = "/v1/verifications/{id}/watch"
        sse = {"Accept": "text/event-stream"}
        v = self.create(self.email("watch"), method="link")
        if not v:
            return
        vid, wt = v["id"], v["watch_token"]
        token = self.link_token(self.mail_for(vid))
        r = self.call("GET", tmpl, {"id": vid}, public=True, auth=None, headers=sse, expect=401, code="token_missing")
        self.check(_error(r).get("close_code") == 4000, "token_missing without close_code 4000", r)
        forged = wt[:-4] + ("AAAA" if not wt.endswith("AAAA") else "BBBB")
        for bad_token, bad_id in [(forged, vid), (token, vid), (wt, "vrf_01M814RRFA1X74K4N7EWHWFFW1")]:
            r = self.call(
                "GET", tmpl, {"id": bad_id}, public=True, auth=None, query={"token": bad_token}, headers=sse,
                expect=401, code="token_invalid",
            )
            self.check(_error(r).get("close_code") == 4002, "token_invalid without close_code 4002", r)
        self.call("GET", tmpl, {"id": vid}, public=True, auth=None, query={"token": wt}, expect=426, code="upgrade_required")

        # A pending verification: the first event now, then "verified" when the link is used
        # (as on another device), then the stream ends.
        self.steps += 1
        url = f"{self.public}/v1/verifications/{vid}/watch"
        events = []
        with requests.get(url, params={"token": wt}, headers=sse, stream=True, timeout=15) as live:
            self.check(live.status_code == 200 and live.headers.get("content-type", "").startswith("text/event-stream"), "SSE watch of a pending verification", live)
            lines = live.iter_lines(decode_unicode=True)
            for line in lines:
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
                    break
            self.call("POST", "/v/{token}", {"token": token}, public=True, auth=None, expect=200)
            for line in lines:  # ends when the daemon closes the stream after the final event
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
        for e in events:
            self._check_event(e, "SSE")
        self.check(
            [e.get("status") for e in events] == ["pending", "verified"] and events[-1].get("final") is True,
            f"SSE events of a pending verification verified meanwhile: {events!r}",
        )
        # Watching a verified one answers one final event (validated as documented) and ends.
        r = self.call("GET", tmpl, {"id": vid}, public=True, auth=None, query={"token": wt}, headers=sse, expect=200)
        events = [json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data:")]
        self.check(len(events) == 1 and events[0].get("final") is True, f"SSE of a verified verification: {events!r}", r)
        # WebSocket: the handshake answers 101 and the first text frame is a WatchEvent.
        self.steps += 1
        frame = _websocket_first_frame(self.public, f"/v1/verifications/{vid}/watch?token={urllib.parse.quote(wt)}")
        if isinstance(frame, str):
            self.fail(f"WebSocket watch: {frame}")
        else:
            self._check_event(frame, "WebSocket")
            self.check(frame.get("id") == vid and frame.get("status") == "verified" and frame.get("final") is True, f"WebSocket first frame {frame!r}")
        # An expired watch token.
        v = self.create(self.email("watch-expired"), ttl_seconds=1)
        if v:
            time.sleep(1.5)
            r = self.call(
                "GET", tmpl, {"id": v["id"]}, public=True, auth=None, query={"token": v["watch_token"]}, headers=sse,
                expect=401, code="token_expired",
            )
            self.check(_error(r).get("close_code") == 4001, "token_expired without close_code 4001", r)

    def _check_event(self, event, transport):
        errors = sorted(self.watch_event.iter_errors(event), key=str)
        if errors:
            self.fail(f"{transport} watch event {event!r} is not a WatchEvent: {errors[0].message}")

    def run(self, watch):
        self.probes()
        self.request_rules()
        self.link_flow()
        self.code_flow()
        self.lock_flow()
        self.supersede_flow()
        self.expiry_flow()
        self.cancel_flow()
        self.idempotency_and_limits()
        self.validate_flow()
        self.admin_flow()
        if watch:
            self.watch_flow()
        else:
            print("== watch stream: skipped (the daemon does not serve /static/verigate-watch.js yet)", flush=True)
        print(f"flow: {self.steps} requests, {len(self.failures)} failures", flush=True)
        return not self.failures


def _error(resp):
    try:
        return resp.json().get("error") or {}
    except (ValueError, AttributeError):
        return {}


def _error_code(resp):
    return _error(resp).get("code")


def _indent(text):
    return "\n".join("      " + line for line in text.splitlines())


def _websocket_first_frame(base, target):
    """Opens a WebSocket by hand (no client library needed) and returns the first text frame as JSON."""
    u = urllib.parse.urlsplit(base)
    key = base64.b64encode(os.urandom(16)).decode()
    try:
        with socket.create_connection((u.hostname, u.port or 80), timeout=10) as s:
            s.sendall(
                (
                    f"GET {target} HTTP/1.1\r\nHost: {u.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                ).encode()
            )
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = s.recv(4096)
                if not chunk:
                    return f"connection closed during the handshake: {buf[:200]!r}"
                buf += chunk
            head, _, rest = buf.partition(b"\r\n\r\n")
            status = head.split(b"\r\n", 1)[0]
            if b" 101 " not in status + b" ":
                return f"handshake answered {status!r}"

            def need(n):
                nonlocal rest
                while len(rest) < n:
                    chunk = s.recv(4096)
                    if not chunk:
                        raise EOFError
                    rest += chunk
                out, rest = rest[:n], rest[n:]
                return out

            b0, b1 = need(2)
            n = b1 & 0x7F
            if n == 126:
                n = int.from_bytes(need(2), "big")
            elif n == 127:
                n = int.from_bytes(need(8), "big")
            payload = need(n)
            if b0 & 0x0F != 1:
                return f"first frame is not text (opcode {b0 & 0x0F}, payload {payload[:100]!r})"
            return json.loads(payload)
    except (OSError, EOFError, ValueError) as e:
        return f"{type(e).__name__}: {e}"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", required=True)
    p.add_argument("--api", required=True)
    p.add_argument("--public", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--tight-key", required=True)
    p.add_argument("--mail-dir", required=True)
    p.add_argument("--watch", action="store_true", help="also walk the watch stream and its script")
    args = p.parse_args()
    ok = Walk(args).run(args.watch)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
