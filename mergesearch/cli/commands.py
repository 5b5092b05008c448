"""The commands: each parses nothing, calls the library, prints what happened and what to run next."""

from __future__ import annotations

import argparse

from ..errors import MergeSearchError


def cmd_merge(args: argparse.Namespace) -> int:
    from ..engine import merge
    from ..sources import resolve_model

    out = merge(
        args.recipe,
        args.out_dir,
        seed=args.seed,
        device=args.device,
        overwrite=args.overwrite,
        allow_pickle=args.allow_pickle,
        shard_size=args.shard_size,
        progress=not args.quiet,
        resolve=resolve_model,
    )
    if not args.quiet:
        print(f"wrote {out}")
        print(f"next: mergesearch eval {out} --tasks TASK[,TASK...]   # score the merged model")
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    log = (lambda s: None) if args.quiet else print
    if args.base in ("smollm2", "smollm2_lists"):
        from ..smollm2_zoo import LIST_SKILLS, SmolZooConfig, build_smollm2_zoo

        cfg = SmolZooConfig(skills=LIST_SKILLS) if args.base == "smollm2_lists" else None
        zoo = build_smollm2_zoo(
            args.out, cfg, device=args.device, progress=not args.quiet, log=log, rebuild=args.rebuild
        )
    else:
        if args.device is not None:
            raise MergeSearchError("--device applies to the SmolLM2 zoos; the demo zoo trains on the CPU")
        from ..zoo import build_zoo

        zoo = build_zoo(args.out, progress=not args.quiet, log=log, rebuild=args.rebuild)
    print(f"zoo at {zoo.root} (built in {zoo.seconds:.0f}s)")
    skills = list(next(iter(zoo.scores.values())))
    print("exact match on test splits:")
    w = max(10, *(len(x) + 2 for x in [*skills, *zoo.scores]))  # a column per skill, names in full
    print(f"  {'model':{w}s}" + "".join(f"{s:>{w}s}" for s in skills))
    for name, scores in zoo.scores.items():
        print(f"  {name:{w}s}" + "".join(f"{scores[s]:{w}.3f}" for s in skills))
    for name, check in zoo.checks.items():
        print(f"  [{'ok' if check['ok'] else 'FAIL'}] {name}: {check['detail']}")
    for name, path in zoo.models.items():
        print(f"  {name}: {path}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from ..evaluation import evaluate_model

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise MergeSearchError(
            f"--tasks {args.tasks!r} names no task; give task names or YAML paths, e.g. add,reverse"
        )
    rows = evaluate_model(
        args.model_dir,
        tasks,
        split=args.split,
        limit=args.limit,
        backend=args.backend,
        device=args.device,
        evals_dir=args.evals_dir,
    )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'task':20s} {'metric':12s} {'n':>5s} {'value':>8s}   95% CI (bootstrap)   seconds")
    for r in rows:
        print(
            f"{r['task']:20s} {r['metric']:12s} {r['n']:5d} {r['value']:8.4f}   "
            f"[{r['ci_low']:.4f}, {r['ci_high']:.4f}]   {r['seconds']:.2f}"
        )
    for r in rows:
        if r.get("unextracted"):
            print(
                f"note: {r['task']}: the answer extraction found nothing in {r['unextracted']} of {r['n']} "
                "outputs (scored wrong); check the task's extract: against the model's outputs"
            )
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from ..search import load_space, run_search, study_dir
    from ..sources import resolve_model

    space = load_space(args.space)
    name = args.study or space.name
    study = run_search(
        space,
        study=name,
        storage=args.storage,
        trials=args.trials,
        timeout=args.timeout,
        sampler=args.sampler,
        seed=args.seed,
        device=args.device,
        progress=not args.quiet,
        cache_ranks=args.cache_ranks,
        placement=args.placement,
        set_budget=args.set_budget,
        gradient_seconds=args.gradient,
        patience=args.patience,
        resolve=resolve_model,
        log=_log(args),
    )
    _print_study(study, name, args.storage, space)
    if args.storage is None:
        print(f"storage: {study_dir(name) / 'study.db'}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from ..search import load_study_space, run_search
    from ..sources import resolve_model

    space = load_study_space(args.study, args.storage)
    study = run_search(
        space,
        study=args.study,
        storage=args.storage,
        trials=args.trials,
        timeout=args.timeout,
        device=args.device,
        progress=not args.quiet,
        cache_ranks=args.cache_ranks,
        placement=args.placement,
        worker=True,
        resolve=resolve_model,
        log=_log(args),
    )
    _print_study(study, args.study, args.storage, space)
    return 0


def _storage_flag(storage: str | None) -> str:
    return f" --storage {storage}" if storage else ""


def _log(args: argparse.Namespace):
    """Progress lines for long phases, unless --quiet."""
    return (lambda m: None) if args.quiet else (lambda m: print(m, flush=True))


def _print_study(study, name: str, storage: str | None, space=None) -> None:
    """What the search did, whether it converged, and what to run next."""
    import optuna

    from ..search.convergence import convergence
    from ..search.trials import StudyAttr, records

    trials = records(study)
    states = [t.state for t in trials]
    n = {
        s.name.lower(): states.count(s)
        for s in (
            optuna.trial.TrialState.COMPLETE,
            optuna.trial.TrialState.PRUNED,
            optuna.trial.TrialState.FAIL,
        )
    }
    print(
        f"study {name}: {len(states)} trials ({n['complete']} complete, {n['pruned']} stopped early, "
        f"{n['fail']} failed)"
    )
    budget = study.user_attrs.get(StudyAttr.BUDGET)
    finished = sum(s.is_finished() for s in states)
    rule = study.user_attrs.get(
        StudyAttr.PATIENCE, {"trials": 0, "rule": ""}
    )  # the run's (run.patience_rule)
    weights = dict(space.task_weights) if space is not None and space.objective == "mean" else None
    conv = convergence(trials, rule["trials"], weights, rule["rule"])
    if conv.converged:
        print(conv.line())
    elif budget and finished < budget:
        print(
            f"stopped before the budget ({finished} of {budget} trials finished): run the same command to go on"
        )
    from ..report import front

    best = max(front(study), key=lambda t: t.mean, default=None)  # as the report picks it
    if best is None and finished:
        from ..report.tables import no_best

        print(no_best(study))
    if best is not None:
        scores = ", ".join(f"{k} {v:.3f}" for k, v in best.scores.items())
        tag = f" ({best.baseline})" if best.baseline else ""
        print(f"best trial {best.number}{tag}: search mean {best.mean:.3f} ({scores})")
        st = _storage_flag(storage)
        print(f"next: mergesearch report {name}{st}        # test-split scores, gains with intervals, plots")
        print(f"      mergesearch export {name}{st} -o best.yaml   # the best recipe as mergekit YAML")
        print(f"      mergesearch dashboard {name}{st}     # optuna-dashboard on 127.0.0.1:8080")


def cmd_report(args: argparse.Namespace) -> int:
    from ..report import report
    from ..search import study_dir
    from ..sources import resolve_model

    summary = report(args.study, args.storage, device=args.device, resolve=resolve_model, log=_log(args))
    out = study_dir(args.study)
    if "gain" in summary:
        g = summary["gain"]
        print(
            f"best trial {summary['best_trial']}: test mean {g['best_test_mean']:.3f} vs "
            f"{g['over']} {g['baseline_test_mean']:.3f}: gain {g['gain']:+.3f} "
            f"(paired 95% CI [{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}])"
        )
        if summary.get("best_is_baseline") or g["ci95"][1] < 0:
            print("no learned recipe beat the known recipes; report.md says what to try")
    print(f"report: {out / 'report.md'}")
    print(
        f"next: mergesearch export {args.study}{_storage_flag(args.storage)} -o best.yaml   # the best recipe as mergekit YAML"
    )
    return 0


def cmd_rounds(args: argparse.Namespace) -> int:
    from ..search import load_space
    from ..search.rounds import run_rounds
    from ..sources import resolve_model

    space = load_space(args.space)
    names = run_rounds(
        space,
        rounds=args.rounds,
        elites=args.elites,
        trials=args.trials,
        timeout=args.timeout,
        study=args.study,
        device=args.device,
        placement=args.placement,
        cache_ranks=args.cache_ranks,
        progress=not args.quiet,
        resolve=resolve_model,
        log=_log(args),
    )
    print(f"rounds: {', '.join(names)}")
    print(f"next: mergesearch report {names[-1]}")
    print(f"      mergesearch export {names[-1]} --chain CHAIN   # the YAML files mergekit builds in order")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..report import export
    from ..report.export import export_chain

    if args.chain:
        files = export_chain(args.study, args.chain, args.storage, trial=args.trial)
        print(f"wrote {len(files)} recipes and build.sh into {args.chain}")
        print(f"next: bash {args.chain}/build.sh   # mergekit-yaml on each, in order")
        return 0
    path = export(args.study, args.storage, trial=args.trial, out=args.output, references=args.references)
    print(f"wrote {path}")
    if args.references == "space":  # zoo references: mergekit-yaml needs folders
        print(
            f"next: mergesearch merge {path} MERGED --seed 0   # resolves zoo references (mergekit-yaml needs folders)"
        )
    else:
        print(
            f"next: mergesearch merge {path} MERGED --seed 0   # or: mergekit-yaml {path} MERGED --random-seed 0"
        )
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from ..report.dashboard import serve

    serve(args.study, args.storage, port=args.port)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(trials=args.trials, study=args.study, progress=not args.quiet)
    return 0
