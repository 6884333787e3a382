"""Train the embedded ``tiny`` model: a small Qwen3-MoE language model on Python's
documentation (prose) with a small share of its standard library (code).

On a fresh Debian/Ubuntu machine with the package archive reachable:

    python training/train_tiny.py                 # 32.5 min measured on 1 (shared) CPU thread; --threads 2 by default
    python training/model_card.py                 # measures the shipped model, writes README.md

Writes into ``src/activepath/models/tiny/``: config.json, model.safetensors (bf16), the
byte-level BPE tokenizer, the held-out evaluation texts and ``training_log.json``.
Scratch files (downloaded packages, unpacked corpus) go to ``training/work/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
import corpus  # noqa: E402

log = logging.getLogger("train_tiny")
REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "src" / "activepath" / "models" / "tiny"
WORK_DIR = REPO / "training" / "work"
EOS = "<|endoftext|>"
EVAL_CHARS = 12_000  # per shipped evaluation text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--code-share", type=float, default=0.08, help="fraction of training tokens that are code")
    p.add_argument("--aux-coef", type=float, default=0.01, help="load-balancing loss coefficient")
    p.add_argument("--experts-impl", default="eager", choices=["grouped_mm", "eager", "batched_mm"])
    p.add_argument("--max-minutes", type=float, default=38.0,
                   help="training time budget: the LR schedule anneals by then, and training stops")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT_DIR)
    p.add_argument("--work", type=Path, default=WORK_DIR)
    return p.parse_args(argv)


def model_config(vocab_size: int, seq_len: int, aux_coef: float) -> Qwen3MoeConfig:
    """4 layers, hidden 256, 16 experts of width 128, top-2 — about 9 M parameters."""
    return Qwen3MoeConfig(
        vocab_size=vocab_size, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, intermediate_size=512, moe_intermediate_size=128, num_experts=16, num_experts_per_tok=2,
        norm_topk_prob=True, decoder_sparse_step=1, max_position_embeddings=max(seq_len, 512), rope_theta=10000.0,
        tie_word_embeddings=True, output_router_logits=True, router_aux_loss_coef=aux_coef,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style): every byte string is encodable, no unknown token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                   unk_token=None, model_max_length=512)


def pack_tokens(tokenizer: PreTrainedTokenizerFast, data: corpus.Corpus, code_share: float,
                rng: random.Random) -> tuple[torch.Tensor, dict[str, int]]:
    """All training prose plus code files (in random order) up to ``code_share`` of the
    tokens, shuffled by document and joined with EOS into one stream."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    prose = [ids + [eos] for ids in tokenizer(data.train_prose)["input_ids"]]
    code_files = list(data.train_code)
    rng.shuffle(code_files)
    code_all = [ids + [eos] for ids in tokenizer(code_files)["input_ids"]]
    n_prose = sum(map(len, prose))
    budget = int(n_prose * code_share / (1 - code_share))
    code: list[list[int]] = []
    n_code = 0
    for ids in code_all:
        if n_code + len(ids) <= budget:
            code.append(ids)
            n_code += len(ids)
    docs = prose + code
    rng.shuffle(docs)
    stream = torch.tensor([t for d in docs for t in d], dtype=torch.long)
    return stream, {"prose_tokens": n_prose, "code_tokens": n_code, "code_files": len(code)}


def lr_at(step: int, elapsed_s: float, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to 10 % over whichever runs out first: the planned
    steps or the time budget — so a slower machine still ends on an annealed model."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = max((step - args.warmup) / max(args.steps - args.warmup, 1), elapsed_s / (args.max_minutes * 60))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def train(model: Qwen3MoeForCausalLM, stream: torch.Tensor, args: argparse.Namespace) -> dict[str, object]:
    """AdamW on random windows of the token stream. Returns the loss history."""
    gen = torch.Generator().manual_seed(args.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    model.train()
    history: list[dict[str, float]] = []
    start, window_ce, window_aux = time.perf_counter(), [], []
    done = 0
    for step in range(args.steps):
        elapsed = time.perf_counter() - start
        if elapsed > args.max_minutes * 60:
            log.warning("time budget of %.0f min reached after %d of %d steps", args.max_minutes, step, args.steps)
            break
        starts = torch.randint(0, len(stream) - args.seq_len - 1, (args.batch,), generator=gen)
        batch = torch.stack([stream[s : s + args.seq_len] for s in starts.tolist()])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, elapsed, args)
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        window_aux.append(float(out.aux_loss.detach()))
        window_ce.append(float(out.loss.detach()) - args.aux_coef * window_aux[-1])
        elapsed = time.perf_counter() - start
        if (step + 1) % 50 == 0 or step + 1 == args.steps:
            ce, aux = sum(window_ce) / len(window_ce), sum(window_aux) / len(window_aux)
            history.append({"step": step + 1, "ce": round(ce, 4), "aux": round(aux, 4), "elapsed_s": round(elapsed, 1)})
            log.info("step %d/%d  ce %.3f  aux %.3f  lr %.2e  %.1f s", step + 1, args.steps, ce, aux,
                     lr_at(step, elapsed, args), elapsed)
            window_ce, window_aux = [], []
        done = step + 1
    if window_ce:  # a partial window left by the time budget
        history.append({"step": done, "ce": round(sum(window_ce) / len(window_ce), 4),
                        "aux": round(sum(window_aux) / len(window_aux), 4), "elapsed_s": round(elapsed, 1)})
    model.eval()
    return {"steps_done": done, "train_s": round(time.perf_counter() - start, 1), "history": history}


def write_eval_texts(data: corpus.Corpus, out: Path) -> None:
    for name, texts in (("prose", data.eval_prose), ("code", data.eval_code), ("shifted", data.eval_shifted)):
        (out / f"eval_{name}.txt").write_text(corpus.excerpt(texts, EVAL_CHARS), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    wall0 = time.perf_counter()
    try:
        data = corpus.build(corpus.fetch(args.work))
    except RuntimeError as exc:
        log.error("%s", exc)
        return 2
    log.info("corpus: %d prose / %d code training files; held out %d prose, %d code, %d shifted",
             len(data.train_prose), len(data.train_code), len(data.eval_prose), len(data.eval_code),
             len(data.eval_shifted))
    tokenizer = train_tokenizer(data.train_prose + data.train_code, args.vocab)
    stream, counts = pack_tokens(tokenizer, data, args.code_share, rng)
    log.info("training stream: %d tokens (%s)", len(stream), counts)
    config = model_config(len(tokenizer), args.seq_len, args.aux_coef)
    model = Qwen3MoeForCausalLM._from_config(config, experts_implementation=args.experts_impl)
    log.info("model: %.2f M parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    result = train(model, stream, args)

    args.out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False  # an inference checkpoint: no router logits by default
    model.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    write_eval_texts(data, args.out)
    # the unigram baseline of the model card and tests: training-token frequencies
    unigram = torch.bincount(stream, minlength=len(tokenizer))
    (args.out / "unigram_counts.json").write_text(json.dumps(unigram.tolist()) + "\n")
    record = {
        "command": "python training/train_tiny.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "threads": args.threads, "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr,
        "aux_coef": args.aux_coef, "experts_impl": args.experts_impl, "seed": args.seed, "vocab": len(tokenizer),
        "corpus_packages": list(corpus.PACKAGES), "debs": sorted(p.name for p in (args.work / "debs").glob("*.deb")),
        "train_files": {"prose": len(data.train_prose),
                                                                  "code": len(data.train_code)},
        **counts, "stream_tokens": len(stream), **result,
        "total_wall_s": round(time.perf_counter() - wall0, 1),
    }
    (args.out / "training_log.json").write_text(json.dumps(record, indent=1) + "\n")
    log.info("saved to %s in %.0f s", args.out, record["total_wall_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
