"""Fused vs separate input/weight gradients of one convolution (idea 2), interleaved CPU-time medians."""
import torch, time, statistics
torch.set_num_threads(1)
cb = torch.ops.aten.convolution_backward
def bench(fs, n=101):
    t = {k: [] for k in fs}
    for f in fs.values(): f()
    for i in range(n):
        ks = list(fs); ks = ks[i % len(ks):] + ks[:i % len(ks)]
        for k in ks:
            c = time.process_time(); fs[k](); t[k].append(time.process_time() - c)
    return {k: 1e3 * statistics.median(v) for k, v in t.items()}
cases = {
  "1x1 512->128 @7², N=32": (torch.randn(32, 512, 7, 7), torch.randn(128, 512, 1, 1), 0, 1),
  "depthwise 3x3 R=128 @7², N=32": (torch.randn(32, 128, 7, 7), torch.randn(128, 1, 3, 3), 1, 128),
  "1x1 256->64 @14², N=32": (torch.randn(32, 256, 14, 14), torch.randn(64, 256, 1, 1), 0, 1),
  "1x1 16->8 @8², N=64": (torch.randn(64, 16, 8, 8), torch.randn(8, 16, 1, 1), 0, 1),
}
for name, (x, w, p, g) in cases.items():
    y = torch.nn.functional.conv2d(x, w, padding=p, groups=g); gy = torch.randn_like(y)
    args = (None, [1, 1], [p, p], [1, 1], False, [0, 0], g)
    r = bench({
        "fused": lambda: cb(gy, x, w, *args, [True, True, False]),
        "separate": lambda: (cb(gy, x, w, *args, [True, False, False]), cb(gy, x, w, *args, [False, True, False])),
    })
    print(f"{name}: fused {r['fused']:.3f} ms, separate {r['separate']:.3f} ms, saving {1 - r['fused'] / r['separate']:.1%}", flush=True)
