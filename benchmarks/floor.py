"""The floor of each hot path on gemma-3-270m: the time its work would take at this machine's measured peak, beside
the time the package's code takes (issue 29 §1). Efficiency = floor / measured.

    .venv/bin/python benchmarks/floor.py [--quick] [--threads 1] [--dtype float32] [--out floor.json]

Peaks, measured first with the torch threads a worker gets (`--threads`): GFLOP/s of x Wᵀ (nn.Linear's product) in
float32 and bfloat16 at the weight shapes of gemma-3-270m and smollm2-135m (256 rows, 64 with --quick, through each
projection and the LM head), float64 at C's size (ROME's solve), and the memory bandwidth (a large copy, a large sum).
A path's floor is its roofline time, max(Σ FLOPs / peak of their dtype, Σ bytes / bandwidth), from counts made of
the model's shapes (d hidden, f MLP, V vocabulary, L layers, q and kv the attention widths) and the path's own token
counts:

    a block, per token                 2·P,  P = d·(2q + 2kv) + 3·d·f      (q, k, v, o; gate, up, down)
    causal attention, per block        4·q·(i + 1) for the token at position i   (QKᵀ and AV)
    the LM head, per position read     2·d·V
    backward to the inputs             as forward (weights frozen: dX = dY Wᵀ only), attention twice
    bytes                              the weights a pass reads, once per pass (activations left out)
    ROME's solve                       LU of C, 2/3·f³ + 2·f², in float64
    stats, per token                   the forward to layer l's down_proj input, and f² for kᵀk (syrk)
    tracing                            the clean and the S corrupted runs, and per restoration (kind, token t, lowest
                                       layer lo) S rows × tokens t.. through blocks lo.., the head at the last token

Under 0.3 a row says why, from the counts: its largest part and how long the counted matmuls take at the rates
measured at their own shapes (small M runs far below the peak).
"""
from __future__ import annotations

import argparse
import functools
import json
import operator
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from bench_stats import DATA, sync

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass(frozen=True)
class Shape:
    """A decoder's sizes."""

    name: str
    d: int        # hidden
    f: int        # MLP
    vocab: int
    layers: int
    q: int        # heads × head_dim
    kv: int       # key/value heads × head_dim

    @classmethod
    def of(cls, lm) -> Shape:
        c = lm.model.config.get_text_config()
        head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return cls(lm.name, c.hidden_size, c.intermediate_size, c.vocab_size, c.num_hidden_layers,
                   c.num_attention_heads * head, c.num_key_value_heads * head)

    @property
    def block(self) -> int:
        """P: a block's projection weights."""
        return self.d * (2 * self.q + 2 * self.kv) + 3 * self.d * self.f


GEMMA = Shape("gemma-3-270m", 640, 2048, 262144, 18, 4 * 256, 1 * 256)
SMOLLM2 = Shape("smollm2-135m", 576, 1536, 49152, 30, 9 * 64, 3 * 64)   # its GGUF's llama.* metadata


@dataclass
class Part:
    """Counted work of one part of a path, in `dtype`, with a matmul (m, k, n) that stands for it."""

    flops: float
    bytes: float
    dtype: str
    gemm: tuple[int, int, int] | None = None

    def __mul__(self, n: float) -> Part:
        return Part(self.flops * n, self.bytes * n, self.dtype, self.gemm)

    def __add__(self, other: Part) -> Part:   # one dtype; this part's matmul stands for both
        return Part(self.flops + other.flops, self.bytes + other.bytes, self.dtype, self.gemm)


def body(s: Shape, lengths: list[int], blocks: int, dtype: str, start: int = 0, backward: bool = False) -> Part:
    """`blocks` blocks over rows of `lengths` tokens, tokens start.. computed (the earlier ones' keys given)."""
    tokens = sum(n - start for n in lengths)
    attn = sum(4 * s.q * (i + 1) for n in lengths for i in range(start, n))
    w = torch.finfo(DTYPES[dtype]).bits // 8
    return Part(blocks * (tokens * 2 * s.block + (2 if backward else 1) * attn), w * blocks * s.block, dtype,
                (tokens, s.d, s.f))


def head(s: Shape, positions: int, dtype: str) -> Part:
    w = torch.finfo(DTYPES[dtype]).bits // 8
    return Part(positions * 2 * s.d * s.vocab, w * s.d * s.vocab if positions else 0, dtype, (positions, s.d, s.vocab))


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return out


def gemm_rate(m: int, k: int, n: int, dtype: str, repeats: int) -> float:
    """Best GFLOP/s of x [m, k] · Wᵀ (W [n, k]) in `dtype`, after one warm-up."""
    x, w = torch.randn(m, k).to(DTYPES[dtype]), torch.randn(n, k).to(DTYPES[dtype])
    F.linear(x, w)
    return 2 * m * k * n / min(timed(lambda: F.linear(x, w), repeats)) / 1e9


def bandwidth(n: int, repeats: int) -> dict[str, float]:
    """GB/s of copying and of summing n float32s."""
    a, b = torch.randn(n), torch.empty(n)
    b.copy_(a)
    return {"copy": 8 * n / min(timed(lambda: b.copy_(a), repeats)) / 1e9,
            "sum": 4 * n / min(timed(a.sum, repeats)) / 1e9}


def peaks(rows: int, repeats: int, big: int) -> tuple[dict[str, float], float]:
    """{dtype: peak GFLOP/s}, peak GB/s; prints every rate measured."""
    peak = {}
    for dtype in ("float32", "bfloat16"):
        rates = {f"{s.name} {k}→{n}": gemm_rate(rows, k, n, dtype, repeats) for s in (GEMMA, SMOLLM2)
                 for k, n in ((s.d, s.q), (s.d, s.f), (s.f, s.d), (s.d, s.vocab))}
        peak[dtype] = max(rates.values())
        print(f"{dtype:9} GFLOP/s at {rows} rows: " + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()))
    peak["float64"] = gemm_rate(GEMMA.f, GEMMA.f, GEMMA.f, "float64", max(1, repeats // 2))
    bw = bandwidth(big, repeats)
    print(f"float64   GFLOP/s at {GEMMA.f}³ (C's size): {peak['float64']:.0f}; memory GB/s ({4 * big >> 20} MiB): "
          + ", ".join(f"{k} {v:.1f}" for k, v in bw.items()))
    return peak, max(bw.values())


@dataclass
class Row:
    path: str
    measured: list[float]            # seconds per case (or run)
    parts: list[dict[str, Part]]     # counted work per case
    notes: list[str]

    def floor(self, peak: dict[str, float], bw: float) -> float:
        return statistics.fmean(max(sum(p.flops / (peak[p.dtype] * 1e9) for p in ps.values()),
                                    sum(p.bytes for p in ps.values()) / (bw * 1e9)) for ps in self.parts)


class Table(dict):
    """path → Row."""

    def add(self, path: str, seconds: float, parts: dict[str, Part], note: str = "") -> None:
        row = self.setdefault(path, Row(path, [], [], []))
        row.measured.append(seconds)
        row.parts.append(parts)
        if note and note not in row.notes:
            row.notes.append(note)


def why(row: Row, peak: dict[str, float], bw: float, repeats: int) -> str:
    """The largest part's share of the counts, and the counted matmuls' time at the rates of their own shapes."""
    ps = row.parts[0]
    flops, nbytes = sum(p.flops for p in ps.values()), sum(p.bytes for p in ps.values())
    top = max(ps, key=lambda k: max(ps[k].flops / peak[ps[k].dtype], ps[k].bytes / bw))
    at_shape = sum(max(p.flops / (gemm_rate(*p.gemm, p.dtype, repeats) if p.gemm else peak[p.dtype]), p.bytes / bw)
                   for p in ps.values() if p.flops) / 1e9
    return (f"{top}: {ps[top].flops / 1e9:.2f} of {flops / 1e9:.2f} GFLOP, {ps[top].bytes / 1e6:.0f} of "
            f"{nbytes / 1e6:.0f} MB; the counted matmuls at the rates measured at their shapes take {at_shape:.2f} of "
            f"the {row.measured[0]:.2f} s measured (case 1)")


@dataclass
class Counts:
    """The work of the editors' and scorer's passes on `lm` (sizes `s`, weights in `dt`), from their token counts."""

    lm: object
    s: Shape
    dt: str

    def keys(self, req, at: int, prefixes: list[str]) -> dict[str, Part]:
        """compute_keys: the prompt after each prefix, blocks 0..at."""
        lengths = [len(self.lm.tok(p + req.text).input_ids) for p in prefixes]
        return {f"k*: blocks 0..{at} over {sum(lengths)} tokens": body(self.s, lengths, at + 1, self.dt)}

    def values(self, req, at: int, prefixes: list[str], steps: int) -> dict[str, Part]:
        """optimize_values: a clean pass, then per step the blocks above `at` (δ enters at its output) and the
        head where the loss reads it, forward each step and backward each step but the last."""
        from kedit_ray.editors.toolkit import _value_batch

        s, dt = self.s, self.dt
        b = _value_batch(self.lm, [req], prefixes)
        lengths, pos = b.mask.sum(1).tolist(), len(b.loss_rows) + len(b.kl_rows)
        passes, above = 2 * steps - 1, s.layers - at - 1
        up = body(s, lengths, above, dt) * steps + body(s, lengths, above, dt, backward=True) * (steps - 1)
        return {"v*: clean pass": body(s, lengths, s.layers, dt) + head(s, pos, dt),
                f"v*: {s.vocab // 1000}k-word head at {pos} positions × {passes} passes": head(s, pos, dt) * passes,
                f"v*: blocks {at + 1}..{s.layers - 1} over {sum(lengths)} tokens × {passes} passes": up}

    def solve(self) -> dict[str, Part]:
        f = self.s.f
        return {f"LU of C ({f}²)": Part(2 / 3 * f ** 3 + 2 * f ** 2, 8 * f ** 2, "float64", None)}

    def scoring(self, prompts: list[str], targets: list[list[int]]) -> dict[str, Part]:
        """forced_reads: the rows it plans for the (prompt, target ids) pairs, the head once per position read."""
        from kedit_ray.eval.forced import plan_rows

        ctxs = self.lm.tok(prompts).input_ids
        plan, row_of = plan_rows(ctxs, targets)
        reads = len({(r, len(ctx) - 1 + j) for ctx, tgt, r in zip(ctxs, targets, row_of) for j in range(len(tgt))})
        return {f"body: {len(plan)} rows, {sum(map(len, plan))} tokens": body(self.s, list(map(len, plan)),
                                                                           self.s.layers, self.dt),
                f"head at {reads} positions": head(self.s, reads, self.dt)}

    def counterfact(self, req) -> dict[str, Part]:
        """counterfact_many's pairs: each prompt with o* and with o."""
        from kedit_ray.editors.toolkit import target_ids
        from kedit_ray.eval.counterfact import pairs

        ps = pairs(req)
        return self.scoring([p for p, _, _ in ps for _ in (0, 1)],
                            [target_ids(self.lm, t) for _, a, b in ps for t in (a, b)])

    def zsre(self, req) -> dict[str, Part]:
        """zsre_many's pairs: the question and its paraphrases with o*, the portability questions with their
        answers, the loc question (with "?") with its answer."""
        from kedit_ray.editors.toolkit import target_ids
        from kedit_ray.eval.zsre import loc_prompt

        new = target_ids(self.lm, req.target_new)
        pairs = [(p, new) for p in [req.text, *req.paraphrase_prompts]]
        pairs += [(p, target_ids(self.lm, a)) for p, a in zip(req.portability_prompts, req.portability_answers)]
        pairs += [(loc_prompt(p), target_ids(self.lm, a)) for p, a in zip(req.neighborhood_prompts,
                                                                          req.neighborhood_answers)]
        return self.scoring([p for p, _ in pairs], [t for _, t in pairs])


def edit_rows(table: Table, n: Counts, cases: list, repeats: int) -> None:
    """ROME's edit whole and by phase (the toolkit calls as Rome.edit makes them), MEMIT's z, scoring a case."""
    from kedit_ray.editors import Memit, MemitParams, Rome, RomeParams
    from kedit_ray.editors.rome import rank_one, value_params
    from kedit_ray.editors.toolkit import compute_keys, optimize_values
    from kedit_ray.eval import Scorer

    lm = n.lm
    rome, memit, scorer = Rome(RomeParams()), Memit(MemitParams()), Scorer("counterfact")
    layer, prefixes = rome.layer(lm), rome.prefixes(lm)
    c, vp = rome.covariances(lm)[0][layer], value_params(lm, rome.hp.values)
    z_layer, z_prefixes = memit.layers(lm)[-1], memit.prefixes(lm)
    with rome.edit(lm, cases[0]).applied(lm.model):   # warm-up: C, prefixes, first calls
        scorer(lm, cases[0])
    for case in cases:
        t = time.perf_counter()
        d = rome.edit(lm, case)
        edit_s = time.perf_counter() - t
        t0 = time.perf_counter()
        k = compute_keys(lm, layer, [case], prefixes)[0]
        t1 = time.perf_counter()
        _, delta, info = optimize_values(lm, layer, [case], prefixes, k[None], vp)
        t2 = time.perf_counter()
        rank_one(k.double(), delta[0].double(), c, k.double())
        t3 = time.perf_counter()
        table.add("rome: one edit", edit_s, {**n.keys(case, layer, prefixes),
                                             **n.values(case, layer, prefixes, d.meta["v_steps"]), **n.solve()})
        table.add("rome: k*", t1 - t0, n.keys(case, layer, prefixes))
        table.add("rome: v* steps", t2 - t1, n.values(case, layer, prefixes, info["v_steps"]),
                  f"{info['v_steps']} steps")
        table.add("rome: solve", t3 - t2, n.solve(), f"C is the same every edit: factored once, an edit's solve "
                  f"would need 2·f² = {2 * n.s.f ** 2 / 1e6:.1f} MFLOP")
        t = time.perf_counter()
        _, z = memit.targets(lm, [case])
        z_s = time.perf_counter() - t
        keys = n.keys(case, z_layer, z_prefixes) if memit.params(lm).z_module == "mlp_out" else {}
        table.add("memit: z for one request", z_s, {**keys, **n.values(case, z_layer, z_prefixes, z["v_steps"])})
        seconds = timed(lambda: scorer(lm, case), repeats)
        table.add("scoring: one CounterFact case", statistics.median(seconds), n.counterfact(case))


def zsre_row(table: Table, n: Counts, cases_n: int, repeats: int) -> None:
    """Scoring one zsRE case (with its portability question) after an edit: the unedited model's scores as `pre`."""
    from kedit_ray.datasets import load_requests
    from kedit_ray.eval import Scorer

    scorer = Scorer("zsre")
    cases, _ = load_requests(str(DATA / "zsre_portability.json"), "zsre", limit=cases_n)
    for case in cases:
        pre = scorer(n.lm, case)
        seconds = timed(lambda: scorer(n.lm, case, pre), repeats)
        table.add("scoring: one zsRE case", statistics.median(seconds), n.zsre(case))


def stats_row(table: Table, n: Counts, layer: int, docs: int) -> None:
    """Layer statistics at `layer` over the first `docs` WikiText documents, as compute_stats packs them."""
    from kedit_ray.stats import corpus
    from kedit_ray.stats.accumulate import Partial, add_batch, batches, tokenize

    s, dt = n.s, n.dt
    texts = [x for _, x in zip(range(docs), corpus.documents(str(DATA / "wiki.test.raw")))]
    packed = list(batches(n.lm.tok, tokenize(n.lm.tok, texts, 1024), 4096))
    add_batch(n.lm, [layer], "mlp_out", *packed[-1], Partial())                  # warm-up
    part, seconds, forward = Partial(), 0.0, []
    for ids, mask in packed:
        t = time.perf_counter()
        add_batch(n.lm, [layer], "mlp_out", ids, mask, part)
        seconds += time.perf_counter() - t
        lengths = mask.sum(1).tolist()
        forward.append(body(s, lengths, layer + 1, dt) + Part(-2 * s.d * s.f * sum(lengths), 0, dt))  # - down_proj
    tokens, padded = part.count, sum(ids.numel() for ids, _ in packed)
    table.add(f"stats: {tokens} tokens", seconds,
              {f"forward to layer {layer}'s down_proj input, {len(packed)} passes": _sum(forward),
               "kᵀk": Part(tokens * s.f ** 2, 0, "float32", (s.f, tokens // len(packed), s.f))},
              f"{tokens / seconds:.0f} tokens/s, {padded} padded tokens run")


def trace_row(table: Table, n: Counts, samples: int) -> None:
    """One fact's full trace (every kind, token from the subject on and layer), bench_trace.py's fact."""
    from kedit_ray.tracing.trace import TraceParams, grid, noise_std, subject_tokens, trace_fact

    s, dt, lm = n.s, n.dt, n.lm
    prompt, subject = "The Big Bang Theory premieres on", "The Big Bang Theory"
    params = TraceParams(samples=samples)
    t = time.perf_counter()
    trace_fact(lm, prompt, subject, 3 * noise_std(lm, [prompt]), params)
    seconds = time.perf_counter() - t
    ids, subj = subject_tokens(lm, prompt, subject)
    T, S = ids.shape[1], samples
    restores = grid(lm, SimpleNamespace(ids=ids, subject=subj), params)
    lows = {min(r.layers) for r in restores}
    blocks = _sum([body(s, [T] * S, s.layers - min(r.layers), dt, start=r.tokens[0]) for r in restores])
    blocks.bytes = sum(s.layers - lo for lo in lows) * s.block * torch.finfo(DTYPES[dt]).bits // 8  # a pass per lo
    blocks.gemm = (min(params.max_rows, S * len(restores) // len(lows)), s.d, s.f)
    table.add("tracing: one fact", seconds,
              {"clean and corrupted runs": body(s, [T] * (S + 1), s.layers, dt) + head(s, S + 1, dt),
               f"restorations: {len(restores)} × {S} rows, blocks": blocks,
               f"restorations: head at {len(restores) * S} rows": head(s, len(restores) * S, dt)},
              f"{len(restores)} restorations × {S} samples")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one case, one repeat, small counts")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, as a worker gets (default 1)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the model's dtype")
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--out", default=None, help="write the table as JSON here")
    args = ap.parse_args()
    cases_n, repeats, docs, samples, rows, big = (1, 1, 10, 2, 64, 1 << 24) if args.quick else \
        (3, 3, 60, 10, 256, 1 << 26)
    torch.set_num_threads(args.threads)

    from kedit_ray.datasets import load_requests
    from kedit_ray.editors.rome import default_layer
    from kedit_ray.models import load

    t_start = time.perf_counter()
    print(f"{os.cpu_count()} CPUs, {args.threads} torch thread(s), load average {os.getloadavg()[0]:.1f}")
    peak, bw = peaks(rows, repeats, big)
    lm = load(args.model, dtype=args.dtype)
    n, table = Counts(lm, Shape.of(lm), args.dtype), Table()
    cases, _ = load_requests(str(DATA / "counterfact-edit.json"), "counterfact", limit=cases_n)
    edit_rows(table, n, cases, repeats)
    zsre_row(table, n, cases_n, repeats)
    stats_row(table, n, default_layer(lm), docs)
    trace_row(table, n, samples)

    out = []
    print(f"\n{args.model} in {args.dtype}, {len(cases)} CounterFact case(s), ROME layer {default_layer(lm)}; peaks: "
          + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peak.items()) + f", {bw:.1f} GB/s")
    print(f"{'path':34} {'measured s':>10} {'floor s':>9} {'eff.':>6}  notes / reason (eff. < 0.3)")
    for row in table.values():
        measured, floor = statistics.fmean(row.measured), row.floor(peak, bw)
        item = {"path": row.path, "measured_s": measured, "floor_s": floor, "efficiency": floor / measured}
        if row.notes:
            item["note"] = "; ".join(row.notes)
        if item["efficiency"] < 0.3:
            item["reason"] = why(row, peak, bw, repeats)
        out.append(item)
        print(f"{row.path:34} {measured:10.3f} {floor:9.3f} {item['efficiency']:6.2f}  "
              + "; ".join(x for x in (item.get("note"), item.get("reason")) if x))
    print(f"(the whole run: {time.perf_counter() - t_start:.0f} s, load average {os.getloadavg()[0]:.1f})")
    if args.out:
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1) + "\n")
        tmp.replace(args.out)


def _sum(parts: list[Part]) -> Part:
    return functools.reduce(operator.add, parts)


if __name__ == "__main__":
    main()
