"""On CUDA: gate gradients with CUDA graphs equal those without (same draws), over a few steps."""

import torch
import torch.nn.functional as F

import bmrs_surgery as bmrs
from models import get_model


def run(graphs: bool):
    torch.manual_seed(0)
    x = torch.randn(32, 1, 32, 32, device="cuda")
    y = torch.randint(0, 10, (32,), device="cuda")
    g = bmrs.attach_gates(get_model("lenet5").cuda(), x)
    g.bmrs_gates.cuda_graphs = graphs
    opt = torch.optim.Adam(g.parameters(), 1e-2)
    grads = []
    for step in range(5):
        torch.manual_seed(100 + step)
        loss = F.cross_entropy(g(x), y) + bmrs.kl_term(g)
        opt.zero_grad()
        loss.backward()
        grads.append(g.bmrs_gates.posterior.grad.clone())
        opt.step()
        if step == 2:
            with torch.no_grad():
                g.bmrs_gates.mask[:3] = 0  # mask changes must reach the captured graph
    return grads, g.bmrs_gates.posterior.detach().clone()


(ga, pa), (gb, pb) = run(True), run(False)
diff = max((a - b).abs().max().item() for a, b in zip(ga, gb))
print(f"max gradient difference graphs vs eager: {diff:.3e}; posterior difference {(pa - pb).abs().max().item():.3e}")
assert diff < 1e-4, diff
print("cuda graph check: ok")
