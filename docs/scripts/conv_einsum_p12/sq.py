import time, torch, statistics, gc
import tnbackpack.tn.conv_einsum.steps as st
from tnbackpack.tn.conv_einsum import conv_einsum
from tnbackpack.benchmark.conv_einsum import FACTORIZATIONS, factor_shapes, sequence
torch.set_num_threads(1)
f0 = st._squeeze; T = []
def sqz(*a):
    t = time.thread_time(); r = f0(*a); T.append(time.thread_time() - t); return r
st._squeeze = sqz
# 16 -> 32 channels, 8x8, N=64, CP rank 8
eq = "nchw,rc,rh,rw,or->nohw|hw"
fs = [torch.randn(8, 16).requires_grad_(), torch.randn(8, 3).requires_grad_(), torch.randn(8, 3).requires_grad_(), torch.randn(32, 8).requires_grad_()]
x = torch.randn(64, 16, 8, 8).requires_grad_(); gy = torch.randn(64, 32, 8, 8)
for _ in range(5): conv_einsum(eq, x, *fs, padding=1).backward(gy)
T.clear(); W = []
for _ in range(200):
    t = time.thread_time(); conv_einsum(eq, x, *fs, padding=1).backward(gy); W.append(time.thread_time() - t)
n = len(T) // 200
per = [sum(T[i*n:(i+1)*n]) for i in range(200)]
print("calls of _squeeze per fwd+bwd", n, "median us", 1e6*statistics.median(per), "mean us", 1e6*statistics.mean(per), "max us", 1e6*max(per))
print("fwd+bwd median ms", 1e3*statistics.median(W), "mean", 1e3*statistics.mean(W))
