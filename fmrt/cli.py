"""``fmrt`` command line: train, eval, export, serve, bench, models.

Each subcommand imports its heavy dependencies lazily so ``fmrt --help`` stays fast.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def _cmd_train(a: argparse.Namespace) -> int:
    if a.family == "sam":
        return _cmd_train_sam(a)
    if a.family == "llava":
        return _cmd_train_llava(a)
    if a.family == "flamingo":
        return _cmd_train_flamingo(a)
    if a.family == "programs":
        return _cmd_train_programs(a)
    from fmrt.train.contrastive import TrainConfig, train

    defaults = TrainConfig(family=a.family)
    cfg = TrainConfig(
        family=a.family, arch=a.arch, out_dir=a.out or f"runs/shapes-{a.family}",
        init_from=a.init, steps=a.steps or defaults.steps,
        batch_size=a.batch_size or defaults.batch_size, lr=a.lr or defaults.lr,
        warmup=a.warmup if a.warmup is not None else defaults.warmup, seed=a.seed,
        hard_negatives=a.hard_negatives if a.hard_negatives is not None else defaults.hard_negatives,
        threads=a.threads, resume=not a.no_resume, ckpt_every=a.ckpt_every,
        single_prob=a.single_prob if a.single_prob is not None else defaults.single_prob,
        mirror_prob=a.mirror_prob if a.mirror_prob is not None else defaults.mirror_prob,
        structure_weight=a.structure_weight or 0.0,
        text_structure_weight=a.text_structure_weight or 0.0, structure_tied=a.structure_tied,
        relation_curriculum_steps=a.relation_curriculum_steps or 0,
        curriculum_relation_prob=(a.curriculum_relation_prob if a.curriculum_relation_prob
                                  is not None else defaults.curriculum_relation_prob),
        hard_negative_weight=(a.hard_negative_weight if a.hard_negative_weight is not None
                              else defaults.hard_negative_weight),
        clause_sum_weight=a.clause_sum_weight or 0.0,
        swap_twin_prob=a.swap_twin_prob or 0.0)
    out = train(cfg)
    print(json.dumps({"model_dir": out}))
    return 0


#: llava trainer options passed through from the command line when set (same names).
_LLAVA_OPTIONS = ("loss_weighting", "image_feature_norm", "projector_lr_scale",
                  "qa_first_steps", "turns", "tune_vision", "vision_lr_scale",
                  "image_pos_embed", "dense_aux_weight", "image_pos_init", "image_pos_norm",
                  "coord_tokens", "image_norm_init", "coord_sigma", "vision_from",
                  "vision_select", "independent_turns", "untie_embeddings")


def _cmd_train_llava(a: argparse.Namespace) -> int:
    from fmrt.train.llava import LlavaTrainConfig, train

    cfg = LlavaTrainConfig(
        stage=a.stage, arch=a.arch or "shapes-llava-tiny", init_from=a.init,
        out_dir=a.out or f"runs/shapes-llava-s{a.stage}", steps=a.steps or 0,
        batch_size=a.batch_size or 32, lr=a.lr or 0.0,
        warmup=a.warmup if a.warmup is not None else 30, seed=a.seed, threads=a.threads,
        resume=not a.no_resume, ckpt_every=a.ckpt_every,
        **({"lm_steps": a.lm_steps} if a.lm_steps is not None else {}),
        **({"mix": json.loads(a.mix)} if a.mix else {}),
        # options left unset (None / False / 0) keep LlavaTrainConfig's defaults
        **{k: getattr(a, k) for k in _LLAVA_OPTIONS if getattr(a, k)})
    out = train(cfg)
    print(json.dumps({"model_dir": out}))
    return 0


def _cmd_train_flamingo(a: argparse.Namespace) -> int:
    from fmrt.train.flamingo import FlamingoTrainConfig, train

    d = FlamingoTrainConfig()
    cfg = FlamingoTrainConfig(
        out_dir=a.out or d.out_dir, lm_from=a.lm_from, lm_steps=a.lm_steps or d.lm_steps,
        steps=a.steps or d.steps, batch_size=a.batch_size or d.batch_size, lr=a.lr or d.lr,
        warmup=a.warmup if a.warmup is not None else d.warmup, seed=a.seed, threads=a.threads,
        resume=not a.no_resume, ckpt_every=a.ckpt_every, eval_n=a.eval_n or d.eval_n)
    out = train(cfg)
    print(json.dumps({"model_dir": out}))
    return 0


def _cmd_train_programs(a: argparse.Namespace) -> int:
    from fmrt.train.programs import ProgramTrainConfig, train

    d = ProgramTrainConfig()
    cfg = ProgramTrainConfig(
        out_dir=a.out or d.out_dir, steps=a.steps or d.steps,
        batch_size=a.batch_size or d.batch_size, lr=a.lr or d.lr,
        warmup=a.warmup if a.warmup is not None else d.warmup, seed=a.seed, threads=a.threads,
        resume=not a.no_resume, ckpt_every=a.ckpt_every, eval_n=a.eval_n or d.eval_n)
    out = train(cfg)
    print(json.dumps({"model_dir": out}))
    return 0


def _cmd_train_sam(a: argparse.Namespace) -> int:
    from fmrt.train.sam import SamTrainConfig, train

    d = SamTrainConfig()
    cfg = SamTrainConfig(
        arch=a.arch or d.arch, out_dir=a.out or "runs/shapes-sam", steps=a.steps or d.steps,
        batch_size=a.batch_size or d.batch_size, lr=a.lr or d.lr,
        warmup=a.warmup if a.warmup is not None else d.warmup, seed=a.seed, threads=a.threads,
        resume=not a.no_resume, ckpt_every=a.ckpt_every,
        max_prompts_per_image=a.max_prompts_per_image or d.max_prompts_per_image,
        correction_iters=(a.correction_iters if a.correction_iters is not None
                          else d.correction_iters))
    out = train(cfg, eval_n=a.eval_n)
    print(json.dumps({"model_dir": out}))
    return 0


def _eval_one(m: str, a: argparse.Namespace):
    from fmrt.pretrained import read_config

    if m in ("programs", "programs-oracle"):  # visual-program tasks: real or oracle modules
        from fmrt.chain.tasks import evaluate_program_tasks

        return evaluate_program_tasks(a.n, seed=a.seed, backend=a.backend,
                                      modules="oracle" if m == "programs-oracle" else "local")
    if read_config(m).get("family") == "sam":  # SAM: mask IoU on test scenes (torch)
        from fmrt.train.sam import evaluate_sam_model

        return evaluate_sam_model(m, n=a.n, seed=a.seed)
    if read_config(m).get("family") == "llava":  # LLaVA: QA / pointing on test scenes
        from fmrt.train.llava import evaluate_llava

        return {"model": m, **evaluate_llava(m, n_images=a.n, seed=a.seed)}
    if read_config(m).get("family") == "flamingo":  # Flamingo: 0/2/4-shot test episodes
        from fmrt.train.flamingo import evaluate_flamingo_model

        return evaluate_flamingo_model(m, n=a.n, seed=a.seed)
    from fmrt.train.evaluate import evaluate

    return evaluate(m, backend=a.backend, n=a.n, seed=a.seed)


def _cmd_eval(a: argparse.Namespace) -> int:
    from fmrt.train.evaluate import format_report

    reports = [_eval_one(m, a) for m in a.models]
    print(format_report(reports))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(reports, f, indent=2)
    return 0


def _cmd_export(a: argparse.Namespace) -> int:
    from export.onnx_export import export_clip

    paths = export_clip(a.model, a.out)
    if a.int8:
        from export.quantize import quantize_dir

        paths.update(quantize_dir(a.out))
    if a.tensorrt:
        # Builds (or reuses) engines for both towers in the engine cache; needs a CUDA GPU.
        import fmrt

        fmrt.load(a.model, backend="tensorrt", precision="fp32" if a.fp32 else "fp16",
                  onnx_dir=a.out)
        paths["tensorrt"] = "engines built into the engine cache"
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    return 0


def resolve_model_list(spec: str) -> List[str]:
    """``--models`` entries: bundled names, model directories, or a family / short name
    (``clip`` -> every bundled CLIP-family model, ``negclip`` -> ``shapes-negclip``); a family
    wins over a short name."""
    import os

    from fmrt import pretrained

    out: List[str] = []
    for tok in (t.strip() for t in spec.split(",")):
        if not tok:
            continue
        fam = [n for n in pretrained.list_pretrained()
               if pretrained.read_config(n).get("family") == tok]
        if pretrained.is_pretrained(tok) or os.path.isdir(tok):
            out.append(tok)
        elif fam:
            out.extend(fam)
        elif pretrained.is_pretrained(f"shapes-{tok}"):
            out.append(f"shapes-{tok}")
        else:
            raise ValueError(f"--models: {tok!r} is not a bundled model, a model directory "
                             f"or a family; bundled: {pretrained.list_pretrained()}")
    return list(dict.fromkeys(out))


def _cmd_serve(a: argparse.Namespace) -> int:
    from fmrt.serve.launcher import serve_main

    models = resolve_model_list(a.models) if a.models else None
    serve_main(host=a.host, port=a.port, models=models, backend=a.backend, blocking=True)
    return 0


def _cmd_bench(a: argparse.Namespace) -> int:
    from fmrt.bench import compare_backends, format_table

    rows = compare_backends(a.model, backends=a.backends.split(","),
                            batches=[int(b) for b in a.batches.split(",")], repeats=a.repeats)
    print(format_table(rows))
    return 0


def _cmd_bundle(a: argparse.Namespace) -> int:
    from fmrt.pretrained import bundle

    print(json.dumps({"bundled": bundle(a.model_dir, a.name)}))
    return 0


def _cmd_models(a: argparse.Namespace) -> int:
    import fmrt
    from fmrt.pretrained import list_pretrained

    print("architectures:", ", ".join(fmrt.list_models()))
    print("bundled weights:", ", ".join(list_pretrained()) or "(none)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fmrt", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train a model on ShapesWorld")
    t.add_argument("family", choices=["clip", "negclip", "coca", "sam", "llava", "flamingo",
                                      "programs"])
    t.add_argument("--stage", type=int, default=1, choices=[1, 2],
                   help="llava: 1 = projector on captions, 2 = projector + LM (with --init)")
    t.add_argument("--out", help="run directory (checkpoints + final model/)")
    t.add_argument("--arch", help="registered architecture (default per family)")
    t.add_argument("--init", help="start from a model dir or bundled name (negclip)")
    t.add_argument("--steps", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--warmup", type=int)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--hard-negatives", type=int, help="hard negatives per caption")
    t.add_argument("--hard-negative-weight", type=float,
                   help="weight of the per-image hard-negative ranking term")
    t.add_argument("--single-prob", type=float, help="share of one-object scenes")
    t.add_argument("--mirror-prob", type=float,
                   help="clip/negclip: share of left/right relation captions given a mirrored twin image")
    t.add_argument("--relation-curriculum-steps", type=int,
                   help="clip/negclip: first steps with left/above-only relation captions and "
                        "no relation-word negatives")
    t.add_argument("--curriculum-relation-prob", type=float,
                   help="clip/negclip: share of relation captions during that curriculum")
    t.add_argument("--structure-weight", type=float,
                   help="clip/negclip: auxiliary scene-structure loss on image embeddings")
    t.add_argument("--text-structure-weight", type=float,
                   help="clip/negclip: auxiliary caption-structure loss on text embeddings")
    t.add_argument("--clause-sum-weight", type=float,
                   help="clip/negclip: conjunction / relation caption embeddings must pick the "
                        "sum of their clauses' (phrases') embeddings (binding; off by default)")
    t.add_argument("--swap-twin-prob", type=float,
                   help="clip/negclip: share of conjunction/relation captions given a "
                        "colour-swapped twin image (image-side binding negatives)")
    t.add_argument("--structure-tied", action="store_true",
                   help="clip/negclip: one fixed orthonormal readout for both structure losses")
    t.add_argument("--threads", type=int)
    t.add_argument("--lm-steps", type=int, help="flamingo / llava stage 1: steps of the text-only LM stage")
    t.add_argument("--lm-from", help="flamingo: reuse a stage-1 LM model dir")
    t.add_argument("--loss-weighting", choices=["token", "sqrt", "answer"],
                   help="llava: loss mean over tokens, answers, or answers weighted by "
                        "sqrt(length)")
    t.add_argument("--image-feature-norm", choices=["none", "rms"],
                   help="llava stage 1: RMSNorm on the projected image features")
    t.add_argument("--projector-lr-scale", type=float, help="llava: projector lr multiplier")
    t.add_argument("--mix", help='llava stage 2: task weights as JSON, e.g. \'{"count": 0.2, ...}\'')
    t.add_argument("--turns", type=int, help="llava: question-answer turns per image")
    t.add_argument("--tune-vision", action="store_true",
                   help="llava stage 2: train the vision tower too (Molmo-style)")
    t.add_argument("--vision-lr-scale", type=float,
                   help="llava: vision tower lr multiplier with --tune-vision")
    t.add_argument("--dense-aux-weight", type=float,
                   help="llava stage 2: per-patch (shape, colour) auxiliary loss weight")
    t.add_argument("--image-pos-init", choices=["default", "grid2d"],
                   help="llava: initialise the learned image position embedding")
    t.add_argument("--image-pos-norm", type=float,
                   help="llava: norm of the grid2d position code per patch")
    t.add_argument("--coord-tokens", type=int,
                   help="llava: write point coordinates as N single tokens <loc0>..<locN-1> "
                        "(64 = every pixel of the 64 px frame)")
    t.add_argument("--image-norm-init", type=float,
                   help="llava stage 1 with --image-feature-norm rms: initial RMSNorm gain")
    t.add_argument("--coord-sigma", type=float,
                   help="llava: Gaussian target (std in pixels) over the coordinate tokens")
    t.add_argument("--vision-from",
                   help="llava stage 1: CLIP-family model (bundled name or directory) whose "
                        "image tower is reused (default shapes-clip)")
    t.add_argument("--untie-embeddings", action="store_true",
                   help="llava stage 1: an output head of its own (not tied to the embeddings)")
    t.add_argument("--independent-turns", action="store_true",
                   help="llava stage 2: each turn sees the image and its own question only")
    t.add_argument("--vision-select", choices=["default", "full"],
                   help="llava stage 1: image tokens = patch tokens (default, HF LLaVA) or "
                        "the class token too (full)")
    t.add_argument("--image-pos-embed", choices=["none", "learned"],
                   help="llava stage 1: learned position embedding on projected image features")
    t.add_argument("--qa-first-steps", type=int,
                   help="llava stage 2: first steps on short questions only (curriculum)")
    t.add_argument("--ckpt-every", type=int, default=250)
    t.add_argument("--no-resume", action="store_true")
    t.add_argument("--max-prompts-per-image", type=int, help="sam: objects prompted per image")
    t.add_argument("--correction-iters", type=int, help="sam: corrective-click rounds per step")
    t.add_argument("--eval-n", type=int, default=0,
                   help="sam: evaluate on this many test scenes at the end (provenance)")
    t.set_defaults(fn=_cmd_train)

    e = sub.add_parser("eval", help="evaluate models on the ShapesWorld test split")
    e.add_argument("models", nargs="+", help="bundled names or model directories")
    e.add_argument("--backend", default="torch")
    e.add_argument("--n", type=int, default=1000, help="examples per task")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", help="also write the reports to this file")
    e.set_defaults(fn=_cmd_eval)

    x = sub.add_parser("export", help="export a model to ONNX (and int8 / TensorRT)")
    x.add_argument("model")
    x.add_argument("--out", required=True)
    x.add_argument("--int8", action="store_true", help="also write dynamic-int8 graphs")
    x.add_argument("--tensorrt", action="store_true", help="also build TensorRT engines")
    x.add_argument("--fp32", action="store_true", help="TensorRT without fp16")
    x.set_defaults(fn=_cmd_export)

    s = sub.add_parser("serve", help="serve the bundled models over HTTP with Ray Serve")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--models", help="comma-separated model names (default: all bundled)")
    s.add_argument("--backend", default="onnxruntime")
    s.set_defaults(fn=_cmd_serve)

    b = sub.add_parser("bench", help="compare encoder throughput across backends")
    b.add_argument("model", nargs="?", default="shapes-clip")
    b.add_argument("--backends", default="torch,onnxruntime,onnxruntime-int8")
    b.add_argument("--batches", default="1,8,32")
    b.add_argument("--repeats", type=int, default=20)
    b.set_defaults(fn=_cmd_bench)

    u = sub.add_parser("bundle", help="ship a trained model dir inside the package (fp16)")
    u.add_argument("model_dir")
    u.add_argument("name", help="bundled name, e.g. shapes-clip")
    u.set_defaults(fn=_cmd_bundle)

    m = sub.add_parser("models", help="list architectures and bundled weights")
    m.set_defaults(fn=_cmd_models)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError) as err:
        print(f"fmrt {args.cmd}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
