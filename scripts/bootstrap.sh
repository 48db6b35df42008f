#!/usr/bin/env bash
# tokenbridge bootstrap for a fresh Debian/Ubuntu machine.
#   bash scripts/bootstrap.sh serve   # install, create the demo token on first run, start on 127.0.0.1:8155
#   bash scripts/bootstrap.sh test    # install, run the whole test suite
#   bash scripts/bootstrap.sh bench   # install, run the benchmarks (bench/, prints a table)
#   bash scripts/bootstrap.sh install # install only
# Installs apt packages (softhsm2, opensc, NSS tools, python3-venv...) with sudo when not root,
# a virtualenv in .venv, and the package with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${TOKENBRIDGE_VENV:-$ROOT/.venv}
# Everything the service and the tests use, including what a minimal Debian root lacks: e2fsprogs (chattr)
# and util-linux (prlimit) for the store's fault tests, ca-certificates for pip behind a TLS-inspecting proxy.
# postfix, dovecot-imapd and swaks (with libnet-ssleay-perl for its STARTTLS) are the mail gateway's test peers
# (tests/mailpeers.py starts its own instances; the system's are neither configured nor used). gpgsm only
# recommends gpg-agent, which it cannot work without (Debian 12; 13 depends on it).
# postgresql is the shared state store's test peer (issue 18; tests/pg.py makes its own cluster, never the system's).
# haproxy is the front of several hubs (deploy/haproxy; tests/test_haproxy.py runs its own; the system's listens on
# no port: the package's configuration has no frontend).
APT_PACKAGES=(python3 python3-venv python3-dev gcc openssl softhsm2 opensc libnss3-tools gpgsm curl libp11-kit-dev
              chromium nginx e2fsprogs util-linux procps ca-certificates
              postfix dovecot-imapd swaks libnet-ssleay-perl gpg-agent postgresql haproxy)

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

install_apt() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  say "installing apt packages: ${missing[*]}"
  # Postfix's package asks how to configure the system's mail server: not at all (no main.cf, nothing started).
  echo "postfix postfix/main_mailer_type select No configuration" | $sudo debconf-set-selections
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  # PostgreSQL's package makes and starts a system cluster ("main") unless told not to: the tests need none.
  if printf '%s\n' "${missing[@]}" | grep -qx postgresql; then
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql-common >/dev/null
    $sudo sed -i 's/^#*\s*create_main_cluster\s*=.*/create_main_cluster = false/' \
      /etc/postgresql-common/createcluster.conf
  fi
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

install_venv() {
  local py=${PYTHON:-python3}
  if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "tokenbridge needs Python >= 3.11; $py is $("$py" --version 2>&1). Install one (e.g. python3.11) and" \
         "run again with PYTHON=python3.11" >&2
    exit 1
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtualenv $VENV"
    "$py" -m venv "$VENV"
  fi
  local stamp="$VENV/.tokenbridge-installed"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    say "installing tokenbridge and its test tools into $VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
    "$VENV/bin/python" -m pip install -q -e ".[test]"
    touch "$stamp"
  fi
}

cmd=${1:-serve}
install_apt
install_venv
TB="$VENV/bin/tokenbridge"

case "$cmd" in
  install) ;;
  serve)
    DIR=${TOKENBRIDGE_DEMO_DIR:-${XDG_DATA_HOME:-$HOME/.local/share}/tokenbridge/demo}
    "$TB" softhsm init "$DIR"
    CONFIG="$DIR/tokenbridge.toml"
    # A fresh secret for the quickstart client at every start: secrets are stored only as hashes.
    SECRET=$("$TB" clients rotate quickstart --json -c "$CONFIG" 2>/dev/null \
             || "$TB" clients add quickstart --grant sign,decrypt --json -c "$CONFIG")
    SECRET=$(printf '%s' "$SECRET" | "$VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["secret"])')
    PORT=${TOKENBRIDGE_SERVER__PORT:-8155}
    cat <<MSG

  tokenbridge demo: token in $DIR
  API key (client "quickstart", shown once):  $SECRET

  Try it from another terminal:
    curl -s -H "Authorization: Bearer $SECRET" http://127.0.0.1:$PORT/v1/keys
    curl -s -H "Authorization: Bearer $SECRET" -H 'Content-Type: application/json' \\
         -d '{"algorithm": "rsa-pkcs1v15-sha256", "data": "'"\$(printf hello | base64)"'"}' \\
         http://127.0.0.1:$PORT/v1/keys/sign-rsa/sign
  API docs: http://127.0.0.1:$PORT/docs

MSG
    exec "$TB" serve --config "$CONFIG"
    ;;
  test)
    shift || true
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  bench)
    # Benchmarks (not part of the tests): wrk as load generator, libp11's engine for the openssl reference.
    APT_PACKAGES=(wrk libengine-pkcs11-openssl)
    install_apt
    shift || true
    exec "$VENV/bin/python" -m bench "$@"
    ;;
  *) echo "usage: $0 serve|test|bench|install" >&2; exit 2 ;;
esac
