"""Visual-program language (parser, typed validation), safe Eval expressions, and the
dependency-graph executor with local fake modules."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from fmrt.chain import executor as E
from fmrt.chain.expr import ExprError, parse_expr
from fmrt.chain.program import (MAX_LINE_CHARS, MAX_PROGRAM_CHARS, MODULES, Arg, ModuleRegistry,
                                ModuleSpec, ObjectList, ProgramError, VType, parse_program)

TWO = {"LEFT": "Image", "RIGHT": "Image"}
NLVR = """ANSWER0=Vqa(image=LEFT, question='How many people are in the image?')
ANSWER1=Vqa(image=RIGHT, question='How many people are in the image?')
ANSWER2=Vqa(image=LEFT, question='How many boats are in the image?')
ANSWER3=Vqa(image=RIGHT, question='How many boats are in the image?')
ANSWER4=Eval('{ANSWER0} + {ANSWER1} == 6 and {ANSWER2} + {ANSWER3} == 2')
RESULT=ANSWER4
"""


def img(h=32, w=48, v=0):
    a = np.full((h, w, 3), 240, np.uint8)
    a[4:12, 6:14] = (200, 20, 20)
    a[0, 0] = v
    return a


def objs(boxes, labels=None, size=(32, 48)):
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    return ObjectList(boxes, np.ones(len(boxes)), labels or ["obj"] * len(boxes),
                      image_size=size)


# ------------------------------------------------------------------------------- expressions
@pytest.mark.parametrize("src,env,want", [
    ("1 + 2 * 3", {}, 7), ("7 // 2 + 7 % 2", {}, 4), ("2 ** 10", {}, 1024), ("-3 + +2", {}, -1),
    ("1 < 2 <= 2 != 3", {}, True), ("A + B == 6", {"A": "two", "B": "4"}, True),
    ("{A} + {B}", {"A": 1.5, "B": 2}, 3.5), ("not A", {"A": "no"}, True),
    ("A and B or C", {"A": True, "B": False, "C": "yes"}, True),
    ("'x' if N > 2 else 'y'", {"N": 3}, "x"), ("'red' in A", {"A": "A Red circle"}, True),
    ("A == 'yes'", {"A": True}, True), ("A * 2", {"A": "ab"}, "abab"), ("A / 4", {"A": 2}, 0.5),
])
def test_expr_evaluates(src, env, want):
    assert parse_expr(src).eval(env) == want


@pytest.mark.parametrize("src,reason", [
    ("__import__('os')", "function calls"), ("().__class__", "attribute access"),
    ("a.b", "attribute access"), ("f(x)", "function calls"), ("x[0]", "subscripts"),
    ("lambda: 1", "lambdas"), ("[i for i in x]", "comprehensions"),
    ("{i for i in x}", "comprehensions"), ("f'{x}'", "f-strings"), ("(x := 1)", "assignment"),
    ("[1, 2]", "lists"), ("(1, 2)", "tuples"), ("__builtins__", "underscore"),
    ("_x + 1", "underscore"), ("10**100000", "exponent"), ("2 ** 65", "exponent"),
    ("1e400", "out of range"), ("10000000000000000000000", "digits"),
    ("(" * 5000 + "1" + ")" * 5000, "characters"), ("(" * 40 + "1" + ")" * 40, "nests"),
    ("+".join(["1"] * 10000), "characters"), ("+".join(["1"] * 300), "syntax nodes|nests"),
    ("-" * 100 + "1", "nests"), ("'" + "a" * 100_000 + "'", "characters"), ("", "empty"),
    ("1 +", "syntax"), ("x is None", "comparison"), ("~1", "operator"), ("1 & 2", "operator"),
])
def test_expr_rejected_statically(src, reason):
    t = time.perf_counter()
    with pytest.raises(ExprError, match=reason):
        parse_expr(src)
    assert time.perf_counter() - t < 0.5


@pytest.mark.parametrize("src,env,reason", [
    ("9**9**9", {}, "exponent"), ("2 ** (2 ** 10)", {}, "exponent"),
    ("A ** 30", {"A": 10}, "exceeds"), ("1 / 0", {}, "division by zero"),
    ("A % 0", {"A": 1}, "zero"),
    ("'a' * 999999999", {}, "repetition"), ("A * A * A", {"A": 10 ** 9}, "exceeds"),
    ("A + 1", {"A": "red"}, "needs numbers"), ("not A", {"A": "maybe"}, "truth value"),
    ("A < 'x'", {"A": 2}, "cannot order"), ("(-8) ** 0.5", {}, "fractional"),
])
def test_expr_runtime_bounds(src, env, reason):
    t = time.perf_counter()
    with pytest.raises(ExprError, match=reason):
        parse_expr(src).eval(env)
    assert time.perf_counter() - t < 0.5


def test_expr_names_and_unknown_variables():
    e = parse_expr("{B} + A * B > 2")
    assert e.names == ("B", "A")
    with pytest.raises(ExprError, match="unknown name 'len'"):
        parse_expr("len > 1", variables={"A"})


# ------------------------------------------------------------------------------- parsing
def test_parse_nlvr_program():
    p = parse_program(NLVR, TWO)
    assert [s.target for s in p.steps] == ["ANSWER0", "ANSWER1", "ANSWER2", "ANSWER3", "ANSWER4"]
    assert p.result == "ANSWER4" and p.result_type is VType.BOOL
    assert p.by_target["ANSWER4"].deps == ("ANSWER0", "ANSWER1", "ANSWER2", "ANSWER3")
    assert p.steps[0].args == {"image": p.steps[0].args["image"],
                               "question": "How many people are in the image?"}
    d = p.to_dict()
    assert d["steps"][4]["args"]["expr"]["expr"].startswith("{ANSWER0}")


def test_parse_defaults_comments_positional_forward_refs_and_literal_result():
    src = """# tag the red shapes
    IMAGE0=Tag(IMAGE, OBJ1)
    OBJ0=Loc(image=IMAGE, object="shape")

    OBJ1=Select(image=IMAGE, object=OBJ0, query='red')
    N=Count(object=OBJ1)
    RESULT=IMAGE0"""
    p = parse_program(src)
    assert p.result_type is VType.IMAGE
    assert p.by_target["OBJ1"].args["category"] is None  # default
    assert p.order.index("OBJ0") < p.order.index("OBJ1") < p.order.index("IMAGE0")
    p2 = parse_program("N=Count(object=O)\nRESULT=3", {"O": "ObjectList"})
    assert p2.result == "RESULT" and p2.steps[-1].module == "Result"
    p3 = parse_program("RESULT=Count(object=O)", {"O": "ObjectList"})
    assert p3.result_type is VType.NUMBER
    # List's TextList output feeds Classify; a 'a,b' string literal is also a TextList
    p4 = parse_program("L=List(query='shapes', max=3)\nO=Seg(image=IMAGE)\n"
                       "C=Classify(image=IMAGE, object=O, categories=L)\n"
                       "D=Classify(image=IMAGE, object=O, categories='circle,star')\nRESULT=D")
    assert p4.result_type is VType.OBJECTS


@pytest.mark.parametrize("src,line,reason", [
    ("X=Foo(a=1)\nRESULT=X", 1, "unknown module 'Foo'"),
    ("X=Vqa(image=IMAGE, questoin='q')\nRESULT=X", 1, "has no argument 'questoin'"),
    ("X=Vqa(image=IMAGE)\nRESULT=X", 1, "missing required argument 'question'"),
    ("X=Vqa(image=IMAGE, question='a', question='b')\nRESULT=X", 1, "given twice"),
    ("X=Vqa(IMAGE, 'q', image=IMAGE)\nRESULT=X", 1, "given twice"),
    ("X=Count(O, O)\nRESULT=X", 1, "at most 1 positional"),
    ("X=Count(object=IMAGE)\nRESULT=X", 1, "expects ObjectList, but 'IMAGE' is an Image"),
    ("X=Vqa(image=IMAGE, question=3)\nRESULT=X", 1, "expects Text, got a Number literal 3"),
    ("O=Seg(image=IMAGE)\nX=Vqa(image=O, question='q')\nRESULT=X", 2, "expects Image"),
    ("X=Loc(image=IMAGE, object='a')\nY=Eval('X + 1')\nRESULT=Y", 2, "reads 'X', a ObjectList"),
    ("X=Count(object=OBJ)\nRESULT=X", 1, "undefined variable 'OBJ'"),
    ("X=Seg(image=IMAGE)\nX=Seg(image=IMAGE)\nRESULT=X", 2, "already defined (line 1)"),
    ("IMAGE=Seg(image=IMAGE)\nRESULT=IMAGE", 1, "already defined (an input)"),
    ("A=Count(object=B)\nB=Seg(image=A)\nRESULT=A", 1, "cycle: A (line 1) -> B (line 2)"),
    ("A=Eval('B + 1')\nB=Eval('C * 2')\nC=Eval('A')\nRESULT=A", 1,
     "cycle: A (line 1) -> B (line 2) -> C (line 3) -> A (line 1)"),
    ("A=Eval('A + 1')\nRESULT=A", 1, "reads its own output"),
    ("A=Eval('__import__(\"os\").system(\"ls\")')\nRESULT=A", 1, "function calls"),
    ("A=Eval('9**9**9')\nRESULT=A", 0, None),  # valid syntax; bounded at run time
    ("A=Eval(expr=X)\nRESULT=A", 1, "must be an expression string"),
    ("X=Count(object=IMAGE.shape)\nRESULT=X", 1, "attribute access is not a value"),
    ("X=Count(object=Seg(image=IMAGE))\nRESULT=X", 1, "nested module call"),
    ("X=Vqa(image=IMAGE, question='a' + 'b')\nRESULT=X", 1, "use Eval"),
    ("X=Vqa(image=IMAGE, **kw)\nRESULT=X", 1, "**arguments"),
    ("__x=Seg(image=IMAGE)\nRESULT=__x", 1, "underscore"),
    ("X=Seg(image=IMAGE)", 0, "no final RESULT"),
    ("X=Seg(image=IMAGE)\nRESULT=X\nY=Seg(image=IMAGE)", 3, "steps after RESULT"),
    ("RESULT=Y", 1, "RESULT names undefined variable 'Y'"),
    ("X = print('hi')\nRESULT=X", 1, "unknown module 'print'"),
    ("import os\nRESULT=1", 1, "expected NAME=Module"),
    ("X=Seg(image=IMAGE\nRESULT=X", 1, "syntax error"),
    ("X=Vqa(image=IMAGE, question=None)\nRESULT=X", 1, "expects Text, got None"),
    ("Count=Seg(image=IMAGE)\nRESULT=Count", 1, "is a module name"),
    ("X=Vqa(image=IMAGE, question='" + "a" * 800 + "')\nRESULT=X", 1, "string literal"),
    ("X=Seg(image=IMAGE)\n" + "# " + "x" * (MAX_LINE_CHARS + 10) + "\nRESULT=X", 0, None),
    ("X=Seg(image=IMAGE) " + " " * MAX_LINE_CHARS + "\nRESULT=X", 1, "characters; the limit"),
    ("X=Count(object=" + "(" * 400 + "IMAGE" + ")" * 400 + ")\nRESULT=X", 1, "nested"),
    ("X=Count(object=" + "-" * 900 + "1)\nRESULT=X", 1, "not a value"),
    ("X=Eval('" + "(" * 100 + "1" + ")" * 100 + "')\nRESULT=X", 1, "nests brackets"),
    ("X=Eval(\"().__class__.__bases__[0].__subclasses__()\")\nRESULT=X", 1, "not allowed"),
])
def test_validation_errors(src, line, reason):
    if reason is None:
        parse_program(src)
        return
    with pytest.raises(ProgramError) as ei:
        parse_program(src)
    assert ei.value.line == line, str(ei.value)
    assert reason in ei.value.reason, str(ei.value)
    assert str(ei.value).startswith(f"line {line}: ") if line else reason in str(ei.value)


def test_limits_steps_and_size():
    src = "\n".join(f"S{i}=Seg(image=IMAGE)" for i in range(65)) + "\nRESULT=S0"
    with pytest.raises(ProgramError) as ei:
        parse_program(src)
    assert ei.value.line == 65 and "more than 64 steps" in ei.value.reason
    assert parse_program(src, max_steps=100).result == "S0"
    with pytest.raises(ProgramError, match="characters; the limit is"):
        parse_program("X=Seg(image=IMAGE)\n" * (MAX_PROGRAM_CHARS // 10) + "RESULT=X")
    with pytest.raises(ProgramError, match="unknown type"):
        parse_program("RESULT=1", {"X": "Video"})
    with pytest.raises(ProgramError, match="invalid input name"):
        parse_program("RESULT=1", {"__x": "Image"})


def test_custom_registry():
    reg = ModuleRegistry(list(MODULES._specs.values()))
    reg.register(ModuleSpec("Double", (Arg("x", VType.NUMBER),), VType.NUMBER))
    p = parse_program("A=Double(x=2)\nB=Double(x=A)\nRESULT=B", {}, modules=reg)
    assert p.result_type is VType.NUMBER
    with pytest.raises(ProgramError, match="unknown module 'Double'"):
        parse_program("A=Double(x=2)\nRESULT=A", {})


# ------------------------------------------------------------------------------- executor
def _vqa_fake(delay=0.15, answers=None, calls=None):
    answers = answers or {"people": "three", "boats": "1"}

    def vqa(ctx, image, question):
        if calls is not None:
            calls.append((ctx.step, threading.get_ident()))
        time.sleep(delay)
        return next(v for k, v in answers.items() if k in question)
    return vqa


def test_nlvr_runs_concurrently_with_trace():
    mods = E.builtin_modules()
    mods["Vqa"] = _vqa_fake(0.2)
    p = parse_program(NLVR, TWO)
    with E.Executor(mods, max_concurrency=8) as ex:
        r = ex.run(p, {"LEFT": img(), "RIGHT": img(v=1)})
    assert r.ok and r.result is True and r.result_type == "Bool"  # 3+3 == 6 and 1+1 == 2
    # four independent 0.2 s Vqa calls overlap: well under the 0.8 s sequential sum
    assert r.time_ms < 600, r.time_ms
    tr = {t.step: t for t in r.trace}
    assert all(t.status == "ok" for t in r.trace)
    assert tr["ANSWER0"].inputs["image"]["ref"] == "LEFT"
    assert tr["ANSWER0"].output == "three" and tr["ANSWER0"].time_ms >= 150
    assert tr["ANSWER4"].inputs["expr"]["vars"]["ANSWER0"] == "three"
    assert tr["ANSWER4"].start_ms >= max(tr[f"ANSWER{i}"].start_ms for i in range(4))
    d = r.to_dict()
    assert d["ok"] and d["result"] is True and len(d["trace"]) == 5
    with E.Executor(mods, sequential=True) as ex:
        r2 = ex.run(p, {"LEFT": img(), "RIGHT": img()})
    assert r2.result is True and r2.time_ms >= 780


def test_feature_cache_is_shared_across_concurrent_steps():
    computed = []

    def features(ctx, image):
        def compute():
            computed.append(ctx.step)
            time.sleep(0.1)
            return float(image.mean())
        return ctx.cache.get_or_compute(("clip_image", ctx.image_key(image)), compute)

    def loc(ctx, image, object):
        features(ctx, image)
        return objs([[6, 4, 14, 12]], [object], image.shape[:2])

    async def select(ctx, image, object, query, category=None):  # async module
        async def compute():
            computed.append("async:" + ctx.step)
            return 1.0
        await ctx.cache.aget_or_compute(("clip_image", ctx.image_key(image)), compute)
        return object

    mods = E.builtin_modules() | {"Loc": loc, "Select": select}
    src = ("A=Loc(image=IMAGE, object='circle')\nB=Loc(image=IMAGE, object='star')\n"
           "C=Loc(image=IMAGE, object='square')\nS=Select(image=IMAGE, object=A, query='red')\n"
           "N=Eval('{NA} + {NB} + {NC}')\nNA=Count(object=S)\nNB=Count(object=B)\n"
           "NC=Count(object=C)\nRESULT=N")
    with E.Executor(mods) as ex:
        r = ex.run(parse_program(src), {"IMAGE": img()})
    assert r.ok and r.result == 3
    assert len(computed) == 1, computed  # one image, one feature computation
    assert r.cache["misses"] == 1 and r.cache["hits"] == 3


def test_step_error_is_structured_and_dependents_skip():
    def vqa(ctx, image, question):
        if "boom" in question:
            raise RuntimeError("model replica exploded\ntraceback...")
        return "2"
    mods = E.builtin_modules() | {"Vqa": vqa}
    src = ("A=Vqa(image=IMAGE, question='boom?')\nB=Vqa(image=IMAGE, question='ok?')\n"
           "C=Eval('A + B')\nRESULT=C")
    with E.Executor(mods) as ex:
        r = ex.run(parse_program(src), {"IMAGE": img()})
    assert not r.ok and r.result is None
    assert r.error.to_dict() == {"step": "A", "line": 1, "module": "Vqa", "type": "RuntimeError",
                                 "message": "model replica exploded"}
    st = {t.step: t.status for t in r.trace}
    assert st == {"A": "error", "B": "ok", "C": "skipped", }
    # an Eval failure at run time (exponent bomb) is a step error too, not a crash
    p = parse_program("N=Count(object=O)\nX=Eval('N ** N ** N ** N')\nRESULT=X",
                      {"O": "ObjectList"})
    with E.Executor(E.builtin_modules()) as ex:
        r = ex.run(p, {"O": objs([[0, 0, 1, 1]] * 9)})
    assert not r.ok and r.error.type == "ExprError" and "exponent" in r.error.message


def test_bad_module_output_and_time_limit():
    mods = E.builtin_modules() | {"Vqa": lambda ctx, image, question: {"not": "text"},
                                  "Seg": lambda ctx, image: "not objects"}
    with E.Executor(mods) as ex:
        r = ex.run(parse_program("A=Vqa(image=IMAGE, question='q')\nRESULT=A"), {"IMAGE": img()})
        assert not r.ok and r.error.type == "TypeError" and "not a program value" in r.error.message
        r = ex.run(parse_program("A=Seg(image=IMAGE)\nRESULT=A"), {"IMAGE": img()})
        assert not r.ok and "signature says ObjectList" in r.error.message

    async def slow(ctx, image, question):
        import asyncio
        await asyncio.sleep(5)
        return "x"
    with E.Executor(E.builtin_modules() | {"Vqa": slow}, time_limit_s=0.2) as ex:
        t = time.perf_counter()
        r = ex.run(parse_program("A=Vqa(image=IMAGE, question='q')\nB=Eval('A')\nRESULT=B"),
                   {"IMAGE": img()})
    assert time.perf_counter() - t < 2
    assert not r.ok and r.error.type == "TimeLimitExceeded" and r.error.step == "A"
    assert [t.status for t in r.trace] == ["timeout", "timeout"]


def test_inputs_checked():
    p = parse_program(NLVR, TWO)
    with E.Executor(E.builtin_modules()) as ex:
        with pytest.raises(ProgramError, match="missing program inputs"):
            ex.run(p, {"LEFT": img()})
        with pytest.raises(ProgramError, match="must be Image"):
            ex.run(p, {"LEFT": img(), "RIGHT": np.zeros((4, 4), np.float32)})
        with pytest.raises(ProgramError, match="no implementation"):
            ex.run(p, {"LEFT": img(), "RIGHT": img()})


def test_image_modules_and_png_trace():
    mods = E.builtin_modules()
    image = img()
    o = objs([[6, 4, 14, 12]], ["red square"])
    src = ("A=Crop(image=IMAGE, object=O)\nB=CropLeftOf(image=IMAGE, object=O)\n"
           "C=CropRightOf(image=IMAGE, object=O)\nD=CropAbove(image=IMAGE, object=O)\n"
           "F=CropBelow(image=IMAGE, object=O)\nG=ColorPop(image=IMAGE, object=O)\n"
           "H=BgBlur(image=IMAGE, object=O)\nT=Tag(image=IMAGE, object=O)\nRESULT=T")
    with E.Executor(mods) as ex:
        r = ex.run(parse_program(src, {"IMAGE": "Image", "O": "ObjectList"}),
                   {"IMAGE": image, "O": o})
    assert r.ok, r.error
    v = r.values
    assert v["A"].shape == (8, 8, 3) and (v["A"] == (200, 20, 20)).all()
    assert v["B"].shape == (32, 6, 3) and v["C"].shape == (32, 34, 3)
    assert v["D"].shape == (4, 48, 3) and v["F"].shape == (20, 48, 3)
    assert (v["G"][5, 7] == (200, 20, 20)).all() and len(set(v["G"][20, 30])) == 1
    assert (v["H"][4:12, 6:14] == image[4:12, 6:14]).all()
    assert (v["T"] != image).any() and r.result_type == "Image"
    tr = {t.step: t for t in r.trace}
    assert tr["T"].output["png"].startswith("data:image/png;base64,")
    assert "png" not in tr["T"].inputs["image"]["value"]  # inputs reference, not re-encode
