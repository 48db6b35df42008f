#!/usr/bin/env bash
# The README's first command, checked as a newcomer would: `bash scripts/bootstrap.sh serve`, then the two
# curl commands it prints, run as printed. Passes when they answer the demo token's three keys and a
# signature that openssl verifies, and the service then stops cleanly. Used by .ci/run on every system.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=$(mktemp -d)
trap 'kill -INT "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; rm -rf "$WORK"' EXIT
export TOKENBRIDGE_DEMO_DIR="$WORK/demo"

fail() { echo "check-serve: $*" >&2; echo "--- serve's output:" >&2; cat "$WORK/serve.log" >&2; exit 1; }

bash scripts/bootstrap.sh serve >"$WORK/serve.log" 2>&1 &
PID=$!

# The printed commands: each starts with "curl" and may continue on the next line (a trailing backslash).
for _ in $(seq 1 240); do
  grep -q 'API docs:' "$WORK/serve.log" && break
  kill -0 "$PID" 2>/dev/null || fail "serve exited before printing its commands"
  sleep 0.5
done
awk '/^ *curl /{cmd=$0; while (cmd ~ /\\$/ && (getline line) > 0) cmd = cmd "\n" line; print cmd > (FILENAME ".cmd" ++n)}' \
  "$WORK/serve.log"
[ -f "$WORK/serve.log.cmd1" ] && [ -f "$WORK/serve.log.cmd2" ] || fail "no curl commands printed"

# A newcomer runs them once the service has started: wait for the ready probe (no secret needed).
PORT=${TOKENBRIDGE_SERVER__PORT:-8155}
for _ in $(seq 1 120); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/v1/ready")" = 200 ] && break
  kill -0 "$PID" 2>/dev/null || fail "the service exited"
  sleep 0.5
done

keys=$(bash "$WORK/serve.log.cmd1") || fail "the first curl command failed"
labels=$(printf '%s' "$keys" | python3 -c 'import json,sys; print(" ".join(sorted(k["label"] for k in json.load(sys.stdin))))') \
  || fail "GET /v1/keys did not answer a list of keys: $keys"
[ "$labels" = "auth-ec encrypt-rsa sign-rsa" ] || fail "expected three keys, got: $keys"

signed=$(bash "$WORK/serve.log.cmd2") || fail "the second curl command failed"
printf '%s' "$signed" | python3 -c 'import base64,json,sys; sys.stdout.buffer.write(base64.b64decode(json.load(sys.stdin)["signature"]))' \
  >"$WORK/sig" || fail "no signature in: $signed"
printf hello >"$WORK/data"
openssl x509 -in "$TOKENBRIDGE_DEMO_DIR/pki/sign-rsa.pem" -pubkey -noout >"$WORK/pub.pem"
openssl dgst -sha256 -verify "$WORK/pub.pem" -signature "$WORK/sig" "$WORK/data" >/dev/null \
  || fail "the signature does not verify with the demo certificate"

kill -INT "$PID"
wait "$PID" || true
if grep -E 'ERROR|Traceback' "$WORK/serve.log" >&2; then fail "errors in the service's output"; fi
echo "check-serve: three keys and a verified signature from the printed commands; clean stop"
