#!/usr/bin/env python3
"""Splits a sniff.py recording of interleaved no-op builds (direct to the worker and through
the gateway) into builds and prints the median length of each phase on both paths:

  start        first packet -> the worker opens its first FileSync streams on the session
  worker work  -> the worker answers the client's LLBBridge.Solve (session round trips,
                  image resolution, the solve)
  return       -> the worker's last packet (Return and the Control.Solve answer)
  end          -> the last packet of the build

    phases.py RECORDING WORKER_PORT GATEWAY_PORT
"""
import statistics
import sys


def main():
    path, w, g = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rows = [line.split() for line in open(path)]
    builds, cur, last = [], [], None
    for r in rows:
        t = float(r[0])
        if last is not None and t - last > 0.1:
            builds.append(cur)
            cur = []
        cur.append(r)
        last = t
    builds.append(cur)
    res = {"direct": [], "gateway": []}
    for b in builds:
        if len(b) < 20:
            continue
        via = any(int(r[1]) == g or int(r[2]) == g for r in b)

        def first(pred):
            return next((float(r[0]) for r in b if pred(r)), None)

        from_worker = lambda r: int(r[1]) == w
        t0 = float(b[0][0])
        # The session: the stream on which the worker sends the most DATA frames (the
        # gateway may open the Solve's stream first). The worker's first FileSync opens
        # inside it are its first message there of 100 bytes or more.
        counts = {}
        for r in b:
            if from_worker(r):
                for f in r[4:]:
                    if f.startswith("DATA:"):
                        sid = f.split(":")[1]
                        counts[sid] = counts.get(sid, 0) + 1
        sess = max(counts, key=counts.get) if counts else None
        p1 = first(lambda r: from_worker(r) and any(
            f.startswith(f"DATA:{sess}:") and int(f.split(":")[2].rstrip("E")) >= 100 for f in r[4:]))
        # Its answer to LLBBridge.Solve (a 404-byte message for this Dockerfile).
        p2 = first(lambda r: from_worker(r) and any(f.startswith("DATA") and f.endswith(":404") for f in r[4:]))
        p3 = max(float(r[0]) for r in b if from_worker(r))
        end = float(b[-1][0])
        if p1 is None or p2 is None:
            continue
        res["gateway" if via else "direct"].append(
            [(p1 - t0) * 1e3, (p2 - p1) * 1e3, (p3 - p2) * 1e3, (end - p3) * 1e3, (end - t0) * 1e3])
    print(f"builds: {len(res['direct'])} direct, {len(res['gateway'])} through the gateway (ms, medians)")
    for i, name in enumerate(["start", "worker work", "return", "end", "total"]):
        d = statistics.median(x[i] for x in res["direct"])
        gw = statistics.median(x[i] for x in res["gateway"])
        print(f"{name:12} direct {d:7.2f}  gateway {gw:7.2f}  added {gw - d:6.2f}")


if __name__ == "__main__":
    main()
