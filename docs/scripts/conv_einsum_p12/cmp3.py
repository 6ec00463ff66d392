import sys, torch
import tnbackpack.tn.conv_einsum.steps as st
from tnbackpack.tn import autotune
from tnbackpack.tn.conv_einsum import conv_einsum
from tnbackpack.benchmark.conv_einsum import FACTORIZATIONS, factor_shapes, sequence, time_both
torch.set_num_threads(1)
orig = autotune.fastest
def forced(key, cands):
    f = st.EXPERIMENT.get("force")
    if f:
        for n in f:
            if n in cands: return n, cands[n]()
    if st.EXPERIMENT.get("force_not") and "mm" in cands:
        cands = {k: v for k, v in cands.items() if k != "mm"}
        return orig(("old",) + key, cands)
    return orig(key, cands)
st.autotune.fastest = forced
MODES = {"ce": {}, "mm": {"force": ("mm",)}, "old": {"force_not": "mm"}}
rows = [(n, int(c), int(s), int(r)) for n, c, s, r in (a.split(":") for a in sys.argv[1:])]
for name, C, S, R in rows:
    eq = FACTORIZATIONS[name][0]
    g = torch.Generator().manual_seed(0)
    fs = [(torch.randn(s, generator=g)*0.3).requires_grad_() for s in factor_shapes(name, C, R)]
    x = torch.randn(32, C, S, S, generator=g).requires_grad_()
    gy = torch.randn(32, C, S, S)
    def mk(m):
        def f():
            st.EXPERIMENT.clear(); st.EXPERIMENT.update(MODES[m]); conv_einsum(eq, x, *fs, padding=1).backward(gy)
        return f
    V = {m: mk(m) for m in MODES}
    V["sq"] = lambda: sequence(name, x, fs).backward(gy)
    def clean():
        x.grad = None
        for f in fs: f.grad = None
    for f in V.values(): f(); clean()
    cpu, wall = time_both(V, clean, 21, 30)
    print(f"{name} {C}@{S} R={R}: " + " ".join(f"{k} {v:.1f}" for k, v in cpu.items()) + " | sq/x: " + " ".join(f"{k} {cpu['sq']/v:.2f}" for k, v in cpu.items()), flush=True)
