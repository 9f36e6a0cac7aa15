#!/usr/bin/env bash
# The whole GPU measurement in one command (< 7 minutes on an H100/H200), everything written to $OUT:
#   ours.jsonl        this project's cases (benchmarks/gpu_suite.py), one JSON object per line; group e2e is the real
#                     `danet train` loop (loader, augmentation, logging) on ADE20K-layout JPEGs it writes to
#                     $E2E_DATA (default /tmp/danet-e2e-data, not $OUT), work dirs in $E2E_WORK (/tmp/danet-e2e-work)
#   anchor_gpu.json   mmsegmentation 1.2.2 (../shared/peers/gpu_anchor_mmseg.py --cudnn-benchmark --skip-pam)
#   anchor_ssseg.json sssegmentation 1.7.0 (../shared/peers/gpu_anchor_ssseg.py)
#   profile.txt       top CUDA kernels of the Triton-loss train step with PyTorch's and with the fused batch norm
#   summary.md        the tables for benchmarks/RESULTS.md (benchmarks/summarize_gpu.py), printed last
#   log.txt           everything printed
# Before: `bash benchmarks/gpu_prepare.sh` here (wheels + peer scripts into .whl/, carried with carry=[".whl"]).
# Device:  bash benchmarks/gpu_bench.sh   (BUDGET_S=420: seconds after which no case starts; ANCHORS=0 skips the
#          peers, whose figures then come from an earlier run on the same kind of card: PEERS_DIR=that run's folder;
#          ANCHORS=infer runs mmseg's inference cases alone, ~30 s: benchmarks/gpu_mmseg_infer.py;
#          GROUPS_CORE="sys loss train profile" and COMPILE=0 shorten it, ONLY="a b" keeps the train / infer / e2e /
#          compile cases whose label contains a or b; PROFILE_CASES="label ..." the profile group's cases;
#          E2E_ITERS=50, E2E_WARMUP=10 and
#          E2E_WORKERS=8 size the e2e runs: ~10-25 s in all after the train group, ~1 min alone (cuDNN autotuning
#          and the compiled loss then happen in its first run's warm-up))
# Here:    bash benchmarks/gpu_bench.sh --cpu-smoke     (tiny sizes on the CPU: checks every step of the script; exits 1
#          if a case recorded an error)
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
[[ "${1:-}" == "--cpu-smoke" ]] && SMOKE=1
export OUT=${OUT:-/tmp/danet-gpu-out} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
PY=${PYTHON:-python3}                      # the device's python3 holds PyTorch
PEER_PY=${PEER_PYTHON:-$PY}
BUDGET=${BUDGET_S:-420}
ANCHORS=${ANCHORS:-1}
GROUPS_CORE=${GROUPS_CORE:-sys loss norm train e2e profile eval infer}  # gpu_suite.py groups; COMPILE=0: no torch.compile
COMPILE=${COMPILE:-1}
T0=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - T0))); }
stage() { echo; echo "=== $* (t=$(($(date +%s) - T0)) s)"; }

stage "environment"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,driver_version --format=csv || true
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"

stage "install the peers' wheels into /tmp/site"
SITE=${SITE:-/tmp/site}
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/peers/*.whl \
  || echo "WARNING: wheel install failed; the anchors will fail"
export PYTHONPATH="$PWD/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
rm -f "$OUT/ours.jsonl"
SUITE_RC=0

SMOKE_ARG=(); QUICK=()
[[ $SMOKE == 1 ]] && SMOKE_ARG=(--smoke) && QUICK=(--quick)
# the Triton loss on the CPU: Triton's interpreter (needs the triton package: the [test] extra)
[[ $SMOKE == 1 ]] && export TRITON_INTERPRET=1
lim() { local t=$1; ((t > $(left))) && t=$(left); ((t < 5)) && t=5; echo $t; }  # seconds, capped by the budget
if [[ $ANCHORS == infer ]]; then
  stage "anchor: mmsegmentation, inference cases only"
  timeout $(lim 90) $PEER_PY benchmarks/gpu_mmseg_infer.py --out "$OUT" "${QUICK[@]}" \
    || echo "WARNING: mmseg inference anchor exited $?"
elif ((ANCHORS)); then
  stage "anchor: mmsegmentation"
  (cd .whl/peer_scripts && timeout $(lim 150) $PEER_PY gpu_anchor_mmseg.py --cudnn-benchmark --skip-pam "${QUICK[@]}" \
    --out "$OUT") || echo "WARNING: mmseg anchor exited $?"
  stage "anchor: sssegmentation"
  (cd .whl/peer_scripts && timeout $(lim 90) $PEER_PY gpu_anchor_ssseg.py) || echo "WARNING: ssseg anchor exited $?"
fi
stage "ours: $GROUPS_CORE"
ONLY_ARG=()
[[ -n "${ONLY:-}" ]] && read -ra ONLY_WORDS <<< "$ONLY" && ONLY_ARG=(--only "${ONLY_WORDS[@]}")
[[ -n "${PROFILE_CASES:-}" ]] && read -ra PROFILE_WORDS <<< "$PROFILE_CASES" && ONLY_ARG+=(--profile "${PROFILE_WORDS[@]}")
timeout $(lim $(($(left) - 5))) $PY benchmarks/gpu_suite.py $GROUPS_CORE "${SMOKE_ARG[@]}" "${ONLY_ARG[@]}" \
  --budget-s $(($(left) - 60 * COMPILE)) || { SUITE_RC=$?; echo "WARNING: gpu_suite core exited $SUITE_RC"; }
if ((COMPILE)) && { (($(left) > 60)) || ((SMOKE)); }; then
  stage "ours: torch.compile"
  timeout $(lim $(left)) $PY benchmarks/gpu_suite.py compile "${SMOKE_ARG[@]}" "${ONLY_ARG[@]}" \
    --budget-s $(($(left) - 50)) \
    || { SUITE_RC=$?; echo "WARNING: gpu_suite compile exited $SUITE_RC"; }
fi
stage "summary"
$PY benchmarks/summarize_gpu.py "$OUT" --md "$OUT/summary.md" ${PEERS_DIR:+--peers "$PEERS_DIR"} \
  || echo "WARNING: summary failed"
echo "done in $(($(date +%s) - T0)) s"
if ((SMOKE)); then  # on the CPU every case must run: an error recorded there is a bug (on a GPU it is data)
  if ((SUITE_RC)) || [[ ! -s $OUT/ours.jsonl ]]; then
    echo "CPU SMOKE FAILED: gpu_suite.py exited $SUITE_RC, $OUT/ours.jsonl has $(wc -l < "$OUT/ours.jsonl" 2>/dev/null || echo no) lines"
    exit 1
  fi
  if grep -iE '"[a-z0-9_-]*error"' "$OUT/ours.jsonl"; then
    echo "CPU SMOKE FAILED: the cases above recorded errors"
    exit 1
  fi
fi
