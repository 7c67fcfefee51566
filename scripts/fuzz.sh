#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo fuzz / libFuzzer) of HTTP request parsing and routing and of the
# wsrelay.v1 command parser. Runs every target in fuzz/fuzz_targets for a bounded time.
#
#   scripts/fuzz.sh [SECONDS]          # default 60 s per target
#   FUZZ_TARGETS="http_parse" scripts/fuzz.sh 300
#
# Targets: http_parse (request heads, routing decisions, framing headers, responses),
# http_query (percent-decoding, query parameters), envelope_parse (v1 frames and every reply
# built from them), envelope_roundtrip (structured v1 commands, encoded and parsed back),
# proxy_parse (PROXY protocol headers and X-Forwarded-For from trusted proxies).
# The server deviations fuzzing found are fixed; the targets' FUZZ_STRICT mode (now always on)
# fails on them again, and their reproducers stay as the fuzz/seeds/*/known-* files.
#
# Installs cargo-fuzz from crates.io when missing. libFuzzer needs nightly-only rustc flags: a
# nightly toolchain is used when FUZZ_TOOLCHAIN names one, otherwise the default (stable)
# toolchain with RUSTC_BOOTSTRAP=1. Exits non-zero when any target crashes or fails an
# assertion; crash inputs are saved in fuzz/artifacts/<target>/ and the command to replay one is
# printed. The growing corpus lives in fuzz/corpus/<target>/ (not committed); fuzz/seeds/ holds
# the committed seeds. Not part of .ci/run: it is meant to be run by hand or on a schedule.
set -uo pipefail
# The deviations the targets tolerate outside strict mode are fixed: always check them.
export FUZZ_STRICT=1
cd "$(dirname "$0")/.."
root=$(pwd)

duration=${1:-60}
if ! [[ $duration =~ ^[0-9]+$ ]] || [ "$duration" -eq 0 ]; then
    echo "usage: $0 [SECONDS per target]" >&2
    exit 2
fi

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "installing cargo-fuzz (crates.io)"
    cargo install --locked cargo-fuzz || exit 1
fi

if [ -n "${FUZZ_TOOLCHAIN:-}" ]; then
    fuzz=(cargo "+$FUZZ_TOOLCHAIN" fuzz)
else
    export RUSTC_BOOTSTRAP=1
    fuzz=(cargo fuzz)
fi
# Its own target directory: the sanitizer flags would otherwise invalidate the main build.
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$root/fuzz/target}"

targets=${FUZZ_TARGETS:-$(cd fuzz/fuzz_targets && ls -- *.rs | sed 's/\.rs$//')}

echo "building fuzz targets"
"${fuzz[@]}" build --fuzz-dir fuzz || exit 1
# The binaries are run directly, so every target tests the same build even while src/ changes.
bin_dir=$CARGO_TARGET_DIR/$(rustc -vV | sed -n 's/^host: //p')/release

# Flags for libFuzzer: bounded time, bounded memory, a hang counts as a failure, and inputs
# long enough to cross the 8 KiB request-head limit.
lf_flags=(-max_total_time="$duration" -rss_limit_mb=2048 -timeout=10 -max_len=9000 -print_final_stats=1)

stamp=$(mktemp)
trap 'rm -f "$stamp"' EXIT
failed=()
for t in $targets; do
    corpus=fuzz/corpus/$t
    mkdir -p "$corpus" "fuzz/artifacts/$t"
    seeds=()
    [ -d "fuzz/seeds/$t" ] && seeds=("fuzz/seeds/$t")
    echo
    echo "=== $t: ${duration}s (corpus $corpus, crashes go to fuzz/artifacts/$t/)"
    log=$(mktemp)
    "$bin_dir/$t" -artifact_prefix="fuzz/artifacts/$t/" "${lf_flags[@]}" "$corpus" "${seeds[@]}" 2>&1 |
        tee "$log" |
        grep -E '^(#[0-9]+[[:space:]]+(INITED|DONE)|Done [0-9]+ runs|==[0-9]+== ?ERROR|SUMMARY|thread .* panicked|artifact_prefix|Test unit written)'
    status=${PIPESTATUS[0]}
    if [ "$status" -ne 0 ]; then
        failed+=("$t")
        echo "!!! $t FAILED (exit $status); its output around the failure:"
        grep -v -E '^#[0-9]+[[:space:]]+(NEW|REDUCE|pulse)' "$log" | grep -v -E '^ +(#?[0-9]+[: ]|at )' | tail -n 30
    fi
    rm -f "$log"
done

echo
echo "corpora: fuzz/corpus/<target>/  crashes: fuzz/artifacts/<target>/"
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}"
    env_prefix=${FUZZ_STRICT:+FUZZ_STRICT=1 }
    for t in "${failed[@]}"; do
        # Only what this run saved.
        find "fuzz/artifacts/$t" -type f -newer "$stamp" | while read -r f; do
            echo "  $f"
            echo "    replay: $env_prefix$bin_dir/$t $f"
            echo "        or: ${env_prefix}RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz $t $f"
        done
    done
    exit 1
fi
echo "all targets ran ${duration}s without a crash: $targets" | tr '\n' ' '
echo
