#!/usr/bin/env bash
# Fuzz smoke test: runs every cargo-fuzz target for N seconds (default 20),
# starting from the committed corpus. New inputs go to a temporary folder, so
# the committed corpus is not changed; crashes go to fuzz/artifacts/<target>/
# and make this script fail. Without cargo-fuzz or a nightly toolchain it says
# why it is skipped and exits 0 (the corpus replay, `cargo test --test
# fuzz_corpus`, still covers every committed input on stable).
#
#   fuzz/smoke.sh [seconds]
set -euo pipefail

secs="${1:-20}"
case "$secs" in
    '' | *[!0-9]*)
        echo "usage: $0 [seconds]" >&2
        exit 2
        ;;
esac
cd "$(dirname "$0")/.."

skip() {
    echo "fuzz smoke test skipped: $*"
    exit 0
}
command -v cargo >/dev/null || skip "cargo is not installed"
command -v rustup >/dev/null || skip "rustup is not installed (needed for a nightly toolchain)"
rustup run nightly rustc --version >/dev/null 2>&1 ||
    skip "no nightly toolchain (rustup toolchain install nightly)"
cargo fuzz --version >/dev/null 2>&1 || skip "cargo-fuzz is not installed (cargo install cargo-fuzz)"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

for target in sync_payload url_path projector_message pjlink_reply image; do
    flags=(-max_total_time="$secs" -timeout=10)
    case "$target" in
        sync_payload) flags+=(-max_len=8192 -dict=fuzz/dict/url.dict) ;;
        url_path) flags+=(-max_len=4096 -dict=fuzz/dict/url.dict) ;;
        # A large allocation is a finding: decompression bombs must be refused first.
        # No leak check: re-encoding's jpeg-decoder leaves detached worker
        # threads whose thread-locals LeakSanitizer reports.
        image) flags+=(-max_len=8192 -rss_limit_mb=512 -malloc_limit_mb=256 -detect_leaks=0 -dict=fuzz/dict/image.dict) ;;
        *) flags+=(-max_len=4096 "-dict=fuzz/dict/$target.dict") ;;
    esac
    echo "== $target: ${secs}s"
    mkdir -p "$work/$target"
    cargo +nightly fuzz run -O "$target" "$work/$target" "fuzz/corpus/$target" -- "${flags[@]}"
done
echo "fuzz smoke test passed: every target ran ${secs}s without a finding"
