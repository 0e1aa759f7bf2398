"""Benchmark 2, evaluate: batched perplexity and batched KV-cache generation vs per-line loops.

Same model (a fresh GPT-2 of the train benchmark's shape, seed 42; weights do not
matter for speed, and both sides must agree), same tokenizer, same held-out tldr lines.
kubetune's side gets the model as the evaluate stage scores it (its tanh GELU swapped
for torch's fused kernel, :func:`kubetune_trainer.modeling.fuse_activations`), the loops
the model as ``from_pretrained`` returns it. Perplexity is timed ``ROUNDS`` times, the
two sides alternating, and each keeps its best time.

* perplexity: ``kubetune_trainer.perplexity.score_sequences`` (windows sorted by
  length, batched with right padding) vs the straightforward loop: one line at a time,
  ``[eos] + line`` through the model, summed NLL. Figures ``eval_ppl_speedup`` (scored
  tokens/s ratio) and ``eval_ppl_rel_diff`` (|ppl_a - ppl_b| / ppl_b; must be < 1e-4).
* BLEU generation: ``kubetune_trainer.bleu.generate_continuations`` (batches of
  prompts sorted by length, left padded, ``generate`` with the KV cache) vs a greedy
  loop over prompts one at a time that re-runs the whole sequence every token
  (``use_cache=False``). Both stop at a newline or eos and count the tokens up to the
  stop. Figures ``bleu_gen_speedup`` and ``bleu_outputs_agree`` (share of prompts
  whose continuations are identical).
"""

from __future__ import annotations

import math
import time
from typing import Any

from bench.assets import bench_tokenizer
from bench.common import Figure
from bench.data import clean_tldr_lines, split_train_test
from bench.flops import forward_flops_per_token, gpt2_param_count
from bench.peak import best_peak, cpu_matmul_peak

MODEL = {"n_layer": 4, "n_head": 4, "n_embd": 256, "n_positions": 512}
# Fraction of peak: a GPT-2-small-like shape (GPT-2 small is 12 x 768, 12 heads).
MFU_MODEL_QUICK = {"n_layer": 2, "n_head": 12, "n_embd": 768, "n_positions": 1024}
MFU_MODEL_FULL = {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024}
MFU_LINES_QUICK = 300
MFU_LINES_FULL = 600
ROUNDS = 2  # perplexity: each side's best of this many runs, the sides alternating


def build_model(vocab: int, eos: int, shape: dict[str, int] | None = None) -> Any:
    from transformers import AutoModelForCausalLM, GPT2Config, set_seed

    shape = shape or MODEL
    config = GPT2Config(
        n_layer=shape["n_layer"],
        n_head=shape["n_head"],
        n_embd=shape["n_embd"],
        n_positions=shape["n_positions"],
        vocab_size=vocab,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    set_seed(42)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.eval()


def stage_model(model: Any) -> Any:
    """A copy of ``model`` as the evaluate stage runs it (fused tanh GELU)."""
    import copy

    from kubetune_trainer.modeling import fuse_activations

    ours = copy.deepcopy(model)
    fuse_activations(ours)
    return ours.eval()


def alternate(ours: Any, base: Any, rounds: int = ROUNDS) -> tuple[Any, float, Any, float]:
    """Run ``ours()`` and ``base()`` in turn ``rounds`` times: each first result, best time."""
    results: dict[str, Any] = {}
    times: dict[str, float] = {}
    for _ in range(rounds):
        for name, fn in (("ours", ours), ("base", base)):
            start = time.perf_counter()
            out = fn()
            elapsed = time.perf_counter() - start
            results.setdefault(name, out)
            times[name] = min(times.get(name, math.inf), elapsed)
    return results["ours"], times["ours"], results["base"], times["base"]


def per_line_perplexity(model: Any, sequences: list[list[int]], context: int) -> tuple[float, int]:
    """The loop a notebook writes: one line per forward pass; (summed NLL, predicted tokens)."""
    import torch

    nll_sum, count = 0.0, 0
    with torch.no_grad():
        for ids in sequences:
            x = torch.tensor([[context, *ids]])
            logits = model(input_ids=x).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum")
            nll_sum += float(nll.double())
            count += len(ids)
    return nll_sum, count


def per_line_generate(
    model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, newline: Any
) -> tuple[list[str], int]:
    """Greedy, one prompt at a time, no KV cache: the whole sequence every token."""
    import torch

    from kubetune_trainer.bleu import context_token_id

    context = context_token_id(tokenizer)
    eos = tokenizer.eos_token_id
    outputs, generated = [], 0
    with torch.no_grad():
        for prompt in prompts:
            ids = [context, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
            new: list[int] = []
            for _ in range(max_new_tokens):
                x = torch.tensor([ids + new])
                token = int(model(input_ids=x, use_cache=False).logits[0, -1].argmax())
                if token == eos:
                    break
                new.append(token)
                if bool(newline[token]):
                    break
            generated += len(new)
            text = tokenizer.decode(new, skip_special_tokens=True)
            outputs.append(text.split("\n", 1)[0].strip())
    return outputs, generated


def fraction_of_peak(
    sequences: list[list[int]], eos: int, vocab: int, quick: bool, threads: int
) -> tuple[list[Figure], dict[str, Any]]:
    """Perplexity at a GPT-2-small-like shape as a fraction of the CPU's matmul peak.

    kubetune's ``score_sequences`` (fp32, and bf16 autocast where the CPU has bf16
    matmuls) and the per-line loop, on the same lines; forward FLOPs per predicted
    token ``2 N + 4 L E T`` with T the mean attended length (line + context token).
    """
    import torch

    from kubetune_trainer.perplexity import perplexity_from_nll, score_sequences

    shape = MFU_MODEL_QUICK if quick else MFU_MODEL_FULL
    lines = sequences[: MFU_LINES_QUICK if quick else MFU_LINES_FULL]
    model = build_model(vocab, eos, shape)
    fused = stage_model(model)
    peak_before = cpu_matmul_peak(threads, quick)
    n_params = gpt2_param_count(
        shape["n_layer"], shape["n_embd"], vocab, shape["n_positions"], include_positions=False
    )
    mean_len = sum(len(x) + 1 for x in lines) / len(lines)
    per_token = forward_flops_per_token(n_params, shape["n_layer"], shape["n_embd"], mean_len)

    def timed(fn: Any) -> tuple[Any, float]:
        start = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - start

    def ours(dtype: Any) -> Any:
        return score_sequences(
            fused,
            lines,
            context_token=eos,
            max_length=shape["n_positions"],
            batch_size=8,
            autocast_dtype=dtype,
        )

    ours(None)  # warm-up: first-call allocations and oneDNN kernel selection
    fp32, fp32_s, (base_nll, base_count), base_s = alternate(
        lambda: ours(None), lambda: per_line_perplexity(model, lines, eos)
    )
    peak = best_peak(peak_before, cpu_matmul_peak(threads, quick))
    tokens = fp32.predicted_tokens
    fp32_mfu = tokens / fp32_s * per_token / peak["fp32_flops"]
    base_mfu = base_count / base_s * per_token / peak["fp32_flops"]
    desc = f"{shape['n_layer']} x {shape['n_embd']}, {len(lines)} lines, {tokens} tokens"
    figures = [
        Figure(
            "eval_mfu",
            fp32_mfu,
            "of peak",
            ">= 0.6",
            f"score_sequences fp32 at GPT-2-small-like {desc}, "
            f"{tokens / fp32_s:.0f} tok/s x {per_token / 1e6:.0f} MFLOP/token",
        ),
        Figure(
            "eval_baseline_mfu",
            base_mfu,
            "of peak",
            None,
            f"per-line loop, same model and lines ({base_count / base_s:.0f} tok/s)",
        ),
        Figure(
            "eval_ppl_speedup_gpt2_shape",
            base_s / fp32_s,
            "x",
            None,
            "score_sequences vs per-line loop at that shape, fp32",
        ),
    ]
    details: dict[str, Any] = {
        "shape": shape,
        "flops_per_token": per_token,
        "mean_attended": mean_len,
        "fp32_s": fp32_s,
        "baseline_s": base_s,
        "tokens": tokens,
        "peak": peak,
    }
    if peak["bf16_flops"]:
        ours(torch.bfloat16)
        bf16, bf16_s = timed(lambda: ours(torch.bfloat16))
        base_ppl = perplexity_from_nll(base_nll, base_count)
        figures += [
            Figure(
                "eval_bf16_speedup",
                base_s / bf16_s,
                "x",
                ">= 5",
                f"score_sequences bf16 autocast vs the fp32 per-line loop ({desc}); "
                "the stage with evaluation.precision: bf16 (auto is fp32 on a CPU)",
            ),
            Figure(
                "eval_bf16_rel_diff",
                abs(bf16.perplexity - base_ppl) / base_ppl,
                "",
                "< 1e-4",
                f"bf16 ppl {bf16.perplexity:.4f} vs fp32 per-line {base_ppl:.4f}",
            ),
            Figure(
                "eval_bf16_mfu",
                tokens / bf16_s * per_token / peak["bf16_flops"],
                "of peak",
                None,
                f"over the bf16 matmul peak {peak['bf16_flops'] / 1e9:.0f} GFLOP/s",
            ),
        ]
        details["bf16_s"] = bf16_s
        details["bf16_ppl"] = bf16.perplexity
        details["fp32_ppl"] = fp32.perplexity
    return figures, details


def run(quick: bool, threads: int) -> tuple[list[Figure], dict[str, Any]]:
    import torch
    from transformers import AutoTokenizer

    from kubetune_trainer.bleu import generate_continuations, select_samples, stop_token_mask
    from kubetune_trainer.perplexity import perplexity_from_nll, score_sequences
    from kubetune_trainer.tokenizer_build import encode_batch

    torch.set_num_threads(threads)
    n_ppl = 300 if quick else 2000
    n_bleu = 24 if quick else 200
    max_new = 16 if quick else 48
    tokenizer = AutoTokenizer.from_pretrained(str(bench_tokenizer()))
    eos = int(tokenizer.eos_token_id)
    model = build_model(len(tokenizer), eos)
    fused = stage_model(model)
    _, test = split_train_test(clean_tldr_lines())
    ppl_lines = test[:n_ppl]
    sequences = encode_batch(tokenizer, ppl_lines)

    ours, ours_s, (base_nll, base_count), base_s = alternate(
        lambda: score_sequences(
            fused, sequences, context_token=eos, max_length=MODEL["n_positions"], batch_size=8
        ),
        lambda: per_line_perplexity(model, sequences, eos),
    )
    base_ppl = perplexity_from_nll(base_nll, base_count)
    if base_count != ours.predicted_tokens:
        raise RuntimeError(f"token counts differ: {ours.predicted_tokens} vs {base_count}")
    ppl_rel = abs(ours.perplexity - base_ppl) / base_ppl
    ours_tps = ours.predicted_tokens / ours_s
    base_tps = base_count / base_s

    samples = select_samples(test[n_ppl:], prompt_fraction=0.5, max_samples=n_bleu)
    prompts = [s.prompt for s in samples]
    newline = stop_token_mask(tokenizer, model.config.vocab_size)
    start = time.perf_counter()
    hyps, _ = generate_continuations(
        fused,
        tokenizer,
        prompts,
        max_new_tokens=max_new,
        batch_size=16,
        max_length=MODEL["n_positions"],
    )
    gen_s = time.perf_counter() - start
    start = time.perf_counter()
    base_hyps, base_generated = per_line_generate(model, tokenizer, prompts, max_new, newline)
    base_gen_s = time.perf_counter() - start
    agree = sum(a == b for a, b in zip(hyps, base_hyps, strict=True)) / len(prompts)
    # Same greedy decisions -> the same tokens: rate both on the baseline's count.
    gen_tps = base_generated / gen_s
    base_gen_tps = base_generated / base_gen_s

    figures = [
        Figure(
            "eval_ppl_tokens_per_s",
            ours_tps,
            "tok/s",
            None,
            f"score_sequences, {n_ppl} lines, batch 8 x 512 budget",
        ),
        Figure("eval_ppl_baseline_tokens_per_s", base_tps, "tok/s", None, "one line per forward"),
        Figure(
            "eval_ppl_speedup",
            ours_tps / base_tps,
            "x",
            ">= 5",
            f"fp32, {threads} thread(s), each side's best of {ROUNDS} alternating runs",
        ),
        Figure(
            "eval_ppl_rel_diff",
            ppl_rel,
            "",
            "< 1e-4",
            f"ppl {ours.perplexity:.4f} vs {base_ppl:.4f}",
        ),
        Figure(
            "bleu_gen_tokens_per_s",
            gen_tps,
            "tok/s",
            None,
            f"generate_continuations, {len(prompts)} prompts, batch 16, KV cache",
        ),
        Figure(
            "bleu_gen_baseline_tokens_per_s",
            base_gen_tps,
            "tok/s",
            None,
            "one prompt at a time, use_cache=False",
        ),
        Figure(
            "bleu_gen_speedup", gen_tps / base_gen_tps, "x", ">= 5", f"max {max_new} new tokens"
        ),
        Figure(
            "bleu_outputs_agree",
            agree,
            "share",
            ">= 0.9",
            "identical greedy continuations, batched vs per-line",
        ),
    ]
    peak_figures, peak_details = fraction_of_peak(sequences, eos, len(tokenizer), quick, threads)
    figures += peak_figures
    details = {
        "fraction_of_peak": peak_details,
        "ppl": {
            "ours": ours.perplexity,
            "baseline": base_ppl,
            "tokens": base_count,
            "ours_s": ours_s,
            "baseline_s": base_s,
            "nll_sum": [ours.nll_sum, base_nll],
            "finite": math.isfinite(base_ppl),
        },
        "bleu_gen": {
            "prompts": len(prompts),
            "generated_tokens": base_generated,
            "ours_s": gen_s,
            "baseline_s": base_gen_s,
            "max_new_tokens": max_new,
            "first_differences": [(a, b) for a, b in zip(hyps, base_hyps, strict=True) if a != b][
                :3
            ],
        },
    }
    return figures, details
