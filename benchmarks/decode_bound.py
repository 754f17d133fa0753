"""How fast can an eager PyTorch decoding step get on this machine? A bound for issue 16's eager
targets, measured beside mammut's own step in the same run.

The bound is one greedy decoding step of the default MaMMUT decoder (parallel SwiGLU blocks,
rotary positions, no biases) written by hand for this benchmark as straight-line functional
code: no modules, no Python bookkeeping beyond a loop over layers, and every fusion eager
PyTorch allows -- each block's query/key/value and feed-forward input projections concatenated
into one matrix (one product instead of two), residual additions folded into the output
products (``addmm``), keys and values written into preallocated buffers read whole under an
additive mask, rotary tables once per step. Its tokens are checked against ``model.generate``
first (the concatenated products sum in another order, so a near-tie could flip a token; the
agreement is printed). It is not a code path of the library: the library keeps one step per
block kind (``token_step``), exact to the modules bit for bit.

    .venv/bin/python benchmarks/decode_bound.py [--threads 2] [--repeats 7]

Prints, for generate.py's tiny config (batch 2, prompt of 2, 64 new tokens) and its reference
config (batch 4, a 1-token prompt, 64 new tokens): ms per step of mammut eager, mammut
``compile=True``, the hand-fused bound, and (tiny) recomputing the prefix / (reference) the
weight-read floor, with the ratios issue 16 targets (cached >= 4x the recompute; eager step <=
1.3x the floor).
"""
from __future__ import annotations

import argparse
import math
from typing import Callable

import torch
import torch.nn.functional as F
from _timing import interleaved  # benchmarks/_timing.py

import generate as G  # benchmarks/generate.py: the same configs and floor


class Fused:
    """The hand-fused greedy decoder of a default-configured MaMMUT (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, context: torch.Tensor, capacity: int) -> None:
        cfg = model.config
        if cfg.block != "parallel" or cfg.activation != "swiglu" or cfg.bias or cfg.positions != "rotary":
            raise ValueError("the bound is written for the default MaMMUT decoder (parallel SwiGLU, rotary, no bias)")
        self.b, self.cap, self.dim = context.shape[0], capacity, cfg.dim
        self.h, self.d = cfg.heads, cfg.dim_head
        self.g = cfg.kv_heads or cfg.heads
        self.layers = []
        for layer in model.layers:
            blk = layer.block
            w_in = torch.cat((blk.attn.to_qkv.weight, blk.ff.proj_in.weight)).t()  # (dim, qkv + 2 * inner)
            buf = torch.zeros(2, self.b, self.g, capacity, self.d)
            cross = None
            if layer.cross is not None:
                c = layer.cross
                k, v = c.attn.project_context(context)
                cross = (c.norm.weight, torch.cat((c.attn.to_q.weight, c.ff.proj_in.weight)).t(),
                         c.attn.to_out.weight.t(), c.ff.proj_out.weight.t(), k, v)
            self.layers.append((blk.norm.weight, w_in, blk.attn.to_out.weight.t(), blk.ff.proj_out.weight.t(), buf, cross))
        rot = model.layers[0].block.attn.rotary
        self.freq, self.sign = rot.freq, rot.sign
        self.emb, self.norm, self.logits_w = model.token_emb.weight, model.norm.weight, model.to_logits.weight
        self.ban = torch.zeros(cfg.num_tokens)
        self.ban[cfg.pad_id] = -math.inf
        self.ban_eos = self.ban.clone()
        self.ban_eos[cfg.eos_id] = -math.inf
        self.bias = torch.full((self.b, 1, 1, capacity), -math.inf)

    def step(self, tok: torch.Tensor, t: int) -> torch.Tensor:
        """Logits ``(b, vocab)`` of token ``tok`` ``(b, 1)`` at position ``t`` (every row the same length)."""
        b, dim, h, g, d = self.b, self.dim, self.h, self.g, self.d
        qkv_w = (h + 2 * g) * d
        self.bias[..., t] = 0.0
        x = F.embedding(tok, self.emb).view(b, dim)
        ang = (torch.full((b, 1, 1, 1), float(t)) * self.freq)
        cos, sin = ang.cos(), ang.sin().mul_(self.sign)
        for norm_w, w_in, w_out, w_ff, buf, cross in self.layers:
            y = torch.mm(F.layer_norm(x, (dim,), norm_w), w_in)
            heads = y[:, :qkv_w].view(b, 1, h + 2 * g, d)
            qk = heads[:, :, : h + g]
            qk.copy_(qk * cos + qk.roll(d // 2, -1) * sin)
            buf[:, :, :, t:t + 1].copy_(heads[:, :, h:].view(b, 1, 2, g, d).permute(2, 0, 3, 1, 4))
            att = F.scaled_dot_product_attention(heads[:, :, :h].transpose(1, 2), buf[0], buf[1], attn_mask=self.bias,
                                                 enable_gqa=g != h)
            up, gate = y[:, qkv_w:].chunk(2, -1)
            x = torch.addmm(torch.addmm(x, att.view(b, h * d), w_out), F.silu(gate).mul_(up), w_ff)
            if cross is not None:
                c_norm, c_in, c_out, c_ff, k, v = cross
                y = torch.mm(F.layer_norm(x, (dim,), c_norm), c_in)
                q = y[:, : h * d].view(b, 1, h, d).transpose(1, 2)
                att = F.scaled_dot_product_attention(q, k, v, enable_gqa=g != h)
                up, gate = y[:, h * d:].chunk(2, -1)
                x = torch.addmm(torch.addmm(x, att.view(b, h * d), c_out), F.silu(gate).mul_(up), c_ff)
        return F.linear(F.layer_norm(x, (dim,), self.norm), self.logits_w)

    def generate(self, prompt: torch.Tensor, new: int) -> torch.Tensor:
        """Greedy tokens ``(b, new)`` (pad banned, eos banned throughout: every row runs ``new``
        tokens, as ``min_new_tokens=new``), with each token's log-probability taken as the loop does."""
        self.bias.fill_(-math.inf)
        p = prompt.shape[1]
        for t in range(p - 1):
            self.step(prompt[:, t:t + 1], t)
        tok, out = prompt[:, -1:], []
        for i in range(new):
            scores = self.step(tok, p - 1 + i) + self.ban_eos
            tok = scores.max(dim=-1, keepdim=True).indices
            scores.log_softmax(dim=-1).gather(1, tok)
            out.append(tok)
        return torch.cat(out, dim=1)


def measure(name: str, model: torch.nn.Module, context: torch.Tensor, prompt: torch.Tensor, new: int, repeats: int,
            floor_s: float | None) -> None:
    fused = Fused(model, context, prompt.shape[1] + new)

    def ours(k: int, **kw: object) -> Callable[[], torch.Tensor]:
        return lambda: model.generate(context=context, prompt=prompt, max_new_tokens=k, min_new_tokens=k,
                                      eos_id=model.config.eos_id, **kw)

    reference = ours(new)()
    mine = fused.generate(prompt, new)
    agree = (reference == mine).float().mean().item()
    fns = {"eager": ours(new), "eager 1": ours(1), "compiled": ours(new, compile=True), "compiled 1": ours(1, compile=True),
           "bound": lambda: fused.generate(prompt, new), "bound 1": lambda: fused.generate(prompt, 1)}
    if floor_s is None:
        fns["recompute"], fns["recompute 1"] = ours(new, use_cache=False), ours(1, use_cache=False)
    fns["compiled"](), fns["compiled 1"]()  # compile before timing
    times = interleaved(fns, repeats)
    per = {k: (times[k] - times[k + " 1"]) / (new - 1) for k in fns if not k.endswith(" 1")}
    print(f"\n{name}: batch {prompt.shape[0]}, prompt {prompt.shape[1]}, {new} new tokens, {repeats} interleaved rounds "
          f"(median); bound's tokens equal mammut's: {agree:.1%}")
    for k, sec in per.items():
        print(f"  {k:10s} {sec * 1e3:7.3f} ms per step   whole: {times[k] * 1e3:8.1f} ms")
    if floor_s is None:
        r = times["recompute"]
        print(f"  cached vs recomputing (target >= 4x): eager {r / times['eager']:.2f}x, compiled {r / times['compiled']:.2f}x, "
              f"hand-fused bound {r / times['bound']:.2f}x")
    else:
        print(f"  weight-read floor {floor_s * 1e3:.2f} ms; per step / floor (target <= 1.3x): "
              f"eager {per['eager'] / floor_s:.2f}x, compiled {per['compiled'] / floor_s:.2f}x, hand-fused bound {per['bound'] / floor_s:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from mammut import MaMMUT

    with torch.inference_mode():
        torch.manual_seed(0)
        tiny = MaMMUT(dim=128, num_tokens=8192, depth=4, cross_attend_every=2, heads=4, dim_head=32, bos_id=G.BOS,
                      eos_id=G.EOS, pad_id=G.PAD, vit=dict(image_size=64, patch_size=16, dim=128, depth=2, heads=4,
                                                            dim_head=32)).eval()
        context = tiny.image_context(torch.randn(2, 3, 64, 64))
        measure("tiny config", tiny, context, torch.randint(3, 8192, (2, 2)), 64, args.repeats, None)
        torch.manual_seed(0)
        ref = G.ours()
        context = ref.image_context(torch.randn(G.BATCH, 3, G.IMAGE, G.IMAGE))
        floor_s = G.floor(ref, args.repeats)
        measure("reference config", ref, context, torch.full((G.BATCH, 1), G.BOS), 64, args.repeats, floor_s)


if __name__ == "__main__":
    main()
