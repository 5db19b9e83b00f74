#!/usr/bin/env bash
# Runs each fuzz target in fuzz/ for a bounded time, one after the other (see fuzz/README.md).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# SECONDS_PER_TARGET defaults to 600; TARGET defaults to every target (`cargo fuzz list`).
# Installs cargo-fuzz when it is missing. Every target runs even when an earlier one crashed; the
# script then exits 1, naming each target that crashed (its input is in fuzz/artifacts/TARGET/).
# Exits 2 on a usage error (a bad number of seconds, an unknown target). Build output goes to
# $CARGO_TARGET_DIR when set, else fuzz/target.
set -euo pipefail

usage() {
    echo "usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]" >&2
    exit 2
}

seconds="${1:-600}"
[[ $# -gt 0 ]] && shift
[[ "$seconds" =~ ^[1-9][0-9]*$ ]] || usage

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi
# cargo-fuzz passes flags only a nightly compiler takes (-Zsanitizer=address and others); a stable
# one takes them too with RUSTC_BOOTSTRAP=1.
if ! rustc --version | grep -q nightly; then
    export RUSTC_BOOTSTRAP=1
fi
target_dir="${CARGO_TARGET_DIR:-$root/fuzz/target}"
fuzz=(--fuzz-dir fuzz --target-dir "$target_dir")

mapfile -t known < <(cargo fuzz list "${fuzz[@]:0:2}")
[[ ${#known[@]} -gt 0 ]] || { echo "fuzz.sh: no fuzz targets found in fuzz/" >&2; exit 1; }
if [[ $# -gt 0 ]]; then
    targets=("$@")
    for target in "${targets[@]}"; do
        if [[ " ${known[*]} " != *" $target "* ]]; then
            echo "fuzz.sh: no fuzz target \`$target\`; the targets are: ${known[*]}" >&2
            exit 2
        fi
    done
else
    targets=("${known[@]}")
fi

# Seeds: the committed ones, the regressions found earlier and, for the loader, every touchpoint
# file of the repository (samples, examples and test fixtures).
seed() {
    local target="$1" corpus="fuzz/corpus/$1" file
    mkdir -p "$corpus"
    for dir in "fuzz/seeds/$target" "fuzz/regressions/$target"; do
        [[ -d "$dir" ]] && cp -n "$dir"/* "$corpus"/ 2>/dev/null || true
    done
    if [[ "$target" == load_toml ]]; then
        while IFS= read -r -d '' file; do
            cp -n "$file" "$corpus/seed-${file//\//_}"
        done < <(find touchpoints examples tests/fixtures -name '*.toml' -type f -print0)
    fi
}

echo "fuzz.sh: building the fuzz targets" >&2
cargo fuzz build "${fuzz[@]}"

crashed=()
for target in "${targets[@]}"; do
    seed "$target"
    echo "fuzz.sh: $target for ${seconds}s" >&2
    # -timeout: an input taking longer counts as a crash (a hang); -rss_limit_mb: so does one that
    # makes the process grow past 2 GiB.
    if ! cargo fuzz run "${fuzz[@]}" "$target" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1; then
        crashed+=("$target")
    fi
done

if [[ ${#crashed[@]} -gt 0 ]]; then
    echo "fuzz.sh: crashed: ${crashed[*]} (inputs in fuzz/artifacts/; fuzz/README.md says what to do next)" >&2
    exit 1
fi
echo "fuzz.sh: ${#targets[@]} target(s), ${seconds}s each, no crash" >&2
