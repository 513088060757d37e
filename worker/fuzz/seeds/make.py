#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpora (seeds/<target>/*); run from worker/fuzz/seeds."""
import gzip, hashlib, io, os, tarfile

def w(target, name, data):
    os.makedirs(target, exist_ok=True)
    with open(os.path.join(target, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())

# --- dockerfile_parse
w("dockerfile_parse", "multistage", """# syntax=docker/dockerfile:1
ARG BASE=busybox
FROM ${BASE} AS build
WORKDIR /src
COPY --chown=1:1 . .
RUN --mount=type=cache,id=../x,target=/c --mount=type=bind,source=../..,target=/m echo hi > /out
FROM scratch
COPY --from=build /out /
ENV A=1 B="two words"
ENTRYPOINT ["/out"]
""")
w("dockerfile_parse", "heredoc", """FROM busybox
RUN <<EOF bash <<-'TWO'
echo one
EOF
\techo two
\tTWO
COPY <<A <<B /dst/
a
A
b
B
""")
w("dockerfile_parse", "onbuild", """#trigger RUN echo from trigger
FROM busybox
ONBUILD COPY . /app
LABEL a=b \\
  c=d
HEALTHCHECK --interval=5s CMD true
""")

# --- dockerignore
w("dockerignore", "basic", "*.key\n!keep.key\nnode_modules\n**/*.tmp\n# comment\n../x\n/abs\n")
w("dockerignore", "classes", "[a-c]?.txt\n\\!literal\ndir/**/\n!dir/sub/**\n*\n")

# --- llb_decode: protobuf by hand (ops.proto field numbers)
def varint(n):
    out = b""
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])

def field(num, wire, payload):
    key = varint((num << 3) | wire)
    if wire == 2:
        return key + varint(len(payload)) + payload
    return key + varint(payload)

def s(num, text):
    return field(num, 2, text.encode() if isinstance(text, str) else text)

def digest(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()

def inp(d, index=0):
    return s(1, s(1, d) + (field(2, 0, index) if index else b""))

def definition(ops):
    return b"".join(s(1, op) for op in ops)

NEG1 = (1 << 64) - 1
src = s(3, s(1, "docker-image://localhost:5000/base:1"))
local = s(3, s(1, "local://context") + s(2, s(1, "local.excludes") + s(2, '["*.key"]')))
meta = s(1, s(1, "/bin/sh") + s(1, "-c") + s(1, "echo hi") + s(2, "PATH=/bin") + s(3, "/"))
root_mount = s(2, field(1, 0, 0) + s(3, "/") + field(4, 0, 0))
cache_mount = s(2, field(1, 0, NEG1) + s(3, "/c") + field(4, 0, NEG1)
                + field(6, 0, 3) + s(20, s(1, "../x")))
bind_mount = s(2, field(1, 0, 1) + s(2, "../..") + s(3, "/m") + field(4, 0, NEG1)
               + field(5, 0, 1))
exec_ = inp(digest(src)) + inp(digest(local)) + s(2, s(1, meta) + root_mount + cache_mount + bind_mount)
copy = s(4, s(2, field(1, 0, 0) + field(2, 0, 1) + field(3, 0, 0)
              + s(4, s(1, "/../etc") + s(2, "/dst/") + field(9, 0, 1) + field(8, 0, 1))))
fileop = inp(digest(exec_)) + inp(digest(local)) + copy
mkfile = s(4, s(2, field(1, 0, NEG1) + field(3, 0, 0)
                + s(5, s(1, "/f") + field(2, 0, 0o644) + s(3, "data"))))
w("llb_decode", "source_only", definition([src, inp(digest(src))]))
w("llb_decode", "exec_mounts", definition([src, local, exec_, inp(digest(exec_))]))
w("llb_decode", "file_copy", definition([src, local, exec_, fileop, inp(digest(fileop))]))
w("llb_decode", "mkfile_scratch", definition([mkfile, inp(digest(mkfile))]))
w("llb_decode", "dangling_input", definition([exec_, inp(digest(exec_))]))

# --- fsutil_packet: bytes read by arbitrary::Unstructured (any bytes are valid)
w("fsutil_packet", "zeros", bytes(64))
w("fsutil_packet", "ramp", bytes(range(256)))
w("fsutil_packet", "mixed", bytes([0, 0, 1, 5, 2, 7, 0, 3, 9, 1, 1, 0, 2, 4, 0, 3] * 8))

# --- layer_unpack: layer tars
def tar(entries, fmt=tarfile.PAX_FORMAT):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for name, kind, arg in entries:
            ti = tarfile.TarInfo(name)
            ti.mtime = 1704067200
            if kind == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                t.addfile(ti)
            elif kind == "file":
                ti.size, ti.mode = len(arg), 0o644
                t.addfile(ti, io.BytesIO(arg))
            elif kind == "sym":
                ti.type, ti.linkname = tarfile.SYMTYPE, arg
                t.addfile(ti)
            elif kind == "hard":
                ti.type, ti.linkname = tarfile.LNKTYPE, arg
                t.addfile(ti)
            elif kind == "fifo":
                ti.type = tarfile.FIFOTYPE
                t.addfile(ti)
    return buf.getvalue()

plain = tar([("bin/", "dir", None), ("bin/tool", "file", b"#!/bin/sh\necho hi\n"),
             ("bin/alias", "hard", "bin/tool"), ("bin/sh", "sym", "tool"),
             ("etc/", "dir", None), ("etc/.wh.gone", "file", b""),
             ("etc/.wh..wh..opq", "file", b""), ("run/fifo", "fifo", None)])
w("layer_unpack", "plain.tar", plain)
w("layer_unpack", "plain.tar.gz", gzip.compress(plain, mtime=0))
w("layer_unpack", "escapes.tar", tar([("abs", "sym", "/"), ("up", "sym", "../../.."),
                                      ("abs/x", "file", b"x"), ("h", "hard", "/etc/passwd")]))
w("layer_unpack", "gnu.tar", tar([("d/" + "n" * 120, "file", b"long name"),
                                  ("l", "sym", "t" * 120)], tarfile.GNU_FORMAT))
