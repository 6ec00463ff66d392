"""New layout policy (nchw + 1x1 convolutions at <= 64 positions) vs the old one (channels-last always), interleaved."""
import sys, torch
from tnbackpack.tn.conv_einsum import conv_einsum, evaluate
from tnbackpack.benchmark.conv_einsum import FACTORIZATIONS, factor_shapes, sequence, time_both
torch.set_num_threads(1)
rows = [(n, int(c), int(s), int(r)) for n, c, s, r in (a.split(":") for a in sys.argv[1:])]
for name, C, S, R in rows:
    eq = FACTORIZATIONS[name][0]
    g = torch.Generator().manual_seed(0)
    fs = [(torch.randn(s, generator=g) * 0.3).requires_grad_() for s in factor_shapes(name, C, R)]
    x = torch.randn(32, C, S, S, generator=g).requires_grad_()
    gy = torch.randn(32, C, S, S, generator=g)
    def run(limit):
        def f():
            evaluate.NCHW_MAX_POSITIONS = limit
            conv_einsum(eq, x, *fs, padding=1).backward(gy)
        return f
    V = {"old": run(0), "new": run(49), "sequence": lambda: sequence(name, x, fs).backward(gy)}
    def clean():
        x.grad = None
        for f in fs: f.grad = None
    for f in V.values(): f(); clean()
    cpu, _ = time_both(V, clean, 21, 25)
    print(f"{name:8s} {C}@{S}² R={R}: old {cpu['old']:.1f} new {cpu['new']:.1f} sequence {cpu['sequence']:.1f} ms | "
          f"new/old {cpu['new']/cpu['old']:.2f}, speedup vs sequence old {cpu['sequence']/cpu['old']:.2f}x new {cpu['sequence']/cpu['new']:.2f}x", flush=True)
