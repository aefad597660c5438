#!/usr/bin/env bash
# One prepared accelerator session (run from the repository root on the lent GPU machine; $OUT collects results):
# environment, a correctness smoke test of the compiled kernels against the jnp reference, the attention benchmark
# (all peers, per-stage times), the training benchmark, then the golden tests on the GPU with what time is left.
# Each step has its own time limit so one slow step cannot take the others' results with it.
set -u
OUT=${OUT:-out/gpu_session}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
rm -rf /tmp/site
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
step() { local limit=$1 name=$2; shift 2; echo "=== $name ($(date +%T), limit ${limit}s)"; \
         timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v -E 'done$|^I[0-9]|^W[0-9]'; }
step 20 env bash -c 'nvidia-smi -L; python3 -c "import jax, jaxlib, flax, optax, sys; print(sys.version.split()[0], \
  jax.__version__, jaxlib.__version__, flax.__version__, optax.__version__, jax.devices())"'
step 90 smoke python3 - <<'PY'
import jax, jax.numpy as jnp, numpy as np
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
step 230 attention python3 scripts/benchmark_attention.py --seqs 1024,4096,16384 --repeats 10 --json "$OUT/attention.json"
step 100 attention_long python3 scripts/benchmark_attention.py --seqs 65536,131072 --tokens 65536 --repeats 5 \
  --skip dense_xla --json "$OUT/attention_long.json"
step 150 train python3 scripts/benchmark_train.py --seqs 4096,512,16384 --steps 5 --json "$OUT/train.json"
step 90 golden python3 -m pytest -q -p no:cacheprovider -k "not pallas_tpu" tests/test_attention_golden.py tests/test_models_golden.py
echo "=== end $(date +%T)"
