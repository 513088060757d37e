#!/usr/bin/env python3
"""Run an image from an OCI image tarball under runc, as `docker run IMAGE ARGS…` would.

Usage: run-image.py IMAGE.tar WORKDIR [ARGS…]

Unpacks the image's layers in order (applying OCI whiteouts) into WORKDIR/bundle/rootfs,
writes a runtime spec from `runc spec` with the image config's Entrypoint + ARGS (or Cmd when
no ARGS), User, Env and WorkingDir, runs it with runc and exits with the container's status.
The container's output goes to this process's stdout/stderr.
"""
import json
import os
import shutil
import subprocess
import sys
import tarfile


def blob(oci, digest):
    algo, hexpart = digest.split(":", 1)
    return os.path.join(oci, "blobs", algo, hexpart)


def load_json(oci, digest):
    with open(blob(oci, digest), "rb") as f:
        return json.load(f)


def unpack_layer(path, rootfs):
    with tarfile.open(path, "r:*") as tar:
        for m in tar:
            name = os.path.normpath(m.name.lstrip("/"))
            if name.startswith(".."):
                sys.exit(f"layer {path}: entry {m.name!r} escapes the root")
            parent, base = os.path.split(name)
            if base == ".wh..wh..opq":
                d = os.path.join(rootfs, parent)
                if os.path.isdir(d):
                    for e in os.listdir(d):
                        p = os.path.join(d, e)
                        shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
                continue
            if base.startswith(".wh."):
                p = os.path.join(rootfs, parent, base[4:])
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p)
                elif os.path.lexists(p):
                    os.remove(p)
                continue
            target = os.path.join(rootfs, name)
            if os.path.lexists(target) and not (m.isdir() and os.path.isdir(target)):
                shutil.rmtree(target) if os.path.isdir(target) and not os.path.islink(target) else os.remove(target)
            tar.extract(m, rootfs, numeric_owner=True, filter="tar")


def user_ids(rootfs, user):
    if not user:
        return 0, 0
    name, _, group = user.partition(":")

    def lookup(file, key):
        try:
            with open(os.path.join(rootfs, "etc", file)) as f:
                for line in f:
                    fields = line.strip().split(":")
                    if len(fields) > 3 and fields[0] == key:
                        return fields
        except FileNotFoundError:
            pass
        sys.exit(f"image user {user!r}: {key!r} is not in /etc/{file}")

    if name.isdigit():
        uid, gid = int(name), int(name)
    else:
        fields = lookup("passwd", name)
        uid, gid = int(fields[2]), int(fields[3])
    if group:
        gid = int(group) if group.isdigit() else int(lookup("group", group)[2])
    return uid, gid


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    image, work, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    oci = os.path.join(work, "oci")
    bundle = os.path.join(work, "bundle")
    rootfs = os.path.join(bundle, "rootfs")
    os.makedirs(oci)
    os.makedirs(rootfs)
    with tarfile.open(image) as t:
        t.extractall(oci, filter="data")
    index = json.load(open(os.path.join(oci, "index.json")))
    desc = index["manifests"][0]
    manifest = load_json(oci, desc["digest"])
    if "manifests" in manifest:  # an index inside: take the first image
        manifest = load_json(oci, manifest["manifests"][0]["digest"])
    config = load_json(oci, manifest["config"]["digest"]).get("config", {})
    for layer in manifest["layers"]:
        unpack_layer(blob(oci, layer["digest"]), rootfs)

    process_args = (config.get("Entrypoint") or []) + (args or config.get("Cmd") or [])
    if not process_args:
        sys.exit(f"{image}: the image has neither Entrypoint nor Cmd, and no ARGS were given")
    uid, gid = user_ids(rootfs, config.get("User", ""))
    subprocess.run(["runc", "spec", "--bundle", bundle], check=True)
    spec_path = os.path.join(bundle, "config.json")
    spec = json.load(open(spec_path))
    spec["process"]["terminal"] = False
    spec["process"]["args"] = process_args
    spec["process"]["env"] = config.get("Env") or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    spec["process"]["cwd"] = config.get("WorkingDir") or "/"
    spec["process"]["user"] = {"uid": uid, "gid": gid}
    spec["root"] = {"path": "rootfs", "readonly": True}
    json.dump(spec, open(spec_path, "w"))
    print(f"run-image: {image}: {process_args} as {uid}:{gid}", file=sys.stderr, flush=True)
    cid = "kiln-image-check-%d" % os.getpid()
    rc = subprocess.run(["runc", "--root", os.path.join(work, "runc"), "run", "--bundle", bundle, cid]).returncode
    sys.exit(rc)


if __name__ == "__main__":
    main()
