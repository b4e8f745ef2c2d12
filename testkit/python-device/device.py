#!/usr/bin/env python3
"""A fleetshift device written from topics.md alone.

State lives in a directory (--state): factory.key, state.json (uuid, service,
last accepted notice seq), service.key + chain.pem (leaf, service CA), and the
previous ones as *.prev after a re-key.

Examples (8884 and 8883 are the broker's default listeners):
  device.py keygen   --state st/dev-a --id dev-a          # prints the register JSON line
  device.py activate --state st/dev-a --certs certs --bootstrap 127.0.0.1:8884
  device.py update   --state st/dev-a --certs certs --bootstrap 127.0.0.1:8884 [--mode manager]
  device.py run      --state st/dev-a --certs certs --service-addr 127.0.0.1:8883 --seconds 30
"""
import argparse
import hashlib
import json
import os
import queue
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

import cbor2
import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

import proto

LOG = True


def log(*a):
    if LOG:
        print(time.strftime("%H:%M:%S"), *a, flush=True)


def hostport(s):
    h, p = s.rsplit(":", 1)
    return h.strip("[]"), int(p)


class Conn:
    """One MQTT 3.1.1 connection (paho), QoS 1, clean session."""

    def __init__(self, client_id, addr, ca, certfile=None, keyfile=None, timeout=10):
        self.msgs = queue.Queue()
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.connack = None
        self.subacks = {}
        self.sub_ev = threading.Condition()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                        protocol=mqtt.MQTTv311, clean_session=True)
        c.tls_set(ca_certs=ca, certfile=certfile, keyfile=keyfile,
                  cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = lambda cl, ud, m: self.msgs.put((m.topic, bytes(m.payload)))
        c.on_subscribe = self._on_subscribe
        self.c = c
        c.connect(addr[0], addr[1], keepalive=60)
        c.loop_start()
        if not self.connected.wait(timeout) or self.connack != 0:
            c.loop_stop()
            raise ConnectionError(f"no successful CONNACK (rc={self.connack})")

    def _on_connect(self, c, ud, flags, rc, props):
        self.connack = rc.value if hasattr(rc, "value") else rc
        self.connected.set()

    def _on_disconnect(self, c, ud, flags, rc, props):
        self.disconnected.set()

    def _on_subscribe(self, c, ud, mid, rcs, props):
        with self.sub_ev:
            self.subacks[mid] = [r.value if hasattr(r, "value") else r for r in rcs]
            self.sub_ev.notify_all()

    def subscribe(self, topics, timeout=10):
        rc, mid = self.c.subscribe([(t, 1) for t in topics])
        with self.sub_ev:
            self.sub_ev.wait_for(lambda: mid in self.subacks, timeout)
        return self.subacks.get(mid)

    def publish(self, topic, payload, timeout=10):
        info = self.c.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout)
        return info.is_published()

    def close(self):
        try:
            self.c.disconnect()
        finally:
            self.c.loop_stop()


def probe_service(addr, ca, certfile, keyfile, client_id, timeout=5):
    """Raw TLS + MQTT 3.1.1 CONNECT; returns ('connack', rc) or ('refused', reason)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca)
    ctx.load_cert_chain(certfile, keyfile)
    cid = client_id.encode()
    var = b"\x00\x04MQTT\x04\x02\x00\x3c"
    pl = len(cid).to_bytes(2, "big") + cid
    rem = len(var) + len(pl)
    pkt = b"\x10" + bytes([rem]) + var + pl
    try:
        with socket.create_connection(addr, timeout=timeout) as s:
            with ctx.wrap_socket(s, server_hostname=addr[0]) as t:
                t.sendall(pkt)
                data = b""
                while len(data) < 4:
                    chunk = t.recv(4 - len(data))
                    if not chunk:
                        return ("refused", "connection closed before CONNACK")
                    data += chunk
                if data[0] == 0x20:
                    return ("connack", data[3])
                return ("refused", f"unexpected bytes {data.hex()}")
    except ssl.SSLError as e:
        return ("refused", f"TLS: {e.reason or e}")
    except (ConnectionError, socket.timeout, OSError) as e:
        return ("refused", f"{type(e).__name__}: {e}")


class Reply:
    def __init__(self, env, body, payload, topic):
        self.env, self.body, self.payload, self.topic = env, body, payload, topic

    @property
    def status(self):
        return self.body["status"]

    @property
    def status_name(self):
        return proto.STATUS.get(self.body["status"], "unknown")

    def __repr__(self):
        b = {k: (v if not isinstance(v, (bytes, list, dict)) else "...") for k, v in self.body.items()}
        return f"{self.env['kind']}({b})"


class Device:
    def __init__(self, state_dir, certs_dir, bootstrap=None, service_addr=None, device_id=None):
        self.dir = state_dir
        os.makedirs(state_dir, exist_ok=True)
        self.certs = certs_dir
        self.root_ca = os.path.join(certs_dir, "root-ca.pem")
        if os.path.exists(self.p("roots.pem")):  # roots the manager gave (§3.5.5, §10.1 step 1)
            self.root_ca = self.p("roots.pem")
        mp = os.path.join(certs_dir, "manager-sign.pub.pem")
        self.mpub = proto.load_pem_public(open(mp, "rb").read()) if os.path.exists(mp) else None
        self.signer_since = None  # notBefore of the pinned signing key's certificate (§4.3)
        if os.path.exists(self.p("manager-sign.pem")):  # a successor key taken from a signer
            cert = x509.load_pem_x509_certificate(open(self.p("manager-sign.pem"), "rb").read())
            self.mpub, self.signer_since = cert.public_key(), cert.not_valid_before_utc.timestamp()
        self.bootstrap = bootstrap
        self.service_addr = service_addr
        self.st = {"device_id": device_id, "uuid": None, "service_id": None, "last_notice_seq": 0,
                   "pending_change": None, "applied_change": None}
        self._load()
        self.conn = None
        self.tenant = None  # service id of the live service connection, None on bootstrap
        self.roots_changed = False  # pinned roots changed since the last status named them
        self.notices = queue.Queue()
        self.last_seq = 0
        self.rejections = []  # manager messages that failed §4.3 / §6.3

    # ---------- state
    def p(self, name):
        return os.path.join(self.dir, name)

    def _load(self):
        if os.path.exists(self.p("state.json")):
            with open(self.p("state.json")) as f:
                self.st.update(json.load(f))

    def save(self):
        with open(self.p("state.json"), "w") as f:
            json.dump(self.st, f, indent=1)

    @property
    def id(self):
        return self.st["device_id"]

    def keygen(self):
        k = proto.new_key()
        with open(self.p("factory.key"), "wb") as f:
            f.write(proto.private_pem(k))
        os.chmod(self.p("factory.key"), 0o600)
        self.save()
        return {"device_id": self.id, "factory_key_hex": proto.point(k).hex()}

    def factory_key(self):
        with open(self.p("factory.key"), "rb") as f:
            return proto.load_pem_private(f.read())

    def hmac(self):
        return proto.hmac_signer(bytes.fromhex(self.st["uuid"]))

    # ---------- connections
    def connect_bootstrap(self, client_id=None):
        self.disconnect()
        cid = client_id or self.id
        if not self.bootstrap:
            raise ValueError("no bootstrap listener address (--bootstrap HOST:PORT)")
        self.conn = Conn(cid, self.bootstrap, self.root_ca)
        self.tenant = None
        subs = [f"fleet/v1/{k}/{cid}/reply" for k in proto.REQUEST_KINDS] + [proto.notice_topic(cid)]
        rcs = self.conn.subscribe(subs)
        assert rcs and all(r in (0, 1) for r in rcs), f"bootstrap SUBACK {rcs}"
        log(f"[{cid}] connected to bootstrap {self.bootstrap}")

    def connect_service(self, chain="chain.pem", key="service.key", addr=None):
        self.disconnect()
        addr = addr or self.service_addr
        if not addr:
            raise ValueError("no service listener address (--service-addr HOST:PORT)")
        self.conn = Conn(self.id, addr, self.root_ca, self.p(chain), self.p(key))
        self.tenant = self.cert_service(chain)
        subs = [f"/tenants/{self.tenant}/fleet/v1/{k}/{self.id}/reply" for k in proto.REQUEST_KINDS]
        subs.append(proto.notice_topic(self.id, self.tenant))
        rcs = self.conn.subscribe(subs)
        assert rcs and all(r in (0, 1) for r in rcs), f"service SUBACK {rcs}"
        log(f"[{self.id}] connected to service listener {addr}, tenant {self.tenant}")

    def disconnect(self):
        if self.conn:
            self.conn.close()
            self.conn = None

    def cert_service(self, chain="chain.pem"):
        with open(self.p(chain), "rb") as f:
            leaf = x509.load_pem_x509_certificates(f.read())[0]
        return leaf.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value

    # ---------- incoming
    def _drain(self, deadline):
        """Next message as (topic, payload), or None at deadline; notices go to self.notices."""
        while True:
            left = deadline - time.time()
            if left <= 0:
                return None
            try:
                topic, payload = self.conn.msgs.get(timeout=left)
            except queue.Empty:
                return None
            pt = proto.parse_topic(topic)
            if pt and pt["role"] == "notice":
                self._handle_notice(topic, payload)
                continue
            return topic, payload

    def _handle_notice(self, topic, payload):
        try:
            # a notice's signer is checked each time; the key is pinned from a reply (§4.3)
            env, change = proto.open_manager_message(payload, "service_change", self.mpub, self.id,
                                                     self.take_signer)
        except proto.ProtocolError as e:
            self.rejections.append(("notice", topic, str(e)))
            log(f"[{self.id}] notice on {topic} rejected: {e}")
            return
        self.consider_change(change, f"notice on {topic}")

    def consider_change(self, change, source):
        why = proto.check_notice(change, self.id, self.st["last_notice_seq"])
        if why is None:
            self.st["last_notice_seq"] = change["seq"]
            self.st["pending_change"] = change
            self.save()
            log(f"[{self.id}] accepted {source}: seq {change['seq']} -> {change['service_id']}")
            self.notices.put(change)
            return True
        if change.get("seq") == self.st["last_notice_seq"]:
            log(f"[{self.id}] {source}: re-send of the change we hold (seq {change['seq']}), ignored")
            self.notices.put(("resend", change))
        else:
            log(f"[{self.id}] {source} rejected: {why}")
            self.rejections.append(("notice", source, why))
        return False

    def wait_notice(self, timeout=15):
        """Next accepted notice (dict), or ('resend', change) for a quiet re-send; None on timeout."""
        deadline = time.time() + timeout
        while True:
            try:
                return self.notices.get_nowait()
            except queue.Empty:
                pass
            m = self._drain(min(deadline, time.time() + 0.2))
            if m:
                log(f"[{self.id}] unexpected message on {m[0]} (no request outstanding), ignored")
            if time.time() >= deadline:
                try:
                    return self.notices.get_nowait()
                except queue.Empty:
                    return None

    # ---------- requests
    def send(self, kind, fields=None, tenant="auto", signer=None, payload=None, timeout=6, tries=3,
             accept_empty_nonce=False, topic_device=None):
        """Publish a request; return the verified Reply (or None). Republishes the same bytes.

        An error reply with an empty nonce is not taken as the answer
        (§5.2: anyone may have sent the request it answers) unless
        accept_empty_nonce is set, for a request sent broken on purpose."""
        if tenant == "auto":
            tenant = self.tenant
        dev = topic_device or self.id
        topic = proto.request_topic(kind, dev, tenant)
        reply_topic = topic + "/reply"
        if payload is None:
            payload, _ = proto.build(kind, fields, signer or self.hmac())
        nonce = fields["nonce"] if fields else None
        for attempt in range(tries):
            assert self.conn.publish(topic, payload), f"no PUBACK for {topic}"
            deadline = time.time() + timeout
            while True:
                m = self._drain(deadline)
                if m is None:
                    break
                rt, rp = m
                if rt != reply_topic:
                    log(f"[{self.id}] message on {rt} while waiting on {reply_topic}, ignored")
                    continue
                try:
                    env, body = proto.open_manager_message(rp, proto.REPLY_KIND[kind], self.mpub, dev,
                                                           self.take_signer)
                except proto.ProtocolError as e:
                    self.rejections.append(("reply", rt, str(e)))
                    log(f"[{self.id}] reply on {rt} failed §4.3: {e}")
                    continue
                if body["nonce"] == nonce or (body["nonce"] == b"" and accept_empty_nonce):
                    if body["nonce"] == nonce:
                        self.learn_signer(env)  # only from the answer to our own request (§4.3)
                    r = Reply(env, body, rp, rt)
                    if body["status"] == 0 and "roots" in body:
                        if self.pin_roots(body["roots"], body.get("crosses", [])):
                            self.roots_changed = True
                    if body["seq"] <= self.last_seq:
                        log(f"[{self.id}] note: reply seq {body['seq']} <= previous {self.last_seq} (cached?)")
                    self.last_seq = max(self.last_seq, body["seq"])
                    log(f"[{self.id}] {kind} on {topic} -> {r.status_name} seq={body['seq']}"
                        + (f" detail={body.get('detail')!r}" if "detail" in body else ""))
                    return r
                log(f"[{self.id}] reply with another nonce on {rt}"
                    + (" (empty: to a request nobody could read)" if body["nonce"] == b"" else "")
                    + ", ignored")
            log(f"[{self.id}] no reply to {kind} (attempt {attempt + 1}), republishing the same bytes")
        return None

    def take_signer(self, signer):
        """§4.3 check 4: the certificate of a successor signing key, if `signer` proves one:
        not a CA, for the manager-signing usage, begun after the key pinned, valid now, and
        issued by a pinned root, directly or through the cross-certificates after it."""
        if not (isinstance(signer, list) and 1 <= len(signer) <= 4):
            raise ValueError(f"{len(signer)} certificates")
        certs = [x509.load_der_x509_certificate(d) for d in signer]
        leaf = certs[0]
        try:
            if leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
                raise ValueError("a CA certificate")
        except x509.ExtensionNotFound:
            pass
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if x509.ObjectIdentifier(proto.MANAGER_SIGNING_EKU) not in list(eku):
            raise ValueError("not for signing the manager's messages")
        for c in certs[1:]:  # only roots' links: never a service CA (path length 0)
            try:
                bc = c.extensions.get_extension_for_class(x509.BasicConstraints).value
                ku = c.extensions.get_extension_for_class(x509.KeyUsage).value
            except x509.ExtensionNotFound:
                raise ValueError("a certificate after the key's that is no root's link")
            if not (bc.ca and bc.path_length is None and ku.key_cert_sign):
                raise ValueError("a certificate after the key's that is no root's link")
        since = leaf.not_valid_before_utc.timestamp()
        if self.signer_since is not None and since <= self.signer_since:
            raise ValueError("not newer than the signing key pinned")
        now = time.time()
        if not (since <= now <= leaf.not_valid_after_utc.timestamp()):
            raise ValueError("not valid now")
        with open(self.root_ca, "rb") as f:
            pinned = x509.load_pem_x509_certificates(f.read())
        def valid(c):
            return c.not_valid_before_utc.timestamp() <= now <= c.not_valid_after_utc.timestamp()

        cur = leaf
        for _ in range(len(certs)):
            for root in pinned:
                try:
                    cur.verify_directly_issued_by(root)
                    if valid(root):
                        return leaf
                except Exception:
                    pass
            nxt = None
            for c in certs[1:]:
                try:
                    cur.verify_directly_issued_by(c)
                    if valid(c):
                        nxt = c
                        break
                except Exception:
                    pass
            if nxt is None:
                break
            cur = nxt
        raise ValueError("no pinned root certifies it")

    def learn_signer(self, env):
        """Pins the successor key a message proved: stored, then the only key messages are taken by."""
        cert = env.pop("_learned", None)
        if cert is None:
            return
        path = self.p("manager-sign.pem")
        with open(path + ".tmp", "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        os.replace(path + ".tmp", path)
        self.mpub, self.signer_since = cert.public_key(), cert.not_valid_before_utc.timestamp()
        log(f"[{self.id}] pinned the manager's new signing key ({cert.subject.rfc4514_string()})")

    def pin_roots(self, roots, crosses):
        """§3.5.5: keep the roots an ok reply carries that are pinned already or linked to
        one by a cross-certificate, add the pinned ones it leaves out, drop expired ones,
        and pin those if they differ. A list that does not read, or of which no root is
        kept, leaves the pinned roots as they are (the reply stands)."""
        def root_ca(c):
            try:
                bc = c.extensions.get_extension_for_class(x509.BasicConstraints).value
                ku = c.extensions.get_extension_for_class(x509.KeyUsage).value
            except x509.ExtensionNotFound:
                return False
            return bc.ca and bc.path_length is None and ku.key_cert_sign

        try:
            if not (isinstance(roots, list) and 1 <= len(roots) <= 4):
                raise ValueError(f"{len(roots)} roots")
            if not (isinstance(crosses, list) and len(crosses) <= 6):
                raise ValueError(f"{len(crosses)} crosses")
            certs = [x509.load_der_x509_certificate(der) for der in roots]
            links = [x509.load_der_x509_certificate(der) for der in crosses]
            for c in certs:
                c.verify_directly_issued_by(c)  # self-signed
            if not all(root_ca(c) for c in certs + links):
                raise ValueError("a root or cross-certificate that is no root CA")
        except Exception as e:  # the reply stands
            log(f"[{self.id}] roots in a reply ignored: {e}")
            return
        with open(self.root_ca, "rb") as f:
            pinned = x509.load_pem_x509_certificates(f.read())
        trusted = list(pinned)
        kept = []

        def der(c):
            return c.public_bytes(serialization.Encoding.DER)

        def spki(c):
            return c.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)

        def linked(root):
            for c in links:
                if c.subject.public_bytes() != root.subject.public_bytes() or spki(c) != spki(root):
                    continue
                for t in trusted:
                    try:
                        c.verify_directly_issued_by(t)
                        return True
                    except Exception:
                        pass
            return False

        more = True
        while more:  # until nothing more links: a link may run either way
            more = False
            for root in certs:
                if root not in kept and (der(root) in map(der, pinned) or linked(root)):
                    trusted.append(root)
                    kept.append(root)
                    more = True
        if not kept:
            log(f"[{self.id}] roots in a reply ignored: none pinned or linked to a pinned one")
            return
        now = time.time()
        keep = [c for c in certs if c in kept] + [c for c in pinned if der(c) not in map(der, certs)]
        keep = [c for c in keep if c.not_valid_after_utc.timestamp() >= now]
        pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in keep)
        path = self.p("roots.pem")
        if self.root_ca == path and open(path, "rb").read() == pem:
            return
        with open(path + ".tmp", "wb") as f:
            f.write(pem)
        os.replace(path + ".tmp", path)
        self.root_ca = path
        log(f"[{self.id}] pinned {len(keep)} roots")
        return True

    def base(self, service_id=None, **extra):
        f = {"device_id": self.id, "nonce": os.urandom(16), "ts": proto.now_ms()}
        if service_id:
            f["service_id"] = service_id
        f.update(extra)
        return f

    def activate(self):
        eph = proto.new_key()
        f = self.base(self.st.get("service_id"), eph=proto.point(eph))
        r = self.send("activate", f, tenant=None, signer=proto.ecdsa_signer(self.factory_key()))
        if r and r.status == 0:
            uuid = proto.unseal(eph, self.id, r.body["uuid"])
            assert len(uuid) == 16, "uuid not 16 bytes"
            assert proto.valid_service_id(r.body["service_id"])
            self.st["uuid"] = uuid.hex()
            self.st["service_id"] = r.body["service_id"]
            self.save()
            log(f"[{self.id}] activated into {r.body['service_id']}")
        del eph
        return r

    def update(self, service_id=None, mode="csr", tenant="auto"):
        service_id = service_id or self.st["service_id"]
        eph = proto.new_key()
        f = self.base(service_id, eph=proto.point(eph))
        key = None
        if mode == "csr":
            key = proto.new_key()
            csr = (x509.CertificateSigningRequestBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.id)]))
                   .sign(key, hashes.SHA256()))
            f["csr"] = csr.public_bytes(serialization.Encoding.DER)
        r = self.send("update", f, tenant=tenant)
        if not r or r.status != 0:
            return r
        b = r.body
        assert b.get("service_id") == service_id, f"reply service_id {b.get('service_id')} != {service_id}"
        if mode == "manager":
            assert "key" in b, "generated-key mode: no key in reply"
            from cryptography.hazmat.primitives.asymmetric import ec
            key = serialization.load_der_private_key(proto.unseal(eph, self.id, b["key"]), None)
            assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
        else:
            assert "key" not in b, "CSR mode reply carries a key"
        chain = b["chain"]
        assert isinstance(chain, list) and len(chain) == 2, f"chain has {len(chain)} certs"
        leaf = x509.load_der_x509_certificate(chain[0])
        ca = x509.load_der_x509_certificate(chain[1])
        assert proto.point(leaf.public_key()) == proto.point(key), "leaf does not hold our key"
        cn = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        o = leaf.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
        assert cn == self.id, f"leaf CN {cn}"
        assert o == service_id, f"leaf O {o}"
        pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (leaf, ca))
        # verify the chain to the pinned root with openssl
        with tempfile.TemporaryDirectory() as d:
            lp, cp = os.path.join(d, "leaf.pem"), os.path.join(d, "ca.pem")
            open(lp, "wb").write(leaf.public_bytes(serialization.Encoding.PEM))
            open(cp, "wb").write(ca.public_bytes(serialization.Encoding.PEM))
            p = subprocess.run(["openssl", "verify", "-CAfile", self.root_ca, "-untrusted", cp, lp],
                               capture_output=True, text=True)
            assert p.returncode == 0, f"openssl verify failed: {p.stdout}{p.stderr}"
            log(f"[{self.id}] openssl verify: {p.stdout.strip()}")
        # keep the previous chain/key for later checks, then store the new ones
        for n in ("chain.pem", "service.key"):
            if os.path.exists(self.p(n)):
                os.replace(self.p(n), self.p(n + ".prev"))
        open(self.p("chain.pem"), "wb").write(pem)
        open(self.p("service.key"), "wb").write(proto.private_pem(key))
        os.chmod(self.p("service.key"), 0o600)
        self.st["service_id"] = service_id
        self.st["key_mode"] = mode
        self.save()
        log(f"[{self.id}] new certificate for {service_id} ({mode}), serial {leaf.serial_number:x}")
        return r

    def poll(self, service_id=None, tenant="auto"):
        r = self.send("poll", self.base(service_id or self.st["service_id"]), tenant=tenant)
        self.report_roots_if_changed(tenant)
        if r and r.status == 0 and "change" in r.body:
            self.consider_change(r.body["change"], "change in poll_reply")
        return r

    def pinned_digests(self):
        """§3.5.4: the SHA-256 of the DER of each root the device pins (at most four, §3.5.5)."""
        with open(self.root_ca, "rb") as f:
            certs = x509.load_pem_x509_certificates(f.read())
        return [hashlib.sha256(c.public_bytes(serialization.Encoding.DER)).digest() for c in certs][:8]

    def report_roots_if_changed(self, tenant="auto"):
        """§3.5.4: roots_pinned at once after a poll or status reply on the service
        listener changed the roots it pins."""
        if self.roots_changed and self.conn is not None and self.tenant:
            self.roots_changed = False
            r = self.status("roots_pinned", tenant=tenant)
            log(f"[{self.id}] told the manager the roots it pins: {r.status_name if r else 'no reply'}")

    def status(self, event, service_id=None, tenant="auto", **extra):
        extra.setdefault("pinned_roots", self.pinned_digests())
        # §3.5.4: the SHA-256 of the DER SubjectPublicKeyInfo of the manager key it takes messages by
        extra.setdefault("signing_key", hashlib.sha256(self.mpub.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).digest())
        self.roots_changed = False  # this report names the roots pinned now
        r = self.send("status", self.base(service_id or self.st["service_id"], event=event, **extra),
                      tenant=tenant)
        if event != "roots_pinned":
            self.report_roots_if_changed(tenant)
        return r

    def telemetry(self, seq, temp=21.5):
        t = f"/tenants/{self.tenant}/telemetry/{self.id}"
        payload = cbor2.dumps({"device_id": self.id, "service_id": self.tenant, "seq": seq,
                               "ts": proto.now_ms(), "temp_c": temp})
        ok = self.conn.publish(t, payload)
        log(f"[{self.id}] telemetry seq {seq} on {t}: {'PUBACK' if ok else 'no PUBACK'}")
        return ok

    def on_connect_service(self):
        """§10.1 step 4: change_applied (after a change), online, poll."""
        ch = self.st.get("pending_change")
        if ch and ch["service_id"] == self.tenant:
            r = self.status("change_applied", change_id=ch["change_id"])
            assert r and r.status == 0
            self.st["applied_change"] = ch["change_id"]
            self.st["pending_change"] = None
            self.save()
        r = self.status("online")
        assert r and r.status == 0
        return self.poll()

    def follow_change(self, change, mode="csr"):
        """§7.4 from the device side: update in the current tenant, reconnect in the new one."""
        r = self.update(change["service_id"], mode=mode)
        assert r and r.status == 0, f"update for {change['service_id']} failed: {r}"
        addr = self.service_addr
        if change.get("endpoint"):
            ep = change["endpoint"][len("mqtts://"):]
            addr = hostport(ep.strip("[]")) if not ep.startswith("[") else (ep[1:ep.index("]")], int(ep.rsplit(":", 1)[1]))
        self.disconnect()
        self.connect_service(addr=addr)
        self.on_connect_service()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["keygen", "activate", "update", "run", "poll", "status"])
    ap.add_argument("--state", required=True, help="device state directory")
    ap.add_argument("--id", help="device id (keygen; later read from state)")
    ap.add_argument("--certs", default="certs", help="dir with root-ca.pem and manager-sign.pub.pem")
    ap.add_argument("--bootstrap", type=hostport, help="HOST:PORT of the bootstrap TLS listener")
    ap.add_argument("--service-addr", type=hostport, help="HOST:PORT of the mutual-TLS service listener")
    ap.add_argument("--mode", choices=["csr", "manager"], default="csr", help="update key mode")
    ap.add_argument("--service", help="service id for update (default: current)")
    ap.add_argument("--event", default="online", help="status event")
    ap.add_argument("--seconds", type=float, default=10, help="run: how long to stay connected")
    a = ap.parse_args()
    if a.cmd == "keygen":
        d = Device(a.state, a.certs, device_id=a.id)
        print(json.dumps(d.keygen()))
        return 0
    d = Device(a.state, a.certs, a.bootstrap, a.service_addr)
    try:
        if a.cmd == "activate":
            d.connect_bootstrap()
            r = d.activate()
        elif a.cmd == "update":
            if os.path.exists(d.p("chain.pem")):
                d.connect_service()
            else:
                d.connect_bootstrap()
            r = d.update(a.service, a.mode)
        elif a.cmd in ("poll", "status"):
            d.connect_service()
            r = d.poll() if a.cmd == "poll" else d.status(a.event)
        elif a.cmd == "run":
            d.connect_service()
            r = d.on_connect_service()
            end, seq = time.time() + a.seconds, 0
            while time.time() < end:
                seq += 1
                d.telemetry(seq)
                ch = d.wait_notice(min(5, max(0.1, end - time.time())))
                if isinstance(ch, dict):
                    d.follow_change(ch, a.mode)
        print(r)
        return 0 if r and r.status == 0 else 1
    finally:
        d.disconnect()


if __name__ == "__main__":
    sys.exit(main())
