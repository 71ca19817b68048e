#!/bin/sh
# Cold and warm first-call seconds of one kernel loop (linear_fwd at every storage width, the 4-bit
# lstm_layer_fwd, then a 4-bit LM engine), each in a fresh process, the first with an empty Numba
# cache. Inside the sandbox:
#   /work/shared/tools/arm64-sandbox run --cpu cortex-a76 -- sh tests/arm64/cold_compile.sh neon-dotprod
loop="${1:?usage: cold_compile.sh LOOP}"
cache="/tmp/numba-cold-$loop"
rm -rf "$cache"
for run in cold warm; do
  NUMBA_CACHE_DIR="$cache" G2QUANT_KERNEL="$loop" python -c "
import json, sys
sys.path.insert(0, '.')
from benchmarks.kernels import run_task
print('$loop', '$run', json.dumps(run_task({'kind': 'compile', 'loop': '$loop'})))"
done
