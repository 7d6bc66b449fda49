#!/usr/bin/env bash
# The benchmark on one GPU, at about 256M parameters per large tree (4x the CPU sizes).
# Runs from the repository root without installing: the C++ kernel is CPU-only, so on a GPU
# fused_adamw takes its XLA path. Writes into $OUT (default ./out): gpu_info.txt, copy.txt,
# gpu.txt (the table), gpu.json (raw numbers) and memory.txt (benchmarks/memory.py).
set -o pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and PyTorch share the card
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem \
  --format=csv | tee "$OUT/gpu_info.txt"
python3 -c "import jax, optax, torch; print('jax', jax.__version__, jax.devices(), \
'optax', optax.__version__, 'torch', torch.__version__)" | tee -a "$OUT/gpu_info.txt"
# The card's copy bandwidth: a 1 GiB device-to-device copy, bytes read + written per second.
python3 - <<'EOF' | tee "$OUT/copy.txt"
import time
import jax, jax.numpy as jnp
x = jnp.ones((2**28,), jnp.float32)
copy = jax.jit(lambda a: a * 1.0, donate_argnums=0)  # in place: no allocation per call
x = copy(x).block_until_ready()
start = time.perf_counter()
for _ in range(50):
    x = copy(x)
x.block_until_ready()
seconds = (time.perf_counter() - start) / 50
print(f"copy bandwidth (jax, 1 GiB read + 1 GiB write, 50 queued in-place copies): {2 * x.nbytes / seconds / 1e9:.0f} GB/s")
EOF
timeout 360 python3 benchmarks/step_time.py --scale 4 --rounds 7 --json "$OUT/gpu.json" 2>&1 \
  | tee "$OUT/gpu.txt"
timeout 120 python3 benchmarks/memory.py 2>&1 | tee "$OUT/memory.txt"
