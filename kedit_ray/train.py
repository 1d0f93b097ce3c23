"""Train a learned editor (KE, MEND) on edit records: one process, data-parallel when torch.distributed is set up.

    kedit train --method ke --model gemma-3-270m --data ../shared/data/zsre_mend_train-1k.json \\
        --workers 2 --holdout 50 --out runs/ke

Each worker takes its own `batch_size` requests per step (x, its paraphrases P^x, and O^x: its unrelated
prompts with their answers plus `loc_others` other records' questions), computes the loss terms, and the
gradients of the network are averaged across workers (all-reduce over gloo) before every Adam step. Rank 0 shows
a progress bar and writes a checkpoint to OUT every `save_every` steps (editor.json names the network's and
Adam's safetensors files); a rerun with the same OUT resumes.
The first `holdout` records are never trained on: `kedit eval --limit N` evaluates exactly those.
With --workers 1 and no Ray address the loop runs in this process; otherwise Ray Train runs it on the workers
(kedit_ray.distributed.train).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from kedit_ray.editors.learned import (HyperNet, build_rows, check_fingerprint, load_tensors, load_weights,
                                       read_meta, save_checkpoint, step_terms)
from kedit_ray.editors.nets import NETS, build_net
from kedit_ray.models import LM, load
from kedit_ray.models.loading import DEFAULT_MODEL
from kedit_ray.options import UsageError, add_ray_args, count, json_object, layers, positive, positive_float
from kedit_ray.requests import EditRequest
from kedit_ray.spec import Resources


@dataclass
class TrainConfig:
    method: str                  # ke | mend
    data: str                    # zsRE or CounterFact records
    out: str
    model: str = DEFAULT_MODEL
    dataset: str = "auto"
    steps: int = 1000            # ~25 min on one core of this machine (README, Learned editors)
    batch_size: int = 1          # requests per worker per step
    lr: float = 3e-4             # Adam (the network; KE's λ and MEND's lr have their own rates)
    seed: int = 0
    holdout: int = 0             # the first N records are not trained on
    save_every: int = 50
    threads: int = 1             # torch threads per worker
    loc_tokens: int = 8          # O^x positions per unrelated prompt: its last token and answer tokens
    loc_others: int = 1          # other records' questions in each request's O^x
    progress: bool = True
    net: dict = field(default_factory=dict)   # KEConfig / MENDConfig fields

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return cls(**d)


def training_requests(cfg: TrainConfig, verbose: bool = False) -> tuple[list[EditRequest], bool]:
    """The valid records trained on (all but the first `holdout`), and whether they are zsRE (whose locality
    prompts are asked with a "?", as the zsRE evaluation does). Invalid records are skipped (`verbose`: said)."""
    from kedit_ray.datasets import load_requests
    from kedit_ray.datasets.load import dataset_of

    requests, problems = load_requests(cfg.data, cfg.dataset, skip_invalid=True)
    if verbose and problems:
        print(f"[kedit] skipped {len(problems)} invalid records, e.g. {problems[0]}", file=sys.stderr)
    zsre = dataset_of(cfg.data, cfg.dataset) == "zsre"
    requests = requests[cfg.holdout:]
    if len(requests) < 2:
        raise ValueError(f"{cfg.data}: {len(requests)} records left after --holdout {cfg.holdout}; need at least 2")
    return requests, zsre


def unrelated(requests: list[EditRequest], index: int, others: list[int], zsre: bool) -> list[tuple[str, str]]:
    """O^x of request `index`: its own unrelated prompts with their answers, and the questions of records `others`
    (the next record's in place of `index` itself)."""
    from kedit_ray.eval.zsre import loc_prompt

    r = requests[index]
    own = [(loc_prompt(p) if zsre else p, a) for p, a in zip(r.neighborhood_prompts, r.neighborhood_answers)]
    return own + [(o.text, o.target_true) for o in
                  (requests[k if k != index else (index + 1) % len(requests)] for k in others)]


def batch_indices(n: int, step: int, rank: int, world: int, size: int, seed: int) -> list[int]:
    """The records of (step, rank): one pass over a seeded permutation per epoch, each rank its own slice."""
    out = []
    for j in range(size):
        k = (step * world + rank) * size + j
        g = torch.Generator().manual_seed(seed + k // n)
        out.append(int(torch.randperm(n, generator=g)[k % n]))
    return out


def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def _all_reduce_mean(tensors: list[torch.Tensor], world: int) -> None:
    """Average tensors across workers in place (one flat all-reduce)."""
    if world == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def optim_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Adam's state as named tensors (safetensors holds no pickles)."""
    return {f"{i}/{k}": v for i, s in opt.state_dict()["state"].items() for k, v in s.items()}


def load_optim(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        i, k = key.split("/")
        state.setdefault(int(i), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


def _resume(cfg: TrainConfig, lm: LM, net: HyperNet, opt: torch.optim.Optimizer) -> tuple[int, float]:
    """(the step to start from, the seconds of training behind it): (0, 0), or OUT's checkpoint's (refused when
    made for another setup)."""
    meta = read_meta(cfg.out)
    if meta is None:
        return 0, 0.0
    where = Path(cfg.out) / "editor.json"
    check_fingerprint(meta, lm, where)
    if meta["method"] != cfg.method or meta["net"] != asdict(net.cfg):
        raise ValueError(f"{where}: a {meta['method']} checkpoint with network {meta['net']}, not this run's "
                         f"{cfg.method} {asdict(net.cfg)}; use another --out")
    load_weights(net, cfg.out, meta)
    load_optim(opt, load_tensors(cfg.out, meta, "optimizer"))
    return meta["step"], meta.get("train_s", 0.0)


def train_loop(config: dict, lm: LM | None = None, report: Callable[[dict], None] | None = None) -> dict:
    """Train to `steps` (resuming from OUT); returns the last step's figures. `lm`: a model already loaded
    (else `model` is loaded); `report(figures)` is called after every step on every worker."""
    cfg = TrainConfig.from_dict(config)
    torch.set_num_threads(cfg.threads)
    rank, world = _world()
    lm = lm or load(cfg.model)
    requests, zsre = training_requests(cfg, verbose=rank == 0)
    torch.manual_seed(cfg.seed)
    net, names = build_net(lm, cfg.method, cfg.net)
    for p in net.parameters():                       # every worker starts from rank 0's network
        if world > 1:
            dist.broadcast(p.data, 0)
    opt = torch.optim.Adam(net.param_groups(cfg.lr))
    start, before = _resume(cfg, lm, net, opt)
    first = min(net.cfg.layers)
    bar = None
    if rank == 0 and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.method}", file=sys.stderr)
    shown: dict = {}
    t_start = time.perf_counter()
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        idx = batch_indices(len(requests), step, rank, world, cfg.batch_size, cfg.seed)
        others = batch_indices(len(requests), step, rank, world, cfg.batch_size * cfg.loc_others, cfg.seed + 1)
        rows = build_rows(lm, [requests[i] for i in idx],
                          [unrelated(requests, i, others[j * cfg.loc_others:(j + 1) * cfg.loc_others], zsre)
                           for j, i in enumerate(idx)], loc_tokens=cfg.loc_tokens)
        net.train()
        terms, _ = step_terms(lm, net, names, first, rows)
        loss, shown = net.objective(terms, step / cfg.steps)
        opt.zero_grad()
        loss.backward()
        for p in net.ascent_parameters():            # the Lagrange multiplier climbs
            p.grad.neg_()
        _all_reduce_mean([p.grad for p in net.parameters()] + [b for b in net.buffers() if b.is_floating_point()],
                         world)
        opt.step()
        figures = torch.tensor([terms["nll0"].item(), *shown.values()])
        _all_reduce_mean([figures], world)
        shown = {"nll0": figures[0].item(), **dict(zip(shown, figures[1:].tolist())),
                 "step": step + 1, "step_s": time.perf_counter() - t0}
        if rank == 0 and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps):
            save_checkpoint(cfg.out, net, {"method": cfg.method, "model": lm.name, "fingerprint": lm.fingerprint,
                                           "net": asdict(net.cfg), "train": asdict(cfg), "step": step + 1,
                                           "workers": world, "figures": shown,
                                           "train_s": before + time.perf_counter() - t_start}, optim_tensors(opt))
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items() if k not in ("step", "step_s")})
        if report is not None:
            report(shown)
    if bar is not None:
        bar.close()
    return shown


# ---------------------------------------------------------------- the `kedit train` command

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", required=True, choices=["ke", "mend"], help="the learned editor to train")
    p.add_argument("--model", default=DEFAULT_MODEL, help="gemma-3-270m (embedded), a hub id, a directory or a .gguf")
    p.add_argument("--data", required=True, help="zsRE or CounterFact records (JSON, JSONL or Parquet)")
    p.add_argument("--dataset", default="auto", choices=["auto", "counterfact", "zsre"],
                   help="the layout of --data (auto: from the first record's keys)")
    p.add_argument("--steps", type=positive, default=TrainConfig.steps, help="training steps")
    p.add_argument("--batch-size", type=positive, default=1, help="requests per worker per step")
    p.add_argument("--lr", type=positive_float, default=3e-4, help="Adam's rate for the network")
    p.add_argument("--loc-others", type=positive, default=TrainConfig.loc_others,
                   help="other records' questions in each record's O^x (the locality data)")
    p.add_argument("--holdout", type=count, default=0, help="leave the first N records out (evaluate on them)")
    p.add_argument("--layers", type=layers, default=None, help="layers to edit, e.g. 12,13 or 10-13 "
                                                                "(default: measured per model)")
    p.add_argument("--modules", default="mlp_out", help="which matrices of each layer: mlp_out, mlp_in or both, "
                                                          "comma-separated")
    p.add_argument("--net", type=json_object, default={},
                   help='more network fields as JSON, e.g. \'{"c_loc": 3, "shared": true}\' (KEConfig, MENDConfig)')
    p.add_argument("--save-every", type=positive, default=50, help="steps between checkpoints")
    p.add_argument("--seed", type=int, default=0, help="seed of the network's initialisation and the data order")
    add_ray_args(p, "training (data parallel, on Ray Train)")
    p.add_argument("--out", required=True, help="checkpoint directory (a rerun resumes from it)")


def run(args: argparse.Namespace) -> int:
    import json

    from kedit_ray.models.loading import check_model

    resources = Resources.from_args(args)
    net = {**args.net, "modules": [m.strip() for m in args.modules.split(",") if m.strip()]}
    if args.layers is not None:
        net["layers"] = args.layers
    try:
        NETS[args.method][1].from_dict(net)                   # an unknown field shows here
    except (TypeError, ValueError) as e:
        raise UsageError(f"--net: {e}") from None
    config = asdict(TrainConfig(args.method, str(Path(args.data).resolve()), str(Path(args.out).resolve()),
                                args.model, args.dataset, args.steps, args.batch_size, args.lr, args.seed,
                                args.holdout, args.save_every, int(resources.cpus()),
                                loc_others=args.loc_others, net=net))
    training_requests(TrainConfig.from_dict(config))          # a data error shows here, before any worker starts
    check_model(args.model)
    if resources.in_process:
        figures = train_loop(config)
    else:
        from kedit_ray.distributed.train import run_train

        run_train(train_loop, config, resources)
        figures = read_meta(config["out"])["figures"]
    print(json.dumps({"out": config["out"], **figures}, indent=2))
    return 0
