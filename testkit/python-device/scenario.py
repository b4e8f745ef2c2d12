#!/usr/bin/env python3
"""End-to-end scenario against a running manager and its broker (steps 0-8).

Operator actions go to the manager's admin HTTP API (with the token in
CERTS/admin.token, or --admin-token-file); device traffic goes to
the broker's bootstrap TLS listener and its mutual-TLS service listener.
Needs the manager's certs dir (root-ca.pem, manager-sign.pub.pem, crl/).
Prints PASS or FAIL per step and exits 0 only if every step passes.

  scenario.py --admin 127.0.0.1:8080 --certs certs --bootstrap 127.0.0.1:8884 \
      --service-addr 127.0.0.1:8883 --work /tmp/scenario
"""
import argparse
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import proto
from device import Device, Conn, probe_service, log

RESULTS = {}
NOTES = []


def step(name):
    def deco(fn):
        def run(*a, **kw):
            log(f"===== {name}")
            try:
                fn(*a, **kw)
                RESULTS[name] = "PASS"
            except Exception as e:
                traceback.print_exc()
                RESULTS[name] = f"FAIL: {type(e).__name__}: {e}"
            log(f"===== {name}: {RESULTS[name]}")
        return run
    return deco


def expect(cond, what):
    if not cond:
        raise AssertionError(what)
    log("  ok:", what)


class Env:
    def __init__(self, a):
        self.a = a
        self.work = a.work
        os.makedirs(self.work, exist_ok=True)
        # Straight to the admin address, whatever *_proxy says.
        tls = ssl.create_default_context(cafile=os.path.join(a.certs, "root-ca.pem"))
        self.http = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                                urllib.request.HTTPSHandler(context=tls))

    def admin(self, method, path, body=None, timeout=30, token=True):
        """One admin API request (JSON in, JSON out), with the operator
        token unless token=False; raises unless HTTP 200."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"content-type": "application/json"}
        if token:
            headers["authorization"] = f"Bearer {self.token}"
        # `https://host:port` (admin_tls): the API's certificate checked
        # against the fleet root; a bare address is plain HTTP.
        url = self.a.admin if "://" in self.a.admin else f"http://{self.a.admin}"
        req = urllib.request.Request(f"{url}{path}", data=data, method=method,
                                     headers=headers)
        try:
            with self.http.open(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{method} {path}: HTTP {e.code}: {e.read().decode(errors='replace')}")

    @property
    def token(self):
        with open(self.a.admin_token_file) as f:
            return f.read().strip()

    def wait_ready(self, timeout=30):
        """Waits until GET /v1/health answers with the manager subscribed at the broker."""
        deadline = time.time() + timeout
        last = None
        while True:
            try:
                last = self.admin("GET", "/v1/health", timeout=5, token=False)
                if last.get("ok") and last.get("subscribed"):
                    return last
            except (OSError, RuntimeError, ValueError) as e:
                last = e
            if time.time() >= deadline:
                raise TimeoutError(f"manager not ready after {timeout} s: {last}")
            time.sleep(0.1)

    def device(self, did):
        d = Device(os.path.join(self.work, "devices", did), self.a.certs, self.a.bootstrap,
                   self.a.service_addr, device_id=did)
        return d


def hp(s):
    h, p = s.rsplit(":", 1)
    return h.strip("[]"), int(p)


def wait_until(check, timeout, pause=0.2):
    """Calls check() until it returns something true or timeout seconds pass; returns the last value."""
    deadline = time.time() + timeout
    while True:
        v = check()
        if v or time.time() >= deadline:
            return v
        time.sleep(pause)


def raw(d, kind, fields, tenant="auto", crc=None, v=1, env_kind=None, signer=None, topic_device=None):
    """Send a crafted request; the reply is checked per §4.3 by Device.send."""
    body = proto.encode_body(kind, fields)
    ek = env_kind or kind
    auth = (signer or d.hmac())(proto.tbs(ek, body))
    payload = proto.encode_envelope(ek, body, auth, v=v, crc=crc)
    return d.send(kind, fields, tenant=tenant, payload=payload, tries=1, topic_device=topic_device,
                  accept_empty_nonce=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--admin", required=True, help="HOST:PORT of the manager's admin HTTP API, or https://HOST:PORT (admin_tls; checked against CERTS/root-ca.pem)")
    ap.add_argument("--certs", required=True, help="the manager's certs dir")
    ap.add_argument("--admin-token-file", help="the admin API's token (default CERTS/admin.token)")
    ap.add_argument("--bootstrap", type=hp, required=True, help="HOST:PORT of the bootstrap TLS listener")
    ap.add_argument("--service-addr", type=hp, required=True, help="HOST:PORT of the mutual-TLS service listener")
    ap.add_argument("--endpoint", help="endpoint named in the service change (default mqtts://SERVICE-ADDR)")
    ap.add_argument("--work", required=True, help="scratch dir for device state")
    a = ap.parse_args()
    if a.admin_token_file is None:
        a.admin_token_file = os.path.join(a.certs, "admin.token")
    if a.endpoint is None:
        h, p = a.service_addr
        a.endpoint = f"mqtts://[{h}]:{p}" if ":" in h else f"mqtts://{h}:{p}"
    E = Env(a)
    if os.path.exists(os.path.join(a.work, "devices")):
        shutil.rmtree(os.path.join(a.work, "devices"))

    A, B, C = E.device("dev-a"), E.device("dev-b"), E.device("dev-c")
    ctx = {}

    # ------------------------------------------------------------ step 0
    @step("0 manager ready (admin API health)")
    def s0():
        h = E.wait_ready()
        expect(h.get("subscribed") is True, f"GET /v1/health: {h}")
        try:
            E.admin("GET", "/v1/devices", token=False)
            refused = None
        except RuntimeError as e:
            refused = str(e)
        expect(refused is not None and "HTTP 401" in refused, f"GET /v1/devices without the token: {refused}")

    # ------------------------------------------------------------ step 1
    @step("1 activate (bootstrap TLS, factory key, register)")
    def s1():
        regs = [dict(d.keygen(), service_id="weather") for d in (A, B, C)]
        out = E.admin("POST", "/v1/registrations", regs)
        expect(out.get("registered") == 3, f"registered 3: {out}")
        A.connect_bootstrap()
        eph = proto.new_key()
        fields = A.base(eph=proto.point(eph))
        payload, _ = proto.build("activate", fields, proto.ecdsa_signer(A.factory_key()))
        # §5.2: an unreadable request under A's id just before its own. Its
        # reply (empty nonce) comes first and is not taken as the answer.
        A.conn.publish(proto.request_topic("activate", A.id), b"\xff not cbor")
        r = A.send("activate", fields, payload=payload, tenant=None)
        expect(r and r.status == 0, "activate ok, past an empty-nonce reply")
        expect(r.body["service_id"] == "weather", "assigned service = registered weather")
        uuid = proto.unseal(eph, A.id, r.body["uuid"])
        expect(len(uuid) == 16, "uuid unseals to 16 bytes")
        A.st.update(uuid=uuid.hex(), service_id="weather")
        A.save()
        # §6.1: identical retry -> the cached reply byte for byte
        r2 = A.send("activate", fields, payload=payload, tenant=None, tries=1)
        expect(r2 and r2.payload == r.payload, "identical retry of activate -> cached reply, byte for byte")
        # a fresh activate now -> already_active
        r3 = A.activate()
        expect(r3 and r3.status == proto.CODE["already_active"], "second activate -> already_active (12)")
        A.disconnect()

    # ------------------------------------------------------------ step 2
    @step("2 update CSR mode, openssl verify, mutual TLS, telemetry")
    def s2():
        A.connect_bootstrap()
        r = A.update("weather", mode="csr", tenant=None)  # checks chain, CN/O, key, openssl verify
        expect(r and r.status == 0, "update (CSR) on bootstrap ok")
        A.disconnect()
        # independent openssl check of the stored chain
        chain = open(A.p("chain.pem"), "rb").read()
        pems = re.findall(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n", chain, re.S)
        open(A.p("leaf.pem"), "wb").write(pems[0])
        open(A.p("ca.pem"), "wb").write(pems[1])
        p = subprocess.run(["openssl", "verify", "-CAfile", os.path.join(a.certs, "root-ca.pem"),
                            "-untrusted", A.p("ca.pem"), A.p("leaf.pem")], capture_output=True, text=True)
        expect(p.returncode == 0, f"openssl verify: {p.stdout.strip()}")
        # a provider to see the telemetry arrive
        pdir = os.path.join(a.work, "providers")
        os.makedirs(pdir, exist_ok=True)
        got = E.admin("POST", "/v1/providers", {"name": "meterco", "service_id": "weather"})
        expect(got.get("client_id") == "provider.meterco" and got.get("service_id") == "weather",
               f"provider certificate issued for {got.get('client_id')} in {got.get('service_id')}")
        with open(os.path.join(pdir, "provider.meterco.pem"), "w") as f:
            f.write(got["chain_pem"])
        kf = os.path.join(pdir, "provider.meterco.key")
        with open(os.open(kf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(got["key_pem"])
        prov = Conn("provider.meterco", a.service_addr, os.path.join(a.certs, "root-ca.pem"),
                    os.path.join(pdir, "provider.meterco.pem"), os.path.join(pdir, "provider.meterco.key"))
        expect(prov.subscribe(["/tenants/weather/telemetry/+"]) == [1], "provider subscribed to weather telemetry")
        ctx["prov"] = prov
        A.connect_service()
        expect(A.tenant == "weather", "tenant from certificate O = weather")
        r = A.on_connect_service()
        expect(r and r.status == 0 and r.body.get("service_id") == "weather", "online + poll in tenant ok")
        expect(A.telemetry(1), "telemetry PUBACK")
        t, pl = prov.msgs.get(timeout=15)
        expect(t == "/tenants/weather/telemetry/dev-a" and cbor2.loads(pl)["seq"] == 1,
               "provider received the telemetry")
        # grants: another device's reply topic is refused
        rc = A.conn.subscribe(["/tenants/weather/fleet/v1/poll/dev-b/reply", "/tenants/weather/telemetry/+"])
        expect(rc == [0x80, 0x80], f"SUBSCRIBE outside grants -> 0x80 each ({rc})")

    # ------------------------------------------------------------ step 3
    @step("3 second device, manager-generated key")
    def s3():
        B.connect_bootstrap()
        r = B.activate()
        expect(r and r.status == 0, "dev-b activate ok")
        r = B.update("weather", mode="manager", tenant=None)
        expect(r and r.status == 0 and "key" in r.body, "update (manager key) ok, sealed key present")
        B.disconnect()
        B.connect_service()
        r = B.on_connect_service()
        expect(r and r.status == 0, "dev-b online + poll ok")
        expect(B.telemetry(1), "dev-b telemetry PUBACK")
        t, pl = ctx["prov"].msgs.get(timeout=15)
        expect(t == "/tenants/weather/telemetry/dev-b", "provider received dev-b telemetry")
        # renewal in the current service (§7.3), tenant form, manager mode again
        old = open(B.p("chain.pem"), "rb").read()
        r = B.update("weather", mode="manager")
        expect(r and r.status == 0, "renewal in current service (tenant form) ok")
        B.disconnect()
        B.connect_service()
        r = B.on_connect_service()
        expect(r and r.status == 0, "dev-b reconnected with renewed certificate")

    # ------------------------------------------------------------ step 5
    @step("5 poll and status")
    def s5():
        r = A.poll()
        expect(r.status == 0 and r.body["service_id"] == "weather" and "change" not in r.body,
               "poll: ok, service_id weather, no change")
        for ev, extra in (("online", {}), ("notice_rejected", {"detail": "test: a rejected notice"}),
                          ("hello-world", {})):
            r = A.status(ev, **extra)
            expect(r.status == 0 and set(r.body) == {"device_id", "nonce", "seq", "status"},
                   f"status {ev} -> ok with nothing more")
        # poll in bootstrap form over the service listener is not granted; bootstrap poll on bootstrap:
        A2 = Device(A.dir, a.certs, a.bootstrap, a.service_addr)
        A2.connect_bootstrap()
        r = A2.poll(tenant=None)
        expect(r.status == 0 and r.body["service_id"] == "weather", "poll in bootstrap form ok")
        A2.disconnect()

    # ------------------------------------------------------------ step 4
    @step("4 service change: notice, update, reconnect, old cert refused")
    def s4():
        # an observer on the bootstrap listener (never displaces the service connection, §2.3)
        obs = Conn(A.id, a.bootstrap, os.path.join(a.certs, "root-ca.pem"))
        expect(obs.subscribe([proto.notice_topic(A.id)]) == [1], "bootstrap observer subscribed to the bootstrap notice topic")
        out = E.admin("POST", "/v1/service-change",
                      {"devices": ["dev-a"], "service_id": "traffic", "provider": "acme",
                       "application": "traffic-v2", "endpoint": a.endpoint})
        log("change:", json.dumps(out))
        res = out.get("results") or []
        expect(len(res) == 1 and res[0].get("ok") is True and res[0].get("device_id") == "dev-a",
               f"service change recorded for dev-a: {res}")
        ch = A.wait_notice(15)
        expect(isinstance(ch, dict), "notice received and accepted (§4.3 + §6.3)")
        expect(ch["service_id"] == "traffic" and ch.get("provider") == "acme"
               and ch.get("application") == "traffic-v2", "notice names traffic/acme/traffic-v2")
        expect(re.match(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$", ch["change_id"]),
               "change_id is UUID v4 text")
        expect(ch["change_id"] == res[0].get("change_id"), "notice change_id = the admin API's change_id")
        expect(ch.get("endpoint") == a.endpoint, f"notice endpoint = the requested {a.endpoint}")
        log("  endpoint in notice:", ch.get("endpoint"))
        t, bp = obs.msgs.get(timeout=15)
        env, bch = proto.open_manager_message(bp, "service_change", A.mpub, A.id)
        expect(bch == ch, "the bootstrap-form copy of the notice carries the same body (§2.2)")
        obs.close()
        # poll while pending: same change, same seq -> quietly ignored
        r = A.poll()
        expect(r.status == 0 and r.body.get("change") == ch, "poll_reply carries the pending change = notice body")
        expect(A.notices.get(timeout=1) == ("resend", ch), "poll's change (same seq) ignored quietly")
        # online while pending -> notice re-sent, same seq and body (§6.2)
        r = A.status("online")
        expect(r.status == 0, "online while pending ok")
        rs = A.wait_notice(15)
        expect(rs == ("resend", ch), "notice re-sent after online, same seq, ignored quietly")
        # update in the old tenant for the new service
        old_chain, old_key = "chain.pem.prev", "service.key.prev"
        r = A.update("traffic", mode="csr")
        expect(r and r.status == 0, "update for traffic in weather tenant ok")
        # §7.4 "After the update commits, the manager answers requests in the old tenant with wrong_service"
        r = A.poll(service_id="weather")
        expect(r.status == proto.CODE["wrong_service"], "poll in old tenant for old service -> wrong_service")
        r = A.poll(service_id="traffic")
        ctx["old_tenant_poll_new_service"] = r.status_name
        log(f"  observation: poll in OLD tenant with service_id=traffic after update -> {r.status_name}")
        A.follow_reconnect = None
        addr = a.service_addr
        if ch.get("endpoint"):
            addr = hp(ch["endpoint"][len("mqtts://"):])
        A.disconnect()
        A.connect_service(addr=addr)
        expect(A.tenant == "traffic", "reconnected in tenant traffic")
        r = A.on_connect_service()
        expect(r.status == 0 and r.body["service_id"] == "traffic" and "change" not in r.body,
               "change_applied + online + poll in traffic ok")
        expect(A.telemetry(2), "telemetry in traffic PUBACK")
        # old certificate refused at the service listener
        probes = []

        def old_refused():
            probes.append(probe_service(a.service_addr, os.path.join(a.certs, "root-ca.pem"),
                                        A.p(old_chain), A.p(old_key), A.id))
            return probes[-1][0] == "refused"

        wait_until(old_refused, 15, pause=0.25)
        expect(probes[-1][0] == "refused",
               f"old (weather) certificate refused: {probes[-1]} (after {len(probes)} probes)")
        # the CRL says so too
        crls = os.path.join(a.work, "crls.pem")
        with open(crls, "wb") as f:
            for n in sorted(os.listdir(os.path.join(a.certs, "crl"))):
                if n.endswith(".pem"):
                    f.write(open(os.path.join(a.certs, "crl", n), "rb").read())
        pems = re.findall(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n",
                          open(A.p(old_chain), "rb").read(), re.S)
        open(A.p("old-leaf.pem"), "wb").write(pems[0])
        open(A.p("old-ca.pem"), "wb").write(pems[1])
        p = subprocess.run(["openssl", "verify", "-crl_check", "-CRLfile", crls, "-CAfile",
                            os.path.join(a.certs, "root-ca.pem"), "-untrusted", A.p("old-ca.pem"),
                            A.p("old-leaf.pem")], capture_output=True, text=True)
        expect(p.returncode != 0 and "revoked" in (p.stdout + p.stderr), "openssl -crl_check: old cert revoked")
        # the new one is accepted
        res = probe_service(a.service_addr, os.path.join(a.certs, "root-ca.pem"), A.p("chain.pem"),
                            A.p("service.key"), A.id)
        expect(res == ("connack", 0), f"new certificate accepted ({res}) (this probe displaced the live session)")
        A.disconnect()
        A.connect_service(addr=addr)
        show = E.admin("GET", "/v1/devices/dev-a")
        h = show["history"]
        expect(len(h) == 2 and h[0]["service_id"] == "weather" and h[0]["end_reason"] == "service_change"
               and h[1]["service_id"] == "traffic" and h[1]["change_id"] == ch["change_id"]
               and h[1]["confirmed_ms"], "manager history: weather closed, traffic opened+confirmed")

    # ------------------------------------------------------------ step 7
    @step("7 error paths")
    def s7():
        d = B  # on the service listener, tenant weather
        f = d.base("weather")
        body = proto.encode_body("poll", f)
        r = raw(d, "poll", f, crc=(proto.crc32(body) + 1) & 0xFFFFFFFF)
        expect(r and r.status == proto.CODE["bad_crc"] and r.body["nonce"] == b"" and r.env["kind"] == "poll_reply",
               "bad CRC -> bad_crc (1), empty nonce")
        f = d.base("sun", eph=proto.point(proto.new_key()))
        r = d.send("update", f)
        expect(r and r.status == proto.CODE["wrong_service"] and r.body["nonce"] == f["nonce"],
               f"update for 'sun' -> wrong_service (7), nonce echoed ({r.body.get('detail')!r})")
        r = d.poll(service_id="traffic")
        expect(r.status == proto.CODE["wrong_service"], "poll with another device's service -> wrong_service")
        # unknown device on the bootstrap listener
        G = Device(os.path.join(a.work, "devices", "ghost-1"), a.certs, a.bootstrap, a.service_addr,
                   device_id="ghost-1")
        G.keygen()
        G.connect_bootstrap()
        r = G.activate()
        expect(r and r.status == proto.CODE["unknown_device"] and r.body["nonce"] != b"",
               "activate of unknown device -> unknown_device (3)")
        G.st["uuid"] = os.urandom(16).hex()
        r = G.poll(service_id="weather", tenant=None)
        expect(r and r.status == proto.CODE["unknown_device"], "poll of unknown device -> unknown_device (3)")
        G.disconnect()
        # registered, not activated
        C.connect_bootstrap()
        C.st["uuid"] = os.urandom(16).hex()
        r = C.poll(service_id="weather", tenant=None)
        expect(r.status == proto.CODE["not_registered"], "poll before activate -> not_registered (4)")
        C.disconnect()
        # more of §5.3, on dev-b
        f = d.base("weather")
        r = raw(d, "poll", f, signer=proto.hmac_signer(os.urandom(16)))
        expect(r.status == proto.CODE["auth_failed"], "wrong HMAC key -> auth_failed (5)")
        f = d.base("weather")
        r1 = d.send("poll", f)
        r2 = d.send("poll", f, tries=1)
        expect(r2.payload == r1.payload, "identical poll retry -> cached reply byte for byte")
        f2 = dict(f, ts=f["ts"] + 1)
        r3 = d.send("poll", f2, tries=1)
        expect(r3.status == proto.CODE["replayed"], "same nonce, other payload -> replayed (6)")
        f = d.base("weather")
        f["ts"] -= 400_000
        r = d.send("poll", f)
        expect(r.status == proto.CODE["stale"], "ts 400 s old -> stale (10)")
        f = d.base("weather")
        r = raw(d, "poll", f, v=2)
        expect(r.status == proto.CODE["unsupported_version"] and r.body["nonce"] == b"", "v=2 -> unsupported_version (13)")
        f = d.base("weather", event="online")
        body = proto.encode_body("status", f)
        payload = proto.encode_envelope("status", body, d.hmac()(proto.tbs("status", body)))
        r = d.send("poll", f, payload=payload, tries=1, accept_empty_nonce=True)
        expect(r.status == proto.CODE["malformed"] and r.body["nonce"] == b"" and r.env["kind"] == "poll_reply",
               "status envelope on poll topic -> malformed (2), poll_reply, empty nonce")
        f = d.base("weather")
        f["nonce"] = os.urandom(4)
        r = d.send("poll", f)
        expect(r.status == proto.CODE["malformed"] and r.body["nonce"] == f["nonce"], "4-byte nonce -> malformed, echoed")
        f = d.base("weather")
        f["device_id"] = "dev-a"
        r = raw(d, "poll", f, topic_device=None)
        # body device_id differs from topic's: Device.send expects reply.device_id = topic device (dev-b)
        expect(r is not None and r.status == proto.CODE["malformed"] and r.body["nonce"] == f["nonce"],
               "body device_id != topic -> malformed, nonce echoed")
        f = d.base(None, eph=proto.point(proto.new_key()))
        r = d.send("activate", f, signer=d.factory_key and proto.ecdsa_signer(d.factory_key()))
        expect(r.status == proto.CODE["malformed"], "activate on a tenant topic -> malformed (2)")
        r = d.send("poll", None, payload=b"\xa1" + os.urandom(17000), tries=1, accept_empty_nonce=True)
        expect(r.status == proto.CODE["too_large"] and r.body["nonce"] == b"", "17 kB payload -> too_large (11), empty nonce")
        r = d.send("poll", None, payload=b"\xffnot cbor", tries=1, accept_empty_nonce=True)
        expect(r.status == proto.CODE["malformed"] and r.body["nonce"] == b"", "garbage -> malformed, empty nonce")

    # ------------------------------------------------------------ step 8
    @step("8 root roll-over: roots pinned from a reply, either root verifies the broker")
    def s8():
        d = B  # on the service listener, tenant weather
        root1 = os.path.join(a.certs, "root-ca.pem")
        root2 = os.path.join(a.certs, "root-ca.2.pem")
        out = E.admin("POST", "/v1/root-ca/roll")
        expect(out.get("generation") == 2 and out.get("issuing") is True, f"root rolled over: {out}")
        r = d.poll()
        roots = r.body.get("roots") if r else None
        der2 = x509.load_pem_x509_certificate(open(root2, "rb").read()).public_bytes(serialization.Encoding.DER)
        der1 = x509.load_pem_x509_certificate(open(root1, "rb").read()).public_bytes(serialization.Encoding.DER)
        expect(r and r.status == 0 and roots == [der2, der1], "poll_reply carries roots: the new root, then the first")
        links = [x509.load_pem_x509_certificate(open(os.path.join(a.certs, f"root-ca.2.{n}.pem"), "rb").read())
                 .public_bytes(serialization.Encoding.DER) for n in ("cross", "back")]
        expect(r.body.get("crosses") == links,
               "and the cross-certificates that link the new root and the first both ways")
        pem = b"".join(x509.load_der_x509_certificate(c).public_bytes(serialization.Encoding.PEM) for c in (der2, der1))
        expect(d.root_ca == d.p("roots.pem") and open(d.p("roots.pem"), "rb").read() == pem,
               "the device pins both (roots.pem)")
        # It said so at once (roots_pinned, §3.5.4): the operator sees it among those
        # pinning the new root.
        listed = E.admin("GET", "/v1/root-ca")
        gens = {g["generation"]: g["devices_pinning"] for g in listed.get("generations", [])}
        expect(d.id not in listed.get("not_pinning_newest", [d.id]) and gens.get(2, 0) >= 1,
               f"root-ca counts it as pinning the new root: {listed.get('not_pinning_newest')}, {gens}")
        dev = (E.admin("GET", f"/v1/devices/{d.id}").get("device") or {})
        expect(dev.get("pinned_roots") == [1, 2], f"its record: pinned_roots {dev.get('pinned_roots')}")
        d.disconnect()
        # The broker's certificate from the new root, with its cross-certificate:
        # a client that pins either root alone verifies it (§1, §8).
        probes = []

        def new_chain_served():
            probes.append(probe_service(a.service_addr, root2, d.p("chain.pem"), d.p("service.key"), d.id))
            return probes[-1] == ("connack", 0)

        wait_until(new_chain_served, 15, pause=0.25)
        expect(probes[-1] == ("connack", 0), f"pinning only the new root: {probes[-1]}")
        res = probe_service(a.service_addr, root1, d.p("chain.pem"), d.p("service.key"), d.id)
        expect(res == ("connack", 0), f"pinning only the first root, through the cross-certificate: {res}")
        # A service made after the roll has its CA from the new root: the
        # device checks that chain with the roots it pinned.
        d.connect_service()
        d.on_connect_service()
        out = E.admin("POST", "/v1/service-change", {"devices": [d.id], "service_id": "rain"})
        res = out.get("results") or []
        expect(len(res) == 1 and res[0].get("ok") is True, f"service change to rain recorded: {res}")
        ch = d.wait_notice(15)
        expect(isinstance(ch, dict) and ch["service_id"] == "rain", "notice for rain accepted")
        d.follow_change(ch)
        expect(d.tenant == "rain", "reconnected in tenant rain")
        pems = re.findall(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n",
                          open(d.p("chain.pem"), "rb").read(), re.S)
        open(d.p("rain-leaf.pem"), "wb").write(pems[0])
        open(d.p("rain-ca.pem"), "wb").write(pems[1])

        def verifies(root):
            p = subprocess.run(["openssl", "verify", "-CAfile", root, "-untrusted", d.p("rain-ca.pem"),
                                d.p("rain-leaf.pem")], capture_output=True, text=True)
            return p.returncode == 0

        expect(verifies(root2) and not verifies(root1), "rain's chain verifies to the new root only")
        expect(d.telemetry(3), "telemetry in rain PUBACK")

    # ------------------------------------------------------------ step 9
    @step("9 signing key roll-over: the new key taken from a message's signer, the old one refused")
    def s9():
        d = B  # in tenant rain, pinning both roots since step 8
        before = d.poll()
        expect(before and before.status == 0, "poll answered before the roll")
        out = E.admin("POST", "/v1/signing-key/roll")
        expect(out.get("generation") == 2 and out.get("signing") is True, f"signing key rolled over: {out}")
        r = d.poll()
        expect(r and r.status == 0 and "signer" in r.env, "poll_reply signed by the new key, with its signer")
        stored = open(d.p("manager-sign.pem"), "rb").read() if os.path.exists(d.p("manager-sign.pem")) else b""
        want = open(os.path.join(a.certs, "manager-sign.2.pem"), "rb").read()
        expect(stored == want, "the device pins the new key's certificate (manager-sign.pem)")
        expect(len(r.env["signer"]) == 2, "the signer: the key's certificate and the cross-certificate to the first root")
        again = d.poll()
        expect(again and again.status == 0, "the next reply is taken by the key pinned")
        r = d.status("online")
        expect(r and r.status == 0, "online reported, naming the key it takes messages by")
        dev = (E.admin("GET", f"/v1/devices/{d.id}").get("device") or {})
        expect(dev.get("signing_key") == 2, f"its record: signing_key {dev.get('signing_key')}")
        keys = E.admin("GET", "/v1/signing-key")
        expect(d.id not in keys.get("not_on_newest", [d.id]), f"signing-key counts it on the newest: {keys}")
        try:
            proto.open_manager_message(before.payload, "poll_reply", d.mpub, d.id, d.take_signer)
            expect(False, "a reply signed by the key before is refused")
        except proto.ProtocolError as e:
            expect(True, f"a reply signed by the key before is refused ({e})")

    s0()
    s1()
    s2()
    s3()
    s5()
    s4()
    s7()
    s8()
    s9()
    for d in (A, B, C):
        d.disconnect()
    if "prov" in ctx:
        ctx["prov"].close()
    rej = [r for d in (A, B, C) for r in d.rejections]
    RESULTS["6 every manager message passed §4.3 (live)"] = "PASS" if not rej else f"FAIL: {rej}"
    print("\n==== RESULTS")
    for k, v in RESULTS.items():
        print(f"{'PASS' if v == 'PASS' else 'FAIL'}  {k}" + ("" if v == "PASS" else f"  ({v[len('FAIL: '):]})"))
    for k, v in ctx.items():
        if k != "prov":
            print(f"observation {k}: {v}")
    ok = all(v == "PASS" for v in RESULTS.values())
    print(f"scenario: {'PASS' if ok else 'FAIL'} ({sum(v == 'PASS' for v in RESULTS.values())} of {len(RESULTS)} steps passed)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
