#!/usr/bin/env bash
# Runs every `sh` block of README.md's "Operating" section, in order, as one
# bash script from the repository root, so the README's operating examples
# (metrics, admin CLI, authentication) cannot drift from what the binaries do.
# Any failing command fails the run; servers it started are stopped on exit.
#
#   bash tests/readme/operating.sh          # what CI runs
#   bash tests/readme/operating.sh --print  # show the extracted script
set -euo pipefail
cd "$(dirname "$0")/../.."
script=$(awk '
    /^## / { in_section = ($0 == "## Operating") }
    in_section && /^```sh$/ { in_block = 1; next }
    in_block && /^```$/ { in_block = 0; next }
    in_section && in_block { print }
' README.md)
if [ -z "$script" ]; then
    echo "tests/readme/operating.sh: no sh blocks under '## Operating' in README.md" >&2
    exit 1
fi
if [ "${1:-}" = "--print" ]; then
    printf '%s\n' "$script"
    exit 0
fi
# A server the README starts in the background must not outlive a failure.
guard='trap '"'"'kill $(jobs -p) 2>/dev/null || true'"'"' EXIT'
timeout 900 bash -euo pipefail -c "$guard
$script"
echo "README Operating examples: ok"
