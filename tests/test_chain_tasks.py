"""Visual-program tasks on held-out ShapesWorld data: oracle modules (upper bound: the reference
programs are right), scoring that catches wrong programs and wrong image outputs, a slice with
the real models (shapes-clip + shapes-sam through fmrt.chain.modules) and generated programs."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fmrt.chain import tasks as T
from fmrt.chain.executor import Executor
from fmrt.chain.program import parse_program
from fmrt.data import program_data as D
from fmrt.pretrained import list_pretrained

EXAMPLES = D.task_set("test", 36)
ORACLE = T.oracle_modules(EXAMPLES)


def _by_kind(kind):
    return next(e for e in EXAMPLES if e.kind == kind)


def test_oracle_scores_every_reference_program_correct():
    scores = T.run_tasks(EXAMPLES, ORACLE)
    s = T.summarize(scores)
    assert s["accuracy"] == 1.0 and s["nlvr"] == 1.0, [x.detail for x in scores if not x.correct]
    assert set(D.KINDS) <= set(s) and s["tag_box_iou"] == 1.0 and s["segment_image_iou"] == 1.0
    truths = [e.answer for e in EXAMPLES if e.kind in D.NLVR_KINDS]
    assert 0.25 < np.mean(truths) < 0.75  # statements are not all true (or all false)


def test_wrong_programs_score_wrong():
    nl = _by_kind("compare")
    flipped = nl.program.replace(" > ", " <= ").replace(" < ", " >= ")
    assert T.run_tasks([nl], ORACLE, [flipped])[0].correct is False
    cnt = _by_kind("count")
    other = cnt.program.split("object='")[0] + "object='shape')\nN0=Count(object=OBJ0)\nRESULT=N0"
    wrong = T.run_tasks([cnt], ORACLE, [other])[0]
    assert wrong.correct == (cnt.answer == len(cnt.scenes["IMAGE"].objects))
    assert T.run_tasks([cnt], ORACLE, [None])[0].detail["error"] == "no valid program"
    assert T.run_tasks([cnt], ORACLE, ["RESULT=__x"])[0].correct is False


def test_image_outputs_are_checked_against_ground_truth():
    tag, seg = _by_kind("tag"), _by_kind("segment")
    # the right objects but blurred around instead of tagged: not a tag output
    untouched = tag.program.replace("IMAGE0=Tag(image=IMAGE, object=OBJ0)",
                                    "IMAGE0=BgBlur(image=IMAGE, object=OBJ0)")
    r = T.run_tasks([tag], ORACLE, [untouched])[0]
    assert not r.correct and "Tag" in r.detail["error"]
    # tagging every object instead of the asked ones
    every = "OBJ0=Seg(image=IMAGE)\nIMAGE0=Tag(image=IMAGE, object=OBJ0)\nRESULT=IMAGE0"
    r = T.run_tasks([tag], ORACLE, [every])[0]
    assert r.correct == (len(tag.answer) == len(tag.scenes["IMAGE"].objects))
    assert r.detail["drawn"] and r.detail["pred"] == len(tag.scenes["IMAGE"].objects)
    # colour-popping every object: the image has extra coloured pixels
    r = T.run_tasks([seg], ORACLE, [every.replace("Tag", "ColorPop")])[0]
    assert r.correct == (len(seg.answer) == len(seg.scenes["IMAGE"].objects))
    # a hand-made colour-pop image with nothing popped has image IoU 0 when objects exist
    ex = seg if seg.answer else next(e for e in EXAMPLES if e.kind == "segment" and e.answer)
    prog = parse_program(ex.program, ex.inputs)
    with Executor(ORACLE, trace_images=False) as exe:
        run = exe.run(prog, ex.images)
    gray = run.result.mean(axis=2, keepdims=True).repeat(3, axis=2).astype(np.uint8)
    run.result = gray
    bad = T.score(ex, prog, run)
    assert not bad.correct and bad.detail["image_iou"] == 0.0


def test_box_iou_and_matching():
    a = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
    b = np.array([[0, 0, 10, 5], [21, 20, 31, 30], [50, 50, 60, 60]], np.float32)
    iou = T.box_iou(a, b)
    assert iou.shape == (2, 3) and iou[0, 0] == pytest.approx(0.5)
    assert [(p, g) for p, g, _ in T.match(iou)] == [(1, 1), (0, 0)]
    assert T.match(iou, 0.9) == []


def test_evaluate_with_oracle_and_bundled_generator():
    if "shapes-programs" not in list_pretrained():
        pytest.skip("shapes-programs is not bundled")
    r = T.evaluate_program_tasks(45, modules="oracle")
    assert r["given"]["accuracy"] == 1.0
    assert r["generation"]["validity"] >= 0.95
    assert r["generated"]["accuracy"] >= 0.85, r
    json.dumps(r)  # a report is JSON


def test_cli_eval_programs_oracle(capsys):
    if "shapes-programs" not in list_pretrained():
        pytest.skip("shapes-programs is not bundled")
    from fmrt.cli import main

    assert main(["eval", "programs-oracle", "--n", "9"]) == 0
    out = capsys.readouterr().out
    assert "given.accuracy" in out and "generated.accuracy" in out


@pytest.mark.skipif(not {"shapes-clip", "shapes-sam"} <= set(list_pretrained()),
                    reason="bundled CLIP/SAM weights absent")
def test_real_models_slice():
    import torch

    from fmrt.chain.modules import local_modules

    torch.set_num_threads(1)
    exs = [e for e in EXAMPLES if e.kind in ("both", "count", "tag", "segment")][:4]
    mods = local_modules(clip="shapes-clip", sam="shapes-sam", vlm=None, backend="torch")
    scores = T.run_tasks(exs, mods)
    assert sum(s.correct for s in scores) >= 3, [(s.kind, s.detail) for s in scores]
