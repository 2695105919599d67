# Sourced by the bench scripts that start a local cluster of `dserve serve` processes.
# Needs DSERVE (the binary) and WORK (a directory for logs). Every process it starts is killed
# when the script exits.
#   serve NAME ARGS...   starts `dserve serve ARGS...` (stdout NAME.out, stderr NAME.log) and
#                        waits for its "dserve: serving" line, which it leaves in NAME.out
#   address NAME         the first 127.0.0.1:PORT of that line (the control address)
#   grpc_address NAME    the gateway's gRPC address from that line
cluster_pids=()
cluster_cleanup() {
  for p in "${cluster_pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
}
trap cluster_cleanup EXIT

# Not to be called in a command substitution: the pid must reach this shell's list.
serve() {
  local name=$1
  shift
  "$DSERVE" serve "$@" >"$WORK/$name.out" 2>"$WORK/$name.log" &
  cluster_pids+=($!)
  for _ in $(seq 1 600); do
    if grep -q "^dserve: serving" "$WORK/$name.out" 2>/dev/null; then return; fi
    sleep 0.1
  done
  echo "$name did not start; its log:" >&2
  cat "$WORK/$name.log" >&2
  exit 1
}
address() { grep -m1 "^dserve: serving" "$WORK/$1.out" | grep -o '127\.0\.0\.1:[0-9]*' | head -1; }
grpc_address() {
  grep -m1 "^dserve: serving" "$WORK/$1.out" | grep -o 'grpc 127\.0\.0\.1:[0-9]*' | cut -d' ' -f2
}
