#!/bin/sh
# SPDX-License-Identifier: MIT
# make lint: the complexity budget (curl's scripts/top-complexity).  Every function of src/ and
# kernels/ scores at most CUTOFF (pmccabe's modified McCabe complexity), except the ones listed in
# tests/lint/complexity-budget.txt, whose scores may only go down.  Prints the top functions.
set -e
CUTOFF=${CUTOFF:-50}
BUDGET=tests/lint/complexity-budget.txt
command -v pmccabe >/dev/null || { echo "lint: pmccabe is missing (Debian package pmccabe)" >&2; exit 1; }
pmccabe src/*/*.c kernels/*.c | sort -n -r > "${TMPDIR:-/tmp}/lm-complexity.$$"
fail=0
while read -r score _ _ _ _ where; do
    [ "$score" -gt "$CUTOFF" ] || continue
    fn=${where##*: }
    file=${where%%(*}
    allowed=$(awk -v f="$file" -v n="$fn" '$1 == f && $2 == n { print $3 }' "$BUDGET")
    if [ -z "$allowed" ]; then
        echo "lint: $file: $fn scores $score (cutoff $CUTOFF): split it" >&2
        fail=1
    elif [ "$score" -gt "$allowed" ]; then
        echo "lint: $file: $fn scores $score, more than its budget $allowed: scores may only go down" >&2
        fail=1
    fi
done < "${TMPDIR:-/tmp}/lm-complexity.$$"
echo "lint: the most complex functions (cutoff $CUTOFF; budget in $BUDGET):"
head -5 "${TMPDIR:-/tmp}/lm-complexity.$$" | awk '{ print "  " $1 "  " $6 " " $7 }'
rm -f "${TMPDIR:-/tmp}/lm-complexity.$$"
exit $fail
