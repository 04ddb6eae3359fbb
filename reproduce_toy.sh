#!/usr/bin/env bash
# Every toy-world result in the README (results/), then the figures and the claims report.
# (The scripts alone write to runs/<model>/<exp>/, so they never touch these reference results.)
# Two lanes of one-thread runs share the 2 CPU cores; every command resumes (finished runs are
# skipped), so re-running this script after an interruption continues where it stopped.
#   bash reproduce_toy.sh            # both lanes in parallel, then `final`
#   bash reproduce_toy.sh a|b|final  # one lane, or only the summaries and figures
#   PYTHON=.venv/bin/python bash reproduce_toy.sh   # the interpreter (default: `python`, e.g. an active venv)
# Reduced sweeps, for the 2-core time budget (README "Toy-world results"): exp03 runs tau in
# {0, 0.05, 0.2} (the script's default adds 0.01), exp04 coverages {1, 64, fresh} (default adds 8, 256).
# Each command is a stage, announced as "[mm:ss] stage a: COMMAND" (time since the start) in its
# lane's log and on the terminal; the logs hold the scripts' plain per-step lines (no bars there).
set -euo pipefail
cd "$(dirname "$0")"
exec 3>&1  # where this script was started (the terminal): the lanes' stage lines go there too
stage() {  # stage NAME...: "[mm:ss] stage: NAME" (time since the start) in the log and the terminal
  local line
  line=$(printf '[%02d:%02d] stage%s: %s' $((SECONDS / 60)) $((SECONDS % 60)) "${LANE:+ $LANE}" "$*")
  echo "$line"
  [ /dev/fd/1 -ef /dev/fd/3 ] || echo "$line" >&3
}
py() { stage "$*"; "${PYTHON:-python}" "$@"; }  # every command below is a stage
PY=py
RUN="--threads 1 --resume"
SEEDS=0,1,2
DH=results/controls/drop_hedge
EXP02="exp02_onpolicy_grpo_sdpo.py --out-dir results/exp02"
EXP03="exp03_ema_teacher.py --ema-rates 0,0.05,0.2 --out-dir results/exp03"
EXP04="exp04_coverage.py --coverages 1,64,fresh --out-dir results/exp04"
mkdir -p results/logs

lane_a() {
  $PY $EXP02 --seeds $SEEDS $RUN
  $PY $EXP03 --seeds 0,1 $RUN
  $PY $EXP04 --seeds 0 $RUN
}

lane_b() {
  $PY exp01_offpolicy.py --seeds $SEEDS $RUN --out-dir results/exp01
  # Control (token vs behaviour): the base continued-pretrained on a corpus that omits half the
  # `maybe`s while still backtracking, then the same SDPO c = s run as exp02.
  [ -f $DH/model/model.safetensors ] || $PY toy_world.py pretrain --init-from toy_model --p-drop-hedge 0.5 \
      --seed 3 --steps 2000 --lr 5e-4 --threads 1 --out-dir $DH/model
  $PY exp02_onpolicy_grpo_sdpo.py --model $DH/model --method sdpo --teacher-context s --seeds $SEEDS $RUN \
      --out-dir $DH/exp02
  $PY $EXP04 --seeds 1 $RUN
  $PY $EXP03 --seeds 2 $RUN
  $PY $EXP04 --seeds 2 $RUN
}

final() {  # every run is finished: the 3-seed summaries, the figures and the claims report
  $PY $EXP02 --seeds $SEEDS $RUN
  $PY $EXP03 --seeds $SEEDS $RUN
  $PY $EXP04 --seeds $SEEDS $RUN
  $PY make_figures.py
}

case "${1:-all}" in
  a) lane_a ;;
  b) lane_b ;;
  final) final ;;
  all) start=$SECONDS
       LANE=a lane_a > results/logs/lane_a.log 2>&1 & a=$!
       LANE=b lane_b > results/logs/lane_b.log 2>&1 & b=$!
       wait $a; wait $b
       final
       echo "reproduce_toy.sh: $((SECONDS - start)) s" ;;
  *) echo "usage: bash reproduce_toy.sh [a|b|final]" >&2; exit 2 ;;
esac
