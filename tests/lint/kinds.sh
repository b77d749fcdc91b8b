#!/bin/sh
# SPDX-License-Identifier: MIT
# make lint: the one table of error kinds (src/core/lm_kinds.def).  Every "(LM_E_X, \"Kind\""
# pair in src/ must be listed there with the same code, and every listed kind must be used.
set -e
DEF=src/core/lm_kinds.def
tmp=${TMPDIR:-/tmp}/lm-kinds.$$
fail=0
sed -n 's/^LM_KIND(\([A-Za-z0-9]*\), *\(LM_E_[A-Z_]*\),.*/\1 \2/p' "$DEF" > "$tmp.table"
for f in $(find src -name '*.[ch]' | sort); do
    tr '\n' ' ' < "$f" | grep -oE 'LM_E_[A-Z_]+[[:space:]]*,[[:space:]]*"[A-Z][A-Za-z0-9]*"' |
        sed -E 's/(LM_E_[A-Z_]+)[[:space:]]*,[[:space:]]*"([A-Za-z0-9]+)"/\2 \1/' |
        while read -r kind code; do echo "$kind $code $f"; done
    # kinds chosen at run time (kind = "X"; cond ? "X" : "Y"): listed, code not checked here
    tr '\n' ' ' < "$f" | grep -oE '(kind = |\? |: )"[A-Z][A-Za-z0-9]*"' | grep -oE '[A-Z][A-Za-z0-9]*' |
        while read -r kind; do if grep -q "^LM_KIND($kind," "$DEF"; then echo "$kind ? $f"; fi; done
done > "$tmp.used"
while read -r kind code f; do
    listed=$(awk -v k="$kind" '$1 == k { print $2 }' "$tmp.table")
    if [ -z "$listed" ]; then
        echo "lint: $f: error kind '$kind' is not in $DEF (add one line there)" >&2
        fail=1
    elif [ "$code" != "?" ] && [ "$listed" != "$code" ]; then
        echo "lint: $f: error kind '$kind' is raised with $code but $DEF gives it $listed" >&2
        fail=1
    fi
done < "$tmp.used"
# a call site that raises one code and returns another (the caller sees a code the message does not
# have): "lm_fail(err, LM_E_X, ...); ... return LM_E_Y;" within a few lines
for f in $(find src -name '*.c' | sort); do
    awk -v F="$f" '
        /lm_fail\(/ && !/return|= *lm_fail/ { if (match($0, /LM_E_[A-Z_]+/)) { code = substr($0, RSTART, RLENGTH); at = NR } }
        /return LM_E_[A-Z_]+;/ { if (at && NR - at < 6) { match($0, /LM_E_[A-Z_]+/); r = substr($0, RSTART, RLENGTH)
            if (r != code) print "lint: " F ":" NR ": raises " code " but returns " r } at = 0 }
        /^}/ { at = 0 }' "$f"
done > "$tmp.ret"
if [ -s "$tmp.ret" ]; then cat "$tmp.ret" >&2; fail=1; fi
rm -f "$tmp.ret"
# the generic kinds come from the code (lm_code_name), the rest must be raised somewhere
while read -r kind code; do
    case $kind in IoError|OutOfMemory|InvalidFormat|Mismatch|Interrupted|Unsupported|Usage) continue ;; esac
    if ! awk -v k="$kind" '$1 == k { found = 1 } END { exit !found }' "$tmp.used"; then
        echo "lint: $DEF lists '$kind', which nothing in src/ raises: remove it" >&2
        fail=1
    fi
done < "$tmp.table"
echo "lint: $(wc -l < "$tmp.table") error kinds in $DEF, $(wc -l < "$tmp.used") raised in src/"
rm -f "$tmp.table" "$tmp.used"
exit $fail
