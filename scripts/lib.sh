# shellcheck shell=bash
# Shared by scripts/test and scripts/serve: repo root, logging, and the checks that install
# what a fresh Debian 12 machine lacks. Source it; do not run it.
#
# What the project needs from the system (Debian package in brackets):
#   cargo/rustc 1.80+      (rustup: https://rustup.rs; Debian's own cargo is too old)
#   cc + libc headers      [gcc libc6-dev]     the redis-module crate compiles a C shim
#   clang + libclang       [clang libclang-dev] bindgen generates the Redis module API bindings
#   redis-server >= 7.0    [redis-server]      brings redis-tools (redis-cli)
#   python3 + venv         [python3 python3-venv] for the pytest suite
#   CA certificates        [ca-certificates]   pip and cargo fetch over HTTPS

TC_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TC_VENV="$TC_ROOT/.venv"
TC_REQUIREMENTS="$TC_ROOT/tests/python/requirements.txt"
TC_MIN_REDIS_MAJOR=7

tc_log() { printf '==> %s\n' "$*" >&2; }
tc_warn() { printf 'warning: %s\n' "$*" >&2; }
tc_die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# cargo: rustup installs into ~/.cargo/bin, which a non-login shell may not have on PATH.
tc_ensure_cargo() {
    if ! command -v cargo >/dev/null 2>&1; then
        local home_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
        if [[ -x "$home_bin/cargo" ]]; then
            export PATH="$home_bin:$PATH"
        fi
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        tc_die "cargo not found. Install Rust with rustup (https://rustup.rs), then open a new shell:
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y
(Debian's packaged cargo is too old for this workspace.)"
    fi
}

# rustfmt and clippy, which scripts/test runs as checks: added with rustup when missing.
tc_ensure_rust_lints() {
    if cargo fmt --version >/dev/null 2>&1 && cargo clippy --version >/dev/null 2>&1; then
        return 0
    fi
    if command -v rustup >/dev/null 2>&1; then
        tc_log "adding the rustfmt and clippy components with rustup"
        rustup component add rustfmt clippy
    fi
    cargo fmt --version >/dev/null 2>&1 && cargo clippy --version >/dev/null 2>&1 ||
        tc_die "cargo fmt and cargo clippy are needed: rustup component add rustfmt clippy"
}

# Is the clang shared library that bindgen loads (through clang-sys) present?
tc_have_libclang() {
    local f
    if [[ -n "${LIBCLANG_PATH:-}" ]]; then
        for f in "$LIBCLANG_PATH"/libclang*.so*; do [[ -e "$f" ]] && return 0; done
    fi
    for f in /usr/lib/llvm-*/lib/libclang.so* /usr/lib/*-linux-gnu/libclang.so* /usr/lib/*-linux-gnu/libclang-*.so* \
             /usr/lib/libclang.so* /usr/lib64/libclang.so* /usr/local/lib/libclang.so*; do
        [[ -e "$f" ]] && return 0
    done
    return 1
}

# Does the venv work (or can python3 make one, with pip)?
tc_venv_ok() {
    [[ -x "$TC_VENV/bin/python" ]] && "$TC_VENV/bin/python" -c 'import sys' >/dev/null 2>&1
}
tc_python_can_make_venv() {
    command -v python3 >/dev/null 2>&1 || return 1
    local probe
    probe="$(mktemp -d)"
    if python3 -m venv "$probe/v" >/dev/null 2>&1 && [[ -x "$probe/v/bin/pip" ]]; then
        rm -rf "$probe"
        return 0
    fi
    rm -rf "$probe"
    return 1
}

# Prints the Debian packages that are missing, one per line. $1 = "python" to include what the pytest
# suite needs (python3 + venv), "build" for the build and server only.
tc_missing_packages() {
    local want_python="${1:-}"
    command -v cc >/dev/null 2>&1 || echo gcc
    [[ -e /usr/include/stdio.h ]] || echo libc6-dev
    command -v clang >/dev/null 2>&1 || echo clang
    tc_have_libclang || echo libclang-dev
    command -v redis-server >/dev/null 2>&1 || echo redis-server
    command -v redis-cli >/dev/null 2>&1 || echo redis-tools
    [[ -e /etc/ssl/certs/ca-certificates.crt ]] || echo ca-certificates
    if [[ "$want_python" == python ]] && ! tc_venv_ok; then
        if ! command -v python3 >/dev/null 2>&1; then
            echo python3
            echo python3-venv
        elif ! tc_python_can_make_venv; then
            echo python3-venv
        fi
    fi
}

# Installs the Debian packages that LISTER names (a function printing one missing package per line,
# given ARG) with apt-get when root; otherwise prints the sudo line and exits 1. WHAT says what for.
tc_apt_ensure() { # WHAT LISTER [ARG]
    local what="$1" lister="$2" arg="${3:-}"
    local -a missing
    mapfile -t missing < <("$lister" "$arg" | awk '!seen[$0]++')
    if ((${#missing[@]} == 0)); then
        return 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        tc_die "missing for $what: ${missing[*]} (Debian package names). This script installs them only with
apt-get; install the equivalents with your package manager (redis-server must be >= 7.0) and run it again."
    fi
    if [[ "$(id -u)" != 0 ]]; then
        tc_die "missing system packages for $what: ${missing[*]}. Install them with:
    sudo apt-get update && sudo apt-get install -y ${missing[*]}
then run this script again."
    fi
    tc_log "installing with apt-get: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
    mapfile -t missing < <("$lister" "$arg")
    ((${#missing[@]} == 0)) || tc_die "still missing after apt-get install: ${missing[*]}"
}

# The build, the server and (with "python") the test suites' system packages. $1 as for tc_missing_packages.
tc_ensure_system_deps() {
    tc_apt_ensure "the build and the tests" tc_missing_packages "${1:-}"
}

# redis-server must be >= 7.0 (module configs, SetCommandInfo, SetAbsExpire).
tc_check_redis_version() {
    local line version major
    line="$(redis-server --version 2>/dev/null || true)"
    version="$(sed -n 's/.* v=\([0-9][0-9.]*\).*/\1/p' <<<"$line")"
    [[ -n "$version" ]] || tc_die "cannot read the version of $(command -v redis-server): '$line'"
    major="${version%%.*}"
    if ((major < TC_MIN_REDIS_MAJOR)); then
        tc_die "redis-server $version at $(command -v redis-server) is too old: tiercache needs Redis >= 7.0 (tested on 7.0.15)"
    fi
    # shellcheck disable=SC2034 # read by the scripts that source this file
    TC_REDIS_VERSION="$version"
}

# Creates .venv if needed and installs tests/python/requirements.txt when it changed (hash stamp).
tc_ensure_venv() {
    local stamp="$TC_VENV/.requirements.sha256" want have=""
    if ! tc_venv_ok; then
        if [[ -e "$TC_VENV" ]]; then
            tc_log "recreating broken virtualenv $TC_VENV"
            [[ -f "$TC_VENV/pyvenv.cfg" ]] || tc_die "$TC_VENV exists but is not a virtualenv; move it away"
            rm -rf "$TC_VENV"
        else
            tc_log "creating virtualenv $TC_VENV"
        fi
        python3 -m venv "$TC_VENV"
    fi
    want="$(sha256sum "$TC_REQUIREMENTS" | cut -d' ' -f1)"
    [[ -f "$stamp" ]] && have="$(cat "$stamp")"
    if [[ "$want" != "$have" ]]; then
        tc_log "installing Python test requirements ($TC_REQUIREMENTS)"
        "$TC_VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$TC_REQUIREMENTS"
        printf '%s\n' "$want" >"$stamp"
    fi
}

# Is something listening on 127.0.0.1:$1?
tc_port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# --- edge and monitoring (cli/ tests, monitoring/) -------------------------------------------------
# The cli tests start a real Varnish (with vmod xkey) and a real Prometheus; scripts/test runs
# `promtool test rules` on monitoring/. Debian packages:
#   varnishd               [varnish]
#   vmod xkey              [varnish-modules]
#   prometheus + promtool  [prometheus]
# On a machine with systemd, installing varnish and prometheus also starts their services (ports 6081
# and 9090); the tests use their own processes on free loopback ports and do not need those.

# Is vmod xkey installed where varnishd looks for vmods?
tc_have_vmod_xkey() {
    local f
    for f in /usr/lib/*/varnish/vmods/libvmod_xkey.so /usr/lib/varnish/vmods/libvmod_xkey.so \
             /usr/lib64/varnish/vmods/libvmod_xkey.so /usr/local/lib/varnish/vmods/libvmod_xkey.so; do
        [[ -e "$f" ]] && return 0
    done
    return 1
}

tc_missing_edge_packages() {
    command -v varnishd >/dev/null 2>&1 || [[ -x /usr/sbin/varnishd ]] || echo varnish
    tc_have_vmod_xkey || echo varnish-modules
    { command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; } || echo prometheus
}

# PostgreSQL server binaries (initdb, pg_ctl under /usr/lib/postgresql/<major>/bin): the write-path
# tests (client/tests/write_paths.rs, cli/tests/write_behind.rs) and the pg bridge and warm tests
# (cli/tests/pg_bridge.rs, cli/tests/warm.rs) start a throwaway cluster.
tc_missing_pg_packages() {
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || echo postgresql
}
tc_ensure_pg_deps() {
    tc_apt_ensure "the PostgreSQL tests" tc_missing_pg_packages
}

# Installs varnish, varnish-modules and prometheus when missing (apt-get as root; otherwise prints the
# sudo line and exits 1, like tc_ensure_system_deps).
tc_ensure_edge_deps() {
    tc_apt_ensure "the edge and monitoring tests" tc_missing_edge_packages
    # varnishd lives in /usr/sbin, which a non-root PATH may lack.
    if ! command -v varnishd >/dev/null 2>&1 && [[ -x /usr/sbin/varnishd ]]; then
        export VARNISHD=/usr/sbin/varnishd
    fi
}
