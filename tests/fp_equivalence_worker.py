"""Run under torchrun by tests/test_parallel.py: on each rank, a feature-parallel slice of a CLT must
compute what the whole CLT computes (every activation: JumpReLU, TopK, BatchTopK, and AuxK), forward
and backward. Prints one line "OK <checks>" per rank, or raises."""
import sys

import torch

from cltrain.train.clt import CLT, CLTConfig, LossWeights, loss_terms
from cltrain.train.lifecycle import Teardown
from cltrain.train.parallel import Layout, init_distributed, local_clt, materialize


def main():
    torch.manual_seed(0)
    init_distributed("gloo")
    layout = Layout.build(int(sys.argv[1]))
    N, D, F, B = 3, 8, 32, 24
    checks = 0
    for act, k in (("jumprelu", 0), ("topk", 3), ("batchtopk", 3)):
        cfg = CLTConfig(N, D, F, activation=act, topk=k, threshold_init=0.05)
        whole = CLT(cfg, seed=7).train()
        part = materialize(local_clt(cfg, layout, seed=7), layout, torch.device("cpu")).train()
        start, stop = part.feature_start, part.feature_start + part.cfg.n_features
        torch.testing.assert_close(part.W_enc.detach(), whole.W_enc.detach()[:, start:stop], rtol=0, atol=0)
        x = torch.randn(B, N, D, generator=torch.Generator().manual_seed(1))
        y = torch.randn(B, N, D, generator=torch.Generator().manual_seed(2))
        dead = torch.rand(N, F, generator=torch.Generator().manual_seed(3)) < 0.5
        w = LossWeights(sparsity=0.1, auxk=0.5, auxk_k=4)
        outs = []
        for model, d in ((whole, dead), (part, dead[:, start:stop])):
            enc, y_hat = model(x)
            terms = loss_terms(model, enc, y_hat, y, w, d)
            (terms["mse"] + terms["auxk"]).backward()
            outs.append((enc.acts.detach(), y_hat.detach(), terms["auxk"].detach(), model.W_enc.grad,
                         model.batchtopk_threshold.clone()))
        (a0, y0, aux0, g0, t0), (a1, y1, aux1, g1, t1) = outs
        torch.testing.assert_close(a1, a0[..., start:stop], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(aux1, aux0, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(g1, g0[:, start:stop], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(t1, t0, rtol=0, atol=0)
        assert aux0.item() > 0  # AuxK had dead features to use
        if act != "jumprelu":  # exactly k per token (TopK) / B*k per layer (BatchTopK) over the dictionary
            active = torch.tensor(float((a1 != 0).sum()))
            torch.distributed.all_reduce(active, group=layout.fp_group)
            assert active.item() <= B * N * k and active.item() >= 0.5 * B * N * k, (act, active.item())
        checks += 1
    print(f"OK {checks} rank {layout.rank}", flush=True)


if __name__ == "__main__":
    with Teardown():  # the process group ends before the interpreter does (an abort at exit otherwise)
        main()
