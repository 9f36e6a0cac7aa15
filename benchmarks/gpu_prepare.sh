#!/usr/bin/env bash
# Run HERE (with network) before the GPU call: puts what benchmarks/gpu_bench.sh needs on the device machine into
# .whl/ (ignored by git via .gitignore; the `run` call carries it with carry=[".whl"]):
#   .whl/peers/         the pure-Python wheels of mmsegmentation 1.2.2 and sssegmentation 1.7.0 and their extras
#                       (../shared/peers/gpu_wheels.sh; the device has PyTorch, OpenCV, SciPy, pandas, no index)
#   .whl/peer_scripts/  copies of the peers' harness scripts (../shared does not travel with the working tree)
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS=${DANET_PEERS_DIR:-../shared/peers}
mkdir -p .whl/peers .whl/peer_scripts
ls .whl/peers/mmsegmentation-1.2.2-*.whl .whl/peers/sssegmentation-1.7.0-*.whl >/dev/null 2>&1 \
  || bash "$PEERS/gpu_wheels.sh" .whl/peers
cp -f "$PEERS"/gpu_anchor_mmseg.py "$PEERS"/gpu_anchor_ssseg.py "$PEERS"/mmseg_danet.py "$PEERS"/ssseg_danet.py \
  "$PEERS"/ssseg_cfg.py .whl/peer_scripts/
chmod -R u+w .whl
git check-ignore -q .whl/peers || { echo "error: .whl is not ignored by git" >&2; exit 1; }
du -sh .whl; ls .whl/peers .whl/peer_scripts
# what travels: tracked + untracked-not-ignored files + .whl must stay under 64 MiB
git ls-files -co --exclude-standard -z | du -ch --files0-from=- 2>/dev/null | tail -1 | sed 's/^/working tree without .whl: /'
