import sys, torch
import tnbackpack.tn.conv_einsum.evaluate as ev
from tnbackpack.tn.conv_einsum import conv_einsum
from tnbackpack.benchmark.conv_einsum import FACTORIZATIONS, factor_shapes, sequence, time_both
torch.set_num_threads(1)
MODE = {"nchw": False}
orig = ev.run_step
def patched(step, a, b, la, lb, top=False):
    return orig(step, a, b, la, lb, top or MODE["nchw"])
ev.run_step = patched
rows = [(n, int(c), int(s), int(r)) for n, c, s, r in (a.split(":") for a in sys.argv[1:])]
for name, C, S, R in rows:
    eq = FACTORIZATIONS[name][0]
    g = torch.Generator().manual_seed(0)
    fs = [(torch.randn(s, generator=g)*0.3).requires_grad_() for s in factor_shapes(name, C, R)]
    x = torch.randn(32, C, S, S, generator=g).requires_grad_()
    gy = torch.randn(32, C, S, S)
    def ce(): MODE["nchw"] = False; conv_einsum(eq, x, *fs, padding=1).backward(gy)
    def cen(): MODE["nchw"] = True; conv_einsum(eq, x, *fs, padding=1).backward(gy)
    def sq(): sequence(name, x, fs).backward(gy)
    def clean():
        x.grad = None
        for f in fs: f.grad = None
    ce(); clean(); cen(); clean()
    cpu, wall = time_both({"ce": ce, "cen": cen, "sq": sq}, clean, 21, 25)
    print(f"{name} {C}@{S} R={R}: " + " ".join(f"{k} {v:.1f}" for k, v in cpu.items()) + f" ratio ce {cpu['sq']/cpu['ce']:.2f} cen {cpu['sq']/cpu['cen']:.2f}", flush=True)
