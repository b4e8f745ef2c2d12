"""fleetshift wire protocol v1, written from topics.md only.

Encoding (§3), CRC (§3.4), to-be-signed bytes (§4.1), authenticators (§4.2),
sealing (§4.4), topic syntax (§2.1, §2.2), and the manager-message checks of
§4.3 / §6.3.
"""
import hashlib
import hmac
import os
import re
import struct
import time
import zlib

import cbor2
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAX_MESSAGE_LEN = 16384
CONTEXT = "fleetshift/v1"
SEAL_INFO = b"fleetshift/v1 seal"

STATUS = {
    0: "ok", 1: "bad_crc", 2: "malformed", 3: "unknown_device", 4: "not_registered",
    5: "auth_failed", 6: "replayed", 7: "wrong_service", 8: "rate_limited",
    9: "internal", 10: "stale", 11: "too_large", 12: "already_active",
    13: "unsupported_version", 14: "busy",
}
CODE = {v: k for k, v in STATUS.items()}

REQUEST_KINDS = ("activate", "update", "poll", "status")
REPLY_KIND = {k: k + "_reply" for k in REQUEST_KINDS}

# Field order of every map, from the CDDL of §3.3-§3.5 and §4.4.
ORDER = {
    "envelope": ["v", "kind", "body", "crc", "auth", "signer"],
    "activate": ["device_id", "service_id", "nonce", "ts", "eph"],
    "update": ["device_id", "service_id", "nonce", "ts", "eph", "csr"],
    "poll": ["device_id", "service_id", "nonce", "ts"],
    "status": ["device_id", "service_id", "nonce", "ts", "event", "change_id", "detail",
               "pinned_roots", "signing_key"],
    "reply": ["device_id", "nonce", "seq", "status", "service_id", "uuid", "chain",
              "key", "change", "roots", "crosses", "detail"],
    "service_change": ["device_id", "seq", "change_id", "service_id", "provider",
                       "application", "endpoint", "ts"],
    "sealed": ["epk", "iv", "ct"],
}
REQUIRED = {
    "activate": {"device_id", "nonce", "ts", "eph"},
    "update": {"device_id", "service_id", "nonce", "ts", "eph"},
    "poll": {"device_id", "service_id", "nonce", "ts"},
    "status": {"device_id", "service_id", "nonce", "ts", "event"},
    "reply": {"device_id", "nonce", "seq", "status"},
    "service_change": {"device_id", "seq", "change_id", "service_id", "ts"},
    "sealed": {"epk", "iv", "ct"},
}

DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SERVICE_ID_RE = re.compile(r"^[A-Za-z0-9]{1,32}$")
ENDPOINT_RE = re.compile(r"^mqtts://([^/:]+|\[[0-9A-Fa-f:]+\]):([0-9]{1,5})$")


class ProtocolError(Exception):
    pass


def valid_device_id(d):
    return isinstance(d, str) and bool(DEVICE_ID_RE.match(d)) and d.lower() != "fleet-manager"


def valid_service_id(s):
    return isinstance(s, str) and bool(SERVICE_ID_RE.match(s))


def valid_endpoint(e):
    m = ENDPOINT_RE.match(e) if isinstance(e, str) else None
    return bool(m) and 0 < int(m.group(2)) < 65536


# ---------------------------------------------------------------- encoding

def _ordered(kind_or_type, fields):
    """A dict with the fields in CDDL order; '?' fields with no value omitted."""
    order = ORDER[kind_or_type]
    extra = set(fields) - set(order)
    if extra:
        raise ValueError(f"unknown fields for {kind_or_type}: {extra}")
    out = {}
    for k in order:
        v = fields.get(k)
        if v is None:
            continue
        if k in ("uuid", "key") and isinstance(v, dict):
            v = _ordered("sealed", v)
        elif k == "change" and isinstance(v, dict):
            v = _ordered("service_change", v)
        out[k] = v
    return out


def body_type(kind):
    if kind.endswith("_reply"):
        return "reply"
    return kind


def encode_body(kind, fields):
    """CBOR body bytes (§3.1): text keys in CDDL order, shortest ints, definite lengths."""
    return cbor2.dumps(_ordered(body_type(kind), fields))


def crc32(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def _bstr_header(n):
    if n < 24:
        return bytes([0x40 + n])
    if n < 256:
        return bytes([0x58, n])
    if n < 65536:
        return bytes([0x59]) + struct.pack(">H", n)
    raise ValueError("body too long")


def tbs(kind: str, body: bytes) -> bytes:
    """§4.1, built by hand (not by cbor2) so the two can be compared."""
    k = kind.encode()
    assert len(k) < 24
    return (b"\x83" + b"\x6d" + CONTEXT.encode() + bytes([0x60 + len(k)]) + k
            + _bstr_header(len(body)) + body)


def encode_envelope(kind, body: bytes, auth: bytes, v=1, crc=None) -> bytes:
    env = {"v": v, "kind": kind, "body": body,
           "crc": crc32(body) if crc is None else crc, "auth": auth}
    return cbor2.dumps(env)


def build(kind, fields, signer, **kw):
    """Returns (payload, body_bytes)."""
    body = encode_body(kind, fields)
    return encode_envelope(kind, body, signer(tbs(kind, body)), **kw), body


# ------------------------------------------------------------------ keys

def point(key) -> bytes:
    pub = key.public_key() if hasattr(key, "public_key") else key
    return pub.public_bytes(serialization.Encoding.X962,
                            serialization.PublicFormat.UncompressedPoint)


def new_key():
    return ec.generate_private_key(ec.SECP256R1())


def ecdsa_signer(priv):
    return lambda m: priv.sign(m, ec.ECDSA(hashes.SHA256()))


def hmac_signer(uuid_bytes):
    return lambda m: hmac.new(uuid_bytes, m, hashlib.sha256).digest()


def ecdsa_verify(pub, sig, msg):
    try:
        pub.verify(sig, msg, ec.ECDSA(hashes.SHA256()))
        return True
    except InvalidSignature:
        return False


def load_pem_private(data: bytes):
    return serialization.load_pem_private_key(data, password=None)


def load_pem_public(data: bytes):
    return serialization.load_pem_public_key(data)


def private_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


# --------------------------------------------------------------- sealing

def seal_key(z: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=None, info=SEAL_INFO).derive(z)


def ecdh(priv, peer_point: bytes) -> bytes:
    peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), peer_point)
    return priv.exchange(ec.ECDH(), peer)


def seal(plaintext: bytes, recipient_point: bytes, device_id: str, e=None, iv=None) -> dict:
    """Manager side of §4.4 (for round-trip tests)."""
    e = e or new_key()
    iv = iv or os.urandom(12)
    k = seal_key(ecdh(e, recipient_point))
    ct = AESGCM(k).encrypt(iv, plaintext, device_id.encode())
    return {"epk": point(e), "iv": iv, "ct": ct}


def unseal(eph_priv, device_id: str, sealed) -> bytes:
    if not isinstance(sealed, dict) or not REQUIRED["sealed"] <= set(sealed):
        raise ProtocolError("sealed: missing fields")
    epk, iv, ct = sealed["epk"], sealed["iv"], sealed["ct"]
    if not (isinstance(iv, bytes) and len(iv) == 12):
        raise ProtocolError("sealed: iv not 12 bytes")
    if not (isinstance(ct, bytes) and len(ct) >= 16):
        raise ProtocolError("sealed: ct shorter than 16")
    if not (isinstance(epk, bytes) and len(epk) == 65 and epk[0] == 4):
        raise ProtocolError("sealed: epk not an uncompressed point")
    try:
        z = ecdh(eph_priv, epk)  # from_encoded_point rejects points off the curve
    except ValueError as e:
        raise ProtocolError(f"sealed: epk not on P-256: {e}")
    try:
        return AESGCM(seal_key(z)).decrypt(iv, ct, device_id.encode())
    except InvalidTag:
        raise ProtocolError("sealed: tag does not verify")


# ---------------------------------------------------------------- topics

def parse_topic(t: str):
    """§2.2 / §2.4. Returns dict(form, service, kind, device, reply|notice|telemetry) or None."""
    tenant = None
    rest = t
    if t.startswith("/tenants/"):
        parts = t.split("/")
        # ['', 'tenants', s, ...]
        if len(parts) < 4:
            return None
        tenant = parts[2]
        if not valid_service_id(tenant):
            return None
        rest = "/".join(parts[3:])
        if parts[3] == "telemetry":
            if len(parts) == 5 and valid_device_id(parts[4]):
                return {"form": "tenant", "service": tenant, "kind": "telemetry",
                        "device": parts[4], "role": "telemetry"}
            return None
    p = rest.split("/")
    if len(p) < 4 or p[0] != "fleet" or p[1] != "v1":
        return None
    form = "tenant" if tenant else "bootstrap"
    if p[2] == "service" and len(p) == 5 and p[3] == "change":
        if valid_device_id(p[4]):
            return {"form": form, "service": tenant, "kind": "service_change",
                    "device": p[4], "role": "notice"}
        return None
    if p[2] in REQUEST_KINDS and valid_device_id(p[3]):
        if len(p) == 4:
            return {"form": form, "service": tenant, "kind": p[2], "device": p[3],
                    "role": "request"}
        if len(p) == 5 and p[4] == "reply":
            return {"form": form, "service": tenant, "kind": p[2], "device": p[3],
                    "role": "reply"}
    return None


def format_topic(pt):
    pre = f"/tenants/{pt['service']}/" if pt["form"] == "tenant" else ""
    if pt["role"] == "telemetry":
        return f"{pre}telemetry/{pt['device']}"
    if pt["role"] == "notice":
        return f"{pre}fleet/v1/service/change/{pt['device']}"
    t = f"{pre}fleet/v1/{pt['kind']}/{pt['device']}"
    return t + "/reply" if pt["role"] == "reply" else t


def request_topic(kind, device, service=None):
    pre = f"/tenants/{service}/" if service else ""
    return f"{pre}fleet/v1/{kind}/{device}"


def notice_topic(device, service=None):
    pre = f"/tenants/{service}/" if service else ""
    return f"{pre}fleet/v1/service/change/{device}"


# ------------------------------------------------ checking manager messages

def _check_map(d, typ):
    if not isinstance(d, dict):
        raise ProtocolError(f"{typ}: not a map")
    missing = REQUIRED[typ] - set(d)
    if missing:
        raise ProtocolError(f"{typ}: missing {sorted(missing)}")


# The extended key usage of a manager signing key's certificate (§4.3, §8).
MANAGER_SIGNING_EKU = "2.25.122450229210474948527528967594312682113"


def open_manager_message(payload: bytes, expected_kind: str, manager_pub, device_id: str, take_signer=None):
    """§4.3 checks 1-5. Returns (envelope, body_dict). When the pinned key does not verify
    `auth` and the envelope has a `signer`, take_signer(signer) returns the certificate of a
    successor key the device may take (or raises); the envelope then has it under "_learned"."""
    if len(payload) > MAX_MESSAGE_LEN:
        raise ProtocolError("too large")
    try:
        env = cbor2.loads(payload)
    except Exception as e:
        raise ProtocolError(f"envelope not CBOR: {e}")
    _check_map(env, "envelope") if "envelope" in REQUIRED else None
    for k, typ in (("v", int), ("kind", str), ("body", bytes), ("crc", int), ("auth", bytes)):
        if not isinstance(env.get(k), typ):
            raise ProtocolError(f"envelope field {k} missing or wrong type")
    if env["v"] != 1:
        raise ProtocolError(f"v = {env['v']}")
    if crc32(env["body"]) != env["crc"]:
        raise ProtocolError("crc mismatch")
    if env["kind"] != expected_kind:
        raise ProtocolError(f"kind {env['kind']!r}, expected {expected_kind!r}")
    if not ecdsa_verify(manager_pub, env["auth"], tbs(env["kind"], env["body"])):
        signer = env.get("signer")
        if signer is None or take_signer is None:
            raise ProtocolError("manager signature does not verify")
        try:
            cert = take_signer(signer)
        except Exception as e:
            raise ProtocolError(f"signer refused: {e}")
        if not ecdsa_verify(cert.public_key(), env["auth"], tbs(env["kind"], env["body"])):
            raise ProtocolError("signature does not verify with the signer's key")
        env["_learned"] = cert
    try:
        body = cbor2.loads(env["body"])
    except Exception as e:
        raise ProtocolError(f"body not CBOR: {e}")
    typ = body_type(expected_kind)
    _check_map(body, typ)
    if body["device_id"] != device_id:
        raise ProtocolError(f"device_id {body['device_id']!r} is not ours")
    return env, body


REQUIRED["envelope"] = {"v", "kind", "body", "crc", "auth"}


def check_notice(change: dict, device_id: str, last_seq: int):
    """§6.3 points 2-4. Returns None if acceptable, else the reason."""
    try:
        _check_map(change, "service_change")
    except ProtocolError as e:
        return str(e)
    if change["device_id"] != device_id:
        return "device_id is not ours"
    if not isinstance(change["seq"], int) or change["seq"] <= last_seq:
        return f"seq {change['seq']} <= last accepted {last_seq}"
    if not valid_service_id(change["service_id"]):
        return "invalid service_id"
    if "endpoint" in change and not valid_endpoint(change["endpoint"]):
        return "invalid endpoint"
    return None


def now_ms():
    return int(time.time() * 1000)
