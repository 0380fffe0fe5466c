#!/usr/bin/env python3
"""Traffic probes for scripts/impair.sh selftest (Python 3 standard library only).

  udp-recv  --port P --ready FILE [--idle S] [--timeout S]   prints a JSON line on exit
  udp-send  --host H --port P [--count N] [--interval-ms MS] [--size B]
  tcp-serve --port P --ready FILE [--timeout S]               sends until the peer closes
  tcp-recv  --host H --port P [--seconds S]                   prints a JSON line

Every loop is bounded by a count or a deadline.
"""
import argparse
import json
import socket
import struct
import sys
import time


def udp_recv(a):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind(("0.0.0.0", a.port))
    open(a.ready, "w").close()
    deadline = time.monotonic() + a.timeout
    seen, received, out_of_order, dup, last = set(), 0, 0, 0, -1
    s.settimeout(a.idle_first)
    while time.monotonic() < deadline:
        try:
            data, _ = s.recvfrom(65536)
        except socket.timeout:
            break
        s.settimeout(a.idle)
        if len(data) < 8:
            continue
        (seq,) = struct.unpack("!Q", data[:8])
        if seq == 0xFFFFFFFFFFFFFFFF:  # end marker: stop after a short grace
            s.settimeout(0.5)
            continue
        received += 1
        if seq in seen:
            dup += 1
        seen.add(seq)
        if seq < last:
            out_of_order += 1
        last = max(last, seq)
    print(json.dumps({"received": received, "unique": len(seen), "out_of_order": out_of_order,
                      "duplicates": dup, "max_seq": last}))


def udp_send(a):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    pad = b"x" * max(0, a.size - 8)
    start = time.monotonic()
    for i in range(a.count):
        s.sendto(struct.pack("!Q", i) + pad, (a.host, a.port))
        # pace against the clock, not by accumulated sleeps
        wait = start + (i + 1) * a.interval_ms / 1000.0 - time.monotonic()
        if wait > 0:
            time.sleep(wait)
    for _ in range(20):  # end markers, some may be lost
        s.sendto(struct.pack("!Q", 0xFFFFFFFFFFFFFFFF), (a.host, a.port))
        time.sleep(0.005)
    print(json.dumps({"sent": a.count, "seconds": round(time.monotonic() - start, 3)}))


def tcp_serve(a):
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", a.port))
    ls.listen(1)
    ls.settimeout(a.timeout)
    open(a.ready, "w").close()
    try:
        c, _ = ls.accept()
    except socket.timeout:
        print(json.dumps({"error": "no connection"}))
        return
    c.settimeout(a.timeout)
    chunk = b"\0" * 65536
    sent = 0
    deadline = time.monotonic() + a.timeout
    try:
        while time.monotonic() < deadline:
            sent += c.send(chunk)
    except OSError:
        pass
    print(json.dumps({"sent": sent}))


def tcp_recv(a):
    t0 = time.monotonic()
    c = None
    for _ in range(100):  # the server may still be starting
        try:
            c = socket.create_connection((a.host, a.port), timeout=5)
            break
        except OSError:
            time.sleep(0.1)
    if c is None:
        print(json.dumps({"error": "connect failed"}))
        sys.exit(1)
    t_conn = time.monotonic()
    c.settimeout(1.0)
    got, t_first = 0, None
    end = t_conn + a.seconds
    while time.monotonic() < end:
        try:
            d = c.recv(262144)
        except socket.timeout:
            continue
        if not d:
            break
        if t_first is None:
            t_first = time.monotonic()
        got += len(d)
    t_end = time.monotonic()
    c.close()
    secs = t_end - t_conn
    print(json.dumps({"bytes": got, "seconds": round(secs, 3),
                      "connect_ms": round((t_conn - t0) * 1000, 1),
                      "mbit_s": round(got * 8 / secs / 1e6, 3)}))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("udp-recv")
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--ready", required=True)
    r.add_argument("--idle-first", type=float, default=15.0)
    r.add_argument("--idle", type=float, default=3.0)
    r.add_argument("--timeout", type=float, default=60.0)
    s = sub.add_parser("udp-send")
    s.add_argument("--host", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--count", type=int, default=2000)
    s.add_argument("--interval-ms", type=float, default=0.5)
    s.add_argument("--size", type=int, default=200)
    t = sub.add_parser("tcp-serve")
    t.add_argument("--port", type=int, required=True)
    t.add_argument("--ready", required=True)
    t.add_argument("--timeout", type=float, default=30.0)
    c = sub.add_parser("tcp-recv")
    c.add_argument("--host", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--seconds", type=float, default=5.0)
    a = p.parse_args()
    {"udp-recv": udp_recv, "udp-send": udp_send, "tcp-serve": tcp_serve, "tcp-recv": tcp_recv}[a.cmd](a)


if __name__ == "__main__":
    main()
