#!/usr/bin/env bash
# Every toy-world result in the README (results/), then the figures and the claims report.
# (The scripts alone write to runs/<model>/<exp>/, so they never touch these reference results.)
# A queue of one-thread jobs runs on LANES cores (default 2), longest first; every command
# resumes (finished runs are skipped), so re-running this script after an interruption continues
# where it stopped. Each job's output: results/logs/<job>.log; this terminal gets one line per
# job start and end with the elapsed time.
#   bash reproduce_toy.sh            # every job, then `final`
#   bash reproduce_toy.sh final      # only the 3-seed summaries, the figures and the claims
#   bash reproduce_toy.sh list       # the jobs and their commands
#   PYTHON=.venv/bin/python LANES=2 bash reproduce_toy.sh
# Reduced sweeps, for the 2-core time budget (README "Toy-world results"): exp03 runs tau in
# {0, 0.05, 0.2} (the script's default adds 0.01) and takes tau = 0 from exp02's SDPO c = s run
# (--frozen-from: the same run, not trained twice); exp04 coverages {1, 64, fresh} (default adds
# 8, 256). The controls' bases ship in results/controls/<name>/model; a missing one is rebuilt
# (python toy_world.py control NAME, 2,000 steps).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
LANES=${LANES:-2}
RUN="--threads 1 --resume"
R=results
EXP02="exp02_onpolicy_grpo_sdpo.py --out-dir $R/exp02"
EXP03="exp03_ema_teacher.py --ema-rates 0,0.05,0.2 --frozen-from $R/exp02 --out-dir $R/exp03"
EXP04="exp04_coverage.py --coverages 1,64,fresh --out-dir $R/exp04"
CONTROLS="drop_hedge wrong_revised filler"
control() {  # one control: its base (shipped; rebuilt when missing), then SDPO c = s
  [ -f "$R/controls/$1/model/model.safetensors" ] || $PY toy_world.py control "$1"
  $PY exp02_onpolicy_grpo_sdpo.py --model "$R/controls/$1/model" --method sdpo \
      --teacher-context s --out-dir "$R/controls/$1/exp02" "${@:2}"
}

# name|command, longest first (exp04: six runs per seed; the filler control's responses are the
# longest); exp03 last: its tau = 0 arm is exp02's finished run, copied.
JOBS=()
for k in 0 1 2; do JOBS+=("exp04_seed$k|$PY $EXP04 --seeds $k $RUN"); done
JOBS+=("control_filler|control filler --seeds 0,1,2 $RUN")
JOBS+=("exp01|$PY exp01_offpolicy.py --seeds 0,1,2 $RUN --out-dir $R/exp01")
for k in 0 1 2; do JOBS+=("exp02_seed$k|$PY $EXP02 --seeds $k $RUN"); done
for c in drop_hedge wrong_revised; do JOBS+=("control_$c|control $c --seeds 0,1,2 $RUN"); done
for k in 0 1 2; do JOBS+=("exp03_seed$k|$PY $EXP03 --seeds $k $RUN"); done

start=$SECONDS
stage() { printf '[%02d:%02d] %s\n' $(((SECONDS - start) / 60)) $(((SECONDS - start) % 60)) "$*"; }

queue() {  # every job, at most LANES at a time; fails if any job failed (its log says why)
  local running=0 failed=0 job
  mkdir -p $R/logs
  for job in "${JOBS[@]}"; do
    if ((running >= LANES)); then wait -n || failed=1; running=$((running - 1)); fi
    stage "start ${job%%|*}"
    (eval "${job#*|}" > "$R/logs/${job%%|*}.log" 2>&1 && stage "done  ${job%%|*}" \
      || { stage "FAILED ${job%%|*}: see $R/logs/${job%%|*}.log"; exit 1; }) &
    running=$((running + 1))
  done
  while ((running > 0)); do wait -n || failed=1; running=$((running - 1)); done
  return $failed
}

final() {  # every run is finished: the 3-seed summaries, the figures and the claims report
  stage "final: summaries, figures, claims"
  $PY $EXP02 --seeds 0,1,2 $RUN > $R/logs/final.log
  $PY $EXP03 --seeds 0,1,2 $RUN >> $R/logs/final.log
  $PY $EXP04 --seeds 0,1,2 $RUN >> $R/logs/final.log
  for c in $CONTROLS; do control "$c" --seeds 0,1,2 $RUN >> $R/logs/final.log; done
  $PY make_figures.py
}

case "${1:-all}" in
  list) printf '%s\n' "${JOBS[@]}" ;;
  final) final ;;
  all) queue; final; stage "reproduce_toy.sh: done in $((SECONDS - start)) s" ;;
  *) echo "usage: bash reproduce_toy.sh [all|final|list]" >&2; exit 2 ;;
esac
