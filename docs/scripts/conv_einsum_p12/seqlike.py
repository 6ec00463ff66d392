"""All-NCHW mode with oneDNN 4-d 1x1 convolutions for channel products (experiment)."""
import sys, torch, torch.nn.functional as F
import tnbackpack.tn.conv_einsum.evaluate as ev
import tnbackpack.tn.conv_einsum.steps as st
from tnbackpack.tn.conv_einsum import conv_einsum
from tnbackpack.benchmark.conv_einsum import FACTORIZATIONS, factor_shapes, sequence, time_both
torch.set_num_threads(1)
MODE = {"on": False}
orig_step, orig_mm = ev.run_step, ev.run_matmul
def contiguous_in(t, letters):
    order = st.memory_order(t, letters)
    return order if st._arrange(t, letters, order).is_contiguous() else None
def mm4(a, la, b, lb, out, channels_last=True):
    if MODE["on"] and a.ndim == 4 and b.ndim == 4 or (MODE["on"] and a.ndim == 4 and b.ndim == 2) or (MODE["on"] and a.ndim == 2 and b.ndim == 4):
        if a.ndim == 2 and b.ndim == 4:
            a, la, b, lb = b, lb, a, la
        oa = contiguous_in(a, la)
        if b.ndim == 2 and oa:
            k = [c for c in la if c in lb and c not in out]
            if len(k) == 1 and oa[1] == k[0]:
                free_b = [c for c in lb if c != k[0]][0]
                w = st._arrange(b, lb, free_b + k[0])[:, :, None, None]
                y = F.conv2d(st._arrange(a, la, oa), w)
                return y, oa[0] + free_b + oa[2:]
        ob = contiguous_in(b, lb) if b.ndim == 4 else None
        if b.ndim == 4 and oa and ob and oa[0] == ob[0] and oa[2:] == ob[2:]:
            k = oa[0] + oa[2:]
            if all(c not in out for c in k):
                x4, g4 = st._arrange(a, la, oa), st._arrange(b, lb, ob)
                w = x4.new_empty(g4.shape[1], x4.shape[1], 1, 1)
                r = torch.ops.aten.convolution_backward(g4, x4, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [False, True, False])[1]
                return r.view(g4.shape[1], x4.shape[1]), ob[1] + oa[1]
    return orig_mm(a, la, b, lb, out, channels_last)
ev.run_matmul = mm4
def step(s, a, b, la, lb, top=False):
    return orig_step(s, a, b, la, lb, top or MODE["on"])
ev.run_step = step
rows = [(n, int(c), int(s), int(r)) for n, c, s, r in (a.split(":") for a in sys.argv[1:])]
for name, C, S, R in rows:
    eq = FACTORIZATIONS[name][0]
    g = torch.Generator().manual_seed(0)
    fs = [(torch.randn(s, generator=g)*0.3).requires_grad_() for s in factor_shapes(name, C, R)]
    x = torch.randn(32, C, S, S, generator=g).requires_grad_()
    gy = torch.randn(32, C, S, S)
    def run(on):
        def f():
            MODE["on"] = on; conv_einsum(eq, x, *fs, padding=1).backward(gy); MODE["on"] = False
        return f
    V = {"ce": run(False), "seqlike": run(True), "sq": lambda: sequence(name, x, fs).backward(gy)}
    def clean():
        x.grad = None
        for f in fs: f.grad = None
    # correctness of the experiment
    run(True)(); got = [x.grad.clone()] + [f.grad.clone() for f in fs]; clean()
    run(False)(); ref = [x.grad.clone()] + [f.grad.clone() for f in fs]; clean()
    err = max(((u - v).abs().max() / v.abs().max()).item() for u, v in zip(got, ref))
    cpu, _ = time_both(V, clean, 21, 25)
    print(f"{name} {C}@{S} R={R}: " + " ".join(f"{k} {v:.1f}" for k, v in cpu.items()) + f" | sq/ce {cpu['sq']/cpu['ce']:.2f} sq/seqlike {cpu['sq']/cpu['seqlike']:.2f} relerr {err:.1e}", flush=True)
