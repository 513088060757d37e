#!/usr/bin/env python3
"""Decodes a `sniff.py --raw` recording of one connection to a worker (a direct build) and
prints every HTTP/2 frame with its gRPC path, and, inside the Control.Session stream, the
frames of the HTTP/2 connection the session tunnels (the worker's calls to the client:
FileSync.DiffCopy, Auth.Credentials, ...), with times in ms. Shows which round trips to the
client a build waits for. Needs the `hpack` package (pip install hpack).

    inner.py RECORDING WORKER_PORT
"""
import sys

import hpack

TYPES = {0: "DATA", 1: "HEADERS", 2: "PRIORITY", 3: "RST", 4: "SETTINGS", 5: "PUSH",
         6: "PING", 7: "GOAWAY", 8: "WINUP", 9: "CONT"}
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def header_block(payload, flags):
    """The header block fragment of a HEADERS frame (padding and priority removed)."""
    if flags & 0x8:
        payload = payload[1:len(payload) - payload[0]]
    if flags & 0x20:
        payload = payload[5:]
    return payload


def frames(buf):
    """Complete frames at the start of buf, and the bytes left over."""
    out, i = [], 0
    while i + 9 <= len(buf):
        length = int.from_bytes(buf[i:i + 3], "big")
        if i + 9 + length > len(buf):
            break
        kind, flags = buf[i + 3], buf[i + 4]
        stream = int.from_bytes(buf[i + 5:i + 9], "big") & 0x7FFFFFFF
        out.append((kind, flags, stream, buf[i + 9:i + 9 + length]))
        i += 9 + length
    return out, buf[i:]


def describe(kind, flags, stream, payload, decoder, names):
    text = f"{TYPES.get(kind, kind)}:{stream}:{len(payload)}"
    if kind in (0, 1) and flags & 1:
        text += "E"
    if kind in (4, 6) and flags & 1:
        text += " ack"
    if kind == 1:
        try:
            for name, value in decoder.decode(header_block(payload, flags)):
                if name in (":path", ":status", "grpc-status"):
                    text += f" {name}={value}"
                    if name == ":path":
                        names[stream] = value
        except Exception as e:  # a fragment we cannot decode is shown, not fatal
            text += f" (hpack: {e})"
    return text


def main():
    rows = [line.split() for line in open(sys.argv[1])]
    worker = int(sys.argv[2])
    t0 = float(rows[0][0])
    outer = {}    # direction -> (pending bytes, hpack decoder)
    inner = {}    # direction -> (pending bytes, hpack decoder)
    grpc = {}     # direction -> pending gRPC bytes of the session stream
    names = {}    # outer stream -> gRPC path
    for ts, src, _, hexdata in rows:
        when = (float(ts) - t0) * 1e3
        way = "w->c" if int(src) == worker else "c->w"
        buf, dec = outer.get(way, (b"", hpack.Decoder()))
        buf += bytes.fromhex(hexdata)
        if buf.startswith(PREFACE):
            buf = buf[len(PREFACE):]
        done, buf = frames(buf)
        outer[way] = (buf, dec)
        for kind, flags, stream, payload in done:
            line = describe(kind, flags, stream, payload, dec, names)
            if kind != 0 or not names.get(stream, "").endswith("/Session"):
                print(f"{when:9.3f} {way} {line}")
                continue
            # Session DATA: gRPC messages (BytesMessage, field 1) carrying the inner bytes.
            data = grpc.get(way, b"") + payload
            while len(data) >= 5 and len(data) >= 5 + int.from_bytes(data[1:5], "big"):
                size = int.from_bytes(data[1:5], "big")
                msg, data = data[5:5 + size], data[5 + size:]
                j, n, shift = 1, 0, 0
                while j < len(msg):
                    n |= (msg[j] & 0x7F) << shift
                    shift += 7
                    j += 1
                    if msg[j - 1] < 0x80:
                        break
                ibuf, idec = inner.get(way, (b"", hpack.Decoder()))
                ibuf += msg[j:j + n]
                if ibuf.startswith(PREFACE):
                    print(f"{when:9.3f} {way}     session: PREFACE")
                    ibuf = ibuf[len(PREFACE):]
                idone, ibuf = frames(ibuf)
                inner[way] = (ibuf, idec)
                for f in idone:
                    print(f"{when:9.3f} {way}     session: {describe(*f, idec, {})}")
            grpc[way] = data


if __name__ == "__main__":
    main()
