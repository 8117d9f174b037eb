"""MoLE vs plain LoRA of the same rank: training and scoring throughput, and frozen-mode caching cost.

Both adapters sit on the same target layers of the same backbone (peft's defaults: query/value for
MiniLM, q_proj/v_proj for Gemma). MoLE = shared expert + M experts, top-1 per user, gates on a user
embedding; plain LoRA = one adapter (peft). Prints medians over --steps timed steps and the ratio
MoLE / LoRA (target: within 1.5x). Then times embedding response texts for the frozen-mode cache
(cold) against reading them back (warm).

    python benchmarks/perf/mole.py [--backbone minilm|gemma-3-270m|ID] [--batch 16] [--tokens 128]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from torch import nn


def _texts(n: int) -> list[str]:
    from coplctl.data.protocol import ProtocolConfig
    from coplctl.data.simulate import SimConfig, simulate

    ds = simulate(SimConfig(protocol=ProtocolConfig("uf-p-4", "avg", users=200, unseen_users=0, survey_pairs=600)))
    return [f"Human: {p}\n\nAssistant: {t}" for p, t in zip(ds.responses.prompt, ds.responses.text)][:n]


def _models(name: str, rank: int, experts: int):
    from coplctl.copl.mole import inject_mole
    from coplctl.models.backbone import Backbone
    from coplctl.models.encoders import ResponseEncoder, add_lora, default_targets

    lora_bb = Backbone(name, max_length=512, device="cpu")
    lora = ResponseEncoder("lora", lora_bb)
    add_lora(lora, rank, 2 * rank)
    mole_bb = Backbone(name, max_length=512, device="cpu")
    mole = ResponseEncoder("lora", mole_bb)
    layers = inject_mole(mole, default_targets(mole.lm), user_dim=32, num_experts=experts, rank=rank, alpha=2 * rank)
    return lora_bb, lora, mole, layers


def _time(fn, steps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="minilm")
    ap.add_argument("--batch", type=int, default=16, help="pairs per step (2x sequences)")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--cache-texts", type=int, default=512)
    a = ap.parse_args()
    torch.manual_seed(0)

    from coplctl.copl.mole import Routing, mole_routing

    bb, lora, mole, layers = _models(a.backbone, a.rank, a.experts)
    texts = _texts(4 * a.batch)
    enc = bb.tokenizer(texts[: 2 * a.batch], padding="max_length", truncation=True, max_length=a.tokens,
                       return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    users = torch.randn(a.batch, 32)
    rows = torch.arange(a.batch).repeat(2)
    head_l, head_m = nn.Linear(lora.out_dim, 1), nn.Linear(mole.out_dim, 1)

    def step_lora(train: bool):
        with torch.set_grad_enabled(train):
            r = head_l(lora(batch)).squeeze(-1)
            if train:
                torch.nn.functional.logsigmoid(r[: a.batch] - r[a.batch:]).mean().backward()

    def step_mole(train: bool):
        with torch.set_grad_enabled(train), mole_routing(layers, Routing(users, rows)):
            r = head_m(mole(batch)).squeeze(-1)
            if train:
                torch.nn.functional.logsigmoid(r[: a.batch] - r[a.batch:]).mean().backward()

    n_seq = 2 * a.batch
    print(f"backbone {a.backbone}, {n_seq} sequences x {a.tokens} tokens, rank {a.rank}, "
          f"MoLE = shared + {a.experts} experts (top-1)")
    for label, train in (("training", True), ("scoring", False)):
        tl = _time(lambda: step_lora(train), a.steps)
        tm = _time(lambda: step_mole(train), a.steps)
        print(f"{label:<9} LoRA {n_seq / tl:7.1f} seq/s   MoLE {n_seq / tm:7.1f} seq/s   "
              f"MoLE/LoRA time ratio {tm / tl:.2f}")

    from coplctl.models.features import features

    cache_texts = _texts(a.cache_texts)
    with tempfile.TemporaryDirectory() as root:
        os.environ["COPLCTL_CACHE"] = root
        t0 = time.perf_counter()
        features(bb, cache_texts)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        features(bb, cache_texts)
        warm = time.perf_counter() - t0
    print(f"frozen features for {len(cache_texts)} texts: first run {cold:.2f} s ({1000 * cold / len(cache_texts):.1f} "
          f"ms/text), from cache {warm:.3f} s; cache / compute ratio {warm / cold:.4f}")


if __name__ == "__main__":
    main()
