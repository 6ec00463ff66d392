import sys, torch
import tnbackpack.tn.conv_einsum.planner as pl
pl.OVERHEAD = float(sys.argv[1])
from tnbackpack.tn.conv_einsum import conv_einsum, conv_einsum_path
from tnbackpack.benchmark.conv_einsum import FACTORIZATIONS, factor_shapes, sequence, time_both
torch.set_num_threads(1)
rows = [(n, int(c), int(s), int(r)) for n, c, s, r in (a.split(":") for a in sys.argv[2:])]
for name, C, S, R in rows:
    eq = FACTORIZATIONS[name][0]
    g = torch.Generator().manual_seed(0)
    fs = [(torch.randn(s, generator=g)*0.3).requires_grad_() for s in factor_shapes(name, C, R)]
    x = torch.randn(32, C, S, S, generator=g).requires_grad_()
    gy = torch.randn(32, C, S, S)
    def ce(): conv_einsum(eq, x, *fs, padding=1).backward(gy)
    def sq(): sequence(name, x, fs).backward(gy)
    def clean():
        x.grad = None
        for f in fs: f.grad = None
    ce(); clean()
    _, info = conv_einsum_path(eq, x, *fs, padding=1)
    nsteps = len(info.forward) + sum(len(s) for _, s in info.gradients)
    cpu, wall = time_both({"ce": ce, "sq": sq}, clean, 41, 15)
    print(f"OVH={sys.argv[1]} {name} {C}@{S} R={R}: steps {nsteps} ce {cpu['ce']:.2f} sq {cpu['sq']:.2f} sq/ce {cpu['sq']/cpu['ce']:.2f}", flush=True)
