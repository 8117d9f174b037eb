"""Costs of the training options of issue 15: resumable checkpoints and gradient checkpointing.

1. Checkpoints: CoPL in frozen mode on a simulated UF-P-2 dataset, trained with a work directory (the
   training state saved at each epoch's end, and every --every optimizer steps) and without; prints the
   seconds per save, the file size and the share of training time spent saving.
2. Gradient checkpointing: one CoPL (MoLE) training step in lora mode on --backbone, with and without,
   each in its own process; prints the step time and the memory the step adds (peak RSS over the RSS
   before the step on CPU, peak allocated memory on CUDA).

    python benchmarks/perf/train_state.py [--users 1000] [--every 50] [--backbone minilm] [--batch 16] [--tokens 256]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def checkpoints(users: int, every: int) -> None:
    import coplctl.models.resume
    from coplctl.copl.method import CoPL
    from coplctl.data.protocol import ProtocolConfig
    from coplctl.data.simulate import SimConfig, simulate

    ds = simulate(SimConfig(protocol=ProtocolConfig("uf-p-2", "all", users=users, unseen_users=0,
                                                    survey_pairs=max(600, 3 * users)), seed=0))
    saves, real = [], coplctl.models.resume.save

    def timed(path, *args, **kw):
        t0 = time.perf_counter()
        real(path, *args, **kw)
        saves.append((time.perf_counter() - t0, Path(path).stat().st_size))

    coplctl.models.resume.save = timed
    with tempfile.TemporaryDirectory() as tmp:
        options = {"epochs": 8, "gcf_overrides": {"dim": 32, "epochs": 30}}
        CoPL(**options).fit(ds, seed=0, progress=False, work_dir=Path(tmp) / "warm")  # GCF trained once, features cached
        gcf = Path(tmp) / "warm" / "gcf"
        rows = []
        for label, work, extra in (("no work dir", None, {}), ("epoch ends", "a", {}),
                                   (f"+ every {every} steps", "b", {"checkpoint_every": every})):
            saves.clear()
            method = CoPL(**options, **extra, gcf_run=str(gcf))
            t0 = time.perf_counter()
            metrics = method.fit(ds, seed=0, progress=False, work_dir=Path(tmp) / work if work else None)
            seconds = time.perf_counter() - t0
            spent = sum(s for s, _ in saves)
            rows.append((label, seconds, len(saves), spent, saves[-1][1] if saves else 0, metrics["steps"]))
    print(f"checkpoints: CoPL frozen, {users} users, {len(ds.split('train'))} training pairs, 8 epochs")
    print(f"{'':22} {'fit s':>8} {'saves':>6} {'s/save':>8} {'MB':>7} {'share':>7}")
    for label, seconds, n, spent, size, _ in rows:
        print(f"{label:22} {seconds:8.2f} {n:6d} {spent / max(n, 1):8.4f} {size / 1e6:7.2f} {spent / seconds:7.1%}")


def step(backbone: str, batch: int, tokens: int, checkpointing: bool) -> dict:
    """One forward + backward of CoPL's lora-mode net on ``batch`` pairs of ``tokens`` tokens."""
    import torch

    from coplctl.copl.method import CoPL
    from coplctl.models.backbone import Backbone
    from coplctl.models.trainer import enable_checkpointing

    method = CoPL(mode="lora", backbone=backbone, user_embeddings="learned", max_length=tokens)
    method.backbone = Backbone(backbone, max_length=tokens)
    net = method.build_net(batch, {"user_dim": 32, "seen_users": batch})
    if checkpointing:
        enable_checkpointing(net)
    dev = method.backbone.device
    net.to(dev).train()
    g = torch.Generator().manual_seed(0)
    vocab = method.backbone.tokenizer.vocab_size
    pairs = [{"input_ids": torch.randint(5, vocab, (batch, tokens), generator=g).to(dev),
              "attention_mask": torch.ones(batch, tokens, dtype=torch.long, device=dev)} for _ in range(2)]
    users = torch.arange(batch, device=dev)

    def once():
        rc, rr, aux = net(users, *pairs)
        (-(rc - rr).sigmoid().log().mean() + aux).backward()
        net.zero_grad(set_to_none=True)

    once()  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        before = _rss("VmRSS")
    t0 = time.perf_counter()
    once()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else _rss("VmHWM")
    return {"seconds": seconds, "added_mb": (peak - before) / 1e6, "device": dev.type}


def _rss(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--backbone", default="minilm")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--step", choices=["plain", "checkpointed"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        print(json.dumps(step(args.backbone, args.batch, args.tokens, args.step == "checkpointed")))
        return
    checkpoints(args.users, args.every)
    print(f"\ngradient checkpointing: CoPL lora, {args.backbone}, {args.batch} pairs x {args.tokens} tokens, one step")
    for variant in ("plain", "checkpointed"):
        # tensors of 64 kB and more get their own mapping, returned on free: RSS then follows live memory
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run([sys.executable, __file__, "--step", variant, "--backbone", args.backbone, "--batch",
                              str(args.batch), "--tokens", str(args.tokens)], capture_output=True, text=True,
                             check=True, env=env)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{variant:13} {r['seconds']:7.2f} s  +{r['added_mb']:8.1f} MB ({r['device']})")


if __name__ == "__main__":
    main()
