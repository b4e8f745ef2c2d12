#!/usr/bin/env python3
"""Check every example of topics.md §2.4 and §9 with proto.py (our own encoder).

For every fixture: the hex decodes; the envelope re-encodes byte for byte from
its fields; the body re-encodes byte for byte with our CDDL-ordered encoder;
our CRC equals `crc`; our hand-built TBS equals cbor2's; the authenticator
verifies (HMACs are recomputed byte for byte); the diagnostic notation equals
our rendering of the hex; the topic parses and names kind and device; a reply
echoes its request's nonce; sealed fields open; chains verify to the test root
(openssl verify); the worked vectors match our TBS, ECDH and HKDF.
"""
import argparse
import binascii
import hashlib
import os
import re
import subprocess
import sys
import tempfile

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import proto

FAILS = []
PASSES = [0]


def check(cond, what):
    if cond:
        PASSES[0] += 1
    else:
        FAILS.append(what)
        print("FAIL:", what)


def blocks(text):
    """All fenced blocks: (info string, content)."""
    return [(m.group(1).strip(), m.group(2))
            for m in re.finditer(r"^```([^\n]*)\n(.*?)^```\s*$", text, re.S | re.M)]


def attrs(info):
    parts = info.split()
    return parts[0] if parts else "", dict(p.split("=", 1) for p in parts[1:] if "=" in p)


def unhex(s):
    return binascii.unhexlify(re.sub(r"\s+", "", s))


# ---- CBOR extended diagnostic notation: render ours, normalise theirs ----

def diag(v, embedded_body=False):
    if isinstance(v, bool) or v is None:
        raise ValueError("unexpected simple value")
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, bytes):
        return "h'" + v.hex() + "'"
    if isinstance(v, list):
        return "[" + ",".join(diag(x) for x in v) + "]"
    if isinstance(v, dict):
        items = []
        for k, x in v.items():
            if k == "body" and embedded_body:
                items.append(diag(k) + ":<<" + diag(cbor2.loads(x)) + ">>")
            else:
                items.append(diag(k) + ":" + diag(x))
        return "{" + ",".join(items) + "}"
    raise ValueError(type(v))


def normalise_diag(s):
    """Drop /comments/ and whitespace outside text strings (also inside h'..')."""
    out, i, n = [], 0, len(s)
    while i < n:
        c = s[i]
        if c == '"':
            j = i + 1
            while s[j] != '"':
                j += 2 if s[j] == "\\" else 1
            out.append(s[i:j + 1])
            i = j + 1
        elif c == "/":
            i = s.index("/", i + 1) + 1
        elif c.isspace():
            i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def openssl_verify(root_pem, chain_der, attime):
    with tempfile.TemporaryDirectory() as d:
        paths = []
        for name, der in (("leaf", chain_der[0]), ("ca", chain_der[1])):
            p = os.path.join(d, name + ".pem")
            with open(p, "wb") as f:
                f.write(x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM))
            paths.append(p)
        r = os.path.join(d, "root.pem")
        with open(r, "wb") as f:
            f.write(root_pem)
        cmd = ["openssl", "verify", "-CAfile", r, "-untrusted", paths[1]]
        if attime:
            cmd += ["-attime", str(attime)]
        cmd.append(paths[0])
        p = subprocess.run(cmd, capture_output=True, text=True)
        return p.returncode == 0, (p.stdout + p.stderr).strip()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", required=True, help="path to topics.md")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args()
    text = open(a.spec, encoding="utf-8").read()

    fixtures, diags, keys, certs, values, vectors, topics = {}, {}, {}, {}, {}, {}, {}
    for info, content in blocks(text):
        lang, at = attrs(info)
        if lang == "hex" and "fixture" in at:
            fixtures[at["fixture"]] = (at.get("topic"), unhex(content))
        elif lang == "cbor-diag" and "fixture" in at:
            diags[at["fixture"]] = content
        elif lang == "pem" and "key" in at:
            keys[at["key"]] = content.encode()
        elif lang == "pem" and "cert" in at:
            certs[at["cert"]] = content.encode()
        elif lang == "hex" and "value" in at:
            values[at["value"]] = unhex(content)
        elif lang == "hex" and "vector" in at:
            vectors[at["vector"]] = unhex(content)
        elif lang == "text" and "topics" in at:
            topics[at["topics"]] = [l.strip() for l in content.splitlines() if l.strip()]
    print(f"found {len(fixtures)} fixtures, {len(diags)} diag blocks, keys {sorted(keys)}, "
          f"vectors {sorted(vectors)}")
    check(set(fixtures) == set(diags), "every hex fixture has a diag block")

    # ---- §3.4 check value
    check(proto.crc32(b"123456789") == 0xCBF43926, "crc32 check value")

    # ---- §2.4 topics
    for t in topics.get("valid", []):
        pt = proto.parse_topic(t)
        check(pt is not None and proto.format_topic(pt) == t, f"valid topic parses and prints back: {t}")
    for t in topics.get("invalid", []):
        check(proto.parse_topic(t) is None, f"invalid topic rejected: {t}")

    # ---- §9.2 keys
    factory = proto.load_pem_private(keys["factory"])
    m = re.search(r"is\s*`(04[0-9a-f]{128})`", text)
    check(m and proto.point(factory).hex() == m.group(1), "factory key's point = the factory_key_hex in §9.2")
    msign = proto.load_pem_private(keys["manager-sign"])
    mpub = proto.load_pem_public(keys["manager-sign.pub"])
    check(proto.point(msign) == proto.point(mpub), "manager-sign.pub is the public half of manager-sign")
    uuid = values["uuid"]
    import uuid as uuidmod
    check(uuid == uuidmod.UUID("49f71b11-d866-4fed-a669-efc7f1ae6b70").bytes, "uuid hex = UUID text bytes")
    ephs = {n[len("eph."):]: proto.load_pem_private(k) for n, k in keys.items() if n.startswith("eph.")}
    root_pem = certs["root-ca"]

    # ---- fixtures
    opened = {}
    for name, (topic, payload) in fixtures.items():
        kind = name.split(".")[0]
        env = cbor2.loads(payload)
        check(list(env) == [k for k in proto.ORDER["envelope"] if k in env], f"{name}: envelope key order")
        check(env["v"] == 1 and env["kind"] == kind, f"{name}: v=1 and kind from name")
        body = env["body"]
        # our CRC
        check(proto.crc32(body) == env["crc"], f"{name}: our CRC-32 = crc")
        # our envelope encoder
        check(proto.encode_envelope(kind, body, env["auth"]) == payload,
              f"{name}: our envelope encoder reproduces the payload")
        # our body encoder from the decoded fields
        b = cbor2.loads(body)
        typ = proto.body_type(kind)
        check(set(proto.REQUIRED[typ]) <= set(b), f"{name}: body has required fields of {typ}")
        check(proto.encode_body(kind, dict(b)) == body, f"{name}: our body encoder reproduces the body")
        # our TBS (hand-built) = cbor2's
        t = proto.tbs(kind, body)
        check(t == cbor2.dumps([proto.CONTEXT, kind, body]), f"{name}: hand-built TBS = cbor2 TBS")
        # authenticator
        if kind == "activate":
            check(len(env["auth"]) <= 72 and proto.ecdsa_verify(factory.public_key(), env["auth"], t),
                  f"{name}: ECDSA by the factory key")
        elif kind in ("update", "poll", "status"):
            check(proto.hmac_signer(uuid)(t) == env["auth"], f"{name}: our HMAC = auth byte for byte")
        else:
            check(len(env["auth"]) <= 72 and proto.ecdsa_verify(mpub, env["auth"], t),
                  f"{name}: ECDSA by the manager key")
            # and §4.3 as a device does it
            try:
                proto.open_manager_message(payload, kind, mpub, "dev-0001")
                ok = True
            except proto.ProtocolError as e:
                ok = False
                print("  ", e)
            check(ok, f"{name}: passes the §4.3 device checks")
        # diagnostic notation
        check(normalise_diag(diags[name]) == diag(env, embedded_body=True),
              f"{name}: diagnostic notation equals the hex")
        if a.verbose and normalise_diag(diags[name]) != diag(env, embedded_body=True):
            print(normalise_diag(diags[name]))
            print(diag(env, embedded_body=True))
        # topic
        pt = proto.parse_topic(topic)
        check(pt is not None and pt["device"] == b["device_id"], f"{name}: topic parses, names the device")
        if pt:
            if kind == "service_change":
                check(pt["role"] == "notice", f"{name}: notice topic")
            elif kind.endswith("_reply"):
                check(pt["role"] == "reply" and proto.REPLY_KIND[pt["kind"]] == kind, f"{name}: reply topic of the kind")
            else:
                check(pt["role"] == "request" and pt["kind"] == kind, f"{name}: request topic of the kind")
        opened[name] = (topic, env, b)

    # requests carrying eph use eph.NAME
    for name, (topic, env, b) in opened.items():
        if "eph" in b:
            check(name in ephs and proto.point(ephs[name]) == b["eph"], f"{name}: eph = public of eph.{name}")

    # replies echo their request's nonce (same name without _reply), and service ids
    for name, (topic, env, b) in opened.items():
        kind = name.split(".")[0]
        if not kind.endswith("_reply"):
            continue
        req = name.replace("_reply", "", 1)
        if req in opened:
            check(b["nonce"] == opened[req][2]["nonce"], f"{name}: echoes the nonce of {req}")
            rt = proto.parse_topic(opened[req][0])
            check(proto.format_topic(dict(rt, role="reply")) == topic, f"{name}: on the reply topic of {req}'s topic")
        elif b["status"] != 0:
            check(b["nonce"] == b"" or len(b["nonce"]) >= 8, f"{name}: error reply nonce empty or echoed")
            check("detail" in b, f"{name}: error reply has detail")

    # sealed fields open with the request's eph (and the §9.4 vectors)
    ar = opened["activate_reply"][2]
    z = proto.ecdh(ephs["activate"], ar["uuid"]["epk"])
    check(z == vectors["seal.activate_reply.ecdh"], "vector seal.activate_reply.ecdh = our ECDH")
    k = proto.seal_key(z)
    check(k == vectors["seal.activate_reply.key"], "vector seal.activate_reply.key = our HKDF")
    check(proto.unseal(ephs["activate"], "dev-0001", ar["uuid"]) == uuid, "activate_reply uuid opens to the UUID")
    # wrong AAD must fail
    try:
        proto.unseal(ephs["activate"], "dev-0002", ar["uuid"])
        check(False, "unseal with another device id fails")
    except proto.ProtocolError:
        check(True, "")
    # our sealing round-trip, and reproducing the fixture's ct from K and iv
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    check(AESGCM(k).encrypt(ar["uuid"]["iv"], uuid, b"dev-0001") == ar["uuid"]["ct"],
          "our AES-256-GCM with K, iv, AAD reproduces the uuid ct byte for byte")
    s = proto.seal(b"secret", proto.point(ephs["activate"]), "dev-0001")
    check(proto.unseal(ephs["activate"], "dev-0001", s) == b"secret", "our seal/unseal round trip")

    ug = opened["update_reply.generated_key"][2]
    keyder = proto.unseal(ephs["update.generated_key"], "dev-0001", ug["key"])
    gk = serialization.load_der_private_key(keyder, None)
    leaf = x509.load_der_x509_certificate(ug["chain"][0])
    check(isinstance(gk, ec.EllipticCurvePrivateKey) and proto.point(gk) == proto.point(leaf.public_key()),
          "update_reply.generated_key: key opens to PKCS#8 whose public half is the leaf's")
    kg = proto.seal_key(proto.ecdh(ephs["update.generated_key"], ug["key"]["epk"]))
    check(AESGCM(kg).encrypt(ug["key"]["iv"], keyder, b"dev-0001") == ug["key"]["ct"],
          "our AES-256-GCM reproduces the generated_key ct byte for byte (K from ECDH+HKDF)")
    check(leaf.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATION_NAME)[0].value == "traffic",
          "generated_key leaf O = traffic")

    # CSR of the update fixture, and its leaf
    up = opened["update"][2]
    csr = x509.load_der_x509_csr(up["csr"])
    check(csr.is_signature_valid, "update: CSR self-signature verifies")
    ur = opened["update_reply"][2]
    leaf = x509.load_der_x509_certificate(ur["chain"][0])
    check(proto.point(leaf.public_key()) == proto.point(csr.public_key()), "update_reply: leaf holds the CSR's key")
    check(leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "dev-0001", "update_reply: leaf CN")

    # chains verify to the test root. The examples are dated 2026-12-01 (§9.1), so verify at that time.
    for name in ("update_reply", "update_reply.generated_key"):
        ok, out = openssl_verify(root_pem, opened[name][2]["chain"], 1796083200)
        check(ok, f"{name}: chain verifies to the test root-ca (openssl verify -attime): {out}")
        ok_now, out_now = openssl_verify(root_pem, opened[name][2]["chain"], None)
        if not ok_now:
            print(f"note: {name} chain does not verify at the machine's current time: {out_now.splitlines()[-1]}")

    # change embedded in poll_reply = the notice body
    sc_body = cbor2.loads(opened["service_change"][1]["body"])
    check(opened["poll_reply"][2]["change"] == sc_body, "poll_reply.change = service_change body")
    check(proto.encode_body("service_change", opened["poll_reply"][2]["change"]) == opened["service_change"][1]["body"],
          "poll_reply.change re-encodes to the notice body bytes")
    check(proto.check_notice(sc_body, "dev-0001", 0) is None, "service_change acceptable per §6.3 (last seq 0)")
    check(proto.check_notice(sc_body, "dev-0001", 9) is not None, "service_change rejected when seq = last")

    # negative tests of our §4.3 checker on the manager examples
    for name, (topic, env, b) in opened.items():
        kind = name.split(".")[0]
        if not (kind.endswith("_reply") or kind == "service_change"):
            continue
        def rejects(payload, exp_kind=kind, dev="dev-0001"):
            try:
                proto.open_manager_message(payload, exp_kind, mpub, dev)
                return False
            except proto.ProtocolError:
                return True
        body = bytearray(env["body"]); body[-1] ^= 1; body = bytes(body)
        check(rejects(proto.encode_envelope(kind, body, env["auth"], crc=env["crc"])), f"{name}: flipped body bit -> rejected (CRC)")
        check(rejects(proto.encode_envelope(kind, body, env["auth"])), f"{name}: flipped body bit, fixed CRC -> rejected (signature)")
        check(rejects(proto.encode_envelope(kind, env["body"], env["auth"], v=2)), f"{name}: v=2 -> rejected")
        other = "poll_reply" if kind != "poll_reply" else "status_reply"
        check(rejects(fixtures[name][1], exp_kind=other), f"{name}: unexpected kind -> rejected")
        check(rejects(fixtures[name][1], dev="dev-0002"), f"{name}: other device -> rejected")
        forged = proto.encode_envelope(kind, env["body"], proto.ecdsa_signer(factory)(proto.tbs(kind, env["body"])))
        check(rejects(forged), f"{name}: signed by a non-manager key -> rejected")

    # the worked TBS vector
    check(proto.tbs("poll", opened["poll"][1]["body"]) == vectors["tbs.poll"], "vector tbs.poll = our TBS")
    check(proto.hmac_signer(uuid)(vectors["tbs.poll"]) == opened["poll"][1]["auth"], "HMAC(tbs.poll) = poll auth")

    # build the poll example from scratch with our encoder (fields from the diag) and compare
    env = proto.encode_envelope("poll", proto.encode_body("poll", {
        "ts": 1796083290000, "nonce": bytes.fromhex("707165e9984b51dcdf1ca7cc9b6fe7a5"),
        "service_id": "weather", "device_id": "dev-0001"}), b"")
    body = cbor2.loads(env)["body"]
    pl, _ = proto.build("poll", cbor2.loads(body), proto.hmac_signer(uuid))
    check(pl == fixtures["poll"][1], "poll example rebuilt from scratch (fields in any order) = hex byte for byte")
    # pinned_roots (§3.5.4): the SHA-256 of the DER of the test root, the one root the device pins then
    root_digest = hashlib.sha256(x509.load_pem_x509_certificate(root_pem)
                                 .public_bytes(serialization.Encoding.DER)).digest()
    check(opened["status"][2].get("pinned_roots") == [root_digest],
          "status example: pinned_roots = [SHA-256 of the test root-ca's DER]")
    pl, _ = proto.build("status", {"device_id": "dev-0001", "service_id": "traffic",
                                   "nonce": bytes.fromhex("073c1634c496cdb649d1afe0a312bbb4"),
                                   "ts": 1796083300000, "event": "change_applied",
                                   "change_id": "7c9e6679-7425-40de-944b-e07fc1f90ae7",
                                   "pinned_roots": [root_digest]}, proto.hmac_signer(uuid))
    check(pl == fixtures["status"][1], "status example rebuilt from scratch = hex byte for byte")

    print(f"\n{PASSES[0]} checks passed, {len(FAILS)} failed")
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
