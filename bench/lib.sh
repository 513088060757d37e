# Shared by the bench scripts (sourced, from the repository's root). They set $bin (the
# binaries) and call `scratch` before the rest.

# Makes the scratch directory $work (/var/tmp/NAME.*) and the array pids; on exit the
# processes in pids are killed and $work is removed (kept with BENCH_KEEP=1).
scratch() {
  work=$(mktemp -d "/var/tmp/$1.XXXXXX")
  pids=()
  trap bench_cleanup EXIT
}

bench_cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${BENCH_KEEP:-}" ] || rm -rf "$work"
}

# A free loopback TCP port.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Waits until something listens on loopback port $1 (10 s at most).
wait_port() {
  for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.05; done
  echo "nothing listens on $1" >&2
  exit 1
}

# Starts a throwaway registry (kiln-testenv), sets $addr to it and pushes base:1 there.
start_registry() {
  "$bin/kiln-testenv" registry >"$work/registry.addr" &
  pids+=($!)
  for _ in $(seq 1 100); do [ -s "$work/registry.addr" ] && break; sleep 0.1; done
  addr=$(head -n1 "$work/registry.addr")
  [ -n "$addr" ] || { echo "the registry did not start" >&2; exit 1; }
  "$bin/kiln-testenv" push-base "$addr" base:1 >/dev/null
}

# Starts worker w0 (plaintext, root $work/w0) on $wport and a gateway in front of it on
# $gport, and waits for both.
start_worker_and_gateway() {
  wport=$(free_port)
  gport=$(free_port)
  "$bin/kiln-worker" --root "$work/w0" --addr "tcp://127.0.0.1:$wport" --insecure-tcp --worker-id w0 --log warn 2>"$work/w0.log" &
  pids+=($!)
  wait_port "$wport"
  "$bin/kiln-gateway" --addr "tcp://127.0.0.1:$gport" --insecure-tcp --workers "w0=tcp://127.0.0.1:$wport" --log warn 2>"$work/gw.log" &
  pids+=($!)
  wait_port "$gport"
}
