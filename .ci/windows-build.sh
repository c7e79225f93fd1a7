#!/usr/bin/env bash
# Cross-builds holosync.exe for Windows 7+ (x86_64-win7-windows-gnu; i686 with --i686).
#
# Rust's standard *-pc-windows-* targets need Windows 10+. The tier-3 *-win7-windows-gnu
# targets have no prebuilt std, so std is built from source (-Zbuild-std). That source must
# match the compiler exactly, so this uses Debian's own rustc/cargo/std source
# (/usr/bin/rustc, /usr/bin/cargo, /usr/lib/rustlib/src) and never rustup's toolchain,
# which may come first on PATH. Linkers are set in .cargo/config.toml.
#
# Usage: .ci/windows-build.sh [--i686] [extra cargo build args, e.g. --no-default-features]
# Without feature arguments it builds the kiosk's set: tls and ws, not operator.
# Output: target/win7/<target>/release/holosync.exe (override dir with WIN7_TARGET_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."

i686=0
cargo_args=()
for a in "$@"; do
    case "$a" in
        --i686) i686=1 ;;
        *) cargo_args+=("$a") ;;
    esac
done
# The kiosk exe: the default features but the operator's tools (keygen, sign), which
# belong on the operator's machine; extra feature arguments replace this choice.
if ! printf '%s\n' ${cargo_args[@]+"${cargo_args[@]}"} | grep -q -- '--features\|--no-default-features\|--all-features'; then
    cargo_args+=(--no-default-features --features tls,ws)
fi

# Build-only packages (wine is not needed to build). mingw gcc links and compiles the C in
# rusqlite's bundled SQLite and ring's C and assembly (rustls' crypto provider here).
pkgs=(rustc-web cargo-web rust-web-src gcc-mingw-w64-x86-64-win32)
targets=(x86_64-win7-windows-gnu)
if [ "$i686" = 1 ]; then
    pkgs+=(gcc-mingw-w64-i686-win32)
    targets+=(i686-win7-windows-gnu)
fi

missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing: ${missing[*]}"
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

RUSTC_BIN=/usr/bin/rustc
CARGO_BIN=/usr/bin/cargo
for t in "${targets[@]}"; do
    if ! "$RUSTC_BIN" --print target-list | grep -qx "$t"; then
        echo "error: $RUSTC_BIN does not know target $t" >&2
        exit 1
    fi
done

export RUSTC="$RUSTC_BIN"
export RUSTC_BOOTSTRAP=1   # -Zbuild-std on Debian's stable compiler
export CARGO_TARGET_DIR="${WIN7_TARGET_DIR:-target/win7}"
# Host-build settings must not leak into the std build (e.g. RUSTFLAGS=-Dwarnings).
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_RUSTFLAGS RUSTC_WRAPPER RUSTC_WORKSPACE_WRAPPER

# The 32-bit kiosk exe without unwind tables. A panic aborts at once (.cargo/config.toml:
# -Cpanic=immediate-abort), so nothing ever unwinds, yet the built-in i686 target insists on
# DWARF unwind tables (.eh_frame: 227 KB of the exe; 32-bit Windows itself unwinds by SEH
# records on the stack and never reads them). So the i686 build uses the compiler's own
# target spec with only `requires-uwtable` turned off (generated here from this rustc, never
# kept in the repo: the spec format belongs to the compiler version), Rust code built with
# -Cforce-unwind-tables=no and the C (SQLite, ring) with gcc's unwind tables off. The 64-bit
# exe keeps its tables: x64 Windows needs them (.pdata) to walk any stack.
spec_dir="$CARGO_TARGET_DIR/spec"
mkdir -p "$spec_dir"
target_arg() {
    local t="$1"
    if [ "$t" != i686-win7-windows-gnu ]; then
        echo "$t"
        return
    fi
    "$RUSTC_BIN" -Z unstable-options --print target-spec-json --target "$t" >"$spec_dir/$t.json.tmp"
    grep -q '"requires-uwtable": true' "$spec_dir/$t.json.tmp" || {
        echo "error: $RUSTC_BIN's spec for $t has no requires-uwtable to turn off" >&2
        return 1
    }
    sed 's/"requires-uwtable": true/"requires-uwtable": false/' "$spec_dir/$t.json.tmp" >"$spec_dir/$t.json"
    rm -f "$spec_dir/$t.json.tmp"
    echo "$spec_dir/$t.json"
}
export CFLAGS_i686_win7_windows_gnu="-fno-asynchronous-unwind-tables -fno-unwind-tables"

rc=0
sizes=()
for t in "${targets[@]}"; do
    arch="${t%%-*}"
    start=$SECONDS
    spec="$(target_arg "$t")" || { rc=1; continue; }
    extra=()
    if [ "$spec" != "$t" ]; then
        # A spec file's name is its target's name: .cargo/config.toml's [target.$t] still
        # applies, and this flag is added to its rustflags.
        extra=(-Zjson-target-spec --config "target.$t.rustflags=['-Cforce-unwind-tables=no']")
    fi
    if "$CARGO_BIN" build ${extra[@]+"${extra[@]}"} --release --locked --target "$spec" \
        -Zbuild-std=std,panic_abort -Zbuild-std-features=optimize_for_size \
        ${cargo_args[@]+"${cargo_args[@]}"}; then
        exe="$CARGO_TARGET_DIR/$t/release/holosync.exe"
        echo "built $exe in $((SECONDS - start)) s"
        # The exe must need no MinGW runtime DLL and no Windows 8+/10-only API set.
        objdump="$arch-w64-mingw32-objdump"
        if command -v "$objdump" >/dev/null; then
            bad=$("$objdump" -p "$exe" | awk '/DLL Name:/{print $3}' |
                grep -iE 'libgcc|libwinpthread|libstdc|api-ms-win-core-synch-l1-2|bcryptprimitives' || true)
            if [ -n "$bad" ]; then
                echo "error: $exe imports DLLs not on a bare Windows 7: $bad" >&2
                rc=1
            fi
        fi
        sizes+=("holosync.exe $arch-win7: $(stat -c %s "$exe") bytes")
    else
        echo "error: build for $t failed" >&2
        rc=1
    fi
done
for s in ${sizes[@]+"${sizes[@]}"}; do echo "$s"; done
exit "$rc"
