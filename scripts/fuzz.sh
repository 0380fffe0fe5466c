#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/fuzz_targets/) for a bounded time or number of runs, one
# after another, and prints the executions of each. Exits non-zero if any target crashed; the
# crashing input is kept under fuzz/artifacts/<target>/. See docs/fuzzing.md.
#
#   scripts/fuzz.sh                 60 s per target
#   scripts/fuzz.sh 300             300 s per target
#   scripts/fuzz.sh -runs=1000000   one million executions per target
#   scripts/fuzz.sh 30 codec_decode frame_check    only these targets
#
# Corpora grow under fuzz/corpus/<target>/ (gitignored); fuzz/seeds/<target>/ (committed) is
# read as a second corpus. Full libFuzzer output: fuzz/logs/<target>.log. Needs a nightly
# toolchain (FUZZ_TOOLCHAIN, default nightly); installs cargo-fuzz if it is missing.
set -euo pipefail

cd "$(dirname "$0")/.."
TOOLCHAIN=${FUZZ_TOOLCHAIN:-nightly}
NICE=${FUZZ_NICE:-10}

limit=${1:-60}
shift || true
case $limit in
-runs=[0-9]*) budget=("$limit") ;;
[0-9]*) budget=("-max_total_time=$limit") ;;
*)
    echo "usage: $0 [SECONDS | -runs=N] [TARGET...]" >&2
    exit 2
    ;;
esac

if ! cargo "+$TOOLCHAIN" fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz
fi

if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo "+$TOOLCHAIN" fuzz list)
fi

nice -n "$NICE" cargo "+$TOOLCHAIN" fuzz build

mkdir -p fuzz/logs
failed=()
summary=()
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    corpora=("fuzz/corpus/$t")
    [ -d "fuzz/seeds/$t" ] && corpora+=("fuzz/seeds/$t")
    extra=()
    [ -f "fuzz/dicts/$t.dict" ] && extra+=("-dict=fuzz/dicts/$t.dict")
    log="fuzz/logs/$t.log"
    echo "== $t (${budget[*]})" >&2
    start=$SECONDS
    rc=0
    nice -n "$NICE" cargo "+$TOOLCHAIN" fuzz run "$t" "${corpora[@]}" -- \
        "${budget[@]}" -print_final_stats=1 -timeout=10 "${extra[@]}" >"$log" 2>&1 || rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
    if [ "$rc" -eq 0 ]; then
        result=ok
    else
        result="CRASH (exit $rc)"
        failed+=("$t")
        grep -E '^(==[0-9]+==ERROR|thread .* panicked|SUMMARY|artifact_prefix|Test unit written)' "$log" >&2 || tail -n 30 "$log" >&2
    fi
    line=$(printf '%-16s executions %-10s exec/s %-7s %4ss  %s' "$t" "${execs:-?}" "${rate:-?}" "$((SECONDS - start))" "$result")
    echo "$line" >&2
    summary+=("$line")
done

echo
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
    echo "crashed: ${failed[*]} (inputs under fuzz/artifacts/, logs under fuzz/logs/)" >&2
    exit 1
fi
