"""CUDA graphs of a frozen UNet: replay instead of launching ~1000 kernels per call.

A batch-2 SD UNet call at 64x64 latents is bound by kernel launches, not arithmetic; replaying
captured graphs for the forward, the forward-with-graph and the input VJP removes that overhead
(measured on an H200: README, "Performance"). Weights are frozen, so the VJP is w.r.t. the input only.
"""
from __future__ import annotations

import torch


class _UNetOut:
    def __init__(self, sample):
        self.sample = sample


class _GraphedCall(torch.autograd.Function):
    """Forward = replay of the forward-with-graph capture; backward = replay of the input-VJP capture.

    The captured graphs own ONE set of activations: when another forward replay happened in between
    (EDICT-checkpoint recomputes two UNet calls per step, autograd records the whole chain), the backward
    first replays this call's forward again from its saved input, so gradients are always right.
    """

    @staticmethod
    def forward(ctx, x, t, c, graphs):
        graphs.load(x, t, c, grad=True)
        graphs.g_fwd.replay()
        graphs.generation += 1
        ctx.generation, ctx.graphs = graphs.generation, graphs
        ctx.save_for_backward(x, t, c)
        return graphs.out_grad.clone()

    @staticmethod
    def backward(ctx, g):
        graphs = ctx.graphs
        if graphs.generation != ctx.generation:  # activations were overwritten: replay this forward again
            graphs.load(*ctx.saved_tensors, grad=True)
            graphs.g_fwd.replay()
            graphs.generation += 1
            graphs.refreshes += 1
        graphs.gout.copy_(g)
        graphs.g_bwd.replay()
        return graphs.gx.clone(), None, None, None


class _Graphs:
    """Three CUDA graphs of ``unet(x, t, c).sample`` for one input shape: no-grad forward, forward with
    graph, and the VJP with respect to x (weights are frozen)."""

    def __init__(self, unet, x, t, c, warmup: int = 3):
        self.x_inf, self.t, self.c = x.detach().clone(), t.detach().clone(), c.detach().clone()
        self.x_grad = x.detach().clone().requires_grad_()
        self.generation = self.refreshes = 0
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up cuBLAS/cuDNN workspaces outside capture
            for _ in range(warmup):
                with torch.no_grad():
                    unet(self.x_inf, self.t, encoder_hidden_states=self.c)
                with torch.enable_grad():
                    out = unet(self.x_grad, self.t, encoder_hidden_states=self.c).sample
                    torch.autograd.grad(out, self.x_grad, torch.ones_like(out))
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self.g_inf = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.g_inf):
            self.out_inf = unet(self.x_inf, self.t, encoder_hidden_states=self.c).sample
        self.g_fwd = torch.cuda.CUDAGraph()
        with torch.enable_grad(), torch.cuda.graph(self.g_fwd):
            self.out_grad = unet(self.x_grad, self.t, encoder_hidden_states=self.c).sample
        self.gout = torch.zeros_like(self.out_grad)
        self.g_bwd = torch.cuda.CUDAGraph()
        with torch.enable_grad(), torch.cuda.graph(self.g_bwd, pool=self.g_fwd.pool()):
            (self.gx,) = torch.autograd.grad(self.out_grad, self.x_grad, self.gout)
        torch.cuda.synchronize()

    def load(self, x, t, c, grad: bool):
        with torch.no_grad():
            (self.x_grad if grad else self.x_inf).copy_(x)
            self.t.copy_(t)
            self.c.copy_(c)

    def __call__(self, x, t, c):
        if torch.is_grad_enabled() and x.requires_grad:
            return _GraphedCall.apply(x, t, c, self)
        self.load(x, t, c, grad=False)
        self.g_inf.replay()
        return self.out_inf.clone()


class GraphedUNet:
    """Drop-in for ``Denoiser.unet``: replays CUDA graphs for the shapes prepared with :meth:`prepare`,
    runs the plain UNet for any other shape. Removes the kernel-launch overhead that dominates a batch-2
    SD UNet call at 64x64 latents."""

    def __init__(self, unet, auto_prepare: bool = False):
        self.unet = unet
        self.graphs: dict = {}
        self.auto_prepare = auto_prepare  # capture on the first call of each new shape (CUDA only)

    def parameters(self):
        return self.unet.parameters()

    def prepare(self, x, t, c):
        key = (tuple(x.shape), tuple(c.shape), x.dtype)
        for k in [k for k in self.graphs if k != key]:  # one shape at a time: free the others' pools
            del self.graphs[k]
        if key not in self.graphs:
            self.graphs[key] = _Graphs(self.unet, x, t, c)
        return self.graphs[key]

    def __call__(self, x, t, encoder_hidden_states=None):
        if encoder_hidden_states is None:
            return self.unet(x, t)
        g = self.graphs.get((tuple(x.shape), tuple(encoder_hidden_states.shape), x.dtype))
        if g is None and self.auto_prepare and x.is_cuda:
            g = self.prepare(x, torch.as_tensor(t, device=x.device), encoder_hidden_states)
        if g is None:
            return self.unet(x, t, encoder_hidden_states=encoder_hidden_states)
        return _UNetOut(g(x, torch.as_tensor(t, device=x.device), encoder_hidden_states))
