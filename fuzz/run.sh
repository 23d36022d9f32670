#!/usr/bin/env bash
# Builds every fuzz target with the machine's stable toolchain and runs each
# for SECONDS (default 60), starting from the seed corpus derived from the
# conformance vectors plus whatever fuzz/corpus/<target> already holds.
#
#   bash fuzz/run.sh            # 60 s per target (CI)
#   bash fuzz/run.sh 600        # the pre-release run: 10 minutes per target
#   bash fuzz/run.sh 600 kernel_ops envelope_kernel   # only these targets
#
# Exits non-zero when a target crashes; the crashing input is kept in
# fuzz/artifacts/<target>/ and the report in fuzz/logs/<target>.log.
# See fuzz/README.md.
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-60}"
shift || true
# cargo-fuzz passes -Z flags to rustc; RUSTC_BOOTSTRAP lets the stable
# toolchain accept them. No nightly toolchain is needed.
export RUSTC_BOOTSTRAP=1
# The project's own code is safe Rust, so AddressSanitizer buys little and
# costs an order of magnitude in executions per second (see README.md).
sanitizer="${MACP_FUZZ_SANITIZER:-none}"
command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz is not installed: cargo install cargo-fuzz --locked"; exit 2; }
cargo fuzz build -s "$sanitizer"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi
mkdir -p logs
status=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    MACP_FUZZ_WRITE_SEEDS="seeds/$t" cargo fuzz run -s "$sanitizer" "$t" >/dev/null 2>&1
    echo "== $t: ${secs}s from $(ls "seeds/$t" | wc -l) seeds + $(ls "corpus/$t" | wc -l) corpus inputs"
    if cargo fuzz run -s "$sanitizer" "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$secs" -print_final_stats=1 -artifact_prefix="artifacts/$t/" >"logs/$t.log" 2>&1; then
        grep -E "DONE|stat::number_of_executed_units|stat::average_exec_per_sec" "logs/$t.log" || true
    else
        status=1
        echo "!! $t CRASHED; input in fuzz/artifacts/$t/, report in fuzz/logs/$t.log:"
        grep -E "panicked|SUMMARY|Test unit written" "logs/$t.log" || tail -20 "logs/$t.log"
    fi
done
exit $status
