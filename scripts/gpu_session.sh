#!/usr/bin/env bash
# One prepared accelerator session, run from the repository root on the lent GPU machine (logs and JSON results
# end up in $OUT/gpu_session.tgz):
#   STEPS="env smoke train attention golden" bash scripts/gpu_session.sh     (the default; "tune" is a step too)
# The steps' limits add up to more than one device call may run (600 s) and than a session's device time (900 s):
# choose, e.g. STEPS="env smoke tune train" in one call, then STEPS="attention" with the time that is left.
# env: versions; smoke: the compiled kernels against the jnp reference inside mra_attention (forward and gradients);
# attention: scripts/benchmark_attention.py (all peers, per-stage times), one call per length so a timeout loses one
# row only; tune: scripts/tune_gpu_kernels.py (launch settings per kernel, bf16); train: scripts/benchmark_train.py
# (base size; its first compile took > 2 min on an H200); golden: the golden tests on the GPU. Each step has its own
# time limit. Missing packages travel as wheels in .whl (see /work/.library/device/README.md); the image's own
# flax/jax are kept (flax 0.12.8 does not import on jax 0.11.2).
set -u
case "${1:-}" in
  -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  "") ;;
  *) echo "gpu_session.sh: unknown argument '$1' (it takes none: choose steps with STEPS=\"...\"; --help)" >&2; exit 2 ;;
esac
OUT=${OUT:-out/gpu_session}; LOGS=$(mktemp -d)/gpu_session; mkdir -p "$OUT" "$LOGS"
STEPS=${STEPS:-"env smoke train attention golden"}
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
rm -rf /tmp/site
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
run() { local limit=$1 name=$2; shift 2; echo "=== $name ($(date +%T), limit ${limit}s)"; \
        timeout "$limit" "$@" 2>&1 | tee "$LOGS/$name.log" | grep -v -E 'done$|^I[0-9]|^W[0-9]'; }
for step in $STEPS; do case $step in
env) run 20 env bash -c 'nvidia-smi -L; python3 -c "import jax, jaxlib, flax, optax, sys; print(sys.version.split()[0], \
  jax.__version__, jaxlib.__version__, flax.__version__, optax.__version__, jax.devices())"' ;;
smoke) run 90 smoke python3 - <<'PY'
import jax, jax.numpy as jnp
from mra_jax.attention import mra_attention
for dtype, tol in ((jnp.float32, 1e-4), (jnp.bfloat16, 3e-2)):
    for masked in (False, True):
        ks = jax.random.split(jax.random.key(1), 4)
        q, k, v, w = (jax.random.normal(x, (2, 1024, 4, 64), dtype) for x in ks)
        mask = (jnp.arange(1024)[None] < jnp.array([[1024], [700]])).astype(jnp.int32) if masked else None
        def loss(q, k, v, impl):
            o = mra_attention(q, k, v, mask, num_blocks=256, implementation=impl)
            return jnp.sum(o.astype(jnp.float32) * w.astype(jnp.float32)), o
        outs = {impl: jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)(
            q, k, v, impl) for impl in ("pallas", "reference")}
        (_, o1), g1 = outs["pallas"]; (_, o2), g2 = outs["reference"]
        errs = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))) /
                      (float(jnp.max(jnp.abs(b.astype(jnp.float32)))) + 1e-30)) for a, b in zip((o1, *g1), (o2, *g2))]
        print(jnp.dtype(dtype).name, "masked" if masked else "unmasked", "rel err o,dq,dk,dv:",
              " ".join(f"{e:.2e}" for e in errs), "OK" if max(errs) < tol else "FAIL")
PY
;;
attention)
  for seq in 1024 4096 16384; do
    run 80 "attention_$seq" python3 scripts/benchmark_attention.py --seqs $seq --repeats 10 --json "$LOGS/attention_$seq.json"
  done
  for seq in 65536 131072; do
    run 80 "attention_$seq" python3 scripts/benchmark_attention.py --seqs $seq --tokens $seq --repeats 5 \
      --skip dense_xla,mra_reference --json "$LOGS/attention_$seq.json"
  done ;;
tune) run 300 tune python3 scripts/tune_gpu_kernels.py --json "$LOGS/tune.json" ;;
train) run 300 train python3 scripts/benchmark_train.py --seqs 4096,16384 --steps 5 --json "$LOGS/train.json" ;;
golden) run 100 golden python3 -m pytest -q -p no:cacheprovider -k "not pallas_tpu" tests/test_attention_golden.py \
  tests/test_models_golden.py ;;
*) echo "unknown step $step" ;;
esac; done
tar czf "$OUT/gpu_session.tgz" -C "$(dirname "$LOGS")" gpu_session  # one file: the tool returns 8 at most
echo "=== end $(date +%T)"
