#!/usr/bin/env python3
"""Records the TCP payloads on loopback to or from the given ports, one line each:
kernel timestamp, source port, destination port, payload length and the HTTP/2 frames that
start in it (TYPE:STREAM:LENGTH, E when END_STREAM). Root (AF_PACKET). Stops on SIGTERM.
With --raw the fourth field is the payload itself, in hex (for inner.py).

    sniff.py [--raw] PORT[,PORT...] OUT_FILE
"""
import signal
import socket
import struct
import sys
import time

SO_TIMESTAMPNS = 35
FRAME_TYPES = {0: "DATA", 1: "HEADERS", 2: "PRIORITY", 3: "RST", 4: "SETTINGS",
               5: "PUSH", 6: "PING", 7: "GOAWAY", 8: "WINUP", 9: "CONT"}


def frames(payload):
    out, i = [], 0
    while i + 9 <= len(payload):
        length = int.from_bytes(payload[i:i + 3], "big")
        kind, flags = payload[i + 3], payload[i + 4]
        stream = int.from_bytes(payload[i + 5:i + 9], "big") & 0x7FFFFFFF
        if kind > 9:
            break  # not at a frame boundary (a continued frame)
        end = "E" if kind in (0, 1) and flags & 1 else ""
        out.append(f"{FRAME_TYPES[kind]}:{stream}:{length}{end}")
        i += 9 + length
    return out


def main():
    args = sys.argv[1:]
    raw = args[:1] == ["--raw"]
    if raw:
        args = args[1:]
    ports = {int(p) for p in args[0].split(",")}
    out = open(args[1], "w")
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(3))
    s.bind(("lo", 0))
    s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    signal.signal(signal.SIGTERM, lambda *_: (out.close(), sys.exit(0)))
    while True:
        data, anc, _, addr = s.recvmsg(65600, 64)
        if addr[2] == socket.PACKET_OUTGOING:
            continue  # loopback shows each packet twice
        ts = time.time()
        for level, kind, d in anc:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                sec, ns = struct.unpack("qq", d[:16])
                ts = sec + ns / 1e9
        ip = data[14:]
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 6:
            continue
        ihl = (ip[0] & 15) * 4
        tcp = ip[ihl:]
        sport, dport = struct.unpack("!HH", tcp[:4])
        if sport not in ports and dport not in ports:
            continue
        total = struct.unpack("!H", ip[2:4])[0]
        payload = ip[ihl + (tcp[12] >> 4) * 4:total]
        if payload:
            if raw:
                out.write(f"{ts:.6f} {sport} {dport} {payload.hex()}\n")
            else:
                out.write(f"{ts:.6f} {sport} {dport} {len(payload)} {' '.join(frames(payload))}\n")
            out.flush()


if __name__ == "__main__":
    main()
