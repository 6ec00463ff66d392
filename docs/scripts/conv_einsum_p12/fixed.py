import torch, time, statistics, torch.nn.functional as F
torch.set_num_threads(1)
def bench(fs, n=300):
    t = {k: [] for k in fs}
    for f in fs.values(): f()
    for i in range(n):
        for k, f in fs.items():
            c = time.process_time(); f(); t[k].append(time.process_time() - c)
    for k in fs: print(f"  {k:40s} {1e6*statistics.median(t[k]):7.1f} us")
x = torch.randn(1, 2, 3, 3); w = torch.randn(2, 2, 3, 3); g = torch.randn(1, 2, 3, 3)
a = torch.randn(2, 2)
bench({
 "F.conv2d tiny": lambda: F.conv2d(x, w, padding=1),
 "F.conv_transpose2d tiny": lambda: F.conv_transpose2d(x, w, padding=1),
 "convolution_backward weight tiny": lambda: torch.ops.aten.convolution_backward(g, x, w, None, [1,1], [1,1], [1,1], False, [0,0], 1, [False, True, False]),
 "convolution_backward both tiny": lambda: torch.ops.aten.convolution_backward(g, x, w, None, [1,1], [1,1], [1,1], False, [0,0], 1, [True, True, False]),
 "torch.einsum tiny": lambda: torch.einsum("ab,bc->ac", a, a),
 "torch.mm tiny": lambda: torch.mm(a, a),
})
