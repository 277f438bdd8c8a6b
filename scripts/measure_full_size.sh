#!/usr/bin/env bash
# Loading, quantizing, converting, saving and reloading FLUX.1 at its real size, each step in its own
# process under /usr/bin/time -v: wall time and peak resident memory against the weights' size.
#
#   scripts/measure_full_size.sh BIG [STEP ...]
#
# BIG is where scripts/make_full_size.py wrote FLUX.1-schnell/ and flux1-schnell.safetensors (disk: the
# steps need about 60 GB at once, see docs/full-size.md for the order that keeps within it). STEPs:
# load (q4, q8, each with and without low_memory), convert, save, reload, verify, block, forward, dev,
# repel, table; default all but dev and repel. Q4=FOLDER picks the 4-bit folder of block and forward (default BIG/saved-q4).
# Results go to BIG/results.tsv, one line a step:
# name, wall s, peak RSS bytes, weights bytes, and the step's own JSON.
set -euo pipefail
BIG=${1:?usage: measure_full_size.sh BIG [STEP ...]}
shift
STEPS=${*:-load convert save reload verify block forward}
HERE=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH=$HERE${PYTHONPATH:+:$PYTHONPATH}
SCHNELL=$BIG/FLUX.1-schnell
Q4=${Q4:-$BIG/saved-q4}  # the 4-bit folder the block and forward steps run on
RESULTS=$BIG/results.tsv

measure() {  # measure NAME WEIGHTS_FROM CMD...: WEIGHTS_FROM is "json" or a folder whose safetensors to sum
  local name=$1 from=$2; shift 2
  local log; log=$(mktemp)
  echo "== $name: $*" >&2
  /usr/bin/time -v "$@" > "$log.out" 2> "$log" || { cat "$log" "$log.out" >&2; return 1; }
  local rss wall json bytes
  rss=$(( $(awk -F': ' '/Maximum resident set size/ {print $2}' "$log") * 1024 ))
  wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$log" |
         awk -F: '{s = 0; for (i = 1; i <= NF; i++) s = s * 60 + $i; print s}')
  json=$(sed -n 's/^RESULT //p' "$log.out" | tail -1)
  if [ "$from" = json ]; then
    bytes=$(python -c 'import json, sys; print(sum(json.loads(sys.argv[1])["weights_bytes"].values()))' "$json")
  else
    bytes=$(find -L "$from" -name '*.safetensors' -printf '%s\n' | awk '{s += $1} END {printf "%.0f\n", s}')
  fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$wall" "$rss" "$bytes" "${json:-{\}}" | tee -a "$RESULTS"
  rm -f "$log" "$log.out"
}

STEP="python $HERE/scripts/full_size_step.py"  # word-split on purpose: /usr/bin/time runs it

for s in $STEPS; do
  case $s in
    load)
      for q in ${BITS:-4 8}; do  # BITS=4 for the 4-bit rows only
        measure "from_pretrained q$q" json $STEP load "$SCHNELL" -q $q
        measure "from_pretrained q$q low_memory" json $STEP load "$SCHNELL" -q $q --low-memory
      done ;;
    convert)
      rm -rf "$BIG/converted-q4"
      measure "convert BFL file -q 4" "$BIG/converted-q4" \
        python -m mlx_crepulse convert "$BIG/flux1-schnell.safetensors" --base "$SCHNELL" -q 4 -o "$BIG/converted-q4" --quiet
      measure "reload converted 4-bit folder" json $STEP load "$BIG/converted-q4" ;;
    save)
      rm -rf "$BIG/saved-q4"
      measure "from_pretrained q4 + save" json $STEP save "$SCHNELL" "$BIG/saved-q4" -q 4 ;;
    reload)
      measure "reload saved 4-bit folder" json $STEP load "$BIG/saved-q4" ;;
    verify)
      measure "reload saved 4-bit folder + compare" json $STEP verify "$BIG/saved-q4" ;;
    block)
      measure "one double + one single block, 4-bit" json $STEP block "$Q4" --tokens 1 4 16 --text 4 ;;
    forward)
      measure "full 19 + 38 blocks, 4-bit" json $STEP forward "$Q4" --image 64 --text 16 ;;
    table)  # results.tsv as the markdown table of docs/full-size.md (the last line of each step)
      python - "$RESULTS" <<'PY'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    name, wall, rss, size, info = line.rstrip("\n").split("\t")
    rows[name] = (float(wall), int(rss), int(size), json.loads(info))
G = 2 ** 30
print("| step | wall s | inside the process, s | peak RSS GiB | weights GiB | peak - weights GiB |")
print("|---|---:|---|---:|---:|---:|")
for name, (wall, rss, size, info) in rows.items():
    inner = ", ".join(f"{k[:-2]} {info[k]:.1f}" for k in ("load_s", "save_s", "forward_s") if k in info)
    inner += ", ".join(f"forward at {r['image_tokens']}+{r['text_tokens']} tokens {r['forward_s']:.1f}"
                       for r in info.get("runs", []))
    print(f"| {name} | {wall:.1f} | {inner} | {rss / G:.2f} | {size / G:.2f} | {(rss - size) / G:+.2f} |")
PY
      ;;
    dev)
      measure "from_pretrained dev q4" json $STEP load "$BIG/FLUX.1-dev" -q 4 ;;
    repel)  # dev (guidance embedding), quantized while loading, a batch of 2 repelled at every block
      measure "full depth, dev, batch 2, repulsion" json $STEP forward "$BIG/FLUX.1-dev" -q 4 --batch 2 --repulsion \
        --image 64 --text 16 ;;
    *) echo "unknown step $s" >&2; exit 2 ;;
  esac
done
