#!/usr/bin/env bash
# The runs behind bench/results/passkey-cpu.md, in priority order (about 80 minutes on 2 CPU cores).
# One sample per depth; the long lengths and the baselines get fewer depths to fit the machine's time.
set -u
out=${1:-bench/out}
mkdir -p "$out"
run() {
  [ -e "$out/$1-$2.json" ] && return
  .venv/bin/python -m bench.passkey --samples 1 --json "$out/$1-$2.json" --method "$1" --length "$2" --depths "${@:3}" \
    2>>"$out/log.txt" | tee -a "$out/summary.txt"
}
five="0 0.25 0.5 0.75 1"
three="0 0.5 1"
for n in 4096 8192 16384 32768; do run infllm $n $five; done
run infllm 65536 $three
run infllm 131072 0.25 0.75
for n in 4096 8192; do run full $n $five; done
run full 16384 $three
for n in 4096 8192 16384 32768; do run streaming $n $three; done
run streaming 65536 0.5
run full 32768 0.5
run streaming 131072 0.5
