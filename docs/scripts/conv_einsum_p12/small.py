import torch
from tnbackpack.tn.conv_einsum import conv_einsum
from tnbackpack.benchmark.conv_einsum import sequence, time_both
torch.set_num_threads(1)
eq = "nchw,rc,rh,rw,or->nohw|hw"
g = torch.Generator().manual_seed(0)
fs = [torch.randn(s, generator=g).requires_grad_() for s in ((8, 16), (8, 3), (8, 3), (32, 8))]
x = torch.randn(64, 16, 8, 8, generator=g).requires_grad_(); gy = torch.randn(64, 32, 8, 8, generator=g)
def clean():
    x.grad = None
    for f in fs: f.grad = None
V = {"conv_einsum": lambda: conv_einsum(eq, x, *fs, padding=1).backward(gy), "sequence": lambda: sequence("cp", x, fs).backward(gy)}
V["conv_einsum"](); clean()
cpu, wall = time_both(V, clean, 101, 20)
print("16->32 ch, 8x8, N=64, CP R=8:", {k: round(v, 2) for k, v in cpu.items()}, "sequence/conv_einsum %.2f" % (cpu["sequence"] / cpu["conv_einsum"]))
