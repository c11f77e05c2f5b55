"""Train the bundled reference model (how src/quantprism/assets/reference-llama was made).

A small LlamaForCausalLM (hidden 256, 4 layers, 4 heads of 64, 2 KV heads, FFN 768, vocab 4096,
untied lm_head) trained on the Python 3.11 standard library's own text (scripts/corpus.py), with a
byte-level BPE tokenizer (GPT-2 split regex) that llama.cpp embeds as tokenizer.ggml.model="gpt2".
Deterministic from --seed (single process, fixed thread count).

    python scripts/train_reference_model.py --out src/quantprism/assets [--steps 900]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from corpus import heldout_text, split  # noqa: E402

BOS, EOS = "<|bos|>", "<|eos|>"


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS, EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_hf_tokenizer(tok, out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)
    fast.save_pretrained(out)


def batches(ids: torch.Tensor, seq_len: int, batch: int, gen: torch.Generator):
    n = ids.numel() - seq_len - 1
    while True:
        starts = torch.randint(0, n, (batch,), generator=gen)
        x = torch.stack([ids[s : s + seq_len + 1] for s in starts.tolist()])
        yield x


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("src/quantprism/assets"))
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()

    train_docs, held_docs = split()
    tok = train_tokenizer([t for _, t in train_docs], args.vocab)
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    model_dir = args.out / "reference-llama"
    model_dir.mkdir(parents=True, exist_ok=True)
    save_hf_tokenizer(tok, model_dir)

    # Shipped texts: held-out evaluation (never trained on) and an in-domain calibration set.
    eval_text = heldout_text(train_docs, held_docs)
    (args.out / "eval_heldout.txt").write_text(eval_text, encoding="utf-8")
    g = torch.Generator().manual_seed(args.seed + 1)
    pick = torch.randperm(len(train_docs), generator=g).tolist()
    calib, size = [], 0
    for i in pick:
        calib.append(train_docs[i][1])
        size += len(train_docs[i][1])
        if size > 400_000:
            break
    (args.out / "calibration.txt").write_text("\n\n".join(calib), encoding="utf-8")

    stream: list[int] = []
    for _, text in train_docs:
        stream += [bos] + tok.encode(text).ids + [eos]
    ids = torch.tensor(stream, dtype=torch.long)
    print(f"train tokens {ids.numel()}, docs {len(train_docs)}, held-out docs {len(held_docs)}", flush=True)

    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=256, intermediate_size=768, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=bos, eos_token_id=eos,
        attention_bias=False, mlp_bias=False,
    )
    model = LlamaForCausalLM(cfg).float()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warm:
            return args.lr * (step + 1) / warm
        p = (step - warm) / max(1, args.steps - warm)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))

    model.train()
    it = batches(ids, args.seq_len, args.batch, torch.Generator().manual_seed(args.seed + 2))
    for step in range(args.steps):
        x = next(it)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.4f} lr {lr_at(step):.2e} {time.time() - t0:.0f}s", flush=True)

    model.eval()
    model.to(torch.bfloat16).save_pretrained(model_dir, safe_serialization=True)
    gen_cfg = model_dir / "generation_config.json"
    if gen_cfg.exists():
        gen_cfg.unlink()  # greedy by default; nothing to configure
    info = {"seed": args.seed, "steps": args.steps, "seq_len": args.seq_len, "batch": args.batch,
            "lr": args.lr, "train_tokens": int(ids.numel()), "train_seconds": round(time.time() - t0, 1),
            "threads": args.threads, "final_loss": round(loss.item(), 4)}
    (model_dir / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
