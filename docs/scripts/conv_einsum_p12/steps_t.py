import sys, time, statistics, collections, torch
import tnbackpack.tn.conv_einsum.evaluate as ev
from tnbackpack.tn.conv_einsum import conv_einsum
from tnbackpack.benchmark.conv_einsum import FACTORIZATIONS, factor_shapes, sequence
torch.set_num_threads(1)
name, C, S, R = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
eq = FACTORIZATIONS[name][0]
g = torch.Generator().manual_seed(0)
fs = [(torch.randn(s, generator=g)*0.3).requires_grad_() for s in factor_shapes(name, C, R)]
x = torch.randn(32, C, S, S, generator=g).requires_grad_()
gy = torch.randn(32, C, S, S)
T = collections.defaultdict(list)
orig = ev.run_step
def timed(step, a, b, la, lb, top=False):
    c = time.process_time(); r = orig(step, a, b, la, lb, top); T[(step.left, step.right, step.result, step.method, tuple(a[0].shape), a[0].stride(), a[1], tuple(b[0].shape), b[0].stride(), b[1], r[1], r[0].stride())].append(time.process_time() - c); return r
ev.run_step = timed
oe = ev.execute
E = collections.defaultdict(list)
def texec(network, plan, *a):
    c = time.process_time(); r = oe(network, plan, *a); E[plan.node].append(time.process_time()-c); return r
import tnbackpack.tn.conv_einsum.function as fn
fn.execute = texec
W = []
for i in range(25):
    c = time.process_time(); conv_einsum(eq, x, *fs, padding=1).backward(gy); W.append(time.process_time()-c)
    x.grad = None
    for f in fs: f.grad = None
tot = 0
for k, v in T.items():
    m = 1e3*statistics.median(v); tot += m
    print(f"{m:6.2f} ms {k}")
print("sum steps", tot)
for k, v in E.items(): print("execute node", k, 1e3*statistics.median(v))
print("whole", 1e3*statistics.median(W))
