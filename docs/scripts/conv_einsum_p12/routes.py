import torch, time, statistics
import tnbackpack.tn.conv_einsum.steps as st
torch.set_num_threads(1)
def bench(fs, n=60):
    t = {k: [] for k in fs}
    for f in fs.values(): f()
    for i in range(n):
        for k, f in fs.items():
            c = time.process_time(); f(); t[k].append(time.process_time() - c)
    for k in fs: print(f"  {k:40s} {1e3*statistics.median(t[k]):7.2f} ms")
for C, S, R in ((512, 7, 128), (256, 14, 64)):
    print(C, S, R)
    d = torch.randn(32, S, S, R).permute(0, 3, 1, 2)  # ndhw channels-last
    B = torch.randn(R, C)
    x = torch.randn(32, C, S, S); A = torch.randn(C, R)
    gzc = torch.randn(32, S, S, R).permute(0, 3, 1, 2)
    cands = {
     "top cl->nchw bmm": lambda: st._bmm(d, "ndhw", B, "do", "nohw", "d", False),
     "top cl->nchw mm+copy": lambda: st._copied_mm(d, "ndhw", B, "do", "nohw", "d", False),
     "top cl->cl mm (no copy, ref)": lambda: st._copied_mm(d, "ndhw", B, "do", "nohw", "d", True),
     "first nchw->cl bmm": lambda: st._bmm(x, "nchw", A, "ca", "nhwa", "c", True),
     "first nchw->cl mm(copy)": lambda: st._copied_mm(x, "nchw", A, "ca", "nhwa", "c", True),
     "first nchw->cl conv1x1": st._matmul_as_conv(x, "nchw", A, "ca", "nhwa", "c", True),
     "wgrad nchw,cl mm(copy)": lambda: st._copied_mm(x, "nchw", gzc, "nahw", "ca", "nhw", False),
    }
    cands.update({"wgrad nchw,cl " + k: v for k, v in st._summed_batch(x, "nchw", gzc, "nahw", "nhw").items()})
    bench(cands)
