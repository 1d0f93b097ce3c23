"""Options every `kedit` command shares, parsed one way: the model, layers, numbers, and the help format."""
from __future__ import annotations

import argparse
import json

from kedit_ray.models.loading import DEFAULT_MODEL, EMBEDDED_GGUF


class UsageError(ValueError):
    """Options that cannot work together or for this model; the message names the flag."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's help ends with its default, unless the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is False or default == argparse.SUPPRESS \
                or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def layers(text: str) -> list[int]:
    """"3,4,5", "3-7" or "1,3-5" → sorted layer indices."""
    found: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            found.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected layers such as 3,4,5 or 3-7") from None
    if not found:
        raise argparse.ArgumentTypeError(f"{text!r} names no layer")
    return sorted(found)


def json_object(text: str) -> dict:
    """'{"c_loc": 3}' → {"c_loc": 3}."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: not JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a JSON object such as '{{\"c_loc\": 3}}'")
    return value


def ints(text: str) -> list[int]:
    """"10,100,1000" → [10, 100, 1000]."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def names(text: str) -> list[str]:
    """"a,b,c" → ["a", "b", "c"] (empty parts dropped)."""
    return [m for m in text.split(",") if m]


def _number(kind: type, low: float, strict: bool):
    word = f"{'an integer' if kind is int else 'a number'} {'>' if strict else '≥'} {low:g}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {word}, got {text!r}") from None
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"expected {word}, got {text!r}")
        return value

    parse.__name__ = word   # argparse names the type in its messages
    return parse


positive = _number(int, 1, False)        # ≥ 1
count = _number(int, 0, False)           # ≥ 0
fraction = _number(float, 0, False)      # ≥ 0.0
positive_float = _number(float, 0, True)   # > 0.0


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model, --device-map and the architecture templates."""
    from kedit_ray.models.arch import TEMPLATE_FLAGS

    names = ", ".join([DEFAULT_MODEL, *EMBEDDED_GGUF])
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"an embedded model ({names}), a local Hugging Face directory, a .gguf file or a hub id")
    p.add_argument("--device-map", default=None,
                   help="accelerate device map: 'auto', a JSON map, or the path of a JSON file holding one; \"disk\" "
                        "or \"cpu\" entries offload those modules (default: the whole model on one device)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="the weights' dtype; k*, v*, C and the solves stay float32/float64. auto (default): bfloat16 "
                        "on a GPU (float16 if it lacks bfloat16) or a CPU with native bfloat16 (avx512_bf16, "
                        "amx_bf16), else float32, decided where the model runs (ROME, first 100 CounterFact cases: "
                        "ES/PS/NS within 0.01 of float32 at 0.50x the s/edit)")
    p.add_argument("--max-memory", default=None,
                   help="accelerate's max_memory per device, JSON or a JSON file, e.g. '{\"0\": \"20GiB\", \"cpu\": "
                        "\"60GiB\"}' (default: none; given, it implies --device-map auto)")
    g = p.add_argument_group("architecture templates ({} = layer index); given, they override the registry and the "
                             "modules found from the model's structure")
    for field, flag in TEMPLATE_FLAGS.items():
        g.add_argument(flag, dest=f"tpl_{field}", default=None, metavar="TEMPLATE",
                       help=f"module name template of the {field.replace('_', ' ')} (default: from the registry, "
                            "else from the model's structure)")


def templates(args: argparse.Namespace) -> dict[str, str]:
    """The --*-template values given."""
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("tpl_") and v}


def model_kw(args: argparse.Namespace) -> dict:
    """What kedit_ray.models.load takes from the model options, besides the name."""
    return {"device_map": args.device_map, "dtype": args.dtype, "max_memory": args.max_memory,
            "templates": templates(args)}


def add_ray_args(p: argparse.ArgumentParser, what: str) -> None:
    """--workers, --cpus-per-worker, --gpus-per-worker, --address, --[no-]share-weights."""
    p.add_argument("--workers", type=positive, default=1,
                   help=f"model-holding {what} workers: Ray actors, or with 1 and no --address (nor $RAY_ADDRESS) "
                        "one worker in this process, without Ray")
    p.add_argument("--cpus-per-worker", type=positive_float, default=None,
                   help="CPUs (and torch threads) per worker (default: with a local Ray, this machine's cores "
                        "divided by --workers; on a cluster, 1)")
    p.add_argument("--gpus-per-worker", type=fraction, default=0, help="GPUs per worker; 0.5 puts two on one GPU")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join: 'auto' or host:port (default: $RAY_ADDRESS, else a local Ray on "
                        "127.0.0.1)")
    p.add_argument("--share-weights", action=argparse.BooleanOptionalAction, default=False,
                   help="the CPU Ray workers of a node map one read-only copy of weights that a load makes anew "
                        "(a --dtype other than the checkpoint's: 0.60x the PSS of 4 gemma-3-270m workers in "
                        "bfloat16), each keeping private copies only of the weights it edits; a load that maps the "
                        "checkpoint (float32 here) shares it already, through the page cache (default: off; the "
                        "check costs a load at pool start)")


def _ray_actions() -> list[argparse.Action]:
    """The argparse actions of `add_ray_args`, read off a parser of their own."""
    p = argparse.ArgumentParser(add_help=False)
    add_ray_args(p, "")
    return p._actions


def ray_flags() -> tuple[str, ...]:
    """Every flag `add_ray_args` adds."""
    return tuple(s for a in _ray_actions() for s in a.option_strings)


def ray_argv(args: argparse.Namespace) -> list[str]:
    """`args`' `add_ray_args` options as a command line again (the pool that `kedit suite` hands to each run)."""
    argv = []
    for a in _ray_actions():
        value = getattr(args, a.dest)
        if isinstance(a, argparse.BooleanOptionalAction):
            argv.append(a.option_strings[0 if value else 1])
        elif value is not None:
            argv += [a.option_strings[0], str(value)]
    return argv
