#!/usr/bin/env bash
# Fresh Debian roots to run the README's commands in, as on a new install (used by .ci/run).
#
#   bash scripts/debian-root.sh build SUITE DIR     # debootstrap --variant=minbase SUITE into DIR (cached)
#   bash scripts/debian-root.sh run DIR REPO CMD... # clone REPO into DIR/root/tokenbridge, run CMD there
#   bash scripts/debian-root.sh run --bind DIR REPO CMD...  # the same on REPO itself (for development:
#                                                   # edit on the host, test in the root; use a venv of
#                                                   # the root's own, e.g. TOKENBRIDGE_VENV=/root/venv)
#
# A root gets what a real install has and a minimal root lacks (/etc/hosts with localhost), and what
# this machine's network needs to reach the same mirrors: its apt sources (mirror URIs, with SUITE), its
# apt settings, its CA certificates and pip's settings. Nothing else is copied from the host.
# Roots are cached under $TOKENBRIDGE_ROOT_CACHE (default /var/cache/tokenbridge-roots) as a tarball of
# the pristine debootstrap result; each build starts from a copy of it, so every run is a fresh system.
# Needs root (debootstrap, chroot, mount namespaces).
set -euo pipefail
CACHE=${TOKENBRIDGE_ROOT_CACHE:-/var/cache/tokenbridge-roots}

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# The host's Debian mirror, read from its apt sources (deb822 or one-line form).
host_mirror() {
  local uri
  uri=$(grep -h -E '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' \
        | grep -v security | head -n1 || true)
  [ -n "$uri" ] || uri=$(grep -h -E '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' \
        | grep -v security | head -n1 || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

host_security_mirror() {
  local uri
  uri=$(grep -h -E '^URIs:' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
        | awk '{print $2}' | grep security | head -n1 || true)
  echo "${uri:-http://deb.debian.org/debian-security}"
}

build() {
  local suite=$1 dir=$2 tarball="$CACHE/$1-minbase.tar"
  command -v debootstrap >/dev/null || {
    say "installing debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
  }
  mkdir -p "$CACHE"
  if [ ! -s "$tarball" ]; then
    say "debootstrap $suite (minbase) from $(host_mirror)"
    local tmp
    tmp=$(mktemp -d "$CACHE/$suite.XXXXXX")
    debootstrap --variant=minbase "$suite" "$tmp" "$(host_mirror)" >"$tmp.log" 2>&1 \
      || { tail -n 30 "$tmp.log" >&2; rm -rf "$tmp"; exit 1; }
    rm -f "$tmp.log"
    tar -C "$tmp" -cf "$tarball.part" . && mv "$tarball.part" "$tarball"
    rm -rf "$tmp"
  fi
  rm -rf "$dir" && mkdir -p "$dir"
  tar -C "$dir" -xf "$tarball"
  chmod 755 "$dir"  # the tarball keeps mktemp's 0700 for ./: an installed / is 755 (postfix and dovecot need it)
  configure "$suite" "$dir"
}

configure() {
  local suite=$1 dir=$2
  # What a real install has: a hosts file naming localhost, a hostname.
  printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$dir/etc/hosts"
  echo "tokenbridge-$suite" >"$dir/etc/hostname"
  # The host's mirrors, for this suite.
  rm -f "$dir/etc/apt/sources.list"
  cat >"$dir/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $(host_mirror)
Suites: $suite $suite-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $(host_security_mirror)
Suites: $suite-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  # The host's package-index settings (proxies, snapshot validity) and CA certificates (an egress proxy
  # may re-sign TLS), and pip's settings: what it takes to reach the same mirrors, nothing more.
  local f
  for f in /etc/apt/apt.conf.d/*; do
    case "$(basename "$f")" in
      *proxy*|*Proxy*|99artifact-registry|99farm-*) cp "$f" "$dir/etc/apt/apt.conf.d/" ;;
    esac
  done
  if grep -rqil 'Acquire::.*Proxy' /etc/apt/apt.conf.d/ 2>/dev/null; then
    grep -ril 'Acquire::.*Proxy' /etc/apt/apt.conf.d/ | xargs -r cp -t "$dir/etc/apt/apt.conf.d/"
  fi
  mkdir -p "$dir/usr/local/share/ca-certificates" "$dir/etc/ssl/certs"
  cp /usr/local/share/ca-certificates/*.crt "$dir/usr/local/share/ca-certificates/" 2>/dev/null || true
  [ -f /etc/ssl/certs/ca-certificates.crt ] && cp /etc/ssl/certs/ca-certificates.crt "$dir/etc/ssl/certs/"
  [ -f /etc/pip.conf ] && cp /etc/pip.conf "$dir/etc/pip.conf"
  true
}

# Run a command in the root, in its own mount and PID namespaces (the mounts vanish with it), with a
# clean environment, as root (like the README's user with sudo).
run() {
  local bind=""
  if [ "$1" = --bind ]; then bind=1; shift; fi
  local dir=$1 repo
  repo=$(cd "$2" && pwd)
  shift 2
  if [ -n "$bind" ]; then
    mkdir -p "$dir/root/tokenbridge"
  else
    rm -rf "$dir/root/tokenbridge"
    git clone -q "$repo" "$dir/root/tokenbridge"
  fi
  if [ -d "$repo/../shared" ]; then
    rm -rf "$dir/root/shared" && cp -a "$repo/../shared" "$dir/root/shared"
  fi
  unshare --mount --pid --fork --propagation private bash -c '
    set -e
    dir=$1; bind=$2; repo=$3; shift 3
    [ -z "$bind" ] || mount --bind "$repo" "$dir/root/tokenbridge"
    mount -t proc proc "$dir/proc"
    mount -t sysfs sysfs "$dir/sys" 2>/dev/null || mount --rbind /sys "$dir/sys"
    mount -t tmpfs -o mode=755 tmpfs "$dir/dev"
    for d in null zero full random urandom tty; do
      touch "$dir/dev/$d" && mount --bind "/dev/$d" "$dir/dev/$d"
    done
    mkdir -p "$dir/dev/pts" "$dir/dev/shm"
    mount -t devpts -o newinstance,ptmxmode=0666 devpts "$dir/dev/pts" 2>/dev/null || true
    ln -sf pts/ptmx "$dir/dev/ptmx"
    mount -t tmpfs -o mode=1777 tmpfs "$dir/dev/shm"
    ln -sf /proc/self/fd "$dir/dev/fd"
    ln -sf /proc/self/fd/0 "$dir/dev/stdin"; ln -sf /proc/self/fd/1 "$dir/dev/stdout"; ln -sf /proc/self/fd/2 "$dir/dev/stderr"
    mount -t tmpfs -o mode=1777 tmpfs "$dir/tmp"
    exec chroot "$dir" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb \
      PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      bash -c "cd /root/tokenbridge && exec \"\$@\"" bash "$@"
  ' bash "$dir" "$bind" "$repo" "$@"
}

case "${1:-}" in
  build) shift; build "$@" ;;
  run) shift; run "$@" ;;
  *) echo "usage: $0 build SUITE DIR | run DIR REPO CMD..." >&2; exit 2 ;;
esac
