#!/usr/bin/env bash
# The project's test command: installs what is needed, then runs every test in the workspace
# (cargo-nextest, tests/nextest.toml) and prints a table of each test's time.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
tests/setup.sh
setup_s=$((SECONDS - started))

# Style and lints first: a finding fails the run, but the tests still run to show the rest.
status=0
lint_started=$SECONDS
cargo fmt --all --check || status=$?
cargo clippy --release --workspace --all-targets --quiet -- -D warnings || status=$?
lint_s=$((SECONDS - lint_started))

# hopper_tests::again_if_a_host_broke notes each test host breakdown that made a test run again.
breakdowns=.cache/breakdowns.log
rm -f "$breakdowns"
tests_status=0
cargo nextest run --workspace --release --config-file tests/nextest.toml "$@" || tests_status=$?
[ "$tests_status" = 0 ] || status=$tests_status

junit=target/nextest/default/junit.xml
if [ -f "$junit" ]; then
	printf '\n%-9s %-7s %s\n' seconds result test
	# One <testcase> per test: its name, binary and time; a failure element follows it.
	awk '
		/<testcase / {
			if (name != "") print time, result, name
			match($0, /name="[^"]*"/); name = substr($0, RSTART + 6, RLENGTH - 7)
			match($0, /classname="[^"]*"/); class = substr($0, RSTART + 11, RLENGTH - 12)
			match($0, /time="[^"]*"/); time = substr($0, RSTART + 6, RLENGTH - 7)
			name = class " " name; result = "pass"
		}
		/<failure|<error/ { result = "FAIL" }
		END { if (name != "") print time, result, name }
	' "$junit" | sort -rn | awk '$1 >= 1 || $2 == "FAIL" { printf "%9.1f %-7s %s %s\n", $1, $2, $3, $4; n++ }
		END { if (n == 0) print "(no test took a second or more)" }'
	printf '%9d %-7s %s\n' "$setup_s" - "tests/setup.sh" "$lint_s" - "cargo fmt --check, cargo clippy" "$((SECONDS - started))" - "all, setup and build included"
fi
if [ -s "$breakdowns" ]; then
	printf '\nTest hosts broke down, and the tests they were in ran again:\n'
	cat "$breakdowns"
else
	printf '\nNo test host broke down: no test ran again.\n'
fi
exit "$status"
