"""The GPU check (issue 18 §6): ROME, MEMIT z, layer statistics and causal tracing on CUDA, each beside the same
run on the CPU in the same invocation, with the speed-up (CPU time per unit / CUDA time per unit).

    python benchmarks/gpu_check.py --prepare        # where gemma-3-270m is: writes benchmarks/.gpu_assets/
    python benchmarks/gpu_check.py [--quick] [--threads N] [--out FILE.json]

No Ray and no weights: the lent GPU machine has neither (and at most 64 MiB travels with the working tree). The
model is gemma-3-270m's architecture built from its config.json with seeded random weights, with its real
tokenizer; both come from the git-ignored assets folder that `--prepare` writes (config.json, the tokenizer's
small files, tokenizer.json gzipped: about 5 MiB; a run prepares it when it is missing and the model is there).
Speed does not depend on the weights' values.

1. ROME, one fixed request (the demo's), exactly `v_steps` v* steps (early stop off), C = I: s/edit in float32 and
   in bfloat16.
2. MEMIT z (`Memit.targets`) for N requests, `v_steps` steps each: all N in one batch, then one at a time.
3. Layer statistics for 5 layers in one pass against a bare forward pass to the same depth (tokens/s), on the
   WikiText shipped with the package (benchmarks/bench_stats.py's runs).
4. One fact's causal trace, batched restorations against one pass per restoration (benchmarks/bench_trace.py).

The CPU side runs fewer repetitions and smaller sets (SIZES) so the whole run fits in 10 minutes; every figure is
per unit (edit, request, token, fact), so the ratios hold. CUDA runs first; each part's figures go to stderr as
they come. Without CUDA only the CPU column is measured.
`--quick`: tiny sizes on both, a smoke test (2 v* steps, 2 requests, 10 documents, hidden states only).
"""
from __future__ import annotations

import argparse
import copy
import gzip
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
# run from anywhere, and imported by the tests: this checkout's kedit_ray and the benchmarks beside this file
sys.path[:0] = [str(HERE.parent), str(HERE)]

import torch  # noqa: E402
import transformers  # noqa: E402

from bench_stats import bare_pass, interleaved  # noqa: E402
from bench_trace import compare, largest_difference  # noqa: E402
from kedit_ray.cli import DEMO  # noqa: E402
from kedit_ray.editors import Memit, MemitParams, Rome, RomeParams  # noqa: E402
from kedit_ray.editors.toolkit import ValueParams  # noqa: E402
from kedit_ray.io import write_json  # noqa: E402
from kedit_ray.models import LM  # noqa: E402
from kedit_ray.models.loading import DEFAULT_MODEL, resolve, wrap  # noqa: E402
from kedit_ray.requests import EditRequest  # noqa: E402
from kedit_ray.stats.accumulate import Partial, add_batch, batches, tokenize  # noqa: E402
from kedit_ray.stats.corpus import DEFAULT_CORPUS, documents  # noqa: E402
from kedit_ray.tracing import KINDS, TraceParams  # noqa: E402

ASSETS = HERE / ".gpu_assets"
SMALL_FILES = ("config.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
BATCH_TOKENS = 4096   # padded tokens per stats batch, as bench_stats
# MEMIT's requests: the demo's template, one subject each, a new city for each
SUBJECTS = ("Space Needle", "Eiffel Tower", "Colosseum", "Big Ben", "Brandenburg Gate", "Sagrada Familia",
            "Golden Gate Bridge", "Sydney Opera House", "Taj Mahal", "Kremlin", "Louvre", "Acropolis", "Alhambra",
            "Atomium", "Charles Bridge", "Hagia Sophia", "Burj Khalifa", "Petronas Towers", "CN Tower",
            "Forbidden City", "Tower Bridge", "Leaning Tower of Pisa", "Christ the Redeemer", "Angkor Wat",
            "Empire State Building")
CITIES = ("Goa", "Rome", "Paris", "London", "Berlin", "Madrid", "Tokyo")


@dataclass(frozen=True)
class Sizes:
    rome_edits: int                 # timed ROME edits per dtype (median), after a one-step warm-up edit
    v_steps: int                    # v* / z steps, all of them (early stop off)
    memit: int                      # MEMIT requests
    docs: int                       # WikiText documents for the stats pass
    max_len: int                    # tokens per document
    trace_samples: int              # noise samples per restoration
    trace_kinds: tuple[str, ...] = KINDS


SIZES = {"cuda": Sizes(rome_edits=5, v_steps=20, memit=25, docs=800, max_len=1024, trace_samples=3),
         "cpu": Sizes(rome_edits=2, v_steps=20, memit=5, docs=100, max_len=1024, trace_samples=3)}
QUICK = Sizes(rome_edits=1, v_steps=2, memit=2, docs=10, max_len=128, trace_samples=1, trace_kinds=("hidden",))
# (key, what, unit); "x" rows are ratios within one device, "tokens/s" rows are rates, the rest seconds per unit
ROWS = (("rome float32", "ROME, float32, C = I", "s/edit"),
        ("rome bfloat16", "ROME, bfloat16, C = I", "s/edit"),
        ("memit batched", "MEMIT z, all requests in one batch", "s/request"),
        ("memit one", "MEMIT z, one request at a time", "s/request"),
        ("memit speed-up", "MEMIT z batch speed-up", "x"),
        ("stats one pass", "stats, {layers} layers in one pass", "tokens/s"),
        ("stats bare", "bare forward to the same depth", "tokens/s"),
        ("stats ratio", "stats throughput / bare forward", "x"),
        ("trace batched", "trace, batched restorations", "s/fact"),
        ("trace one", "trace, one pass per restoration", "s/fact"),
        ("trace speed-up", "trace batch speed-up", "x"))


# ---------------------------------------------------------------- the model

def prepare(model: str, assets: Path) -> Path:
    """Write `assets`: `model`'s config and tokenizer, no weights; tokenizer.json gzipped. Replaces it whole."""
    source = Path(resolve(model))
    if not (source / "config.json").is_file() or not (source / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{source}: no config.json and tokenizer.json to prepare the assets from")
    assets.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=assets.parent, prefix=f".{assets.name}."))
    try:
        for name in SMALL_FILES:
            if (source / name).is_file():
                shutil.copy(source / name, tmp / name)
        with open(source / "tokenizer.json", "rb") as f, gzip.open(tmp / "tokenizer.json.gz", "wb") as g:
            shutil.copyfileobj(f, g)
        shutil.rmtree(assets, ignore_errors=True)
        os.replace(tmp, assets)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return assets


def folder_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.iterdir()) / 2**20


def tokenizer(assets: Path):
    """The tokenizer in `assets` (tokenizer.json or tokenizer.json.gz)."""
    from transformers import AutoTokenizer

    packed = assets / "tokenizer.json.gz"
    if not packed.is_file():
        return AutoTokenizer.from_pretrained(assets)
    with tempfile.TemporaryDirectory(prefix="gpu-check-tok-") as tmp:
        for name in SMALL_FILES:
            if (assets / name).is_file():
                shutil.copy(assets / name, Path(tmp) / name)
        with gzip.open(packed, "rb") as f, open(Path(tmp) / "tokenizer.json", "wb") as g:
            shutil.copyfileobj(f, g)
        return AutoTokenizer.from_pretrained(tmp)


def build(assets: Path, name: str, seed: int) -> LM:
    """The architecture of `assets`/config.json with random weights (seeded), float32 on the CPU, wrapped as
    `kedit_ray.models.load` wraps a loaded model. `name` picks the editors' per-model defaults (layer, bound)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(assets)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return wrap(model, tokenizer(assets), name)


def variant(lm: LM, device: str, dtype: torch.dtype) -> LM:
    """A copy of `lm` on `device` in `dtype` (the CPU float32 model itself when that is what is asked)."""
    if device == "cpu" and dtype == torch.float32:
        return lm
    return wrap(copy.deepcopy(lm.model).to(device=device, dtype=dtype), lm.tok, lm.name)


# ---------------------------------------------------------------- the measures

def demo_request() -> EditRequest:
    return EditRequest(0, DEMO["subject"], DEMO["prompt"], DEMO["target_new"], DEMO["target_true"])


def memit_requests(n: int) -> list[EditRequest]:
    if n > len(SUBJECTS):
        raise ValueError(f"at most {len(SUBJECTS)} MEMIT requests, got {n}")
    return [EditRequest(i, s, DEMO["prompt"], CITIES[i % len(CITIES)]) for i, s in enumerate(SUBJECTS[:n])]


def fixed_values(steps: int) -> ValueParams:
    return ValueParams(steps=steps, early_stop=False)


def rome(lms: dict[str, LM], sizes: Sizes) -> tuple[dict[str, float], torch.Tensor]:
    """Median s/edit per dtype, interleaved; and the float32 ΔW (float64, on the CPU) for the device check."""
    request = demo_request()
    warm = Rome(RomeParams(use_cov=False, values=fixed_values(1)))
    editor = Rome(RomeParams(use_cov=False, values=fixed_values(sizes.v_steps)))
    for lm in lms.values():
        warm.edit(lm, request)          # context prefixes (cached per model), first-call overheads
    deltas = {}

    def edit(dtype: str) -> None:
        deltas[dtype] = editor.edit(lms[dtype], request)

    times = interleaved({dtype: (lambda d=dtype: edit(d)) for dtype in lms}, [()] * sizes.rome_edits)
    steps = {d.meta["v_steps"] for d in deltas.values()}
    assert steps == {sizes.v_steps}, f"v* ran {steps} steps, not {sizes.v_steps}"
    dw = next(iter(deltas["float32"].deltas.values()))
    return {f"rome {dtype}": statistics.median(ts) for dtype, ts in times.items()}, dw.double().cpu()


def memit(lm: LM, sizes: Sizes) -> dict[str, float]:
    """s/request of MEMIT's z for `sizes.memit` requests, all in one batch and one at a time."""
    requests = memit_requests(sizes.memit)

    def editor(z_batch: int, steps: int) -> Memit:
        return Memit(MemitParams.from_dict({"use_cov": False, "z_batch": z_batch,
                                            "values": asdict(fixed_values(steps))}))

    editor(len(requests), 1).targets(lm, requests)     # warm-up: one step on the batch
    editors = {"memit batched": editor(len(requests), sizes.v_steps), "memit one": editor(1, sizes.v_steps)}
    info = {}

    def targets(key: str) -> None:
        info[key] = editors[key].targets(lm, requests)[1]

    times = interleaved({key: (lambda k=key: targets(k)) for key in editors}, [()])
    assert all(i["v_steps"] == sizes.v_steps for i in info.values()), info
    out = {key: ts[0] / len(requests) for key, ts in times.items()}
    return {**out, "memit speed-up": out["memit one"] / out["memit batched"]}


def stats_layers(n_layers: int) -> list[int]:
    """bench_stats's layers 3-7, or the last 5 (all of them) on a smaller model."""
    first = min(3, max(0, n_layers - 5))
    return list(range(first, min(first + 5, n_layers)))


def stats(lm: LM, sizes: Sizes) -> dict[str, float]:
    """tokens/s of the stats pass for 5 layers and of a bare forward pass stopped at the same place."""
    layers = stats_layers(lm.n_layers)
    docs = [d for _, d in zip(range(sizes.docs), documents(DEFAULT_CORPUS))]
    packed = list(batches(lm.tok, tokenize(lm.tok, docs, sizes.max_len), BATCH_TOKENS))
    runs = {"stats one pass": lambda ids, mask, p=Partial(): add_batch(lm, layers, "mlp_out", ids, mask, p),
            "stats bare": bare_pass(lm, max(layers))}
    for run in runs.values():  # warm up on the shortest batch
        run(*packed[-1])
    times = interleaved(runs, packed)
    tokens = sum(int(m.sum()) for _, m in packed)
    out = {key: tokens / sum(ts) for key, ts in times.items()}
    return {**out, "stats ratio": out["stats one pass"] / out["stats bare"], "stats tokens": tokens}


def trace(lm: LM, sizes: Sizes) -> dict[str, float]:
    """s/fact of the demo fact's trace, batched and one pass per restoration, and their largest difference."""
    params = TraceParams(kinds=sizes.trace_kinds, samples=sizes.trace_samples)
    times, traces = compare(lm, DEMO["prompt"].format(DEMO["subject"]), DEMO["subject"], params)
    out = {"trace batched": times["batched"], "trace one": times["one pass per restoration"]}
    return {**out, "trace speed-up": out["trace one"] / out["trace batched"],
            "trace max diff": largest_difference(traces)}


def measure(lm: LM, device: str, sizes: Sizes) -> tuple[dict[str, float], torch.Tensor]:
    """Every figure on `device`, and ROME's float32 ΔW. Each part's figures go to stderr as they come."""
    def done(part: str, t0: float, out: dict[str, float]) -> None:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in out.items())
        print(f"[{device}] {part} in {time.perf_counter() - t0:.1f} s: {shown}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    lms = {"float32": variant(lm, device, torch.float32), "bfloat16": variant(lm, device, torch.bfloat16)}
    figures, dw = rome(lms, sizes)
    done("rome", t0, figures)
    del lms["bfloat16"]
    for part in (memit, stats, trace):
        t0 = time.perf_counter()
        out = part(lms["float32"], sizes)
        done(part.__name__, t0, out)
        figures.update(out)
    return figures, dw


# ---------------------------------------------------------------- the report

def speed_up(unit: str, cpu: float, cuda: float | None) -> float | None:
    """CPU time per unit / CUDA time per unit (None for a within-device ratio or without CUDA)."""
    if cuda is None or unit == "x":
        return None
    return cuda / cpu if unit == "tokens/s" else cpu / cuda


def table(figures: dict[str, dict], layers: int) -> list[dict]:
    rows = []
    for key, what, unit in ROWS:
        cpu, cuda = figures["cpu"][key], figures.get("cuda", {}).get(key)
        rows.append({"measure": what.format(layers=layers), "unit": unit, "cpu": cpu, "cuda": cuda,
                     "speed-up": speed_up(unit, cpu, cuda)})
    return rows


def cell(x: float | None) -> str:
    if x is None:
        return f"{'-':>10}"
    return f"{x:10.0f}" if x >= 1000 else f"{x:10.3g}"


def render(report: dict) -> str:
    lines = [f"torch {report['torch']}, transformers {report['transformers']}, python {report['python']}",
             f"device: {report['device']}; CPU: {report['cpu']}, {report['threads']} torch threads",
             f"model: {report['model']}",
             "ROME and MEMIT: C = I (no statistics corpus), v* / z steps fixed (early stop off)"]
    for device, s in report["sizes"].items():
        lines.append(f"{device} sizes: {s['rome_edits']} timed ROME edits per dtype, {s['v_steps']} steps, "
                     f"{s['memit']} MEMIT requests, {s['docs']} docs ({report['stats_tokens'][device]:,} tokens) "
                     f"of {DEFAULT_CORPUS.name}, trace {'+'.join(s['trace_kinds'])} × {s['trace_samples']} samples")
    if "cuda" not in report["sizes"]:
        lines.append("no CUDA: CPU only")
    lines.append(f"\n{'measure':40} {'unit':>10} {'cpu':>10} {'cuda':>10} {'cuda speed-up':>14}")
    for r in report["rows"]:
        lines.append(f"{r['measure']:40} {r['unit']:>10} {cell(r['cpu'])} {cell(r['cuda'])} {cell(r['speed-up'])}")
    lines.append("speed-up: CPU time per unit / CUDA time per unit (a tokens/s row: CUDA rate / CPU rate)")
    for name, value in report["checks"].items():
        lines.append(f"{name}: {value:.2e}")
    return "\n".join(line.rstrip() for line in lines)


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepare", action="store_true", help="write the assets folder from --model, then stop")
    ap.add_argument("--assets", type=Path, default=ASSETS, help="config and tokenizer (default: %(default)s)")
    ap.add_argument("--model", default=DEFAULT_MODEL,
                    help="--prepare: the model to take them from; else the name the editors' defaults go by")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0, help="of the random weights")
    ap.add_argument("--out", type=Path, default=None, help="also write the report here as JSON")
    args = ap.parse_args(argv)
    if args.prepare:
        path = prepare(args.model, args.assets)
        print(f"{path}: {', '.join(sorted(f.name for f in path.iterdir()))} ({folder_mib(path):.1f} MiB)")
        return None
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.assets / "config.json").is_file():   # a first run where the model is (`make bench`)
        try:
            prepare(args.model, args.assets)
        except (ImportError, OSError) as e:
            raise SystemExit(f"{args.assets}: no config.json, and it cannot be prepared here ({e}); run "
                             f"`python benchmarks/gpu_check.py --prepare` where {args.model} is, and carry the folder")
    lm = build(args.assets, args.model, args.seed)
    devices = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]   # CUDA first: its figures come first
    sizes = {d: QUICK if args.quick else SIZES[d] for d in devices}
    figures, dws = {}, {}
    for device in devices:
        figures[device], dws[device] = measure(lm, device, sizes[device])
    params = sum(p.numel() for p in lm.model.parameters())
    checks = {f"trace on {d}: max |batched - one pass per restoration|": figures[d]["trace max diff"]
              for d in devices}
    if "cuda" in dws:
        checks["ROME float32 ΔW, |cuda - cpu| / |cpu|"] = float((dws["cuda"] - dws["cpu"]).norm() / dws["cpu"].norm())
    report = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
              "device": torch.cuda.get_device_name(0) if "cuda" in devices else "none (no CUDA)",
              "cpu": f"{platform.machine()}, {os.cpu_count()} cores", "threads": torch.get_num_threads(),
              "model": f"{args.model} architecture, random weights (seed {args.seed}): {lm.n_layers} layers, "
                       f"hidden {lm.model.config.get_text_config().hidden_size}, {params / 1e6:.0f}M parameters",
              "sizes": {d: asdict(s) for d, s in sizes.items()},
              "stats_tokens": {d: int(figures[d]["stats tokens"]) for d in devices},
              "rows": table(figures, len(stats_layers(lm.n_layers))), "checks": checks}
    print(render(report), flush=True)
    if args.out:
        write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
