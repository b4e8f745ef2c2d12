#!/usr/bin/env python3
"""The registered devices of scripts/bench-flood, driven through the Python
device (testkit/python-device) while the request flood runs.

  bench-flood-legit.py poll --state DIR --certs DIR --service-addr HOST:PORT --seconds N --out CSV
      One `poll` a second in the device's tenant over mutual TLS, each sent
      on time whether or not the last was answered. A poll unanswered after
      --timeout (10 s, as the reference device waits) counts as a timeout.
      CSV, one row per poll: send_unix, result (ok, another status name,
      or timeout), latency_ms (also for a reply that came after the
      timeout; empty when none came).

  bench-flood-legit.py activate --state DIR --certs DIR --bootstrap HOST:PORT --deadline S
      Activates over the TLS bootstrap listener, a fresh request each
      attempt. After busy, rate_limited or internal, or no reply within
      --timeout, it pauses 1 s doubling to 30 s, jittered by up to half
      (topics.md §5.1), and tries again until it is activated, gets
      another status, or --deadline seconds have passed. Prints one JSON
      line.

Progress goes to stderr.
"""
import argparse
import csv
import json
import os
import queue
import random
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "testkit", "python-device"))
import device  # noqa: E402
import proto  # noqa: E402

RETRIED = ("busy", "rate_limited", "internal", "timeout", "error")


def say(*a):
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def poll(a):
    d = device.Device(a.state, a.certs, service_addr=device.hostport(a.service_addr))
    d.connect_service()
    topic = proto.request_topic("poll", d.id, d.tenant)
    reply_topic = topic + "/reply"
    polls = {}  # nonce -> [send_unix, status name, latency ms]
    lock = threading.Lock()
    stop = threading.Event()

    def take_replies():
        while not stop.is_set():
            conn = d.conn
            if conn is None:
                time.sleep(0.05)
                continue
            try:
                t, payload = conn.msgs.get(timeout=0.2)
            except queue.Empty:
                continue
            received = time.time()
            if t != reply_topic:
                continue
            try:
                _, body = proto.open_manager_message(payload, "poll_reply", d.mpub, d.id)
            except proto.ProtocolError as e:
                say(f"poll reply refused: {e}")
                continue
            with lock:
                p = polls.get(body["nonce"])
                if p is not None and p[1] is None:
                    p[1] = proto.STATUS.get(body["status"], "unknown")
                    p[2] = (received - p[0]) * 1000

    reader = threading.Thread(target=take_replies, daemon=True)
    reader.start()
    start = time.time()
    reconnects = 0
    for n in range(int(a.seconds)):
        time.sleep(max(0.0, start + n - time.time()))
        if d.conn is None or d.conn.disconnected.is_set():
            say("service connection lost; reconnecting")
            reconnects += 1
            try:
                d.connect_service()
            except Exception as e:  # counted as timeouts: the polls go unanswered
                say(f"reconnect failed: {e!r}")
                d.conn = None
        fields = d.base(d.st["service_id"])
        payload, _ = proto.build("poll", fields, d.hmac())
        with lock:
            polls[fields["nonce"]] = [time.time(), None, None]
        if d.conn is not None:
            d.conn.c.publish(topic, payload, qos=1)
    time.sleep(a.timeout)
    stop.set()
    reader.join()
    d.disconnect()
    with open(a.out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["send_unix", "result", "latency_ms"])
        for sent, status, latency in sorted(polls.values(), key=lambda p: p[0]):
            late = latency is None or latency > a.timeout * 1000
            w.writerow([f"{sent:.3f}", "timeout" if late else status,
                        "" if latency is None else f"{latency:.1f}"])
    say(f"{len(polls)} polls written to {a.out}; {reconnects} reconnects")


def activate(a):
    d = device.Device(a.state, a.certs, bootstrap=device.hostport(a.bootstrap))
    start = time.time()
    attempts = []
    backoff = 1.0
    activated = False
    while time.time() - start < a.deadline:
        t0 = time.time()
        try:
            if d.conn is None or d.conn.disconnected.is_set():
                d.connect_bootstrap()
            eph = proto.new_key()
            fields = d.base(None, eph=proto.point(eph))
            r = d.send("activate", fields, tenant=None, signer=proto.ecdsa_signer(d.factory_key()),
                       timeout=a.timeout, tries=1)
            outcome = r.status_name if r else "timeout"
        except Exception as e:  # no CONNACK, SUBACK or PUBACK in time: try again later
            say(f"attempt {len(attempts) + 1}: {e!r}")
            outcome = "error"
            d.disconnect()
        attempts.append({"at_s": round(t0 - start, 1), "result": outcome,
                         "ms": round((time.time() - t0) * 1000)})
        say(f"attempt {len(attempts)}: {outcome} after {attempts[-1]['ms']} ms")
        if outcome == "ok":
            uuid = proto.unseal(eph, d.id, r.body["uuid"])
            d.st["uuid"] = uuid.hex()
            d.st["service_id"] = r.body["service_id"]
            d.save()
            activated = True
            break
        if outcome not in RETRIED:
            break
        left = a.deadline - (time.time() - start)
        if left <= 0:
            break
        time.sleep(min(left, backoff * random.uniform(1.0, 1.5)))
        backoff = min(30.0, backoff * 2)
    d.disconnect()
    print(json.dumps({
        "device_id": d.id,
        "activated": activated,
        "seconds": round(time.time() - start, 1) if activated else None,
        "attempts": attempts,
    }))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["poll", "activate"])
    ap.add_argument("--state", required=True, help="device state directory (device.py keygen)")
    ap.add_argument("--certs", required=True, help="the manager's certs directory")
    ap.add_argument("--service-addr", help="poll: HOST:PORT of the mutual-TLS service listener")
    ap.add_argument("--bootstrap", help="activate: HOST:PORT of the TLS bootstrap listener")
    ap.add_argument("--seconds", type=float, default=100, help="poll: how long to poll")
    ap.add_argument("--deadline", type=float, default=120, help="activate: give up after this long")
    ap.add_argument("--timeout", type=float, default=10, help="seconds to wait for a reply")
    ap.add_argument("--out", help="poll: the CSV to write")
    a = ap.parse_args()
    device.LOG = False
    if a.cmd == "poll":
        if not (a.service_addr and a.out):
            ap.error("poll needs --service-addr and --out")
        poll(a)
    else:
        if not a.bootstrap:
            ap.error("activate needs --bootstrap")
        activate(a)


if __name__ == "__main__":
    main()
