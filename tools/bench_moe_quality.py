"""Quality of 2:4 mixture-of-experts models, experts included, at equal tokens on the default corpus.

transformers 5 holds MoE experts as fused 3-D parameters; sparsert unfuses them into per-expert linears
(``sparsert.runtime.moe_experts``) so training and one-shot pruning make them 2:4 like every other block linear.
This measures what that costs in quality on a small Mixtral-style model (random init, built here from a config,
with a byte-level BPE tokenizer trained on the corpus's train split; nothing is downloaded):

1. dense pre-training for ``--pretrain-steps`` (``sparsert train --model DIR --dense``), once;
2. from that checkpoint (``--init-from``), every method for ``--steps`` more steps with the same settings:
   dense (the reference), SR-STE 2:4 (Zhou et al. 2021), AST 2:4 and AST 2:4 + INT4 QAT (Huang et al. 2025,
   distilled from the dense reference);
3. one-shot magnitude / Wanda (Sun et al. 2024) / SparseGPT (Frantar & Alistarh 2023) 2:4 of the dense reference
   (``sparsert compress HF_DIR --prune``; Wanda and SparseGPT calibrate each expert on the tokens routed to it),
   and SparseGPT of the MLP layers only (``--sparse-layers ffn``: experts 2:4, attention dense).

``--oneshot-from RUN`` reuses the model and dense reference of an earlier run of this tool and measures the
one-shot rows only (minutes instead of half an hour).

``--router-aux-from RUN`` reuses an earlier run's dense pre-training and trained rows, and trains dense, SR-STE and
AST 2:4 again from the same checkpoint with the router load-balancing loss (``--router-aux-loss COEF``, Switch
Transformer's ``E·Σᵢ fᵢ·Pᵢ``, Fedus et al. 2022) to compare with the rows trained without it.

Every row also reports how evenly the router spreads the validation tokens: per MoE layer, the share of the top-k
assignments each expert receives; ``max load`` is the busiest expert's share over the uniform share (1.00 is
perfect balance; the worst layer), and ``aux`` the mean load-balancing loss over the validation batches (top-k
when balanced).

Every number is the validation cross-entropy of the deployable Hugging Face directory (the run's ``hf/``, or the
compressed directory: dense weights carrying the 2:4 zeros, INT4 values where quantized), loaded by transformers,
on the same fixed validation batches; the ratio is over the dense reference. Also prints the share of the
model's weights that are 2:4 (the experts hold most of them).

    python tools/bench_moe_quality.py                      # the full comparison
    python tools/bench_moe_quality.py --pretrain-steps 4 --steps 4 --batch-size 2 --seq-len 32 --eval-batches 2
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime
from pathlib import Path

import torch

from sparsert.runtime.fileio import write_atomic
from sparsert.runtime.hf_tokenizer import HFTokenizer
from sparsert.train.data import TokenData, load_corpus
from sparsert.train.hf_compress import compress_hf_model
from sparsert.train.hf_inspect import hf_dir_stats
from sparsert.train.hf_model import load_hf_causal_lm
from sparsert.train.hf_train import HFCausalLM, HFModelConfig, save_dense_hf_run
from sparsert.train.train_config import TrainConfig
from sparsert.train.trainer import evaluate, train

LABELS = {
    "dense": "dense (continued)", "srste": "SR-STE 2:4", "ast": "AST 2:4", "ast-int4": "AST 2:4 + INT4 (g32)",
    "magnitude": "one-shot magnitude 2:4", "wanda": "one-shot Wanda 2:4", "sparsegpt": "one-shot SparseGPT 2:4",
    "sparsegpt-ffn": "one-shot SparseGPT 2:4, attention dense (--sparse-layers ffn)",
    "dense-aux": "dense (continued), router aux loss", "srste-aux": "SR-STE 2:4, router aux loss",
    "ast-aux": "AST 2:4, router aux loss",
}
# the rows --router-aux-from reads back from the earlier run (without the loss), then those it trains with it
AUX_BASE = ("dense", "srste", "ast")
# row key -> (--prune method, --sparse-layers)
ONESHOT = {"magnitude": ("magnitude", "all"), "wanda": ("wanda", "all"), "sparsegpt": ("sparsegpt", "all"),
           "sparsegpt-ffn": ("sparsegpt", "ffn")}


def make_model_dir(out: Path, corpus_text: str, *, hidden: int, layers: int, experts: int, top_k: int,
                   ffn: int, vocab: int, context: int, seed: int) -> Path:
    """A random Mixtral-style causal LM directory with a byte-level BPE tokenizer trained on ``corpus_text``."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"], show_progress=False)
    tok.train_from_iterator(corpus_text.splitlines(), trainer)
    torch.manual_seed(seed)
    config = transformers.MixtralConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=ffn,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        num_local_experts=experts, num_experts_per_tok=top_k,
                                        max_position_embeddings=context, eos_token_id=0, pad_token_id=0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(out))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(str(out))
    return out


def router_balance(model: torch.nn.Module, data: TokenData, batch_size: int, seq_len: int,
                   max_batches: int) -> dict:
    """How evenly a transformers MoE model's routers spread the fixed validation batches over the experts.

    Returns ``{"max_load": float, "aux": float, "loads": [[float]]}``: ``loads[l][e]`` is expert ``e``'s share of
    layer ``l``'s top-k assignments (each row sums to 1), ``max_load`` the largest share over the uniform one
    (``E · max``; 1.0 when balanced) over all layers, and ``aux`` the mean of the model's own load-balancing loss
    (``E·Σᵢ fᵢ·Pᵢ``) over the batches.
    """
    config = model.config
    experts = int(config.num_local_experts)
    top_k = int(config.num_experts_per_tok)
    counts: torch.Tensor | None = None
    aux, batches = 0.0, 0
    model.eval()
    with torch.no_grad():
        for x, _ in data.val_batches(batch_size, seq_len, max_batches):
            out = model(input_ids=x, use_cache=False, output_router_logits=True)
            picks = torch.stack([logits.float().topk(top_k, dim=-1).indices.reshape(-1)
                                 for logits in out.router_logits])  # [layers, tokens·k]
            batch = torch.stack([torch.bincount(p, minlength=experts) for p in picks]).double()
            counts = batch if counts is None else counts + batch
            aux += float(out.aux_loss)
            batches += 1
    loads = counts / counts.sum(dim=1, keepdim=True)
    return {"max_load": float(loads.max() * experts), "aux": aux / max(batches, 1), "loads": loads.tolist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--steps", type=int, default=300, help="steps of every method after pre-training (default 300)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--pretrain-lr", type=float, default=3e-3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=256, help="each expert's intermediate size (default 256)")
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--eval-batches", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="folder for all runs (default runs/bench-moe-<time>)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--oneshot-from", default=None, metavar="RUN",
                    help="an earlier --out of this tool: reuse its model/ and dense-hf/, measure the one-shot rows "
                         "only")
    ap.add_argument("--router-aux-from", default=None, metavar="RUN",
                    help="an earlier full --out of this tool: reuse its pre-training and its dense, SR-STE and AST "
                         "rows, and train those three again with the router load-balancing loss")
    ap.add_argument("--router-aux-loss", type=float, default=0.01, metavar="COEF",
                    help="the loss's weight for --router-aux-from (default 0.01, the Switch Transformer's)")
    args = ap.parse_args()
    if args.oneshot_from is not None and args.router_aux_from is not None:
        raise SystemExit("--oneshot-from and --router-aux-from: give one of them")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = Path(args.out or f"runs/bench-moe-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)

    corpus = load_corpus(None)
    flag = "--oneshot-from" if args.oneshot_from is not None else "--router-aux-from"
    reused = args.oneshot_from or args.router_aux_from
    reuse = Path(reused) if reused is not None else None
    dense_steps: int | str = args.steps
    if reuse is not None:
        if reuse.resolve() == out.resolve():
            raise SystemExit(f"--out {out}: the run {flag} reuses; write the new rows elsewhere")
        source, dense_hf = reuse / "model", reuse / "dense-hf"
        needs = [source, dense_hf]
        if args.router_aux_from is not None:
            needs += [reuse / "pretrain" / "hf", *(reuse / key / "hf" for key in AUX_BASE[1:])]
        for needed in needs:
            if not (needed / "config.json").is_file():
                raise SystemExit(f"{flag} {reuse}: no {needed.relative_to(reuse)}/ with a config.json (not a run of "
                                 "this tool that got past its trained rows)")
        # the sizes the table states are those of the reused model, not this command's defaults
        config = json.loads((source / "config.json").read_text())
        args.hidden, args.layers, args.ffn = config["hidden_size"], config["num_hidden_layers"], config[
            "intermediate_size"]
        args.experts, args.top_k, args.vocab = (config["num_local_experts"], config["num_experts_per_tok"],
                                                config["vocab_size"])
        earlier = reuse / "results.json"
        if earlier.is_file():
            before = json.loads(earlier.read_text())["args"]
            dense_steps = before["steps"]
            if args.router_aux_from is not None:  # train the new rows exactly as the reused ones were
                for name in ("steps", "batch_size", "seq_len", "lr", "eval_batches", "seed", "pretrain_steps",
                             "pretrain_lr"):
                    setattr(args, name, before[name])
        elif args.router_aux_from is not None:
            raise SystemExit(f"--router-aux-from {reuse}: no results.json (its training settings are needed)")
        else:
            dense_steps = "?"
    else:
        source = make_model_dir(out / "model", corpus.text(), hidden=args.hidden, layers=args.layers,
                                experts=args.experts, top_k=args.top_k, ffn=args.ffn, vocab=args.vocab,
                                context=max(args.seq_len, 128), seed=args.seed)
        dense_hf = out / "dense-hf"
    data = TokenData.from_corpus(corpus, HFTokenizer(source))

    def val(hf_dir: Path) -> float:
        model = HFCausalLM(load_hf_causal_lm(hf_dir, load_tokenizer=False).model, HFModelConfig.from_directory(hf_dir))
        with torch.no_grad():
            return evaluate(model, data, args.batch_size, args.seq_len, args.eval_batches)

    def balance(hf_dir: Path) -> dict:
        model = load_hf_causal_lm(hf_dir, load_tokenizer=False).model
        return router_balance(model, data, args.batch_size, args.seq_len, args.eval_batches)

    rows: list[dict] = []
    header = [f"one-shot rows only, from the dense reference of {reuse}"]
    tokens = args.batch_size * args.seq_len
    if args.router_aux_from is not None:
        header = [f"pre-training and the rows without the loss from {reuse}; then dense, SR-STE and AST {args.steps} "
                  f"steps again from the same checkpoint ({args.steps * tokens:,} tokens, batch {args.batch_size} x "
                  f"{args.seq_len}, lr {args.lr:g}) with --router-aux-loss {args.router_aux_loss:g}"]
        for key in AUX_BASE:
            hf_dir = dense_hf if key == "dense" else reuse / key / "hf"
            rows.append({"key": key, "steps": args.steps, "hf_dir": str(hf_dir), "val_loss": val(hf_dir),
                         "seconds": 0.0})
        after = dict(batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
                     threads=args.threads, eval_batches=args.eval_batches, progress=not args.no_progress,
                     steps=args.steps, lr=args.lr, init_from=str(reuse / "pretrain"), eval_interval=args.steps,
                     ckpt_interval=args.steps, router_aux_loss=args.router_aux_loss)
        for key, extra in {"dense-aux": dict(dense=True), "srste-aux": {},
                           "ast-aux": dict(method="ast", teacher=str(dense_hf))}.items():
            t1 = time.perf_counter()
            result = train(TrainConfig(**after, **extra, out_dir=str(out / key)))
            # a dense run's hf/ is magnitude-pruned to 2:4 for deployment: the dense row reads its checkpoint
            hf_dir = save_dense_hf_run(result.run_dir, out / f"{key}-hf") if key == "dense-aux" else result.artifact
            rows.append({"key": key, "steps": args.steps, "hf_dir": str(hf_dir), "val_loss": val(hf_dir),
                         "seconds": time.perf_counter() - t1})
    elif reuse is None:
        common = dict(hf_model=str(source), batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
                      threads=args.threads, eval_batches=args.eval_batches, progress=not args.no_progress)
        t0 = time.perf_counter()
        pre = train(TrainConfig(**common, dense=True, steps=args.pretrain_steps, lr=args.pretrain_lr,
                                eval_interval=args.pretrain_steps, ckpt_interval=args.pretrain_steps,
                                out_dir=str(out / "pretrain")))
        pre_s = time.perf_counter() - t0
        header = [f"dense pre-training: {args.pretrain_steps} steps ({args.pretrain_steps * tokens:,} tokens, lr "
                  f"{args.pretrain_lr:g}, {pre_s:.0f} s), val loss {pre.final_val_loss:.4f}; then every method "
                  f"{args.steps} steps ({args.steps * tokens:,} tokens, batch {args.batch_size} x {args.seq_len}, "
                  f"lr {args.lr:g})"]
        after = dict({k: v for k, v in common.items() if k != "hf_model"}, steps=args.steps, lr=args.lr,
                     init_from=str(pre.run_dir), eval_interval=args.steps, ckpt_interval=args.steps)
        for key, extra in {"dense": dict(dense=True), "srste": {}, "ast": dict(method="ast"),
                           "ast-int4": dict(method="ast", qat=True, group_size=32)}.items():
            if key.startswith("ast"):
                extra = dict(extra, teacher=str(dense_hf))
            t1 = time.perf_counter()
            result = train(TrainConfig(**after, **extra, out_dir=str(out / key)))
            if key == "dense":
                save_dense_hf_run(result.run_dir, dense_hf)
            hf_dir = dense_hf if key == "dense" else result.artifact
            rows.append({"key": key, "steps": args.steps, "hf_dir": str(hf_dir), "val_loss": val(hf_dir),
                         "seconds": time.perf_counter() - t1})
    else:
        rows.append({"key": "dense", "steps": dense_steps, "hf_dir": str(dense_hf), "val_loss": val(dense_hf),
                     "seconds": 0.0})
    for key, (method, layers) in ({} if args.router_aux_from is not None else ONESHOT).items():
        t1 = time.perf_counter()
        compressed, _ = compress_hf_model(dense_hf, out / f"oneshot-{key}", prune=method, sparse_layers=layers)
        rows.append({"key": key, "steps": 0, "hf_dir": str(compressed), "val_loss": val(compressed),
                     "seconds": time.perf_counter() - t1})

    dense_loss = rows[0]["val_loss"]
    stats = hf_dir_stats(next(Path(r["hf_dir"]) for r in rows if r["key"] in ("sparsegpt", "srste")))
    expert_weights = sum(lay.out_features * lay.in_features for lay in stats.layers if ".experts." in lay.name)
    lines = [
        f"Mixtral-style MoE: hidden {args.hidden}, {args.layers} layers, {args.experts} experts (top {args.top_k}) of "
        f"ffn {args.ffn}, BPE vocab {args.vocab}; default corpus",
        *header,
        f"the experts hold {expert_weights / stats.total_weights:.1%} of the weights",
        "",
        "| method | steps after pre-training | val loss (2:4 HF directory) | ratio to dense | 2:4 share of weights "
        "| router max load | router aux | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        r["ratio_to_dense"] = r["val_loss"] / dense_loss
        r["share_2_4"] = 0.0 if r["key"].startswith("dense") else hf_dir_stats(Path(r["hf_dir"])).recorded_share
        r["router"] = balance(Path(r["hf_dir"]))
        lines.append(f"| {LABELS[r['key']]} | {r['steps']} | {r['val_loss']:.4f} | {r['ratio_to_dense']:.4f} | "
                     f"{r['share_2_4']:.1%} | {r['router']['max_load']:.2f} | {r['router']['aux']:.3f} | "
                     f"{r['seconds']:.0f} |")
    text = "\n".join(lines)
    print(text)
    write_atomic(out / "results.md", (text + "\n").encode())
    write_atomic(out / "results.json", json.dumps({"args": vars(args), "rows": rows,
                                                   "expert_share": expert_weights / stats.total_weights},
                                                  indent=1).encode())


if __name__ == "__main__":
    main()
