#!/bin/sh
# SPDX-License-Identifier: MIT
# readme_cluster.sh README BIN DIR BASE ADAPTER : runs the README's Slurm and Kubernetes examples
# as they are written, on this machine.  Each example's code block (the one holding
# `$ cat merge.sbatch`, the one holding `$ cat merge-job.yaml`) is split into the files it shows
# (`$ cat F` then F's text) and its commands (`$ ...`, with their continuation lines); the
# commands run with `sh -e` in DIR/<example>, with fake `sbatch` and `kubectl` first in PATH that
# run the jobs here, the array tasks / completion indexes in a shuffled order (shuf), four tasks
# (Slurm) or `parallelism` pods (Kubernetes) at a time, with the variables the schedulers set
# (SLURM_ARRAY_TASK_ID, SLURM_CPUS_PER_TASK, SLURM_ARRAY_JOB_ID, JOB_COMPLETION_INDEX), and
# `lora-merge` that is BIN.  The examples' /shared and /data are DIR/<example>/shared and
# DIR/<example>/data, where models/Llama-3.1-405B is BASE and adapters/my-lora is ADAPTER.
# A task that fails fails the job (sbatch's afterok dependency, kubectl wait), and then the run.
set -eu
README=$1; BIN=$2; DIR=$3; BASE=$4; AD=$5
fail() { echo "readme_cluster: FAIL: $*" >&2; exit 1; }
mkdir -p "$DIR/bin"
ln -sf "$BIN" "$DIR/bin/lora-merge"

# ---- fake sbatch: [--parsable] [--array=SPEC] [--dependency=afterok:ID] [--wrap CMD | SCRIPT]
cat >"$DIR/bin/sbatch" <<'EOF'
#!/bin/sh
set -eu
state=${FAKE_SCHED_STATE:?}
parsable=0; array=; dep=; wrap=; script=; output=
while [ $# -gt 0 ]; do
  case $1 in
    --parsable) parsable=1 ;;
    --array=*) array=${1#--array=} ;;
    --dependency=*) dep=${1#--dependency=} ;;
    --output=*) output=${1#--output=} ;;
    --job-name=*|--time=*|--mem=*|--cpus-per-task=*) ;;
    --wrap) wrap=$2; shift ;;
    --wrap=*) wrap=${1#--wrap=} ;;
    -*) echo "sbatch (fake): option $1 not simulated" >&2; exit 2 ;;
    *) script=$1 ;;
  esac
  shift
done
cpus=1
if [ -n "$script" ]; then
  [ -f "$script" ] || { echo "sbatch: no script $script" >&2; exit 1; }
  d=$(sed -n 's/^#SBATCH --array=//p' "$script"); [ -n "$array" ] || array=$d
  d=$(sed -n 's/^#SBATCH --cpus-per-task=//p' "$script"); [ -n "$d" ] && cpus=$d
  d=$(sed -n 's/^#SBATCH --output=//p' "$script"); [ -n "$output" ] || output=$d
fi
n=$(($(cat "$state/next" 2>/dev/null || echo 1000) + 1)); echo $n >"$state/next"
case $dep in
  "") ;;
  afterok:*) [ "$(cat "$state/job-${dep#afterok:}" 2>/dev/null)" = ok ] ||
               { echo "sbatch (fake): job $n never starts: $dep not satisfied" >&2; echo failed >"$state/job-$n"; exit 0; } ;;
  *) echo "sbatch (fake): dependency $dep not simulated" >&2; exit 2 ;;
esac
tasks=$(echo "${array:-}" | tr ',' '\n' | while read -r r; do
  [ -n "$r" ] || continue
  case $r in *-*) seq "${r%-*}" "${r#*-}" ;; *) echo "$r" ;; esac
done)
# the array's tasks in a shuffled order, four at a time (as on four nodes); each task's status
# in a file, the job ok when every one is
tasks=$(printf '%s\n' ${tasks:-none} | shuf)
echo "sbatch (fake): job $n runs its tasks in the order" $tasks >&2
running=0
for t in $tasks; do
  log=$(echo "${output:-slurm-%j.out}" | sed "s/%A/$n/g; s/%a/$t/g; s/%j/$n/g")
  if [ "$t" = none ]; then
    (env SLURM_JOB_ID=$n SLURM_CPUS_PER_TASK=$cpus sh -c "${wrap:-bash $script}" >"$log" 2>&1; echo $? >"$state/st-$n-$t") &
  else
    (env SLURM_JOB_ID=$n SLURM_ARRAY_JOB_ID=$n SLURM_ARRAY_TASK_ID=$t SLURM_CPUS_PER_TASK=$cpus bash "$script" \
      >"$log" 2>&1; echo $? >"$state/st-$n-$t") &
  fi
  running=$((running + 1))
  if [ $running = 4 ]; then wait; running=0; fi
done
wait
st=ok
for t in $tasks; do
  log=$(echo "${output:-slurm-%j.out}" | sed "s/%A/$n/g; s/%a/$t/g; s/%j/$n/g")
  [ "$(cat "$state/st-$n-$t")" = 0 ] || { st=failed; echo "sbatch (fake): job $n task $t failed:" >&2; cat "$log" >&2; }
done
echo $st >"$state/job-$n"
if [ $parsable = 1 ]; then echo $n; else echo "Submitted batch job $n"; fi
EOF

# ---- fake kubectl: apply -f JOB.yaml (runs the Job: its command per completion index) and
# wait --for=condition=complete job/NAME
cat >"$DIR/bin/kubectl" <<'EOF'
#!/bin/sh
set -eu
state=${FAKE_SCHED_STATE:?}
case ${1:-} in
  apply)
    [ "$2" = -f ] || { echo "kubectl (fake): apply $2 not simulated" >&2; exit 2; }
    y=$3
    [ "$(sed -n 's/^kind: //p' "$y")" = Job ] || { echo "kubectl (fake): not a Job" >&2; exit 1; }
    name=$(sed -n 's/^  name: //p' "$y" | head -n 1)
    mode=$(sed -n 's/^  completionMode: //p' "$y")
    n=$(sed -n 's/^  completions: *\([0-9]*\).*/\1/p' "$y"); n=${n:-1}
    # command: ["a", "b", ...] (plain strings) -> one argument a line
    sed -n 's/^ *command: *\[\(.*\)\] *$/\1/p' "$y" | sed 's/^"//; s/"$//; s/", "/\n/g' >"$state/cmd-$name"
    [ -s "$state/cmd-$name" ] || { echo "kubectl (fake): no command in $y" >&2; exit 1; }
    par=$(sed -n 's/^  parallelism: *\([0-9]*\).*/\1/p' "$y"); par=${par:-1}
    # the completion indexes in a shuffled order, `parallelism` pods at a time
    order=$(seq 0 $((n - 1)) | shuf)
    echo "kubectl (fake): job $name runs its indexes in the order" $order >&2
    running=0
    for i in $order; do
      idx=; [ "$mode" = Indexed ] && idx=$i
      # the container's command, its arguments one per line (none holds a newline)
      (env ${idx:+JOB_COMPLETION_INDEX=$idx} sh -c 'set --; while IFS= read -r a; do set -- "$@" "$a"; done <"$0"; exec "$@"' \
           "$state/cmd-$name" >"$state/log-$name-$i" 2>&1; echo $? >"$state/st-$name-$i") &
      running=$((running + 1))
      if [ $running = "$par" ]; then wait; running=0; fi
    done
    wait
    st=complete
    for i in $order; do
      [ "$(cat "$state/st-$name-$i")" = 0 ] ||
        { st=failed; echo "kubectl (fake): job $name index $i failed:" >&2; cat "$state/log-$name-$i" >&2; }
    done
    echo $st >"$state/k8s-$name"
    echo "job.batch/$name created" ;;
  wait)
    shift; name=
    for a in "$@"; do case $a in job/*) name=${a#job/} ;; --for=condition=complete|--timeout=*) ;;
      *) echo "kubectl (fake): wait $a not simulated" >&2; exit 2 ;; esac; done
    [ "$(cat "$state/k8s-$name" 2>/dev/null)" = complete ] || { echo "job $name failed" >&2; exit 1; }
    echo "job.batch/$name condition met" ;;
  *) echo "kubectl (fake): $* not simulated" >&2; exit 2 ;;
esac
EOF
chmod +x "$DIR/bin/sbatch" "$DIR/bin/kubectl"

# ---- the README's code block holding `$ cat FIRST`, into DIR/NAME: its files and run.sh
extract() { # extract FIRST NAME
  mkdir -p "$DIR/$2"
  awk -v first="$1" -v d="$DIR/$2" '
    function flush() { if (file != "") close(file); file = "" }
    /^    \$ / { if ($0 == "    $ cat " first) on = 1 }
    on && !/^    / && !/^$/ { exit }            # the end of the block
    !on { next }
    /^    \$ cat / { flush(); cmd = 0; file = d "/" substr($0, 11); printf "" > file; next }
    /^    \$ / { flush(); cmd = 1; print substr($0, 7) >> (d "/run.sh"); prev = $0; next }
    cmd && /^        / && prev ~ /\\$/ { print substr($0, 5) >> (d "/run.sh"); prev = $0; next }
    { cmd = 0 }
    file != "" { print (length($0) > 4 ? substr($0, 5) : "") >> file }
    { prev = $0 }' "$README"
  [ -s "$DIR/$2/run.sh" ] || fail "no \`\$ cat $1\` example with commands in $README"
}
extract merge.sbatch slurm
extract merge-job.yaml k8s

for ex in slurm k8s; do
  E=$DIR/$ex
  root=/shared; [ $ex = k8s ] && root=/data
  mkdir -p "$E/state" "$E$root/models" "$E$root/adapters" # not $root/out: the example makes it
  ln -s "$BASE" "$E$root/models/Llama-3.1-405B"
  ln -s "$AD" "$E$root/adapters/my-lora"
  for f in "$E"/*; do # the example's paths, under E
    if [ -f "$f" ]; then sed -i "s#$root/#$E$root/#g" "$f"; fi
  done
  grep -q "$E$root/out/" "$E/run.sh" "$E"/*.sbatch "$E"/*.yaml 2>/dev/null || fail "$ex: no $root/out/ in the example"
  (cd "$E" && PATH="$DIR/bin:$PATH" FAKE_SCHED_STATE="$E/state" sh -e run.sh) >"$E/out.log" 2>&1 ||
    { cat "$E/out.log" >&2; fail "$ex: the example's commands failed"; }
  [ -f "$E$root/out/merged-405b/model.safetensors.index.json" ] ||
    { cat "$E/out.log" "$E"/logs/* >&2 2>/dev/null; fail "$ex: no merged model (finalize did not run?)"; }
  echo "$E$root/out/merged-405b"
done
